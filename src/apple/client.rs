//! The client of Apple's API: one instance per sToken.
//!
//! Every request for a token passes one gate: a pause set by the last
//! `Retry-After` (which holds back every request of the token, not only the
//! retried one), then a GCRA rate limiter with a burst of 1 at
//! min(`requests_per_second`, Apple's `maxRequestPerSecond`).
//!
//! Retryable answers (429, 503, 9646, other 5xx) are retried after at least
//! `Retry-After`, else with exponential backoff and jitter. GETs are retried
//! on transport errors too; a management POST whose request may have reached
//! Apple but got no answer is *not* resent: the caller gets
//! [`AppleError::UnknownOutcome`] and must reconcile first, because a resend
//! could create a second event.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::value::RawValue;
use tokio::sync::watch;

use super::observer::Observer;
use super::report::{AssignmentIn, AssignmentsPageIn};
use super::token::SToken;
use super::types::*;
use crate::domain::ids::EventId;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AppleError {
    /// Apple answered with an error (a non-2xx status, or a 200 whose body is
    /// an ErrorResponse).
    #[error("Apple refused {endpoint} (HTTP {status}, error {}: {})", .error.error_number, .error.error_message)]
    Api {
        endpoint: &'static str,
        status: u16,
        error: ErrorResponse,
        retry_after: Option<Duration>,
    },
    /// The request may have reached Apple, but no answer came: whether an
    /// event was created is unknown.
    #[error("no answer from Apple for {endpoint} after sending it ({message}); outcome unknown")]
    UnknownOutcome {
        endpoint: &'static str,
        message: String,
    },
    /// Apple could not be reached (after retries for requests that allow them).
    #[error("cannot reach Apple for {endpoint}: {message}")]
    Transport {
        endpoint: &'static str,
        message: String,
    },
    /// Apple answered 2xx with a body that is not what the endpoint returns.
    #[error("unexpected answer from Apple for {endpoint}: {message}")]
    Decode {
        endpoint: &'static str,
        message: String,
    },
}

impl AppleError {
    pub fn error_number(&self) -> Option<i32> {
        match self {
            AppleError::Api { error, .. } => Some(error.error_number),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            AppleError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Apple's answer means "try again later": nothing was processed.
    pub fn is_retryable(&self) -> bool {
        match self {
            AppleError::Api { status, error, .. } => {
                *status == 429
                    || *status >= 500
                    || matches!(
                        error.error_number,
                        error_number::TOO_MANY_REQUESTS
                            | error_number::SERVICE_UNAVAILABLE
                            | error_number::INTERNAL_ERROR
                            | error_number::MAINTENANCE
                    )
            }
            AppleError::Transport { .. } => true,
            _ => false,
        }
    }

    /// The token itself is refused: expired, revoked, unknown, or lacking rights.
    pub fn is_token_refused(&self) -> bool {
        match self {
            AppleError::Api { status, error, .. } => {
                *status == 401
                    || *status == 403
                    || matches!(
                        error.error_number,
                        error_number::LOGIN_REQUIRED
                            | error_number::TOKEN_EXPIRED
                            | error_number::INVALID_TOKEN
                            | error_number::TOKEN_REVOKED
                            | error_number::FACILITATOR_NOT_ALLOWED
                            | error_number::LEGACY_TOKEN
                            | error_number::INVALID_AUTHORIZATION_HEADER
                    )
            }
            _ => false,
        }
    }
}

/// Options of a client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub base_url: String,
    /// Name of the token in the config: what its reports and logs name.
    pub token_name: String,
    pub requests_per_second: u32,
    pub timeout: Duration,
    /// Attempts per call for retryable answers before the error is returned.
    pub max_attempts: u32,
    /// First backoff interval; doubles per attempt, with jitter.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// `Some(notice)`: the token's work is fenced by a lease (replicas
    /// share it); the client sends only while the lease it was given
    /// ([`Client::hold_lease`]) is valid for at least `notice` more by
    /// this process's monotonic clock, and no request outlives the lease.
    pub lease_notice: Option<Duration>,
}

impl ClientOptions {
    pub fn new(
        base_url: &str,
        token_name: &str,
        requests_per_second: u32,
        timeout: Duration,
    ) -> Self {
        ClientOptions {
            base_url: base_url.trim_end_matches('/').to_string(),
            token_name: token_name.to_string(),
            requests_per_second: requests_per_second.max(1),
            timeout,
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            lease_notice: None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    opts: ClientOptions,
    /// Swapped in place by a renewal, so the rate gate, the Retry-After
    /// pause and every task holding this client carry on undisturbed.
    token: RwLock<SToken>,
    /// Unix seconds: the sToken's expDate, then Apple's latest
    /// `tokenExpirationDate`.
    expires_at: AtomicI64,
    observer: Arc<dyn Observer>,
    gate: Mutex<Gate>,
    /// Woken when the lease is renewed, taken or lost.
    lease_changed: tokio::sync::Notify,
    limits: watch::Sender<Limits>,
    /// The latest Retry-After pause by the wall clock, for sharing it with
    /// the replica that works the token next.
    pauses: watch::Sender<Option<std::time::SystemTime>>,
}

struct Gate {
    limiter: Arc<DefaultDirectRateLimiter>,
    rate: u32,
    paused_until: Option<Instant>,
    /// With a lease notice: when the lease this client works under ends
    /// (`None`: it holds none).
    lease_until: Option<Instant>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("token_name", &self.inner.opts.token_name)
            .field("base_url", &self.inner.opts.base_url)
            .field("token", &*self.token())
            .finish()
    }
}

fn limiter(rate: u32) -> Arc<DefaultDirectRateLimiter> {
    // A burst of 1 spaces requests evenly; the extra millisecond keeps any
    // closed one-second window at `rate` requests despite timer rounding.
    let period =
        Duration::from_nanos(1_000_000_000 / rate.max(1) as u64) + Duration::from_millis(1);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::MIN);
    Arc::new(RateLimiter::direct(quota))
}

/// A page walk's result: every item, and the versionId of the first page (the
/// one to use as the next `sinceVersionId`).
#[derive(Debug, Clone)]
pub struct Walk<T> {
    pub items: Vec<T>,
    pub version_id: String,
}

/// How a streamed page walk ended: the versionId of its first page (the
/// next `sinceVersionId`), and whether every page carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkEnd {
    pub version_id: String,
    pub stable: bool,
}

