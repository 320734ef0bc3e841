//! Turns what Apple reports into per-pair decisions.
//!
//! Two kinds of task live here:
//! - the applier (one per process) folds recorded notifications from the
//!   store's inbox into their batches: a run of notifications is decided,
//!   and removed from the inbox, in one store commit;
//! - a tracker per token covers what notifications miss (they are best
//!   effort): an event quiet for `status_poll_after` is polled through event
//!   status every `status_poll_interval` while PENDING; once finished, every
//!   pair it does not name as failed is confirmed, and pairs it names (or
//!   cannot tell apart) are settled by a narrow Get Assignments sync. Pairs
//!   still undecided `sync_after` the event finished are synced again. An
//!   event still PENDING `resubmit_after` it was sent is handed to the
//!   token's submitter to resubmit: the tracker reads Apple, it never sends
//!   management requests.
//!
//! Invariant: a pair is decided once (see [`crate::domain::lifecycle`]), so
//! duplicated, reordered or late reports from any source change nothing.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apple::report::{NotificationError, stored_form};
use crate::apple::{AppleError, Client, error_number};
use crate::domain::inbox::{self, Stored, StoredBody, StoredNotification, StoredPairs};
use crate::domain::job::{JobSpec, Phase};
use crate::domain::lifecycle::{
    BatchRecord, BatchState, Decision, DriftChange, DriftItem, FailureRecord, now_ms,
};
use crate::domain::pairs::pair;
use crate::domain::report::{EventStatus, ReportedError};
use crate::runtime::context::{Context, Resubmission};
use crate::runtime::sync::sync_pairs;
use crate::runtime::tokens::Token;
use crate::store::{Decide, EventId, Fold, InboxId, InboxItem, JobId, LicenseDelta, StoreError};

/// Apple may notify about an event before the submitter has recorded its
/// eventId (Apple starts processing as soon as it answers), and notifies
/// about licenses assigned outside vppd too (Apple School/Business Manager).
/// Such a notification is parked in the store under its eventId, where it
/// costs nothing, and comes back when the event is recorded; after this long
/// the event is taken to be foreign and the notification is expired.
const UNKNOWN_EVENT_PATIENCE: Duration = Duration::from_secs(600);
/// How often parked notifications past their patience are expired, and how
/// many per store commit.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);
const EXPIRE_MAX: usize = 1000;

/// A revoke's end is learned only from event status (no notification says
/// that a target has nothing more to revoke, and a target that held nothing
/// gets none at all), so a revoke event is asked about once it is this
/// quiet, or after `status_poll_after` when that is shorter.
const REVOKE_QUIET: Duration = Duration::from_secs(2);

/// Notifications folded into one store commit, at most.
const FOLD_MAX: usize = 256;
/// How long the applier lets a short inbox fill before folding it: a
/// commit's cost hardly depends on how many notifications it folds, so
/// during a rollout this turns one commit per notification into one per
/// few dozen, for a delay far below Apple's own.
const FOLD_LINGER: Duration = Duration::from_millis(2);

/// A loop's "wait a moment for more" when what it read is short of a full
/// commit: it waits once, then works with whatever the next read finds, so
/// a trickle is delayed by one wait and never more.
#[derive(Debug, Default)]
struct Linger {
    waited: bool,
}

impl Linger {
    /// Whether to wait (and read again) before working on a read that is
    /// `short`.
    fn wait(&mut self, short: bool) -> bool {
        self.waited = short && !self.waited;
        self.waited
    }
}

/// How long a notificationId is remembered for dedupe.
const SEEN_KEEP_MS: u64 = 7 * 24 * 3600 * 1000;
const SEEN_PRUNE_EVERY_MS: u64 = 3600 * 1000;

/// What one inbox item comes to.
enum Planned {
    /// Decisions for a batch (of this phase).
    Decide(Decide, Phase),
    License(LicenseDelta),
    Users(Vec<(String, crate::domain::report::UserRecord)>),
    /// Nothing to apply: it only leaves the inbox.
    Drop,
    /// For an event not (yet) recorded: left in the inbox until it is
    /// known, or taken for an event vppd did not send (drift).
    UnknownEvent {
        event_id: EventId,
        token: String,
        /// What the event removed, when it is a removal that succeeded.
        removed: Vec<DriftItem>,
        /// A batch of the token is being sent: its eventId may not be
        /// recorded yet, so the notification waits the full patience.
        sending: bool,
    },
}

