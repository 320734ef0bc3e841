//! Every change the store makes, written once over [`Tx`], the record-level
//! transaction a backend provides: what a change reads, which
//! [`crate::domain::lifecycle`] transition it applies, and what it writes. A
//! backend decides how records are laid out, locked and made durable; it
//! makes no decision of its own.
//!
//! Lock order: a change that touches several records reads them in one
//! order, outbox and held entries by id, then jobs by id, then batches by
//! (job, number), then licenses, so that a backend that locks what it reads
//! (PostgreSQL's `FOR UPDATE`) never deadlocks two changes of its own.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use super::{
    Created, EventId, Fold, InboxId, LicenseRecord, OutboxAck, OutboxId, Released, Settled,
    StoreError, TokenRecord, UserRecord,
};
use crate::domain::job::{JobSpec, RequestType};
use crate::domain::lifecycle::{
    Applied, AssetRef, BatchRecord, Decided, DriftChange, DriftCounted, DriftRecord, EventRef,
    FailureRecord, JobChange, JobRecord, OutboxEntry, now_ms, push_outbox,
};
use crate::domain::plan::Shape;

type R<T> = Result<T, StoreError>;

/// One read-modify-write transaction, record by record. What it reads it
/// holds until the commit (a row lock, or the backend's one writer), and
/// what it writes it reads back. Nothing is visible to others before the
/// backend commits it; a transaction dropped uncommitted leaves nothing.
pub trait Tx: Send {
    /// Whether other processes work the same store: a fold then checks
    /// that no other applier took its notifications first.
    const SHARED: bool;

    fn job(&mut self, id: &str) -> impl Future<Output = R<Option<JobRecord>>> + Send;
    /// Rewrites a job that exists.
    fn put_job(&mut self, job: &JobRecord) -> impl Future<Output = R<()>> + Send;
    /// A new place in creation order.
    fn next_seq(&mut self) -> impl Future<Output = R<u64>> + Send;
    /// Writes a new job and its spec (encoded); false when a job with its
    /// id exists (one a concurrent commit made).
    fn insert_job(&mut self, job: &JobRecord, spec: &[u8]) -> impl Future<Output = R<bool>> + Send;
    fn spec(&mut self, id: &str) -> impl Future<Output = R<Option<JobSpec>>> + Send;

    fn batch(
        &mut self,
        job_id: &str,
        no: u32,
    ) -> impl Future<Output = R<Option<BatchRecord>>> + Send;
    /// Writes a batch, with the index of open batches kept in step.
    fn put_batch(&mut self, batch: &BatchRecord) -> impl Future<Output = R<()>> + Send;
    fn remove_batch(&mut self, job_id: &str, no: u32) -> impl Future<Output = R<()>> + Send;
    fn put_failure(
        &mut self,
        job_id: &str,
        batch: u32,
        pair: u32,
        failure: &FailureRecord,
    ) -> impl Future<Output = R<()>> + Send;

    fn put_event(&mut self, event_id: &str, event: &EventRef)
    -> impl Future<Output = R<()>> + Send;
    /// Moves the notifications parked under `event_id` back into the
    /// inbox, under the ids they had.
    fn unpark(&mut self, event_id: &str) -> impl Future<Output = R<()>> + Send;
    /// Removes inbox items; how many were there.
    fn remove_inbox(&mut self, ids: &[InboxId]) -> impl Future<Output = R<usize>> + Send;

    /// The outbox entries of `ids` (sorted, distinct) that exist, in id order.
    fn outbox_entries(
        &mut self,
        ids: &[OutboxId],
    ) -> impl Future<Output = R<Vec<(OutboxId, OutboxEntry)>>> + Send;
    fn put_outbox(
        &mut self,
        id: OutboxId,
        entry: &OutboxEntry,
    ) -> impl Future<Output = R<()>> + Send;
    fn remove_outbox(&mut self, ids: &[OutboxId]) -> impl Future<Output = R<()>> + Send;
    /// Appends an entry to the outbox, after every entry there.
    fn add_outbox(&mut self, entry: &OutboxEntry) -> impl Future<Output = R<()>> + Send;

