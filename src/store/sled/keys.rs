//! How the sled backend lays its keys out, and the parked notifications'
//! binary records. Big-endian numbers, so that a tree's order is the
//! numbers' order.

use crate::store::StoreError;

pub(super) fn batch_key(job_id: &str, no: u32) -> Vec<u8> {
    let mut k = job_prefix(job_id);
    k.extend_from_slice(&no.to_be_bytes());
    k
}

/// Every key of a job's batches and failures starts with it.
pub(super) fn job_prefix(job_id: &str) -> Vec<u8> {
    let mut k = job_id.as_bytes().to_vec();
    k.push(0);
    k
}

pub(super) fn failure_key(job_id: &str, no: u32, pair: u32) -> Vec<u8> {
    let mut k = batch_key(job_id, no);
    k.extend_from_slice(&pair.to_be_bytes());
    k
}

pub(super) fn license_key(token: &str, adam_id: &str, pricing: &str) -> String {
    format!("{token}\0{adam_id}\0{pricing}")
}

pub(super) fn user_key(token: &str, client_user_id: &str) -> String {
    format!("{token}\0{client_user_id}")
}

pub(super) fn held_key(token: &str, id: u64) -> Vec<u8> {
    let mut k = job_prefix(token);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// In `meta`.
pub(super) fn drift_key(token: &str) -> Vec<u8> {
    format!("drift\0{token}").into_bytes()
}

/// In the `ids` tree: how many finished jobs retention has forgotten.
pub(super) const PRUNED_KEY: &[u8] = b"pruned_jobs";

/// The count under [`PRUNED_KEY`], as stored (absent: none pruned yet).
pub(super) fn pruned_count(stored: Option<&[u8]>) -> u64 {
    stored
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

pub(super) fn id_of(key: &[u8]) -> u64 {
    key.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// A notification waiting for its event to be recorded.
pub(super) struct Parked {
    pub id: u64,
    pub at_ms: u64,
    pub envelope: Vec<u8>,
}

pub(super) fn parked_at_key(at_ms: u64, id: u64) -> Vec<u8> {
    let mut k = at_ms.to_be_bytes().to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Binary, not JSON: envelopes are bytes, and a foreign event may collect
/// many of them. Per entry: id, park time (u64 BE), length (u32 BE), bytes.
pub(super) fn encode_parked(entries: &[Parked]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in entries {
        out.extend_from_slice(&p.id.to_be_bytes());
        out.extend_from_slice(&p.at_ms.to_be_bytes());
        out.extend_from_slice(&(p.envelope.len() as u32).to_be_bytes());
        out.extend_from_slice(&p.envelope);
    }
    out
}

pub(super) fn decode_parked(key: &[u8], mut bytes: &[u8]) -> Result<Vec<Parked>, StoreError> {
    let corrupt = || StoreError::Corrupt {
        key: format!("parked/{}", String::from_utf8_lossy(key)),
        message: "truncated parked notification".to_string(),
    };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (head, rest) = bytes.split_at_checked(20).ok_or_else(corrupt)?;
        let id = u64::from_be_bytes(head[..8].try_into().map_err(|_| corrupt())?);
        let at_ms = u64::from_be_bytes(head[8..16].try_into().map_err(|_| corrupt())?);
        let len = u32::from_be_bytes(head[16..20].try_into().map_err(|_| corrupt())?) as usize;
        let (envelope, rest) = rest.split_at_checked(len).ok_or_else(corrupt)?;
        out.push(Parked {
            id,
            at_ms,
            envelope: envelope.to_vec(),
        });
        bytes = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_batch_and_pair_order() {
        assert!(batch_key("j", 1) < batch_key("j", 2));
        assert!(batch_key("j", 255) < batch_key("j", 256));
        assert!(failure_key("j", 0, 9) < failure_key("j", 1, 0));
        assert!(batch_key("j", u32::MAX) < batch_key("j\u{1}", 0));
    }

    #[test]
    fn parked_records_round_trip() {
        let parked = [
            Parked {
                id: 7,
                at_ms: 9,
                envelope: b"a".to_vec(),
            },
            Parked {
                id: 8,
                at_ms: 10,
                envelope: Vec::new(),
            },
        ];
        let bytes = encode_parked(&parked);
        let back = decode_parked(b"e", &bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(
            (back[0].id, back[0].at_ms, &back[0].envelope[..]),
            (7, 9, &b"a"[..])
        );
        assert_eq!(
            (back[1].id, back[1].at_ms, back[1].envelope.len()),
            (8, 10, 0)
        );
        assert!(decode_parked(b"e", &bytes[..bytes.len() - 1]).is_err());
    }
}
