//! Notification delivery to the client's `notificationUrl` (section 7, and
//! section 9 items 12 and 13).
//!
//! Each token has one [`Notifier`] (the sending side, used by the event task
//! and the admin hooks) and one [`dispatch`] task. Notifications are queued
//! in the order they are emitted; the dispatcher starts their first attempts
//! in that order with at most `concurrency` deliveries in flight, so a large
//! event's 2,500 notifications do not go out one round trip at a time.
//! A retry waits without holding a delivery slot. The URL and secret are read
//! at every attempt, so a rotated secret is used from the next attempt on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::seq::SliceRandom;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinSet;

use super::state::{Org, TargetKind, to_json};
use super::{NotificationStats, Shared, bump, lock};
use crate::apple::types::{
    self, Asset, AssetManagementNotification, Assignment, ErrorResponse, NotificationEnvelope,
    notification_type,
};

/// Section 9 item 20: one attempt with this timeout before storing a config.
const TEST_NOTIFICATION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(crate) struct Stats {
    generated: AtomicU64,
    delivered: AtomicU64,
    attempts: AtomicU64,
    failed_attempts: AtomicU64,
    dropped_by_fault: AtomicU64,
    duplicated: AtomicU64,
    given_up: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> NotificationStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NotificationStats {
            generated: get(&self.generated),
            delivered: get(&self.delivered),
            attempts: get(&self.attempts),
            failed_attempts: get(&self.failed_attempts),
            dropped_by_fault: get(&self.dropped_by_fault),
            duplicated: get(&self.duplicated),
            given_up: get(&self.given_up),
        }
    }
}

/// A notification's payload until it is sent.
pub(crate) enum Payload {
    Json(serde_json::Value),
    /// An associate's or disassociate's ASSET_MANAGEMENT chunk, kept as
    /// positions in its request until it is sent: when the receiver is
    /// slower than the events (the demo at 100,000 devices queues some
    /// 17,000 of them), a waiting chunk costs 4 bytes an assignment, not
    /// its JSON text.
    Pairs(PairsNote),
}

pub(crate) struct PairsNote {
    pub event_id: Arc<str>,
    pub kind: &'static str,
    pub error: Option<i32>,
    /// The request's assets and targets, shared with the event.
    pub assets: Arc<[Asset]>,
    pub targets: Arc<[(TargetKind, String)]>,
    /// The chunk's asset (one per chunk, section 9 item 12) and its
    /// targets, as positions in those.
    pub asset: u32,
    pub items: Vec<u32>,
}

impl PairsNote {
    fn to_json(&self) -> serde_json::Value {
        let Some(asset) = self.assets.get(self.asset as usize) else {
            return serde_json::Value::Null;
        };
        let assignments = self
            .items
            .iter()
            .filter_map(|t| {
                let (kind, name) = self.targets.get(*t as usize)?;
                Some(Assignment {
                    adam_id: asset.adam_id.clone(),
                    pricing_param: asset.pricing().to_string(),
                    client_user_id: (*kind == TargetKind::User).then(|| name.clone()),
                    serial_number: (*kind == TargetKind::Serial).then(|| name.clone()),
                    user_status: None,
                    id_hash: None,
                })
            })
            .collect();
        asset_management(&self.event_id, self.kind, self.error, assignments)
    }
}

/// An ASSET_MANAGEMENT payload (reference 7.5).
pub(crate) fn asset_management(
    event_id: &str,
    kind: &str,
    error: Option<i32>,
    assignments: Vec<Assignment>,
) -> serde_json::Value {
    to_json(&AssetManagementNotification {
        event_id: event_id.into(),
        kind: kind.to_string(),
        result: result_of(error).to_string(),
        assignments,
        error: error.map(notification_error),
    })
}

pub(crate) fn result_of(error: Option<i32>) -> &'static str {
    match error {
        None => types::result::SUCCESS,
        Some(_) => types::result::FAILURE,
    }
}

/// A notification carries one error with no `errorInfo` (its items say whom).
pub(crate) fn notification_error(number: i32) -> ErrorResponse {
    ErrorResponse {
        error_number: number,
        error_message: types::error_message(number).to_string(),
        error_info: None,
    }
}

/// A notification to send; a duplicate shares it (same `notificationId`).
struct Note {
    notification_id: String,
    kind: &'static str,
    uid: String,
    payload: Payload,
    body: OnceLock<Bytes>,
}

impl Note {
    /// The envelope's text, built at the first attempt and kept for retries.
    fn body(&self) -> Bytes {
        self.body
            .get_or_init(|| {
                let payload = match &self.payload {
                    Payload::Json(value) => value.clone(),
                    Payload::Pairs(note) => note.to_json(),
                };
                let envelope = NotificationEnvelope {
                    notification_id: self.notification_id.clone(),
                    notification_type: self.kind.to_string(),
                    notification: payload,
                    uid: self.uid.clone(),
                };
                Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
            })
            .clone()
    }
}

/// One delivery: a duplicate is a second `Delivery` of the same note.
pub(crate) struct Delivery {
    note: Arc<Note>,
    ready_at: Instant,
}

pub(crate) struct Notifier {
    queue: UnboundedSender<Delivery>,
    /// Deliveries held back to be shuffled (the reorder fault).
    window: Mutex<Vec<Delivery>>,
}

impl Notifier {
    pub fn new(queue: UnboundedSender<Delivery>) -> Notifier {
        Notifier {
            queue,
            window: Mutex::new(Vec::new()),
        }
    }

