//! The embedded listener for Apple's notifications: `POST /notifications`.
//!
//! It does as little as it can before answering, because Apple retries slow
//! or failed deliveries: check the bearer secret in constant time, refuse a
//! body over `notifications.max_body_bytes` (by its Content-Length, and
//! while reading it), read the envelope and its payload, then record the
//! notificationId (dedupe) and the notification itself in one durable store
//! commit, and answer 200. Applying it to batches is the applier's job (see
//! [`crate::track`]).
//!
//! Nothing is recorded for an answer other than 200: every refusal comes
//! before the store is touched, and a store that cannot make the record
//! durable undoes it before the 503 (see [`Store::record_notification`]),
//! so Apple's retry is recorded anew rather than taken for a duplicate.
//!
//! [`Store::record_notification`]: crate::store::Store::record_notification

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use crate::apple::report::read_notification;
use crate::apple::types::notification_type;
use crate::context::Context;
use crate::http::{self, Body};
use crate::report::NotificationBody;
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

    fn too_large(&self) -> String {
        format!(
            "body over notifications.max_body_bytes ({} bytes)",
            self.max_body
        )
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
            return error(StatusCode::PAYLOAD_TOO_LARGE, &self.too_large());
        }
        let body = match http::read_body(req.into_body(), self.max_body).await {
            Ok(b) => b,
            Err(http::BodyError::TooLarge { .. }) => {
                self.count("unknown", "too_large", started);
                return error(StatusCode::PAYLOAD_TOO_LARGE, &self.too_large());
            }
            Err(e) => {
                self.count("unknown", "malformed", started);
                return error(e.status(), &e.to_string());
            }
        };
        let notification = match read_notification(&body) {
            Ok(n) => n,
            Err(e) => {
                let kind = e.kind().map(metric_type).unwrap_or("unknown");
                self.count(kind, "malformed", started);
                return error(StatusCode::BAD_REQUEST, &e.to_string());
            }
        };
        let kind = metric_type(&notification.kind);
        let recorded = match self
            .ctx
            .store
            .record_notification(&notification.id, &body)
            .await
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
        match recorded {
            Recorded::New => {
                self.ctx.wake_apply.notify_one();
                if let NotificationBody::Other(t) = &notification.body
                    && kind == "other"
                {
                    tracing::info!(notification_type = %t, notification_id = %notification.id, "notification of an unknown type acknowledged");
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
