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
//!   `keys::encode_parked` lays them out; `batch_sent` moves them back into
//!   the inbox in its own commit.
//! - `parked_at`: park time, inbox id -> eventId: the expiry order.
//! - `outbox`: id -> [`OutboxEntry`], install commands not yet acknowledged.
//! - `failures`: job id, 0, batch number, pair -> `FailureRecord`.
//! - `meta`: small named values, and each token's drift record.
//!   `licenses`, `users`: per token.
//! - `held`: token, 0, id -> [`OutboxEntry`], installs for user targets
//!   waiting for their user to be `Associated`.
//! - `ids`: sled's id generator, for creation order and inbox/outbox ids;
//!   and the count of pruned jobs.
//!
//! Changes: one writer at a time ([`tx`]); a commit is one sled
//! transaction, then a flush. Flushes are group commits ([`flush`]):
//! every caller that arrives while one runs shares the next, so concurrent
//! commits cost one fsync together. A fold is not flushed on its own
//! ([`Store::fold`] says why that is safe); the next flush, sled's own
//! every 200 ms, or the one when the store closes covers it. Each sled
//! transaction writes the log twice whatever it holds, so an outbox
//! acknowledgement made while notifications wait rides on the next fold's
//! commit ([`Backend::ride_acks`]). The listener's record is two plain
//! writes, outside the writer lock.
//!
//! [`Store`]: crate::store::Store
//! [`Store::fold`]: crate::store::Store::fold

mod flush;
mod keys;
mod reads;
mod tx;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde::de::DeserializeOwned;

use self::flush::Flusher;
use self::keys::{PRUNED_KEY, id_of, pruned_count};
use self::tx::{SledTx, T};
use super::leases::LocalLeases;
use super::stored::{Backend, Durability, Stored};
use super::{InboxId, InboxItem, Lease, Recorded, StoreError, TokenRecord};
use crate::domain::lifecycle::now_ms;

#[cfg(doc)]
use crate::domain::job::JobSpec;
#[cfg(doc)]
use crate::domain::lifecycle::{BatchRecord, EventRef, JobRecord, OutboxEntry};

type R<T> = Result<T, StoreError>;

/// A parked notification due to expire: its `parked_at` key, inbox id and
/// eventId.
type Due = (Vec<u8>, u64, Vec<u8>);

/// The sled store: [`Stored`] over [`Sled`].
pub type SledStore = Stored<Sled>;

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

fn decode<V: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> R<V> {
    super::decode(&String::from_utf8_lossy(key).replace('\0', "/"), bytes)
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

/// The sled backend of [`Stored`].
pub struct Sled {
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
    /// For its id generator (the watermark's generation, inbox ids).
    db: ::sled::Db,
    /// The one writer: held by a transaction from its first read to its
    /// commit.
    writer: tokio::sync::Mutex<()>,
    /// Each job record as last decoded, with the bytes it was decoded
    /// from: a record whose bytes have not changed is not decoded again
    /// (see `scan_jobs`).
    job_cache: Mutex<HashMap<::sled::IVec, (::sled::IVec, crate::domain::lifecycle::JobRecord)>>,
    /// Leases live in memory: sled is one process's store (it locks the
    /// directory), so every lease is this process's.
    leases: LocalLeases,
    /// Where sled keeps its files, for [`crate::store::Store::stats`].
    path: std::path::PathBuf,
    // Last: dropped after the trees, it joins the thread holding the db.
    flusher: Flusher,
}

impl SledStore {
    /// Whether a store was ever created in `dir`.
    pub fn exists(dir: &Path) -> bool {
        dir.join("db").exists()
    }

    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        Sled::open(dir).map(Stored::new)
    }
}

