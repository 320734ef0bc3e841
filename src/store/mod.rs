//! The durable state of vppd behind one trait, [`Store`]: the seam between
//! the pipeline and the database that keeps it.
//!
//! Every method is one domain-level operation, atomic inside the backend,
//! and **a call that returns `Ok` has been made durable** (one exception,
//! [`Store::fold`], says why it may be): callers never flush, and every
//! promise made to the outside (a 202 for a job, a 200 for a notification,
//! an Apple POST about to leave, commands about to be delivered) follows a
//! returned call. A call that returns `Err` may or may not have been
//! applied, as after a crash (a commit whose sync failed): callers retry or
//! reconcile, as they do after a restart. Where that is not good enough the
//! method says so ([`Store::record_notification`] records nothing on
//! `Err`).
//!
//! The layers, lowest first:
//! - [`crate::domain::lifecycle`] makes the decisions inside a change (a pair
//!   decided once, the tallies, the outbox entries written in the
//!   confirming commit, completion);
//! - `ops` is every change written once: what it reads, which lifecycle
//!   transition it applies, what it writes, over a record-level
//!   transaction (`ops::Tx`) in one lock order;
//! - [`Stored`] is [`Store`] written once over a backend: it runs each
//!   change in the backend's transaction, retries it when the backend
//!   reports a conflict that may pass, commits it as durably as the change
//!   needs, and keeps what lives beside the records (the shared job specs,
//!   acknowledgements waiting to ride on a fold);
//! - a backend ([`sled`], [`postgres`]) keeps the records: their keys or
//!   tables, its transactions and locks, its scans, how a commit is made
//!   durable, and the few changes that are one statement of its own
//!   (recording a notification, leases, tokens, meta).
//!
//! What every backend must guarantee (the conformance suite,
//! `tests/conformance`, checks each of them, one test per check):
//! - atomicity: a change is applied whole or not at all, also against
//!   concurrent calls from other tasks (or, with a shared database, other
//!   processes): two commits that read and write the same job or batch are
//!   serialized, none overwrites the other;
//! - durability on return, as above, and after reopening;
//! - order: jobs in creation order; inbox and outbox oldest first;
//! - identity: a notificationId is recorded once; an install command is
//!   acknowledged by identity and counted once.
//!
//! Jobs, batches and events are named as the API names them: a job by its
//! [`JobId`], an Apple event by its [`EventId`], a batch by its job's id
//! and its number; inbox and outbox entries by the ids the store gave them
//! ([`InboxId`], [`OutboxId`]). How a backend lays them out is its own
//! business: below [`Stored`] they are the strings they wrap.

pub mod files;
mod leases;
pub mod marker;
mod ops;
pub mod postgres;
mod records;
pub mod sled;
mod stored;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use records::{
    Created, Decide, Fold, InboxId, InboxItem, Lease, LicenseDelta, LicenseRecord, OutboxAck,
    OutboxId, OutboxItem, PairFailure, Recorded, Released, Settled, StoreStats, TokenRecord,
};

pub use stored::Stored;

pub use crate::domain::ids::{EventId, JobId};

/// Users are stored as Apple last reported them.
pub use crate::domain::report::UserRecord;

use crate::domain::job::JobSpec;
use crate::domain::lifecycle::{
    Applied, BatchRecord, DriftChange, DriftCounted, DriftRecord, EventRef, JobChange, JobRecord,
};
use crate::domain::plan::Shape;

