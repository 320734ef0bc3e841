//! deploy/grafana-dashboard.json against a real daemon's /metrics: every
//! panel has a series to show from a clean run on (no "No data"), and the
//! "Associations decided" gauge reaches 100% after a job that failed on a
//! license shortfall.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use vppd::sim::SimAsset;

/// Every `vppd_*` name a dashboard query reads, with the query.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("deploy/grafana-dashboard.json").unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = stack.pop() {
        if let Some(children) = panel["panels"].as_array() {
            stack.extend(children);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap().to_string();
            out.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("vppd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn has_series(metrics: &str, name: &str) -> bool {
    metrics.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

fn counter(metrics: &str, phase: &str, state: &str) -> f64 {
    let prefix = format!("vppd_assignments_total{{phase=\"{phase}\",state=\"{state}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no series {prefix}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_panel_has_data_and_decided_reaches_100_percent() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![
            SimAsset::app(&adam(0), Some(100)),
            SimAsset::app(&adam(1), Some(1)),
        ],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let admin = env.admin();
    let (code, _) = post_job(&admin, &job("fine", &[adam(0)], &[], &serials("D", 5))).await;
    assert_eq!(code, 202);
    let done = wait_job(&admin, "fine", Duration::from_secs(60)).await;
    assert_eq!(done.state.as_str(), "completed");
    // One license for three devices: the job fails before sending anything.
    let (code, _) = post_job(&admin, &job("short", &[adam(1)], &[], &serials("S", 3))).await;
    assert_eq!(code, 202);
    let short = wait_job(&admin, "short", Duration::from_secs(60)).await;
    assert_eq!(short.state.as_str(), "failed", "{short:?}");

    let metrics = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut missing = Vec::new();
    for (title, expr) in dashboard_queries() {
        if expr.contains("or on() vector(0)") {
            continue;
        }
        for name in metric_names(&expr) {
            if !has_series(&metrics, &name) {
                missing.push(format!("{title}: {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "panels without a series: {missing:?}");

    let (_, gauge) = dashboard_queries()
        .into_iter()
        .find(|(title, _)| title == "Associations decided")
        .unwrap();
    assert!(
        gauge.contains("state=\"submitted\"") && !gauge.contains("state=\"planned\""),
        "{gauge}"
    );
    // The gauge's query over these counters (all started at zero in this
    // process, so increase() over the run is their value).
    let decided =
        counter(&metrics, "associate", "confirmed") + counter(&metrics, "associate", "failed");
    let submitted = counter(&metrics, "associate", "submitted");
    let planned = counter(&metrics, "associate", "planned");
    assert_eq!(planned, 8.0);
    assert_eq!(decided, 5.0);
    assert_eq!(
        (decided / submitted).min(1.0),
        1.0,
        "decided {decided} of {submitted} sent"
    );
    daemon.shutdown().await;
}