/// Applies recorded notifications until shutdown. Each inbox item is read
/// once: applied, dropped, or parked until its event is recorded; the
/// applier never rereads what it parked, so a flood of foreign notifications
/// does not slow real ones, and shutdown is checked between commits.
pub async fn run_applier(ctx: Arc<Context>) {
    let mut chores = Chores {
        last_prune: 0,
        last_expire: Instant::now(),
    };
    let mut linger = Linger::default();
    loop {
        if ctx.is_shutting_down() {
            return;
        }
        chores.run(&ctx).await;
        let items = match ctx.store.inbox(FOLD_MAX).await {
            Ok(items) => items,
            Err(error) => {
                tracing::error!(%error, "cannot read the notification inbox");
                if !ctx.sleep(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if items.is_empty() {
            if !ctx.wait(&ctx.wake_apply, Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        if linger.wait(items.len() < FOLD_MAX) {
            // An acknowledgement waiting to ride on the fold ends the wait.
            if !ctx.wait(&ctx.wake_fold, FOLD_LINGER).await {
                return;
            }
            continue;
        }
        let failed = apply(&ctx, &items).await;
        if failed && !ctx.sleep(Duration::from_millis(500)).await {
            return;
        }
    }
}

/// The applier's periodic chores beside folding: forgetting old
/// notificationIds, and expiring notifications parked too long.
struct Chores {
    last_prune: u64,
    last_expire: Instant,
}

impl Chores {
    async fn run(&mut self, ctx: &Context) {
        let now = now_ms();
        if now.saturating_sub(self.last_prune) > SEEN_PRUNE_EVERY_MS {
            self.last_prune = now;
            match ctx.store.prune_seen(now.saturating_sub(SEEN_KEEP_MS)).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "pruned old notification ids"),
                Err(error) => tracing::warn!(%error, "cannot prune old notification ids"),
            }
        }
        if self.last_expire.elapsed() >= EXPIRE_EVERY {
            self.last_expire = Instant::now();
            expire_parked(ctx).await;
        }
    }
}

/// One read of the inbox, planned: what one store commit folds, and what
/// is parked for events not recorded yet.
#[derive(Default)]
struct Read {
    fold: Fold,
    /// The phase of each of `fold.decide`, in order.
    phases: Vec<Phase>,
    park: Vec<(InboxId, EventId)>,
    /// Planning stopped at an item that could not be planned: the rest is
    /// read again after a pause.
    failed: bool,
}

/// Plans, folds and parks one read of the inbox. True when something
/// failed: the applier pauses, then reads again (what was not committed
/// is still in the inbox).
async fn apply(ctx: &Context, items: &[InboxItem]) -> bool {
    let read = plan_read(ctx, items).await;
    let mut failed = read.failed;
    if !read.fold.consumed.is_empty() && !commit_fold(ctx, read.fold, &read.phases).await {
        failed = true;
    }
    if !read.park.is_empty() {
        match ctx.store.park_notifications(&read.park).await {
            Ok(n) => tracing::debug!(
                parked = n,
                "notifications for events not recorded yet parked"
            ),
            Err(error) => {
                tracing::error!(%error, "cannot park notifications for unknown events; will retry");
                failed = true;
            }
        }
    }
    failed
}

/// Plans each item of a read in order, stopping at the first that cannot
/// be planned.
async fn plan_read(ctx: &Context, items: &[InboxItem]) -> Read {
    let mut read = Read::default();
    for item in items {
        match plan_one(ctx, item).await {
            Ok(Planned::Decide(decide, phase)) => {
                read.fold.decide.push(decide);
                read.phases.push(phase);
            }
            Ok(Planned::License(delta)) => read.fold.license_deltas.push(delta),
            Ok(Planned::Users(users)) => read.fold.users.extend(users),
            Ok(Planned::Drop) => {}
            Ok(Planned::UnknownEvent {
                event_id,
                token,
                removed,
                sending,
            }) => {
                // None of the token's batches is on its way to Apple: the
                // event is not vppd's (vppd records an eventId in the
                // commit right after Apple answers), so what it removed is
                // drift. Recorded before the notification is parked: a
                // crash in between records it again (drift counts each
                // pair once), never loses it.
                if !sending {
                    tracing::info!(%event_id, token = %token, removed = removed.len(), "notification for an event vppd did not send: a change made outside vppd");
                    if let Err(error) = record_drift(ctx, &token, removed).await {
                        tracing::error!(%error, "cannot record drift; will retry");
                        read.failed = true;
                        break;
                    }
                    ctx.wake_drift(&token);
                }
                read.park.push((item.id, event_id));
                continue;
            }
            Err(error) => {
                tracing::error!(%error, "cannot apply a notification; will retry");
                read.failed = true;
                break;
            }
        }
        read.fold.consumed.push(item.id);
    }
    read
}

/// Records as drift what an event vppd did not send removed.
async fn record_drift(
    ctx: &Context,
    token: &str,
    removed: Vec<DriftItem>,
) -> Result<(), StoreError> {
    if removed.is_empty() || !ctx.tokens.contains(token) {
        return Ok(());
    }
    let counted = ctx
        .store
        .update_drift(token, DriftChange::Removed { items: removed })
        .await?;
    ctx.metrics.count_drift(token, counted);
    Ok(())
}

/// Folds a read in one store commit, then wakes whoever its changes
/// concern. False when the commit failed.
async fn commit_fold(ctx: &Context, fold: Fold, phases: &[Phase]) -> bool {
    // Sorted before dedup: the deltas are in inbox order, where tokens
    // interleave.
    let mut license_tokens: Vec<String> = fold
        .license_deltas
        .iter()
        .map(|d| d.token.clone())
        .collect();
    license_tokens.sort_unstable();
    license_tokens.dedup();
    let users_changed = !fold.users.is_empty();
    let decided: Vec<(JobId, u32)> = fold
        .decide
        .iter()
        .map(|d| (d.job_id.clone(), d.batch))
        .collect();
    let applied = match ctx.store.fold(fold).await {
        Ok(applied) => applied,
        Err(error) => {
            tracing::error!(%error, "cannot apply notifications; will retry");
            return false;
        }
    };
    let mut outboxed = false;
    let mut held = users_changed;
    let mut freed: Vec<JobId> = Vec::new();
    for ((a, phase), key) in applied.iter().zip(phases).zip(decided) {
        count_applied(ctx, *phase, a.confirmed, a.failed);
        outboxed |= a.outboxed > 0;
        held |= a.held > 0;
        if a.batch_decided {
            ctx.sent.decided(&key);
            freed.push(key.0.clone());
        }
        if let Some(state) = a.job_state {
            tracing::info!(job = %key.0, state = state.as_str(), "job finished");
        }
    }
    if outboxed {
        ctx.wake_release.notify_one();
    }
    if held {
        ctx.wake_users.notify_waiters();
    }
    // An event finished: its token may send the next batch. Sorted before
    // dedup: a fold decides batches of several jobs in inbox order.
    freed.sort_unstable();
    freed.dedup();
    for job_id in freed {
        if let Ok(Some(job)) = ctx.store.job(&job_id).await {
            ctx.wake_submitter(job.token());
        }
    }
    // ASSET_COUNT: jobs waiting for licenses look again now.
    for token in license_tokens {
        if let Err(error) = crate::runtime::licenses::update_low_metric(ctx, &token).await {
            tracing::warn!(%error, "cannot update the license metric");
        }
        ctx.licenses_changed(&token);
    }
    true
}

/// Expires notifications parked longer than [`UNKNOWN_EVENT_PATIENCE`], a
/// bounded run per commit, stopping at shutdown.
async fn expire_parked(ctx: &Context) {
    let cutoff = now_ms().saturating_sub(UNKNOWN_EVENT_PATIENCE.as_millis() as u64);
    loop {
        if ctx.is_shutting_down() {
            return;
        }
        let expired = match ctx.store.expire_parked(cutoff, EXPIRE_MAX).await {
            Ok(expired) => expired,
            Err(error) => {
                tracing::warn!(%error, "cannot expire parked notifications; will retry");
                return;
            }
        };
        let mut converted = Vec::new();
        for item in &expired {
            if let Ok(Stored::Named(notification)) =
                read_item(item.id, &item.envelope, &mut converted)
            {
                foreign_notification(ctx, &notification);
            }
        }
        if expired.len() < EXPIRE_MAX {
            if !expired.is_empty() {
                tracing::info!(
                    count = expired.len(),
                    "notifications for events vppd did not submit (or whose answer was lost) expired"
                );
            }
            return;
        }
    }
}

/// The hook for a notification about an event that is not vppd's (a person
/// assigned or revoked licenses in Apple School/Business Manager, or an
/// event whose answer was lost). vppd decides no pair from it, but what it
/// says about assignments moves license counts: whoever keeps per-token
/// counts (ASSET_COUNT handling, drift against Apple's figures) takes it from
/// here.
fn foreign_notification(_ctx: &Context, notification: &StoredNotification<'_>) {
    if let StoredBody::Assets {
        event_id,
        error,
        assignments,
        ..
    } = &notification.body
    {
        tracing::debug!(
            %event_id,
            kind = %notification.kind,
            assignments = assignments.len(),
            failed = error.is_some(),
            "foreign event"
        );
    }
}

async fn token_of_uid(ctx: &Context, uid: &str) -> String {
    ctx.store
        .meta(&format!("uid/{uid}"))
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| uid.to_string())
}

/// Reads an inbox item: the binary form the listener stores, or a JSON
/// envelope an older vppd recorded (converted into `converted`).
fn read_item<'a>(
    item: InboxId,
    bytes: &'a [u8],
    converted: &'a mut Vec<u8>,
) -> Result<Stored<'a>, UnreadableItem> {
    let unreadable = |error: NotificationError| UnreadableItem {
        item: item.0,
        error,
    };
    let bytes = match stored_form(bytes).map_err(unreadable)? {
        Cow::Borrowed(b) => b,
        Cow::Owned(b) => {
            *converted = b;
            converted.as_slice()
        }
    };
    inbox::decode_item(bytes).map_err(|e| unreadable(e.into()))
}

