//! The license lifecycle end to end, through the daemon against the
//! simulator on loopback: revoke, uninstall, the license check before a
//! job's first request, waiting for licenses, the assets endpoint, signed
//! commands.

mod common;

use std::time::Duration;

use common::*;
use vppd::domain::job::{JobState, RequestType};
use vppd::sim::SimAsset;

/// Management POSTs Apple received, in order (paths like `/assets/revoke`).
fn manage_posts(env: &Env) -> Vec<String> {
    env.sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/assets/"))
        .map(|r| r.path)
        .collect()
}

async fn setup(env: &Env, assets: &[String], devices: &[String]) {
    let (code, body) = post_job(&env.admin(), &job("setup", assets, &[], devices)).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_job(&env.admin(), "setup", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoke_goes_between_disassociations_and_associations_and_uninstalls_what_apple_names() {
    let assets = vec![adam(0), adam(1)];
    let old = serials("OLD", 9);
    let gone = serials("GONE", 2);
    let new = serials("NEW", 4);
    let mut limits = small_limits();
    // 9 revoke targets, at most 4 a request: 3 revoke requests.
    limits.max_revoke_serial_numbers = 4;
    let env = Env::new(
        sim_config(limits),
        assets.iter().map(|a| SimAsset::app(a, Some(100))).collect(),
    )
    .await;
    let (daemon, _) = env.start_daemon(&FAST_TRACKING).await;
    let all: Vec<String> = old.iter().chain(&gone).cloned().collect();
    setup(&env, &assets, &all).await;
    env.sim.clear_requests();

    let body = serde_json::json!({
        "id": "retire",
        "token": "main",
        "assets": assets.iter().map(|a| serde_json::json!({"adamId": a})).collect::<Vec<_>>(),
        "disassociate": {"serialNumbers": gone},
        "revoke": {"serialNumbers": old},
        "associate": {"serialNumbers": new},
        "uninstall": true,
    });
    let (code, body) = post_job(&env.admin(), &body).await;
    assert_eq!(code, 202, "{body}");
    // 2 assets x 2 serials: 1 disassociate; 3 revokes; 1 associate.
    assert_eq!(body["requests"]["planned"], 5, "{body}");
    let s = wait_job(&env.admin(), "retire", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.revocations.confirmed, 18, "{s:?}");
    assert_eq!(s.revocations.total, 18, "{s:?}");
    assert_eq!(s.disassociations.confirmed, 4);
    assert_eq!(s.assignments.confirmed, 8);
    assert_eq!(s.removals.released, 18 + 4, "{s:?}");
    assert_eq!(s.removals.pending, 0);
    assert_eq!(s.installs.released, 8);

    let posts = manage_posts(&env);
    assert_eq!(
        posts,
        [
            "/assets/disassociate",
            "/assets/revoke",
            "/assets/revoke",
            "/assets/revoke",
            "/assets/associate"
        ],
    );
    let held = env.held();
    for a in &assets {
        for d in old.iter().chain(&gone) {
            assert!(!held.contains(&(a.clone(), d.clone())), "{a} {d}");
        }
        for d in &new {
            assert!(held.contains(&(a.clone(), d.clone())));
        }
    }
    // One removal per revoked and disassociated pair, once each; an
    // install per new pair (plus the setup's).
    let commands = env.commands();
    assert!(commands.values().all(|(n, _, _)| *n == 1));
    assert_eq!(env.sink.count(RequestType::RemoveApplication), 22);
    assert_eq!(env.sink.count(RequestType::InstallApplication), 22 + 8);
    for a in &assets {
        for d in &old {
            assert!(
                commands.values().any(|(_, x, t)| x == a && t == d),
                "no removal for {a} {d}"
            );
        }
    }
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoke_only_job_needs_no_assets() {
    let assets = vec![adam(0)];
    let devices = serials("D", 3);
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&assets[0], Some(10))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&FAST_TRACKING).await;
    setup(&env, &assets, &devices).await;
    let (code, body) = post_job(
        &env.admin(),
        &serde_json::json!({"id": "wipe", "token": "main",
            "revoke": {"serialNumbers": [devices[0], devices[1], "NEVER-HELD"]}}),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let s = wait_job(&env.admin(), "wipe", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.revocations.confirmed, 2, "{s:?}");
    // Without uninstall, nothing is released for the revocations.
    assert_eq!(s.removals.released, 0);
    let held = env.held();
    assert!(!held.contains(&(assets[0].clone(), devices[0].clone())));
    assert!(held.contains(&(assets[0].clone(), devices[2].clone())));
    // A job with neither assets nor a revoke is still refused.
    let (code, body) = post_job(
        &env.admin(),
        &serde_json::json!({"token": "main", "associate": {"serialNumbers": ["X"]}}),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("assets"),
        "{body}"
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shortfall_sends_nothing_not_even_disassociations_unless_they_free_enough() {
    let assets = vec![adam(0)];
    // 2 licenses, both held by OLD-0 and OLD-1.
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&assets[0], Some(2))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let old = serials("OLD-", 2);
    setup(&env, &assets, &old).await;
    env.sim.clear_requests();

    // Frees one (OLD-0), needs three: fails, and OLD-0 keeps its license.
    let (code, _) = post_job(
        &env.admin(),
        &job("short", &assets, &old[..1], &serials("NEW", 3)),
    )
    .await;
    assert_eq!(code, 202);
    let s = wait_job(&env.admin(), "short", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Failed, "{s:?}");
    let error = s.error.unwrap();
    assert!(error.contains("3 licenses needed, 1 available"), "{error}");
    assert!(manage_posts(&env).is_empty(), "{:?}", manage_posts(&env));
    assert!(env.held().contains(&(assets[0].clone(), old[0].clone())));

    // Frees both, needs two: the disassociations make room, it completes.
    let (code, _) = post_job(
        &env.admin(),
        &job("room", &assets, &old, &serials("NEW", 2)),
    )
    .await;
    assert_eq!(code, 202);
    let s = wait_job(&env.admin(), "room", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 2);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_waiting_for_licenses_starts_on_asset_count() {
    let assets = vec![adam(0), adam(1)];
    let env = Env::new(
        sim_config(small_limits()),
        vec![
            SimAsset::app(&assets[0], Some(1)),
            SimAsset::app(&assets[1], Some(50)),
        ],
    )
    .await;
    let (daemon, metrics) = env.start_daemon(&PATIENT_TRACKING).await;
    let mut body = job("wait", &assets, &[], &serials("D", 4));
    body["waitForLicenses"] = serde_json::json!(true);
    let (code, _) = post_job(&env.admin(), &body).await;
    assert_eq!(code, 202);
    // It waits, saying for what, and sends nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let s = job_status(&env.admin(), "wait").await.unwrap();
        // While the token registers, the job waits for that first.
        if let Some(w) = s.waiting_for.clone()
            && !w.contains("registering with Apple")
        {
            assert_eq!(s.state, JobState::Accepted);
            break w;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        waiting.contains(&format!(
            "asset {} (STDQ): 4 licenses needed, 1 available",
            assets[0]
        )),
        "{waiting}"
    );
    assert!(!waiting.contains(&assets[1]), "{waiting}");
    assert!(manage_posts(&env).is_empty());
    let short = metrics
        .license_assets_short
        .with_label_values(&["main"])
        .get();
    assert_eq!(short, 1);

    // Apple reports 3 more licenses (ASSET_COUNT): the job starts.
    env.sim
        .add_licenses(&env.stoken, &assets[0], "STDQ", 3)
        .unwrap();
    let s = wait_job(&env.admin(), "wait", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 8);
    assert!(s.waiting_for.is_none());

    // The counts the daemon shows follow the delta and its own changes.
    let assets_doc: serde_json::Value =
        reqwest::get(format!("{}/v1/tokens/main/assets", env.admin()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let first = assets_doc["assets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["adamId"] == assets[0].as_str())
        .unwrap_or_else(|| panic!("{assets_doc}"))
        .clone();
    assert_eq!(first["totalCount"], 4, "{first}");
    assert_eq!(first["assignedCount"], 4, "{first}");
    assert_eq!(first["availableCount"], 0, "{first}");
    assert_eq!(first["productType"], "App", "{first}");
    assert_eq!(first["pricingParam"], "STDQ");
    assert!(
        first["updatedAt"].as_str().unwrap().ends_with('Z'),
        "{first}"
    );
    let r = reqwest::get(format!("{}/v1/tokens/nope/assets", env.admin()))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // Below 10% free: the asset with none left counts as low (the other
    // has 42 of 50 free).
    let scrape = reqwest::get(format!("{}/metrics", env.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scrape.contains("vppd_license_assets_low{token=\"main\"} 1"),
        "{scrape}"
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_are_signed_with_a_fresh_timestamp_on_every_attempt() {
    let assets = vec![adam(0)];
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&assets[0], Some(10))],
    )
    .await;
    let secret_file = env.dir.path().join("signing-secret");
    std::fs::write(&secret_file, "  webhook-s3cret-0123456789abcdefghijkl \n").unwrap();
    let text = env.config_text(&FAST_TRACKING, "").replace(
        "batch_size = 25",
        &format!(
            "batch_size = 25\nsigning_secret_file = \"{}\"",
            secret_file.display()
        ),
    );
    let path = env.dir.path().join("vppd.toml");
    std::fs::write(&path, &text).unwrap();
    let config = vppd::runtime::config::Config::parse(&text, &path).unwrap();
    assert!(!format!("{config:?}").contains("webhook-s3cret-0123456789abcdefghijkl"));
    let daemon = env.start_daemon_on(config).await;
    wait_ready(&env.admin()).await;
    // The MDM is down for the first attempts: every retry is signed anew.
    env.sink.fail_with(503);
    let (code, _) = post_job(&env.admin(), &job("signed", &assets, &[], &serials("D", 2))).await;
    assert_eq!(code, 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env.sink.signed().len() < 2 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.sink.fail_with(0);
    let s = wait_job(&env.admin(), "signed", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    let posts = env.sink.signed();
    assert!(posts.len() >= 3, "{}", posts.len());
    for (ts, sig, body) in &posts {
        let ts = ts.as_deref().expect("X-Vppd-Timestamp on every POST");
        let sig = sig.as_deref().expect("X-Vppd-Signature on every POST");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let t: i64 = ts.parse().unwrap();
        assert!((now - t).abs() < 120, "{ts}");
        let mut signed = format!("{ts}.").into_bytes();
        signed.extend_from_slice(body);
        let expected =
            vppd::domain::signing::hmac_sha256(b"webhook-s3cret-0123456789abcdefghijkl", &signed);
        assert_eq!(sig, format!("sha256={}", hex::encode(expected)));
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["commands"][0]["requestType"], "InstallApplication", "{v}");
    }
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_reassign_moves_the_apps_and_counts_the_removals() {
    let opts = vppd::cli::demo::DemoOptions {
        devices: 300,
        apps: 3,
        progress: false,
        reassign: true,
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let report = vppd::cli::demo::run(opts).await.unwrap();
    let text = report.render();
    println!("{text}");
    assert!(report.ok(), "{text}");
    let r = report.reassign.as_ref().expect("reassign report");
    assert_eq!(r.removals_released, 900, "{text}");
    assert_eq!(r.installs_released, 900);
    assert_eq!(r.old_still_licensed, 0);
    assert!(text.contains("900 RemoveApplication commands"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_pending_past_resubmit_after_is_resubmitted_for_its_undecided_pairs_only() {
    let assets = vec![adam(0)];
    let mut config = sim_config(small_limits());
    // One notification per pair, so that what Apple did is known at once.
    config.notifications.max_items = 1;
    let env = Env::new(
        config,
        assets.iter().map(|a| SimAsset::app(a, Some(20))).collect(),
    )
    .await;
    // The first event does 2 of its 4 pairs, then stays PENDING.
    env.sim.set_hold(vppd::sim::HoldSettings {
        all: false,
        next: 1,
        after_tasks: 2,
    });
    let text = env.config_text(&FAST_TRACKING, "").replace(
        "sync_after = \"2s\"",
        "sync_after = \"2s\"\nresubmit_after = \"2s\"",
    );
    let path = env.dir.path().join("vppd.toml");
    std::fs::write(&path, &text).unwrap();
    let config = vppd::runtime::config::Config::parse(&text, &path).unwrap();
    assert_eq!(config.tracking.resubmit_after, Duration::from_secs(2));
    let metrics = std::sync::Arc::new(vppd::runtime::metrics::Metrics::new());
    let daemon = vppd::daemon::Daemon::start_on(config, metrics.clone(), env.listeners())
        .await
        .unwrap();
    wait_ready(&env.admin()).await;
    let devices = serials("D", 4);
    let (code, _) = post_job(&env.admin(), &job("slow", &assets, &[], &devices)).await;
    assert_eq!(code, 202);
    let s = wait_job(&env.admin(), "slow", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 4);
    assert_eq!(
        metrics
            .events_resubmitted
            .with_label_values(&["main"])
            .get(),
        1
    );
    let posts: Vec<serde_json::Value> = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/assets/associate")
        .filter_map(|r| r.body)
        .collect();
    assert_eq!(posts.len(), 2, "{posts:?}");
    let named = |p: &serde_json::Value| -> Vec<String> {
        serde_json::from_value(p["serialNumbers"].clone()).unwrap()
    };
    assert_eq!(named(&posts[0]).len(), 4);
    // Only the two pairs Apple had not done: none decided is sent again.
    let again = named(&posts[1]);
    assert_eq!(again.len(), 2, "{again:?}");
    assert!(
        !again.contains(&devices[0]) && !again.contains(&devices[1]),
        "{again:?}"
    );
    let commands = env.commands();
    assert_eq!(commands.len(), 4);
    assert!(commands.values().all(|(n, _, _)| *n == 1));
    env.sim.release_held(None);
    daemon.shutdown().await;
}
