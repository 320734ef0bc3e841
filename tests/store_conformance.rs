//! The store conformance suite (`tests/conformance`) against the sled
//! backend, on disk in a temporary directory. Another backend runs the same
//! suite with its own `open`.

mod conformance;

use std::sync::Arc;

use vppd::store::Store;
use vppd::store::sled::SledStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    conformance::run(|name| {
        let path = root.join(name);
        async move { Arc::new(SledStore::open(&path).unwrap()) as Arc<dyn Store> }
    })
    .await;
}
