//! The real `vppd run` binary, killed with real signals: SIGKILL at several
//! points of a job and a restart must finish the job with nothing lost and
//! nothing released twice after the MDM acknowledged it; SIGTERM drains and
//! exits 0.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vppd::domain::job::JobState;
use vppd::sim::SimAsset;

fn spawn(env: &Env, tracking: &Tracking, run: usize) -> Child {
    let path = env.dir.path().join("vppd.toml");
    std::fs::write(&path, env.config_text(tracking, "")).unwrap();
    let log = std::fs::File::create(env.dir.path().join(format!("vppd-{run}.log"))).unwrap();
    env.vppd_run(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn logs(env: &Env) -> String {
    let mut out = String::new();
    for run in 0..5 {
        if let Ok(s) = std::fs::read_to_string(env.dir.path().join(format!("vppd-{run}.log"))) {
            out.push_str(&format!("--- run {run}\n{s}"));
        }
    }
    out
}

async fn wait_until(
    env: &Env,
    id: &str,
    what: &str,
    f: impl Fn(&vppd::domain::job::JobStatus) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = job_status(&env.admin(), id).await
            && f(&s)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never reached {what}\n{}",
            logs(env)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kill9(child: &mut Child) {
    // std's kill is SIGKILL on Unix: no drain, no flush.
    child.kill().unwrap();
    child.wait().unwrap();
}

fn slow_sim() -> vppd::sim::SimConfig {
    let mut c = sim_config(small_limits());
    // Slow enough that a kill lands while events are in flight.
    c.assignments_per_second = Some(400.0);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_several_points_then_restart_finishes_the_job_exactly_once() {
    let assets: Vec<String> = (0..5).map(adam).collect();
    let env = Env::new(
        slow_sim(),
        assets
            .iter()
            .map(|a| SimAsset::app(a, Some(1000)))
            .collect(),
    )
    .await;
    let devices = serials("K", 60);
    let total = (assets.len() * devices.len()) as u64;

    // 1: killed right after the job was accepted.
    let mut child = spawn(&env, &FAST_TRACKING, 0);
    wait_ready(&env.admin()).await;
    let (code, body) = post_job(&env.admin(), &job("crashy", &assets, &[], &devices)).await;
    assert_eq!(code, 202, "{body}");
    kill9(&mut child);

    // 2: killed with events in flight.
    let mut child = spawn(&env, &FAST_TRACKING, 1);
    wait_ready(&env.admin()).await;
    wait_until(&env, "crashy", "two batches submitted", |s| {
        s.requests.submitted >= 2
    })
    .await;
    kill9(&mut child);

    // 3: killed after the MDM acknowledged some commands, while it refuses
    // the rest: what it acknowledged must never come again.
    env.sink.accept_limit(50);
    let mut child = spawn(&env, &FAST_TRACKING, 2);
    wait_ready(&env.admin()).await;
    wait_until(&env, "crashy", "some installs released", |s| {
        s.installs.released >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill9(&mut child);
    let acknowledged: std::collections::HashSet<String> = env.commands().keys().cloned().collect();
    assert!(!acknowledged.is_empty());

    // 4: runs to the end.
    env.sink.accept_limit(u64::MAX);
    let mut child = spawn(&env, &FAST_TRACKING, 3);
    wait_ready(&env.admin()).await;
    let s = wait_job(&env.admin(), "crashy", Duration::from_secs(120)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}\n{}", logs(&env));
    assert_eq!(s.assignments.confirmed, total);
    assert_eq!(s.installs.released, total);

    let commands = env.commands();
    assert_eq!(commands.len() as u64, total, "missing install commands");
    for (uuid, (n, _, _)) in &commands {
        assert_eq!(
            *n,
            1,
            "command {uuid} delivered {n} times (acknowledged before: {})",
            acknowledged.contains(uuid)
        );
    }
    let held = env.held();
    assert_eq!(held.len() as u64, total);
    for (_, adam_id, target) in commands.values() {
        assert!(held.contains(&(adam_id.clone(), target.clone())));
    }
    // Every pair was asked for at least once; none needed more requests than
    // the plan plus the resends of batches whose answer a kill swallowed.
    let posts = env
        .sim
        .requests()
        .iter()
        .filter(|r| r.path == "/assets/associate" && r.status == 200)
        .count();
    assert!(posts >= 10, "{posts}");

    // SIGTERM drains and exits 0.
    let started = Instant::now();
    signal(child.id(), Signal::Term);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "exit after SIGTERM: {status:?}\n{}",
        logs(&env)
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_outcome_is_reconciled_before_the_remainder_is_resent() {
    let assets: Vec<String> = (0..2).map(adam).collect();
    let env = Env::new(
        sim_config(small_limits()),
        assets.iter().map(|a| SimAsset::app(a, Some(100))).collect(),
    )
    .await;
    env.sim.set_faults(vppd::sim::Faults {
        cut_connection_after_processing_next: 1,
        ..Default::default()
    });
    let (daemon, metrics) = env.start_daemon(&FAST_TRACKING).await;
    let (code, _) = post_job(&env.admin(), &job("cut", &assets, &[], &serials("C", 7))).await;
    assert_eq!(code, 202);
    let s = wait_job(&env.admin(), "cut", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 14);
    let syncs = metrics
        .syncs
        .get_metric_with_label_values(&["main", "unknown_outcome"])
        .map(|c| c.get())
        .unwrap_or(0);
    assert!(syncs >= 1, "no reconcile happened");
    let commands = env.commands();
    assert_eq!(commands.len(), 14);
    assert!(commands.values().all(|(n, _, _)| *n == 1));
    daemon.shutdown().await;
}

/// Apple notifies about licenses a person assigned in Apple School/Business
/// Manager too. A flood of those must neither hold back a real job's own
/// notifications nor the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_foreign_notifications_stalls_neither_jobs_nor_shutdown() {
    let assets: Vec<String> = (0..5).map(adam).collect();
    let env = Env::new(
        sim_config(vppd::apple::types::Limits::default()),
        assets
            .iter()
            .map(|a| SimAsset::app(a, Some(1000)))
            .collect(),
    )
    .await;
    // No status poll or sync within the test: only the job's own
    // notifications can finish it.
    let only_notifications = Tracking {
        poll_after: "1h",
        poll_interval: "1h",
        sync_after: "1h",
    };
    let mut child = spawn(&env, &only_notifications, 0);
    wait_ready(&env.admin()).await;

    let url = env.notifications_url();
    let secret = env.secret();
    // The token's own uId: notifications of another location would be
    // ignored on arrival and never reach the parking under test.
    let uid = env.uid().await;
    let http = reqwest::Client::new();
    let posters: Vec<_> = (0..8)
        .map(|worker| {
            let (http, url, secret, uid) = (http.clone(), url.clone(), secret.clone(), uid.clone());
            tokio::spawn(async move {
                for n in (worker..10_000).step_by(8) {
                    let assignments: Vec<_> = (0..100)
                        .map(|i| serde_json::json!({"adamId": "999", "pricingParam": "STDQ", "serialNumber": format!("F{n}-{i}")}))
                        .collect();
                    let body = serde_json::json!({
                        "notificationId": format!("foreign-{n}"), "notificationType": "ASSET_MANAGEMENT", "uId": uid,
                        "notification": {"eventId": format!("foreign-event-{n}"), "type": "ASSOCIATE",
                            "result": "SUCCESS", "assignments": assignments}
                    });
                    let r = http.post(&url).bearer_auth(&secret).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for p in posters {
        p.await.unwrap();
    }

    // 1,000 devices x 5 apps, as in the field.
    let devices = serials("R", 1000);
    let (code, _) = post_job(&env.admin(), &job("real", &assets, &[], &devices)).await;
    assert_eq!(code, 202);
    wait_until(&env, "real", "completion through notifications", |s| {
        s.state == JobState::Completed
    })
    .await;
    let s = job_status(&env.admin(), "real").await.unwrap();
    assert_eq!(s.assignments.confirmed, 5000);
    let metrics = reqwest::get(format!("{}/metrics", env.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("vppd_event_status_polls_total{") && !l.ends_with(" 0")),
        "the status poll finished the job\n{metrics}"
    );

    let started = Instant::now();
    signal(child.id(), Signal::Term);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "exit after SIGTERM: {status:?}\n{}",
        logs(&env)
    );
    // A hang guard, not a timing check: drain_timeout is 5 s, and before
    // parking the flood held SIGTERM for minutes.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "drain took {:?}\n{}",
        started.elapsed(),
        logs(&env)
    );
}

/// Get Assignments reads the simulator answered so far.
fn assignment_reads(env: &Env) -> usize {
    env.sim
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/assignments" && r.status == 200)
        .count()
}

/// A batch whose POST Apple processed but never answered is reconciled
/// with Get Assignments, one read per device here (40 reads for 400
/// pairs). vppd is killed with SIGKILL every few reads: each restart must go
/// on where the last one stopped, not read the whole batch again, so the
/// job completes and the reads stay near 40. Reconciling from scratch
/// each time, as a crash loop used to, never gets past the first reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loop_during_reconciliation_keeps_its_progress() {
    let limits = vppd::apple::types::Limits {
        max_assets: 10,
        max_serial_numbers: 40,
        ..Default::default()
    };
    let assets: Vec<String> = (0..10).map(adam).collect();
    let env = Env::new(
        sim_config(limits),
        assets.iter().map(|a| SimAsset::app(a, Some(100))).collect(),
    )
    .await;
    env.sim.set_faults(vppd::sim::Faults {
        cut_connection_after_processing_next: 1,
        ..Default::default()
    });
    // Slow reads, so that kills land inside the reconciliation; no fallback
    // of the tracker's reads Get Assignments within the test.
    let quiet = Tracking {
        poll_after: "1h",
        poll_interval: "1h",
        sync_after: "1h",
    };
    let path = env.dir.path().join("vppd.toml");
    std::fs::write(
        &path,
        env.config_text(&quiet, "")
            .replace("requests_per_second = 50", "requests_per_second = 4"),
    )
    .unwrap();
    let start = |run: usize| {
        let log = std::fs::File::create(env.dir.path().join(format!("vppd-{run}.log"))).unwrap();
        env.vppd_run(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };

    const KILLS: usize = 4;
    const READS_PER_RUN: usize = 6;
    let mut confirmed_at_kill = Vec::new();
    for run in 0..KILLS {
        let mut child = start(run);
        wait_ready(&env.admin()).await;
        if run == 0 {
            let (code, _) =
                post_job(&env.admin(), &job("loop", &assets, &[], &serials("L", 40))).await;
            assert_eq!(code, 202);
        }
        let base = assignment_reads(&env);
        let deadline = Instant::now() + Duration::from_secs(60);
        while assignment_reads(&env) < base + READS_PER_RUN {
            assert!(
                Instant::now() < deadline,
                "run {run}: no reconciliation reads\n{}",
                logs(&env)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = job_status(&env.admin(), "loop").await.unwrap();
        assert_ne!(s.state, JobState::Completed, "run {run}: done too early");
        kill9(&mut child);
        confirmed_at_kill.push(s.assignments.confirmed);
    }
    assert!(
        confirmed_at_kill.windows(2).all(|w| w[1] > w[0]),
        "each run keeps what the ones before it learned: {confirmed_at_kill:?}\n{}",
        logs(&env)
    );

    let mut child = start(KILLS);
    wait_ready(&env.admin()).await;
    let s = wait_job(&env.admin(), "loop", Duration::from_secs(120)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}\n{}", logs(&env));
    assert_eq!(s.assignments.confirmed, 400);
    // 40 reads settle the batch; each kill may cost the read it cut short.
    let reads = assignment_reads(&env);
    assert!(
        reads <= 40 + KILLS,
        "{reads} Get Assignments reads for 40 devices over {KILLS} crashes\n{}",
        logs(&env)
    );
    // Every install released (a kill between the MDM's answer and its
    // record may repeat one, with the same commandUuid).
    assert_eq!(env.commands().len(), 400);
    signal(child.id(), Signal::Term);
    assert!(child.wait().unwrap().success());
}
