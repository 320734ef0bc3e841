//! The token registry: every customer location (sToken) vppd serves, from
//! the config file or added, renewed and removed through the API while it
//! runs, with each token's state.
//!
//! A token is `registering` until Apple has its client config (limits read,
//! notification URL and secret set), then `ready`; `failed` says why it
//! cannot go on (expired, revoked by Apple, managed by another MDM,
//! refused) until a `PUT` renews it or takes the location over. Nothing is
//! sent for a token's jobs unless it is ready, and one token's state never
//! touches another's, nor vppd's readiness.
//!
//! Thousands of tokens cost little: every client shares one HTTP connection
//! pool, a token is a few hundred bytes here plus its client, and its tasks
//! sleep on a `Notify` while idle (see [`crate::daemon`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::apple::types::error_number;
use crate::apple::{AppleError, Client};
use crate::runtime::metrics::Metrics;

/// Where a token comes from: config-file tokens cannot be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Api,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Registering,
    Ready,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Registering => "registering",
            State::Ready => "ready",
            State::Failed => "failed",
        }
    }
}

/// Why a token failed: a bounded metric label and the operator's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Expired { on: time::OffsetDateTime },
    Revoked,
    OtherMdm { name: String, id: String },
    Refused { reason: String },
}

impl Failure {
    /// The `vppd_token_state` label of a failed token.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Expired { .. } => "expired",
            Failure::Revoked => "revoked",
            Failure::OtherMdm { .. } => "other_mdm",
            Failure::Refused { .. } => "refused",
        }
    }

    /// Classifies Apple's refusal of a token; `None` when the error is not
    /// about the token itself.
    pub fn from_apple(error: &AppleError, expires_at: time::OffsetDateTime) -> Option<Failure> {
        if !error.is_token_refused() {
            return None;
        }
        Some(match error.error_number() {
            Some(error_number::TOKEN_EXPIRED) => Failure::Expired { on: expires_at },
            Some(error_number::TOKEN_REVOKED) => Failure::Revoked,
            _ => Failure::Refused {
                reason: error.to_string(),
            },
        })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Expired { on } => write!(
                f,
                "expired on {}: download a new token in Apple School/Business Manager and PUT it",
                rfc3339(*on)
            ),
            Failure::Revoked => write!(
                f,
                "revoked by Apple ({}): download a new token in Apple School/Business Manager and PUT it",
                error_number::TOKEN_REVOKED
            ),
            Failure::OtherMdm { name, id } => write!(
                f,
                "managed by another MDM (`{name}`, id `{id}`): PUT the token with \"takeover\": true to take the location over"
            ),
            Failure::Refused { reason } => write!(f, "refused by Apple: {reason}"),
        }
    }
}

pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What vppd learned about a token; changes under the token's lock.
#[derive(Debug, Clone)]
struct Status {
    state: State,
    failure: Option<Failure>,
    uid: Option<String>,
    location_name: Option<String>,
    takeover: bool,
}

/// One token vppd serves.
pub struct Token {
    name: String,
    source: Source,
    client: Client,
    status: Mutex<Status>,
    removed: AtomicBool,
    /// This replica holds the token's lease and works it (always, alone).
    worked: AtomicBool,
    /// `updated_ms` of the stored record this token was last built or
    /// renewed from: a newer one was put through another replica.
    record_ms: AtomicU64,
    /// Apple reported license changes (ASSET_COUNT, or a fresh Get
    /// Assets): jobs waiting for licenses are checked again.
    pub licenses_changed: AtomicBool,
    /// New work or a state change: the submitter looks again.
    pub wake_submit: Notify,
    /// A batch was sent, or the state changed: the tracker looks again.
    pub wake_track: Notify,
    /// Renewed or told to take over: register again now.
    pub wake_register: Notify,
    /// A notification for an event vppd did not send arrived: the drift
    /// follower reads the token's assignments again soon.
    pub wake_drift: Notify,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("source", &self.source)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// The token document of the token API; also what the replica working a
/// token stores for the others to show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenDoc {
    pub name: String,
    pub state: State,
    pub location_name: Option<String>,
    pub u_id: Option<String>,
    pub expires_at: String,
    pub error: Option<String>,
    pub limits: std::collections::BTreeMap<String, i64>,
    pub source: Source,
    pub takeover: bool,
}