    /// Wraps `payload` in an envelope and queues it, applying the drop,
    /// duplicate, delay and reorder faults. The caller has checked the
    /// subscription.
    pub fn emit(&self, shared: &Shared, uid: &str, kind: &'static str, payload: Payload) {
        let faults = &shared.config.notifications;
        bump(&shared.stats.generated);
        if chance(faults.drop_rate) {
            bump(&shared.stats.dropped_by_fault);
            return;
        }
        let note = Arc::new(Note {
            notification_id: uuid::Uuid::new_v4().to_string(),
            kind,
            uid: uid.to_string(),
            payload,
            body: OnceLock::new(),
        });
        let ready_at = Instant::now() + faults.delay;
        if chance(faults.duplicate_rate) {
            bump(&shared.stats.duplicated);
            self.enqueue(
                shared,
                Delivery {
                    note: note.clone(),
                    ready_at,
                },
            );
        }
        self.enqueue(shared, Delivery { note, ready_at });
    }

    fn enqueue(&self, shared: &Shared, delivery: Delivery) {
        shared.busy_add(1);
        let window = shared.config.notifications.reorder_window;
        if window <= 1 {
            self.send(shared, delivery);
            return;
        }
        let full = {
            let mut held = lock(&self.window);
            held.push(delivery);
            (held.len() >= window).then(|| std::mem::take(&mut *held))
        };
        if let Some(batch) = full {
            self.send_shuffled(shared, batch);
        }
    }

    /// Releases what the reorder window holds; called when an event or an
    /// admin hook has emitted everything, so nothing waits for company.
    pub fn flush(&self, shared: &Shared) {
        let held = std::mem::take(&mut *lock(&self.window));
        if !held.is_empty() {
            self.send_shuffled(shared, held);
        }
    }

    fn send_shuffled(&self, shared: &Shared, mut batch: Vec<Delivery>) {
        batch.shuffle(&mut rand::rng());
        for delivery in batch {
            self.send(shared, delivery);
        }
    }

    fn send(&self, shared: &Shared, delivery: Delivery) {
        if self.queue.send(delivery).is_err() {
            // The dispatcher is gone (shutdown): the delivery is over.
            shared.busy_done();
        }
    }
}

fn chance(probability: f64) -> bool {
    probability > 0.0 && rand::random::<f64>() < probability
}

/// Delivers the token's notifications until the simulator shuts down.
pub(crate) async fn dispatch(
    shared: Arc<Shared>,
    org: Arc<Org>,
    mut queue: UnboundedReceiver<Delivery>,
) {
    let slots = Arc::new(Semaphore::new(
        shared.config.notifications.concurrency.max(1),
    ));
    let mut running = JoinSet::new();
    while let Some(delivery) = queue.recv().await {
        tokio::time::sleep_until(delivery.ready_at.into()).await;
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        running.spawn(deliver(
            shared.clone(),
            org.clone(),
            slots.clone(),
            delivery,
            slot,
        ));
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}

async fn deliver(
    shared: Arc<Shared>,
    org: Arc<Org>,
    slots: Arc<Semaphore>,
    delivery: Delivery,
    first_slot: tokio::sync::OwnedSemaphorePermit,
) {
    let faults = &shared.config.notifications;
    let mut slot = Some(first_slot);
    for attempt in 1..=faults.attempts.max(1) {
        if attempt > 1 {
            let index = (attempt - 2) as usize;
            let wait = faults
                .retry_spacing
                .get(index)
                .or(faults.retry_spacing.last())
                .copied()
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            match slots.clone().acquire_owned().await {
                Ok(s) => slot = Some(s),
                Err(_) => break,
            }
        }
        // Unsubscribed meanwhile (URL removed): nothing to deliver to.
        let Some((url, secret)) = lock(&org.client).target() else {
            break;
        };
        bump(&shared.stats.attempts);
        let delivered = post(
            &shared.http,
            &url,
            &secret,
            delivery.note.body(),
            faults.attempt_timeout,
        )
        .await;
        drop(slot.take());
        if delivered {
            bump(&shared.stats.delivered);
            shared.busy_done();
            return;
        }
        bump(&shared.stats.failed_attempts);
    }
    bump(&shared.stats.given_up);
    shared.busy_done();
}

/// One POST; `true` only for a 2xx answer within `timeout`.
async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    body: Bytes,
    timeout: Duration,
) -> bool {
    let request = client
        .post(url)
        .bearer_auth(secret)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .timeout(timeout);
    let attempt = async {
        let response = request.send().await.ok()?;
        let ok = response.status().is_success();
        // Read the answer so the connection can be reused.
        let _ = response.bytes().await;
        Some(ok)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// The TEST_NOTIFICATION that client config sends before storing a new
/// configuration: one attempt, no faults, not counted in the stats.
pub(crate) async fn send_test(shared: &Shared, uid: &str, url: &str, secret: &str) -> bool {
    let envelope = NotificationEnvelope {
        notification_id: uuid::Uuid::new_v4().to_string(),
        notification_type: notification_type::TEST_NOTIFICATION.to_string(),
        notification: serde_json::json!({}),
        uid: uid.to_string(),
    };
    let Ok(body) = serde_json::to_vec(&envelope) else {
        return false;
    };
    post(
        &shared.http,
        url,
        secret,
        Bytes::from(body),
        TEST_NOTIFICATION_TIMEOUT,
    )
    .await
}
