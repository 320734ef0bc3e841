//! The sled backend's group commit: one thread flushes sled's log for
//! every waiter that arrived while the previous flush ran, so concurrent
//! commits cost one fsync together.

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
    pub(super) fn start(db: ::sled::Db) -> std::io::Result<Flusher> {
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
