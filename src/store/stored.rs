//! [`Store`] written once over a [`Backend`]: every change is an operation
//! of [`super::ops`] run in one of the backend's transactions, retried when
//! the backend says a conflict may pass, then committed as durably as the
//! change needs. What the store keeps in memory beside the backend (the
//! shared job specs, acknowledgements waiting to ride on a fold) lives here.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ops::{self, Tx};
use super::{
    Created, EventId, Fold, InboxId, InboxItem, JobId, Lease, LicenseRecord, OutboxAck, OutboxItem,
    PairFailure, Recorded, Released, Settled, Store, StoreError, StoreFuture, StoreStats,
    TokenRecord, UserRecord, marker::Watermark,
};
use crate::domain::job::JobSpec;
use crate::domain::lifecycle::{
    Applied, BatchRecord, DriftChange, DriftCounted, DriftRecord, EventRef, JobChange, JobRecord,
};
use crate::domain::plan::Shape;

type R<T> = Result<T, StoreError>;

/// How a commit is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk before the call returns.
    Now,
    /// May be lost to a crash with every later change; a fold's, whose
    /// inbox items go with it (see [`Store::fold`]).
    Later,
}

/// How often a change that hit a conflict the backend reports
/// ([`Backend::retry`]) is run again before its error is returned.
const CONFLICT_RETRIES: usize = 8;

/// What differs between backends: how records are laid out, locked and
/// made durable, and the changes that are one statement of their own.
pub trait Backend: Send + Sync + Sized + 'static {
    type Tx<'a>: Tx + 'a;

    /// Starts a transaction.
    fn begin(&self) -> impl Future<Output = R<Self::Tx<'_>>> + Send;
    /// A transaction that only reads: it locks nothing, sees each record
    /// as last committed, and is dropped, never committed.
    fn read(&self) -> impl Future<Output = R<Self::Tx<'_>>> + Send;
    /// Commits it; durable on return with [`Durability::Now`].
    fn commit<'a>(
        &'a self,
        tx: Self::Tx<'a>,
        durability: Durability,
    ) -> impl Future<Output = R<()>> + Send;
    /// Whether a failed transaction may simply run again.
    fn retry(&self, error: &StoreError) -> bool;
    /// Makes everything committed so far durable.
    fn sync(&self) -> impl Future<Output = R<()>> + Send;
    /// Whether an acknowledgement should wait for the next fold to carry
    /// it now (a backend whose commit costs the same whatever it holds,
    /// while notifications wait to be folded).
    fn ride_acks(&self) -> bool;

    /// The jobs of `token` (every job: `None`), in creation order.
    fn jobs(&self, token: Option<&str>) -> impl Future<Output = R<Vec<JobRecord>>> + Send;
    fn failures(
        &self,
        id: &str,
        limit: usize,
    ) -> impl Future<Output = R<(Vec<PairFailure>, bool)>> + Send;
    fn open_batches(&self, token: &str) -> impl Future<Output = R<Vec<BatchRecord>>> + Send;
    /// Expired jobs with no command in the outbox, for retention.
    fn prunable(&self, cutoff_ms: u64) -> impl Future<Output = R<Vec<String>>> + Send;
    fn stats(&self) -> impl Future<Output = R<StoreStats>> + Send;
    /// A value that never decreases while the store is intact.
    fn generation(&self) -> impl Future<Output = R<u64>> + Send;
    /// How many finished jobs retention has forgotten.
    fn pruned(&self) -> impl Future<Output = R<u64>> + Send;

    fn record_notification(
        &self,
        id: &str,
        envelope: &[u8],
    ) -> impl Future<Output = R<Recorded>> + Send;
    fn inbox(&self, max: usize) -> impl Future<Output = R<Vec<InboxItem>>> + Send;
    fn inbox_len(&self) -> impl Future<Output = R<usize>> + Send;
    fn prune_seen(&self, cutoff_ms: u64) -> impl Future<Output = R<usize>> + Send;
    fn expire_parked(
        &self,
        cutoff_ms: u64,
        max: usize,
    ) -> impl Future<Output = R<Vec<InboxItem>>> + Send;
    fn outbox(&self, max_commands: usize) -> impl Future<Output = R<Vec<OutboxItem>>> + Send;
    fn held(&self, token: &str) -> impl Future<Output = R<Vec<OutboxItem>>> + Send;

    fn licenses(
        &self,
        token: &str,
    ) -> impl Future<Output = R<Vec<(String, String, LicenseRecord)>>> + Send;
    fn users(&self, token: &str) -> impl Future<Output = R<Vec<UserRecord>>> + Send;

    fn tokens(&self) -> impl Future<Output = R<Vec<TokenRecord>>> + Send;
    fn token_states(&self) -> impl Future<Output = R<Vec<(String, String)>>> + Send;

    fn take_leases(
        &self,
        names: &[String],
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = R<Vec<String>>> + Send;
    fn release_leases(
        &self,
        names: &[String],
        holder: &str,
        linger: Duration,
    ) -> impl Future<Output = R<()>> + Send;
    fn leases(&self) -> impl Future<Output = R<Vec<Lease>>> + Send;
}