    fn held(
        &mut self,
        token: &str,
        id: OutboxId,
    ) -> impl Future<Output = R<Option<OutboxEntry>>> + Send;
    fn put_held(
        &mut self,
        token: &str,
        id: OutboxId,
        entry: &OutboxEntry,
    ) -> impl Future<Output = R<()>> + Send;
    fn remove_held(&mut self, token: &str, id: OutboxId) -> impl Future<Output = R<()>> + Send;
    fn add_held(&mut self, token: &str, entry: &OutboxEntry) -> impl Future<Output = R<()>> + Send;

    fn license(
        &mut self,
        key: &LicenseKey,
    ) -> impl Future<Output = R<Option<LicenseRecord>>> + Send;
    fn put_license(
        &mut self,
        key: &LicenseKey,
        record: &LicenseRecord,
    ) -> impl Future<Output = R<()>> + Send;
    fn put_user(&mut self, token: &str, user: &UserRecord) -> impl Future<Output = R<()>> + Send;

    /// A token's drift record, held for a change (`None` before the first).
    fn drift(&mut self, token: &str) -> impl Future<Output = R<Option<DriftRecord>>> + Send;
    fn put_drift(
        &mut self,
        token: &str,
        record: &DriftRecord,
    ) -> impl Future<Output = R<()>> + Send;

    /// Whether commands of the job wait in the outbox.
    fn in_outbox(&mut self, job_id: &str) -> impl Future<Output = R<bool>> + Send;
    /// Forgets a job with all that is kept for it: its spec, batches (and
    /// the open index), the `events` of those batches and its failures; and
    /// counts it pruned, so that the watermark does not go down with it.
    fn forget_job(&mut self, job_id: &str, events: &[String])
    -> impl Future<Output = R<()>> + Send;
    fn batches_of(&mut self, job_id: &str) -> impl Future<Output = R<Vec<BatchRecord>>> + Send;

    fn event(&mut self, event_id: &str) -> impl Future<Output = R<Option<EventRef>>> + Send;
    fn user(
        &mut self,
        token: &str,
        client_user_id: &str,
    ) -> impl Future<Output = R<Option<UserRecord>>> + Send;
    /// Moves an inbox item under `event_id` to wait for that event, parked
    /// at `at_ms`; false when the item is gone or the event was recorded
    /// meanwhile (the applier's next read then finds it).
    fn park(
        &mut self,
        id: InboxId,
        event_id: &str,
        at_ms: u64,
    ) -> impl Future<Output = R<bool>> + Send;

    fn meta(&mut self, key: &str) -> impl Future<Output = R<Option<String>>> + Send;
    fn put_meta(&mut self, key: &str, value: &str) -> impl Future<Output = R<()>> + Send;
    /// Writes `value` unless `key` holds one; whether it wrote.
    fn insert_meta(&mut self, key: &str, value: &str) -> impl Future<Output = R<bool>> + Send;
    fn put_token(&mut self, record: &TokenRecord) -> impl Future<Output = R<()>> + Send;
    /// Removes a token and its state; whether the token was there.
    fn remove_token(&mut self, name: &str) -> impl Future<Output = R<bool>> + Send;
    fn put_token_state(&mut self, name: &str, state: &str) -> impl Future<Output = R<()>> + Send;
}

/// A license record's key: token, adamId, pricingParam.
pub type LicenseKey = (String, String, String);

/// Stores a new job with its spec (already encoded), or finds it there.
pub async fn create_job<T: Tx>(tx: &mut T, record: &JobRecord, spec: &[u8]) -> R<Created> {
    let same = |existing: JobRecord| {
        if existing.spec_hash() == record.spec_hash() {
            Created::Existing(Box::new(existing))
        } else {
            Created::Conflict
        }
    };
    if let Some(existing) = tx.job(record.id().as_str()).await? {
        return Ok(same(existing));
    }
    let mut record = record.clone();
    record.set_seq(tx.next_seq().await?);
    if tx.insert_job(&record, spec).await? {
        return Ok(Created::New(Box::new(record)));
    }
    // Another commit made it first.
    Ok(tx
        .job(record.id().as_str())
        .await?
        .map_or(Created::Conflict, same))
}