/// Filters of Get Assignments.
#[derive(Debug, Clone, Default)]
pub struct AssignmentsQuery {
    pub adam_id: Option<String>,
    pub pricing_param: Option<String>,
    pub serial_number: Option<String>,
    pub client_user_id: Option<String>,
    pub since_version_id: Option<String>,
}

impl AssignmentsQuery {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(v) = &self.adam_id {
            q.push(("adamId", v.clone()));
        }
        if let Some(v) = &self.pricing_param {
            q.push(("pricingParam", v.clone()));
        }
        if let Some(v) = &self.serial_number {
            q.push(("serialNumber", v.clone()));
        }
        if let Some(v) = &self.client_user_id {
            q.push(("clientUserId", v.clone()));
        }
        if let Some(v) = &self.since_version_id {
            q.push(("sinceVersionId", v.clone()));
        }
        q
    }
}

/// Filters of Get Assets.
#[derive(Debug, Clone, Default)]
pub struct AssetsQuery {
    pub adam_id: Option<String>,
    pub pricing_param: Option<String>,
}

/// Filters of Get Users.
#[derive(Debug, Clone, Default)]
pub struct UsersQuery {
    pub client_user_id: Option<String>,
    pub active_only: bool,
    pub since_version_id: Option<String>,
}

enum Method {
    Get,
    Post(serde_json::Value),
}

/// What an answer said besides its body.
struct Answer {
    endpoint: &'static str,
    status: u16,
    retry_after: Option<Duration>,
}

/// The error of an error status whose body is no ErrorResponse (a proxy's
/// page, say): the status keeps its meaning for the retry decision.
fn error_without_body(status: u16) -> ErrorResponse {
    ErrorResponse {
        error_number: if status == 429 {
            error_number::TOO_MANY_REQUESTS
        } else {
            0
        },
        error_message: format!("HTTP {status} without an Apple error body"),
        error_info: None,
    }
}

/// The HTTP client every token shares: one connection pool for the
/// whole process, however many tokens it serves.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, AppleError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("vppd/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| AppleError::Transport {
            endpoint: "client",
            message: e.to_string(),
        })
}

impl Client {
    /// A client with its own connection pool (tests, tools with one token),
    /// reporting to `observer`.
    pub fn new(
        opts: ClientOptions,
        token: SToken,
        observer: Arc<dyn Observer>,
    ) -> Result<Client, AppleError> {
        let http = http_client(opts.timeout)?;
        Ok(Client::with_http(http, opts, token, observer))
    }

