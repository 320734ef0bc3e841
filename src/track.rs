//! Turns what Apple reports into per-pair decisions.
//!
//! Two kinds of task live here:
//! - the applier (one per process) folds recorded notifications from the
//!   store's inbox into their batches: a notification's pairs are confirmed
//!   or failed, and removed from the inbox in the same transaction;
//! - a tracker per token covers what notifications miss (they are best
//!   effort): an event quiet for `status_poll_after` is polled through event
//!   status every `status_poll_interval` while PENDING; once finished, every
//!   pair it does not name as failed is confirmed, and pairs it names (or
//!   cannot tell apart) are settled by a narrow Get Assignments sync. Pairs
//!   still undecided `sync_after` the event finished are synced again.
//!
//! Invariant: a pair is decided once (see [`crate::store::Tx::decide`]), so
//! duplicated, reordered or late reports from any source change nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::apple::client::AssignmentsQuery;
use crate::apple::types::{
    AssetCountNotification, AssetManagementNotification, Assignment, ErrorResponse,
    NotificationEnvelope, StatusResponse, UserAssociatedNotification, UserManagementNotification,
    event_status, notification_type, result,
};
use crate::apple::{AppleError, Client};
use crate::context::Context;
use crate::job::{JobSpec, Phase};
use crate::store::{BatchRecord, Decision, FailureRecord, StoreError, now_ms};

/// Maps Apple's (adamId, pricingParam, target) back to a pair index of a batch.
pub struct BatchIndex {
    assets: HashMap<(String, String), u32>,
    serials: HashMap<String, u32>,
    users: HashMap<String, u32>,
    n_serials: u32,
    n_targets: u32,
}

impl BatchIndex {
    pub fn new(spec: &JobSpec, batch: &BatchRecord) -> BatchIndex {
        let r = &batch.rect;
        let targets = spec.targets(batch.phase);
        let assets = (r.assets.start..r.assets.end)
            .filter_map(|i| spec.assets.get(i as usize).map(|a| (i, a)))
            .map(|(i, a)| {
                (
                    (a.adam_id.clone(), a.pricing_param.clone()),
                    i - r.assets.start,
                )
            })
            .collect();
        let serials = (r.serials.start..r.serials.end)
            .filter_map(|i| {
                targets
                    .serial_numbers
                    .get(i as usize)
                    .map(|s| (s.clone(), i - r.serials.start))
            })
            .collect();
        let users = (r.users.start..r.users.end)
            .filter_map(|i| {
                targets
                    .client_user_ids
                    .get(i as usize)
                    .map(|u| (u.clone(), i - r.users.start))
            })
            .collect();
        BatchIndex {
            assets,
            serials,
            users,
            n_serials: r.n_serials(),
            n_targets: r.n_targets(),
        }
    }

    pub fn pair(
        &self,
        adam_id: &str,
        pricing: &str,
        serial: Option<&str>,
        user: Option<&str>,
    ) -> Option<u32> {
        let asset = *self
            .assets
            .get(&(adam_id.to_string(), pricing.to_string()))?;
        let target = match (serial, user) {
            (Some(s), _) => *self.serials.get(s)?,
            (None, Some(u)) => self.n_serials + *self.users.get(u)?,
            (None, None) => return None,
        };
        Some(asset * self.n_targets + target)
    }

    pub fn pair_of(&self, a: &Assignment) -> Option<u32> {
        self.pair(
            &a.adam_id,
            &a.pricing_param,
            a.serial_number.as_deref(),
            a.client_user_id.as_deref(),
        )
    }
}

