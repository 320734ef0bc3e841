//! The embedded backend: sled trees on local disk, one process.
//!
//! Trees:
//! - `jobs`: job id -> [`JobRecord`] (state, counters, the unsent plan).
//! - `specs`: job id -> [`JobSpec`] (written once).
//! - `batches`: job id, 0, batch number -> [`BatchRecord`].
//! - `open`: batch key -> token, for every batch `Sending` or `Sent` (so the
//!   trackers never scan finished jobs).
//! - `events`: Apple eventId -> [`EventRef`].
//! - `seen`: notificationId -> receive time (dedupe).
//! - `inbox`: id -> a recorded notification not yet applied.
//! - `parked`: eventId -> the notifications for that eventId that arrived
//!   before it was recorded (or that belong to no event of vppd's), as
//!   [`encode_parked`] lays them out; `batch_sent` moves them back into the
//!   inbox in its own commit.
//! - `parked_at`: park time, inbox id -> eventId: the expiry order.
//! - `outbox`: id -> [`OutboxEntry`], install commands not yet acknowledged.
//! - `failures`: job id, 0, batch number, pair -> [`FailureRecord`].
//! - `meta`: small named values. `licenses`, `users`: per token.
//! - `held`: token, 0, id -> [`OutboxEntry`], installs for user targets
//!   waiting for their user to be `Associated`.
//! - `ids`: sled's id generator, for creation order and inbox/outbox ids.
//!
//! `[store] retain_finished` removes a finished job from `jobs`, `specs`,
//! `batches`, `open`, `events` and `failures` ([`Store::prune_finished`]).
//!
//! Durability: a change is one sled transaction (the listener's record:
//! two plain writes), then a flush. Flushes are group commits: every caller
//! that arrives while one runs shares the next, so concurrent commits cost
//! one fsync together. Sequential callers that commit a lot (the applier)
//! pass many changes in one call instead. A fold is not flushed on its own
//! ([`Store::fold`] says why that is safe); the next flush, sled's own
//! every 200 ms, or the one when the store closes covers it. An outbox
//! acknowledgement made while notifications wait is carried by the next
//! fold's transaction (`ack_outbox`), then flushed: a sled transaction
//! writes the log twice whatever it holds.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    Created, Fold, InboxId, InboxItem, Lease, LicenseRecord, OutboxAck, OutboxId, OutboxItem,
    PairFailure, Recorded, Released, Settled, Store, StoreError, StoreFuture, TokenRecord,
    UserRecord,
};
use crate::job::{JobSpec, RequestType};
use crate::lifecycle::{
    Applied, AssetRef, BatchRecord, DriftChange, DriftCounted, DriftRecord, EventRef,
    FailureRecord, JobChange, JobRecord, OutboxEntry, now_ms, push_outbox,
};
use crate::plan::Shape;

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Backend(Box::new(e)),
        }
    }
}

/// The store holds sTokens: its directories are vppd's alone (0700), its
/// files 0600, whatever the umask was.
fn restrict_permissions(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fn walk(path: &Path) -> std::io::Result<()> {
            let meta = std::fs::symlink_metadata(path)?;
            if meta.is_dir() {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
                for entry in std::fs::read_dir(path)? {
                    walk(&entry?.path())?;
                }
            } else if meta.is_file() {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(())
        }
        walk(dir)?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

fn batch_key(job_id: &str, no: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(job_id.len() + 5);
    k.extend_from_slice(job_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&no.to_be_bytes());
    k
}

fn job_prefix(job_id: &str) -> Vec<u8> {
    let mut k = job_id.as_bytes().to_vec();
    k.push(0);
    k
}

fn failure_key(job_id: &str, no: u32, pair: u32) -> Vec<u8> {
    let mut k = batch_key(job_id, no);
    k.extend_from_slice(&pair.to_be_bytes());
    k
}

fn license_key(token: &str, adam_id: &str, pricing: &str) -> String {
    format!("{token}\0{adam_id}\0{pricing}")
}

fn user_key(token: &str, client_user_id: &str) -> String {
    format!("{token}\0{client_user_id}")
}

fn held_key(token: &str, id: u64) -> Vec<u8> {
    let mut k = held_prefix(token);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn held_prefix(token: &str) -> Vec<u8> {
    let mut k = token.as_bytes().to_vec();
    k.push(0);
    k
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode(e.to_string()))
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    crate::json::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        message: e.to_string(),
    })
}

/// In the `ids` tree: how many finished jobs retention has forgotten.
const PRUNED_KEY: &[u8] = b"pruned_jobs";