/// Runs `$op` (an expression using `$tx`, a `&mut` transaction) in a
/// transaction of `$store`'s backend and commits it with `$durability`,
/// again from the start when the backend reports a conflict that may pass.
macro_rules! transact {
    ($store:expr, $durability:expr, |$tx:ident| $op:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result: Result<_, StoreError> = async {
                let mut txn = $store.backend.begin().await?;
                let out = {
                    let $tx = &mut txn;
                    $op.await?
                };
                $store.backend.commit(txn, $durability).await?;
                Ok(out)
            }
            .await;
            match result {
                Err(e) if attempt < CONFLICT_RETRIES && $store.backend.retry(&e) => {
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                other => break other,
            }
        }
    }};
}

/// Runs `$op` (an expression using `$tx`) in a reader of `$store`'s backend.
macro_rules! read {
    ($store:expr, |$tx:ident| $op:expr) => {{
        let mut txn = $store.backend.read().await?;
        let $tx = &mut txn;
        $op.await
    }};
}

/// An acknowledgement of delivered commands, waiting for a fold.
struct Rider {
    id: u64,
    acks: Vec<OutboxAck>,
    done: tokio::sync::oneshot::Sender<R<Vec<Released>>>,
}

/// How long an acknowledgement waits for a fold to carry it before it is
/// committed on its own ([`Backend::ride_acks`]). During a rollout the
/// release acknowledges a delivery more often than the applier folds:
/// riding on the fold saves the acknowledgement's own commit. The release
/// wakes the applier (`Context::wake_fold`), so a fold normally comes
/// within a fraction of a millisecond; the wait is for a fold that does
/// not come (the inbox held only notifications to park).
const ACK_RIDE: Duration = Duration::from_millis(5);

fn gone_rider() -> StoreError {
    StoreError::Backend("an acknowledgement's fold ended without an answer".into())
}

/// A [`Store`] over the backend `B`.
pub struct Stored<B> {
    backend: B,
    /// Every caller shares one copy of a spec.
    specs: Mutex<HashMap<JobId, Arc<JobSpec>>>,
    /// Acknowledgements waiting for a fold to carry them (`ack_outbox`).
    riders: Mutex<Vec<Rider>>,
    rider_ids: AtomicU64,
}

