//! The durable state of vppd, in sled.
//!
//! Every change that must survive a crash is one sled transaction over the
//! trees below; [`Store::flush`] makes it durable (group commit: concurrent
//! callers share one fsync), and every answer that promises durability to
//! someone else (a 202 for a job, a 200 for a notification, an Apple POST
//! about to be sent) waits for it first.
//!
//! Trees:
//! - `jobs`: job id -> [`JobRecord`] (state, counters, the unsent [`Plan`]).
//! - `specs`: job id -> [`JobSpec`] (written once).
//! - `batches`: job id, 0, batch number -> [`BatchRecord`] (what was sent,
//!   its events, and per-pair confirmed/failed bitmaps).
//! - `open`: batch key -> token, for every batch not yet decided (so the
//!   trackers never scan finished jobs).
//! - `events`: Apple eventId -> (job id, batch number).
//! - `seen`: notificationId -> receive time (dedupe).
//! - `inbox`: sequence -> a recorded notification not yet applied.
//! - `outbox`: sequence -> [`OutboxEntry`], install commands not yet
//!   acknowledged by the MDM.
//! - `failures`: job id, 0, batch number, pair -> [`FailureRecord`].
//! - `meta`: small named values (per-token state, learned uIds).
//! - `licenses`, `users`: what Apple told us about license counts and users.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use crate::job::{
    Failure, InstallCounts, JobSpec, JobState, JobStatus, PairCounts, Phase, RequestCounts,
};
use crate::plan::{Plan, Rect};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: record {key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("store: {0}")]
    Abort(String),
    #[error("store: the flusher has stopped")]
    FlusherGone,
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

pub type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Pair counts of one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub total: u64,
    pub confirmed: u64,
    pub failed: u64,
}

impl Tally {
    pub fn decided(&self) -> bool {
        self.confirmed + self.failed >= self.total
    }

