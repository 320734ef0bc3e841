//! The embedded listener for Apple's notifications: `POST /notifications`.
//!
//! It does as little as it can before answering, because Apple retries slow
//! or failed deliveries: check the bearer secret in constant time, refuse a
//! body over `notifications.max_body_bytes` (by its Content-Length, and
//! while reading it), read and check the envelope and its payload, then
//! record the notificationId (dedupe) and the notification itself, in the
//! compact binary form of [`crate::domain::inbox`] (Apple's JSON is not kept), in
//! one durable store commit, and answer 200. Applying it to batches is the
//! applier's job, in the tracking stage (`track.rs`).
//!
//! The bearer secret names the token ([`crate::runtime::secrets`]): a
//! secret no token has is `401`. The notification is bound to that token:
//! a `uId` that is not the token's, or an ASSET_MANAGEMENT eventId vppd
//! sent for another token, is `403` (counted as `forged`) and nothing is
//! recorded; so one customer, who can read its own secret back from
//! Apple, cannot speak for another. Every notification type passes this
//! one check before anything is recorded: the applier later resolves
//! users, counts and drift by the `uId`, and pairs by the eventId, both
//! checked here. A deleted token's secret is answered 200 and ignored for
//! a grace (counted as `deleted`). With the older shared secret, a
//! notification whose `uId` belongs to no token vppd serves is answered
//! 200 and ignored (counted as `foreign`).
//!
//! Nothing is recorded for an answer other than 200: every refusal comes
//! before the store is touched, and a store that cannot make the record
//! durable undoes it before the 503 (see [`Store::record_notification`]),
//! so Apple's retry is recorded anew rather than taken for a duplicate.
//!
//! [`Store::record_notification`]: crate::store::Store::record_notification

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Histogram, IntCounter};

use crate::apple::report::{Received, receive_notification};
use crate::apple::types::notification_type;
use crate::runtime::context::Context;
use crate::runtime::http::{self, Body};
use crate::runtime::metrics::Metrics;
use crate::runtime::secrets::Found;
use crate::store::Recorded;

/// How often the listener reads the store's secrets again for a secret it
/// does not know (a token added or rotated through another replica).
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// At most one warning about forged notifications per token this often.
const FORGED_LOG_EVERY: Duration = Duration::from_secs(1);

pub struct Listener {
    ctx: Arc<Context>,
    max_body: usize,
    counted: Counted,
    reloaded: Mutex<Option<Instant>>,
    forged_logged: Mutex<std::collections::HashMap<String, Instant>>,
}

impl Listener {
    pub fn new(ctx: Arc<Context>, max_body: usize) -> Listener {
        Listener {
            ctx,
            max_body,
            counted: Counted::default(),
            reloaded: Mutex::new(None),
            forged_logged: Mutex::default(),
        }
    }

