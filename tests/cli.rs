//! The `vppd` binary's operator commands, run for real: help texts,
//! check-config, plan, submit, status, cancel and failures against a running
//! daemon (and through its restart), error texts, log output for journald,
//! and the systemd notify protocol (READY, STATUS, WATCHDOG, STOPPING) on a
//! real socket.

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
        "cancel",
        "failures",
        "sink",
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
async fn systemd_notify_ready_status_watchdog_then_stopping() {
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
    let mut child = env
        .vppd_run(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        // WatchdogSec=2s: a keep-alive every second.
        .env("WATCHDOG_USEC", "2000000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut recv = || {
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut seen = Vec::new();
    while !seen.iter().any(|m| m == "READY=1") {
        seen.push(recv());
    }
    // Ready for systemd means ready for the readiness probe too.
    let r = reqwest::get(format!("{}/readyz", env.admin()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    while seen.iter().filter(|m| *m == "WATCHDOG=1").count() < 2 {
        seen.push(recv());
    }
    let status = seen
        .iter()
        .find(|m| m.starts_with("STATUS="))
        .expect("a STATUS= line");
    assert!(
        status.contains("jobs running") && status.contains("installs pending"),
        "{status}"
    );
    signal(child.id(), Signal::Int);
    while !seen.iter().any(|m| m == "STOPPING=1") {
        seen.push(recv());
    }
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
    let daemon = env.start_daemon_on(config.clone()).await;
    // The token fails, visibly; vppd itself stays ready.
    let doc = wait_token(&env.admin(), "main", "failed").await;
    assert!(
        doc["error"].as_str().unwrap().contains("another MDM"),
        "{doc}"
    );
    let r = reqwest::get(format!("{}/readyz", env.admin()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a failed token made vppd unready");
    let cc = client_config(&env).await;
    assert_eq!(cc["mdmInfo"]["id"], "other-mdm");
    daemon.shutdown().await;

    let text = env
        .config_text(&PATIENT_TRACKING, "")
        .replace("name = \"main\"\n", "name = \"main\"\ntakeover = true\n");
    let path = env.dir.path().join("takeover.toml");
    std::fs::write(&path, &text).unwrap();
    let config = vppd::runtime::config::Config::parse(&text, &path).unwrap();
    let daemon = env.start_daemon_on(config).await;
    wait_token(&env.admin(), "main", "ready").await;
    let cc = client_config(&env).await;
    assert_eq!(cc["mdmInfo"]["name"], "vppd");
    assert_eq!(cc["notificationUrl"], env.notifications_url());
    daemon.shutdown().await;
}

fn terminate(child: &mut std::process::Child) {
    signal(child.id(), Signal::Term);
    assert!(child.wait().unwrap().success());
}

/// Waits for a line holding `what` on a child's stderr.
async fn wait_for_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) {
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = rx.recv().await {
            if line.contains(what) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no line with {what:?}");
}

async fn vppd_async(args: &[&str], envs: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args(args)
        .env_remove("VPPD_ADMIN")
        .env_remove("VPPD_ADMIN_TOKEN_FILE")
        .envs(envs.iter().copied())
        .output()
        .await
        .unwrap()
}

#[test]
fn admin_defaults_to_the_admin_listen_address() {
    let o = vppd(&["status", "--help"]);
    let t = text(&o);
    assert!(t.contains("[default: http://127.0.0.1:9180]"), "{t}");
    assert!(
        t.contains("VPPD_ADMIN") && t.contains("VPPD_ADMIN_TOKEN_FILE"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_url_and_token_file_come_from_the_environment() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    let token_file = env.dir.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-admin-0123456789abcdefghijklmnop\n").unwrap();
    let (daemon, _) = env
        .start_daemon_with(
            &PATIENT_TRACKING,
            &format!("token_file = \"{}\"", token_file.display()),
        )
        .await;
    let job_file = env.dir.path().join("job.json");
    std::fs::write(
        &job_file,
        job("env-job", &[adam(0)], &[], &serials("E", 2)).to_string(),
    )
    .unwrap();
    let admin = env.admin();
    let token = token_file.to_str().unwrap();
    // No --admin and no --admin-token-file: both from the environment.
    let o = vppd_async(
        &["submit", job_file.to_str().unwrap()],
        &[("VPPD_ADMIN", &admin), ("VPPD_ADMIN_TOKEN_FILE", token)],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "env-job");
    // Without the token the daemon's refusal is shown as it said it.
    let o = vppd_async(&["status", "env-job"], &[("VPPD_ADMIN", &admin)]).await;
    assert!(!o.status.success());
    assert!(
        text(&o).contains("401: missing or wrong admin bearer token"),
        "{}",
        text(&o)
    );
    // A flag wins over the environment.
    let o = vppd_async(
        &["status", "--admin", &admin, "env-job"],
        &[
            ("VPPD_ADMIN", "http://127.0.0.1:1"),
            ("VPPD_ADMIN_TOKEN_FILE", token),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_and_failures() {
    let mut sim = sim_config(small_limits());
    // Slow enough that a job of many batches is still running when canceled.
    sim.event_delay = Duration::from_millis(1500);
    let env = Env::new(
        sim,
        vec![
            SimAsset::app(&adam(0), Some(2)),
            SimAsset::app(&adam(1), Some(1000)),
        ],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let admin = env.admin();
    let dir = env.dir.path();

    // Four devices, two licenses: two pairs fail with Apple's shortfall error.
    let mut short = job("short", &[adam(0)], &[], &serials("F", 4));
    short["allowPartial"] = serde_json::json!(true);
    let (code, _) = post_job(&admin, &short).await;
    assert_eq!(code, 202);
    let done = wait_job(&admin, "short", Duration::from_secs(60)).await;
    assert_eq!(done.assignments.failed, 2, "{done:?}");
    let o = vppd_async(&["failures", "--admin", &admin, "short"], &[]).await;
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        table.contains("2 failed pairs") && table.contains("9709"),
        "{table}"
    );
    let o = vppd_async(&["failures", "--admin", &admin, "short", "--csv"], &[]).await;
    let csv = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[0].starts_with("adamId,pricingParam,phase,serialNumber"),
        "{csv}"
    );
    assert!(
        lines[1].starts_with(&format!("{},STDQ,associate,F", adam(0))),
        "{csv}"
    );
    std::fs::write(dir.join("failures.csv"), &csv).unwrap();

    // Nothing to cancel on a finished job.
    let o = vppd_async(&["cancel", "--admin", &admin, "short"], &[]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already completed"), "{}", text(&o));

    // 3 assets x 70 serials at 3 x 7 per request: 10 requests, each
    // waiting 1.5 s at Apple, so it is running when canceled.
    let (code, _) = post_job(&admin, &job("long", &[adam(1)], &[], &serials("L", 70))).await;
    assert_eq!(code, 202);
    let o = vppd_async(&["cancel", "--admin", &admin, "long"], &[]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("job long: canceled"), "{}", text(&o));
    let s = wait_job(&admin, "long", Duration::from_secs(60)).await;
    assert_eq!(s.state.as_str(), "canceled");
    assert!(s.requests.submitted < 10, "{s:?}");

    let o = vppd_async(&["cancel", "--admin", &admin, "nope"], &[]).await;
    assert!(!o.status.success());
    assert!(text(&o).contains("404: no job `nope`"), "{}", text(&o));
    daemon.shutdown().await;
}

#[test]
fn error_texts_name_the_cause_once() {
    let o = vppd(&["status", "--admin", "127.0.0.1:9180"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--admin `127.0.0.1:9180`: no URL scheme; write http://127.0.0.1:9180"),
        "{}",
        text(&o)
    );
    let o = vppd(&["status", "--admin", "localhost:9180"]);
    assert!(text(&o).contains("no URL scheme"), "{}", text(&o));
    let o = vppd(&["status", "--admin", "ftp://localhost:9180"]);
    assert!(
        text(&o).contains("scheme `ftp` is not http or https"),
        "{}",
        text(&o)
    );

    // A port nobody listens on: bound, read, and let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = vppd(&["status", "--admin", &format!("http://127.0.0.1:{port}")]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("connection refused"), "{t}");
    assert!(!t.contains("error sending request"), "{t}");

    let o = vppd(&["run", "--config", "/nonexistent/vppd.toml"]);
    let t = text(&o);
    assert!(!o.status.success());
    assert_eq!(t.matches("No such file or directory").count(), 1, "{t}");
    assert!(t.contains("/nonexistent/vppd.toml"), "{t}");

    let o = vppd(&[
        "submit",
        "--admin",
        "http://127.0.0.1:1",
        "/nonexistent/job.json",
    ]);
    let t = text(&o);
    assert!(
        t.contains("job file /nonexistent/job.json: No such file or directory"),
        "{t}"
    );
    assert!(!t.contains("os error"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_in_use_is_explained() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(1))],
    )
    .await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let config = env.dir.path().join("vppd.toml");
    let o = vppd_async(&["run", "--config", config.to_str().unwrap()], &[]).await;
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("another process has this store open"), "{t}");
    assert!(!t.contains("Os {") && !t.contains("WouldBlock"), "{t}");
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_watch_rides_out_a_daemon_restart() {
    use tokio::io::AsyncBufReadExt;
    let mut sim = sim_config(small_limits());
    // The job outlives the restart: Apple works the event for 4 s.
    sim.event_delay = Duration::from_secs(4);
    let env = Env::new(sim, vec![SimAsset::app(&adam(0), Some(10))]).await;
    // Without socket activation, on ports of its own: a stopped daemon then
    // refuses connections (the environment's sockets would hold them in
    // their backlog for the next daemon, and the watch would not notice).
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (admin_port, notif_port) = (free_port(), free_port());
    let text = env
        .config_text(&PATIENT_TRACKING, "")
        .replace(
            &format!("listen = \"127.0.0.1:{}\"", env.admin_port),
            &format!("listen = \"127.0.0.1:{admin_port}\""),
        )
        .replace(
            &format!("127.0.0.1:{}\"", env.notif_port),
            &format!("127.0.0.1:{notif_port}\""),
        )
        .replace(
            &format!("127.0.0.1:{}/notifications", env.notif_port),
            &format!("127.0.0.1:{notif_port}/notifications"),
        );
    let config = env.dir.path().join("vppd.toml");
    std::fs::write(&config, text).unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_vppd"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut daemon = start();
    wait_ready(&admin).await;
    let (code, _) = post_job(&admin, &job("restart", &[adam(0)], &[], &serials("R", 3))).await;
    assert_eq!(code, 202);

    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args(["status", "--admin", &admin, "restart", "--watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = watch.stderr.take().unwrap();
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader = tokio::spawn(async move {
        let mut all = String::new();
        let mut lines = tokio::io::BufReader::new(stderr).split(b'\n');
        while let Ok(Some(line)) = lines.next_segment().await {
            let line = String::from_utf8_lossy(&line).into_owned();
            all.push_str(&line);
            all.push('\n');
            let _ = lines_tx.send(line);
        }
        all
    });
    // First the watch sees the job, then the daemon goes away.
    wait_for_line(&mut lines_rx, "job restart:").await;
    let before = job_status(&admin, "restart").await.unwrap();
    assert!(
        !before.state.is_final(),
        "the job ended before the restart: {before:?}"
    );
    terminate(&mut daemon);
    wait_for_line(&mut lines_rx, "retrying until it is back").await;
    assert!(watch.try_wait().unwrap().is_none(), "the watch gave up");
    let mut daemon = start();
    wait_ready(&admin).await;
    let out = tokio::time::timeout(Duration::from_secs(90), watch.wait_with_output())
        .await
        .expect("the watch did not end")
        .unwrap();
    let stderr = reader.await.unwrap();
    assert!(out.status.success(), "{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["state"], "completed", "{doc}");
    assert!(stderr.contains("vppd answers again"), "{stderr}");
    // Not a terminal: no progress frames, only whole lines.
    assert!(!stderr.contains('\r'), "{stderr:?}");
    terminate(&mut daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_carry_no_colour_off_a_terminal_and_no_timestamp_for_journald() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(1))],
    )
    .await;
    let config = env.dir.path().join("vppd.toml");
    std::fs::write(&config, env.config_text(&PATIENT_TRACKING, "")).unwrap();
    let run = |journal: bool| {
        let log = env.dir.path().join(format!("log-{journal}"));
        let file = std::fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        let mut cmd = env.vppd_run(&config);
        cmd.env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .stderr(file);
        if journal {
            // What systemd sets when stderr is its journal stream.
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        (cmd.spawn().unwrap(), log)
    };
    for journal in [false, true] {
        let (mut child, log) = run(journal);
        wait_ready(&env.admin()).await;
        terminate(&mut child);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("listening"), "{text}");
        assert!(!text.contains('\u{1b}'), "ANSI codes in a file: {text:?}");
        let stamped = text
            .lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with("20") && l.as_bytes().get(4) == Some(&b'-'));
        let plain = text
            .lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.trim_start().starts_with(|c: char| c.is_ascii_uppercase()));
        if journal {
            assert!(plain, "journald stamps lines itself: {text}");
        } else {
            assert!(stamped, "a plain file needs timestamps: {text}");
        }
    }
}

/// `systemd-analyze verify` accepts the unit (skipped where systemd is
/// absent), and its watchdog leaves room for the 10 s keep-alive.
#[test]
fn the_unit_file_verifies_and_sets_a_watchdog() {
    let o = Command::new("sh").arg("deploy/verify.sh").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let unit = std::fs::read_to_string("deploy/vppd.service").unwrap();
    let watchdog = unit
        .lines()
        .find_map(|l| l.strip_prefix("WatchdogSec="))
        .expect("WatchdogSec= in deploy/vppd.service");
    let secs = vppd::runtime::config::parse_duration(&watchdog.replace("min", "m"))
        .expect("WatchdogSec= as a duration")
        .as_secs();
    assert!(
        secs >= 30,
        "WatchdogSec={watchdog} is too tight for 10 s keep-alives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_prints_each_command_once() {
    use tokio::io::AsyncBufReadExt;
    let mut sink = tokio::process::Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args(["sink", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(sink.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), stderr.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    let batch = serde_json::json!({"commands": [
        {"commandUuid": "u-1", "jobId": "j", "eventId": "e", "adamId": "361309726",
         "pricingParam": "STDQ", "serialNumber": "S1", "clientUserId": null},
        {"commandUuid": "u-2", "requestType": "InviteToProgram", "jobId": "j",
         "clientUserId": "client-1", "serialNumber": null, "invitationUrl": "https://example.com/i"}
    ]});
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let r = http
            .post(format!("{url}/vpp-installs"))
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = http.post(&url).body("not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let counts: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        counts,
        serde_json::json!({"commands": 2, "repeats": 2, "posts": 2})
    );
    signal(sink.id().expect("the sink runs"), Signal::Term);
    let out = sink.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "InstallApplication adamId=361309726 pricingParam=STDQ serialNumber=S1 jobId=j commandUuid=u-1",
            "InviteToProgram clientUserId=client-1 invitationUrl=https://example.com/i jobId=j commandUuid=u-2",
        ]
    );
}

#[test]
fn an_unusable_data_dir_fails_check_config_and_run_alike() {
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
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    for data_dir in [file.clone(), file.join("db")] {
        let toml = format!(
            r#"
data_dir = "{data}"
[apple]
base_url = "http://127.0.0.1:9/mdm/v2"
[[tokens]]
name = "main"
stoken_file = "{token}"
[notifications]
listen = "127.0.0.1:0"
public_url = "https://mdm.example.com/vppd/notifications"
auth_token_file = "{secret}"
[admin]
listen = "127.0.0.1:0"
[install]
webhook_url = "http://127.0.0.1:9/installs"
"#,
            data = data_dir.display(),
            token = token.display(),
            secret = dir.path().join("secret").display(),
        );
        let config = dir.path().join("vppd.toml");
        std::fs::write(&config, toml).unwrap();
        for command in ["check-config", "run"] {
            let o = vppd(&[command, "--config", config.to_str().unwrap()]);
            assert!(!o.status.success(), "{command}: {}", text(&o));
            let t = text(&o);
            assert!(
                t.contains(&format!("data_dir {}", data_dir.display()))
                    && t.contains("a-file")
                    && t.contains("file"),
                "{command}: {t}"
            );
        }
    }
}

#[test]
fn a_missing_config_file_is_reported_once() {
    for command in ["check-config", "run"] {
        let o = vppd(&[command, "--config", "/nonexistent/vppd.toml"]);
        assert!(!o.status.success());
        let t = text(&o);
        assert!(t.contains("/nonexistent/vppd.toml"), "{t}");
        assert_eq!(t.matches("(os error 2)").count(), 1, "{command}: {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_fresh_host_run_creates_a_private_data_dir_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await;
    // The stock layout: the generated secret lives in data_dir, which does
    // not exist yet.
    let data = env.dir.path().join("data");
    let toml = env.config_text(&PATIENT_TRACKING, "").replace(
        &env.secret_file().display().to_string(),
        &data.join("notification-auth-token").display().to_string(),
    );
    let config = env.dir.path().join("fresh.toml");
    std::fs::write(&config, &toml).unwrap();
    let o = vppd(&["check-config", "--config", config.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("does not exist yet: vppd run creates it (mode 0700)"),
        "{}",
        text(&o)
    );
    assert!(!data.exists(), "check-config created data_dir");

    let mut child = env
        .vppd_run_after("umask 022 && ", &config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&env.admin()).await;
    let mut seen = 0;
    let mut stack = vec![data.clone()];
    while let Some(dir) = stack.pop() {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 2, "no store files under {}", data.display());
    signal(child.id(), Signal::Term);
    assert!(child.wait().unwrap().success());
}

/// A minimal config in `dir` (token file written there) with `edit` applied
/// to its text; returns the config's path.
fn minimal_config(dir: &std::path::Path, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let token = dir.join("main.vpptoken");
    std::fs::write(
        &token,
        vppd::apple::token::SToken::encode(
            "inner",
            time::OffsetDateTime::now_utc() + time::Duration::days(30),
            "Check School",
        ),
    )
    .unwrap();
    let toml = format!(
        r#"data_dir = "{data}"
[apple]
base_url = "http://127.0.0.1:9/mdm/v2"
[[tokens]]
name = "main"
stoken_file = "{token}"
[notifications]
listen = "127.0.0.1:0"
public_url = "https://mdm.example.com/vppd/notifications"
auth_token_file = "{secret}"
[admin]
listen = "127.0.0.1:0"
[install]
webhook_url = "http://127.0.0.1:9/installs"
"#,
        data = dir.join("data").display(),
        token = token.display(),
        secret = dir.join("secret").display(),
    );
    let config = dir.join("vppd.toml");
    std::fs::write(&config, edit(toml)).unwrap();
    config
}

/// What a case is, how the config is edited, and two texts the refusal names.
type Refusal = (
    &'static str,
    fn(String) -> String,
    &'static str,
    &'static str,
);

#[test]
fn unsafe_settings_are_refused_by_check_config_and_run_alike() {
    let cases: [Refusal; 5] = [
        (
            "one port for both listeners",
            |t| {
                t.replace(
                    "[admin]\nlisten = \"127.0.0.1:0\"",
                    "[admin]\nlisten = \"0.0.0.0:18088\"\nallow_unauthenticated = true",
                )
                .replace(
                    "[notifications]\nlisten = \"127.0.0.1:0\"",
                    "[notifications]\nlisten = \"127.0.0.1:18088\"",
                )
            },
            "admin.listen",
            "notifications.listen",
        ),
        (
            "an open admin API off loopback",
            |t| {
                t.replace(
                    "[admin]\nlisten = \"127.0.0.1:0\"",
                    "[admin]\nlisten = \"0.0.0.0:0\"",
                )
            },
            "admin.listen",
            "admin.token_file",
        ),
        (
            "Apple in plain http",
            |t| t.replace("http://127.0.0.1:9/mdm/v2", "http://vpp.example.net/mdm/v2"),
            "apple.base_url",
            "https://",
        ),
        (
            "a webhook credential in plain http",
            |t| {
                t.replace(
                    "http://127.0.0.1:9/installs",
                    "http://mdm.internal/installs",
                ) + "auth_header = \"Bearer hunter2\"\n"
            },
            "install.auth_header",
            "http://mdm.internal/installs",
        ),
        (
            "credentials in public_url",
            |t| t.replace("https://mdm.example", "https://vppd:hunter2@mdm.example"),
            "notifications.public_url",
            "credentials",
        ),
    ];
    for (what, edit, key, also) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = minimal_config(dir.path(), edit);
        for command in ["check-config", "run"] {
            let o = vppd(&[command, "--config", config.to_str().unwrap()]);
            let t = text(&o);
            assert!(!o.status.success(), "{what}: {command}: {t}");
            assert!(
                t.contains(key) && t.contains(also),
                "{what}: {command}: {t}"
            );
            assert!(!t.contains("hunter2"), "{what}: {command}: {t}");
        }
        assert!(
            !dir.path().join("data").exists(),
            "{what}: run left a store"
        );
    }
}

#[test]
fn secret_files_others_can_read_are_named_with_their_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let url_file = dir.path().join("postgres-url");
    std::fs::write(&url_file, "postgres://vppd:hunter2@db.internal/vppd\n").unwrap();
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A file where data_dir should be: no matter with PostgreSQL, which
    // keeps no store there.
    std::fs::write(dir.path().join("data"), "x").unwrap();
    let config = minimal_config(dir.path(), |t| {
        format!(
            "{t}[store]\nkind = \"postgres\"\nurl_file = \"{}\"\n",
            url_file.display()
        )
    });
    let token = dir.path().join("main.vpptoken");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = vppd(&["check-config", "--config", config.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(!t.contains("hunter2"), "{t}");
    let warning = |name: &std::path::Path| {
        t.lines()
            .find(|l| l.contains("warning:") && l.contains(&*name.to_string_lossy()))
            .unwrap_or_else(|| panic!("no warning for {}: {t}", name.display()))
            .to_string()
    };
    let w = warning(&url_file);
    assert!(
        w.contains("store.url_file") && w.contains("0644") && w.contains("others"),
        "{w}"
    );
    let w = warning(&token);
    assert!(w.contains("0640") && w.contains("its group"), "{w}");
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = vppd(&["check-config", "--config", config.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("readable by"), "{}", text(&o));
}