impl<B> std::fmt::Debug for Stored<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Nothing of the backend: its configuration may hold secrets.
        f.debug_struct(std::any::type_name::<B>())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Stored<B> {
    pub(crate) fn new(backend: B) -> Stored<B> {
        Stored {
            backend,
            specs: Mutex::new(HashMap::new()),
            riders: Mutex::new(Vec::new()),
            rider_ids: AtomicU64::new(0),
        }
    }

    fn specs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<JobSpec>>> {
        self.specs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached_spec(&self, id: &str) -> Option<Arc<JobSpec>> {
        self.specs().get(id).cloned()
    }

    async fn read_spec(&self, id: &JobId) -> R<Option<Arc<JobSpec>>> {
        if let Some(s) = self.cached_spec(id.as_str()) {
            return Ok(Some(s));
        }
        let Some(spec) = read!(self, |tx| tx.spec(id.as_str()))? else {
            return Ok(None);
        };
        // Two readers may have decoded it at once: all share the first copy.
        let spec = self
            .specs()
            .entry(id.clone())
            .or_insert_with(|| Arc::new(spec))
            .clone();
        Ok(Some(spec))
    }

    async fn apply_acks(&self, acks: &[OutboxAck]) -> R<Vec<Released>> {
        transact!(self, Durability::Now, |tx| ops::ack_outbox(tx, acks))
    }

    /// Acknowledgements waiting to ride on the next fold, taken by it.
    fn take_riders(&self) -> Vec<Rider> {
        std::mem::take(&mut *self.riders.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn apply_fold(&self, fold: &Fold) -> R<Vec<Applied>> {
        let riders = self.take_riders();
        let acks: Vec<&[OutboxAck]> = riders.iter().map(|r| r.acks.as_slice()).collect();
        let cached = |id: &str| self.cached_spec(id);
        // Not durable on return ([`Store::fold`]); the acknowledgements it
        // carries are made durable by their callers.
        let result = transact!(self, Durability::Later, |tx| ops::fold(
            tx, fold, &acks, &cached
        ));
        match result {
            Ok((applied, released)) => {
                for (rider, released) in riders.into_iter().zip(released) {
                    let _ = rider.done.send(Ok(released));
                }
                Ok(applied)
            }
            Err(e) => {
                // The acknowledgements do not share the fold's failure.
                for rider in riders {
                    let _ = rider.done.send(self.apply_acks(&rider.acks).await);
                }
                Err(e)
            }
        }
    }

    async fn ride(&self, acks: &[OutboxAck]) -> R<Vec<Released>> {
        let (done, mut answer) = tokio::sync::oneshot::channel();
        let id = self.rider_ids.fetch_add(1, Ordering::Relaxed);
        self.riders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Rider {
                id,
                acks: acks.to_vec(),
                done,
            });
        let released = match tokio::time::timeout(ACK_RIDE, &mut answer).await {
            Ok(carried) => carried.map_err(|_| gone_rider())??,
            Err(_) => {
                let mine = {
                    let mut riders = self.riders.lock().unwrap_or_else(|p| p.into_inner());
                    let at = riders.iter().position(|r| r.id == id);
                    at.map(|at| riders.remove(at))
                };
                match mine {
                    Some(_) => self.apply_acks(acks).await?,
                    // A fold took it as the wait ended: its answer comes.
                    None => answer.await.map_err(|_| gone_rider())??,
                }
            }
        };
        // The fold that carried it was not made durable on its own.
        self.backend.sync().await?;
        Ok(released)
    }

    async fn prune_jobs(&self, cutoff_ms: u64) -> R<Vec<JobId>> {
        let mut pruned = Vec::new();
        for id in self.backend.prunable(cutoff_ms).await? {
            let forgotten = transact!(self, Durability::Now, |tx| ops::forget_job(
                tx, &id, cutoff_ms
            ))?;
            if forgotten {
                self.specs().remove(id.as_str());
                pruned.push(JobId::from(id));
            }
        }
        Ok(pruned)
    }

    async fn read_watermark(&self) -> R<Watermark> {
        let generation = self.backend.generation().await?;
        let jobs = self.backend.jobs(None).await?;
        // Pruned jobs were finished ones: they still count.
        let pruned = self.backend.pruned().await?;
        let mark = Watermark {
            generation,
            jobs: jobs.len() as u64 + pruned,
            finished: jobs.iter().filter(|j| j.state().is_final()).count() as u64 + pruned,
        };
        // What was read may include a commit not yet durable; a marker
        // must never claim more than is on disk, or a crash would make the
        // next start refuse a sound store.
        self.backend.sync().await?;
        Ok(mark)
    }
}

impl<B: Backend> Store for Stored<B> {
    fn create_job<'a>(
        &'a self,
        spec: &'a Arc<JobSpec>,
        record: JobRecord,
    ) -> StoreFuture<'a, Created> {
        Box::pin(async move {
            let bytes = super::encode(&**spec)?;
            let created = transact!(self, Durability::Now, |tx| ops::create_job(
                tx, &record, &bytes
            ))?;
            if matches!(created, Created::New(_)) {
                self.specs().insert(spec.id.clone(), spec.clone());
            }
            Ok(created)
        })
    }

    fn job<'a>(&'a self, id: &'a JobId) -> StoreFuture<'a, Option<JobRecord>> {
        Box::pin(async move { read!(self, |tx| tx.job(id.as_str())) })
    }

    fn jobs(&self) -> StoreFuture<'_, Vec<JobRecord>> {
        Box::pin(self.backend.jobs(None))
    }

    fn jobs_of<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<JobRecord>> {
        Box::pin(self.backend.jobs(Some(token)))
    }

    fn spec<'a>(&'a self, id: &'a JobId) -> StoreFuture<'a, Option<Arc<JobSpec>>> {
        Box::pin(self.read_spec(id))
    }

    fn update_job<'a>(
        &'a self,
        id: &'a JobId,
        change: JobChange,
    ) -> StoreFuture<'a, Option<JobRecord>> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::update_job(
                tx,
                id.as_str(),
                &change
            ))
        })
    }

    fn failures<'a>(
        &'a self,
        job_id: &'a JobId,
        limit: usize,
    ) -> StoreFuture<'a, (Vec<PairFailure>, bool)> {
        Box::pin(self.backend.failures(job_id.as_str(), limit))
    }

    fn start_batch<'a>(
        &'a self,
        job_id: &'a JobId,
        shape: Shape,
    ) -> StoreFuture<'a, Option<BatchRecord>> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::start_batch(
                tx,
                job_id.as_str(),
                shape
            ))
        })
    }

    fn batch_sent<'a>(
        &'a self,
        job_id: &'a JobId,
        no: u32,
        event_id: &'a EventId,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::batch_sent(
                tx,
                job_id.as_str(),
                no,
                event_id.as_str()
            ))
        })
    }

    fn return_batch<'a>(
        &'a self,
        job_id: &'a JobId,
        no: u32,
        shape: Shape,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::return_batch(
                tx,
                job_id.as_str(),
                no,
                shape
            ))
        })
    }

    fn withdraw_batch<'a>(&'a self, job_id: &'a JobId, no: u32) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::withdraw_batch(
                tx,
                job_id.as_str(),
                no
            ))
        })
    }

    fn schedule_poll<'a>(&'a self, job_id: &'a JobId, no: u32, at_ms: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::schedule_poll(
                tx,
                job_id.as_str(),
                no,
                at_ms
            ))
        })
    }

    fn batch<'a>(&'a self, job_id: &'a JobId, no: u32) -> StoreFuture<'a, Option<BatchRecord>> {
        Box::pin(async move { read!(self, |tx| tx.batch(job_id.as_str(), no)) })
    }

    fn batches_of<'a>(&'a self, job_id: &'a JobId) -> StoreFuture<'a, Vec<BatchRecord>> {
        Box::pin(async move { read!(self, |tx| tx.batches_of(job_id.as_str())) })
    }

    fn open_batches<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<BatchRecord>> {
        Box::pin(self.backend.open_batches(token))
    }

    fn event<'a>(&'a self, event_id: &'a EventId) -> StoreFuture<'a, Option<EventRef>> {
        Box::pin(async move { read!(self, |tx| tx.event(event_id.as_str())) })
    }

    fn fold(&self, fold: Fold) -> StoreFuture<'_, Vec<Applied>> {
        Box::pin(async move { self.apply_fold(&fold).await })
    }

    fn prune_finished(&self, cutoff_ms: u64) -> StoreFuture<'_, Vec<JobId>> {
        Box::pin(self.prune_jobs(cutoff_ms))
    }

    fn stats(&self) -> StoreFuture<'_, StoreStats> {
        Box::pin(self.backend.stats())
    }

    fn record_notification<'a>(
        &'a self,
        notification_id: &'a str,
        envelope: &'a [u8],
    ) -> StoreFuture<'a, Recorded> {
        Box::pin(self.backend.record_notification(notification_id, envelope))
    }

    fn inbox(&self, max: usize) -> StoreFuture<'_, Vec<InboxItem>> {
        Box::pin(self.backend.inbox(max))
    }

    fn inbox_len(&self) -> StoreFuture<'_, usize> {
        Box::pin(self.backend.inbox_len())
    }

    fn prune_seen(&self, cutoff_ms: u64) -> StoreFuture<'_, usize> {
        Box::pin(self.backend.prune_seen(cutoff_ms))
    }

    fn park_notifications<'a>(&'a self, items: &'a [(InboxId, EventId)]) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            if items.is_empty() {
                return Ok(0);
            }
            let at_ms = crate::domain::lifecycle::now_ms();
            transact!(self, Durability::Now, |tx| ops::park(tx, items, at_ms))
        })
    }

    fn expire_parked(&self, cutoff_ms: u64, max: usize) -> StoreFuture<'_, Vec<InboxItem>> {
        Box::pin(self.backend.expire_parked(cutoff_ms, max))
    }

    fn outbox(&self, max_commands: usize) -> StoreFuture<'_, Vec<OutboxItem>> {
        Box::pin(self.backend.outbox(max_commands))
    }

    fn ack_outbox<'a>(&'a self, acks: &'a [OutboxAck]) -> StoreFuture<'a, Vec<Released>> {
        Box::pin(async move {
            if self.backend.ride_acks() {
                self.ride(acks).await
            } else {
                self.apply_acks(acks).await
            }
        })
    }

    fn watermark(&self) -> StoreFuture<'_, Watermark> {
        Box::pin(self.read_watermark())
    }

    fn meta<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move { read!(self, |tx| tx.meta(key)) })
    }

    fn put_meta<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move { transact!(self, Durability::Now, |tx| tx.put_meta(key, value)) })
    }

    fn license<'a>(
        &'a self,
        token: &'a str,
        adam_id: &'a str,
        pricing_param: &'a str,
    ) -> StoreFuture<'a, Option<LicenseRecord>> {
        Box::pin(async move {
            let key = (
                token.to_string(),
                adam_id.to_string(),
                pricing_param.to_string(),
            );
            read!(self, |tx| tx.license(&key))
        })
    }

    fn licenses<'a>(
        &'a self,
        token: &'a str,
    ) -> StoreFuture<'a, Vec<(String, String, LicenseRecord)>> {
        Box::pin(self.backend.licenses(token))
    }

    fn put_license<'a>(
        &'a self,
        token: &'a str,
        adam_id: &'a str,
        pricing_param: &'a str,
        record: &'a LicenseRecord,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = (
                token.to_string(),
                adam_id.to_string(),
                pricing_param.to_string(),
            );
            transact!(self, Durability::Now, |tx| ops::put_license(
                tx, &key, record
            ))
        })
    }

    fn user<'a>(
        &'a self,
        token: &'a str,
        client_user_id: &'a str,
    ) -> StoreFuture<'a, Option<UserRecord>> {
        Box::pin(async move { read!(self, |tx| tx.user(token, client_user_id)) })
    }

    fn put_token<'a>(&'a self, record: &'a TokenRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move { transact!(self, Durability::Now, |tx| tx.put_token(record)) })
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(self.backend.tokens())
    }

    fn delete_token<'a>(&'a self, name: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move { transact!(self, Durability::Now, |tx| tx.remove_token(name)) })
    }

    fn put_token_state<'a>(&'a self, name: &'a str, state: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(
            async move { transact!(self, Durability::Now, |tx| tx.put_token_state(name, state)) },
        )
    }

    fn token_states(&self) -> StoreFuture<'_, Vec<(String, String)>> {
        Box::pin(self.backend.token_states())
    }

    fn users<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<UserRecord>> {
        Box::pin(self.backend.users(token))
    }

    fn held<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<OutboxItem>> {
        Box::pin(self.backend.held(token))
    }

    fn settle_held<'a>(
        &'a self,
        token: &'a str,
        release: &'a [OutboxAck],
        drop: &'a [OutboxAck],
    ) -> StoreFuture<'a, Settled> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::settle_held(
                tx, token, release, drop
            ))
        })
    }

    fn users_ready<'a>(
        &'a self,
        job_id: &'a JobId,
        invitations: &'a [(String, String)],
        associated: &'a [u32],
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::users_ready(
                tx,
                job_id.as_str(),
                invitations,
                associated
            ))
        })
    }

    fn drift<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Option<DriftRecord>> {
        Box::pin(async move { read!(self, |tx| tx.drift(token)) })
    }

    fn update_drift<'a>(
        &'a self,
        token: &'a str,
        change: DriftChange,
    ) -> StoreFuture<'a, DriftCounted> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::update_drift(
                tx, token, &change
            ))
        })
    }

    fn take_leases<'a>(
        &'a self,
        names: &'a [String],
        holder: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(self.backend.take_leases(names, holder, ttl))
    }

    fn release_leases<'a>(
        &'a self,
        names: &'a [String],
        holder: &'a str,
        linger: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.backend.release_leases(names, holder, linger))
    }

    fn leases(&self) -> StoreFuture<'_, Vec<Lease>> {
        Box::pin(self.backend.leases())
    }

    fn meta_or_insert<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, String> {
        Box::pin(async move {
            transact!(self, Durability::Now, |tx| ops::meta_or_insert(
                tx, key, value
            ))
        })
    }
}
