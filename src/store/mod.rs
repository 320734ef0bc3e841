//! The durable state of vppd behind one trait, [`Store`]: the seam between
//! the pipeline and the database that keeps it.
//!
//! Every method is one domain-level operation, atomic inside the backend,
//! and **a call that returns `Ok` has been made durable**: callers never
//! flush, and every promise made to the outside (a 202 for a job, a 200 for
//! a notification, an Apple POST about to leave, commands about to be
//! delivered) follows a returned call. A call that returns `Err` may or may
//! not have been applied, as after a crash (a commit whose sync failed):
//! callers retry or reconcile, as they do after a restart. Where that is not
//! good enough the method says so ([`Store::record_notification`] records
//! nothing on `Err`).
//!
//! The decisions inside a change (a pair decided once, the tallies, the
//! outbox entries written in the confirming commit, completion) are made by
//! [`crate::lifecycle`], which a backend calls inside its own
//! read-modify-write transaction; a backend only loads, calls, and writes.
//!
//! What every backend must guarantee (the conformance suite,
//! `tests/store_conformance.rs`, checks each of them):
//! - atomicity: a change is applied whole or not at all, also against
//!   concurrent calls from other tasks (or, with a shared database, other
//!   processes): two commits that read and write the same job or batch are
//!   serialized, none overwrites the other;
//! - durability on return, as above, and after reopening;
//! - order: jobs in creation order; inbox and outbox oldest first;
//! - identity: a notificationId is recorded once; an install command is
//!   acknowledged by identity and counted once.
//!
//! Keys are typed (job id, batch number, eventId, inbox and outbox ids);
//! how a backend lays them out is its own business.

pub mod postgres;
mod records;
pub mod sled;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use records::{
    Created, Decide, Fold, InboxId, InboxItem, Lease, LicenseDelta, LicenseRecord, OutboxAck,
    OutboxId, OutboxItem, PairFailure, Recorded, Released,
};

/// Users are stored as Apple last reported them.
pub use crate::report::UserRecord;

use crate::job::JobSpec;
use crate::lifecycle::{
    Applied, BatchRecord, DriftChange, DriftCounted, DriftRecord, EventRef, JobChange, JobRecord,
};
use crate::plan::Shape;

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

/// Opens the store the daemon runs on, in `dir`. The one place that picks a
/// backend.
pub fn open(dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(sled::SledStore::open(dir)?))
}

/// Opens the store `[store]` names: sled in `data_dir`, or the PostgreSQL
/// database whose URL is in `url_file`, its schema created or migrated.
pub async fn open_configured(
    config: &crate::config::StoreConfig,
    data_dir: &Path,
) -> Result<Arc<dyn Store>, StoreError> {
    match &config.kind {
        crate::config::StoreKind::Sled => open(data_dir),
        crate::config::StoreKind::Postgres { url_file } => {
            let url = crate::config::read_secret_file("store URL", url_file).map_err(|e| {
                StoreError::Connect {
                    url_file: url_file.display().to_string(),
                    source: Box::new(e),
                }
            })?;
            let origin = url_file.display().to_string();
            Ok(Arc::new(
                postgres::PostgresStore::open(&url, &origin).await?,
            ))
        }
    }
}

/// The durable state of vppd. Object safe: tasks share an `Arc<dyn Store>`.
pub trait Store: Send + Sync + 'static {
    // ---- Jobs --------------------------------------------------------------

    /// Stores a new job, its record and spec together, giving it the next
    /// place in creation order. A job with the same id and the same spec
    /// hash is `Existing` (nothing written); another spec is a `Conflict`.
    fn create_job<'a>(&'a self, spec: &'a JobSpec, record: JobRecord) -> StoreFuture<'a, Created>;

    fn job<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<JobRecord>>;

    /// Every job, in creation order.
    fn jobs(&self) -> StoreFuture<'_, Vec<JobRecord>>;

    /// A job's spec (written once, with the job; may be cached).
    fn spec<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<Arc<JobSpec>>>;

    /// Applies one [`JobChange`]; the job as it is afterwards, `None` when
    /// there is no such job.
    fn update_job<'a>(
        &'a self,
        id: &'a str,
        change: JobChange,
    ) -> StoreFuture<'a, Option<JobRecord>>;

    /// Failed pairs of a job in batch and pair order, at most `limit`, and
    /// whether more exist.
    fn failures<'a>(
        &'a self,
        job_id: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, (Vec<PairFailure>, bool)>;

    // ---- Batches and events ------------------------------------------------

    /// Takes the job's next batch off its plan and records it `Sending`
    /// ([`JobRecord::start_batch`]), in one commit with the job.
    fn start_batch<'a>(
        &'a self,
        job_id: &'a str,
        shape: Shape,
    ) -> StoreFuture<'a, Option<BatchRecord>>;

    /// Apple took batch `no` and answered `event_id`: records the event, so
    /// that notifications find their batch, with the batch and job
    /// ([`JobRecord::batch_sent`]). False when the transition did not apply.
    fn batch_sent<'a>(
        &'a self,
        job_id: &'a str,
        no: u32,
        event_id: &'a str,
    ) -> StoreFuture<'a, bool>;

    /// Puts a refused batch back into the plan and deletes its record
    /// ([`JobRecord::return_batch`]).
    fn return_batch<'a>(&'a self, job_id: &'a str, no: u32, shape: Shape) -> StoreFuture<'a, bool>;

    /// Withdraws the `Sending` batch of a canceled job once it is reconciled
    /// ([`JobRecord::withdraw_batch`]).
    fn withdraw_batch<'a>(&'a self, job_id: &'a str, no: u32) -> StoreFuture<'a, bool>;

    /// When the tracker should next ask Apple about batch `no`.
    fn schedule_poll<'a>(&'a self, job_id: &'a str, no: u32, at_ms: u64) -> StoreFuture<'a, ()>;

    fn batch<'a>(&'a self, job_id: &'a str, no: u32) -> StoreFuture<'a, Option<BatchRecord>>;

    /// Every batch of a job, in batch order.
    fn batches_of<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Vec<BatchRecord>>;

    /// Batches of a token still `Sending` or `Sent`, without scanning
    /// finished jobs.
    fn open_batches<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<BatchRecord>>;

    /// Which batch an eventId belongs to.
    fn event<'a>(&'a self, event_id: &'a str) -> StoreFuture<'a, Option<EventRef>>;

    /// Commits decisions for several batches, license and user reports, and
    /// the inbox items they came from, all at once: one durable commit for a
    /// run of notifications. Returns what each [`Decide`] changed, in order
    /// (a batch or job that does not exist changes nothing).
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

    // ---- Outbox ------------------------------------------------------------

    /// Outbox entries oldest first, until they hold at least `max_commands`
    /// commands (or the outbox ends).
    fn outbox(&self, max_commands: usize) -> StoreFuture<'_, Vec<OutboxItem>>;

    /// Releases acknowledged commands by identity and moves their jobs'
    /// counters ([`JobRecord::released`]) in one commit. Commands no longer
    /// in the outbox (another releaser's, or an entry of a job that is gone)
    /// are not counted.
    fn ack_outbox<'a>(&'a self, acks: &'a [OutboxAck]) -> StoreFuture<'a, Vec<Released>>;

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