/// The count under [`PRUNED_KEY`], as stored (absent: none pruned yet).
fn pruned_count(stored: Option<::sled::IVec>) -> u64 {
    stored
        .and_then(|b| b.as_ref().try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Bytes of the files under `dir`, subdirectories included; what cannot be
/// read counts nothing (a file sled removes meanwhile, for instance).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A notification waiting for its event to be recorded.
struct Parked {
    id: u64,
    at_ms: u64,
    envelope: Vec<u8>,
}

fn parked_at_key(at_ms: u64, id: u64) -> Vec<u8> {
    let mut k = at_ms.to_be_bytes().to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Binary, not JSON: envelopes are bytes, and a foreign event may collect
/// many of them. Per entry: id, park time (u64 BE), length (u32 BE), bytes.
fn encode_parked(entries: &[Parked]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in entries {
        out.extend_from_slice(&p.id.to_be_bytes());
        out.extend_from_slice(&p.at_ms.to_be_bytes());
        out.extend_from_slice(&(p.envelope.len() as u32).to_be_bytes());
        out.extend_from_slice(&p.envelope);
    }
    out
}

fn decode_parked(key: &[u8], mut bytes: &[u8]) -> Result<Vec<Parked>, StoreError> {
    let corrupt = || StoreError::Corrupt {
        key: format!("parked/{}", String::from_utf8_lossy(key)),
        message: "truncated parked notification".to_string(),
    };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (head, rest) = bytes.split_at_checked(20).ok_or_else(corrupt)?;
        let id = u64::from_be_bytes(head[..8].try_into().map_err(|_| corrupt())?);
        let at_ms = u64::from_be_bytes(head[8..16].try_into().map_err(|_| corrupt())?);
        let len = u32::from_be_bytes(head[16..20].try_into().map_err(|_| corrupt())?) as usize;
        let (envelope, rest) = rest.split_at_checked(len).ok_or_else(corrupt)?;
        out.push(Parked {
            id,
            at_ms,
            envelope: envelope.to_vec(),
        });
        bytes = rest;
    }
    Ok(out)
}

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn id_of(key: &[u8]) -> u64 {
    key.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// The trees of one transaction, with typed access.
struct Tx<'a> {
    jobs: &'a TransactionalTree,
    specs: &'a TransactionalTree,
    batches: &'a TransactionalTree,
    open: &'a TransactionalTree,
    events: &'a TransactionalTree,
    inbox: &'a TransactionalTree,
    outbox: &'a TransactionalTree,
    failures: &'a TransactionalTree,
    ids: &'a TransactionalTree,
    licenses: &'a TransactionalTree,
    users: &'a TransactionalTree,
    held: &'a TransactionalTree,
    parked: &'a TransactionalTree,
    parked_at: &'a TransactionalTree,
}

impl Tx<'_> {
    fn get<T: DeserializeOwned>(tree: &TransactionalTree, key: &[u8]) -> TxResult<Option<T>> {
        match tree.get(key)? {
            Some(bytes) => match decode(key, &bytes) {
                Ok(v) => Ok(Some(v)),
                Err(e) => abort(e),
            },
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(tree: &TransactionalTree, key: &[u8], value: &T) -> TxResult<()> {
        match encode(value) {
            Ok(bytes) => {
                tree.insert(key, bytes)?;
                Ok(())
            }
            Err(e) => abort(e),
        }
    }

    fn job(&self, id: &str) -> TxResult<Option<JobRecord>> {
        Self::get(self.jobs, id.as_bytes())
    }

    fn put_job(&self, job: &JobRecord) -> TxResult<()> {
        Self::put(self.jobs, job.id().as_bytes(), job)
    }

    fn batch(&self, job_id: &str, no: u32) -> TxResult<Option<BatchRecord>> {
        Self::get(self.batches, &batch_key(job_id, no))
    }

    /// Writes a batch and keeps the open-batch index in step with it.
    fn put_batch(&self, batch: &BatchRecord) -> TxResult<()> {
        let key = batch_key(batch.job_id(), batch.no());
        if batch.state().is_open() {
            self.open.insert(key.as_slice(), batch.token().as_bytes())?;
        } else {
            self.open.remove(key.as_slice())?;
        }
        Self::put(self.batches, &key, batch)
    }

    fn remove_batch(&self, job_id: &str, no: u32) -> TxResult<()> {
        let key = batch_key(job_id, no);
        self.batches.remove(key.as_slice())?;
        self.open.remove(key.as_slice())?;
        Ok(())
    }

    /// A new id, unique and increasing across restarts. sled hands these
    /// out without a shared key, so concurrent transactions never conflict
    /// over it (a retried transaction just skips a number).
    fn next_id(&self) -> TxResult<u64> {
        Ok(self.ids.generate_id()?)
    }

    fn add_outbox(&self, entry: &OutboxEntry) -> TxResult<()> {
        let id = self.next_id()?;
        Self::put(self.outbox, &id.to_be_bytes(), entry)
    }

    fn add_held(&self, token: &str, entry: &OutboxEntry) -> TxResult<()> {
        let id = self.next_id()?;
        Self::put(self.held, &held_key(token, id), entry)
    }

    /// Loads a job and one of its batches, applies `f`, and writes both back
    /// when `f` says it changed them.
    /// Moves the notifications parked under `event_id` back into the inbox,
    /// under their old ids (so they keep their place in arrival order).
    fn unpark(&self, event_id: &str) -> TxResult<()> {
        let Some(bytes) = self.parked.remove(event_id.as_bytes())? else {
            return Ok(());
        };
        for p in decode_parked(event_id.as_bytes(), &bytes)
            .map_err(ConflictableTransactionError::Abort)?
        {
            self.parked_at
                .remove(parked_at_key(p.at_ms, p.id).as_slice())?;
            self.inbox.insert(&p.id.to_be_bytes(), p.envelope)?;
        }
        Ok(())
    }

    fn with_job_and_batch<T>(
        &self,
        job_id: &str,
        no: u32,
        f: impl Fn(&mut JobRecord, &mut BatchRecord) -> (bool, T),
    ) -> TxResult<Option<T>> {
        let (Some(mut job), Some(mut batch)) = (self.job(job_id)?, self.batch(job_id, no)?) else {
            return Ok(None);
        };
        let (changed, out) = f(&mut job, &mut batch);
        if changed {
            self.put_batch(&batch)?;
            self.put_job(&job)?;
        }
        Ok(Some(out))
    }
}

type FlushReply = tokio::sync::oneshot::Sender<Result<(), String>>;

fn gone_rider() -> StoreError {
    StoreError::Backend("an acknowledgement's fold ended without an answer".into())
}

/// The group-commit thread. When the store goes, it closes the channel and
/// joins the thread, so the database (and its file lock) is released by the
/// time the store is dropped: a restart in the same process can open it
/// again at once.
struct Flusher {
    tx: Mutex<Option<std::sync::mpsc::Sender<FlushReply>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Flusher {
    fn start(db: ::sled::Db) -> std::io::Result<Flusher> {
        let (tx, rx) = std::sync::mpsc::channel::<FlushReply>();
        // Group commit: every waiter that arrives while a flush runs shares
        // the next one, so concurrent commits cost one fsync together.
        let thread = std::thread::Builder::new()
            .name("vppd-flush".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    while let Ok(w) = rx.try_recv() {
                        waiters.push(w);
                    }
                    let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
                // The store is closing: whatever was not flushed (a last
                // fold) is made durable now rather than redone at start.
                if let Err(error) = db.flush() {
                    tracing::warn!(%error, "cannot flush the store while closing it");
                }
            })?;
        Ok(Flusher {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Resolves once everything written before the call is on disk.
    async fn durable(&self) -> Result<(), StoreError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        {
            let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            let sent = tx.as_ref().map(|tx| tx.send(reply).is_ok());
            if sent != Some(true) {
                return Err(StoreError::Durability(
                    "the flush thread has stopped".into(),
                ));
            }
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Durability(e)),
            Err(_) => Err(StoreError::Durability(
                "the flush thread has stopped".into(),
            )),
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Damage sled detects is [`StoreError::Damaged`] (an operator must
/// restore or accept the loss); anything else (a lock, permissions) is an
/// open error to fix and retry.
fn open_failed(dir: &Path, e: ::sled::Error) -> StoreError {
    match e {
        ::sled::Error::Corruption { .. }
        | ::sled::Error::Unsupported(_)
        | ::sled::Error::ReportableBug(_) => StoreError::Damaged {
            data_dir: dir.display().to_string(),
            message: e.to_string(),
        },
        e => StoreError::Open {
            path: dir.display().to_string(),
            source: Box::new(e),
        },
    }
}

/// The sled backend of [`Store`].
pub struct SledStore {
    jobs: ::sled::Tree,
    specs: ::sled::Tree,
    batches: ::sled::Tree,
    open: ::sled::Tree,
    events: ::sled::Tree,
    seen: ::sled::Tree,
    inbox: ::sled::Tree,
    outbox: ::sled::Tree,
    failures: ::sled::Tree,
    meta: ::sled::Tree,
    ids: ::sled::Tree,
    licenses: ::sled::Tree,
    users: ::sled::Tree,
    tokens: ::sled::Tree,
    token_states: ::sled::Tree,
    held: ::sled::Tree,
    parked: ::sled::Tree,
    parked_at: ::sled::Tree,
    /// For its id generator (the watermark's generation).
    db: ::sled::Db,
    spec_cache: Mutex<HashMap<String, Arc<JobSpec>>>,
    /// Each job record as last decoded, with the bytes it was decoded
    /// from: a record whose bytes have not changed is not decoded again
    /// (see [`SledStore::read_jobs`]).
    job_cache: Mutex<HashMap<::sled::IVec, (::sled::IVec, JobRecord)>>,
    /// Leases live in memory: sled is one process's store (it locks the
    /// directory), so every lease is this process's.
    leases: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// Where sled keeps its files, for [`Store::stats`].
    path: std::path::PathBuf,
    /// Acknowledgements waiting for a fold to carry them (`ack_outbox`).
    riders: Mutex<Vec<Rider>>,
    rider_ids: std::sync::atomic::AtomicU64,
    // Last: dropped after the trees, it joins the thread holding the db.
    flusher: Flusher,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

impl SledStore {
    /// Whether a store was ever created in `dir`.
    pub fn exists(dir: &Path) -> bool {
        dir.join("db").exists()
    }

    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let open_error = |source: super::BackendError| StoreError::Open {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_error(Box::new(e)))?;
        let db = ::sled::Config::new()
            .path(dir.join("db"))
            // The working set is small (batch records, not pairs); a modest
            // cache keeps the daemon's memory flat.
            .cache_capacity(16 << 20)
            .flush_every_ms(Some(200))
            .open()
            .map_err(|e| open_failed(dir, e))?;
        restrict_permissions(dir).map_err(|e| open_error(Box::new(e)))?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| open_failed(dir, e));
        Ok(SledStore {
            jobs: tree("jobs")?,
            specs: tree("specs")?,
            batches: tree("batches")?,
            open: tree("open")?,
            events: tree("events")?,
            seen: tree("seen")?,
            inbox: tree("inbox")?,
            outbox: tree("outbox")?,
            failures: tree("failures")?,
            meta: tree("meta")?,
            ids: tree("ids")?,
            licenses: tree("licenses")?,
            users: tree("users")?,
            tokens: tree("tokens")?,
            token_states: tree("token_states")?,
            held: tree("held")?,
            parked: tree("parked")?,
            parked_at: tree("parked_at")?,
            db: db.clone(),
            spec_cache: Mutex::new(HashMap::new()),
            job_cache: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            path: dir.join("db"),
            riders: Mutex::new(Vec::new()),
            rider_ids: std::sync::atomic::AtomicU64::new(0),
            flusher: Flusher::start(db.clone()).map_err(|e| open_error(Box::new(e)))?,
        })
    }

    /// Runs `f` as one serializable transaction over the state trees.
    fn tx<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
        let trees = (
            &self.jobs,
            &self.specs,
            &self.batches,
            &self.open,
            &self.events,
            &self.inbox,
            &self.outbox,
            &self.failures,
            &self.ids,
            &self.licenses,
            &self.users,
            &self.held,
            &self.parked,
            &self.parked_at,
        );
        let r = ::sled::Transactional::transaction(
            &trees,
            |(
                jobs,
                specs,
                batches,
                open,
                events,
                inbox,
                outbox,
                failures,
                ids,
                licenses,
                users,
                held,
                parked,
                parked_at,
            )| {
                f(&Tx {
                    jobs,
                    specs,
                    batches,
                    open,
                    events,
                    inbox,
                    outbox,
                    failures,
                    ids,
                    licenses,
                    users,
                    held,
                    parked,
                    parked_at,
                })
            },
        );
        Ok(r?)
    }

    /// A transaction, made durable before it returns.
    async fn commit<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
        let out = self.tx(f)?;
        self.flusher.durable().await?;
        Ok(out)
    }

    fn read<T: DeserializeOwned>(tree: &::sled::Tree, key: &[u8]) -> Result<Option<T>, StoreError> {
        match tree.get(key)? {
            Some(b) => Ok(Some(decode(key, &b)?)),
            None => Ok(None),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<JobSpec>>> {
        self.spec_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_spec(&self, id: &str) -> Result<Option<Arc<JobSpec>>, StoreError> {
        if let Some(s) = self.cache().get(id) {
            return Ok(Some(s.clone()));
        }
        let Some(spec) = Self::read::<JobSpec>(&self.specs, id.as_bytes())? else {
            return Ok(None);
        };
        // Two readers may have decoded it at once: all share the first copy.
        let spec = self
            .cache()
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(spec))
            .clone();
        Ok(Some(spec))
    }

    fn read_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.scan_jobs(None)
    }

    /// The jobs (of `token`, or all), in creation order. Every record is
    /// read, so what this returns is the tree as it is; only the decoding
    /// is saved, for records whose bytes are those last decoded. Two scans
    /// at once are both right: the second starts without the cache, and
    /// the cache left is either one's.
    fn scan_jobs(&self, token: Option<&str>) -> Result<Vec<JobRecord>, StoreError> {
        let mut known = std::mem::take(&mut *self.job_records());
        let mut seen = HashMap::with_capacity(known.len());
        let mut jobs = Vec::new();
        for item in self.jobs.iter() {
            let (k, v) = item?;
            let job = match known.remove(&k) {
                Some((bytes, job)) if bytes == v => job,
                _ => decode::<JobRecord>(&k, &v)?,
            };
            if token.is_none_or(|t| job.token() == t) {
                jobs.push(job.clone());
            }
            seen.insert(k, (v, job));
        }
        *self.job_records() = seen;
        jobs.sort_by_key(|j| j.seq());
        Ok(jobs)
    }

    fn job_records(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<::sled::IVec, (::sled::IVec, JobRecord)>> {
        self.job_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_batches_of(&self, job_id: &str) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.batches.scan_prefix(job_prefix(job_id)) {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    fn read_open_batches(&self, token: &str) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.open.iter() {
            let (k, t) = item?;
            if t.as_ref() != token.as_bytes() {
                continue;
            }
            if let Some(b) = Self::read::<BatchRecord>(&self.batches, &k)?
                && b.state().is_open()
            {
                out.push(b);
            }
        }
        Ok(out)
    }

    fn read_failures(
        &self,
        job_id: &str,
        limit: usize,
    ) -> Result<(Vec<PairFailure>, bool), StoreError> {
        let prefix = job_prefix(job_id);
        let mut out = Vec::new();
        for item in self.failures.scan_prefix(&prefix) {
            let (k, v) = item?;
            let Some(rest) = k.get(prefix.len()..) else {
                continue;
            };
            let (Some(no), Some(pair)) = (rest.get(..4), rest.get(4..)) else {
                continue;
            };
            let (Ok(no), Ok(pair)) = (<[u8; 4]>::try_from(no), <[u8; 4]>::try_from(pair)) else {
                continue;
            };
            if out.len() >= limit {
                return Ok((out, true));
            }
            out.push(PairFailure {
                batch: u32::from_be_bytes(no),
                pair: u32::from_be_bytes(pair),
                record: decode::<FailureRecord>(&k, &v)?,
            });
        }
        Ok((out, false))
    }

    fn read_inbox(&self, max: usize) -> Result<Vec<InboxItem>, StoreError> {
        let mut out = Vec::new();
        for item in self.inbox.iter().take(max) {
            let (k, v) = item?;
            out.push(InboxItem {
                id: InboxId(id_of(&k)),
                envelope: v.to_vec(),
            });
        }
        Ok(out)
    }

    fn read_outbox(&self, max_commands: usize) -> Result<Vec<OutboxItem>, StoreError> {
        let mut out = Vec::new();
        let mut commands = 0;
        for item in self.outbox.iter() {
            if commands >= max_commands {
                break;
            }
            let (k, v) = item?;
            let entry: OutboxEntry = decode(&k, &v)?;
            commands += entry.pairs.len();
            out.push(OutboxItem {
                id: OutboxId(id_of(&k)),
                entry,
            });
        }
        Ok(out)
    }

    fn prune(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for item in self.seen.iter() {
            let (k, v) = item?;
            let at = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if at < cutoff_ms {
                self.seen.remove(&k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Forgets one expired job: its events, failures and batches first,
    /// then (rechecked in one transaction) the job and its spec.
    fn forget_job(&self, id: &str, cutoff_ms: u64) -> Result<bool, StoreError> {
        for batch in self.read_batches_of(id)? {
            for event in batch.events() {
                self.events.remove(event.as_bytes())?;
            }
            self.open.remove(batch_key(id, batch.no()))?;
        }
        for tree in [&self.failures, &self.batches] {
            for key in tree.scan_prefix(job_prefix(id)).keys() {
                tree.remove(key?)?;
            }
        }
        let forgotten = self.tx(|tx| {
            match tx.job(id)? {
                Some(job) if job.expired(cutoff_ms) => {}
                _ => return Ok(false),
            }
            tx.jobs.remove(id.as_bytes())?;
            tx.specs.remove(id.as_bytes())?;
            // Counted, so that the store's watermark (jobs ever held) does
            // not go down with a pruned job.
            let pruned = pruned_count(tx.ids.get(PRUNED_KEY)?);
            tx.ids.insert(PRUNED_KEY, &(pruned + 1).to_be_bytes())?;
            Ok(true)
        })?;
        self.cache().remove(id);
        Ok(forgotten)
    }

    fn prune_jobs(&self, cutoff_ms: u64) -> Result<Vec<String>, StoreError> {
        let mut in_outbox = std::collections::HashSet::new();
        for item in self.outbox.iter() {
            let (k, v) = item?;
            in_outbox.insert(decode::<OutboxEntry>(&k, &v)?.job_id);
        }
        let mut pruned = Vec::new();
        for job in self.read_jobs()? {
            if job.expired(cutoff_ms)
                && !in_outbox.contains(job.id())
                && self.forget_job(job.id(), cutoff_ms)?
            {
                pruned.push(job.id().to_string());
            }
        }
        Ok(pruned)
    }

    fn read_stats(&self) -> Result<super::StoreStats, StoreError> {
        let trees = [
            &self.jobs,
            &self.batches,
            &self.events,
            &self.failures,
            &self.inbox,
            &self.outbox,
            &self.seen,
            &self.licenses,
            &self.users,
        ];
        let records = super::StoreStats::KINDS
            .into_iter()
            .zip(trees)
            .map(|(kind, tree)| (kind, tree.len() as u64))
            .collect();
        Ok(super::StoreStats {
            bytes: dir_bytes(&self.path),
            records,
        })
    }

    fn apply_fold(&self, fold: &Fold) -> Result<Vec<Applied>, StoreError> {
        let riders = self.riders();
        let result = self.tx(|tx| {
            let now = now_ms();
            // Each record touched is read once and written once, however many
            // notifications of the run concern it.
            let mut jobs: HashMap<String, Option<JobRecord>> = HashMap::new();
            let mut batches: HashMap<(String, u32), Option<BatchRecord>> = HashMap::new();
            // License counts too: the run's confirmations of one asset are
            // one write, not one per notification.
            let mut licenses: HashMap<String, Option<LicenseRecord>> = HashMap::new();
            let mut applied = Vec::with_capacity(fold.decide.len());
            // Commands of consecutive notifications of one event share an
            // entry (`push_outbox`).
            let mut outbox: Vec<OutboxEntry> = Vec::new();
            for d in &fold.decide {
                if !jobs.contains_key(&d.job_id) {
                    jobs.insert(d.job_id.clone(), tx.job(&d.job_id)?);
                }
                let bkey = (d.job_id.clone(), d.batch);
                if !batches.contains_key(&bkey) {
                    batches.insert(bkey.clone(), tx.batch(&d.job_id, d.batch)?);
                }
                let (Some(Some(job)), Some(Some(batch))) =
                    (jobs.get_mut(&d.job_id), batches.get_mut(&bkey))
                else {
                    applied.push(Applied::default());
                    continue;
                };
                let decided =
                    job.decide(batch, &d.decisions, &d.revoked, d.activity, d.finished, now);
                job.note_reconciliation(batch, &d.checked, d.reconciled);
                if !decided.licenses.is_empty() {
                    // Inside the transaction the spec is read through it: a
                    // plain read of a tree the transaction holds would wait
                    // on the transaction's own lock.
                    let cached = self.cache().get(&d.job_id).cloned();
                    let spec = match cached {
                        Some(spec) => Some(spec),
                        None => Tx::get::<JobSpec>(tx.specs, d.job_id.as_bytes())?.map(Arc::new),
                    };
                    for (asset, assigned) in &decided.licenses {
                        let (adam_id, pricing) = match asset {
                            AssetRef::Named {
                                adam_id,
                                pricing_param,
                            } => (adam_id.as_str(), pricing_param.as_str()),
                            AssetRef::Index(i) => {
                                match spec.as_ref().and_then(|s| s.assets.get(*i as usize)) {
                                    Some(a) => (a.adam_id.as_str(), a.pricing_param.as_str()),
                                    None => continue,
                                }
                            }
                        };
                        let key = license_key(job.token(), adam_id, pricing);
                        if !licenses.contains_key(&key) {
                            let record = Tx::get::<LicenseRecord>(tx.licenses, key.as_bytes())?;
                            licenses.insert(key.clone(), record);
                        }
                        // Only assets whose counts were read: a delta alone
                        // says nothing about the total.
                        if let Some(Some(record)) = licenses.get_mut(&key) {
                            record.apply_assigned(*assigned, now);
                        }
                    }
                }
                for (pair, failure) in &decided.failures {
                    Tx::put(
                        tx.failures,
                        &failure_key(&d.job_id, d.batch, *pair),
                        failure,
                    )?;
                }
                for entry in decided.outbox {
                    push_outbox(&mut outbox, entry);
                }
                for entry in &decided.held {
                    tx.add_held(job.token(), entry)?;
                }
                applied.push(decided.applied);
            }
            for entry in &outbox {
                tx.add_outbox(entry)?;
            }
            for batch in batches.values().flatten() {
                tx.put_batch(batch)?;
            }
            // Released after this fold's decisions, as if committed after it.
            let mut released = Vec::with_capacity(riders.len());
            for rider in &riders {
                released.push(take_acks(tx, &rider.acks, &mut jobs, now)?);
            }
            for job in jobs.values().flatten() {
                tx.put_job(job)?;
            }
            for delta in &fold.license_deltas {
                let key = license_key(&delta.token, &delta.adam_id, &delta.pricing_param);
                if !licenses.contains_key(&key) {
                    let record = Tx::get::<LicenseRecord>(tx.licenses, key.as_bytes())?;
                    licenses.insert(key.clone(), record);
                }
                if let Some(slot) = licenses.get_mut(&key) {
                    slot.get_or_insert_with(LicenseRecord::default)
                        .apply_delta(delta.delta, now);
                }
            }
            for (key, record) in &licenses {
                if let Some(record) = record {
                    Tx::put(tx.licenses, key.as_bytes(), record)?;
                }
            }
            for (token, user) in &fold.users {
                Tx::put(
                    tx.users,
                    user_key(token, &user.client_user_id).as_bytes(),
                    user,
                )?;
            }
            for id in &fold.consumed {
                tx.inbox.remove(&id.0.to_be_bytes())?;
            }
            Ok((applied, released))
        });
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
                    let _ = rider.done.send(self.apply_acks(&rider.acks));
                }
                Err(e)
            }
        }
    }

    fn apply_settle(
        &self,
        token: &str,
        release: &[OutboxAck],
        drop: &[OutboxAck],
    ) -> Result<Settled, StoreError> {
        self.tx(|tx| {
            let mut settled = Settled::default();
            let mut dropped: HashMap<String, u64> = HashMap::new();
            for (acks, moving) in [(release, true), (drop, false)] {
                for ack in acks {
                    let key = held_key(token, ack.entry.0);
                    let Some(mut entry) = Tx::get::<OutboxEntry>(tx.held, &key)? else {
                        continue;
                    };
                    let before = entry.pairs.clone();
                    let taken = entry.take(&ack.pairs);
                    if taken == 0 {
                        continue;
                    }
                    if entry.pairs.is_empty() {
                        tx.held.remove(key)?;
                    } else {
                        Tx::put(tx.held, &key, &entry)?;
                    }
                    if moving {
                        let pairs = before
                            .into_iter()
                            .filter(|p| !entry.pairs.contains(p))
                            .collect();
                        tx.add_outbox(&OutboxEntry {
                            pairs,
                            // Its release latency runs from the association
                            // of its user, not from the license.
                            confirmed_ms: now_ms(),
                            ..entry.clone()
                        })?;
                        settled.released += taken;
                    } else {
                        *dropped.entry(entry.job_id.clone()).or_default() += taken;
                        settled.dropped += taken;
                    }
                }
            }
            let now = now_ms();
            for (job_id, n) in dropped {
                let Some(mut job) = tx.job(&job_id)? else {
                    continue;
                };
                if let Some(state) = job.held_dropped(n, now) {
                    settled.finished.push((job_id, state));
                }
                tx.put_job(&job)?;
            }
            Ok(settled)
        })
    }

    fn apply_acks(&self, acks: &[OutboxAck]) -> Result<Vec<Released>, StoreError> {
        self.tx(|tx| {
            let mut jobs = HashMap::new();
            let released = take_acks(tx, acks, &mut jobs, now_ms())?;
            for job in jobs.values().flatten() {
                tx.put_job(job)?;
            }
            Ok(released)
        })
    }

    /// Acknowledgements waiting to ride on the next fold, taken by it.
    fn riders(&self) -> Vec<Rider> {
        std::mem::take(&mut *self.riders.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Takes acknowledged commands out of the outbox and counts them released
/// on their jobs, which are read into `jobs` (if not there already) and
/// left there for the caller to write once.
fn take_acks(
    tx: &Tx<'_>,
    acks: &[OutboxAck],
    jobs: &mut HashMap<String, Option<JobRecord>>,
    now: u64,
) -> TxResult<Vec<Released>> {
    let mut per_job: HashMap<(String, RequestType), u64> = HashMap::new();
    for ack in acks {
        let key = ack.entry.0.to_be_bytes();
        let Some(mut entry) = Tx::get::<OutboxEntry>(tx.outbox, &key)? else {
            continue;
        };
        let taken = entry.take(&ack.pairs);
        if entry.pairs.is_empty() {
            tx.outbox.remove(&key)?;
        } else if taken > 0 {
            Tx::put(tx.outbox, &key, &entry)?;
        }
        if taken > 0 {
            *per_job
                .entry((entry.job_id.clone(), entry.request_type))
                .or_default() += taken;
        }
    }
    let mut released = Vec::new();
    for ((job_id, request_type), n) in per_job {
        if !jobs.contains_key(&job_id) {
            jobs.insert(job_id.clone(), tx.job(&job_id)?);
        }
        if let Some(Some(job)) = jobs.get_mut(&job_id) {
            released.push(Released::count(job, n, request_type, now));
        }
    }
    Ok(released)
}

/// How long an acknowledgement waits for a fold to carry it before it is
/// committed on its own. Each sled transaction costs two log writes to
/// disk whatever it holds, and during a rollout the release acknowledges
/// a delivery more often than the applier folds: riding on the fold saves
/// the acknowledgement's own. The release wakes the applier
/// (`Context::wake_fold`), so a fold normally comes within a fraction of
/// a millisecond; the wait is for a fold that does not come (the inbox
/// held only notifications to park).
const ACK_RIDE: std::time::Duration = std::time::Duration::from_millis(5);

/// An acknowledgement of delivered commands, waiting for a fold.
struct Rider {
    id: u64,
    acks: Vec<OutboxAck>,
    done: tokio::sync::oneshot::Sender<Result<Vec<Released>, StoreError>>,
}

impl Store for SledStore {
    fn create_job<'a>(
        &'a self,
        spec: &'a Arc<JobSpec>,
        record: JobRecord,
    ) -> StoreFuture<'a, Created> {
        Box::pin(async move {
            // One buffer however often the transaction runs: an IVec this
            // large is shared, not copied.
            let spec_bytes = ::sled::IVec::from(encode(&**spec)?);
            let created = self
                .commit(|tx| {
                    if let Some(existing) = tx.job(&spec.id)? {
                        return Ok(if existing.spec_hash() == record.spec_hash() {
                            Created::Existing(Box::new(existing))
                        } else {
                            Created::Conflict
                        });
                    }
                    let mut record = record.clone();
                    record.set_seq(tx.next_id()?);
                    tx.put_job(&record)?;
                    tx.specs.insert(spec.id.as_bytes(), spec_bytes.clone())?;
                    Ok(Created::New(Box::new(record)))
                })
                .await?;
            if matches!(created, Created::New(_)) {
                self.cache().insert(spec.id.clone(), spec.clone());
            }
            Ok(created)
        })
    }

    fn job<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<JobRecord>> {
        Box::pin(async move { Self::read(&self.jobs, id.as_bytes()) })
    }

    fn jobs(&self) -> StoreFuture<'_, Vec<JobRecord>> {
        Box::pin(async move { self.read_jobs() })
    }

    fn jobs_of<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<JobRecord>> {
        Box::pin(async move { self.scan_jobs(Some(token)) })
    }

    fn spec<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<Arc<JobSpec>>> {
        Box::pin(async move { self.read_spec(id) })
    }

    fn update_job<'a>(
        &'a self,
        id: &'a str,
        change: JobChange,
    ) -> StoreFuture<'a, Option<JobRecord>> {
        Box::pin(async move {
            self.commit(|tx| {
                let Some(mut job) = tx.job(id)? else {
                    return Ok(None);
                };
                if job.apply(&change, now_ms()) {
                    tx.put_job(&job)?;
                }
                Ok(Some(job))
            })
            .await
        })
    }

    fn failures<'a>(
        &'a self,
        job_id: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, (Vec<PairFailure>, bool)> {
        Box::pin(async move { self.read_failures(job_id, limit) })
    }

    fn start_batch<'a>(
        &'a self,
        job_id: &'a str,
        shape: Shape,
    ) -> StoreFuture<'a, Option<BatchRecord>> {
        Box::pin(async move {
            self.commit(|tx| {
                let Some(mut job) = tx.job(job_id)? else {
                    return Ok(None);
                };
                let Some(batch) = job.start_batch(shape, now_ms()) else {
                    return Ok(None);
                };
                tx.put_batch(&batch)?;
                tx.put_job(&job)?;
                Ok(Some(batch))
            })
            .await
        })
    }

    fn batch_sent<'a>(
        &'a self,
        job_id: &'a str,
        no: u32,
        event_id: &'a str,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.commit(|tx| {
                let sent = tx.with_job_and_batch(job_id, no, |job, batch| {
                    let sent = job.batch_sent(batch, event_id, now_ms());
                    (sent, sent)
                })?;
                if sent != Some(true) {
                    return Ok(false);
                }
                let event = EventRef {
                    job_id: job_id.to_string(),
                    batch: no,
                };
                Tx::put(tx.events, event_id.as_bytes(), &event)?;
                tx.unpark(event_id)?;
                Ok(true)
            })
            .await
        })
    }

    fn return_batch<'a>(&'a self, job_id: &'a str, no: u32, shape: Shape) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.commit(|tx| {
                let (Some(mut job), Some(batch)) = (tx.job(job_id)?, tx.batch(job_id, no)?) else {
                    return Ok(false);
                };
                if !job.return_batch(&batch, shape) {
                    return Ok(false);
                }
                tx.remove_batch(job_id, no)?;
                tx.put_job(&job)?;
                Ok(true)
            })
            .await
        })
    }

    fn withdraw_batch<'a>(&'a self, job_id: &'a str, no: u32) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.commit(|tx| {
                let withdrawn = tx.with_job_and_batch(job_id, no, |job, batch| {
                    let w = job.withdraw_batch(batch, now_ms());
                    (w, w)
                })?;
                Ok(withdrawn == Some(true))
            })
            .await
        })
    }

    fn schedule_poll<'a>(&'a self, job_id: &'a str, no: u32, at_ms: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.commit(|tx| {
                if let Some(mut batch) = tx.batch(job_id, no)? {
                    batch.schedule_poll(at_ms);
                    tx.put_batch(&batch)?;
                }
                Ok(())
            })
            .await
        })
    }

    fn batch<'a>(&'a self, job_id: &'a str, no: u32) -> StoreFuture<'a, Option<BatchRecord>> {
        Box::pin(async move { Self::read(&self.batches, &batch_key(job_id, no)) })
    }

    fn batches_of<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Vec<BatchRecord>> {
        Box::pin(async move { self.read_batches_of(job_id) })
    }

    fn open_batches<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<BatchRecord>> {
        Box::pin(async move { self.read_open_batches(token) })
    }

    fn event<'a>(&'a self, event_id: &'a str) -> StoreFuture<'a, Option<EventRef>> {
        Box::pin(async move { Self::read(&self.events, event_id.as_bytes()) })
    }

    fn fold(&self, fold: Fold) -> StoreFuture<'_, Vec<Applied>> {
        Box::pin(async move {
            // Not flushed: sled recovers a prefix of its log, and the fold
            // removes the inbox items it applies in the same transaction,
            // so a fold lost to a crash is folded again from the durable
            // inbox. Everything it causes outside the store waits for a
            // later flush that covers it (the release's acknowledgement,
            // the submitter's next batch record).
            self.apply_fold(&fold)
        })
    }

    fn record_notification<'a>(
        &'a self,
        notification_id: &'a str,
        envelope: &'a [u8],
    ) -> StoreFuture<'a, Recorded> {
        Box::pin(async move {
            // Two plain writes, not a transaction: a sled transaction rolls
            // and writes the log twice, which made the listener's write the
            // daemon's largest cost. The inbox goes first and the id after:
            // sled recovers a prefix of its log, so a crash in between can
            // leave the notification without its id (a resend is recorded
            // again, and folding a notification twice changes nothing), never
            // its id without the notification. A repeat is told by the id's
            // compare-and-swap alone, not by a look beforehand: the ids are
            // random keys in a tree as large as the retention window, and
            // that second walk down it was 4% of the daemon's CPU in a
            // million-device rollout, for the rare repeat a removal undoes.
            let now = now_ms().to_be_bytes();
            let id = self.db.generate_id()?.to_be_bytes();
            self.inbox.insert(id, envelope)?;
            let claimed = self.seen.compare_and_swap(
                notification_id.as_bytes(),
                None::<&[u8]>,
                Some(&now[..]),
            )?;
            let recorded = match claimed {
                Ok(()) => Recorded::New,
                Err(_) => {
                    // A repeat (or the same notification, recorded by a
                    // concurrent delivery): answered once what was recorded
                    // is on disk, with its inbox copy gone.
                    self.inbox.remove(id)?;
                    Recorded::Duplicate
                }
            };
            if let Err(e) = self.flusher.durable().await {
                // Undo, so that the sender's retry is recorded anew instead
                // of being taken for a duplicate of what may not be on disk.
                if recorded == Recorded::New {
                    let _ = self.seen.remove(notification_id.as_bytes());
                    let _ = self.inbox.remove(id);
                }
                return Err(e);
            }
            Ok(recorded)
        })
    }

    fn inbox(&self, max: usize) -> StoreFuture<'_, Vec<InboxItem>> {
        Box::pin(async move { self.read_inbox(max) })
    }

    fn inbox_len(&self) -> StoreFuture<'_, usize> {
        Box::pin(async move { Ok(self.inbox.len()) })
    }

    fn prune_seen(&self, cutoff_ms: u64) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let removed = self.prune(cutoff_ms)?;
            self.flusher.durable().await?;
            Ok(removed)
        })
    }

    fn park_notifications<'a>(&'a self, items: &'a [(InboxId, String)]) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            if items.is_empty() {
                return Ok(0);
            }
            let at_ms = now_ms();
            self.commit(|tx| {
                let mut parked = 0;
                for (id, event_id) in items {
                    // Recorded meanwhile: leave it for the applier's next
                    // read, or it would wait for an unpark that has passed.
                    if tx.events.get(event_id.as_bytes())?.is_some() {
                        continue;
                    }
                    let Some(envelope) = tx.inbox.remove(&id.0.to_be_bytes())? else {
                        continue;
                    };
                    let key = event_id.as_bytes();
                    let mut bytes = tx.parked.get(key)?.map(|b| b.to_vec()).unwrap_or_default();
                    bytes.extend_from_slice(&encode_parked(&[Parked {
                        id: id.0,
                        at_ms,
                        envelope: envelope.to_vec(),
                    }]));
                    tx.parked.insert(key, bytes)?;
                    tx.parked_at
                        .insert(parked_at_key(at_ms, id.0).as_slice(), key)?;
                    parked += 1;
                }
                Ok(parked)
            })
            .await
        })
    }

    fn expire_parked(&self, cutoff_ms: u64, max: usize) -> StoreFuture<'_, Vec<InboxItem>> {
        Box::pin(async move {
            let mut due = Vec::new();
            for item in self
                .parked_at
                .range(..cutoff_ms.to_be_bytes().to_vec())
                .take(max)
            {
                let (k, event_id) = item?;
                let id = k
                    .get(8..16)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes);
                let Some(id) = id else {
                    return Err(StoreError::Corrupt {
                        key: "parked_at".to_string(),
                        message: "short key".to_string(),
                    });
                };
                due.push((k.to_vec(), id, event_id.to_vec()));
            }
            if due.is_empty() {
                return Ok(Vec::new());
            }
            self.commit(|tx| {
                let mut expired = Vec::new();
                for (k, id, event_id) in &due {
                    if tx.parked_at.remove(k.as_slice())?.is_none() {
                        continue; // unparked meanwhile
                    }
                    let Some(bytes) = tx.parked.get(event_id.as_slice())? else {
                        continue;
                    };
                    let (gone, keep): (Vec<Parked>, Vec<Parked>) = decode_parked(event_id, &bytes)
                        .map_err(ConflictableTransactionError::Abort)?
                        .into_iter()
                        .partition(|p| p.id == *id);
                    if keep.is_empty() {
                        tx.parked.remove(event_id.as_slice())?;
                    } else {
                        tx.parked
                            .insert(event_id.as_slice(), encode_parked(&keep))?;
                    }
                    expired.extend(gone.into_iter().map(|p| InboxItem {
                        id: InboxId(p.id),
                        envelope: p.envelope,
                    }));
                }
                Ok(expired)
            })
            .await
        })
    }

    fn outbox(&self, max_commands: usize) -> StoreFuture<'_, Vec<OutboxItem>> {
        Box::pin(async move { self.read_outbox(max_commands) })
    }

    fn prune_finished(&self, cutoff_ms: u64) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let pruned = self.prune_jobs(cutoff_ms)?;
            self.flusher.durable().await?;
            Ok(pruned)
        })
    }

    fn stats(&self) -> StoreFuture<'_, super::StoreStats> {
        Box::pin(async move { self.read_stats() })
    }

    fn ack_outbox<'a>(&'a self, acks: &'a [OutboxAck]) -> StoreFuture<'a, Vec<Released>> {
        Box::pin(async move {
            // Carried by the next fold's transaction if one comes soon
            // (`ACK_RIDE`), else committed on its own; made durable either
            // way before it returns.
            if self.inbox.is_empty() {
                // No fold is coming soon to carry it.
                let released = self.apply_acks(acks)?;
                self.flusher.durable().await?;
                return Ok(released);
            }
            let (done, mut answer) = tokio::sync::oneshot::channel();
            let id = self
                .rider_ids
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.riders
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Rider {
                    id,
                    acks: acks.to_vec(),
                    done,
                });
            let carried = tokio::time::timeout(ACK_RIDE, &mut answer).await;
            let released = match carried {
                Ok(answer) => answer.map_err(|_| gone_rider())??,
                Err(_) => {
                    let mine = {
                        let mut riders = self.riders.lock().unwrap_or_else(|p| p.into_inner());
                        let at = riders.iter().position(|r| r.id == id);
                        at.map(|at| riders.remove(at))
                    };
                    match mine {
                        Some(_) => self.apply_acks(acks)?,
                        // A fold took it as the wait ended: its answer comes.
                        None => answer.await.map_err(|_| gone_rider())??,
                    }
                }
            };
            self.flusher.durable().await?;
            Ok(released)
        })
    }

    fn watermark(&self) -> StoreFuture<'_, super::marker::Watermark> {
        Box::pin(async move {
            // sled's id generator is durable and monotonic: a store that
            // hands out a lower id than before lost commits.
            let generation = self.db.generate_id()?;
            let jobs = self.read_jobs()?;
            // Pruned jobs were finished ones: they still count.
            let pruned = pruned_count(self.ids.get(PRUNED_KEY)?);
            let mark = super::marker::Watermark {
                generation,
                jobs: jobs.len() as u64 + pruned,
                finished: jobs.iter().filter(|j| j.state().is_final()).count() as u64 + pruned,
            };
            // What was read may include a commit whose flush is still
            // pending; a marker must never claim more than is on disk, or a
            // crash would make the next start refuse a sound store.
            self.flusher.durable().await?;
            Ok(mark)
        })
    }

    fn meta<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move { Self::read(&self.meta, key.as_bytes()) })
    }

    fn put_meta<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.meta.insert(key.as_bytes(), encode(&value)?)?;
            self.flusher.durable().await
        })
    }

    fn license<'a>(
        &'a self,
        token: &'a str,
        adam_id: &'a str,
        pricing_param: &'a str,
    ) -> StoreFuture<'a, Option<LicenseRecord>> {
        Box::pin(async move {
            let key = license_key(token, adam_id, pricing_param);
            Self::read(&self.licenses, key.as_bytes())
        })
    }

    fn licenses<'a>(
        &'a self,
        token: &'a str,
    ) -> StoreFuture<'a, Vec<(String, String, LicenseRecord)>> {
        Box::pin(async move {
            let prefix = format!("{token}\0");
            let mut out = Vec::new();
            for item in self.licenses.scan_prefix(prefix.as_bytes()) {
                let (k, v) = item?;
                let record: LicenseRecord = decode(&k, &v)?;
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let (adam_id, pricing) = key.split_once('\0').unwrap_or((key.as_str(), ""));
                out.push((adam_id.to_string(), pricing.to_string(), record));
            }
            Ok(out)
        })
    }

    fn put_license<'a>(
        &'a self,
        token: &'a str,
        adam_id: &'a str,
        pricing_param: &'a str,
        record: &'a LicenseRecord,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = license_key(token, adam_id, pricing_param);
            self.licenses.insert(key.as_bytes(), encode(record)?)?;
            self.flusher.durable().await
        })
    }

    fn user<'a>(
        &'a self,
        token: &'a str,
        client_user_id: &'a str,
    ) -> StoreFuture<'a, Option<UserRecord>> {
        Box::pin(async move {
            let key = user_key(token, client_user_id);
            Self::read(&self.users, key.as_bytes())
        })
    }

    fn put_token<'a>(&'a self, record: &'a TokenRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.tokens
                .insert(record.name.as_bytes(), encode(record)?)?;
            self.flusher.durable().await
        })
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for item in self.tokens.iter() {
                let (key, value) = item?;
                // serde's message could quote the record, sToken included.
                let record = serde_json::from_slice(&value).map_err(|_| StoreError::Corrupt {
                    key: format!("tokens/{}", String::from_utf8_lossy(&key)),
                    message: "not a token record; PUT the token again".into(),
                })?;
                out.push(record);
            }
            Ok(out)
        })
    }

    fn users<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<UserRecord>> {
        Box::pin(async move {
            let prefix = user_key(token, "");
            let mut out = Vec::new();
            for item in self.users.scan_prefix(prefix.as_bytes()) {
                let (k, v) = item?;
                out.push(decode(&k, &v)?);
            }
            Ok(out)
        })
    }

    fn delete_token<'a>(&'a self, name: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.token_states.remove(name.as_bytes())?;
            let existed = self.tokens.remove(name.as_bytes())?.is_some();
            self.flusher.durable().await?;
            Ok(existed)
        })
    }

    fn put_token_state<'a>(&'a self, name: &'a str, state: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.token_states
                .insert(name.as_bytes(), state.as_bytes())?;
            self.flusher.durable().await
        })
    }

    fn token_states(&self) -> StoreFuture<'_, Vec<(String, String)>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for item in self.token_states.iter() {
                let (key, value) = item?;
                out.push((
                    String::from_utf8_lossy(&key).into_owned(),
                    String::from_utf8_lossy(&value).into_owned(),
                ));
            }
            Ok(out)
        })
    }

    fn held<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<OutboxItem>> {
        Box::pin(async move {
            let prefix = held_prefix(token);
            let mut out = Vec::new();
            for item in self.held.scan_prefix(&prefix) {
                let (k, v) = item?;
                let id = k
                    .get(prefix.len()..)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                out.push(OutboxItem {
                    id: OutboxId(id),
                    entry: decode(&k, &v)?,
                });
            }
            Ok(out)
        })
    }

    fn settle_held<'a>(
        &'a self,
        token: &'a str,
        release: &'a [OutboxAck],
        drop: &'a [OutboxAck],
    ) -> StoreFuture<'a, Settled> {
        Box::pin(async move {
            let settled = self.apply_settle(token, release, drop)?;
            self.flusher.durable().await?;
            Ok(settled)
        })
    }

    fn users_ready<'a>(
        &'a self,
        job_id: &'a str,
        invitations: &'a [(String, String)],
        associated: &'a [u32],
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let done = self.commit(|tx| {
                let Some(mut job) = tx.job(job_id)? else {
                    return Ok(false);
                };
                if !job.users_ready(invitations.len() as u64, associated, now_ms()) {
                    return Ok(false);
                }
                if !invitations.is_empty() {
                    tx.add_outbox(&OutboxEntry::invitations(
                        job_id,
                        invitations.to_vec(),
                        now_ms(),
                    ))?;
                }
                tx.put_job(&job)?;
                Ok(true)
            });
            done.await
        })
    }

    fn take_leases<'a>(
        &'a self,
        names: &'a [String],
        holder: &'a str,
        ttl: std::time::Duration,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let now = std::time::Instant::now();
            let mut leases = self.lease_map();
            let mut held = Vec::new();
            for name in names {
                let free = leases
                    .get(name)
                    .is_none_or(|(h, until)| h == holder || *until <= now);
                if free {
                    leases.insert(name.clone(), (holder.to_string(), now + ttl));
                    if !held.contains(name) {
                        held.push(name.clone());
                    }
                }
            }
            Ok(held)
        })
    }

    fn release_leases<'a>(
        &'a self,
        names: &'a [String],
        holder: &'a str,
        linger: std::time::Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let until = std::time::Instant::now() + linger;
            let mut leases = self.lease_map();
            for name in names {
                if let Some((h, expires)) = leases.get_mut(name)
                    && h == holder
                {
                    *expires = (*expires).min(until);
                }
            }
            Ok(())
        })
    }

    fn leases(&self) -> StoreFuture<'_, Vec<Lease>> {
        Box::pin(async move {
            let now = std::time::Instant::now();
            let mut out: Vec<Lease> = self
                .lease_map()
                .iter()
                .map(|(name, (holder, until))| Lease {
                    name: name.clone(),
                    holder: holder.clone(),
                    remaining_ms: if *until > now {
                        (*until - now).as_millis() as i64
                    } else {
                        -((now - *until).as_millis() as i64)
                    },
                })
                .collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }

    fn drift<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Option<DriftRecord>> {
        Box::pin(async move { Self::read(&self.meta, &Self::drift_key(token)) })
    }

    fn update_drift<'a>(
        &'a self,
        token: &'a str,
        change: DriftChange,
    ) -> StoreFuture<'a, DriftCounted> {
        Box::pin(async move {
            let key = Self::drift_key(token);
            // Compare and swap: a concurrent change makes this one read
            // again and apply itself to the newer record.
            loop {
                let old = self.meta.get(&key)?;
                let mut record: DriftRecord = match &old {
                    Some(v) => decode(&key, v)?,
                    None => DriftRecord::default(),
                };
                let counted = record.apply(change.clone());
                let new = encode(&record)?;
                if self
                    .meta
                    .compare_and_swap(&key, old.as_ref(), Some(new))?
                    .is_ok()
                {
                    self.flusher.durable().await?;
                    return Ok(counted);
                }
            }
        })
    }

    fn meta_or_insert<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, String> {
        Box::pin(async move {
            let encoded = encode(&value)?;
            let _ = self
                .meta
                .compare_and_swap(key.as_bytes(), None::<&[u8]>, Some(encoded))?;
            self.flusher.durable().await?;
            match Self::read::<String>(&self.meta, key.as_bytes())? {
                Some(kept) => Ok(kept),
                None => Err(StoreError::Corrupt {
                    key: key.to_string(),
                    message: "vanished right after it was written".into(),
                }),
            }
        })
    }
}

impl SledStore {
    fn drift_key(token: &str) -> Vec<u8> {
        format!("drift\0{token}").into_bytes()
    }

    fn lease_map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (String, std::time::Instant)>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_batch_and_pair_order() {
        assert!(batch_key("j", 1) < batch_key("j", 2));
        assert!(batch_key("j", 255) < batch_key("j", 256));
        assert!(failure_key("j", 0, 9) < failure_key("j", 1, 0));
        assert!(batch_key("j", u32::MAX) < batch_key("j\u{1}", 0));
    }
}
