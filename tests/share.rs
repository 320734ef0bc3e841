//! Sharing a token between jobs, and drift, through the real `vppd run`
//! binary against the simulator: a small high-priority job overtakes a
//! bulk one; `max_events_in_flight` holds at the simulator; jobs that share
//! a pair reach Apple in creation order; changes made by hand show at
//! `GET /v1/tokens/{name}/drift`, with the job of a pair vppd made, and a
//! version Apple no longer keeps is read again in full.
//!
//! Events are held PENDING at the simulator (`HoldSettings`) so that what
//! is in flight is decided by the test, not by timing. After SIGKILL and a
//! restart the events in flight are counted again from the store.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vppd::domain::job::JobState;
use vppd::sim::{HoldSettings, ManualAction, ManualChange, SimAsset};

struct Run {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Run {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `vppd run` with `apple_extra` in `[apple]` and `tracking_extra` in
/// `[tracking]`.
async fn spawn(env: &Env, apple_extra: &str, tracking_extra: &str) -> Run {
    let text = env
        .config_text(&FAST_TRACKING, "")
        .replacen("[[tokens]]", &format!("{apple_extra}\n[[tokens]]"), 1)
        .replacen("[admin]", &format!("{tracking_extra}\n[admin]"), 1);
    let path = env.dir.path().join("vppd.toml");
    std::fs::write(&path, text).unwrap();
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let log = env.dir.path().join(format!("vppd-{run}.log"));
    let child = env
        .vppd_run(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_ready(&env.admin()).await;
    Run { child, log }
}

/// Management POSTs Apple took, in order: (path, the job's first serial).
fn manage_posts(env: &Env) -> Vec<(String, String)> {
    env.sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/assets/") && r.status == 200)
        .map(|r| {
            let first = r
                .body
                .as_ref()
                .and_then(|b| b["serialNumbers"][0].as_str().map(str::to_string))
                .unwrap_or_default();
            (r.path, first)
        })
        .collect()
}

async fn until(run: &Run, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "never reached: {what}\n{}",
            run.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn with_priority(mut job: serde_json::Value, priority: &str) -> serde_json::Value {
    job["priority"] = priority.into();
    job
}

async fn state(env: &Env, id: &str) -> Option<JobState> {
    job_status(&env.admin(), id).await.map(|s| s.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_high_priority_job_overtakes_a_bulk_one_within_the_events_in_flight() {
    let assets: Vec<String> = (0..3).map(adam).collect();
    let env = Env::new(
        sim_config(small_limits()),
        assets
            .iter()
            .map(|a| SimAsset::app(a, Some(1000)))
            .collect(),
    )
    .await;
    let run = spawn(&env, "max_events_in_flight = 3", "").await;

    let (code, body) = post_job(
        &env.admin(),
        &with_priority(job("urgent-bad", &assets, &[], &["X".into()]), "urgent"),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("priority"),
        "{body}"
    );

    env.sim.set_hold(HoldSettings {
        all: true,
        ..Default::default()
    });
    // 3 assets x 70 serials, 7 serials a request: 10 requests.
    let bulk = serials("BULK", 70);
    let (code, body) = post_job(&env.admin(), &job("bulk", &assets, &[], &bulk)).await;
    assert_eq!(code, 202, "{body}");
    until(&run, "three bulk events held", async || {
        env.sim.held_events().len() == 3
    })
    .await;
    let (code, body) = post_job(
        &env.admin(),
        &with_priority(
            job("new-student", &assets[..1], &[], &["NEW-1".into()]),
            "high",
        ),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    until(&run, "the small job running", async || {
        state(&env, "new-student").await == Some(JobState::Running)
    })
    .await;
    // Three events unfinished at Apple: nothing more leaves, the urgent
    // job's batch included.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(manage_posts(&env).len(), 3, "{:?}", manage_posts(&env));
    // Killed and started again, vppd counts them from the store.
    drop(run);
    let run = spawn(&env, "max_events_in_flight = 3", "").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(manage_posts(&env).len(), 3, "{}", run.log());

    // One bulk event finishes: its slot goes to the high-priority job.
    env.sim.set_hold(HoldSettings::default());
    let first = env.sim.held_events()[0].event_id.clone();
    env.sim.release_held(Some(&[first]));
    let s = wait_job(&env.admin(), "new-student", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.installs.released, 1);
    let posts = manage_posts(&env);
    assert_eq!(posts[3].1, "NEW-1", "{posts:?}");
    assert_ne!(
        state(&env, "bulk").await,
        Some(JobState::Completed),
        "the bulk job still has batches to send"
    );

    env.sim.release_held(None);
    let s = wait_job(&env.admin(), "bulk", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 210);
    assert_eq!(manage_posts(&env).len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_sharing_a_pair_reach_apple_in_creation_order_whatever_their_priority() {
    let assets: Vec<String> = (0..1).map(adam).collect();
    let env = Env::new(
        sim_config(small_limits()),
        assets
            .iter()
            .map(|a| SimAsset::app(a, Some(1000)))
            .collect(),
    )
    .await;
    // max_events_in_flight is left at its default, 2.
    let run = spawn(&env, "", "").await;
    env.sim.set_hold(HoldSettings {
        all: true,
        ..Default::default()
    });
    // 28 serials, 7 a request: 4 requests.
    let first = serials("S", 28);
    let (code, body) = post_job(&env.admin(), &job("first", &assets, &[], &first)).await;
    assert_eq!(code, 202, "{body}");
    until(&run, "two events held", async || {
        env.sim.held_events().len() == 2
    })
    .await;
    // Takes back a license the first job is giving: it must wait for all
    // of the first job's events, high priority or not.
    let (code, body) = post_job(
        &env.admin(),
        &with_priority(job("takeback", &assets, &[first[0].clone()], &[]), "high"),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    // Shares nothing with the others: goes as soon as a slot frees.
    let (code, body) = post_job(
        &env.admin(),
        &with_priority(job("other", &assets, &[], &["OTHER-1".into()]), "high"),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    until(&run, "the unrelated job running", async || {
        state(&env, "other").await == Some(JobState::Running)
    })
    .await;
    assert_eq!(state(&env, "takeback").await, Some(JobState::Accepted));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(manage_posts(&env).len(), 2);

    env.sim.set_hold(HoldSettings::default());
    env.sim.release_held(None);
    for id in ["first", "takeback", "other"] {
        let s = wait_job(&env.admin(), id, Duration::from_secs(60)).await;
        assert_eq!(s.state, JobState::Completed, "{id}: {s:?}");
    }
    let posts = manage_posts(&env);
    let at = |first_serial: &str| posts.iter().position(|p| p.1 == first_serial).unwrap();
    assert_eq!(posts.len(), 6, "{posts:?}");
    // The unrelated high-priority job took the first free slot.
    assert_eq!(at("OTHER-1"), 2, "{posts:?}");
    // The take-back came after every batch of the first job.
    assert_eq!(posts[5], ("/assets/disassociate".into(), first[0].clone()));
    assert!(!env.held().contains(&(assets[0].clone(), first[0].clone())));
    assert!(env.held().contains(&(assets[0].clone(), first[1].clone())));
}

async fn drift(env: &Env) -> serde_json::Value {
    reqwest::get(format!("{}/v1/tokens/main/drift", env.admin()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn metric(env: &Env, line_start: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", env.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn by_hand(action: ManualAction, asset: &str, serial: &str) -> ManualChange {
    ManualChange {
        action,
        assets: vec![vppd::apple::types::Asset {
            adam_id: asset.to_string(),
            pricing_param: Some("STDQ".into()),
        }],
        serial_numbers: vec![serial.to_string()],
        client_user_ids: Vec::new(),
        delta: None,
        token: None,
        after: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_made_by_hand_are_reported_as_drift_and_a_too_old_version_is_read_again() {
    let assets: Vec<String> = (0..2).map(adam).collect();
    let env = Env::new(
        sim_config(small_limits()),
        assets.iter().map(|a| SimAsset::app(a, Some(100))).collect(),
    )
    .await;
    // Already there before vppd follows the token: not drift.
    env.sim
        .change_by_hand(by_hand(ManualAction::Associate, &assets[1], "BEFORE"))
        .unwrap();
    let run = spawn(&env, "", "drift_every = \"1s\"").await;
    let mine = serials("MINE", 3);
    let (code, body) = post_job(&env.admin(), &job("mine", &assets[..1], &[], &mine)).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_job(&env.admin(), "mine", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    until(&run, "drift followed", async || {
        drift(&env).await["versionId"].is_string()
    })
    .await;
    let d = drift(&env).await;
    assert_eq!(d["added"]["count"], 0, "{d}");
    assert_eq!(d["removed"]["count"], 0, "{d}");

    // By hand: a license added, and one of vppd's taken away.
    env.sim
        .change_by_hand(by_hand(ManualAction::Associate, &assets[1], "FOREIGN-1"))
        .unwrap();
    env.sim
        .change_by_hand(by_hand(ManualAction::Disassociate, &assets[0], &mine[0]))
        .unwrap();
    until(&run, "one added and one removed", async || {
        let d = drift(&env).await;
        d["added"]["count"] == 1
            && d["removed"]["count"] == 1
            && d["removed"]["items"][0]["jobId"] == "mine"
    })
    .await;
    let d = drift(&env).await;
    let added = &d["added"]["items"][0];
    assert_eq!(added["adamId"], assets[1].as_str(), "{d}");
    assert_eq!(added["serialNumber"], "FOREIGN-1", "{d}");
    assert!(added.get("clientUserId").is_none(), "{d}");
    assert!(added["seenAt"].is_string(), "{d}");
    let removed = &d["removed"]["items"][0];
    assert_eq!(removed["serialNumber"], mine[0].as_str(), "{d}");
    assert_eq!(removed["pricingParam"], "STDQ", "{d}");
    assert!(d["checkedAt"].is_string(), "{d}");
    assert_eq!(
        metric(
            &env,
            "vppd_drift_assignments_total{kind=\"added\",token=\"main\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &env,
            "vppd_drift_assignments_total{kind=\"removed\",token=\"main\"}"
        )
        .await,
        Some(1.0)
    );
    // Incremental reads only so far: one full read, when vppd began.
    let full_reads = |env: &Env| {
        env.sim
            .requests()
            .iter()
            .filter(|r| r.path == "/assignments" && r.query.is_empty())
            .count()
    };
    assert_eq!(full_reads(&env), 1);
    assert!(
        env.sim
            .requests()
            .iter()
            .any(|r| r.path == "/assignments" && r.query.contains("sinceVersionId="))
    );

    // Apple no longer keeps the version vppd follows: one full re-read,
    // which still finds what was added meanwhile.
    env.sim.forget_versions();
    env.sim
        .change_by_hand(by_hand(ManualAction::Associate, &assets[1], "FOREIGN-2"))
        .unwrap();
    until(&run, "the second addition", async || {
        drift(&env).await["added"]["count"] == 2
    })
    .await;
    assert!(
        env.sim
            .requests()
            .iter()
            .any(|r| r.path == "/assignments" && r.error_number == Some(9721))
    );
    assert_eq!(full_reads(&env), 2, "{}", run.log());
    let d = drift(&env).await;
    assert_eq!(d["added"]["items"][1]["serialNumber"], "FOREIGN-2", "{d}");
    assert_eq!(d["removed"]["count"], 1, "{d}");
}

#[test]
fn vppd_demo_urgent_reports_the_small_job() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args([
            "demo",
            "--devices",
            "3000",
            "--apps",
            "2",
            "--apple-rate",
            "4000",
            "--urgent",
            "--quiet",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.contains("urgent job (1 device, high)"))
        .unwrap_or_else(|| panic!("no urgent line: {text}"));
    assert!(line.contains("completed in"), "{line}");
    assert!(line.contains("1 install released"), "{line}");
}
