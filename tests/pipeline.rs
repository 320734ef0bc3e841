//! The pipeline end to end, in process: the daemon's real listeners, store
//! and job API against the simulator over loopback HTTP.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vppd::domain::job::JobState;
use vppd::sim::{Faults, SimAsset};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_path_ten_thousand_devices_by_twenty_five_apps() {
    let opts = vppd::cli::demo::DemoOptions {
        progress: false,
        timeout: Duration::from_secs(300),
        ..Default::default()
    };
    let report = vppd::cli::demo::run(opts).await.unwrap();
    println!("{}", report.render());
    assert_eq!(report.requests_minimum, 10);
    assert_eq!(report.requests_made, 10, "{}", report.render());
    assert_eq!(report.assignments_confirmed, 250_000);
    assert_eq!(report.licenses_held_at_apple, 250_000);
    assert_eq!(report.commands_released, 250_000);
    assert_eq!(report.commands_duplicated, 0);
    assert_eq!(report.commands_unlicensed, 0);
    assert!(report.ok(), "{}", report.render());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reassign_disassociates_every_batch_before_the_first_associate() {
    let assets: Vec<String> = (0..5).map(adam).collect();
    let old = serials("OLD", 20);
    let new = serials("NEW", 20);
    // Exactly enough licenses for one group: the associations succeed only
    // because every disassociation is processed first.
    let env = Env::new(
        sim_config(small_limits()),
        assets.iter().map(|a| SimAsset::app(a, Some(20))).collect(),
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let (code, _) = post_job(&env.admin(), &job("setup", &assets, &[], &old)).await;
    assert_eq!(code, 202);
    let s = wait_job(&env.admin(), "setup", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    env.sim.clear_requests();

    let (code, body) = post_job(&env.admin(), &job("reassign", &assets, &old, &new)).await;
    assert_eq!(code, 202, "{body}");
    // 5 assets / 3 per request = 2 chunks; 20 serials / 7 = 3 chunks.
    assert_eq!(body["requests"]["planned"], 12);
    let s = wait_job(&env.admin(), "reassign", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 100);
    assert_eq!(s.disassociations.confirmed, 100);
    assert_eq!(s.assignments.failed, 0);

    let manage: Vec<String> = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/assets/"))
        .map(|r| r.path)
        .collect();
    assert_eq!(manage.len(), 12, "{manage:?}");
    let first_assoc = manage
        .iter()
        .position(|p| p == "/assets/associate")
        .unwrap();
    assert!(
        manage[..first_assoc]
            .iter()
            .all(|p| p == "/assets/disassociate")
    );
    assert!(
        manage[first_assoc..]
            .iter()
            .all(|p| p == "/assets/associate")
    );
    assert_eq!(first_assoc, 6);

    let held = env.held();
    for a in &assets {
        for s in &old {
            assert!(!held.contains(&(a.clone(), s.clone())));
        }
        for s in &new {
            assert!(held.contains(&(a.clone(), s.clone())));
        }
    }
    // Installs: once per association of both jobs, none for removals.
    let commands = env.commands();
    assert_eq!(commands.len(), 200);
    assert!(commands.values().all(|(n, _, _)| *n == 1));
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pairs_apple_fails_get_no_install_and_show_in_failures() {
    let assets = vec![adam(0), adam(1)];
    // adam(1) has 4 licenses for 10 devices: 6 pairs fail with 9709.
    let env = Env::new(
        sim_config(small_limits()),
        vec![
            SimAsset::app(&assets[0], Some(100)),
            SimAsset::app(&assets[1], Some(4)),
        ],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let devices = serials("D", 10);
    let mut j = job("partial", &assets, &[], &devices);
    j["allowPartial"] = serde_json::json!(true);
    let (code, body) = post_job(&env.admin(), &j).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_job(&env.admin(), "partial", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 14);
    assert_eq!(s.assignments.failed, 6);
    assert_eq!(s.installs.released, 14);

    let failures: serde_json::Value =
        reqwest::get(format!("{}/v1/jobs/partial/failures", env.admin()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let failures = failures["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 6);
    for f in failures {
        assert_eq!(f["errorNumber"], 9709);
        assert_eq!(f["adamId"], assets[1].as_str());
        assert!(f["serialNumber"].is_string());
        assert!(f.get("clientUserId").is_none());
        assert!(f["eventId"].is_string());
    }
    // No install for a failed pair; one for each confirmed pair, held at Apple.
    let held = env.held();
    let commands = env.commands();
    assert_eq!(commands.len(), 14);
    for (_, (n, adam_id, target)) in commands {
        assert_eq!(n, 1);
        assert!(held.contains(&(adam_id, target)));
    }
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_license_shortfall_fails_the_job_before_any_association() {
    let assets = vec![adam(0), adam(1)];
    let env = Env::new(
        sim_config(small_limits()),
        vec![
            SimAsset::app(&assets[0], Some(100)),
            SimAsset::app(&assets[1], Some(4)),
        ],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let (code, _) = post_job(&env.admin(), &job("short", &assets, &[], &serials("D", 10))).await;
    assert_eq!(code, 202);
    let s = wait_job(&env.admin(), "short", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Failed);
    let error = s.error.unwrap();
    assert!(
        error.contains(&assets[1]) && error.contains("10 licenses needed, 4 available"),
        "{error}"
    );
    assert!(!error.contains(&format!("asset {} ", assets[0])), "{error}");
    assert!(
        env.sim
            .requests()
            .iter()
            .all(|r| r.path != "/assets/associate")
    );
    assert!(env.commands().is_empty());
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lossy_notifications_complete_through_status_and_sync_without_double_release() {
    let assets: Vec<String> = (0..4).map(adam).collect();
    let mut config = sim_config(small_limits());
    config.notifications.drop_rate = 0.5;
    config.notifications.duplicate_rate = 0.2;
    config.notifications.reorder_window = 8;
    config.notifications.max_items = 5;
    let env = Env::new(
        config,
        assets
            .iter()
            .map(|a| SimAsset::app(a, Some(1000)))
            .collect(),
    )
    .await;
    let (daemon, metrics) = env.start_daemon(&FAST_TRACKING).await;
    let devices = serials("L", 40);
    let (code, _) = post_job(&env.admin(), &job("lossy", &assets, &[], &devices)).await;
    assert_eq!(code, 202);
    let s = wait_job(&env.admin(), "lossy", Duration::from_secs(90)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 160);
    let commands = env.commands();
    assert_eq!(commands.len(), 160);
    assert!(
        commands.values().all(|(n, _, _)| *n == 1),
        "a command was delivered twice"
    );
    let stats = env.sim.notifications_sent();
    assert!(stats.dropped_by_fault > 0, "{stats:?}");
    let duplicates = metrics
        .notifications
        .get_metric_with_label_values(&["ASSET_MANAGEMENT", "duplicate"])
        .map(|c| c.get())
        .unwrap_or(0);
    assert!(duplicates > 0 || stats.duplicated == 0, "{stats:?}");
    let polls: u64 = ["complete", "failed", "pending"]
        .iter()
        .map(|r| {
            metrics
                .status_polls
                .get_metric_with_label_values(&["main", r])
                .map(|c| c.get())
                .unwrap_or(0)
        })
        .sum();
    assert!(polls > 0, "the status fallback never ran");
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_pauses_every_request_of_the_token() {
    let assets = vec![adam(0)];
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&assets[0], Some(100))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    env.sim.clear_requests();
    env.sim.set_faults(Faults {
        fail_next_with_429: 2,
        retry_after_secs: 1,
        ..Default::default()
    });
    let (code, _) = post_job(
        &env.admin(),
        &job("throttled", &assets, &[], &serials("T", 14)),
    )
    .await;
    assert_eq!(code, 202);
    let s = wait_job(&env.admin(), "throttled", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    let log = env.sim.requests();
    let throttled: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == 429)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(throttled.len(), 2, "{log:?}");
    for i in throttled {
        if let Some(next) = log.get(i + 1) {
            let gap = next.at.duration_since(log[i].at);
            assert!(
                gap >= Duration::from_millis(950),
                "request {} came {gap:?} after a Retry-After: 1",
                i + 1
            );
        }
    }
    assert_eq!(env.commands().len(), 14);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mdm_webhook_down_then_up_loses_nothing() {
    let assets = vec![adam(0), adam(1)];
    let env = Env::new(
        sim_config(small_limits()),
        assets.iter().map(|a| SimAsset::app(a, Some(100))).collect(),
    )
    .await;
    env.sink.fail_with(503);
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let (code, _) = post_job(
        &env.admin(),
        &job("webhook", &assets, &[], &serials("W", 20)),
    )
    .await;
    assert_eq!(code, 202);
    // Confirmed, but the MDM is down: installs wait in the outbox.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = job_status(&env.admin(), "webhook").await.unwrap();
        if s.assignments.confirmed == 40 {
            assert_eq!(s.state, JobState::Running);
            assert_eq!(s.installs.pending, 40);
            assert_eq!(s.installs.released, 0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(env.commands().is_empty());
    env.sink.fail_with(0);
    let s = wait_job(&env.admin(), "webhook", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed);
    assert_eq!(s.installs.released, 40);
    assert_eq!(s.installs.pending, 0);
    let commands = env.commands();
    assert_eq!(commands.len(), 40);
    assert!(commands.values().all(|(n, _, _)| *n == 1));
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_jobs_are_rejected_with_nothing_stored() {
    let assets = vec![adam(0)];
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&assets[0], Some(100))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let admin = env.admin();
    let http = reqwest::Client::new();
    for (body, field) in [
        (
            serde_json::json!({"token": "nope", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": ["A"]}}),
            "token",
        ),
        (
            serde_json::json!({"token": "main", "assets": [{"adamId": ""}], "associate": {"serialNumbers": ["A"]}}),
            "adamId",
        ),
        (
            serde_json::json!({"token": "main", "assets": [{"adamId": "12x"}], "associate": {"serialNumbers": ["A"]}}),
            "adamId",
        ),
        (
            serde_json::json!({"token": "main", "assets": [{"adamId": "1"}]}),
            "associate",
        ),
        (
            serde_json::json!({"token": "main", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": []}}),
            "associate",
        ),
        (
            serde_json::json!({"token": "main", "assets": [], "associate": {"serialNumbers": ["A"]}}),
            "assets",
        ),
    ] {
        let (code, resp) = post_job(&admin, &body).await;
        assert_eq!(code, 400, "{body}");
        let e = resp["error"].as_str().unwrap();
        assert!(e.contains(field), "{e} should name {field}");
    }
    let r = http
        .post(format!("{admin}/v1/jobs"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(format!("{admin}/v1/jobs"))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let list: serde_json::Value = http
        .get(format!("{admin}/v1/jobs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        0,
        "a rejected job left something behind"
    );

    // Idempotent ids: same body 200, another body 409.
    let j = job("same", &assets, &[], &["S1".to_string()]);
    assert_eq!(post_job(&admin, &j).await.0, 202);
    assert_eq!(post_job(&admin, &j).await.0, 200);
    let other = job("same", &assets, &[], &["S2".to_string()]);
    assert_eq!(post_job(&admin, &other).await.0, 409);
    assert_eq!(
        reqwest::get(format!("{admin}/v1/jobs/nope"))
            .await
            .unwrap()
            .status(),
        404
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_notifications_are_refused_with_nothing_recorded() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    let (daemon, metrics) = env.start_daemon(&PATIENT_TRACKING).await;
    wait_token(&env.admin(), "main", "ready").await;
    let uid = env.uid().await;
    let url = env.notifications_url();
    let secret = env.secret();
    let http = reqwest::Client::new();
    let good = serde_json::json!({
        "notificationId": "n-1", "notificationType": "ASSET_COUNT", "uId": uid,
        "notification": {"adamId": adam(0), "pricingParam": "STDQ", "countDelta": 5}
    });
    let before = daemon.context().store.inbox_len().await.unwrap();
    // Wrong or missing secret.
    let r = http
        .post(&url)
        .bearer_auth("wrong")
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http.post(&url).json(&good).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Not an envelope; a known type with a malformed payload.
    let r = http
        .post(&url)
        .bearer_auth(&secret)
        .body("[1,2]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let bad_payload = serde_json::json!({"notificationId": "n-2", "notificationType": "ASSET_MANAGEMENT", "uId": uid, "notification": {"result": "SUCCESS"}});
    let r = http
        .post(&url)
        .bearer_auth(&secret)
        .json(&bad_payload)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Over 1 MiB.
    let r = http
        .post(&url)
        .bearer_auth(&secret)
        .body(vec![b' '; (1 << 20) + 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let seen = daemon
        .context()
        .store
        .record_notification("n-1", b"{}")
        .await
        .unwrap();
    assert_eq!(
        seen,
        vppd::store::Recorded::New,
        "a refused notification was recorded"
    );
    assert_eq!(
        daemon.context().store.inbox_len().await.unwrap(),
        before + 1
    );
    // A good one with an unknown type is acknowledged; a repeat is a duplicate.
    let unknown = serde_json::json!({"notificationId": "n-3", "notificationType": "SOMETHING_NEW", "uId": uid, "notification": {}});
    assert_eq!(
        http.post(&url)
            .bearer_auth(&secret)
            .json(&unknown)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.post(&url)
            .bearer_auth(&secret)
            .json(&unknown)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let count = |t: &str, o: &str| {
        metrics
            .notifications
            .get_metric_with_label_values(&[t, o])
            .map(|c| c.get())
            .unwrap_or(0)
    };
    assert_eq!(count("unknown", "unauthorized"), 2);
    assert_eq!(count("other", "accepted"), 1);
    assert_eq!(count("other", "duplicate"), 1);
    assert!(count("unknown", "too_large") == 1);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_and_devices_share_requests_and_unregistered_users_fail() {
    let assets = [adam(0)];
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&assets[0], Some(100))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let j = serde_json::json!({
        "id": "mixed", "token": "main",
        "assets": [{"adamId": assets[0]}],
        "associate": {"serialNumbers": serials("M", 3), "clientUserIds": ["nobody-1", "nobody-2"]},
    });
    let (code, body) = post_job(&env.admin(), &j).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["requests"]["planned"], 1);
    let s = wait_job(&env.admin(), "mixed", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 3);
    assert_eq!(s.assignments.failed, 2);
    let users: HashSet<String> = s
        .failures
        .unwrap()
        .into_iter()
        .map(|f| {
            assert_eq!(f.error_number, 9609);
            f.client_user_id.unwrap()
        })
        .collect();
    assert_eq!(
        users,
        HashSet::from(["nobody-1".to_string(), "nobody-2".to_string()])
    );
    assert_eq!(env.commands().len(), 3);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_job_api_enforces_its_admin_token_and_body_limit() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    let token_file = env.dir.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-admin-0123456789abcdefghijklmnop\n").unwrap();
    let extra = format!(
        "token_file = \"{}\"\nmax_body_bytes = 2000",
        token_file.display()
    );
    let (daemon, _) = env.start_daemon_with(&PATIENT_TRACKING, &extra).await;
    let admin = env.admin();
    let http = reqwest::Client::new();
    let j = job("guarded", &[adam(0)], &[], &["A".to_string()]);
    let r = http
        .post(format!("{admin}/v1/jobs"))
        .json(&j)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{admin}/v1/jobs"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Health and metrics never need the token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            http.get(format!("{admin}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
    let big = job("big", &[adam(0)], &[], &serials("B", 200));
    let r = http
        .post(format!("{admin}/v1/jobs"))
        .bearer_auth("s3cret-admin-0123456789abcdefghijklmnop")
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = http
        .post(format!("{admin}/v1/jobs"))
        .bearer_auth("s3cret-admin-0123456789abcdefghijklmnop")
        .json(&j)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let list: serde_json::Value = http
        .get(format!("{admin}/v1/jobs"))
        .bearer_auth("s3cret-admin-0123456789abcdefghijklmnop")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["guarded"]);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_scraped_and_parse() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let (code, _) = post_job(&env.admin(), &job("m", &[adam(0)], &[], &serials("M", 3))).await;
    assert_eq!(code, 202);
    wait_job(&env.admin(), "m", Duration::from_secs(30)).await;
    let text = reqwest::get(format!("{}/metrics", env.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut families = HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap();
            assert!(name.starts_with("vppd_"), "{name}");
            assert!(matches!(
                parts.next(),
                Some("counter" | "gauge" | "histogram")
            ));
            families.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        // name{labels} value
        let (series, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        assert!(series.starts_with("vppd_"), "{line}");
        // No serials or adamIds as label values.
        assert!(
            !series.contains("M000") && !series.contains(&adam(0)),
            "{line}"
        );
    }
    for f in [
        "vppd_apple_requests_total",
        "vppd_apple_request_duration_seconds",
        "vppd_notifications_received_total",
        "vppd_assignments_total",
        "vppd_installs_released_total",
        "vppd_installs_pending",
        "vppd_jobs",
        "vppd_token_expiry_timestamp_seconds",
        "vppd_apple_limit",
        "vppd_events_in_flight",
        "vppd_ready",
    ] {
        assert!(families.contains(f), "{f} missing from /metrics");
    }
    assert!(text.contains("vppd_assignments_total{phase=\"associate\",state=\"confirmed\"} 3"));
    assert!(text.contains("vppd_jobs{state=\"completed\"} 1"));
    daemon.shutdown().await;
}

/// A daemon whose token `main` is ready, and in its store a job of
/// `adam(0)` on `serials` whose one batch is on its way to Apple (see
/// [`batch_on_its_way`]).
async fn daemon_with_batch_on_its_way(
    id: &str,
    serials: &[&str],
) -> (Env, vppd::daemon::Daemon, Arc<dyn vppd::store::Store>) {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    wait_token(&env.admin(), "main", "ready").await;
    let store = daemon.context().store.clone();
    batch_on_its_way(&store, id, serials).await;
    (env, daemon, store)
}

/// A job of `adam(0)` on `serials` whose one batch is on its way to Apple,
/// written straight into the store. Its token has no submitter or tracker
/// in the daemon, so only the notifications and the eventId a test records
/// move it.
async fn batch_on_its_way(store: &Arc<dyn vppd::store::Store>, id: &str, serials: &[&str]) {
    let serials: Vec<String> = serials.iter().map(|s| s.to_string()).collect();
    let request: vppd::domain::job::JobRequest =
        serde_json::from_value(job(id, &[adam(0)], &[], &serials)).unwrap();
    let request = vppd::domain::job::JobRequest {
        token: "elsewhere".into(),
        ..request
    };
    let spec = request
        .validate(|t| t == "elsewhere", vppd::domain::job::JobLimits::NONE)
        .unwrap();
    let spec = Arc::new(spec);
    let shape = vppd::domain::plan::Shape::from(&small_limits());
    let record = vppd::stages::admin::new_record(&spec, shape);
    assert!(matches!(
        store.create_job(&spec, record).await.unwrap(),
        vppd::store::Created::New(_)
    ));
    store
        .update_job(&spec.id, vppd::domain::lifecycle::JobChange::Start)
        .await
        .unwrap();
    let batch = store.start_batch(&spec.id, shape).await.unwrap().unwrap();
    assert_eq!(batch.no(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notification_that_beats_its_event_id_is_applied_once_the_event_is_recorded() {
    let (env, daemon, store) = daemon_with_batch_on_its_way("race", &["R1", "R2"]).await;

    // Apple's notification arrives before the eventId is recorded.
    let notification = serde_json::json!({
        "notificationId": "race-1", "notificationType": "ASSET_MANAGEMENT", "uId": env.uid().await,
        "notification": {"eventId": "race-event", "type": "ASSOCIATE", "result": "SUCCESS",
            "assignments": [{"adamId": adam(0), "pricingParam": "STDQ", "serialNumber": "R1"},
                            {"adamId": adam(0), "pricingParam": "STDQ", "serialNumber": "R2"}]}
    });
    let r = reqwest::Client::new()
        .post(env.notifications_url())
        .bearer_auth(env.secret())
        .json(&notification)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = job_status(&env.admin(), "race").await.unwrap();
    assert_eq!(early.assignments.confirmed, 0, "applied before its event");

    // Now the submitter's commit lands.
    assert!(
        store
            .batch_sent(&"race".into(), 0, &"race-event".into())
            .await
            .unwrap()
    );
    let s = wait_job(&env.admin(), "race", Duration::from_secs(30)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 2);
    assert_eq!(env.commands().len(), 2);
    assert_eq!(store.inbox_len().await.unwrap(), 0);
    daemon.shutdown().await;
}

/// An older vppd kept Apple's JSON envelopes in the inbox (and parked
/// them so); after an upgrade they are still applied, parked ones included,
/// and a damaged item is dropped without holding the rest up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_an_older_vppd_recorded_as_json_are_applied_after_an_upgrade() {
    let (env, daemon, store) = daemon_with_batch_on_its_way("legacy", &["L1", "L2", "L3"]).await;
    let uid = env.uid().await;
    let envelope = |id: &str, serials: &[&str]| {
        let assignments: Vec<_> = serials
            .iter()
            .map(|s| serde_json::json!({"adamId": adam(0), "pricingParam": "STDQ", "serialNumber": s}))
            .collect();
        // As an older vppd stored the body it received: JSON, here with
        // the leading whitespace a sender may put.
        let mut bytes = b"\n ".to_vec();
        bytes.extend(
            serde_json::to_vec(&serde_json::json!({
                "notificationId": id, "notificationType": "ASSET_MANAGEMENT", "uId": uid,
                "notification": {"eventId": "legacy-event", "type": "ASSOCIATE",
                    "result": "SUCCESS", "assignments": assignments}
            }))
            .unwrap(),
        );
        bytes
    };
    // Before its event is recorded: parked as JSON.
    store
        .record_notification("legacy-1", &envelope("legacy-1", &["L1", "L2"]))
        .await
        .unwrap();
    // A damaged item in the binary form: cut short.
    store
        .record_notification("damaged", &[1, 1, 9, b'n'])
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.inbox_len().await.unwrap() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the inbox was not worked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let early = job_status(&env.admin(), "legacy").await.unwrap();
    assert_eq!(early.assignments.confirmed, 0, "applied before its event");
    // The event is recorded: the parked JSON comes back and is applied,
    // and so is one recorded as JSON afterwards.
    assert!(
        store
            .batch_sent(&"legacy".into(), 0, &"legacy-event".into())
            .await
            .unwrap()
    );
    store
        .record_notification("legacy-2", &envelope("legacy-2", &["L3"]))
        .await
        .unwrap();
    let s = wait_job(&env.admin(), "legacy", Duration::from_secs(30)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 3);
    assert_eq!(env.commands().len(), 3);
    assert_eq!(store.inbox_len().await.unwrap(), 0);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_jobs_and_dot_ids_are_refused_with_nothing_stored() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    let (daemon, _) = env
        .start_daemon_with(
            &PATIENT_TRACKING,
            "max_job_pairs = 1000\nmax_job_assets = 50",
        )
        .await;
    let admin = env.admin();
    // 10 assets x 101 devices = 1010 pairs.
    let assets: Vec<String> = (0..10).map(adam).collect();
    let (code, body) = post_job(&admin, &job("wide", &assets, &[], &serials("W", 101))).await;
    assert_eq!(code, 400, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("1010 pairs") && message.contains("admin.max_job_pairs (1000)"),
        "{message}"
    );
    let many: Vec<String> = (0..51).map(adam).collect();
    let (code, body) = post_job(&admin, &job("many", &many, &[], &serials("M", 1))).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("max_job_assets"),
        "{body}"
    );
    for id in [".", ".."] {
        let (code, body) = post_job(&admin, &job(id, &assets[..1], &[], &serials("D", 1))).await;
        assert_eq!(code, 400, "{body}");
        assert!(body["error"].as_str().unwrap().starts_with("id:"), "{body}");
    }
    let listed: serde_json::Value = reqwest::get(format!("{admin}/v1/jobs"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["jobs"],
        serde_json::json!([]),
        "a refused job was stored"
    );
    // At the bound exactly: accepted.
    let (code, body) = post_job(&admin, &job("edge", &assets, &[], &serials("E", 100))).await;
    assert_eq!(code, 202, "{body}");
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shortfall_over_many_assets_names_the_first_twenty_and_counts_the_rest() {
    // One asset owned; 25 the location does not own.
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(100))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let assets: Vec<String> = (0..26).map(adam).collect();
    let (code, body) = post_job(&env.admin(), &job("wide", &assets, &[], &serials("D", 2))).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_job(&env.admin(), "wide", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Failed);
    let error = s.error.unwrap();
    assert_eq!(
        error.matches("not owned by this location").count(),
        20,
        "{error}"
    );
    assert!(error.ends_with("; and 5 more"), "{error}");
    assert!(env.commands().is_empty());
    daemon.shutdown().await;
}