impl TokenDoc {
    /// Why jobs of this token wait, when it is not ready.
    pub fn waiting_for(&self) -> Option<String> {
        match (self.state, &self.error) {
            (State::Ready, _) => None,
            (State::Failed, Some(e)) => Some(format!("token {}: {e}", self.name)),
            (State::Failed, None) => Some(format!("token {}: failed", self.name)),
            (State::Registering, _) => Some(format!("token {}: registering with Apple", self.name)),
        }
    }
}

impl Token {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        // A poisoned lock only means a panic mid-update of plain fields.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> Source {
        self.source
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn state(&self) -> State {
        self.status().state
    }

    pub fn is_ready(&self) -> bool {
        self.state() == State::Ready
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    pub fn uid(&self) -> Option<String> {
        self.status().uid.clone()
    }

    pub fn takeover(&self) -> bool {
        self.status().takeover
    }

    /// Why jobs of this token wait, when it is not ready.
    pub fn waiting_for(&self) -> Option<String> {
        self.doc().waiting_for()
    }

    /// Whether this replica works the token (holds its lease).
    pub fn is_worked(&self) -> bool {
        self.worked.load(Ordering::SeqCst)
    }

    pub fn record_ms(&self) -> u64 {
        self.record_ms.load(Ordering::SeqCst)
    }

    pub fn set_record_ms(&self, ms: u64) {
        self.record_ms.store(ms, Ordering::SeqCst);
    }

    pub fn doc(&self) -> TokenDoc {
        let status = self.status().clone();
        TokenDoc {
            name: self.name.clone(),
            state: status.state,
            location_name: status.location_name,
            u_id: status.uid,
            expires_at: rfc3339(self.client.expires_at()),
            error: status.failure.map(|f| f.to_string()),
            limits: self
                .client
                .limits()
                .to_map()
                .into_iter()
                .map(|(k, v)| (k, v as i64))
                .collect(),
            source: self.source,
            takeover: status.takeover,
        }
    }

    pub fn wake_all(&self) {
        self.wake_submit.notify_one();
        self.wake_track.notify_one();
        self.wake_register.notify_one();
    }
}

/// Builds the Apple client of a token: every client on one shared HTTP
/// connection pool, with the config's base URL, rate and timeout.
#[derive(Clone)]
pub struct ClientFactory {
    http: reqwest::Client,
    base_url: String,
    requests_per_second: u32,
    timeout: std::time::Duration,
    metrics: Arc<Metrics>,
    /// Replicas: the lease notice of every token's client
    /// ([`crate::apple::ClientOptions::lease_notice`]).
    lease_notice: Option<std::time::Duration>,
}

impl ClientFactory {
    pub fn new(
        apple: &crate::runtime::config::AppleConfig,
        metrics: Arc<Metrics>,
    ) -> Result<ClientFactory, AppleError> {
        Ok(ClientFactory {
            http: crate::apple::client::http_client(apple.timeout)?,
            base_url: apple.base_url.clone(),
            requests_per_second: apple.requests_per_second,
            timeout: apple.timeout,
            metrics,
            lease_notice: None,
        })
    }

    /// Every token client it makes sends only under the token's lease,
    /// valid for `notice` more.
    pub fn fenced(mut self, notice: std::time::Duration) -> ClientFactory {
        self.lease_notice = Some(notice);
        self
    }

    /// The client of a token in the registry: fenced when replicas share
    /// the store, so it sends nothing until the lease keeper gives it the
    /// token's lease.
    pub fn client(&self, name: &str, stoken: crate::apple::token::SToken) -> Client {
        self.build(name, stoken, self.lease_notice)
    }

    /// A client for one look before a token is let in (which location an
    /// sToken is for): never fenced, since no lease exists for it yet.
    pub fn probe(&self, name: &str, stoken: crate::apple::token::SToken) -> Client {
        self.build(name, stoken, None)
    }

