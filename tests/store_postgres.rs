//! The PostgreSQL backend: the store conformance suite against a real
//! server (`scripts/with-postgres.sh`), one test per check, then what only
//! a shared database has: migrations, several processes' stores on one
//! schema, and the URL kept out of errors.

mod common;
#[macro_use]
mod conformance;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use common::pg;
use vppd::domain::job::{JobAsset, JobSpec, Phase, Targets};
use vppd::domain::lifecycle::{Decision, JobChange};
use vppd::domain::plan::Shape;
use vppd::store::postgres::PostgresStore;
use vppd::store::{Decide, Store, StoreError};

async fn open(url: &str) -> Arc<dyn Store> {
    Arc::new(PostgresStore::open(url, "test url file").await.unwrap())
}

type Opening = Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>>;

/// A check's stores: each name a schema of its own on the test server.
fn stores(check: &str) -> Option<impl Fn(String) -> Opening> {
    let base = pg::server_url(check)?;
    let run = pg::fresh_name("conf");
    Some(move |name: String| {
        let base = base.clone();
        let schema = format!("{run}_{}", name.replace('-', "_"));
        Box::pin(async move { open(&pg::schema_url(&base, &schema).await).await }) as Opening
    })
}

conformance_suite!(stores);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_migrate_once_and_agree() {
    let Some(base) = pg::server_url("replicas_starting_together_migrate_once_and_agree") else {
        return;
    };
    let url = pg::schema_url(&base, &pg::fresh_name("migrate")).await;
    let mut opens = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let url = url.clone();
        opens.spawn(async move { PostgresStore::open(&url, "f").await.map(|_| ()) });
    }
    while let Some(r) = opens.join_next().await {
        r.unwrap().unwrap();
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let versions: Vec<i64> = client
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // One version per file of migrations/, each applied and recorded once.
    let known = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count() as i64;
    let all: Vec<i64> = (1..=known).collect();
    assert_eq!(versions, all, "each migration applied and recorded once");

    // A schema from a newer vppd is refused, not misread.
    client
        .execute("INSERT INTO schema_version (version) VALUES (999)", &[])
        .await
        .unwrap();
    let err = PostgresStore::open(&url, "f").await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::SchemaTooNew {
                found: 999,
                known: k
            } if k == known
        ),
        "{err}"
    );
}

#[tokio::test]
async fn the_url_never_appears_in_errors() {
    let Some(base) = pg::server_url("the_url_never_appears_in_errors") else {
        return;
    };
    // The right server with a role it does not know (the test server trusts
    // loopback, so a wrong password alone would pass), and a server that is
    // not there.
    let url = url_of_unknown_role(&base, "Sekr1tPassw0rd");
    let err = PostgresStore::open(&url, "/etc/vppd/postgres-url")
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("Sekr1tPassw0rd"), "{text}");
    assert!(text.contains("/etc/vppd/postgres-url"), "{text}");
    // A port nobody listens on: bound, read, and let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = PostgresStore::open(
        &format!("postgres://vppd:Sekr1tPassw0rd@127.0.0.1:{port}/vppd"),
        "/etc/vppd/postgres-url",
    )
    .await
    .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("Sekr1tPassw0rd"), "{text}");
    let err = PostgresStore::open("postgres://vppd:Sekr1tPassw0rd@[bad", "/etc/x")
        .await
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("Sekr1tPassw0rd"));
}

fn url_of_unknown_role(base: &str, password: &str) -> String {
    // postgres://user:pass@host...: swap the password.
    let (scheme, rest) = base.split_once("://").unwrap();
    let (userinfo, host) = rest.split_once('@').unwrap();
    let _ = userinfo;
    format!("{scheme}://no_such_role:{password}@{host}")
}

const SHAPE: Shape = Shape {
    max_assets: 5,
    max_serials: 10,
    max_users: 10,
    max_revoke_serials: 10,
    max_revoke_users: 10,
};

fn spec(id: &str) -> JobSpec {
    JobSpec {
        id: id.into(),
        token: "main".into(),
        assets: (0..5)
            .map(|i| JobAsset {
                adam_id: (1000 + i).to_string(),
                pricing_param: "STDQ".into(),
            })
            .collect(),
        disassociate: Targets::default(),
        associate: Targets {
            serial_numbers: (0..10).map(|i| format!("S{i}")).collect(),
            client_user_ids: Vec::new(),
        },
        install: true,
        allow_partial: false,
        revoke: Default::default(),
        uninstall: false,
        wait_for_licenses: false,
        users: Vec::new(),
        retire_users: Vec::new(),
        priority: Default::default(),
    }
}