    /// A client on a shared connection pool ([`http_client`]).
    pub fn with_http(
        http: reqwest::Client,
        opts: ClientOptions,
        token: SToken,
        observer: Arc<dyn Observer>,
    ) -> Client {
        let rate = opts.requests_per_second.max(1);
        let expires = token.expires_at().unix_timestamp();
        observer.token_expiry(&opts.token_name, expires);
        let (limits, _) = watch::channel(Limits::default());
        let (pauses, _) = watch::channel(None);
        Client {
            inner: Arc::new(Inner {
                http,
                gate: Mutex::new(Gate {
                    limiter: limiter(rate),
                    rate,
                    paused_until: None,
                    lease_until: None,
                }),
                lease_changed: tokio::sync::Notify::new(),
                opts,
                token: RwLock::new(token),
                expires_at: AtomicI64::new(expires),
                observer,
                limits,
                pauses,
            }),
        }
    }

    /// The sToken in use (a guard: hold it briefly).
    pub fn token(&self) -> std::sync::RwLockReadGuard<'_, SToken> {
        // A poisoned lock only means a panic mid-swap; the token is whole.
        self.inner.token.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Swaps in a renewed sToken; requests from now on carry it.
    pub fn set_token(&self, token: SToken) {
        self.set_expires_at(token.expires_at());
        *self.inner.token.write().unwrap_or_else(|p| p.into_inner()) = token;
    }

