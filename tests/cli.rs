//! The `vppd` binary's operator commands, run for real: help texts,
//! check-config, plan, submit and status against a running daemon, and the
//! systemd notify protocol on a real socket.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use vppd::sim::SimAsset;

fn vppd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "run",
        "demo",
        "sim",
        "submit",
        "status",
        "check-config",
        "plan",
        "completions",
    ] {
        let o = vppd(&[sub, "--help"]);
        assert!(o.status.success(), "{sub}: {}", text(&o));
        let t = text(&o);
        assert!(t.contains("Usage: vppd"), "{sub}: {t}");
    }
    let o = vppd(&["sim", "--help"]);
    assert!(text(&o).contains("--max-serial-numbers"));
    let o = vppd(&["completions", "bash"]);
    assert!(o.status.success() && text(&o).contains("check-config"));
}

#[test]
fn check_config_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("main.vpptoken");
    std::fs::write(
        &token,
        vppd::apple::token::SToken::encode(
            "inner",
            time::OffsetDateTime::now_utc() + time::Duration::days(30),
            "Check School",
        ),
    )
    .unwrap();
    let example = std::fs::read_to_string("deploy/vppd.toml").unwrap();
    let config = dir.path().join("vppd.toml");
    // The example with its paths pointed into the temporary directory.
    let mut text_ok = String::new();
    for line in example.lines() {
        let line = if line.trim_start().starts_with("stoken_file") {
            format!("stoken_file = \"{}\"", token.display())
        } else if line.trim_start().starts_with("auth_token_file") {
            format!(
                "auth_token_file = \"{}\"",
                dir.path().join("secret").display()
            )
        } else if line.trim_start().starts_with("token_file") {
            "token_file = \"\"".to_string()
        } else if line.trim_start().starts_with("data_dir") {
            format!("data_dir = \"{}\"", dir.path().join("data").display())
        } else {
            line.to_string()
        };
        text_ok.push_str(&line);
        text_ok.push('\n');
    }
    std::fs::write(&config, &text_ok).unwrap();
    let o = vppd(&["check-config", "--config", config.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Check School"));

    std::fs::write(&token, "not a token").unwrap();
    let o = vppd(&["check-config", "--config", config.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("main.vpptoken") && !t.contains("not a token"),
        "{t}"
    );

    std::fs::write(&config, text_ok.replace("batch_size", "batch_sise")).unwrap();
    let o = vppd(&["check-config", "--config", config.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("batch_sise"), "{}", text(&o));
}

#[test]
fn plan_is_a_dry_run_with_the_minimum_count() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.json");
    let serials: Vec<String> = (0..10_000).map(|i| format!("S{i}")).collect();
    let assets: Vec<serde_json::Value> = (0..25)
        .map(|i| serde_json::json!({"adamId": (1000 + i).to_string()}))
        .collect();
    std::fs::write(
        &job,
        serde_json::json!({"id": "bts", "token": "main", "assets": assets, "associate": {"serialNumbers": serials}}).to_string(),
    )
    .unwrap();
    let o = vppd(&["plan", job.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("requests: 10 "), "{}", text(&o));
    let o = vppd(&[
        "plan",
        job.to_str().unwrap(),
        "--max-serial-numbers",
        "300",
        "--max-assets",
        "10",
    ]);
    assert!(text(&o).contains("requests: 102 "), "{}", text(&o));
    std::fs::write(
        &job,
        r#"{"token": "main", "assets": [{"adamId": "x"}], "associate": {"serialNumbers": ["A"]}}"#,
    )
    .unwrap();
    let o = vppd(&["plan", job.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("assets[0].adamId"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_and_status_against_a_running_daemon() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let job_file = env.dir.path().join("job.json");
    std::fs::write(
        &job_file,
        job("cli-job", &[adam(0)], &[], &serials("C", 4)).to_string(),
    )
    .unwrap();
    let admin = env.admin();
    let bin = env!("CARGO_BIN_EXE_vppd");
    let out = tokio::process::Command::new(bin)
        .args(["submit", "--admin", &admin, job_file.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cli-job");
    let out = tokio::process::Command::new(bin)
        .args(["status", "--admin", &admin, "cli-job", "--watch"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["state"], "completed");
    assert_eq!(doc["installs"]["released"], 4);
    let out = tokio::process::Command::new(bin)
        .args(["status", "--admin", &admin])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli-job"));
    // A refused job: the daemon's message, non-zero exit.
    std::fs::write(
        &job_file,
        r#"{"token": "other", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": ["A"]}}"#,
    )
    .unwrap();
    let out = tokio::process::Command::new(bin)
        .args(["submit", "--admin", &admin, job_file.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn systemd_notify_ready_then_stopping() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    let socket_path = env.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let config = env.dir.path().join("vppd.toml");
    std::fs::write(&config, env.config_text(&PATIENT_TRACKING, "")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // Ready for systemd means ready for the readiness probe too.
    let r = reqwest::get(format!("{}/readyz", env.admin()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// The location's client config as Apple holds it.
async fn client_config(env: &Env) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}/client/config", env.sim.base_url()))
        .bearer_auth(&env.stoken)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_location_managed_by_another_mdm_is_not_taken_over_unless_told_to() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    // Another MDM registered itself on this location.
    let r = reqwest::Client::new()
        .post(format!("{}/client/config", env.sim.base_url()))
        .bearer_auth(&env.stoken)
        .json(&serde_json::json!({"mdmInfo": {"id": "other-mdm", "name": "OtherMDM", "metadata": "1.0"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let config = env.config(&PATIENT_TRACKING);
    let daemon = vppd::daemon::Daemon::start(
        config.clone(),
        std::sync::Arc::new(vppd::metrics::Metrics::new()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = reqwest::get(format!("{}/readyz", env.admin()))
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "took over another MDM's location");
    let cc = client_config(&env).await;
    assert_eq!(cc["mdmInfo"]["id"], "other-mdm");
    daemon.shutdown().await;

    let text = env
        .config_text(&PATIENT_TRACKING, "")
        .replace("name = \"main\"\n", "name = \"main\"\ntakeover = true\n");
    let path = env.dir.path().join("takeover.toml");
    std::fs::write(&path, &text).unwrap();
    let config = vppd::config::Config::parse(&text, &path).unwrap();
    let daemon =
        vppd::daemon::Daemon::start(config, std::sync::Arc::new(vppd::metrics::Metrics::new()))
            .await
            .unwrap();
    wait_ready(&env.admin()).await;
    let cc = client_config(&env).await;
    assert_eq!(cc["mdmInfo"]["name"], "vppd");
    assert_eq!(cc["notificationUrl"], env.notifications_url());
    daemon.shutdown().await;
}
