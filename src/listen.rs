//! The embedded listener for Apple's notifications: `POST /notifications`.
//!
//! It does as little as it can before answering, because Apple retries slow
//! or failed deliveries: check the bearer secret in constant time, cap the
//! body, check the envelope and its payload, then record the notificationId
//! (dedupe) and the notification itself in one transaction, flush, and
//! answer 200. Applying it to batches is the applier's job (see
//! [`crate::track`]). Nothing is recorded for an answer other than 200.

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use crate::apple::types::{
    AssetCountNotification, AssetManagementNotification, UserAssociatedNotification,
    UserManagementNotification, notification_type,
};
use crate::context::Context;
use crate::http::{self, Body};
use crate::store::Recorded;

pub struct Listener {
    ctx: Arc<Context>,
    secret: String,
    max_body: usize,
}

impl Listener {
    pub fn new(ctx: Arc<Context>, secret: String, max_body: usize) -> Listener {
        Listener {
            ctx,
            secret,
            max_body,
        }
    }

    fn count(&self, kind: &str, outcome: &str, started: Instant) {
        self.ctx
            .metrics
            .notifications
            .with_label_values(&[kind, outcome])
            .inc();
        self.ctx
            .metrics
            .notification_ack_duration
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
    }

    async fn receive(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        if req.uri().path() != "/notifications" {
            return error(StatusCode::NOT_FOUND, "not found");
        }
        if req.method() != Method::POST {
            return error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
        }
        if !http::secret_matches(http::bearer(&req), &self.secret) {
            self.count("unknown", "unauthorized", started);
            tracing::warn!("notification with a missing or wrong bearer secret refused");
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
        if http::content_length(&req).is_some_and(|n| n > self.max_body as u64) {
            self.count("unknown", "too_large", started);
            http::drain(req.into_body(), http::DRAIN_LIMIT).await;
            return error(StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MiB");
        }
        let body = match http::read_body(req.into_body(), self.max_body).await {
            Ok(b) => b,
            Err(http::BodyError::TooLarge { .. }) => {
                self.count("unknown", "too_large", started);
                return error(StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MiB");
            }
            Err(e) => {
                self.count("unknown", "malformed", started);
                return error(StatusCode::BAD_REQUEST, &e.to_string());
            }
        };
        let envelope: RawEnvelope<'_> = match serde_json::from_slice(&body) {
            Ok(e) => e,
            Err(e) => {
                self.count("unknown", "malformed", started);
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("not a notification envelope: {e}"),
                );
            }
        };
        if envelope.notification_id.trim().is_empty()
            || envelope.notification_type.trim().is_empty()
        {
            self.count("unknown", "malformed", started);
            return error(
                StatusCode::BAD_REQUEST,
                "not a notification envelope: notificationId and notificationType must not be empty",
            );
        }
        let kind = metric_type(&envelope.notification_type);
        if let Err(message) = check_payload(&envelope) {
            self.count(kind, "malformed", started);
            return error(StatusCode::BAD_REQUEST, &message);
        }
        let recorded = match self
            .ctx
            .store
            .record_notification(&envelope.notification_id, &body)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot record a notification");
                self.count(kind, "error", started);
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot record the notification",
                );
            }
        };
        if let Err(e) = self.ctx.store.flush().await {
            tracing::error!(error = %e, "cannot flush a notification");
            self.count(kind, "error", started);
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot record the notification",
            );
        }
        match recorded {
            Recorded::New => {
                self.ctx.wake_apply.notify_one();
                if kind == "other" {
                    tracing::info!(notification_type = %envelope.notification_type, notification_id = %envelope.notification_id, "notification of an unknown type acknowledged");
                }
                self.count(kind, "accepted", started);
            }
            Recorded::Duplicate => self.count(kind, "duplicate", started),
        }
        http::json(StatusCode::OK, &serde_json::json!({"status": "recorded"}))
    }
}

impl http::Handler for Listener {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        self.receive(req).await
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    http::json(status, &serde_json::json!({"error": message}))
}

/// A bounded label value for the notification type.
fn metric_type(t: &str) -> &'static str {
    match t {
        notification_type::ASSET_MANAGEMENT => notification_type::ASSET_MANAGEMENT,
        notification_type::ASSET_COUNT => notification_type::ASSET_COUNT,
        notification_type::USER_MANAGEMENT => notification_type::USER_MANAGEMENT,
        notification_type::USER_ASSOCIATED => notification_type::USER_ASSOCIATED,
        notification_type::TEST_NOTIFICATION => notification_type::TEST_NOTIFICATION,
        _ => "other",
    }
}

/// The envelope as the listener reads it: the payload stays raw text, parsed
/// once into its typed form only to check it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope<'a> {
    notification_id: String,
    notification_type: String,
    #[serde(borrow, default)]
    notification: Option<&'a serde_json::value::RawValue>,
}

/// A known type's payload must parse: a malformed one recorded now would be
/// lost later, while a 400 makes the sender see the problem.
fn check_payload(e: &RawEnvelope<'_>) -> Result<(), String> {
    let p = e.notification.map(|r| r.get()).unwrap_or("null");
    let r = match e.notification_type.as_str() {
        notification_type::ASSET_MANAGEMENT => {
            serde_json::from_str::<AssetManagementNotification>(p).map(|_| ())
        }
        notification_type::ASSET_COUNT => {
            serde_json::from_str::<AssetCountNotification>(p).map(|_| ())
        }
        notification_type::USER_MANAGEMENT => {
            serde_json::from_str::<UserManagementNotification>(p).map(|_| ())
        }
        notification_type::USER_ASSOCIATED => {
            serde_json::from_str::<UserAssociatedNotification>(p).map(|_| ())
        }
        _ => Ok(()),
    };
    r.map_err(|err| format!("{} payload: {err}", e.notification_type))
}