impl Sled {
    fn open(dir: &Path) -> R<Sled> {
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
        super::files::restrict_permissions(dir).map_err(|e| open_error(Box::new(e)))?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| open_failed(dir, e));
        Ok(Sled {
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
            writer: tokio::sync::Mutex::new(()),
            job_cache: Mutex::new(HashMap::new()),
            leases: LocalLeases::default(),
            path: dir.join("db"),
            flusher: Flusher::start(db.clone(), &dir.join("db"))
                .map_err(|e| open_error(Box::new(e)))?,
        })
    }

    fn tree(&self, tree: T) -> &::sled::Tree {
        match tree {
            T::Jobs => &self.jobs,
            T::Specs => &self.specs,
            T::Batches => &self.batches,
            T::Open => &self.open,
            T::Events => &self.events,
            T::Inbox => &self.inbox,
            T::Outbox => &self.outbox,
            T::Failures => &self.failures,
            T::Ids => &self.ids,
            T::Licenses => &self.licenses,
            T::Users => &self.users,
            T::Held => &self.held,
            T::Parked => &self.parked,
            T::ParkedAt => &self.parked_at,
            T::Meta => &self.meta,
            T::Tokens => &self.tokens,
            T::TokenStates => &self.token_states,
        }
    }

    fn read<V: DeserializeOwned>(tree: &::sled::Tree, key: &[u8]) -> R<Option<V>> {
        match tree.get(key)? {
            Some(b) => Ok(Some(decode(key, &b)?)),
            None => Ok(None),
        }
    }

    async fn begin_tx(&self) -> SledTx<'_> {
        SledTx {
            db: self,
            _writer: Some(self.writer.lock().await),
            writes: Default::default(),
        }
    }

    async fn commit_tx<'a>(&'a self, tx: SledTx<'a>, durability: Durability) -> R<()> {
        // The writer lock goes with the transaction: the next one may run
        // while this one's flush does, and shares it.
        tx.apply()?;
        match durability {
            Durability::Now => self.flusher.durable().await,
            Durability::Later => Ok(()),
        }
    }

    /// Parked notifications due to expire: (parked_at key, inbox id, eventId).
    fn due_parked(&self, cutoff_ms: u64, max: usize) -> R<Vec<Due>> {
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
        Ok(due)
    }

    /// Takes the due notifications out of `parked`, in `tx`.
    fn expire(tx: &mut SledTx<'_>, due: &[Due]) -> R<Vec<InboxItem>> {
        let mut expired = Vec::new();
        for (k, id, event_id) in due {
            if tx.raw(T::ParkedAt, k)?.is_none() {
                continue; // unparked meanwhile
            }
            tx.remove(T::ParkedAt, k);
            let Some(bytes) = tx.raw(T::Parked, event_id)? else {
                continue;
            };
            let (gone, keep): (Vec<_>, Vec<_>) = keys::decode_parked(event_id, &bytes)?
                .into_iter()
                .partition(|p| p.id == *id);
            if keep.is_empty() {
                tx.remove(T::Parked, event_id);
            } else {
                tx.set(T::Parked, event_id, keys::encode_parked(&keep));
            }
            expired.extend(gone.into_iter().map(|p| InboxItem {
                id: InboxId(p.id),
                envelope: p.envelope,
            }));
        }
        Ok(expired)
    }
}

impl Backend for Sled {
    type Tx<'a> = SledTx<'a>;