    /// Who the presented secret speaks for; an unknown one makes the
    /// store's secrets be read again first (at most every second).
    async fn find(&self, presented: Option<&str>) -> Found {
        let found = self.ctx.secrets.find(presented);
        if found != Found::Unknown {
            return found;
        }
        {
            let mut last = self.reloaded.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < RELOAD_EVERY) {
                return found;
            }
            *last = Some(Instant::now());
        }
        for token in self.ctx.tokens.all() {
            if let Err(error) = self.ctx.secrets.load(&*self.ctx.store, token.name()).await {
                tracing::warn!(%error, "cannot read the notification secrets");
                break;
            }
        }
        self.ctx.secrets.find(presented)
    }

    /// A notification refused as speaking for a token it is not.
    fn forged(&self, kind: Kind, token: &str, why: &str, started: Instant) -> Response<Body> {
        self.count(kind, Outcome::Forged, started);
        let log = {
            let mut logged = self.forged_logged.lock().unwrap_or_else(|p| p.into_inner());
            if logged.len() > 10_000 {
                logged.clear();
            }
            let due = logged
                .get(token)
                .is_none_or(|t| t.elapsed() >= FORGED_LOG_EVERY);
            if due {
                logged.insert(token.to_string(), Instant::now());
            }
            due
        };
        if log {
            tracing::warn!(token = %token, reason = why, "a notification under this token's secret spoke for another; refused");
        }
        error(StatusCode::FORBIDDEN, why)
    }

    fn too_large(&self) -> String {
        format!(
            "body over notifications.max_body_bytes ({} bytes)",
            self.max_body
        )
    }

    fn count(&self, kind: Kind, outcome: Outcome, started: Instant) {
        let (received, ack) = self.counted.get(&self.ctx.metrics, kind, outcome);
        for counter in received {
            counter.inc();
        }
        ack.observe(started.elapsed().as_secs_f64());
    }

    async fn receive(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        if req.uri().path() != "/notifications" {
            return error(StatusCode::NOT_FOUND, "not found");
        }
        if req.method() != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
        }
        let found = self.find(http::bearer(&req)).await;
        match &found {
            Found::Unknown => {
                self.count(Kind::UNKNOWN, Outcome::Unauthorized, started);
                tracing::warn!("notification with a missing or wrong bearer secret refused");
                return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            }
            Found::Deleted(_) => {
                // Apple may retry what it signed before the delete.
                self.count(Kind::UNKNOWN, Outcome::Deleted, started);
                http::drain(req.into_body(), http::DRAIN_LIMIT).await;
                return ok(br#"{"status":"ignored"}"#);
            }
            Found::Token(_) | Found::Legacy => {}
        }
        if http::content_length(&req).is_some_and(|n| n > self.max_body as u64) {
            self.count(Kind::UNKNOWN, Outcome::TooLarge, started);
            http::drain(req.into_body(), http::DRAIN_LIMIT).await;
            return error(StatusCode::PAYLOAD_TOO_LARGE, &self.too_large());
        }
        let body = match http::read_body(req.into_body(), self.max_body).await {
            Ok(b) => b,
            Err(http::BodyError::TooLarge { .. }) => {
                self.count(Kind::UNKNOWN, Outcome::TooLarge, started);
                return error(StatusCode::PAYLOAD_TOO_LARGE, &self.too_large());
            }
            Err(e) => {
                self.count(Kind::UNKNOWN, Outcome::Malformed, started);
                return error(e.status(), &e.to_string());
            }
        };
        // Read and checked once, here: the store keeps the result in the
        // form the applier reads without JSON (see `crate::domain::inbox`).
        let notification = match receive_notification(&body) {
            Ok(n) => n,
            Err(e) => {
                let kind = e.kind().map(Kind::of).unwrap_or(Kind::UNKNOWN);
                self.count(kind, Outcome::Malformed, started);
                return error(StatusCode::BAD_REQUEST, &e.to_string());
            }
        };
        let kind = Kind::of(notification.kind());
        let token = match found {
            Found::Token(name) => {
                let uid = crate::runtime::token_sync::uid_of(&self.ctx, &name).await;
                if uid.as_deref() != Some(notification.uid()) {
                    let why =
                        "the notification's uId is not that of the token whose secret it bears";
                    return self.forged(kind, &name, why, started);
                }
                name
            }
            _ => {
                // The older shared secret: a location vppd does not serve
                // (never added, or deleted) is acknowledged, so Apple stops
                // retrying, and nothing of it may touch our jobs.
                let Some(name) =
                    crate::runtime::token_sync::token_of_uid(&self.ctx, notification.uid()).await
                else {
                    self.count(kind, Outcome::Foreign, started);
                    tracing::info!(uid = %notification.uid(), notification_id = %notification.id(), "notification for a location vppd does not serve; acknowledged and ignored");
                    return ok(br#"{"status":"ignored"}"#);
                };
                if !self.ctx.secrets.knows(&name)
                    && let Err(error) = self.ctx.secrets.load(&*self.ctx.store, &name).await
                {
                    tracing::warn!(%error, "cannot read a token's notification secret");
                }
                if !self.ctx.secrets.legacy_allowed(&name) {
                    self.count(kind, Outcome::Unauthorized, started);
                    return error(
                        StatusCode::UNAUTHORIZED,
                        "the shared secret is no longer accepted for this token",
                    );
                }
                name
            }
        };
        if let Some(event_id) = event_of(&notification)
            && let Some(owner) =
                crate::runtime::token_sync::token_of_event(&self.ctx, &event_id).await
            && owner != token
        {
            let why = "the notification names an event vppd sent for another token";
            return self.forged(kind, &token, why, started);
        }
        // For an event this process sent, the pairs by number: a few bytes
        // where Apple's strings take over a kilobyte (`crate::domain::inbox`).
        let sent = &self.ctx.sent;
        let store = &*self.ctx.store;
        let pairs = match &notification {
            Received::Scanned(n) => sent.pairs_of(store, n).await,
            Received::Read { stored, .. } if kind == Kind::ASSET_MANAGEMENT => {
                sent.as_pairs(store, stored).await
            }
            Received::Read { .. } => None,
        };
        let stored = match pairs {
            Some(p) => Cow::Owned(p),
            None => notification.stored(),
        };
        let recorded = match self
            .ctx
            .store
            .record_notification(notification.id(), &stored)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot record a notification");
                self.count(kind, Outcome::Error, started);
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot record the notification",
                );
            }
        };
        match recorded {
            Recorded::New => {
                self.ctx.wake_apply.notify_one();
                if kind == Kind::OTHER {
                    tracing::info!(notification_type = %notification.kind(), notification_id = %notification.id(), "notification of an unknown type acknowledged");
                }
                self.count(kind, Outcome::Accepted, started);
            }
            Recorded::Duplicate => self.count(kind, Outcome::Duplicate, started),
        }
        ok(br#"{"status":"recorded"}"#)
    }
}

