//! A durable marker, kept beside the store in data_dir but outside it, of
//! what the store must at least contain. A store that holds less (truncated,
//! overwritten by an old copy, deleted) is refused at start instead of
//! silently running on an older past: jobs would vanish or go back to
//! `running`, and commands acknowledged by the MDM could be released again.
//!
//! With `[store] kind = "postgres"` there is no file: replicas share one
//! database and none has the store on its own disk (a marker per replica
//! would hold whatever that replica last saw, and replicas come and go).
//! The database keeps its own watermark instead, in `meta`
//! ([`check_shared`]): it catches rows or tables deleted inside a database
//! that is otherwise intact. A whole database restored from an older backup
//! takes its watermark back with it; that is the vendor's deliberate act
//! (docs/operator-guide.md, "A database that lost rows").
//!
//! The marker lags the store (it is rewritten at start, every
//! [`MARKER_EVERY`] and at shutdown), so it catches losses older than that,
//! which is what damage and stale restores are.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// How often the running daemon rewrites the marker.
pub const MARKER_EVERY: Duration = Duration::from_secs(30);

const FILE: &str = "store-marker.json";

/// What a store holds, in figures that never decrease while it is intact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub generation: u64,
    pub jobs: u64,
    pub finished: u64,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

fn read(data_dir: &Path) -> Result<Option<Watermark>, StoreError> {
    let file = path(data_dir);
    match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: file.display().to_string(),
                message: format!(
                    "{e}; restore it with data_dir, or delete it and start with `vppd run --accept-store-loss`"
                ),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Open {
            path: file.display().to_string(),
            source: Box::new(e),
        }),
    }
}

/// Writes the marker atomically: a temporary file, fsynced, renamed over the
/// old one, and the directory fsynced, so a crash leaves the old or the new
/// marker, never half of one.
pub fn write(data_dir: &Path, mark: &Watermark) -> Result<(), StoreError> {
    let file = path(data_dir);
    let io = |e: std::io::Error| StoreError::Open {
        path: file.display().to_string(),
        source: Box::new(e),
    };
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let bytes = serde_json::to_vec(mark).map_err(|e| StoreError::Encode(e.to_string()))?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, &file).map_err(io)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// Reads the store's watermark and writes it as the new marker.
pub async fn refresh(data_dir: &Path, store: &dyn Store) -> Result<(), StoreError> {
    let mark = store.watermark().await?;
    write(data_dir, &mark)
}

/// Before opening: a marker without a store means the store is gone.
/// Refused here, because opening would create an empty store in its place
/// (and the next start would find that instead).
pub fn check_present(data_dir: &Path, existed: bool, accept_loss: bool) -> Result<(), StoreError> {
    if existed || accept_loss || read(data_dir)?.is_none() {
        return Ok(());
    }
    Err(StoreError::WentBackwards {
        data_dir: data_dir.display().to_string(),
        what: "the store is gone: data_dir has a marker but no store".to_string(),
    })
}

/// Compares a freshly opened store with the marker and, when it holds at
/// least as much (or the loss is accepted), writes the new marker.
/// `existed`: whether the store's files were there before opening.
pub async fn check(
    data_dir: &Path,
    store: &dyn Store,
    existed: bool,
    accept_loss: bool,
) -> Result<(), StoreError> {
    let now = store.watermark().await?;
    if let Some(before) = read(data_dir)? {
        let mut lost = Vec::new();
        if !existed {
            lost.push("the store is gone: data_dir has a marker but no store".to_string());
        }
        lost.extend(compare(&before, &now));
        if !lost.is_empty() {
            let what = lost.join("; ");
            if !accept_loss {
                return Err(StoreError::WentBackwards {
                    data_dir: data_dir.display().to_string(),
                    what,
                });
            }
            tracing::warn!(data_dir = %data_dir.display(), lost = %what, "store holds less than its marker; starting on what is left (--accept-store-loss)");
        }
    }
    write(data_dir, &now)
}

/// Where the shared database keeps its own watermark.
const SHARED_KEY: &str = "store/watermark";

async fn read_shared(store: &dyn Store) -> Result<Option<Watermark>, StoreError> {
    let Some(text) = store.meta(SHARED_KEY).await? else {
        return Ok(None);
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            key: format!("meta/{SHARED_KEY}"),
            message: format!(
                "{e}; start one replica with `vppd run --accept-store-loss` to record it anew"
            ),
        })
}

/// Records the shared database's watermark in the database itself.
pub async fn refresh_shared(store: &dyn Store) -> Result<(), StoreError> {
    let mark = store.watermark().await?;
    let text = serde_json::to_string(&mark).map_err(|e| StoreError::Encode(e.to_string()))?;
    store.put_meta(SHARED_KEY, &text).await
}

/// [`check`] for the shared database: compares what it holds with the
/// watermark recorded in it. `origin` names the database (the URL file,
/// never the URL). With `accept_loss`, the watermark is recorded anew from
/// what is there; a corrupt one too.
pub async fn check_shared(
    store: &dyn Store,
    origin: &str,
    accept_loss: bool,
) -> Result<(), StoreError> {
    // The recorded watermark first, then what is there: every figure only
    // grows, so another replica starting (or taking jobs) meanwhile can
    // raise `now` past `before` but never make it look lower. Read the
    // other way round, two replicas starting on one database together saw
    // each other's newer generation as a loss.
    let before = match read_shared(store).await {
        Ok(before) => before,
        Err(e) if accept_loss => {
            tracing::warn!(error = %e, "the database's watermark is unreadable; recording it anew (--accept-store-loss)");
            None
        }
        Err(e) => return Err(e),
    };
    let now = store.watermark().await?;
    if let Some(before) = before {
        let lost = compare(&before, &now);
        if !lost.is_empty() {
            let what = lost.join("; ");
            if !accept_loss {
                return Err(StoreError::DatabaseWentBackwards {
                    url_file: origin.to_string(),
                    what,
                });
            }
            tracing::warn!(database = %origin, lost = %what, "the database holds less than its watermark; starting on what is left (--accept-store-loss)");
        }
    }
    let text = serde_json::to_string(&now).map_err(|e| StoreError::Encode(e.to_string()))?;
    store.put_meta(SHARED_KEY, &text).await
}

/// What `now` lacks against `before`, in words.
fn compare(before: &Watermark, now: &Watermark) -> Vec<String> {
    let mut lost = Vec::new();
    if now.generation < before.generation {
        lost.push(format!(
            "generation {} < {} recorded",
            now.generation, before.generation
        ));
    }
    if now.jobs < before.jobs {
        lost.push(format!("{} jobs < {} recorded", now.jobs, before.jobs));
    }
    if now.finished < before.finished {
        lost.push(format!(
            "{} finished jobs < {} recorded",
            now.finished, before.finished
        ));
    }
    lost
}

/// Runs `open` and turns a panic inside the store engine (sled panics on
/// some damaged files) into [`StoreError::Damaged`], so that vppd exits with
/// that error instead of aborting on every start.
pub fn guard_panics<T>(
    data_dir: &Path,
    open: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    OPENING.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(open));
    OPENING.store(false, std::sync::atomic::Ordering::SeqCst);
    r.unwrap_or_else(|panic| {
        Err(StoreError::Damaged {
            data_dir: data_dir.display().to_string(),
            message: panic_message(panic.as_ref()),
        })
    })
}

/// Set while [`guard_panics`] runs, so the process panic hook leaves the
/// panic to it.
pub static OPENING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}
