//! A notification secret per token. Every customer's token holder can
//! read its location's client config back from Apple, the registered
//! `notificationAuthToken` included: a secret shared by all tokens would
//! let one customer forge another's notifications. So each token gets its
//! own, generated when the token is first registered, kept in the store
//! (`secret/NAME` in meta, so every replica knows it) and registered with
//! that token's location only. The listener finds the token by the secret
//! presented and binds the notification to it.
//!
//! The older shared secret (`[notifications] auth_token_file`, or the
//! replicas' stored one), where it exists, is only an upgrade path: it is
//! accepted for a token until that token has been registered with its own
//! secret for [`LEGACY_GRACE`].

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::lifecycle::now_ms;
use crate::store::{Store, StoreError};

/// How long a rotated-out secret, or that of a deleted token, is still
/// answered (Apple may be retrying notifications signed with it).
pub const GRACE: Duration = Duration::from_secs(10 * 60);
/// How long the older shared secret is accepted for a token once that
/// token is registered with a secret of its own.
pub const LEGACY_GRACE: Duration = Duration::from_secs(60 * 60);

fn key(token: &str) -> String {
    format!("secret/{token}")
}

/// What the store keeps of a token's secret.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Kept {
    current: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<String>,
    /// Until when `previous` is still accepted (unix ms).
    #[serde(default)]
    previous_until_ms: u64,
    /// When `current` was first registered with Apple (unix ms; 0: not yet).
    #[serde(default)]
    registered_ms: u64,
    /// When the token was deleted (unix ms; 0: it is not).
    #[serde(default)]
    deleted_ms: u64,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("current", &"<redacted>")
            .field("registered_ms", &self.registered_ms)
            .field("deleted_ms", &self.deleted_ms)
            .finish_non_exhaustive()
    }
}

/// Who a presented secret speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The named token's (its current secret, or one rotated out within
    /// [`GRACE`]).
    Token(String),
    /// A token deleted within [`GRACE`]: answered and ignored.
    Deleted(String),
    /// The older shared secret.
    Legacy,
    Unknown,
}

/// A hash of a secret: the index is looked up by it, so no lookup
/// compares secrets byte by byte, and no secret is kept as a map key.
type Digested = [u8; 32];

fn digest(secret: &str) -> Digested {
    Sha256::digest(secret.as_bytes()).into()
}

/// Every token's secrets, as this process last read or wrote them.
pub struct Secrets {
    kept: RwLock<HashMap<String, Kept>>,
    /// Digest -> (token, whether it is the token's current secret).
    index: RwLock<HashMap<Digested, (String, bool)>>,
    legacy: Option<Digested>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").finish_non_exhaustive()
    }
}

impl Secrets {
    /// `legacy`: the older shared secret, if one exists.
    pub fn new(legacy: Option<&str>) -> Secrets {
        Secrets {
            kept: RwLock::default(),
            index: RwLock::default(),
            legacy: legacy.map(digest),
        }
    }

