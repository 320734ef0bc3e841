//! `[store] retain_finished`, through the real binary: a finished job is
//! forgotten once the retention has passed (404 on GET, nothing of it left
//! in the store's counts), one still waiting is kept, and the store's size
//! and records are metrics.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vppd::domain::job::JobState;
use vppd::sim::SimAsset;

async fn metrics(admin: &str) -> String {
    reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `line` starts (name and labels), if exported.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_jobs_are_forgotten_after_retain_finished() {
    let assets = [adam(0), adam(1)];
    let env = Env::new(
        sim_config(small_limits()),
        vec![
            SimAsset::app(&assets[0], Some(100)),
            SimAsset::app(&assets[1], Some(1)),
        ],
    )
    .await;
    let text = env.config_text(&PATIENT_TRACKING, "") + "[store]\nretain_finished = \"5s\"\n";
    let config = env.dir.path().join("retain.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = env
        .vppd_run(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let admin = env.admin();
    wait_ready(&admin).await;

    let (code, body) = post_job(&admin, &job("done", &assets[..1], &[], &serials("D", 3))).await;
    assert_eq!(code, 202, "{body}");
    // Short of licenses and told to wait for them: never finishes here.
    let mut waiting = job("waiting", &assets[1..], &[], &serials("W", 3));
    waiting["waitForLicenses"] = serde_json::json!(true);
    let (code, body) = post_job(&admin, &waiting).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_job(&admin, "done", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed);
    assert_eq!(env.commands().len(), 3);

    let client = reqwest::Client::new();
    let get = |path: String| {
        let client = client.clone();
        let admin = admin.clone();
        async move {
            client
                .get(format!("{admin}{path}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while get("/v1/jobs/done".into()).await != 404 {
        assert!(Instant::now() < deadline, "the finished job was kept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get("/v1/jobs/done/failures".into()).await, 404);
    assert_eq!(get("/v1/jobs/waiting".into()).await, 200);
    let listed: serde_json::Value = client
        .get(format!("{admin}/v1/jobs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["waiting"]);

    // The next sweep's counts: one job left, and its batches none (it never
    // sent one).
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = metrics(&admin).await;
        if sample(&text, "vppd_store_records{kind=\"jobs\"}") == Some(1.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "store records never counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(sample(&text, "vppd_jobs_pruned_total"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "vppd_store_records{kind=\"batches\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "vppd_store_records{kind=\"failures\"}"),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(&text, "vppd_store_bytes").is_some_and(|b| b > 0.0),
        "{text}"
    );

    signal(child.id(), Signal::Term);
    assert!(child.wait().unwrap().success());
}