/// Two stores on one schema are two replicas: their commits of the same
/// job and batch, racing, still decide each pair once, count each
/// acknowledged command once, and leave the job consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_commits_of_one_job_are_serialized() {
    let Some(base) = pg::server_url("two_processes_commits_of_one_job_are_serialized") else {
        return;
    };
    let url = pg::schema_url(&base, &pg::fresh_name("two")).await;
    let a = open(&url).await;
    let b = open(&url).await;
    let spec = std::sync::Arc::new(spec("j"));
    a.create_job(&spec, conformance::new_record(&spec, SHAPE))
        .await
        .unwrap();
    b.update_job(&"j".into(), JobChange::Start).await.unwrap();
    let batch = a.start_batch(&"j".into(), SHAPE).await.unwrap().unwrap();
    assert!(
        b.batch_sent(&"j".into(), batch.no(), &"e0".into())
            .await
            .unwrap()
    );
    let pairs = batch.undecided();
    let no = batch.no();
    assert_eq!(pairs, 50);
    // Every pair confirmed twice, once through each replica, concurrently.
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..pairs {
        for store in [a.clone(), b.clone()] {
            tasks.spawn(async move {
                store
                    .decide(Decide {
                        job_id: "j".into(),
                        batch: no,
                        revoked: Vec::new(),
                        decisions: vec![(
                            p,
                            Decision::Confirmed {
                                event_id: Some("e0".into()),
                            },
                        )],
                        activity: true,
                        finished: false,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .confirmed
            });
        }
    }
    let mut confirmed = 0;
    while let Some(r) = tasks.join_next().await {
        confirmed += r.unwrap();
    }
    assert_eq!(confirmed, pairs, "each pair decided once across replicas");
    let outbox = a.outbox(1000).await.unwrap();
    let commands: usize = outbox.iter().map(|i| i.entry.pairs.len()).sum();
    assert_eq!(commands, pairs as usize);
    // Both replicas acknowledge every command at once: counted once.
    let acks = conformance::acks_of(&outbox);
    let (ra, rb) = tokio::join!(a.ack_outbox(&acks), b.ack_outbox(&acks));
    let released: u64 = ra
        .unwrap()
        .iter()
        .chain(rb.unwrap().iter())
        .map(|r| r.commands)
        .sum();
    assert_eq!(released, pairs as u64);
    let job = b.job(&"j".into()).await.unwrap().unwrap();
    assert_eq!(job.tally(Phase::Associate).confirmed(), pairs as u64);
    assert_eq!(job.installs().released, pairs as u64);
    assert_eq!(job.installs().pending, 0);
    assert!(a.outbox(1000).await.unwrap().is_empty());
}

/// A database that holds less than the watermark recorded in it (rows
/// deleted behind vppd's back) is refused with an error naming the URL
/// file, never the URL; `--accept-store-loss` starts on what is left and
/// records the watermark anew. No file in data_dir is involved: replicas
/// share the database, not a disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_that_lost_rows_is_refused_unless_the_loss_is_accepted() {
    let Some(base) =
        pg::server_url("a_database_that_lost_rows_is_refused_unless_the_loss_is_accepted")
    else {
        return;
    };
    let url = pg::schema_url(&base, &pg::fresh_name("watermark")).await;
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("postgres-url");
    std::fs::write(&url_file, &url).unwrap();
    let config = vppd::runtime::config::StoreConfig {
        kind: vppd::runtime::config::StoreKind::Postgres {
            url_file: url_file.clone(),
        },
        retain_finished: None,
    };
    let data_dir = dir.path().join("data");
    let store = config.open(&data_dir, false).await.unwrap();
    for id in ["a", "b"] {
        let spec = std::sync::Arc::new(spec(id));
        store
            .create_job(&spec, conformance::new_record(&spec, SHAPE))
            .await
            .unwrap();
    }
    vppd::store::marker::refresh_shared(store.as_ref())
        .await
        .unwrap();
    drop(store);
    // A restart of a sound database passes.
    let store = config.open(&data_dir, false).await.unwrap();
    drop(store);
    assert!(
        !data_dir.join("store-marker.json").exists(),
        "no marker on a replica's disk"
    );

    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute("DELETE FROM jobs WHERE id = 'b'", &[])
        .await
        .unwrap();
    let err = config.open(&data_dir, false).await.map(|_| ()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::DatabaseWentBackwards { .. }),
        "{text}"
    );
    assert!(text.contains(&url_file.display().to_string()), "{text}");
    assert!(text.contains("1 jobs < 2 recorded"), "{text}");
    assert!(text.contains("--accept-store-loss"), "{text}");
    assert!(!text.contains(&url), "the URL leaked: {text}");

    let store = config.open(&data_dir, true).await.unwrap();
    assert_eq!(store.jobs().await.unwrap().len(), 1);
    drop(store);
    // The loss, once accepted, is the new baseline.
    config.open(&data_dir, false).await.unwrap();
}

/// Replicas starting together on one database each check its watermark
/// and record theirs: none may take another's newer generation for a loss
/// (it once read what is there before the recorded watermark, and a
/// replica that started in between made the first look behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_never_take_each_other_for_a_loss() {
    let Some(base) = pg::server_url("replicas_starting_together_never_take_each_other_for_a_loss")
    else {
        return;
    };
    let url = pg::schema_url(&base, &pg::fresh_name("together")).await;
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("postgres-url");
    std::fs::write(&url_file, &url).unwrap();
    let config = vppd::runtime::config::StoreConfig {
        kind: vppd::runtime::config::StoreKind::Postgres { url_file },
        retain_finished: None,
    };
    // Jobs to count make the watermark take a while to read: the window
    // in which another replica records a newer one.
    let store = config.open(&dir.path().join("data"), false).await.unwrap();
    for i in 0..300 {
        let spec = std::sync::Arc::new(spec(&format!("job{i}")));
        store
            .create_job(&spec, conformance::new_record(&spec, SHAPE))
            .await
            .unwrap();
    }
    drop(store);
    for round in 0..20 {
        let mut opens = tokio::task::JoinSet::new();
        for replica in 0..6 {
            let config = config.clone();
            let data_dir = dir.path().join(format!("data{replica}"));
            opens.spawn(async move { config.open(&data_dir, false).await.map(|_| ()) });
        }
        while let Some(r) = opens.join_next().await {
            if let Err(e) = r.unwrap() {
                panic!("round {round}: a replica refused the database: {e}");
            }
        }
    }
}