/// An inbox item that cannot be read (it is dropped).
#[derive(Debug, thiserror::Error)]
#[error("inbox item {item}: {error}")]
struct UnreadableItem {
    item: u64,
    error: NotificationError,
}

/// What one inbox item asks of the store.
async fn plan_one(ctx: &Context, item: &InboxItem) -> Result<Planned, StoreError> {
    let store = &ctx.store;
    let mut converted = Vec::new();
    let notification = match read_item(item.id, &item.envelope, &mut converted) {
        Ok(Stored::Named(n)) => n,
        Ok(Stored::Pairs(p)) => return Ok(decide_pairs(p)),
        Err(error) => {
            tracing::error!(%error, "recorded notification cannot be read; dropping it");
            return Ok(Planned::Drop);
        }
    };
    match notification.body {
        StoredBody::Assets {
            event_id,
            error,
            assignments,
            removal,
        } => {
            // Copied once: the store is asked by the typed id, and a
            // notification to park keeps this copy rather than another.
            let event_id = EventId::from(event_id);
            let Some(eref) = store.event(&event_id).await? else {
                let token = token_of_uid(ctx, notification.uid).await;
                let sending = store
                    .open_batches(&token)
                    .await?
                    .iter()
                    .any(|b| b.state() == BatchState::Sending);
                // Checked after looking for a batch being sent: one that
                // was, and got this eventId meanwhile, is found now.
                if let Some(eref) = store.event(&event_id).await? {
                    tracing::debug!(job = %eref.job_id, "event recorded meanwhile");
                    return Ok(Planned::UnknownEvent {
                        event_id,
                        token,
                        removed: Vec::new(),
                        sending: true,
                    });
                }
                let now = now_ms();
                let removed = if removal && error.is_none() {
                    assignments
                        .iter()
                        .map(|a| DriftItem::of(&a.to_owned(), now, None))
                        .collect()
                } else {
                    Vec::new()
                };
                return Ok(Planned::UnknownEvent {
                    event_id,
                    token,
                    removed,
                    sending,
                });
            };
            let key = (eref.job_id.clone(), eref.batch);
            let Some(index) = ctx.sent.index(&**store, &key).await? else {
                return Ok(Planned::Drop);
            };
            let phase = index.phase();
            let decision = decision_of(event_id.as_str(), error);
            if phase == Phase::Revoke {
                // Apple names the pairs it revoked; the targets are decided
                // once the event is over (event status).
                let revoked = assignments
                    .iter()
                    .filter_map(|a| index.revoked_of(*a))
                    .map(|r| (r, decision.clone()))
                    .collect();
                return Ok(Planned::Decide(
                    Decide {
                        job_id: eref.job_id,
                        batch: eref.batch,
                        revoked,
                        activity: true,
                        ..Default::default()
                    },
                    phase,
                ));
            }
            let decisions = index
                .pairs_named(&assignments)
                .into_iter()
                .map(|p| (p, decision.clone()))
                .collect();
            Ok(Planned::Decide(
                Decide {
                    job_id: eref.job_id,
                    batch: eref.batch,
                    decisions,
                    activity: true,
                    finished: false,
                    revoked: Vec::new(),
                    ..Default::default()
                },
                phase,
            ))
        }
        StoredBody::LicenseCount {
            adam_id,
            pricing_param,
            delta,
        } => {
            tracing::info!(%adam_id, delta, "license count changed");
            Ok(Planned::License(LicenseDelta {
                token: token_of_uid(ctx, notification.uid).await,
                adam_id: adam_id.to_string(),
                pricing_param: pricing_param.to_string(),
                delta,
                notification_id: notification.id.to_string(),
            }))
        }
        StoredBody::Users(users) => {
            let token = token_of_uid(ctx, notification.uid).await;
            Ok(Planned::Users(
                users.into_iter().map(|u| (token.clone(), u)).collect(),
            ))
        }
        StoredBody::Other => {
            tracing::debug!(
                notification_type = %notification.kind,
                "notification acknowledged, nothing to apply"
            );
            Ok(Planned::Drop)
        }
    }
}

