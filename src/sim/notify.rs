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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::seq::SliceRandom;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinSet;

use super::state::Org;
use super::{NotificationStats, Shared, bump, lock};
use crate::apple::types::{NotificationEnvelope, notification_type};

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

/// One delivery: a duplicate is a second `Delivery` with the same body.
pub(crate) struct Delivery {
    body: Bytes,
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
    pub fn emit(&self, shared: &Shared, uid: &str, kind: &'static str, payload: serde_json::Value) {
        let faults = &shared.config.notifications;
        bump(&shared.stats.generated);
        if chance(faults.drop_rate) {
            bump(&shared.stats.dropped_by_fault);
            return;
        }
        let envelope = NotificationEnvelope {
            notification_id: uuid::Uuid::new_v4().to_string(),
            notification_type: kind.to_string(),
            notification: payload,
            uid: uid.to_string(),
        };
        let Ok(body) = serde_json::to_vec(&envelope) else {
            return;
        };
        let body = Bytes::from(body);
        let ready_at = Instant::now() + faults.delay;
        if chance(faults.duplicate_rate) {
            bump(&shared.stats.duplicated);
            self.enqueue(
                shared,
                Delivery {
                    body: body.clone(),
                    ready_at,
                },
            );
        }
        self.enqueue(shared, Delivery { body, ready_at });
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
            delivery.body.clone(),
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