    fn counts(&self) -> PairCounts {
        PairCounts {
            total: self.total,
            confirmed: self.confirmed,
            failed: self.failed,
            pending: self.total.saturating_sub(self.confirmed + self.failed),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub token: String,
    /// Creation order: jobs of a token are sent in this order.
    pub seq: u64,
    pub state: JobState,
    pub error: Option<String>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    /// Hash of the normalized spec: the same id with another body is a conflict.
    pub spec_hash: String,
    pub install: bool,
    /// Work not yet sent.
    pub plan: Plan,
    pub next_batch: u32,
    /// License check before the first association done.
    pub preflight_done: bool,
    pub requests: RequestCounts,
    pub assoc: Tally,
    pub disassoc: Tally,
    pub installs: InstallCounts,
    /// Batches recorded and not yet decided.
    pub open_batches: u32,
    /// The batch recorded as about to be sent and not yet given an eventId.
    #[serde(default)]
    pub sending: Option<u32>,
}

impl JobRecord {
    pub fn tally_mut(&mut self, phase: Phase) -> &mut Tally {
        match phase {
            Phase::Associate => &mut self.assoc,
            Phase::Disassociate => &mut self.disassoc,
        }
    }

    /// Completed once nothing is left to send, decide or release.
    fn maybe_complete(&mut self) {
        if matches!(self.state, JobState::Running | JobState::Accepted)
            && self.plan.is_done()
            && self.open_batches == 0
            && self.assoc.decided()
            && self.disassoc.decided()
            && self.installs.pending == 0
        {
            self.state = JobState::Completed;
            self.finished_ms = Some(now_ms());
        }
    }

    pub fn status(&self, failures: Option<Vec<Failure>>, truncated: bool) -> JobStatus {
        JobStatus {
            id: self.id.clone(),
            token: self.token.clone(),
            state: self.state,
            error: self.error.clone(),
            requests: self.requests.clone(),
            assignments: self.assoc.counts(),
            disassociations: self.disassoc.counts(),
            installs: self.installs.clone(),
            failures_truncated: failures.as_ref().map(|_| truncated).filter(|t| *t),
            failures,
            created_at: format_ms(self.created_ms),
            finished_at: self.finished_ms.map(format_ms),
        }
    }
}

pub fn format_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A fixed-size bit set, stored as Base64 to keep batch records small.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    pub fn new(bits: u64) -> Bitmap {
        Bitmap {
            words: vec![0; bits.div_ceil(64) as usize],
        }
    }

    pub fn get(&self, i: u32) -> bool {
        self.words
            .get(i as usize / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i`; false if it was already set (or out of range).
    pub fn set(&mut self, i: u32) -> bool {
        match self.words.get_mut(i as usize / 64) {
            Some(w) => {
                let mask = 1 << (i % 64);
                let was = *w & mask != 0;
                *w |= mask;
                !was
            }
            None => false,
        }
    }
}

impl Serialize for Bitmap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        let mut bytes = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        s.serialize_str(&base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for Bitmap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let s = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(s)
            .map_err(serde::de::Error::custom)?;
        if bytes.len() % 8 != 0 {
            return Err(serde::de::Error::custom("bitmap length is not whole words"));
        }
        let words = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        Ok(Bitmap { words })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchState {
    /// Recorded before the POST; without an eventId after a crash, its
    /// outcome is unknown and must be reconciled before anything is resent.
    Sending,
    /// Apple accepted it: at least one eventId is known.
    Sent,
    /// Every pair confirmed or failed.
    Decided,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub job_id: String,
    pub no: u32,
    pub token: String,
    pub phase: Phase,
    pub rect: Rect,
    pub state: BatchState,
    /// Every eventId Apple gave for this batch (a resent remainder adds one).
    pub events: Vec<String>,
    pub created_ms: u64,
    pub sent_ms: u64,
    /// Last sign of life: the send, or the last notification.
    pub last_activity_ms: u64,
    /// Apple's event status said the event is finished.
    pub terminal_ms: Option<u64>,
    pub next_poll_ms: u64,
    pub confirmed: Bitmap,
    pub failed: Bitmap,
    pub n_confirmed: u32,
    pub n_failed: u32,
}

impl BatchRecord {
    pub fn new(job: &JobRecord, no: u32, phase: Phase, rect: Rect) -> BatchRecord {
        let pairs = rect.pairs();
        let now = now_ms();
        BatchRecord {
            job_id: job.id.clone(),
            no,
            token: job.token.clone(),
            phase,
            rect,
            state: BatchState::Sending,
            events: Vec::new(),
            created_ms: now,
            sent_ms: 0,
            last_activity_ms: now,
            terminal_ms: None,
            next_poll_ms: 0,
            confirmed: Bitmap::new(pairs),
            failed: Bitmap::new(pairs),
            n_confirmed: 0,
            n_failed: 0,
        }
    }

    pub fn pairs(&self) -> u32 {
        self.rect.pairs() as u32
    }

    pub fn undecided(&self) -> u32 {
        self.pairs() - self.n_confirmed - self.n_failed
    }

    pub fn is_decided_pair(&self, i: u32) -> bool {
        self.confirmed.get(i) || self.failed.get(i)
    }

    pub fn key(&self) -> Vec<u8> {
        batch_key(&self.job_id, self.no)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRef {
    pub job_id: String,
    pub batch: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub job_id: String,
    pub batch: u32,
    pub event_id: Option<String>,
    /// Pair indexes inside the batch's rect.
    pub pairs: Vec<u32>,
    pub confirmed_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub error_number: i32,
    pub error_message: String,
    pub event_id: Option<String>,
}

/// What is known about one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Confirmed { event_id: Option<String> },
    Failed(FailureRecord),
}

/// What [`Store::decide`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub confirmed: u32,
    pub failed: u32,
    pub outboxed: u32,
    pub batch_decided: bool,
    pub job_state: Option<JobState>,
}

pub fn batch_key(job_id: &str, no: u32) -> Vec<u8> {
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

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Abort(format!("cannot encode record: {e}")))
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        message: e.to_string(),
    })
}

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// The trees of one transaction, with typed access.
pub struct Tx<'a> {
    jobs: &'a TransactionalTree,
    batches: &'a TransactionalTree,
    open: &'a TransactionalTree,
    events: &'a TransactionalTree,
    outbox: &'a TransactionalTree,
    failures: &'a TransactionalTree,
    inbox: &'a TransactionalTree,
    specs: &'a TransactionalTree,
    ids: &'a TransactionalTree,
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

    pub fn job(&self, id: &str) -> TxResult<Option<JobRecord>> {
        Self::get(self.jobs, id.as_bytes())
    }

    pub fn put_job(&self, job: &JobRecord) -> TxResult<()> {
        Self::put(self.jobs, job.id.as_bytes(), job)
    }

    pub fn batch(&self, job_id: &str, no: u32) -> TxResult<Option<BatchRecord>> {
        Self::get(self.batches, &batch_key(job_id, no))
    }

    /// Writes a batch and keeps the open-batch index in step with it.
    pub fn put_batch(&self, batch: &BatchRecord) -> TxResult<()> {
        let key = batch.key();
        if batch.state == BatchState::Decided {
            self.open.remove(key.as_slice())?;
        } else {
            self.open.insert(key.as_slice(), batch.token.as_bytes())?;
        }
        Self::put(self.batches, &key, batch)
    }

    pub fn put_event(&self, event_id: &str, r: &EventRef) -> TxResult<()> {
        Self::put(self.events, event_id.as_bytes(), r)
    }

    /// A new id, unique and increasing across restarts. sled hands these
    /// out without a shared key, so concurrent transactions never conflict
    /// over it (a retried transaction just skips a number).
    fn next_id(&self) -> TxResult<u64> {
        Ok(self.ids.generate_id()?)
    }

    pub fn add_outbox(&self, entry: &OutboxEntry) -> TxResult<()> {
        let id = self.next_id()?;
        Self::put(self.outbox, &id.to_be_bytes(), entry)
    }

    /// Records decisions for pairs of one batch, once per pair: a pair
    /// already decided keeps its first decision, so a duplicated or late
    /// notification changes nothing. Confirmed associations of an install
    /// job get their install command in the outbox in this same transaction.
    pub fn decide(
        &self,
        job_id: &str,
        no: u32,
        decisions: &[(u32, Decision)],
        activity: bool,
    ) -> TxResult<Applied> {
        let mut applied = Applied::default();
        let Some(mut batch) = self.batch(job_id, no)? else {
            return Ok(applied);
        };
        let Some(mut job) = self.job(job_id)? else {
            return Ok(applied);
        };
        let mut outboxed: HashMap<Option<String>, Vec<u32>> = HashMap::new();
        for (pair, decision) in decisions {
            let pair = *pair;
            if pair >= batch.pairs() || batch.is_decided_pair(pair) {
                continue;
            }
            match decision {
                Decision::Confirmed { event_id } => {
                    batch.confirmed.set(pair);
                    batch.n_confirmed += 1;
                    applied.confirmed += 1;
                    if batch.phase == Phase::Associate && job.install {
                        outboxed.entry(event_id.clone()).or_default().push(pair);
                    }
                }
                Decision::Failed(f) => {
                    batch.failed.set(pair);
                    batch.n_failed += 1;
                    applied.failed += 1;
                    Self::put(self.failures, &failure_key(job_id, no, pair), f)?;
                }
            }
        }
        if activity {
            batch.last_activity_ms = now_ms();
        }
        let now = now_ms();
        for (event_id, pairs) in outboxed {
            applied.outboxed += pairs.len() as u32;
            self.add_outbox(&OutboxEntry {
                job_id: job_id.to_string(),
                batch: no,
                event_id,
                pairs,
                confirmed_ms: now,
            })?;
        }
        let tally = job.tally_mut(batch.phase);
        tally.confirmed += applied.confirmed as u64;
        tally.failed += applied.failed as u64;
        job.installs.pending += applied.outboxed as u64;
        if batch.undecided() == 0 && batch.state != BatchState::Decided {
            batch.state = BatchState::Decided;
            job.open_batches = job.open_batches.saturating_sub(1);
            job.requests.completed += 1;
            applied.batch_decided = true;
        }
        let before = job.state;
        job.maybe_complete();
        if job.state != before {
            applied.job_state = Some(job.state);
        }
        self.put_batch(&batch)?;
        self.put_job(&job)?;
        Ok(applied)
    }

    pub fn remove_batch(&self, key: &[u8]) -> TxResult<()> {
        self.batches.remove(key)?;
        self.open.remove(key)?;
        Ok(())
    }

    pub fn remove_inbox(&self, key: &[u8]) -> TxResult<()> {
        self.inbox.remove(key)?;
        Ok(())
    }
}

/// A recorded notification: its inbox key and the envelope as received.
pub type InboxItem = (Vec<u8>, Vec<u8>);

/// Result of recording a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    New,
    Duplicate,
}

/// Result of creating a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New(Box<JobRecord>),
    Existing(Box<JobRecord>),
    Conflict,
}

type FlushReply = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The group-commit thread. When the last `Store` handle goes, it closes the
/// channel and joins the thread, so the database (and its file lock) is
/// released by the time the store is dropped: a restart in the same process
/// can open it again at once.
struct Flusher {
    tx: Mutex<Option<std::sync::mpsc::Sender<FlushReply>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Flusher {
    fn send(&self, reply: FlushReply) -> Result<(), StoreError> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match tx.as_ref() {
            Some(tx) => tx.send(reply).map_err(|_| StoreError::FlusherGone),
            None => Err(StoreError::FlusherGone),
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

#[derive(Clone)]
pub struct Store {
    jobs: sled::Tree,
    specs: sled::Tree,
    batches: sled::Tree,
    open: sled::Tree,
    events: sled::Tree,
    seen: sled::Tree,
    inbox: sled::Tree,
    outbox: sled::Tree,
    failures: sled::Tree,
    meta: sled::Tree,
    ids: sled::Tree,
    licenses: sled::Tree,
    users: sled::Tree,
    flusher: Arc<Flusher>,
    spec_cache: Arc<Mutex<HashMap<String, Arc<JobSpec>>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            source: sled::Error::Io(e),
        })?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            // The working set is small (batch records, not pairs); a modest
            // cache keeps the daemon's memory flat.
            .cache_capacity(16 << 20)
            .flush_every_ms(Some(200))
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.display().to_string(),
                source,
            })?;
        let tree = |name: &str| db.open_tree(name);
        let (tx, rx) = std::sync::mpsc::channel::<FlushReply>();
        let flush_db = db.clone();
        // Group commit: every waiter that arrives while a flush runs shares
        // the next one, so concurrent notifications cost one fsync together.
        let thread = std::thread::Builder::new()
            .name("vppd-flush".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    while let Ok(w) = rx.try_recv() {
                        waiters.push(w);
                    }
                    let result = flush_db.flush().map(|_| ()).map_err(|e| e.to_string());
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
            })
            .map_err(|e| StoreError::Open {
                path: dir.display().to_string(),
                source: sled::Error::Io(e),
            })?;
        let flusher = Arc::new(Flusher {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        });
        Ok(Store {
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
            flusher,
            spec_cache: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flusher.send(tx)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Abort(format!("flush failed: {e}"))),
            Err(_) => Err(StoreError::FlusherGone),
        }
    }

    /// Runs `f` as one serializable transaction over the state trees.
    pub fn tx<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
        let trees = (
            &self.jobs,
            &self.batches,
            &self.open,
            &self.events,
            &self.outbox,
            &self.failures,
            &self.inbox,
            &self.specs,
            &self.ids,
        );
        let r = sled::Transactional::transaction(
            &trees,
            |(jobs, batches, open, events, outbox, failures, inbox, specs, ids)| {
                f(&Tx {
                    jobs,
                    batches,
                    open,
                    events,
                    outbox,
                    failures,
                    inbox,
                    specs,
                    ids,
                })
            },
        );
        Ok(r?)
    }

    /// Stores a new job atomically (record and spec), or finds the existing
    /// one with the same id.
    pub fn create_job(&self, spec: &JobSpec, record: &JobRecord) -> Result<Created, StoreError> {
        let spec_bytes = encode(spec)?;
        let created = self.tx(|tx| {
            if let Some(existing) = tx.job(&spec.id)? {
                return Ok(if existing.spec_hash == record.spec_hash {
                    Created::Existing(Box::new(existing))
                } else {
                    Created::Conflict
                });
            }
            let mut record = record.clone();
            record.seq = tx.next_id()?;
            tx.put_job(&record)?;
            tx.specs.insert(spec.id.as_bytes(), spec_bytes.clone())?;
            Ok(Created::New(Box::new(record)))
        })?;
        Ok(created)
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        match self.jobs.get(id.as_bytes())? {
            Some(b) => Ok(Some(decode(id.as_bytes(), &b)?)),
            None => Ok(None),
        }
    }

    /// Every job, in creation order.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut jobs = Vec::new();
        for item in self.jobs.iter() {
            let (k, v) = item?;
            jobs.push(decode::<JobRecord>(&k, &v)?);
        }
        jobs.sort_by_key(|j| j.seq);
        Ok(jobs)
    }

    pub fn spec(&self, id: &str) -> Result<Option<Arc<JobSpec>>, StoreError> {
        if let Some(s) = self.cache().get(id) {
            return Ok(Some(s.clone()));
        }
        let Some(bytes) = self.specs.get(id.as_bytes())? else {
            return Ok(None);
        };
        let spec: Arc<JobSpec> = Arc::new(decode(id.as_bytes(), &bytes)?);
        self.cache().insert(id.to_string(), spec.clone());
        Ok(Some(spec))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<JobSpec>>> {
        self.spec_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes a job in one transaction; `None` if it does not exist.
    pub fn update_job(
        &self,
        id: &str,
        f: impl Fn(&mut JobRecord),
    ) -> Result<Option<JobRecord>, StoreError> {
        self.tx(|tx| {
            let Some(mut job) = tx.job(id)? else {
                return Ok(None);
            };
            f(&mut job);
            job.maybe_complete();
            tx.put_job(&job)?;
            Ok(Some(job))
        })
    }

    pub fn batch(&self, job_id: &str, no: u32) -> Result<Option<BatchRecord>, StoreError> {
        let key = batch_key(job_id, no);
        match self.batches.get(&key)? {
            Some(b) => Ok(Some(decode(&key, &b)?)),
            None => Ok(None),
        }
    }

    pub fn batches_of(&self, job_id: &str) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.batches.scan_prefix(job_prefix(job_id)) {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Batches not yet decided of one token, through the open-batch index.
    pub fn open_batches(&self, token: &str) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.open.iter() {
            let (k, t) = item?;
            if t.as_ref() != token.as_bytes() {
                continue;
            }
            if let Some(v) = self.batches.get(&k)? {
                let b: BatchRecord = decode(&k, &v)?;
                if b.state != BatchState::Decided {
                    out.push(b);
                }
            }
        }
        Ok(out)
    }

    pub fn event(&self, event_id: &str) -> Result<Option<EventRef>, StoreError> {
        match self.events.get(event_id.as_bytes())? {
            Some(b) => Ok(Some(decode(event_id.as_bytes(), &b)?)),
            None => Ok(None),
        }
    }

    /// Records a notification for later application, deduplicated on its
    /// notificationId, in one transaction. Call [`Store::flush`] before
    /// acknowledging it.
    pub fn record_notification(
        &self,
        notification_id: &str,
        envelope: &[u8],
    ) -> Result<Recorded, StoreError> {
        let now = now_ms().to_be_bytes();
        // Only the two trees it touches: the hot path of the listener.
        let r = sled::Transactional::transaction(&(&self.seen, &self.inbox), |(seen, inbox)| {
            if seen.get(notification_id.as_bytes())?.is_some() {
                return Ok(Recorded::Duplicate);
            }
            seen.insert(notification_id.as_bytes(), &now)?;
            let id = inbox.generate_id()?;
            inbox.insert(&id.to_be_bytes(), envelope)?;
            Ok::<_, ConflictableTransactionError<StoreError>>(Recorded::New)
        });
        Ok(r?)
    }

    /// Forgets notificationIds recorded before `cutoff_ms`: Apple redelivers
    /// within minutes, so a week of dedupe keys is plenty, and the tree must
    /// not grow without bound across rollouts. Returns how many were removed.
    pub fn prune_seen(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
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

    /// The oldest recorded notifications not yet applied.
    pub fn inbox(&self, max: usize) -> Result<Vec<InboxItem>, StoreError> {
        let mut out = Vec::new();
        for item in self.inbox.iter().take(max) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    pub fn inbox_len(&self) -> usize {
        self.inbox.len()
    }

    /// Up to `max` install commands' worth of outbox entries, oldest first.
    pub fn outbox(&self, max_pairs: usize) -> Result<Vec<(Vec<u8>, OutboxEntry)>, StoreError> {
        let mut out = Vec::new();
        let mut pairs = 0;
        for item in self.outbox.iter() {
            if pairs >= max_pairs {
                break;
            }
            let (k, v) = item?;
            let entry: OutboxEntry = decode(&k, &v)?;
            pairs += entry.pairs.len();
            out.push((k.to_vec(), entry));
        }
        Ok(out)
    }

    /// Marks delivered commands released: the first `taken` pairs of each
    /// entry leave the outbox, and the job counters move, in one transaction.
    pub fn ack_outbox(
        &self,
        consumed: &[(Vec<u8>, usize)],
    ) -> Result<Vec<(String, JobState)>, StoreError> {
        self.tx(|tx| {
            let mut per_job: HashMap<String, u64> = HashMap::new();
            for (key, taken) in consumed {
                let Some(mut entry) = Tx::get::<OutboxEntry>(tx.outbox, key)? else {
                    continue;
                };
                let taken = (*taken).min(entry.pairs.len());
                *per_job.entry(entry.job_id.clone()).or_default() += taken as u64;
                if taken == entry.pairs.len() {
                    tx.outbox.remove(key.as_slice())?;
                } else {
                    entry.pairs.drain(..taken);
                    Tx::put(tx.outbox, key, &entry)?;
                }
            }
            let mut finished = Vec::new();
            for (job_id, n) in per_job {
                if let Some(mut job) = tx.job(&job_id)? {
                    job.installs.released += n;
                    job.installs.pending = job.installs.pending.saturating_sub(n);
                    let before = job.state;
                    job.maybe_complete();
                    if before != job.state {
                        finished.push((job.id.clone(), job.state));
                    }
                    tx.put_job(&job)?;
                }
            }
            Ok(finished)
        })
    }

    /// Failures of a job in batch order, at most `limit`; and whether more exist.
    pub fn failures(&self, job_id: &str, limit: usize) -> Result<(Vec<Failure>, bool), StoreError> {
        let Some(spec) = self.spec(job_id)? else {
            return Ok((Vec::new(), false));
        };
        let mut batches: HashMap<u32, BatchRecord> = HashMap::new();
        let mut out = Vec::new();
        let prefix = job_prefix(job_id);
        for item in self.failures.scan_prefix(&prefix) {
            if out.len() >= limit {
                return Ok((out, true));
            }
            let (k, v) = item?;
            if k.len() != prefix.len() + 8 {
                continue;
            }
            let mut no = [0u8; 4];
            no.copy_from_slice(&k[prefix.len()..prefix.len() + 4]);
            let mut pair = [0u8; 4];
            pair.copy_from_slice(&k[prefix.len() + 4..]);
            let no = u32::from_be_bytes(no);
            let pair = u32::from_be_bytes(pair);
            let record: FailureRecord = decode(&k, &v)?;
            let batch = match batches.get(&no) {
                Some(b) => b,
                None => match self.batch(job_id, no)? {
                    Some(b) => batches.entry(no).or_insert(b),
                    None => continue,
                },
            };
            let (asset, target) = batch.rect.pair_at(pair);
            let Some(asset) = spec.assets.get(asset as usize) else {
                continue;
            };
            let targets = spec.targets(batch.phase);
            let (serial_number, client_user_id) = match target {
                Ok(s) => (targets.serial_numbers.get(s as usize).cloned(), None),
                Err(u) => (None, targets.client_user_ids.get(u as usize).cloned()),
            };
            out.push(Failure {
                adam_id: asset.adam_id.clone(),
                pricing_param: asset.pricing_param.clone(),
                serial_number,
                client_user_id,
                error_number: record.error_number,
                error_message: record.error_message,
                event_id: record.event_id,
                phase: (batch.phase == Phase::Disassociate).then_some(Phase::Disassociate),
            });
        }
        Ok((out, false))
    }

    pub fn meta_get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.meta.get(key.as_bytes())? {
            Some(b) => Ok(Some(decode(key.as_bytes(), &b)?)),
            None => Ok(None),
        }
    }

    pub fn meta_put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.meta.insert(key.as_bytes(), encode(value)?)?;
        Ok(())
    }

    pub fn put_license(
        &self,
        token: &str,
        adam_id: &str,
        pricing: &str,
        value: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let key = format!("{token}\0{adam_id}\0{pricing}");
        self.licenses.insert(key.as_bytes(), encode(value)?)?;
        Ok(())
    }

    pub fn license(
        &self,
        token: &str,
        adam_id: &str,
        pricing: &str,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let key = format!("{token}\0{adam_id}\0{pricing}");
        match self.licenses.get(key.as_bytes())? {
            Some(b) => Ok(Some(decode(key.as_bytes(), &b)?)),
            None => Ok(None),
        }
    }

    pub fn put_user(
        &self,
        token: &str,
        client_user_id: &str,
        value: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let key = format!("{token}\0{client_user_id}");
        self.users.insert(key.as_bytes(), encode(value)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_dedupe_keys_are_pruned_and_recent_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.record_notification("a", b"{}").unwrap(),
            Recorded::New
        );
        assert_eq!(
            store.record_notification("a", b"{}").unwrap(),
            Recorded::Duplicate
        );
        assert_eq!(store.prune_seen(0).unwrap(), 0);
        assert_eq!(
            store.record_notification("a", b"{}").unwrap(),
            Recorded::Duplicate
        );
        assert_eq!(store.prune_seen(now_ms() + 1).unwrap(), 1);
        assert_eq!(
            store.record_notification("a", b"{}").unwrap(),
            Recorded::New
        );
    }

    #[test]
    fn dropping_the_last_handle_releases_the_database() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..3 {
            let store = Store::open(dir.path()).unwrap();
            let again = store.clone();
            drop(store);
            assert!(again.record_notification("x", b"{}").is_ok());
            drop(again);
        }
    }

    #[test]
    fn bitmap_round_trips_through_json() {
        let mut b = Bitmap::new(130);
        assert!(b.set(0));
        assert!(b.set(129));
        assert!(!b.set(129));
        assert!(!b.set(500));
        let json = serde_json::to_string(&b).unwrap();
        let back: Bitmap = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
        assert!(back.get(0) && back.get(129) && !back.get(64));
    }
}
