//! Canceling a job, end to end: what is not yet submitted is never sent, a
//! batch that was being sent when the cancel came is reconciled against
//! Apple (what Apple did is confirmed, and its installs released) and never
//! resent, live or after a restart.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vppd::domain::job::JobState;
use vppd::domain::lifecycle::{BatchState, JobChange};
use vppd::sim::{Faults, SimAsset};
use vppd::store::Store;

/// Associate POSTs Apple received.
fn associate_posts(env: &Env) -> usize {
    env.sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/assets/associate")
        .count()
}

/// Waits until the job has no batch being sent and `f` holds of its status.
async fn settle(
    env: &Env,
    store: &dyn Store,
    id: &str,
    f: impl Fn(&vppd::domain::job::JobStatus) -> bool,
) -> vppd::domain::job::JobStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = store.job(&id.into()).await.unwrap().unwrap();
        if let Some(s) = job_status(&env.admin(), id).await
            && job.sending().is_none()
            && f(&s)
        {
            return s;
        }
        assert!(Instant::now() < deadline, "job {id} never settled: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_while_a_batch_is_sending_reconciles_it_and_sends_nothing_more() {
    let assets: Vec<String> = (0..2).map(adam).collect();
    let mut config = sim_config(small_limits());
    // Apple answers slowly, and its answer to the first POST is lost after
    // processing: the cancel lands while the batch is `Sending`, and its
    // outcome is unknown.
    config.latency = Duration::from_secs(2);
    let env = Env::new(
        config,
        assets.iter().map(|a| SimAsset::app(a, Some(100))).collect(),
    )
    .await;
    env.sim.set_faults(Faults {
        cut_connection_after_processing_next: 1,
        ..Default::default()
    });
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let store = daemon.context().store.clone();
    // 2 assets x 14 serials: two batches of 2 x 7.
    let devices = serials("X", 14);
    let (code, _) = post_job(&env.admin(), &job("cx", &assets, &[], &devices)).await;
    assert_eq!(code, 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.job(&"cx".into()).await.unwrap().unwrap().sending() != Some(0) {
        assert!(Instant::now() < deadline, "the first batch was never sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let canceled = reqwest::Client::new()
        .delete(format!("{}/v1/jobs/cx", env.admin()))
        .send()
        .await
        .unwrap();
    assert_eq!(canceled.status(), 200);
    let status: vppd::domain::job::JobStatus = canceled.json().await.unwrap();
    assert_eq!(status.state, JobState::Canceled);
    assert_eq!(
        store.batch(&"cx".into(), 0).await.unwrap().unwrap().state(),
        BatchState::Sending,
        "the cancel must land while the batch is on its way"
    );

    // Apple processed the batch: its 14 pairs are confirmed by the
    // reconcile and their installs released; the batch is not resent and
    // the second one never leaves.
    let s = settle(&env, store.as_ref(), "cx", |s| s.installs.released == 14).await;
    assert_eq!(s.state, JobState::Canceled, "{s:?}");
    assert_eq!(s.assignments.confirmed, 14);
    assert_eq!(s.installs.pending, 0);
    assert_eq!(
        store.batch(&"cx".into(), 0).await.unwrap().unwrap().state(),
        BatchState::Decided,
        "Apple did all of it: reconciled whole, nothing left to withdraw"
    );
    assert!(store.batch(&"cx".into(), 1).await.unwrap().is_none());
    assert!(store.open_batches("main").await.unwrap().is_empty());
    let commands = env.commands();
    assert_eq!(commands.len(), 14);
    assert!(commands.values().all(|(n, _, _)| *n == 1));
    // Give a resend every chance to happen before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(associate_posts(&env), 1, "the batch was sent again");
    assert_eq!(env.held().len(), 14);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canceled_jobs_sending_batch_found_at_startup_is_reconciled_not_resent() {
    let assets: Vec<String> = (0..2).map(adam).collect();
    let env = Env::new(
        sim_config(small_limits()),
        assets.iter().map(|a| SimAsset::app(a, Some(100))).collect(),
    )
    .await;
    let devices = serials("R", 7);
    // The state vppd left when it stopped: the job canceled while its first
    // batch (2 x 7 pairs) was being sent.
    let data = env.dir.path().join("data");
    {
        let store = vppd::store::open(&data, false).await.unwrap();
        let request: vppd::domain::job::JobRequest =
            serde_json::from_value(job("cr", &assets, &[], &devices)).unwrap();
        let spec = request
            .validate(|t| t == "main", vppd::domain::job::JobLimits::NONE)
            .map(std::sync::Arc::new)
            .unwrap();
        let shape = vppd::domain::plan::Shape::from(&small_limits());
        store
            .create_job(&spec, vppd::stages::admin::new_record(&spec, shape))
            .await
            .unwrap();
        store
            .update_job(&"cr".into(), JobChange::Start)
            .await
            .unwrap();
        let batch = store
            .start_batch(&"cr".into(), shape)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch.pairs(), 14);
        store
            .update_job(&"cr".into(), JobChange::Cancel)
            .await
            .unwrap();
    }
    // ...and Apple had taken the first asset of it before the answer was lost.
    let taken = serde_json::json!({
        "assets": [{"adamId": assets[0], "pricingParam": "STDQ"}],
        "serialNumbers": devices,
    });
    let r = reqwest::Client::new()
        .post(format!("{}/assets/associate", env.sim.base_url()))
        .bearer_auth(&env.stoken)
        .json(&taken)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(env.sim.wait_idle(Duration::from_secs(10)).await);
    env.sim.clear_requests();

    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let store = daemon.context().store.clone();
    let s = settle(&env, store.as_ref(), "cr", |s| s.installs.released == 7).await;
    assert_eq!(s.state, JobState::Canceled, "{s:?}");
    assert_eq!(s.assignments.confirmed, 7);
    assert_eq!(s.assignments.pending, 7, "the rest was never sent");
    assert_eq!(
        store.batch(&"cr".into(), 0).await.unwrap().unwrap().state(),
        BatchState::Withdrawn
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(associate_posts(&env), 0, "the batch was resent");
    assert_eq!(env.held().len(), 7);
    let commands = env.commands();
    assert_eq!(commands.len(), 7);
    assert!(
        commands
            .values()
            .all(|(n, a, _)| *n == 1 && *a == assets[0])
    );
    daemon.shutdown().await;
}
