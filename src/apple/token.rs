//! The sToken file that Apple School/Business Manager downloads.
//!
//! The file holds one Base64 string of a JSON object `{token, expDate,
//! orgName}`. Apple wants the whole Base64 string as the bearer, not the inner
//! `token`. The value is a credential: [`SToken`] never prints it, and parse
//! errors name the file but never quote its content.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;
use time::OffsetDateTime;

/// Apple's date format: UTC with a numeric offset without colon
/// (`2030-11-08T22:33:22+0000`), which RFC 3339 parsers reject.
const APPLE_DATE: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second][offset_hour sign:mandatory][offset_minute]"
);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {path} is empty")]
    Empty { path: PathBuf },
    #[error("token file {path} is not a valid sToken: {reason}")]
    Malformed { path: PathBuf, reason: &'static str },
}

/// A parsed sToken. `Debug` shows the organization and expiry only.
#[derive(Clone)]
pub struct SToken {
    bearer: String,
    org_name: String,
    expires_at: OffsetDateTime,
    /// Fingerprint of the bearer: lets the simulator and the store tell tokens
    /// apart without keeping the secret itself around.
    fingerprint: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Inner {
    token: String,
    exp_date: String,
    org_name: String,
}

impl SToken {
    pub fn from_file(path: &Path) -> Result<SToken, TokenError> {
        let raw = std::fs::read(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(raw).map_err(|_| TokenError::Malformed {
            path: path.to_path_buf(),
            reason: "not UTF-8 text",
        })?;
        SToken::parse(&text).map_err(|e| match e {
            ParseError::Empty => TokenError::Empty {
                path: path.to_path_buf(),
            },
            ParseError::Malformed(reason) => TokenError::Malformed {
                path: path.to_path_buf(),
                reason,
            },
        })
    }

    /// Parses the file content (surrounding whitespace is ignored).
    pub fn parse(text: &str) -> Result<SToken, ParseError> {
        let bearer = text.trim();
        if bearer.is_empty() {
            return Err(ParseError::Empty);
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(bearer)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(bearer))
            .map_err(|_| ParseError::Malformed("not Base64"))?;
        let inner: Inner = serde_json::from_slice(&decoded).map_err(|_| {
            ParseError::Malformed("Base64 does not hold the JSON object {token, expDate, orgName}")
        })?;
        if inner.token.is_empty() {
            return Err(ParseError::Malformed("the inner token field is empty"));
        }
        let expires_at = parse_apple_date(&inner.exp_date).ok_or(ParseError::Malformed(
            "expDate is not a date like 2030-11-08T22:33:22+0000",
        ))?;
        Ok(SToken {
            fingerprint: fingerprint(bearer),
            bearer: bearer.to_string(),
            org_name: inner.org_name,
            expires_at,
        })
    }

    /// Builds a token file's content, for the simulator, the demo and tests.
    pub fn encode(inner_token: &str, expires_at: OffsetDateTime, org_name: &str) -> String {
        let json = serde_json::json!({
            "token": inner_token,
            "expDate": format_apple_date(expires_at),
            "orgName": org_name,
        });
        base64::engine::general_purpose::STANDARD.encode(json.to_string())
    }

    /// The value for `Authorization: Bearer`.
    pub fn bearer(&self) -> &str {
        &self.bearer
    }

    pub fn org_name(&self) -> &str {
        &self.org_name
    }

    pub fn expires_at(&self) -> OffsetDateTime {
        self.expires_at
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl std::fmt::Debug for SToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SToken")
            .field("org_name", &self.org_name)
            .field("expires_at", &format_apple_date(self.expires_at))
            .field("bearer", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty token")]
    Empty,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
}

/// A short, non-reversible identifier of a bearer value.
pub fn fingerprint(bearer: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bearer.trim().as_bytes());
    hex::encode(&digest[..8])
}

pub fn parse_apple_date(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s.trim(), APPLE_DATE)
        .ok()
        .or_else(|| {
            OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339).ok()
        })
}

pub fn format_apple_date(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(APPLE_DATE)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00+0000"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC_EXAMPLE: &str = "eyJ0b2tlbiI6ImMybHRkV3hoZEdWa0xYUnZhMlZ1TFdadmNpMWtiMk56IiwiZXhwRGF0ZSI6IjIwMjctMDYtMzBUMjM6NTk6NTkrMDAwMCIsIm9yZ05hbWUiOiJFeGFtcGxlIFNjaG9vbCBEaXN0cmljdCJ9";

    #[test]
    fn parses_the_reference_example() {
        let t = SToken::parse(&format!("{DOC_EXAMPLE}\n")).unwrap();
        assert_eq!(t.org_name(), "Example School District");
        assert_eq!(
            format_apple_date(t.expires_at()),
            "2027-06-30T23:59:59+0000"
        );
        assert_eq!(t.bearer(), DOC_EXAMPLE);
    }

    #[test]
    fn debug_never_shows_the_bearer() {
        let t = SToken::parse(DOC_EXAMPLE).unwrap();
        let shown = format!("{t:?} {t:#?}");
        assert!(!shown.contains(DOC_EXAMPLE));
        assert!(!shown.contains("c2ltdWxhdGVk"));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn encode_round_trips() {
        let exp = OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
        let text = SToken::encode("inner", exp, "Org");
        let t = SToken::parse(&text).unwrap();
        assert_eq!(t.expires_at(), exp);
        assert_eq!(t.org_name(), "Org");
    }

    #[test]
    fn malformed_content_is_named_but_not_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.vpptoken");
        std::fs::write(&path, "c2VjcmV0LW5vdC1qc29u").unwrap();
        let err = SToken::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("bad.vpptoken"), "{err}");
        assert!(!err.contains("c2VjcmV0"), "{err}");

        std::fs::write(&path, "%%%not base64%%%").unwrap();
        let err = SToken::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("not Base64"), "{err}");
        assert!(!err.contains("%%%"), "{err}");

        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            SToken::from_file(&path),
            Err(TokenError::Empty { .. })
        ));

        let bad_date = base64::engine::general_purpose::STANDARD
            .encode(r#"{"token":"x","expDate":"tomorrow","orgName":"o"}"#);
        std::fs::write(&path, bad_date).unwrap();
        let err = SToken::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("expDate"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = SToken::from_file(Path::new("/nonexistent/x.vpptoken")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.vpptoken"));
    }
}