/// Parks inbox items under their eventIds (see [`Tx::park`]); how many.
/// By eventId, so that a backend locking each eventId locks in one order.
pub async fn park<T: Tx>(tx: &mut T, items: &[(InboxId, EventId)], at_ms: u64) -> R<usize> {
    let mut items: Vec<&(InboxId, EventId)> = items.iter().collect();
    items.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.0.cmp(&b.0.0)));
    let mut parked = 0;
    for (id, event_id) in items {
        if tx.park(*id, event_id.as_str(), at_ms).await? {
            parked += 1;
        }
    }
    Ok(parked)
}

/// The value under `key`, written first if there was none.
pub async fn meta_or_insert<T: Tx>(tx: &mut T, key: &str, value: &str) -> R<String> {
    tx.insert_meta(key, value).await?;
    match tx.meta(key).await? {
        Some(kept) => Ok(kept),
        None => Err(StoreError::Corrupt {
            key: key.to_string(),
            message: "vanished right after it was written".into(),
        }),
    }
}

pub async fn update_job<T: Tx>(tx: &mut T, id: &str, change: &JobChange) -> R<Option<JobRecord>> {
    let Some(mut job) = tx.job(id).await? else {
        return Ok(None);
    };
    if job.apply(change, now_ms()) {
        tx.put_job(&job).await?;
    }
    Ok(Some(job))
}

pub async fn start_batch<T: Tx>(tx: &mut T, job_id: &str, shape: Shape) -> R<Option<BatchRecord>> {
    let Some(mut job) = tx.job(job_id).await? else {
        return Ok(None);
    };
    let Some(batch) = job.start_batch(shape, now_ms()) else {
        return Ok(None);
    };
    tx.put_batch(&batch).await?;
    tx.put_job(&job).await?;
    Ok(Some(batch))
}

/// A job and one of its batches, both there, locked in that order.
async fn job_and_batch<T: Tx>(
    tx: &mut T,
    job_id: &str,
    no: u32,
) -> R<Option<(JobRecord, BatchRecord)>> {
    let Some(job) = tx.job(job_id).await? else {
        return Ok(None);
    };
    Ok(tx.batch(job_id, no).await?.map(|batch| (job, batch)))
}

pub async fn batch_sent<T: Tx>(tx: &mut T, job_id: &str, no: u32, event_id: &str) -> R<bool> {
    let Some((mut job, mut batch)) = job_and_batch(tx, job_id, no).await? else {
        return Ok(false);
    };
    if !job.batch_sent(&mut batch, event_id, now_ms()) {
        return Ok(false);
    }
    tx.put_batch(&batch).await?;
    tx.put_job(&job).await?;
    let event = EventRef {
        job_id: job_id.into(),
        batch: no,
    };
    tx.put_event(event_id, &event).await?;
    tx.unpark(event_id).await?;
    Ok(true)
}

pub async fn return_batch<T: Tx>(tx: &mut T, job_id: &str, no: u32, shape: Shape) -> R<bool> {
    let Some((mut job, batch)) = job_and_batch(tx, job_id, no).await? else {
        return Ok(false);
    };
    if !job.return_batch(&batch, shape) {
        return Ok(false);
    }
    tx.remove_batch(job_id, no).await?;
    tx.put_job(&job).await?;
    Ok(true)
}

pub async fn withdraw_batch<T: Tx>(tx: &mut T, job_id: &str, no: u32) -> R<bool> {
    let Some((mut job, mut batch)) = job_and_batch(tx, job_id, no).await? else {
        return Ok(false);
    };
    if !job.withdraw_batch(&mut batch, now_ms()) {
        return Ok(false);
    }
    tx.put_batch(&batch).await?;
    tx.put_job(&job).await?;
    Ok(true)
}

pub async fn schedule_poll<T: Tx>(tx: &mut T, job_id: &str, no: u32, at_ms: u64) -> R<()> {
    if let Some(mut batch) = tx.batch(job_id, no).await? {
        batch.schedule_poll(at_ms);
        tx.put_batch(&batch).await?;
    }
    Ok(())
}