/// Which of `pairs` (of `batch`) Apple lists as assigned now. Queries per
/// target or per asset, whichever needs fewer requests.
pub async fn sync_pairs(
    client: &Client,
    spec: &JobSpec,
    batch: &BatchRecord,
    index: &BatchIndex,
    pairs: &[u32],
) -> Result<HashSet<u32>, AppleError> {
    let wanted: HashSet<u32> = pairs.iter().copied().collect();
    let mut assets = HashSet::new();
    let mut targets = HashSet::new();
    for p in pairs {
        let (a, t) = batch.rect.pair_at(*p);
        assets.insert(a);
        targets.insert(t);
    }
    let spec_targets = spec.targets(batch.phase);
    let mut queries = Vec::new();
    if targets.len() <= assets.len() * 4 {
        for t in targets {
            let mut q = AssignmentsQuery::default();
            match t {
                Ok(s) => q.serial_number = spec_targets.serial_numbers.get(s as usize).cloned(),
                Err(u) => q.client_user_id = spec_targets.client_user_ids.get(u as usize).cloned(),
            }
            queries.push(q);
        }
    } else {
        for a in assets {
            if let Some(asset) = spec.assets.get(a as usize) {
                queries.push(AssignmentsQuery {
                    adam_id: Some(asset.adam_id.clone()),
                    pricing_param: Some(asset.pricing_param.clone()),
                    ..Default::default()
                });
            }
        }
    }
    let mut present = HashSet::new();
    for q in queries {
        let walk = client.get_assignments(&q).await?;
        for a in &walk.items {
            if let Some(p) = index.pair_of(a)
                && wanted.contains(&p)
            {
                present.insert(p);
            }
        }
    }
    Ok(present)
}

/// Apple may notify about an event before the submitter has recorded its
/// eventId (Apple starts processing as soon as it answers). Such a
/// notification waits in the inbox this long for the event to appear.
const UNKNOWN_EVENT_PATIENCE: Duration = Duration::from_secs(60);
const UNKNOWN_EVENT_RETRY: Duration = Duration::from_millis(200);

/// What applying one inbox item did.
enum Applied {
    Done {
        outboxed: bool,
    },
    /// For an event not (yet) recorded: left in the inbox.
    UnknownEvent(String),
}

/// How long a notificationId is remembered for dedupe.
const SEEN_KEEP_MS: u64 = 7 * 24 * 3600 * 1000;
const SEEN_PRUNE_EVERY_MS: u64 = 3600 * 1000;