/// A bounded label value for the notification type: an index into
/// [`Kind::LABELS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kind(usize);

impl Kind {
    const LABELS: [&'static str; 7] = [
        notification_type::ASSET_MANAGEMENT,
        notification_type::ASSET_COUNT,
        notification_type::USER_MANAGEMENT,
        notification_type::USER_ASSOCIATED,
        notification_type::TEST_NOTIFICATION,
        "other",
        "unknown",
    ];
    const ASSET_MANAGEMENT: Kind = Kind(0);
    const OTHER: Kind = Kind(5);
    /// The envelope was not read far enough to know.
    const UNKNOWN: Kind = Kind(6);

    fn of(t: &str) -> Kind {
        Kind(
            Self::LABELS[..Self::OTHER.0]
                .iter()
                .position(|l| *l == t)
                .unwrap_or(Self::OTHER.0),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Duplicate,
    Foreign,
    Unauthorized,
    TooLarge,
    Malformed,
    Error,
    Forged,
    Deleted,
}

impl Outcome {
    const COUNT: usize = 9;

    fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Foreign => "foreign",
            Outcome::Unauthorized => "unauthorized",
            Outcome::TooLarge => "too_large",
            Outcome::Malformed => "malformed",
            Outcome::Error => "error",
            Outcome::Forged => "forged",
            Outcome::Deleted => "deleted",
        }
    }
}

/// The metric series a notification's answer counts in, looked up once per
/// (type, outcome) rather than by label on every request; created on first
/// use, so the series exported stay those requests made.
struct Counted {
    /// vppd_notifications_total and vppd_notifications_received_total.
    received: [[OnceLock<[IntCounter; 2]>; Outcome::COUNT]; Kind::LABELS.len()],
    ack: [OnceLock<Histogram>; Outcome::COUNT],
}

impl Default for Counted {
    fn default() -> Counted {
        Counted {
            received: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            ack: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl Counted {
    fn get(&self, m: &Metrics, kind: Kind, outcome: Outcome) -> (&[IntCounter; 2], &Histogram) {
        let labels = [Kind::LABELS[kind.0], outcome.as_str()];
        let received = self.received[kind.0][outcome as usize].get_or_init(|| {
            [
                m.notifications_total.with_label_values(&labels),
                m.notifications.with_label_values(&labels),
            ]
        });
        let ack = self.ack[outcome as usize].get_or_init(|| {
            m.notification_ack_duration
                .with_label_values(&[outcome.as_str()])
        });
        (received, ack)
    }
}

/// The eventId an ASSET_MANAGEMENT notification reports on.
fn event_of(n: &Received<'_>) -> Option<String> {
    use crate::domain::inbox::{Stored, StoredBody, decode_item};
    let assets = |body: &StoredBody<'_>| match body {
        StoredBody::Assets { event_id, .. } => Some(event_id.to_string()),
        _ => None,
    };
    match n {
        Received::Scanned(s) => assets(&s.body),
        Received::Read { stored, .. } => match decode_item(stored) {
            Ok(Stored::Named(s)) => assets(&s.body),
            _ => None,
        },
    }
}

fn ok(body: &'static [u8]) -> Response<Body> {
    http::bytes_response(StatusCode::OK, "application/json", Bytes::from_static(body))
}

impl http::Handler for Listener {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        self.receive(req).await
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    http::unavailable_retry(http::json(status, &serde_json::json!({"error": message})))
}