pub async fn users_ready<T: Tx>(
    tx: &mut T,
    job_id: &str,
    invitations: &[(String, String)],
    associated: &[u32],
) -> R<bool> {
    let Some(mut job) = tx.job(job_id).await? else {
        return Ok(false);
    };
    if !job.users_ready(invitations.len() as u64, associated, now_ms()) {
        return Ok(false);
    }
    if !invitations.is_empty() {
        let entry = OutboxEntry::invitations(job_id, invitations.to_vec(), now_ms());
        tx.add_outbox(&entry).await?;
    }
    tx.put_job(&job).await?;
    Ok(true)
}

pub async fn put_license<T: Tx>(tx: &mut T, key: &LicenseKey, record: &LicenseRecord) -> R<()> {
    tx.put_license(key, record).await
}

pub async fn update_drift<T: Tx>(tx: &mut T, token: &str, change: &DriftChange) -> R<DriftCounted> {
    let mut record = tx.drift(token).await?.unwrap_or_default();
    let counted = record.apply(change.clone());
    tx.put_drift(token, &record).await?;
    Ok(counted)
}

/// Forgets one job that retention found expired, if it still is and no
/// command of it waits in the outbox; whether it did.
pub async fn forget_job<T: Tx>(tx: &mut T, job_id: &str, cutoff_ms: u64) -> R<bool> {
    let still = tx.job(job_id).await?.is_some_and(|j| j.expired(cutoff_ms));
    if !still || tx.in_outbox(job_id).await? {
        return Ok(false);
    }
    let mut events = Vec::new();
    for batch in tx.batches_of(job_id).await? {
        events.extend(batch.events().iter().map(|e| e.as_str().to_owned()));
    }
    tx.forget_job(job_id, &events).await?;
    Ok(true)
}

/// Jobs a change reads, by id (the lock order), each read once and written
/// once however often the change concerns it; `None`: no such job.
pub type Jobs = BTreeMap<String, Option<JobRecord>>;

async fn write_jobs<T: Tx>(tx: &mut T, jobs: &Jobs) -> R<()> {
    for job in jobs.values().flatten() {
        tx.put_job(job).await?;
    }
    Ok(())
}

/// Releases acknowledged commands and counts them on their jobs.
pub async fn ack_outbox<T: Tx>(tx: &mut T, acks: &[OutboxAck]) -> R<Vec<Released>> {
    let mut jobs = Jobs::new();
    let released = take_acks(tx, acks, &mut jobs, now_ms()).await?;
    write_jobs(tx, &jobs).await?;
    Ok(released)
}

/// Takes acknowledged commands out of the outbox and counts them released
/// on their jobs, which are read into `jobs` (if not there already) and
/// left there for the caller to write once.
async fn take_acks<T: Tx>(
    tx: &mut T,
    acks: &[OutboxAck],
    jobs: &mut Jobs,
    now: u64,
) -> R<Vec<Released>> {
    let mut ids: Vec<OutboxId> = acks.iter().map(|a| a.entry).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut per_job: BTreeMap<(String, RequestType), u64> = BTreeMap::new();
    let mut emptied = Vec::new();
    for (id, mut entry) in tx.outbox_entries(&ids).await? {
        let mut taken = 0;
        for ack in acks.iter().filter(|a| a.entry == id) {
            taken += entry.take(&ack.pairs);
        }
        if entry.pairs.is_empty() {
            emptied.push(id);
        } else if taken > 0 {
            tx.put_outbox(id, &entry).await?;
        }
        if taken > 0 {
            *per_job
                .entry((entry.job_id.as_str().to_owned(), entry.request_type))
                .or_default() += taken;
        }
    }
    if !emptied.is_empty() {
        tx.remove_outbox(&emptied).await?;
    }
    let mut released = Vec::new();
    for ((job_id, request_type), n) in per_job {
        if !jobs.contains_key(&job_id) {
            let job = tx.job(&job_id).await?;
            jobs.insert(job_id.clone(), job);
        }
        if let Some(Some(job)) = jobs.get_mut(&job_id) {
            released.push(Released::count(job, n, request_type, now));
        }
    }
    Ok(released)
}