/// Applies recorded notifications until shutdown.
pub async fn run_applier(ctx: Arc<Context>) {
    let mut indexes: HashMap<(String, u32), Arc<BatchIndex>> = HashMap::new();
    let mut last_prune = 0u64;
    // Notifications for events not known yet: (first seen, next try).
    let mut deferred: HashMap<Vec<u8>, (std::time::Instant, std::time::Instant)> = HashMap::new();
    loop {
        let now = now_ms();
        if now.saturating_sub(last_prune) > SEEN_PRUNE_EVERY_MS {
            last_prune = now;
            match ctx.store.prune_seen(now.saturating_sub(SEEN_KEEP_MS)) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "pruned old notification ids"),
                Err(error) => tracing::warn!(%error, "cannot prune old notification ids"),
            }
        }
        let now_i = std::time::Instant::now();
        let items = match ctx.store.inbox(256 + deferred.len()) {
            Ok(items) => items
                .into_iter()
                .filter(|(k, _)| deferred.get(k).is_none_or(|(_, next)| *next <= now_i))
                .take(256)
                .collect::<Vec<_>>(),
            Err(error) => {
                tracing::error!(%error, "cannot read the notification inbox");
                if !ctx.sleep(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if items.is_empty() {
            let timeout = if deferred.is_empty() {
                Duration::from_secs(1)
            } else {
                UNKNOWN_EVENT_RETRY
            };
            if !ctx.wait(&ctx.wake_apply, timeout).await {
                return;
            }
            continue;
        }
        let mut outboxed = false;
        for (key, bytes) in items {
            match apply_one(&ctx, &mut indexes, &key, &bytes) {
                Ok(Applied::Done { outboxed: o }) => {
                    outboxed |= o;
                    deferred.remove(&key);
                }
                Ok(Applied::UnknownEvent(event_id)) => {
                    let first = deferred.get(&key).map(|(f, _)| *f).unwrap_or(now_i);
                    if first.elapsed() >= UNKNOWN_EVENT_PATIENCE {
                        tracing::info!(%event_id, "notification for an event vppd did not submit (or whose answer was lost); ignored");
                        if let Err(error) = ctx.store.tx(|tx| tx.remove_inbox(&key)) {
                            tracing::error!(%error, "cannot drop a notification");
                        }
                        deferred.remove(&key);
                    } else {
                        deferred.insert(key, (first, now_i + UNKNOWN_EVENT_RETRY));
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "cannot apply a notification; will retry");
                    if !ctx.sleep(Duration::from_millis(500)).await {
                        return;
                    }
                    break;
                }
            }
        }
        if indexes.len() > 1024 {
            indexes.clear();
        }
        if outboxed {
            ctx.wake_release.notify_one();
        }
    }
}

fn token_of_uid(ctx: &Context, uid: &str) -> String {
    ctx.store
        .meta_get::<String>(&format!("uid/{uid}"))
        .ok()
        .flatten()
        .unwrap_or_else(|| uid.to_string())
}

/// Applies one inbox item.
fn apply_one(
    ctx: &Context,
    indexes: &mut HashMap<(String, u32), Arc<BatchIndex>>,
    key: &[u8],
    bytes: &[u8],
) -> Result<Applied, StoreError> {
    let store = &ctx.store;
    let envelope: NotificationEnvelope = match serde_json::from_slice(bytes) {
        Ok(e) => e,
        Err(error) => {
            tracing::error!(%error, "recorded notification cannot be read; dropping it");
            store.tx(|tx| tx.remove_inbox(key))?;
            return Ok(Applied::Done { outboxed: false });
        }
    };
    let drop_item = || store.tx(|tx| tx.remove_inbox(key));
    match envelope.notification_type.as_str() {
        notification_type::ASSET_MANAGEMENT => {
            let n: AssetManagementNotification =
                match serde_json::from_value(envelope.notification.clone()) {
                    Ok(n) => n,
                    Err(_) => {
                        drop_item()?;
                        return Ok(Applied::Done { outboxed: false });
                    }
                };
            let Some(eref) = store.event(&n.event_id)? else {
                return Ok(Applied::UnknownEvent(n.event_id));
            };
            let (Some(spec), Some(batch)) = (
                store.spec(&eref.job_id)?,
                store.batch(&eref.job_id, eref.batch)?,
            ) else {
                drop_item()?;
                return Ok(Applied::Done { outboxed: false });
            };
            let index = indexes
                .entry((eref.job_id.clone(), eref.batch))
                .or_insert_with(|| Arc::new(BatchIndex::new(&spec, &batch)))
                .clone();
            let decision = if n.result == result::SUCCESS {
                Decision::Confirmed {
                    event_id: Some(n.event_id.clone()),
                }
            } else {
                let e = n.error.clone().unwrap_or(ErrorResponse {
                    error_number: 0,
                    error_message: "Apple reported a failure without an error".into(),
                    error_info: None,
                });
                Decision::Failed(FailureRecord {
                    error_number: e.error_number,
                    error_message: e.error_message,
                    event_id: Some(n.event_id.clone()),
                })
            };
            let decisions: Vec<(u32, Decision)> = n
                .assignments
                .iter()
                .filter_map(|a| index.pair_of(a))
                .map(|p| (p, decision.clone()))
                .collect();
            let applied = store.tx(|tx| {
                let a = tx.decide(&eref.job_id, eref.batch, &decisions, true)?;
                tx.remove_inbox(key)?;
                Ok(a)
            })?;
            count_applied(ctx, batch.phase, applied.confirmed, applied.failed);
            if applied.batch_decided {
                indexes.remove(&(eref.job_id.clone(), eref.batch));
            }
            if let Some(state) = applied.job_state {
                tracing::info!(job = %eref.job_id, state = state.as_str(), "job finished");
            }
            Ok(Applied::Done {
                outboxed: applied.outboxed > 0,
            })
        }
        notification_type::ASSET_COUNT => {
            if let Ok(n) =
                serde_json::from_value::<AssetCountNotification>(envelope.notification.clone())
            {
                let token = token_of_uid(ctx, &envelope.uid);
                let mut record = store
                    .license(&token, &n.adam_id, &n.pricing_param)?
                    .unwrap_or_else(|| serde_json::json!({}));
                for field in ["availableCount", "totalCount"] {
                    let v = record.get(field).and_then(|v| v.as_i64()).unwrap_or(0);
                    record[field] = serde_json::json!(v.saturating_add(n.count_delta as i64));
                }
                record["updatedMs"] = serde_json::json!(now_ms());
                store.put_license(&token, &n.adam_id, &n.pricing_param, &record)?;
                tracing::info!(adam_id = %n.adam_id, delta = n.count_delta, "license count changed");
            }
            drop_item()?;
            Ok(Applied::Done { outboxed: false })
        }
        notification_type::USER_MANAGEMENT | notification_type::USER_ASSOCIATED => {
            let token = token_of_uid(ctx, &envelope.uid);
            let users = if envelope.notification_type == notification_type::USER_MANAGEMENT {
                serde_json::from_value::<UserManagementNotification>(envelope.notification.clone())
                    .map(|n| n.users)
                    .unwrap_or_default()
            } else {
                serde_json::from_value::<UserAssociatedNotification>(envelope.notification.clone())
                    .map(|n| n.associated_users)
                    .unwrap_or_default()
            };
            for u in users {
                let value = serde_json::to_value(&u).unwrap_or_default();
                store.put_user(&token, &u.client_user_id, &value)?;
            }
            drop_item()?;
            Ok(Applied::Done { outboxed: false })
        }
        other => {
            tracing::debug!(
                notification_type = other,
                "notification acknowledged, nothing to apply"
            );
            drop_item()?;
            Ok(Applied::Done { outboxed: false })
        }
    }
}

fn count_applied(ctx: &Context, phase: Phase, confirmed: u32, failed: u32) {
    if confirmed > 0 {
        ctx.metrics
            .assignments
            .with_label_values(&[phase.as_str(), "confirmed"])
            .inc_by(confirmed as u64);
    }
    if failed > 0 {
        ctx.metrics
            .assignments
            .with_label_values(&[phase.as_str(), "failed"])
            .inc_by(failed as u64);
    }
}

/// Runs the event-status and sync fallback of one token until shutdown.
pub async fn run_tracker(ctx: Arc<Context>, token: String) {
    let Some(client) = ctx.clients.get(&token).cloned() else {
        return;
    };
    let Some(wake) = ctx.wake_track.get(&token).cloned() else {
        return;
    };
    loop {
        let batches = match ctx.store.open_batches(&token) {
            Ok(b) => b,
            Err(error) => {
                tracing::error!(%error, "cannot read batches");
                Vec::new()
            }
        };
        let now = now_ms();
        let mine: Vec<BatchRecord> = batches
            .into_iter()
            .filter(|b| b.token == token && b.state == crate::store::BatchState::Sent)
            .collect();
        ctx.metrics
            .events_in_flight
            .with_label_values(&[&token])
            .set(mine.len() as i64);
        let oldest = mine
            .iter()
            .map(|b| b.sent_ms)
            .min()
            .map(|t| now.saturating_sub(t))
            .unwrap_or(0);
        ctx.metrics
            .oldest_event_age
            .with_label_values(&[&token])
            .set(oldest as f64 / 1000.0);
        for batch in mine {
            if ctx.is_shutting_down() {
                return;
            }
            if let Err(error) = check_batch(&ctx, &client, &token, batch).await {
                tracing::warn!(%error, "event tracking step failed; will retry");
            }
        }
        if !ctx.wait(&wake, Duration::from_millis(500)).await {
            return;
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TrackError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Apple(#[from] AppleError),
}

async fn check_batch(
    ctx: &Context,
    client: &Client,
    token: &str,
    batch: BatchRecord,
) -> Result<(), TrackError> {
    let now = now_ms();
    let t = &ctx.tracking;
    let Some(spec) = ctx.store.spec(&batch.job_id)? else {
        return Ok(());
    };
    match batch.terminal_ms {
        None => {
            let quiet = now.saturating_sub(batch.last_activity_ms);
            if quiet < t.status_poll_after.as_millis() as u64 || now < batch.next_poll_ms {
                return Ok(());
            }
            let Some(event_id) = batch.events.last().cloned() else {
                return Ok(());
            };
            let next_poll = now + t.status_poll_interval.as_millis() as u64;
            match client.event_status(&event_id).await {
                Ok(status) => {
                    ctx.metrics
                        .status_polls
                        .with_label_values(&[token, &status.event_status.to_ascii_lowercase()])
                        .inc();
                    if status.event_status == event_status::PENDING {
                        set_next_poll(ctx, &batch, next_poll)?;
                        return Ok(());
                    }
                    resolve_finished(ctx, client, token, &spec, &batch, &event_id, Some(&status))
                        .await
                }
                Err(e) if e.error_number() == Some(9708) => {
                    ctx.metrics
                        .status_polls
                        .with_label_values(&[token, "unknown_event"])
                        .inc();
                    tracing::warn!(job = %batch.job_id, batch = batch.no, %event_id, "Apple does not know the event; syncing its pairs");
                    resolve_finished(ctx, client, token, &spec, &batch, &event_id, None).await
                }
                Err(e) => {
                    ctx.metrics
                        .status_polls
                        .with_label_values(&[token, "error"])
                        .inc();
                    set_next_poll(ctx, &batch, next_poll)?;
                    Err(e.into())
                }
            }
        }
        Some(terminal) => {
            if batch.undecided() == 0
                || now.saturating_sub(terminal) < t.sync_after.as_millis() as u64
            {
                return Ok(());
            }
            let event_id = batch.events.last().cloned().unwrap_or_default();
            resolve_finished(ctx, client, token, &spec, &batch, &event_id, None).await
        }
    }
}

fn set_next_poll(ctx: &Context, batch: &BatchRecord, next_poll: u64) -> Result<(), StoreError> {
    ctx.store.tx(|tx| {
        if let Some(mut b) = tx.batch(&batch.job_id, batch.no)? {
            b.next_poll_ms = next_poll;
            tx.put_batch(&b)?;
        }
        Ok(())
    })
}

/// Decides the undecided pairs of a finished event. With a status, pairs it
/// does not name as failed are confirmed; the rest (or all, without one) are
/// settled by what Get Assignments shows.
async fn resolve_finished(
    ctx: &Context,
    client: &Client,
    token: &str,
    spec: &JobSpec,
    batch: &BatchRecord,
    event_id: &str,
    status: Option<&StatusResponse>,
) -> Result<(), TrackError> {
    let undecided: Vec<u32> = (0..batch.pairs())
        .filter(|p| !batch.is_decided_pair(*p))
        .collect();
    let index = BatchIndex::new(spec, batch);
    let event = (!event_id.is_empty()).then(|| event_id.to_string());
    let mut decisions = Vec::new();
    let mut suspects: Vec<(u32, Option<ErrorResponse>)> = Vec::new();
    match status {
        Some(s) if s.event_status == event_status::COMPLETE => {
            for p in &undecided {
                decisions.push((
                    *p,
                    Decision::Confirmed {
                        event_id: event.clone(),
                    },
                ));
            }
        }
        Some(s) => {
            let failures = s.failures.clone().unwrap_or_default();
            let targets = spec.targets(batch.phase);
            for p in &undecided {
                let (asset, target) = batch.rect.pair_at(*p);
                let asset = spec.assets.get(asset as usize);
                let named = failures.iter().find(|f| {
                    let Some(info) = &f.error_info else {
                        return true;
                    };
                    let target_named = match target {
                        Ok(si) => targets.serial_numbers.get(si as usize).is_some_and(|s| {
                            info.serial_numbers.as_ref().is_some_and(|l| l.contains(s))
                        }),
                        Err(ui) => targets.client_user_ids.get(ui as usize).is_some_and(|u| {
                            info.client_user_ids.as_ref().is_some_and(|l| l.contains(u))
                        }),
                    };
                    let no_targets = info.serial_numbers.as_ref().is_none_or(|l| l.is_empty())
                        && info.client_user_ids.as_ref().is_none_or(|l| l.is_empty());
                    let asset_named = match (&info.assets, asset) {
                        (Some(list), Some(a)) if !list.is_empty() => list
                            .iter()
                            .any(|x| x.adam_id == a.adam_id && x.pricing() == a.pricing_param),
                        _ => true,
                    };
                    (target_named || no_targets) && asset_named
                });
                match named {
                    Some(f) => suspects.push((*p, Some(f.clone()))),
                    None => decisions.push((
                        *p,
                        Decision::Confirmed {
                            event_id: event.clone(),
                        },
                    )),
                }
            }
        }
        None => {
            suspects = undecided.iter().map(|p| (*p, None)).collect();
        }
    }
    if !suspects.is_empty() {
        let pairs: Vec<u32> = suspects.iter().map(|(p, _)| *p).collect();
        ctx.metrics
            .syncs
            .with_label_values(&[
                token,
                if status.is_some() {
                    "event_failures"
                } else {
                    "no_status"
                },
            ])
            .inc();
        let present = sync_pairs(client, spec, batch, &index, &pairs).await?;
        for (p, error) in suspects {
            let ok = match batch.phase {
                Phase::Associate => present.contains(&p),
                Phase::Disassociate => !present.contains(&p),
            };
            if ok {
                decisions.push((
                    p,
                    Decision::Confirmed {
                        event_id: event.clone(),
                    },
                ));
            } else if let Some(e) = error {
                decisions.push((
                    p,
                    Decision::Failed(FailureRecord {
                        error_number: e.error_number,
                        error_message: e.error_message,
                        event_id: event.clone(),
                    }),
                ));
            } else if status.is_none() && batch.terminal_ms.is_some() {
                // Finished, synced twice, and still not done: Apple did not
                // do it, and will not report why.
                decisions.push((
                    p,
                    Decision::Failed(FailureRecord {
                        error_number: 9603,
                        error_message: format!(
                            "Apple's records do not show this {} after the event finished",
                            if batch.phase == Phase::Associate {
                                "assignment"
                            } else {
                                "removal"
                            }
                        ),
                        event_id: event.clone(),
                    }),
                ));
            }
        }
    }
    let applied = ctx.store.tx(|tx| {
        let a = tx.decide(&batch.job_id, batch.no, &decisions, false)?;
        if let Some(mut b) = tx.batch(&batch.job_id, batch.no)?
            && b.terminal_ms.is_none()
        {
            b.terminal_ms = Some(now_ms());
            tx.put_batch(&b)?;
        }
        Ok(a)
    })?;
    count_applied(ctx, batch.phase, applied.confirmed, applied.failed);
    if applied.confirmed + applied.failed > 0 {
        tracing::info!(job = %batch.job_id, batch = batch.no, confirmed = applied.confirmed, failed = applied.failed, "decided pairs from event status / sync");
    }
    if applied.outboxed > 0 {
        ctx.wake_release.notify_one();
    }
    Ok(())
}