    fn remember(&self, token: &str, kept: Kept) {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        index.retain(|_, (t, _)| t != token);
        if let Some(previous) = &kept.previous {
            index.insert(digest(previous), (token.to_string(), false));
        }
        index.insert(digest(&kept.current), (token.to_string(), true));
        drop(index);
        self.kept
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.to_string(), kept);
    }

    fn kept_of(&self, token: &str) -> Option<Kept> {
        self.kept
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    async fn read(store: &dyn Store, token: &str) -> Result<Option<Kept>, StoreError> {
        let Some(text) = store.meta(&key(token)).await? else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|_| StoreError::Corrupt {
                key: key(token),
                message: "not a notification secret record".into(),
            })
    }

    async fn write(&self, store: &dyn Store, token: &str, kept: Kept) -> Result<(), StoreError> {
        let text = serde_json::to_string(&kept).map_err(|e| StoreError::Corrupt {
            key: key(token),
            message: e.to_string(),
        })?;
        store.put_meta(&key(token), &text).await?;
        self.remember(token, kept);
        Ok(())
    }

    /// Reads a token's secrets from the store (another replica may have
    /// made them).
    pub async fn load(&self, store: &dyn Store, token: &str) -> Result<(), StoreError> {
        if let Some(kept) = Self::read(store, token).await? {
            self.remember(token, kept);
        }
        Ok(())
    }

    /// The secret to register for `token`: the kept one, or a new one (at
    /// first registration, or for a token added again after a delete).
    /// Called by the replica working the token, which alone writes it.
    pub async fn ensure(&self, store: &dyn Store, token: &str) -> Result<String, StoreError> {
        match Self::read(store, token).await? {
            Some(kept) if kept.deleted_ms == 0 => {
                let current = kept.current.clone();
                self.remember(token, kept);
                Ok(current)
            }
            _ => {
                let kept = Kept {
                    current: generate(),
                    ..Kept::default()
                };
                let current = kept.current.clone();
                self.write(store, token, kept).await?;
                Ok(current)
            }
        }
    }

    /// Apple took `token`'s secret: the older shared one now has
    /// [`LEGACY_GRACE`] left for it.
    pub async fn registered(&self, store: &dyn Store, token: &str) -> Result<(), StoreError> {
        let Some(mut kept) = Self::read(store, token).await? else {
            return Ok(());
        };
        if kept.registered_ms == 0 {
            kept.registered_ms = now_ms();
            self.write(store, token, kept).await?;
        }
        Ok(())
    }

    /// A new secret for `token`; the old one is still accepted for
    /// [`GRACE`]. The token's worker registers it at its next look at the
    /// client config.
    pub async fn rotate(&self, store: &dyn Store, token: &str) -> Result<(), StoreError> {
        let old = Self::read(store, token)
            .await?
            .filter(|k| k.deleted_ms == 0);
        let kept = Kept {
            current: generate(),
            previous: old.map(|k| k.current),
            previous_until_ms: now_ms() + GRACE.as_millis() as u64,
            ..Kept::default()
        };
        self.write(store, token, kept).await
    }

    /// `token` was deleted: its secret is answered, and ignored, for
    /// [`GRACE`], then refused.
    pub async fn deleted(&self, store: &dyn Store, token: &str) -> Result<(), StoreError> {
        if let Some(mut kept) = Self::read(store, token).await? {
            kept.deleted_ms = now_ms();
            self.write(store, token, kept).await?;
        }
        Ok(())
    }

    /// The secret `token` registers now, if it has one.
    pub fn current(&self, token: &str) -> Option<String> {
        self.kept_of(token)
            .filter(|k| k.deleted_ms == 0)
            .map(|k| k.current)
    }

    /// Who `presented` speaks for.
    pub fn find(&self, presented: Option<&str>) -> Found {
        let Some(presented) = presented.filter(|p| !p.is_empty()) else {
            return Found::Unknown;
        };
        let hashed = digest(presented);
        let token = self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hashed)
            .cloned();
        let now = now_ms();
        if let Some((token, current)) = token
            && let Some(kept) = self.kept_of(&token)
        {
            let grace = GRACE.as_millis() as u64;
            let previous_ok = !current && now < kept.previous_until_ms;
            if kept.deleted_ms != 0 {
                if now < kept.deleted_ms + grace && (current || previous_ok) {
                    return Found::Deleted(token);
                }
            } else if current || previous_ok {
                return Found::Token(token);
            }
        }
        if self.legacy == Some(hashed) {
            return Found::Legacy;
        }
        Found::Unknown
    }

    /// Whether the older shared secret is still accepted for `token`.
    pub fn legacy_allowed(&self, token: &str) -> bool {
        match self.kept_of(token) {
            None => true,
            Some(k) => {
                k.registered_ms == 0 || now_ms() < k.registered_ms + LEGACY_GRACE.as_millis() as u64
            }
        }
    }

    /// Whether `token`'s secrets have been read or written here.
    pub fn knows(&self, token: &str) -> bool {
        self.kept
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(token)
    }
}

/// 32 random bytes, base64url without padding: 43 characters.
fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_secret_is_found_for_its_token_only_and_goes_with_a_delete_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sled::SledStore::open(dir.path()).unwrap();
        let secrets = Secrets::new(Some("shared"));
        let a = secrets.ensure(&store, "a").await.unwrap();
        let b = secrets.ensure(&store, "b").await.unwrap();
        assert!(a.len() >= 43 && a != b);
        assert_eq!(secrets.ensure(&store, "a").await.unwrap(), a, "kept");
        assert_eq!(secrets.find(Some(&a)), Found::Token("a".into()));
        assert_eq!(secrets.find(Some(&b)), Found::Token("b".into()));
        assert_eq!(secrets.find(Some("shared")), Found::Legacy);
        assert_eq!(secrets.find(Some("nope")), Found::Unknown);
        assert_eq!(secrets.find(None), Found::Unknown);

        // Another replica reads them from the store.
        let other = Secrets::new(None);
        assert_eq!(other.find(Some(&a)), Found::Unknown);
        other.load(&store, "a").await.unwrap();
        assert_eq!(other.find(Some(&a)), Found::Token("a".into()));

        secrets.rotate(&store, "a").await.unwrap();
        let a2 = secrets.current("a").unwrap();
        assert_ne!(a2, a);
        assert_eq!(secrets.find(Some(&a2)), Found::Token("a".into()));
        assert_eq!(secrets.find(Some(&a)), Found::Token("a".into()), "grace");

        secrets.deleted(&store, "b").await.unwrap();
        assert_eq!(secrets.find(Some(&b)), Found::Deleted("b".into()));
        // Added again: a new secret, the old one no longer the token's.
        let b2 = secrets.ensure(&store, "b").await.unwrap();
        assert_ne!(b2, b);
        assert_eq!(secrets.find(Some(&b)), Found::Unknown);

        assert!(secrets.legacy_allowed("a"));
        secrets.registered(&store, "a").await.unwrap();
        assert!(secrets.legacy_allowed("a"), "within the hour");
        assert!(format!("{:?}", secrets.kept_of("a")).contains("redacted"));
        assert!(!format!("{:?}", secrets.kept_of("a")).contains(&a2));
    }
}