/// What a store method returns: boxed so that `dyn Store` works (a
/// PostgreSQL backend awaits its client inside without blocking the runtime).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The error of a backend, kept as a source without naming its type.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store at {path}: {source}; check that the directory is writable and that no other vppd uses it"
    )]
    Open { path: String, source: BackendError },
    #[error("store: {0}")]
    Backend(BackendError),
    #[error(
        "store in {data_dir} holds less than it must ({what}): it was damaged, truncated or replaced. Stop vppd, restore data_dir from a backup (docs/operator-guide.md, \"Backup and restore\"), or accept the loss and start on what is left with `vppd run --accept-store-loss`"
    )]
    WentBackwards { data_dir: String, what: String },
    #[error(
        "store in {data_dir} is damaged (the store engine failed: {message}). Stop vppd, restore data_dir from a backup (docs/operator-guide.md, \"Backup and restore\"), or move the damaged store aside, then start with `vppd run --accept-store-loss`"
    )]
    Damaged { data_dir: String, message: String },
    /// The shared database holds less than the watermark recorded in it
    /// ([`marker::check_shared`]): rows were deleted or tables emptied.
    #[error(
        "store: the PostgreSQL database (the URL in {url_file}) holds less than it must ({what}): rows or tables were deleted. Stop every replica, restore the database from a backup (docs/operator-guide.md, \"A database that lost rows\"), or accept the loss and start one replica with `vppd run --accept-store-loss`"
    )]
    DatabaseWentBackwards { url_file: String, what: String },
    #[error("store: record {key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("store: cannot make a commit durable: {0}")]
    Durability(String),
    #[error("store: cannot encode a record: {0}")]
    Encode(String),
    /// The database named by `[store] url_file` cannot be used. `source`
    /// never carries the URL (it holds the password).
    #[error(
        "store: PostgreSQL (the URL in {url_file}): {source}; check the URL, that the server runs and that the role may connect and create tables"
    )]
    Connect {
        url_file: String,
        source: BackendError,
    },
    #[error(
        "store: the database schema is at version {found}, newer than this vppd knows ({known}); run the newer vppd, or restore the database"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

/// A record as both backends keep it: JSON.
fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode(e.to_string()))
}

/// A record read back; `key` names it in the error.
fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    crate::domain::json::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// Opens the store the daemon runs on, in `dir`. The one place that picks a
/// backend. Checks it against the marker kept beside it ([`marker`]):
/// refuses a store that went backwards or vanished unless `accept_loss`.
pub async fn open(dir: &Path, accept_loss: bool) -> Result<Arc<dyn Store>, StoreError> {
    let existed = sled::SledStore::exists(dir);
    marker::check_present(dir, existed, accept_loss)?;
    if !existed {
        // A lost store must never start silently empty.
        tracing::warn!(data_dir = %dir.display(), "no store in data_dir: creating a new, empty one (if one was expected here, stop vppd and restore it)");
    }
    let store: Arc<dyn Store> = Arc::new(marker::guard_panics(dir, || sled::SledStore::open(dir))?);
    marker::check(dir, store.as_ref(), existed, accept_loss).await?;
    Ok(store)
}

/// Opens the PostgreSQL database at `url`, its schema created or migrated,
/// and checks it against the watermark kept in it; `origin` names where
/// the URL came from in errors (the URL itself holds the password).
/// `accept_loss` (`vppd run --accept-store-loss`) starts on a database that
/// holds less than its watermark says it must. Which of this and [`open`]
/// runs is `[store] kind`'s choice (`config::StoreConfig::open`).
pub async fn open_shared(
    url: &str,
    origin: &str,
    accept_loss: bool,
) -> Result<Arc<dyn Store>, StoreError> {
    let store: Arc<dyn Store> = Arc::new(postgres::PostgresStore::open(url, origin).await?);
    marker::check_shared(store.as_ref(), origin, accept_loss).await?;
    Ok(store)
}

