//! The store conformance suite (`tests/conformance`) against the sled
//! backend, on disk in a temporary directory: one test per check.

#[macro_use]
mod conformance;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use vppd::store::Store;
use vppd::store::sled::SledStore;

type Opening = Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>>;

/// A check's stores: each name a directory of the check's own temporary
/// one, removed with the opener.
fn stores(_check: &str) -> Option<impl Fn(String) -> Opening> {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    Some(move |name: String| {
        let path = dir.path().join(name);
        Box::pin(async move { Arc::new(SledStore::open(&path).unwrap()) as Arc<dyn Store> })
            as Opening
    })
}

conformance_suite!(stores);