    async fn begin(&self) -> R<SledTx<'_>> {
        Ok(self.begin_tx().await)
    }

    async fn read(&self) -> R<SledTx<'_>> {
        Ok(SledTx {
            db: self,
            _writer: None,
            writes: Default::default(),
        })
    }

    async fn commit<'a>(&'a self, tx: SledTx<'a>, durability: Durability) -> R<()> {
        self.commit_tx(tx, durability).await
    }

    fn retry(&self, _error: &StoreError) -> bool {
        // One writer: nothing to conflict with.
        false
    }

    async fn sync(&self) -> R<()> {
        self.flusher.durable().await
    }

    fn ride_acks(&self) -> bool {
        // Notifications wait: a fold is coming soon to carry it.
        !self.inbox.is_empty()
    }

    async fn jobs(&self, token: Option<&str>) -> R<Vec<crate::domain::lifecycle::JobRecord>> {
        self.scan_jobs(token)
    }

    async fn failures(&self, id: &str, limit: usize) -> R<(Vec<super::PairFailure>, bool)> {
        self.read_failures(id, limit)
    }

    async fn open_batches(&self, token: &str) -> R<Vec<crate::domain::lifecycle::BatchRecord>> {
        self.read_open_batches(token)
    }

    async fn prunable(&self, cutoff_ms: u64) -> R<Vec<String>> {
        self.read_prunable(cutoff_ms)
    }

    async fn stats(&self) -> R<super::StoreStats> {
        self.read_stats()
    }

    async fn generation(&self) -> R<u64> {
        // sled's id generator is durable and monotonic: a store that hands
        // out a lower id than before lost commits.
        Ok(self.db.generate_id()?)
    }

    async fn pruned(&self) -> R<u64> {
        Ok(pruned_count(self.ids.get(PRUNED_KEY)?.as_deref()))
    }

    async fn record_notification(&self, notification_id: &str, envelope: &[u8]) -> R<Recorded> {
        // Two plain writes, not a transaction: a sled transaction rolls and
        // writes the log twice, which made the listener's write the
        // daemon's largest cost. The inbox goes first and the id after:
        // sled recovers a prefix of its log, so a crash in between can
        // leave the notification without its id (a resend is recorded
        // again, and folding a notification twice changes nothing), never
        // its id without the notification. A repeat is told by the id's
        // compare-and-swap alone, not by a look beforehand: the ids are
        // random keys in a tree as large as the retention window, and that
        // second walk down it was 4% of the daemon's CPU in a
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
                // concurrent delivery): answered once what was recorded is
                // on disk, with its inbox copy gone.
                self.inbox.remove(id)?;
                Recorded::Duplicate
            }
        };
        if let Err(e) = self.flusher.durable().await {
            // Undo, so that the sender's retry is recorded anew instead of
            // being taken for a duplicate of what may not be on disk.
            if recorded == Recorded::New {
                let _ = self.seen.remove(notification_id.as_bytes());
                let _ = self.inbox.remove(id);
            }
            return Err(e);
        }
        Ok(recorded)
    }

    async fn inbox(&self, max: usize) -> R<Vec<InboxItem>> {
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

    async fn inbox_len(&self) -> R<usize> {
        Ok(self.inbox.len())
    }

    async fn prune_seen(&self, cutoff_ms: u64) -> R<usize> {
        let mut removed = 0;
        for item in self.seen.iter() {
            let (k, v) = item?;
            let at = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if at < cutoff_ms {
                self.seen.remove(&k)?;
                removed += 1;
            }
        }
        self.flusher.durable().await?;
        Ok(removed)
    }

    async fn expire_parked(&self, cutoff_ms: u64, max: usize) -> R<Vec<InboxItem>> {
        let due = self.due_parked(cutoff_ms, max)?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_tx().await;
        let expired = Self::expire(&mut tx, &due)?;
        self.commit_tx(tx, Durability::Now).await?;
        Ok(expired)
    }

    async fn outbox(&self, max_commands: usize) -> R<Vec<super::OutboxItem>> {
        self.read_outbox(max_commands)
    }

    async fn held(&self, token: &str) -> R<Vec<super::OutboxItem>> {
        self.read_held(token)
    }

    async fn licenses(&self, token: &str) -> R<Vec<(String, String, super::LicenseRecord)>> {
        self.read_licenses(token)
    }

    async fn users(&self, token: &str) -> R<Vec<super::UserRecord>> {
        let mut out = Vec::new();
        for item in self.users.scan_prefix(keys::user_key(token, "").as_bytes()) {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    async fn tokens(&self) -> R<Vec<TokenRecord>> {
        self.read_tokens()
    }

    async fn token_states(&self) -> R<Vec<(String, String)>> {
        let mut out = Vec::new();
        for item in self.token_states.iter() {
            let (key, value) = item?;
            out.push((
                String::from_utf8_lossy(&key).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            ));
        }
        Ok(out)
    }

    async fn take_leases(&self, names: &[String], holder: &str, ttl: Duration) -> R<Vec<String>> {
        Ok(self.leases.take(names, holder, ttl))
    }

    async fn release_leases(&self, names: &[String], holder: &str, linger: Duration) -> R<()> {
        self.leases.release(names, holder, linger);
        Ok(())
    }

    async fn leases(&self) -> R<Vec<Lease>> {
        Ok(self.leases.list())
    }
}