/// The durable state of vppd. Object safe: tasks share an `Arc<dyn Store>`.
pub trait Store: Send + Sync + 'static {
    // ---- Jobs --------------------------------------------------------------

    /// Stores a new job, its record and spec together, giving it the next
    /// place in creation order. A job with the same id and the same spec
    /// hash is `Existing` (nothing written); another spec is a `Conflict`.
    /// A new job's spec is what [`Store::spec`] hands out from then on: the
    /// store keeps the one it was given rather than reading its own copy.
    fn create_job<'a>(
        &'a self,
        spec: &'a Arc<JobSpec>,
        record: JobRecord,
    ) -> StoreFuture<'a, Created>;

    fn job<'a>(&'a self, id: &'a JobId) -> StoreFuture<'a, Option<JobRecord>>;

    /// Every job, in creation order.
    fn jobs(&self) -> StoreFuture<'_, Vec<JobRecord>>;

    /// The jobs of one token, in creation order: [`Store::jobs`] with only
    /// `token`'s. A token's tasks read their jobs each time they wake, so
    /// with a thousand tokens this must not cost a decode of every job.
    fn jobs_of<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<JobRecord>>;

    /// A job's spec (written once, with the job). Every caller shares one
    /// copy: a million-device spec is tens of MB.
    fn spec<'a>(&'a self, id: &'a JobId) -> StoreFuture<'a, Option<Arc<JobSpec>>>;

    /// Applies one [`JobChange`]; the job as it is afterwards, `None` when
    /// there is no such job.
    fn update_job<'a>(
        &'a self,
        id: &'a JobId,
        change: JobChange,
    ) -> StoreFuture<'a, Option<JobRecord>>;

    /// Failed pairs of a job in batch and pair order, at most `limit`, and
    /// whether more exist.
    fn failures<'a>(
        &'a self,
        job_id: &'a JobId,
        limit: usize,
    ) -> StoreFuture<'a, (Vec<PairFailure>, bool)>;

    // ---- Batches and events ------------------------------------------------

    /// Takes the job's next batch off its plan and records it `Sending`
    /// ([`JobRecord::start_batch`]), in one commit with the job.
    fn start_batch<'a>(
        &'a self,
        job_id: &'a JobId,
        shape: Shape,
    ) -> StoreFuture<'a, Option<BatchRecord>>;

    /// Apple took batch `no` and answered `event_id`: records the event, so
    /// that notifications find their batch, with the batch and job
    /// ([`JobRecord::batch_sent`]). In the same commit, notifications parked
    /// under `event_id` ([`Store::park_notifications`]) go back into the
    /// inbox. False when the transition did not apply.
    fn batch_sent<'a>(
        &'a self,
        job_id: &'a JobId,
        no: u32,
        event_id: &'a EventId,
    ) -> StoreFuture<'a, bool>;

    /// Puts a refused batch back into the plan and deletes its record
    /// ([`JobRecord::return_batch`]).
    fn return_batch<'a>(
        &'a self,
        job_id: &'a JobId,
        no: u32,
        shape: Shape,
    ) -> StoreFuture<'a, bool>;

    /// Withdraws the `Sending` batch of a canceled job once it is reconciled
    /// ([`JobRecord::withdraw_batch`]).
    fn withdraw_batch<'a>(&'a self, job_id: &'a JobId, no: u32) -> StoreFuture<'a, bool>;

    /// When the tracker should next ask Apple about batch `no`.
    fn schedule_poll<'a>(&'a self, job_id: &'a JobId, no: u32, at_ms: u64) -> StoreFuture<'a, ()>;

    fn batch<'a>(&'a self, job_id: &'a JobId, no: u32) -> StoreFuture<'a, Option<BatchRecord>>;

    /// Every batch of a job, in batch order.
    fn batches_of<'a>(&'a self, job_id: &'a JobId) -> StoreFuture<'a, Vec<BatchRecord>>;

    /// Batches of a token still `Sending` or `Sent`, without scanning
    /// finished jobs.
    fn open_batches<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<BatchRecord>>;

    /// Which batch an eventId belongs to.
    fn event<'a>(&'a self, event_id: &'a EventId) -> StoreFuture<'a, Option<EventRef>>;

    /// Commits decisions for several batches, license and user reports, and
    /// the inbox items they came from, all at once: one commit for a run of
    /// notifications. Returns what each [`Decide`] changed, in order (a
    /// batch or job that does not exist changes nothing). With a shared
    /// database, a fold whose inbox items another applier took first is
    /// refused whole (`Err`, nothing applied): read the inbox again.
    ///
    /// Unlike the other methods it is not made durable on its own: the
    /// inbox items go with it, so a fold a crash loses is folded again from
    /// the durable inbox, and the backend keeps the changes it recovers
    /// a prefix of, so any later durable change makes this fold durable
    /// too. Everything a fold causes outside the store waits for such a
    /// later change (the release's acknowledgement, the submitter's next
    /// batch record); a backend whose every commit is durable (PostgreSQL)
    /// makes it durable on return anyway.
    fn fold(&self, fold: Fold) -> StoreFuture<'_, Vec<Applied>>;

    /// Decisions for one batch: [`Store::fold`] with one [`Decide`].
    fn decide(&self, decide: Decide) -> StoreFuture<'_, Applied> {
        Box::pin(async move {
            let fold = Fold {
                decide: vec![decide],
                ..Fold::default()
            };
            Ok(self.fold(fold).await?.pop().unwrap_or_default())
        })
    }

    // ---- Retention ---------------------------------------------------------

    /// Forgets every job [`JobRecord::expired`] at `cutoff_ms` that has no
    /// command left in the outbox, with all that is kept for it (spec,
    /// batches, their events, failures); returns their ids. A job's records
    /// go before the job itself, so a pruning cut short leaves the job to
    /// be pruned again next time: calling it again is always safe.
    fn prune_finished(&self, cutoff_ms: u64) -> StoreFuture<'_, Vec<JobId>>;

    /// The store's size on disk and its records by kind. Counts every
    /// record: call it every few minutes, not per request.
    fn stats(&self) -> StoreFuture<'_, StoreStats>;

    // ---- Inbox -------------------------------------------------------------

    /// Records a notification for the applier, deduplicated on its
    /// notificationId, in one commit. `Duplicate` is durable too: the first
    /// one's commit is. On `Err` nothing is recorded, so a sender's retry
    /// is not taken for a duplicate.
    fn record_notification<'a>(
        &'a self,
        notification_id: &'a str,
        envelope: &'a [u8],
    ) -> StoreFuture<'a, Recorded>;

    /// The oldest recorded notifications not yet applied, at most `max`.
    fn inbox(&self, max: usize) -> StoreFuture<'_, Vec<InboxItem>>;

    fn inbox_len(&self) -> StoreFuture<'_, usize>;

    /// Forgets notificationIds recorded before `cutoff_ms`; how many.
    fn prune_seen(&self, cutoff_ms: u64) -> StoreFuture<'_, usize>;

    /// Takes inbox items whose eventId is not (yet) recorded out of the
    /// inbox and keeps them under that eventId, where they cost the applier
    /// nothing, until [`Store::batch_sent`] records the event (they return
    /// to the inbox) or [`Store::expire_parked`] drops them. An item whose
    /// eventId is recorded by the time of the commit stays in the inbox, so
    /// none waits for an event that was recorded while it was being parked.
    /// Returns how many were parked.
    fn park_notifications<'a>(&'a self, items: &'a [(InboxId, EventId)]) -> StoreFuture<'a, usize>;

    /// Removes and returns notifications parked before `cutoff_ms`, oldest
    /// first, at most `max`: their events are taken not to be vppd's.
    fn expire_parked(&self, cutoff_ms: u64, max: usize) -> StoreFuture<'_, Vec<InboxItem>>;

    // ---- Outbox ------------------------------------------------------------

    /// Outbox entries oldest first, until they hold at least `max_commands`
    /// commands (or the outbox ends).
    fn outbox(&self, max_commands: usize) -> StoreFuture<'_, Vec<OutboxItem>>;

    /// Releases acknowledged commands by identity and moves their jobs'
    /// counters ([`JobRecord::released`]) in one commit. Commands no longer
    /// in the outbox (another releaser's, or an entry of a job that is gone)
    /// are not counted. Durable when it returns. Where a commit costs the
    /// same whatever it holds (sled), an acknowledgement made while
    /// notifications wait to be folded waits a few milliseconds for the
    /// next [`Store::fold`] and is committed with it, after that fold's
    /// decisions, or on its own when no fold comes.
    fn ack_outbox<'a>(&'a self, acks: &'a [OutboxAck]) -> StoreFuture<'a, Vec<Released>>;

    // ---- Integrity -----------------------------------------------------------

    /// What the store holds now, for the marker kept outside it: a value
    /// that never decreases while the store is intact (its generation), the
    /// number of jobs and of finished jobs. Reading it may advance the
    /// generation. The counts must never go down while the store is
    /// intact: a change that forgets finished jobs on purpose (pruning)
    /// keeps counting them here (e.g. a counter in meta, in the same
    /// commit), or the next start takes the pruning for a loss.
    fn watermark(&self) -> StoreFuture<'_, marker::Watermark>;

    // ---- Meta, licenses, users -------------------------------------------

    /// A small named value (per-token state, learned uIds).
    fn meta<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<String>>;

    fn put_meta<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, ()>;

    fn license<'a>(
        &'a self,
        token: &'a str,
        adam_id: &'a str,
        pricing_param: &'a str,
    ) -> StoreFuture<'a, Option<LicenseRecord>>;

    /// Every license record of a token, by (adamId, pricingParam).
    /// (A new method: a PostgreSQL backend lists its license rows of the
    /// token the same way.)
    fn licenses<'a>(
        &'a self,
        token: &'a str,
    ) -> StoreFuture<'a, Vec<(String, String, LicenseRecord)>>;

    fn put_license<'a>(
        &'a self,
        token: &'a str,
        adam_id: &'a str,
        pricing_param: &'a str,
        record: &'a LicenseRecord,
    ) -> StoreFuture<'a, ()>;

    fn user<'a>(
        &'a self,
        token: &'a str,
        client_user_id: &'a str,
    ) -> StoreFuture<'a, Option<UserRecord>>;

    // ---- Tokens ------------------------------------------------------------

    /// Adds or replaces the token named `record.name`, durably. The record
    /// holds an sToken: a backend keeps it out of logs and errors, and its
    /// files (or rows) readable by vppd alone.
    fn put_token<'a>(&'a self, record: &'a TokenRecord) -> StoreFuture<'a, ()>;

    /// Every stored token, by name.
    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>>;

    /// Forgets a stored token and its stored state; false when there was
    /// no token.
    fn delete_token<'a>(&'a self, name: &'a str) -> StoreFuture<'a, bool>;

    /// Stores a token's state (its token document, JSON) as the replica
    /// working it sees it, for the other replicas to show.
    fn put_token_state<'a>(&'a self, name: &'a str, state: &'a str) -> StoreFuture<'a, ()>;

    /// Every stored token state, by name.
    fn token_states(&self) -> StoreFuture<'_, Vec<(String, String)>>;
    /// Every user of a token as Apple last reported it, by clientUserId.
    fn users<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<UserRecord>>;

    /// Installs for user targets of a token, held until their user is
    /// `Associated` (written by the commit that confirmed them, see
    /// [`crate::domain::lifecycle::Decided::held`]), oldest first.
    fn held<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<OutboxItem>>;

    /// Moves held installs of `token`, by identity, to the outbox
    /// (`release`: their user is `Associated`) or drops them (`drop`: their
    /// user is retired; [`JobRecord::held_dropped`]), in one commit.
    /// Commands no longer held are neither moved nor counted.
    fn settle_held<'a>(
        &'a self,
        token: &'a str,
        release: &'a [OutboxAck],
        drop: &'a [OutboxAck],
    ) -> StoreFuture<'a, Settled>;

    /// The users step of a job is over ([`JobRecord::users_ready`]): records
    /// it and writes its `InviteToProgram` commands (clientUserId,
    /// invitationUrl) to the outbox, in one commit. False (nothing written)
    /// when there is no such job or the step was over already.
    fn users_ready<'a>(
        &'a self,
        job_id: &'a JobId,
        invitations: &'a [(String, String)],
        associated: &'a [u32],
    ) -> StoreFuture<'a, bool>;

    // ---- Drift -------------------------------------------------------------

    /// A token's drift as last recorded (`None` before vppd follows it).
    fn drift<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Option<DriftRecord>>;

    /// Applies one [`DriftChange`] to a token's drift
    /// ([`DriftRecord::apply`]) atomically: the applier and the token's
    /// drift follower may change it at the same time.
    fn update_drift<'a>(
        &'a self,
        token: &'a str,
        change: DriftChange,
    ) -> StoreFuture<'a, DriftCounted>;

    // ---- Replicas ----------------------------------------------------------

    /// Takes or renews, for `holder`, each lease of `names` that is free,
    /// expired or already `holder`'s, until `ttl` from now by the store's
    /// clock; returns the names `holder` holds now. A lease another holder
    /// keeps renewing is never taken.
    fn take_leases<'a>(
        &'a self,
        names: &'a [String],
        holder: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<String>>;

    /// Gives `holder`'s leases of `names` up: they expire `linger` from now,
    /// so that the next holder starts no sooner (the rate window of what
    /// this holder sent last has passed by then).
    fn release_leases<'a>(
        &'a self,
        names: &'a [String],
        holder: &'a str,
        linger: Duration,
    ) -> StoreFuture<'a, ()>;

    /// Every lease, expired ones included, by name.
    fn leases(&self) -> StoreFuture<'_, Vec<Lease>>;

    /// Stores `value` under `key` unless a value is there already; returns
    /// the value kept (the first writer's, whichever process it was).
    fn meta_or_insert<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, String>;
}
