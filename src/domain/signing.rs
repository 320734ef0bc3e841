//! Signatures on the commands released to the MDM: HMAC-SHA256 over
//! `"<unix seconds>.<raw body>"`, sent as `X-Vppd-Timestamp` and
//! `X-Vppd-Signature: sha256=<hex>`. The timestamp inside the signed text
//! lets the MDM refuse replays; every POST, retries included, is signed
//! afresh.

use sha2::{Digest, Sha256};

pub const TIMESTAMP_HEADER: &str = "X-Vppd-Timestamp";
pub const SIGNATURE_HEADER: &str = "X-Vppd-Signature";

/// The shared signing secret. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl SigningSecret {
    /// The file's content without surrounding whitespace (an editor's final
    /// newline is not part of the secret).
    pub fn from_text(text: &str) -> Option<SigningSecret> {
        let trimmed = text.trim();
        (!trimmed.is_empty()).then(|| SigningSecret(trimmed.as_bytes().to_vec()))
    }

    /// `(timestamp header, signature header)` values for `body` sent at `unix_seconds`.
    pub fn sign(&self, unix_seconds: u64, body: &[u8]) -> (String, String) {
        let ts = unix_seconds.to_string();
        let mut message = Vec::with_capacity(ts.len() + 1 + body.len());
        message.extend_from_slice(ts.as_bytes());
        message.push(b'.');
        message.extend_from_slice(body);
        let mac = hmac_sha256(&self.0, &message);
        (ts, format!("sha256={}", hex::encode(mac)))
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// HMAC (RFC 2104) with SHA-256; sha2 is already a dependency, and HMAC is
/// a dozen lines over it.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(message);
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner);
    outer.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_4231_vectors() {
        // Test case 2.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn signs_timestamp_dot_body_and_trims_the_file() {
        let secret = SigningSecret::from_text("  s3cret\n").unwrap();
        let (ts, sig) = secret.sign(1_700_000_000, b"{\"commands\":[]}");
        assert_eq!(ts, "1700000000");
        let expected = hmac_sha256(b"s3cret", b"1700000000.{\"commands\":[]}");
        assert_eq!(sig, format!("sha256={}", hex::encode(expected)));
        assert!(SigningSecret::from_text(" \n").is_none());
        assert!(!format!("{secret:?}").contains("s3cret"));
    }
}