    fn build(
        &self,
        name: &str,
        stoken: crate::apple::token::SToken,
        lease_notice: Option<std::time::Duration>,
    ) -> Client {
        let mut opts = crate::apple::ClientOptions::new(
            &self.base_url,
            name,
            self.requests_per_second,
            self.timeout,
        );
        opts.lease_notice = lease_notice;
        Client::with_http(self.http.clone(), opts, stoken, self.metrics.clone())
    }
}

/// Every token, by name, and the uIds they serve.
pub struct Registry {
    metrics: Arc<Metrics>,
    /// Replicas share the store: a token's state metrics come from the
    /// replica working it, and state changes are stored for the others.
    shared: AtomicBool,
    /// Tokens worked here whose state changed since it was last stored.
    dirty: Mutex<HashSet<String>>,
    pub wake_publish: Notify,
    tokens: RwLock<HashMap<String, Arc<Token>>>,
    /// uId → token name, for the listener's check of each notification.
    uids: RwLock<HashMap<String, String>>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Registry {
        Registry {
            metrics,
            shared: AtomicBool::new(false),
            dirty: Mutex::new(HashSet::new()),
            wake_publish: Notify::new(),
            tokens: RwLock::new(HashMap::new()),
            uids: RwLock::new(HashMap::new()),
        }
    }

    pub fn set_shared(&self, shared: bool) {
        self.shared.store(shared, Ordering::SeqCst);
    }

    fn is_shared(&self) -> bool {
        self.shared.load(Ordering::SeqCst)
    }

    /// This replica took the token's lease: it works the token and
    /// speaks for its state.
    pub fn lease_taken(&self, token: &Token) {
        token.worked.store(true, Ordering::SeqCst);
        self.set(token, State::Registering, None);
    }

    /// This replica gave the token's lease up: another one speaks for it.
    pub fn lease_lost(&self, token: &Token) {
        token.worked.store(false, Ordering::SeqCst);
        {
            let mut status = token.status();
            status.state = State::Registering;
            status.failure = None;
        }
        if self.is_shared() || token.is_removed() {
            self.forget_metrics(&token.name);
        } else {
            self.publish(token);
        }
    }

    /// Names of the tokens whose state is to be stored, taken.
    pub fn take_dirty(&self) -> Vec<String> {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        dirty.drain().collect()
    }

    fn mark(&self, token: &Token) {
        if self.is_shared() && token.is_worked() {
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(token.name.clone());
            self.wake_publish.notify_one();
        }
    }

