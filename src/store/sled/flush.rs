//! The sled backend's group commit: one thread flushes sled's log for
//! every waiter that arrived while the previous flush ran, so concurrent
//! commits cost one sync together.
//!
//! sled's flush writes the log and waits with `sync_file_range`, which
//! neither flushes the disk's cache nor covers the blob files it writes
//! for large values: a power cut could lose what it called stable. After
//! each flush this thread makes it stable for real: every new blob file
//! and the blob directory with fsync, then the log with fdatasync.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::store::StoreError;

type FlushReply = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The group-commit thread. When the store goes, it closes the channel and
/// joins the thread, so the database (and its file lock) is released by the
/// time the store is dropped: a restart in the same process can open it
/// again at once.
pub(super) struct Flusher {
    tx: Mutex<Option<std::sync::mpsc::Sender<FlushReply>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Flusher {
    /// `dir` is sled's directory (its log file `db`, its `blobs`).
    pub(super) fn start(db: ::sled::Db, dir: &Path) -> std::io::Result<Flusher> {
        let mut syncer = Syncer::open(dir)?;
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
                    let result = db
                        .flush()
                        .map_err(|e| e.to_string())
                        .and_then(|_| syncer.sync().map_err(|e| e.to_string()));
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
                // The store is closing: whatever was not flushed (a last
                // fold) is made durable now rather than redone at start.
                let closed = db
                    .flush()
                    .map_err(|e| e.to_string())
                    .and_then(|_| syncer.sync().map_err(|e| e.to_string()));
                if let Err(error) = closed {
                    tracing::warn!(%error, "cannot flush the store while closing it");
                }
            })?;
        Ok(Flusher {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Resolves once everything written before the call is on disk.
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
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

/// What makes sled's files stable after its flush.
struct Syncer {
    log: File,
    blobs: PathBuf,
    /// Blob files already synced (sled never rewrites one).
    synced: HashSet<OsString>,
}

impl Syncer {
    fn open(dir: &Path) -> std::io::Result<Syncer> {
        let log = File::open(dir.join("db"))?;
        // The log's and the directories' own entries, once: a store just
        // created must not vanish with them.
        for d in [dir, dir.parent().unwrap_or(dir)] {
            File::open(d)?.sync_all()?;
        }
        log.sync_all()?;
        let mut syncer = Syncer {
            log,
            blobs: dir.join("blobs"),
            synced: HashSet::new(),
        };
        syncer.sync()?;
        Ok(syncer)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        let mut present = HashSet::new();
        let mut new = false;
        match std::fs::read_dir(&self.blobs) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    let name = entry.file_name();
                    if !self.synced.contains(&name) {
                        match File::open(entry.path()) {
                            Ok(f) => f.sync_all()?,
                            // Collected by sled meanwhile.
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(e),
                        }
                        new = true;
                    }
                    present.insert(name);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if new {
            File::open(&self.blobs)?.sync_all()?;
        }
        self.synced = present;
        self.log.sync_data()
    }
}