/// Moves held installs to the outbox or drops them, by identity.
pub async fn settle_held<T: Tx>(
    tx: &mut T,
    token: &str,
    release: &[OutboxAck],
    drop: &[OutboxAck],
) -> R<Settled> {
    let mut settled = Settled::default();
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    // Held entries in id order (a stable sort: a release before a drop of
    // the same entry), then jobs by id.
    let mut order: Vec<(&OutboxAck, bool)> = release
        .iter()
        .map(|a| (a, true))
        .chain(drop.iter().map(|a| (a, false)))
        .collect();
    order.sort_by_key(|(a, _)| a.entry);
    for (ack, moving) in order {
        let Some(mut entry) = tx.held(token, ack.entry).await? else {
            continue;
        };
        let before = entry.pairs.clone();
        let taken = entry.take(&ack.pairs);
        if taken == 0 {
            continue;
        }
        if entry.pairs.is_empty() {
            tx.remove_held(token, ack.entry).await?;
        } else {
            tx.put_held(token, ack.entry, &entry).await?;
        }
        if moving {
            let pairs = before
                .into_iter()
                .filter(|p| !entry.pairs.contains(p))
                .collect();
            let moved = OutboxEntry {
                pairs,
                // Its release latency runs from the association of its
                // user, not from the license.
                confirmed_ms: now_ms(),
                ..entry
            };
            tx.add_outbox(&moved).await?;
            settled.released += taken;
        } else {
            *dropped.entry(entry.job_id.as_str().to_owned()).or_default() += taken;
            settled.dropped += taken;
        }
    }
    let now = now_ms();
    for (job_id, n) in dropped {
        let Some(mut job) = tx.job(&job_id).await? else {
            continue;
        };
        if let Some(state) = job.held_dropped(n, now) {
            settled.finished.push((job_id.into(), state));
        }
        tx.put_job(&job).await?;
    }
    Ok(settled)
}

/// Where a fold finds a job's spec when a confirmation moved licenses by
/// asset index: the store's shared copies first.
pub type SpecCache<'a> = &'a (dyn Fn(&str) -> Option<Arc<JobSpec>> + Send + Sync);

/// What a fold holds while it applies its decisions.
struct Folding {
    jobs: Jobs,
    batches: BTreeMap<(String, u32), Option<BatchRecord>>,
    /// The run's confirmations of one asset are one write, not one per
    /// notification. Only assets whose counts were read move: a delta
    /// alone says nothing about the total.
    licenses: BTreeMap<LicenseKey, Option<LicenseRecord>>,
    /// Commands of consecutive notifications of one event share an entry
    /// ([`push_outbox`]).
    outbox: Vec<OutboxEntry>,
    now: u64,
}

