//! Stores written by an earlier vppd open and continue: the records, keys
//! and tables this vppd reads are those vppd f881024 wrote.
//!
//! The fixtures in `tests/fixtures/store-f881024/` were made with the
//! release binary of commit f881024, against its simulator (generated
//! tokens, good for the simulator only), with the configuration and jobs
//! beside them (paths under /tmp/fx):
//!
//! ```sh
//! vppd sim --listen 127.0.0.1:18443 --token-file main.vpptoken \
//!     --token-file extra.vpptoken --asset 100000001=20 --asset 100000002=20 \
//!     --disassociate-missing-fails &
//! vppd sink --listen 127.0.0.1:18000 &
//! vppd run --config fx-sled.toml &
//! vppd submit job-a.json          # fx-finished: 2 installs, 2 failed disassociations
//! # once it completed: stop the sink, so that the next job's commands stay
//! vppd submit job-b.json          # fx-outbox: 3 installs confirmed, not delivered
//! vppd token add extra extra.vpptoken
//! # once fx-outbox's installs were confirmed and the drift followers ran:
//! kill -TERM %3                   # the daemon drains and stops
//! ```
//!
//! `sled/` is that data_dir. `postgres.sql` is the same run with
//! `fx-postgres.toml` (`[store] kind = "postgres"`, schema `fx`, under
//! `scripts/with-postgres.sh`), dumped with
//! `pg_dump --column-inserts --no-owner --no-privileges --schema=fx`, its
//! psql-only `\restrict` and `\unrestrict` lines removed.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::pg;
use sha2::Digest;
use vppd::domain::job::{JobSpec, JobState};
use vppd::domain::lifecycle::{JobChange, JobRecord, now_ms};
use vppd::domain::plan::Shape;
use vppd::store::postgres::PostgresStore;
use vppd::store::{Created, OutboxAck, Store};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-f881024");

const SHAPE: Shape = Shape {
    max_assets: 25,
    max_serials: 1000,
    max_users: 1000,
    max_revoke_serials: 1000,
    max_revoke_users: 1000,
};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A new job like `fx-outbox`, under another id.
async fn new_job(store: &dyn Store, id: &str) -> (Arc<JobSpec>, JobRecord) {
    let mut spec = JobSpec::clone(&store.spec(&"fx-outbox".into()).await.unwrap().unwrap());
    spec.id = id.into();
    let hash = hex::encode(sha2::Sha256::digest(serde_json::to_vec(&spec).unwrap()));
    let record = JobRecord::new(&spec, hash, SHAPE, now_ms());
    (Arc::new(spec), record)
}

/// Everything the fixture holds reads back.
async fn reads_back(store: &dyn Store) {
    let jobs = store.jobs().await.unwrap();
    let ids: Vec<&str> = jobs.iter().map(|j| j.id().as_str()).collect();
    assert_eq!(ids, ["fx-finished", "fx-outbox"]);
    assert_eq!(jobs[0].state(), JobState::Completed);
    assert_eq!(jobs[1].state(), JobState::Running);
    assert_eq!(store.jobs_of("main").await.unwrap().len(), 2);

    let spec = store.spec(&"fx-finished".into()).await.unwrap().unwrap();
    assert_eq!(spec.assets.len(), 1);
    let (failures, more) = store.failures(&"fx-finished".into(), 10).await.unwrap();
    assert_eq!(failures.len(), 2);
    assert!(!more);

    let batches = store.batches_of(&"fx-finished".into()).await.unwrap();
    assert_eq!(batches.len(), 2);
    for batch in &batches {
        for event in batch.events() {
            let found = store.event(event).await.unwrap().unwrap();
            assert_eq!(
                (found.job_id.as_str(), found.batch),
                ("fx-finished", batch.no())
            );
        }
    }
    assert!(store.open_batches("main").await.unwrap().is_empty());

    let licenses = store.licenses("main").await.unwrap();
    assert_eq!(licenses.len(), 2);
    let confirmed = store
        .license("main", "100000002", "STDQ")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(confirmed.assigned_count, 3);

    let tokens = store.tokens().await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].name, "extra");
    assert!(store.drift("main").await.unwrap().is_some());
    assert!(store.drift("extra").await.unwrap().is_some());
    assert_eq!(store.inbox_len().await.unwrap(), 0);
}