    fn forget_metrics(&self, name: &str) {
        let m = &self.metrics;
        let _ = m.token_ready.remove_label_values(&[name]);
        for label in STATE_LABELS {
            let _ = m.token_state.remove_label_values(&[name, label]);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Token>>> {
        self.tokens.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Token>>> {
        self.tokens.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Token>> {
        self.read().get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Every token, by name.
    pub fn all(&self) -> Vec<Arc<Token>> {
        let mut all: Vec<_> = self.read().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Adds a token (state `registering`); `None` when the name is taken.
    pub fn insert(
        &self,
        name: &str,
        source: Source,
        client: Client,
        uid: Option<String>,
        takeover: bool,
    ) -> Option<Arc<Token>> {
        let mut tokens = self.write();
        if tokens.contains_key(name) {
            return None;
        }
        let token = Arc::new(Token {
            name: name.to_string(),
            source,
            client,
            status: Mutex::new(Status {
                state: State::Registering,
                failure: None,
                uid: None,
                location_name: None,
                takeover,
            }),
            removed: AtomicBool::new(false),
            worked: AtomicBool::new(false),
            record_ms: AtomicU64::new(0),
            licenses_changed: AtomicBool::new(false),
            wake_submit: Notify::new(),
            wake_track: Notify::new(),
            wake_register: Notify::new(),
            wake_drift: Notify::new(),
        });
        tokens.insert(name.to_string(), token.clone());
        drop(tokens);
        if let Some(uid) = uid {
            self.learned(&token, &uid, None);
        }
        self.publish(&token);
        Some(token)
    }

    /// Forgets a token: its tasks end, its notifications become foreign.
    pub fn remove(&self, name: &str) -> Option<Arc<Token>> {
        let token = self.write().remove(name)?;
        token.removed.store(true, Ordering::SeqCst);
        if let Some(uid) = token.uid() {
            let mut uids = self.uids.write().unwrap_or_else(|p| p.into_inner());
            if uids.get(&uid).is_some_and(|n| n == name) {
                uids.remove(&uid);
            }
        }
        self.forget_metrics(name);
        let _ = self.metrics.token_expiry.remove_label_values(&[name]);
        token.wake_all();
        Some(token)
    }

    /// Whether a notification's uId belongs to a token vppd serves.
    /// The name of the token serving `uid`, if known here.
    pub fn token_for_uid(&self, uid: &str) -> Option<String> {
        self.uids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()
    }

    pub fn knows_uid(&self, uid: &str) -> bool {
        self.uids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(uid)
    }

    /// What Apple's client config said about the token's location.
    pub fn learned(&self, token: &Token, uid: &str, location_name: Option<&str>) {
        if uid.is_empty() {
            return;
        }
        {
            let mut status = token.status();
            if let Some(old) = status.uid.replace(uid.to_string())
                && old != uid
            {
                self.uids
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&old);
            }
            if let Some(l) = location_name {
                status.location_name = Some(l.to_string());
            }
        }
        self.uids
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_string(), token.name.clone());
        self.mark(token);
    }

    pub fn set_takeover(&self, token: &Token, takeover: bool) {
        token.status().takeover = takeover;
        self.mark(token);
    }

    /// Registered with Apple: jobs go.
    pub fn set_ready(&self, token: &Token) {
        self.set(token, State::Ready, None);
    }

    pub fn set_registering(&self, token: &Token) {
        self.set(token, State::Registering, None);
    }

    /// Nothing more is sent for it until a `PUT` renews or takes it over.
    pub fn set_failed(&self, token: &Token, failure: Failure) {
        let same = {
            let s = token.status();
            s.state == State::Failed && s.failure.as_ref() == Some(&failure)
        };
        if !same {
            tracing::error!(token = %token.name, error = %failure, "token failed; its jobs wait");
        }
        self.set(token, State::Failed, Some(failure));
    }

    fn set(&self, token: &Token, state: State, failure: Option<Failure>) {
        {
            let mut status = token.status();
            status.state = state;
            status.failure = failure;
        }
        self.publish(token);
        self.mark(token);
        token.wake_submit.notify_one();
        token.wake_track.notify_one();
    }

    /// The state metrics of a token (with replicas: only where it is
    /// worked, so that one series per token exists across them).
    fn publish(&self, token: &Token) {
        if self.is_shared() && !token.is_worked() {
            return;
        }
        let (state, label) = {
            let s = token.status();
            (
                s.state,
                match (&s.state, &s.failure) {
                    (State::Failed, Some(f)) => f.label(),
                    (state, _) => state.as_str(),
                },
            )
        };
        let m = &self.metrics;
        m.token_ready
            .with_label_values(&[&token.name])
            .set((state == State::Ready) as i64);
        for l in STATE_LABELS {
            m.token_state
                .with_label_values(&[&token.name, l])
                .set((l == label) as i64);
        }
    }
}

/// Values of `vppd_token_state`'s `state` label: the states, a failed
/// token's reason in place of `failed`.
const STATE_LABELS: [&str; 6] = [
    "registering",
    "ready",
    "expired",
    "revoked",
    "other_mdm",
    "refused",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, number: i32) -> AppleError {
        AppleError::Api {
            endpoint: "client_config",
            status,
            error: crate::apple::types::ErrorResponse {
                error_number: number,
                error_message: "no".into(),
                error_info: None,
            },
            retry_after: None,
        }
    }

    #[test]
    fn apple_refusals_name_the_reason() {
        let on = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let f = |s, n| Failure::from_apple(&api(s, n), on);
        assert_eq!(
            f(401, error_number::TOKEN_EXPIRED),
            Some(Failure::Expired { on })
        );
        assert_eq!(f(401, error_number::TOKEN_REVOKED), Some(Failure::Revoked));
        assert!(matches!(
            f(401, error_number::INVALID_TOKEN),
            Some(Failure::Refused { .. })
        ));
        assert_eq!(f(429, error_number::TOO_MANY_REQUESTS), None);
        let text = Failure::Expired { on }.to_string();
        assert!(
            text.starts_with("expired on 2023-11-14T22:13:20Z"),
            "{text}"
        );
        assert!(Failure::Revoked.to_string().contains("9625"));
        let other = Failure::OtherMdm {
            name: "Other".into(),
            id: "x".into(),
        };
        assert!(other.to_string().contains("another MDM"));
        assert!(other.to_string().contains("takeover"));
    }
}