    /// When the token expires, as Apple last said (or its file).
    pub fn expires_at(&self) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(self.inner.expires_at.load(Ordering::Relaxed))
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    }

    /// Sets the expiry metric again (after a probe under the same name).
    pub fn republish_expiry(&self) {
        self.set_expires_at(self.expires_at());
    }

    fn set_expires_at(&self, at: time::OffsetDateTime) {
        let secs = at.unix_timestamp();
        self.inner.expires_at.store(secs, Ordering::Relaxed);
        self.inner.observer.token_expiry(self.token_name(), secs);
    }

    pub fn token_name(&self) -> &str {
        &self.inner.opts.token_name
    }

    /// Apple's limits as last read from service config.
    pub fn limits(&self) -> Limits {
        *self.inner.limits.borrow()
    }

    /// Notified whenever the limits change.
    pub fn watch_limits(&self) -> watch::Receiver<Limits> {
        self.inner.limits.subscribe()
    }

    /// The request rate in force: min(configured, Apple's maxRequestPerSecond).
    pub fn effective_rate(&self) -> u32 {
        self.gate().rate
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        // A poisoned gate only means a panic elsewhere mid-update; its data
        // (a limiter and an instant) is still valid.
        self.inner.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads service config and applies its limits (rate included).
    pub async fn refresh_limits(&self) -> Result<Limits, AppleError> {
        let config = self.service_config().await?;
        let limits = Limits::from_map(&config.limits);
        self.apply_limits(limits);
        Ok(limits)
    }

    pub fn apply_limits(&self, limits: Limits) {
        let configured = self.inner.opts.requests_per_second.max(1);
        let rate = limits
            .max_request_per_second
            .map(|apple| apple.min(configured))
            .unwrap_or(configured)
            .max(1);
        {
            let mut gate = self.gate();
            if gate.rate != rate {
                gate.limiter = limiter(rate);
                gate.rate = rate;
            }
        }
        let name = self.token_name();
        let observer = &self.inner.observer;
        for (key, value) in limits.to_map() {
            observer.limit(name, &key, value as i64);
        }
        observer.limit(name, "effectiveRequestsPerSecond", rate as i64);
        self.inner.limits.send_if_modified(|current| {
            let changed = *current != limits;
            *current = limits;
            changed
        });
    }

    /// Holds back every request of this token until `until`.
    fn pause_until(&self, until: Instant) {
        let mut gate = self.gate();
        if gate.paused_until.is_none_or(|p| p < until) {
            gate.paused_until = Some(until);
            let wall =
                std::time::SystemTime::now() + until.saturating_duration_since(Instant::now());
            self.inner.pauses.send_replace(Some(wall));
        }
    }

    /// Holds back every request until `until` by the wall clock: a pause
    /// Apple gave the replica that worked this token before.
    pub fn pause_until_wall(&self, until: std::time::SystemTime) {
        if let Ok(left) = until.duration_since(std::time::SystemTime::now()) {
            self.pause_until(Instant::now() + left);
        }
    }

    /// Changes whenever a `Retry-After` pauses this token.
    pub fn watch_pause(&self) -> watch::Receiver<Option<std::time::SystemTime>> {
        self.inner.pauses.subscribe()
    }

    /// The lease under which this client sends ends at `until` (by this
    /// process's monotonic clock); `None`: it holds none, and sends
    /// nothing until it is given one (with [`ClientOptions::lease_notice`]).
    pub fn hold_lease(&self, until: Option<Instant>) {
        self.gate().lease_until = until;
        self.inner.lease_changed.notify_waiters();
    }

    /// With a lease notice: waits until the lease is valid for the notice
    /// more, and says how long it has left then (a request's timeout).
    async fn wait_lease(&self) -> Option<Duration> {
        let notice = self.inner.opts.lease_notice?;
        loop {
            let changed = self.inner.lease_changed.notified();
            let now = Instant::now();
            match self.gate().lease_until {
                Some(until) if until >= now + notice => return Some(until - now),
                _ => {}
            }
            // A lease lapsed by the clock alone (a pause, a frozen VM)
            // comes back only through a renewal, which notifies.
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
        }
    }

    /// Waits for the lease, the Retry-After pause and the rate limiter;
    /// how long the lease has left, if the client works under one.
    async fn wait_turn(&self) -> Option<Duration> {
        self.wait_lease().await;
        self.wait_rate().await;
        // The pause or the limiter may have held the request past the lease.
        self.wait_lease().await
    }

    /// Waits for the Retry-After pause and the rate limiter.
    async fn wait_rate(&self) {
        let started = Instant::now();
        let mut waited = false;
        loop {
            let (pause, limiter) = {
                let gate = self.gate();
                (gate.paused_until, gate.limiter.clone())
            };
            if let Some(until) = pause
                && until > Instant::now()
            {
                waited = true;
                tokio::time::sleep_until(until.into()).await;
                continue;
            }
            if limiter.check().is_err() {
                waited = true;
                limiter.until_ready().await;
            }
            // A Retry-After may have arrived while we waited for the limiter.
            let still_paused = self.gate().paused_until.is_some_and(|u| u > Instant::now());
            if !still_paused {
                break;
            }
        }
        if waited {
            self.inner
                .observer
                .rate_limit_wait(self.token_name(), started.elapsed());
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.inner.opts.base_url, path)
    }

    /// Sends one request with the retry policy described in the module doc.
    async fn call<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        path: &str,
        query: &[(&str, String)],
        method: Method,
        authenticated: bool,
        success_field: &str,
    ) -> Result<T, AppleError> {
        let bytes = self
            .call_bytes(endpoint, path, query, method, authenticated, success_field)
            .await?;
        decode(endpoint, &bytes)
    }

    /// A successful answer's body, checked (an error body is an error) but
    /// not decoded: for a caller that decodes it borrowing from the bytes.
    async fn call_bytes(
        &self,
        endpoint: &'static str,
        path: &str,
        query: &[(&str, String)],
        method: Method,
        authenticated: bool,
        success_field: &str,
    ) -> Result<Bytes, AppleError> {
        let idempotent = matches!(method, Method::Get);
        let mut backoff = crate::domain::retry::Backoff::new(
            self.inner.opts.initial_backoff,
            self.inner.opts.max_backoff,
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .send_once(endpoint, path, query, &method, authenticated, success_field)
                .await;
            let error = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let retry = match &error {
                AppleError::Api { .. } => error.is_retryable(),
                // Not sent at all: safe to send again, POST included.
                AppleError::Transport { .. } => true,
                AppleError::UnknownOutcome { .. } => idempotent,
                AppleError::Decode { .. } => false,
            };
            if !retry || attempt >= self.inner.opts.max_attempts {
                return Err(match error {
                    AppleError::UnknownOutcome { endpoint, message } if idempotent => {
                        AppleError::Transport { endpoint, message }
                    }
                    e => e,
                });
            }
            let delay = backoff.next_delay();
            let retry_after = match &error {
                AppleError::Api { retry_after, .. } => *retry_after,
                _ => None,
            };
            match retry_after {
                // The pause in the gate already holds every request back.
                Some(_) => {}
                None => tokio::time::sleep(delay).await,
            }
            tracing::debug!(token = self.token_name(), endpoint, attempt, %error, "retrying Apple request");
        }
    }

    /// One attempt: waits its turn at the gate, sends, and checks the
    /// answer ([`Client::check_answer`]).
    async fn send_once(
        &self,
        endpoint: &'static str,
        path: &str,
        query: &[(&str, String)],
        method: &Method,
        authenticated: bool,
        success_field: &str,
    ) -> Result<Bytes, AppleError> {
        let lease_left = self.wait_turn().await;
        let mut req = self.request(path, query, method, authenticated);
        if let Some(left) = lease_left {
            req = req.timeout(left.min(self.inner.opts.timeout));
        }
        let started = Instant::now();
        let observer = &self.inner.observer;
        let name = self.token_name();
        let response = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                observer.request_unanswered(name, endpoint);
                // reqwest errors may carry the URL; ours never hold secrets,
                // but drop it anyway so no query value reaches a log.
                let connect = e.is_connect();
                let message = e.without_url().to_string();
                return Err(if connect {
                    AppleError::Transport { endpoint, message }
                } else {
                    AppleError::UnknownOutcome { endpoint, message }
                });
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                observer.request_unanswered(name, endpoint);
                return Err(AppleError::UnknownOutcome {
                    endpoint,
                    message: e.without_url().to_string(),
                });
            }
        };
        observer.request_answered(name, endpoint, status, started.elapsed());
        if let Some(wait) = retry_after
            && (status == 429 || status >= 500)
        {
            self.pause_until(Instant::now() + wait);
            observer.retry_after(name, wait);
        }
        let answer = Answer {
            endpoint,
            status,
            retry_after,
        };
        self.check_answer(&answer, bytes, success_field)
    }

    /// The request of one attempt, the bearer attached when it needs one.
    fn request(
        &self,
        path: &str,
        query: &[(&str, String)],
        method: &Method,
        authenticated: bool,
    ) -> reqwest::RequestBuilder {
        let url = self.url(path);
        let mut req = match method {
            Method::Get => self.inner.http.get(&url),
            Method::Post(body) => self.inner.http.post(&url).json(body),
        };
        if !query.is_empty() {
            req = req.query(query);
        }
        if authenticated {
            let bearer = self.token().bearer().to_string();
            req = req.bearer_auth(bearer);
        }
        req
    }

    /// Whether an answer is a success: an error status, a body that is not
    /// JSON, or a 2xx body that is an ErrorResponse is an error. Every
    /// answer keeps the token's expiry current.
    fn check_answer(
        &self,
        answer: &Answer,
        bytes: Bytes,
        success_field: &str,
    ) -> Result<Bytes, AppleError> {
        let &Answer {
            endpoint, status, ..
        } = answer;
        // The top level only, each value left as raw text: what is asked of
        // every answer below is read without building the whole body as a
        // `Value` (a page of Get Assignments is a thousand records), and
        // the answer's own type is then decoded straight from the bytes.
        let top: Option<HashMap<String, &RawValue>> = crate::domain::json::from_bytes(&bytes).ok();
        let is_json = top.is_some() || serde_json::from_slice::<IgnoredAny>(&bytes).is_ok();
        // Apple adds tokenExpirationDate to answers when expiry nears (or
        // the token was renewed): any answer keeps expiresAt current.
        if let Some(at) = top
            .as_ref()
            .and_then(|m| m.get("tokenExpirationDate"))
            .and_then(|d| serde_json::from_str::<String>(d.get()).ok())
            .and_then(|d| super::token::parse_apple_date(&d))
        {
            self.set_expires_at(at);
        }
        if !(200..300).contains(&status) {
            let error = serde_json::from_slice::<ErrorResponse>(&bytes)
                .ok()
                .unwrap_or_else(|| error_without_body(status));
            // 9646 with a Retry-After pauses the token whatever the status.
            if status != 429 && status < 500 {
                self.pause_for_number(answer, &error);
            }
            return Err(self.api_error(answer, error));
        }
        if !is_json {
            return Err(AppleError::Decode {
                endpoint,
                message: format!("HTTP {status} with a body that is not JSON"),
            });
        }
        let error_body = top
            .as_ref()
            .is_some_and(|m| is_error_top(|k| m.contains_key(k), success_field));
        if error_body && let Ok(error) = serde_json::from_slice::<ErrorResponse>(&bytes) {
            self.pause_for_number(answer, &error);
            return Err(self.api_error(answer, error));
        }
        Ok(bytes)
    }

    /// Apple's "too many requests" or "unavailable" number with a
    /// `Retry-After` pauses the token, whatever the HTTP status said.
    fn pause_for_number(&self, answer: &Answer, error: &ErrorResponse) {
        let retryable_number = matches!(
            error.error_number,
            error_number::TOO_MANY_REQUESTS | error_number::SERVICE_UNAVAILABLE
        );
        if retryable_number && let Some(wait) = answer.retry_after {
            self.pause_until(Instant::now() + wait);
        }
    }

    /// Apple's error as the caller gets it, reported on the way.
    fn api_error(&self, answer: &Answer, error: ErrorResponse) -> AppleError {
        self.inner
            .observer
            .api_error(self.token_name(), error.error_number);
        AppleError::Api {
            endpoint: answer.endpoint,
            status: answer.status,
            error,
            retry_after: answer.retry_after,
        }
    }

    pub async fn service_config(&self) -> Result<ServiceConfigResponse, AppleError> {
        self.call(
            "service_config",
            "/service/config",
            &[],
            Method::Get,
            false,
            "limits",
        )
        .await
    }

    pub async fn client_config(&self) -> Result<ClientConfigResponse, AppleError> {
        self.call(
            "client_config",
            "/client/config",
            &[],
            Method::Get,
            true,
            "uId",
        )
        .await
    }

    /// Sets client config. Apple sends a TEST_NOTIFICATION first, so the
    /// listener must already accept the new secret. Not resent blindly on an
    /// unknown outcome, but setting the same config twice is harmless, so the
    /// caller may simply call again.
    pub async fn set_client_config(
        &self,
        request: &ClientConfigRequest,
    ) -> Result<ClientConfigResponse, AppleError> {
        let body = serde_json::to_value(request).map_err(|e| AppleError::Decode {
            endpoint: "client_config_set",
            message: e.to_string(),
        })?;
        self.call(
            "client_config_set",
            "/client/config",
            &[],
            Method::Post(body),
            true,
            "uId",
        )
        .await
    }

    pub async fn get_assets_page(
        &self,
        query: &AssetsQuery,
        page: Option<i32>,
    ) -> Result<GetAssetsResponse, AppleError> {
        let mut q = Vec::new();
        if let Some(v) = &query.adam_id {
            q.push(("adamId", v.clone()));
        }
        if let Some(v) = &query.pricing_param {
            q.push(("pricingParam", v.clone()));
        }
        if let Some(p) = page {
            q.push(("pageIndex", p.to_string()));
        }
        self.call(
            "assets",
            "/assets",
            &q,
            Method::Get,
            true,
            "currentPageIndex",
        )
        .await
    }

    pub async fn get_assets(&self, query: &AssetsQuery) -> Result<Walk<ResponseAsset>, AppleError> {
        let first = self.get_assets_page(query, None).await?;
        let version_id = first.page.version_id.clone();
        let mut items = first.assets;
        let mut next = first.page.next_page_index;
        while let Some(p) = next {
            let page = self.get_assets_page(query, Some(p)).await?;
            items.extend(page.assets);
            next = page.page.next_page_index;
        }
        Ok(Walk { items, version_id })
    }

    pub async fn get_assignments_page(
        &self,
        query: &AssignmentsQuery,
        page: Option<i32>,
    ) -> Result<GetAssignmentsResponse, AppleError> {
        decode("assignments", &self.assignments_page(query, page).await?)
    }

    /// A page of Get Assignments, checked but not decoded.
    async fn assignments_page(
        &self,
        query: &AssignmentsQuery,
        page: Option<i32>,
    ) -> Result<Bytes, AppleError> {
        let mut q = query.pairs();
        if let Some(p) = page {
            q.push(("pageIndex", p.to_string()));
        }
        self.call_bytes(
            "assignments",
            "/assignments",
            &q,
            Method::Get,
            true,
            "currentPageIndex",
        )
        .await
    }

    /// Walks every page once, handing each page's assignments to `each` as
    /// it arrives (and dropping them after): memory stays one page however
    /// many assignments the token holds. The end says the first page's
    /// versionId, the one to read `sinceVersionId` from next: Apple
    /// advises it so that nothing written during the walk is lost
    /// (apple-api-v2.md 4.3), which is why the walk is never restarted.
    /// Whether every page carried that versionId says whether the walk saw
    /// one state of the data: when it did not, records may have been seen
    /// twice or (when some vanished meanwhile) missed.
    ///
    /// A page's records borrow their strings from the page's bytes: a walk
    /// of a whole token during a rollout reads tens of millions of them,
    /// and copying four strings out of each was half the walk's cost.
    pub async fn walk_assignments<F>(
        &self,
        query: &AssignmentsQuery,
        mut each: F,
    ) -> Result<WalkEnd, AppleError>
    where
        F: FnMut(&[AssignmentIn<'_>]),
    {
        let bytes = self.assignments_page(query, None).await?;
        let first: AssignmentsPageIn<'_> = decode("assignments", &bytes)?;
        let version_id = first.version_id.to_string();
        let mut stable = true;
        let mut next = first.next_page_index;
        each(&first.assignments);
        while let Some(p) = next {
            let bytes = match self.assignments_page(query, Some(p)).await {
                Ok(bytes) => bytes,
                // The result shrank under the walk: the pages it had are read.
                Err(e) if e.error_number() == Some(error_number::PAGE_INDEX_OUT_OF_RANGE) => {
                    stable = false;
                    break;
                }
                Err(e) => return Err(e),
            };
            let page: AssignmentsPageIn<'_> = decode("assignments", &bytes)?;
            stable &= *page.version_id == *version_id;
            next = page.next_page_index;
            each(&page.assignments);
        }
        Ok(WalkEnd { version_id, stable })
    }

    /// Every assignment of a (filtered) query. When the data set changes
    /// during the walk (the versionId moves, or a page vanishes with 9650),
    /// it walks again, up to three times, and keeps the union of what every
    /// walk saw: nothing that existed before the walk started is missed.
    /// For the narrow reads that settle a batch's pairs; a read of a
    /// whole token goes through [`Client::walk_assignments`] instead.
    pub async fn get_assignments(
        &self,
        query: &AssignmentsQuery,
    ) -> Result<Walk<Assignment>, AppleError> {
        let mut union: Vec<Assignment> = Vec::new();
        // Pair keys, not the strings: a walk seen twice costs 8 bytes an item.
        let mut seen = std::collections::HashSet::new();
        let mut first_version = None;
        for _ in 0..3 {
            let end = self
                .walk_assignments(query, |page| {
                    union.extend(
                        page.iter()
                            .filter(|a| seen.insert(a.pair_key()))
                            .map(AssignmentIn::to_wire),
                    )
                })
                .await?;
            first_version.get_or_insert(end.version_id);
            if end.stable {
                break;
            }
        }
        Ok(Walk {
            items: union,
            version_id: first_version.unwrap_or_default(),
        })
    }

    pub async fn associate(
        &self,
        request: &ManageAssetsRequest,
    ) -> Result<EventResponse, AppleError> {
        self.manage("associate", "/assets/associate", request).await
    }

    pub async fn disassociate(
        &self,
        request: &ManageAssetsRequest,
    ) -> Result<EventResponse, AppleError> {
        self.manage("disassociate", "/assets/disassociate", request)
            .await
    }

    pub async fn revoke(&self, request: &RevokeAssetsRequest) -> Result<EventResponse, AppleError> {
        self.manage("revoke", "/assets/revoke", request).await
    }

    async fn manage<B: serde::Serialize>(
        &self,
        endpoint: &'static str,
        path: &str,
        request: &B,
    ) -> Result<EventResponse, AppleError> {
        let body = serde_json::to_value(request).map_err(|e| AppleError::Decode {
            endpoint,
            message: e.to_string(),
        })?;
        self.call(endpoint, path, &[], Method::Post(body), true, "eventId")
            .await
    }

    pub async fn event_status(&self, event_id: &EventId) -> Result<StatusResponse, AppleError> {
        self.call(
            "status",
            "/status",
            &[("eventId", event_id.as_str().to_owned())],
            Method::Get,
            true,
            "eventStatus",
        )
        .await
    }

    pub async fn get_users_page(
        &self,
        query: &UsersQuery,
        page: Option<i32>,
    ) -> Result<GetUsersResponse, AppleError> {
        let mut q = Vec::new();
        if let Some(v) = &query.client_user_id {
            q.push(("clientUserId", v.clone()));
        }
        if query.active_only {
            q.push(("activeOnly", "true".to_string()));
        }
        if let Some(v) = &query.since_version_id {
            q.push(("sinceVersionId", v.clone()));
        }
        if let Some(p) = page {
            q.push(("pageIndex", p.to_string()));
        }
        self.call("users", "/users", &q, Method::Get, true, "currentPageIndex")
            .await
    }

    pub async fn get_users(&self, query: &UsersQuery) -> Result<Walk<ResponseUser>, AppleError> {
        let first = self.get_users_page(query, None).await?;
        let version_id = first.page.version_id.clone();
        let mut items = first.users;
        let mut next = first.page.next_page_index;
        while let Some(p) = next {
            let page = self.get_users_page(query, Some(p)).await?;
            items.extend(page.users);
            next = page.page.next_page_index;
        }
        Ok(Walk { items, version_id })
    }

    pub async fn create_users(
        &self,
        request: &ManageUsersRequest,
    ) -> Result<EventResponse, AppleError> {
        self.manage("users_create", "/users/create", request).await
    }

    pub async fn update_users(
        &self,
        request: &ManageUsersRequest,
    ) -> Result<EventResponse, AppleError> {
        self.manage("users_update", "/users/update", request).await
    }

    pub async fn retire_users(
        &self,
        request: &ManageUsersRequest,
    ) -> Result<EventResponse, AppleError> {
        self.manage("users_retire", "/users/retire", request).await
    }
}

/// A successful answer's body as `T`.
fn decode<'de, T: Deserialize<'de>>(
    endpoint: &'static str,
    bytes: &'de [u8],
) -> Result<T, AppleError> {
    crate::domain::json::from_bytes(bytes).map_err(|e| AppleError::Decode {
        endpoint,
        message: e.to_string(),
    })
}

/// `Retry-After` as seconds or as an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        let future = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn error_classes() {
        let api = |status, number| AppleError::Api {
            endpoint: "x",
            status,
            error: ErrorResponse {
                error_number: number,
                error_message: String::new(),
                error_info: None,
            },
            retry_after: None,
        };
        assert!(api(429, error_number::TOO_MANY_REQUESTS).is_retryable());
        assert!(api(503, error_number::SERVICE_UNAVAILABLE).is_retryable());
        assert!(api(200, error_number::TOO_MANY_REQUESTS).is_retryable());
        assert!(!api(400, error_number::TOO_MANY_SERIAL_NUMBERS).is_retryable());
        assert!(api(401, error_number::TOKEN_EXPIRED).is_token_refused());
        assert!(!api(400, error_number::TOO_MANY_ASSETS).is_token_refused());
    }

    /// Remembers what the client reported, as (what, token, value).
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, String, i64)>>);

    impl Recorder {
        fn note(&self, what: &str, token: &str, value: i64) {
            let mut seen = self.0.lock().unwrap();
            seen.push((what.to_string(), token.to_string(), value));
        }
    }

    impl Observer for Recorder {
        fn token_expiry(&self, token: &str, unix_secs: i64) {
            self.note("expiry", token, unix_secs);
        }
        fn limit(&self, token: &str, key: &str, value: i64) {
            self.note(key, token, value);
        }
        fn rate_limit_wait(&self, token: &str, waited: Duration) {
            self.note("wait", token, waited.as_millis() as i64);
        }
        fn request_unanswered(&self, token: &str, endpoint: &'static str) {
            self.note(endpoint, token, -1);
        }
        fn request_answered(&self, token: &str, endpoint: &'static str, status: u16, _: Duration) {
            self.note(endpoint, token, status.into());
        }
        fn retry_after(&self, token: &str, wait: Duration) {
            self.note("retry_after", token, wait.as_secs() as i64);
        }
        fn api_error(&self, token: &str, number: i32) {
            self.note("error", token, number.into());
        }
    }

    #[test]
    fn the_expiry_and_the_limits_in_force_are_reported() {
        let expires = time::OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
        let token = SToken::parse(&SToken::encode("secret", expires, "School")).unwrap();
        let recorder = Arc::new(Recorder::default());
        let opts = ClientOptions::new("http://127.0.0.1:9", "school", 10, Duration::from_secs(1));
        let client = Client::new(opts, token, recorder.clone()).unwrap();
        let apple = Limits {
            max_request_per_second: Some(4),
            ..Limits::default()
        };
        client.apply_limits(apple);
        let seen = recorder.0.lock().unwrap().clone();
        assert_eq!(seen[0], ("expiry".into(), "school".into(), 1_900_000_000));
        let limit = |key: &str| {
            seen.iter()
                .find(|(what, token, _)| what == key && token == "school")
                .map(|(_, _, value)| *value)
        };
        assert_eq!(limit(limit_key::MAX_ASSETS), Some(apple.max_assets as i64));
        assert_eq!(limit("effectiveRequestsPerSecond"), Some(4));
        // What the client reports never carries the token's secret.
        assert!(
            seen.iter()
                .all(|(what, token, _)| !what.contains("secret") && !token.contains("secret"))
        );
    }
}