/// The store continues: the waiting commands are acknowledged and finish
/// their job, a change applies, a new job takes the next place.
async fn continues(store: &dyn Store) {
    let outbox = store.outbox(100).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].entry.job_id, "fx-outbox");
    assert_eq!(outbox[0].entry.pairs.len(), 3);
    let acks: Vec<OutboxAck> = outbox
        .iter()
        .map(|i| OutboxAck {
            entry: i.id,
            pairs: i.entry.pairs.clone(),
        })
        .collect();
    let released = store.ack_outbox(&acks).await.unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].commands, 3);
    assert_eq!(released[0].finished, Some(JobState::Completed));
    assert!(store.outbox(100).await.unwrap().is_empty());

    let (spec, record) = new_job(store, "fx-new").await;
    let Created::New(created) = store.create_job(&spec, record).await.unwrap() else {
        panic!("fx-new is new");
    };
    let before = store.job(&"fx-outbox".into()).await.unwrap().unwrap();
    assert!(created.seq() > before.seq());
    let started = store
        .update_job(&"fx-new".into(), JobChange::Start)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(started.state(), JobState::Running);
    let batch = store
        .start_batch(&"fx-new".into(), SHAPE)
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .batch_sent(&"fx-new".into(), batch.no(), &"fx-new-event".into())
            .await
            .unwrap()
    );
    let found = store.event(&"fx-new-event".into()).await.unwrap().unwrap();
    assert_eq!(found.job_id, "fx-new");

    let mark = store.watermark().await.unwrap();
    assert_eq!((mark.jobs, mark.finished), (3, 2));
}

/// What `continues` changed, after a reopen.
async fn kept(store: &dyn Store) {
    let ids: Vec<String> = store
        .jobs()
        .await
        .unwrap()
        .iter()
        .map(|j| j.id().to_string())
        .collect();
    assert_eq!(ids, ["fx-finished", "fx-outbox", "fx-new"]);
    let done = store.job(&"fx-outbox".into()).await.unwrap().unwrap();
    assert_eq!(done.state(), JobState::Completed);
    assert_eq!(store.open_batches("main").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_of_f881024_opens_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(&Path::new(FIXTURES).join("sled"), &data);
    // git keeps no empty directory.
    std::fs::create_dir_all(data.join("db/blobs")).unwrap();
    {
        // Its marker too: the store holds what it says.
        let store = vppd::store::open(&data, false).await.unwrap();
        reads_back(store.as_ref()).await;
        continues(store.as_ref()).await;
    }
    let store = vppd::store::open(&data, false).await.unwrap();
    kept(store.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_of_f881024_opens_and_continues() {
    let Some(base) = pg::server_url("a_postgres_store_of_f881024_opens_and_continues") else {
        return;
    };
    let schema = pg::fresh_name("compat");
    let dump = std::fs::read_to_string(Path::new(FIXTURES).join("postgres.sql")).unwrap();
    let dump = dump
        .replace("CREATE SCHEMA fx;", &format!("CREATE SCHEMA {schema};"))
        .replace("fx.", &format!("{schema}."));
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    client.batch_execute(&dump).await.unwrap();
    drop(client);
    let _ = task.await;
    let url = pg::schema_url(&base, &schema).await;
    {
        let store: Arc<dyn Store> = Arc::new(PostgresStore::open(&url, "f").await.unwrap());
        vppd::store::marker::check_shared(store.as_ref(), "f", false)
            .await
            .unwrap();
        reads_back(store.as_ref()).await;
        continues(store.as_ref()).await;
    }
    let store: Arc<dyn Store> = Arc::new(PostgresStore::open(&url, "f").await.unwrap());
    kept(store.as_ref()).await;
}