/// What Apple reported for every pair a notification names.
fn decision_of(event_id: &str, error: Option<(i32, &str)>) -> Decision {
    match error {
        None => Decision::Confirmed {
            event_id: Some(Arc::from(event_id)),
        },
        Some((number, message)) => Decision::Failed(FailureRecord {
            error_number: number,
            error_message: message.to_string(),
            event_id: Some(event_id.to_string()),
        }),
    }
}

/// A notification the listener stored as pair numbers: its batch is
/// named, so nothing is looked up.
fn decide_pairs(p: StoredPairs<'_>) -> Planned {
    let decision = decision_of(p.event_id, p.error);
    Planned::Decide(
        Decide {
            job_id: JobId::from(p.job_id),
            batch: p.batch,
            decisions: p
                .pairs
                .into_iter()
                .map(|pair| (pair, decision.clone()))
                .collect(),
            activity: true,
            ..Default::default()
        },
        p.phase,
    )
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

/// Runs the event-status and sync fallback of one token until shutdown or
/// its removal. It sleeps until the earliest batch is due (a status poll or
/// a sync), or on the token's `Notify` when nothing is in flight: an idle
/// token costs no wake-ups.
pub async fn run_tracker(ctx: Arc<Context>, entry: Arc<Token>) {
    let token = entry.name().to_string();
    let client = entry.client().clone();
    loop {
        if ctx.is_shutting_down() || entry.is_removed() {
            return;
        }
        if !entry.is_ready() {
            if !ctx.wait(&entry.wake_track, TRACK_IDLE).await {
                return;
            }
            continue;
        }
        let batches = match ctx.store.open_batches(&token).await {
            Ok(b) => b,
            Err(error) => {
                tracing::error!(%error, "cannot read batches");
                Vec::new()
            }
        };
        let now = now_ms();
        let mine: Vec<BatchRecord> = batches
            .into_iter()
            .filter(|b| b.token() == token && b.state() == BatchState::Sent)
            .collect();
        ctx.metrics
            .events_in_flight
            .with_label_values(&[&token])
            .set(mine.len() as i64);
        let oldest = mine
            .iter()
            .map(|b| b.sent_ms())
            .min()
            .map(|t| now.saturating_sub(t))
            .unwrap_or(0);
        ctx.metrics
            .oldest_event_age
            .with_label_values(&[&token])
            .set(oldest as f64 / 1000.0);
        let next_due = mine.iter().filter_map(|b| due_ms(&ctx, b)).min();
        for batch in mine {
            if ctx.is_shutting_down() {
                return;
            }
            if let Err(error) = check_batch(&ctx, &client, &token, batch).await {
                tracing::warn!(%error, "event tracking step failed; will retry");
            }
        }
        let wait = match next_due {
            None => TRACK_IDLE,
            Some(due) => Duration::from_millis(due.saturating_sub(now_ms()))
                .clamp(TRACK_MIN_WAIT, TRACK_IDLE),
        };
        if !ctx.wait(&entry.wake_track, wait).await {
            return;
        }
    }
}

/// A tracker with nothing due sleeps at most this long.
const TRACK_IDLE: Duration = Duration::from_secs(30);
/// And at least this long between looks at its batches.
const TRACK_MIN_WAIT: Duration = Duration::from_millis(500);

/// When the tracker next has something to do for a sent batch: a status
/// poll, or a sync of pairs still undecided after the event finished.
fn due_ms(ctx: &Context, batch: &BatchRecord) -> Option<u64> {
    let t = &ctx.tracking;
    match batch.terminal_ms() {
        None => Some(
            (batch.last_activity_ms() + t.status_poll_after.as_millis() as u64)
                .max(batch.next_poll_ms()),
        ),
        Some(_) if batch.undecided() == 0 => None,
        Some(terminal) => Some(terminal + t.sync_after.as_millis() as u64),
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
    let Some(spec) = ctx.store.spec(batch.job_id()).await? else {
        return Ok(());
    };
    match batch.terminal_ms() {
        None => {
            let quiet = now.saturating_sub(batch.last_activity_ms());
            let poll_after = match batch.phase() {
                Phase::Revoke => t.status_poll_after.min(REVOKE_QUIET),
                _ => t.status_poll_after,
            };
            if quiet < poll_after.as_millis() as u64 || now < batch.next_poll_ms() {
                return Ok(());
            }
            let Some(event_id) = batch.events().last() else {
                return Ok(());
            };
            let next_poll = now + t.status_poll_interval.as_millis() as u64;
            match client.event_status(event_id).await {
                Ok(raw) => {
                    let status = EventStatus::from(&raw);
                    ctx.metrics
                        .status_polls
                        .with_label_values(&[token, status.as_str()])
                        .inc();
                    if status == EventStatus::Pending {
                        let pending_ms = now.saturating_sub(batch.sent_ms());
                        if pending_ms >= t.resubmit_after.as_millis() as u64 {
                            hand_over(ctx, token, &batch, event_id);
                        }
                        ctx.store
                            .schedule_poll(batch.job_id(), batch.no(), next_poll)
                            .await?;
                        return Ok(());
                    }
                    // A finished revoke whose notifications have not all
                    // come: they name the pairs (and their removals), so
                    // they are given until `sync_after`, then the targets
                    // are settled by a sync.
                    if batch.phase() == Phase::Revoke
                        && (batch.revoked().len() as i64) < raw.num_completed as i64
                    {
                        tracing::debug!(job = %batch.job_id(), batch = batch.no(), named = batch.revoked().len(), completed = raw.num_completed, "revoke finished; waiting for its notifications");
                        ctx.store
                            .decide(Decide {
                                job_id: batch.job_id().clone(),
                                batch: batch.no(),
                                finished: true,
                                ..Default::default()
                            })
                            .await?;
                        ctx.wake_submitter(token);
                        return Ok(());
                    }
                    resolve_finished(
                        ctx,
                        client,
                        token,
                        &spec,
                        &batch,
                        Some(event_id),
                        Some(&status),
                    )
                    .await
                }
                Err(e) if e.is_unknown_event() => {
                    ctx.metrics
                        .status_polls
                        .with_label_values(&[token, "unknown_event"])
                        .inc();
                    tracing::warn!(job = %batch.job_id(), batch = batch.no(), %event_id, "Apple does not know the event; syncing its pairs");
                    resolve_finished(ctx, client, token, &spec, &batch, Some(event_id), None).await
                }
                Err(e) => {
                    ctx.metrics
                        .status_polls
                        .with_label_values(&[token, "error"])
                        .inc();
                    ctx.store
                        .schedule_poll(batch.job_id(), batch.no(), next_poll)
                        .await?;
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
            let event_id = batch.events().last();
            resolve_finished(ctx, client, token, &spec, &batch, event_id, None).await
        }
    }
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
    event_id: Option<&EventId>,
    status: Option<&EventStatus>,
) -> Result<(), TrackError> {
    let event: Option<Arc<str>> = event_id
        .filter(|e| !e.is_empty())
        .map(|e| Arc::from(e.as_str()));
    let confirmed = || Decision::Confirmed {
        event_id: event.clone(),
    };
    let mut decisions = Vec::new();
    let mut suspects: Vec<(u32, Option<ReportedError>)> = Vec::new();
    for p in batch.undecided_pairs() {
        match status {
            Some(EventStatus::Complete) | Some(EventStatus::Pending) => {
                decisions.push((p, confirmed()))
            }
            Some(EventStatus::Failed(failures)) => {
                let named = pair(spec, batch, p)
                    .and_then(|pair| failures.iter().find(|f| f.names(pair.asset, pair.target)));
                match named {
                    Some(f) => suspects.push((p, Some(f.error.clone()))),
                    None => decisions.push((p, confirmed())),
                }
            }
            None => suspects.push((p, None)),
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
        let present = sync_pairs(client, spec, batch, &pairs).await?;
        for (p, error) in suspects {
            let done = match batch.phase() {
                Phase::Associate => present.contains(&p),
                Phase::Disassociate | Phase::Revoke => !present.contains(&p),
            };
            if done {
                decisions.push((p, confirmed()));
            } else if let Some(e) = error {
                decisions.push((
                    p,
                    Decision::Failed(FailureRecord {
                        error_number: e.number,
                        error_message: e.message,
                        event_id: event.as_deref().map(str::to_string),
                    }),
                ));
            } else if status.is_none() && batch.terminal_ms().is_some() {
                // Finished, synced twice, and still not done: Apple did not
                // do it, and will not report why.
                decisions.push((
                    p,
                    Decision::Failed(FailureRecord {
                        error_number: error_number::INTERNAL_ERROR,
                        error_message: format!(
                            "Apple's records do not show this {} after the event finished",
                            if batch.phase() == Phase::Associate {
                                "assignment"
                            } else {
                                "removal"
                            }
                        ),
                        event_id: event.as_deref().map(str::to_string),
                    }),
                ));
            }
        }
    }
    let applied = ctx
        .store
        .decide(Decide {
            job_id: batch.job_id().clone(),
            batch: batch.no(),
            decisions,
            activity: false,
            finished: true,
            revoked: Vec::new(),
            ..Default::default()
        })
        .await?;
    count_applied(ctx, batch.phase(), applied.confirmed, applied.failed);
    // The event is finished: its slot is free for the token's next batch.
    ctx.wake_submitter(token);
    if applied.confirmed + applied.failed > 0 {
        tracing::info!(job = %batch.job_id(), batch = batch.no(), confirmed = applied.confirmed, failed = applied.failed, "decided pairs from event status / sync");
    }
    if applied.outboxed > 0 {
        ctx.wake_release.notify_one();
    }
    Ok(())
}

/// An event Apple left PENDING for `resubmit_after` is resubmitted, as
/// Apple advises: the tracker only decides it is due and hands the batch
/// to the token's submitter, which sends it as one of its events, in the
/// token's order and within `max_events_in_flight`
/// ([`crate::runtime::context::Resubmissions`]). Until then the event is polled as
/// before, and asking again changes nothing.
fn hand_over(ctx: &Context, token: &str, batch: &BatchRecord, old_event: &EventId) {
    tracing::debug!(job = %batch.job_id(), batch = batch.no(), %old_event, "event still PENDING after tracking.resubmit_after; handing it to the submitter");
    ctx.resubmit(
        token,
        Resubmission {
            job_id: batch.job_id().clone(),
            batch: batch.no(),
            old_event: old_event.clone(),
        },
    );
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::{Linger, Planned, plan_one};
    use crate::domain::inbox;
    use crate::domain::lifecycle::tests::{SHAPE, spec};
    use crate::domain::lifecycle::{JobChange, JobRecord};
    use crate::domain::report::{
        Assignee, Assignment, Notification, NotificationBody, ReportedError,
    };
    use crate::runtime::context::Context;
    use crate::store::sled::SledStore;
    use crate::store::{EventId, InboxId, InboxItem, JobId, Store};

    fn notification(event_id: &str, error: Option<ReportedError>, serials: &[&str]) -> Vec<u8> {
        inbox::encode(&Notification {
            id: "n".into(),
            kind: "ASSET_MANAGEMENT".into(),
            uid: "u".into(),
            body: NotificationBody::Assets {
                event_id: event_id.into(),
                error,
                assignments: ["1001", "1000", "1002"]
                    .iter()
                    .flat_map(|adam_id| {
                        serials.iter().map(|s| Assignment {
                            adam_id: adam_id.to_string(),
                            pricing_param: "STDQ".into(),
                            assignee: Assignee::Serial(s.to_string()),
                        })
                    })
                    .collect(),
                removal: false,
            },
        })
    }

    /// With a real store: the listener's pair form of a notification for
    /// an event this process sent is planned as the applier plans the form
    /// Apple named, success and failure alike; an event not known here
    /// keeps Apple's names.
    #[tokio::test]
    async fn a_notification_stored_as_pairs_is_planned_as_the_named_one() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let config = crate::runtime::config::Config::parse(
            crate::runtime::config::tests::EXAMPLE,
            Path::new("vppd.toml"),
        )
        .unwrap();
        let (_shutdown, rx) = tokio::sync::watch::channel(false);
        let ctx = Context::new(
            store.clone(),
            Arc::new(crate::runtime::metrics::Metrics::new()),
            config.tracking.clone(),
            config.install.clone(),
            rx,
        );
        // 3 assets x 4 serials; the first batch is assets 0-1 x S0-S2.
        let spec = Arc::new(spec(3, 4, true));
        store
            .create_job(&spec, JobRecord::new(&spec, "h".into(), SHAPE, 1))
            .await
            .unwrap();
        store
            .update_job(&JobId::from("j"), JobChange::Start)
            .await
            .unwrap();
        let batch = store
            .start_batch(&JobId::from("j"), SHAPE)
            .await
            .unwrap()
            .unwrap();
        assert!(
            store
                .batch_sent(&JobId::from("j"), batch.no(), &EventId::from("ev"))
                .await
                .unwrap()
        );
        // Pairs inside the batch and outside it (asset 1002, serial S3).
        let serials = ["S2", "S0", "S3", "S1"];
        let failure = ReportedError {
            number: 9709,
            message: "not enough licenses".into(),
        };
        for error in [None, Some(failure)] {
            let named = notification("ev", error, &serials);
            let unknown = notification("other", None, &serials);
            ctx.sent.sent(&"ev".into(), &"j".into(), batch.no());
            assert!(ctx.sent.as_pairs(&*store, &unknown).await.is_none());
            let pairs = ctx.sent.as_pairs(&*store, &named).await.unwrap();
            assert!(matches!(
                inbox::decode_item(&pairs),
                Ok(inbox::Stored::Pairs(_))
            ));
            assert!(
                pairs.len() * 2 < named.len(),
                "{} {}",
                pairs.len(),
                named.len()
            );
            let item = |envelope| InboxItem {
                id: InboxId(1),
                envelope,
            };
            let (Planned::Decide(a, pa), Planned::Decide(b, pb)) = (
                plan_one(&ctx, &item(named)).await.unwrap(),
                plan_one(&ctx, &item(pairs)).await.unwrap(),
            ) else {
                panic!("not planned as decisions");
            };
            assert_eq!(a.decisions.len(), 6);
            assert_eq!(a, b);
            assert_eq!(pa, pb);
            // A decided batch is forgotten here: its notifications keep
            // Apple's names again.
            ctx.sent.decided(&("j".into(), batch.no()));
            let named = notification("ev", None, &serials);
            assert!(ctx.sent.as_pairs(&*store, &named).await.is_none());
        }
    }

    /// An event Apple leaves PENDING past `resubmit_after` is only handed
    /// to the submitter: the tracker itself sends Apple nothing but event
    /// status reads, so a resubmission cannot leave outside the
    /// submitter's `max_events_in_flight`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pending_event_is_handed_to_the_submitter_not_resubmitted_here() {
        use std::time::Duration;

        use crate::apple::Client;
        use crate::apple::client::ClientOptions;
        use crate::apple::token::SToken;
        use crate::runtime::context::Resubmission;
        use crate::sim::{HoldSettings, SimAsset, SimConfig, SimToken, Simulator};

        let sim = Simulator::start(SimConfig::default(), "127.0.0.1:0")
            .await
            .unwrap();
        let expires = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        let raw = SToken::encode("resubmit-handover", expires, "School");
        sim.add_token(SimToken {
            stoken: raw.clone(),
            assets: vec![SimAsset::app("1000", Some(10))],
            read_only: false,
        })
        .unwrap();
        sim.set_hold(HoldSettings {
            all: false,
            next: 1,
            after_tasks: 0,
        });
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        let mut config = crate::runtime::config::Config::parse(
            crate::runtime::config::tests::EXAMPLE,
            Path::new("vppd.toml"),
        )
        .unwrap();
        config.tracking.status_poll_after = Duration::from_millis(100);
        config.tracking.status_poll_interval = Duration::from_millis(100);
        config.tracking.resubmit_after = Duration::from_millis(300);
        let metrics = Arc::new(crate::runtime::metrics::Metrics::new());
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let ctx = Arc::new(Context::new(
            store.clone(),
            metrics.clone(),
            config.tracking.clone(),
            config.install.clone(),
            rx,
        ));
        let opts = ClientOptions::new(&sim.base_url(), "main", 50, Duration::from_secs(10));
        let client = Client::new(opts, SToken::parse(&raw).unwrap(), metrics.clone()).unwrap();
        let entry = ctx
            .tokens
            .insert(
                "main",
                crate::runtime::tokens::Source::Config,
                client.clone(),
                None,
                false,
            )
            .unwrap();
        ctx.tokens.set_ready(&entry);
        let spec = Arc::new(spec(1, 1, false));
        store
            .create_job(&spec, JobRecord::new(&spec, "h".into(), SHAPE, 1))
            .await
            .unwrap();
        store
            .update_job(&JobId::from("j"), JobChange::Start)
            .await
            .unwrap();
        let batch = store
            .start_batch(&JobId::from("j"), SHAPE)
            .await
            .unwrap()
            .unwrap();
        let request = crate::apple::requests::request_for(&spec, &batch);
        let event = client.associate(&request).await.unwrap().event_id;
        assert!(
            store
                .batch_sent(&JobId::from("j"), batch.no(), &event)
                .await
                .unwrap()
        );
        let tracker = tokio::spawn(super::run_tracker(ctx.clone(), entry.clone()));
        let asked = vec![Resubmission {
            job_id: "j".into(),
            batch: batch.no(),
            old_event: event.clone(),
        }];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while ctx.resubmissions.waiting("main").is_empty() && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ctx.resubmissions.waiting("main"), asked);
        // Polled on past the hand-over: still asked once, nothing sent.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(ctx.resubmissions.waiting("main"), asked);
        let management: Vec<String> = sim
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .map(|r| r.path)
            .collect();
        assert_eq!(management, vec!["/assets/associate".to_string()]);
        assert_eq!(
            metrics
                .events_resubmitted
                .with_label_values(&["main"])
                .get(),
            0
        );
        let stored = store
            .batch(&JobId::from("j"), batch.no())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.events(), &[event]);

        shutdown.send(true).unwrap();
        tracker.await.unwrap();
        sim.release_held(None);
        sim.shutdown().await;
    }

    #[test]
    fn a_short_read_waits_once_and_a_full_one_never() {
        let mut linger = Linger::default();
        assert!(!linger.wait(false));
        assert!(linger.wait(true));
        assert!(!linger.wait(true), "the read after the wait is worked");
        assert!(linger.wait(true), "and the next short one waits again");
        assert!(!linger.wait(false));
        assert!(!linger.wait(false));
    }
}