/// Commits a run of notifications' decisions, license and user reports,
/// and consumes their inbox items; then releases `riders`, acknowledgements
/// that ride on this commit, as if committed after it. Returns what each
/// decision changed, and what each rider released.
pub async fn fold<T: Tx>(
    tx: &mut T,
    fold: &Fold,
    riders: &[&[OutboxAck]],
    cached: SpecCache<'_>,
) -> R<(Vec<Applied>, Vec<Vec<Released>>)> {
    // Consumed items first: when another applier took some of them (a
    // lease handover), nothing of this run is applied twice; the caller
    // reads the inbox again.
    if !fold.consumed.is_empty() {
        let removed = tx.remove_inbox(&fold.consumed).await?;
        if T::SHARED && removed != fold.consumed.len() {
            return Err(StoreError::Backend(
                "notifications of this run were applied by another replica; reading the inbox again".into(),
            ));
        }
    }
    let mut f = Folding {
        jobs: Jobs::new(),
        batches: BTreeMap::new(),
        licenses: BTreeMap::new(),
        outbox: Vec::new(),
        now: now_ms(),
    };
    for d in &fold.decide {
        f.jobs.entry(d.job_id.as_str().to_owned()).or_insert(None);
        f.batches
            .entry((d.job_id.as_str().to_owned(), d.batch))
            .or_insert(None);
    }
    for (id, slot) in f.jobs.iter_mut() {
        *slot = tx.job(id).await?;
    }
    for ((job_id, no), slot) in f.batches.iter_mut() {
        *slot = tx.batch(job_id, *no).await?;
    }
    let mut applied = Vec::with_capacity(fold.decide.len());
    for d in &fold.decide {
        applied.push(decide(tx, &mut f, d, cached).await?);
    }
    for entry in &f.outbox {
        tx.add_outbox(entry).await?;
    }
    for batch in f.batches.values().flatten() {
        tx.put_batch(batch).await?;
    }
    let mut released = Vec::with_capacity(riders.len());
    for acks in riders {
        released.push(take_acks(tx, acks, &mut f.jobs, f.now).await?);
    }
    write_jobs(tx, &f.jobs).await?;
    for delta in &fold.license_deltas {
        let key = (
            delta.token.clone(),
            delta.adam_id.clone(),
            delta.pricing_param.clone(),
        );
        let slot = license_slot(tx, &mut f.licenses, key).await?;
        slot.get_or_insert_with(LicenseRecord::default).apply_delta(
            delta.delta,
            &delta.notification_id,
            f.now,
        );
    }
    for (key, record) in &f.licenses {
        if let Some(record) = record {
            tx.put_license(key, record).await?;
        }
    }
    for (token, user) in &fold.users {
        tx.put_user(token, user).await?;
    }
    Ok((applied, released))
}

/// The license record of `key` as the fold holds it, read on first use.
async fn license_slot<'m, T: Tx>(
    tx: &mut T,
    licenses: &'m mut BTreeMap<LicenseKey, Option<LicenseRecord>>,
    key: LicenseKey,
) -> R<&'m mut Option<LicenseRecord>> {
    if !licenses.contains_key(&key) {
        let record = tx.license(&key).await?;
        licenses.insert(key.clone(), record);
    }
    Ok(licenses.entry(key).or_insert(None))
}

/// Applies one [`super::Decide`] of a fold.
async fn decide<T: Tx>(
    tx: &mut T,
    f: &mut Folding,
    d: &super::Decide,
    cached: SpecCache<'_>,
) -> R<Applied> {
    let bkey = (d.job_id.as_str().to_owned(), d.batch);
    let (Some(Some(job)), Some(Some(batch))) =
        (f.jobs.get_mut(d.job_id.as_str()), f.batches.get_mut(&bkey))
    else {
        return Ok(Applied::default());
    };
    let decided: Decided = job.decide(
        batch,
        &d.decisions,
        &d.revoked,
        d.activity,
        d.finished,
        f.now,
    );
    job.note_reconciliation(batch, &d.checked, d.reconciled);
    let token = job.token().to_string();
    if !decided.licenses.is_empty() {
        // Read through the transaction: a read beside it could wait on
        // what the transaction itself holds.
        let spec = match cached(d.job_id.as_str()) {
            Some(spec) => Some(spec),
            None => tx.spec(d.job_id.as_str()).await?.map(Arc::new),
        };
        for (asset, assigned) in &decided.licenses {
            let (adam_id, pricing) = match asset {
                AssetRef::Named {
                    adam_id,
                    pricing_param,
                } => (adam_id.clone(), pricing_param.clone()),
                AssetRef::Index(i) => match spec.as_ref().and_then(|s| s.assets.get(*i as usize)) {
                    Some(a) => (a.adam_id.clone(), a.pricing_param.clone()),
                    None => continue,
                },
            };
            let key = (token.clone(), adam_id, pricing);
            if let Some(record) = license_slot(tx, &mut f.licenses, key).await? {
                record.apply_assigned(*assigned, f.now);
            }
        }
    }
    for (pair, failure) in &decided.failures {
        tx.put_failure(d.job_id.as_str(), d.batch, *pair, failure)
            .await?;
    }
    for entry in decided.outbox {
        push_outbox(&mut f.outbox, entry);
    }
    for entry in &decided.held {
        tx.add_held(&token, entry).await?;
    }
    Ok(decided.applied)
}
