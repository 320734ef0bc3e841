//! "Durable means on the disk", checked under strace (installed by
//! `scripts/with-postgres.sh`; with `CI=true` a missing strace fails the
//! test): every `202` for a job and every `200` for one of Apple's
//! notifications leaves vppd only after an fdatasync of the sled log that
//! started after the request was read.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use vppd::domain::job::JobState;
use vppd::sim::SimAsset;

fn strace() -> Option<&'static str> {
    let found = Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("strace");
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "strace is not installed; CI runs the tests under scripts/with-postgres.sh, which installs it"
        );
    }
    eprintln!("skipped: strace is not installed (scripts/with-postgres.sh installs it)");
    None
}

/// The descriptors of `pid` open on the sled log (`data/db/db`).
fn log_fds(pid: u32) -> Vec<String> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        if let Ok(target) = std::fs::read_link(entry.path())
            && target.ends_with("data/db/db")
        {
            fds.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    fds
}

/// One line of `strace -f` output: the thread, and the call's text.
fn split(line: &str) -> Option<(&str, &str)> {
    let (tid, rest) = line.split_once(' ')?;
    Some((tid, rest.trim_start()))
}

/// The descriptor a read or write call names: `read(23, ...` -> "23".
fn fd_of(call: &str) -> Option<&str> {
    let open = call.find('(')?;
    let close = call[open..].find(',')?;
    Some(&call[open + 1..open + close])
}

/// Checks the trace: for each request read whose text starts with one of
/// `requests` (a prefix and the status line its answer must begin with),
/// the answer written on the same descriptor follows a completed fdatasync
/// of a log descriptor that began after the read. How many were checked.
fn check(trace: &str, log: &[String], requests: &[(&str, &str)]) -> HashMap<String, usize> {
    // Per descriptor: the request read last and the line it was read at.
    let mut open: HashMap<String, (usize, &str, &str)> = HashMap::new();
    // Sync calls: line started, by thread; and (start, end) completed.
    let mut started: HashMap<String, usize> = HashMap::new();
    let mut synced: Vec<(usize, usize)> = Vec::new();
    let mut checked: HashMap<String, usize> = HashMap::new();
    for (n, line) in trace.lines().enumerate() {
        let Some((tid, call)) = split(line) else {
            continue;
        };
        if let Some(rest) = call.strip_prefix("fdatasync(") {
            let fd = rest.split([')', ' ']).next().unwrap_or("");
            if log.iter().any(|l| l == fd) {
                if rest.contains("<unfinished") {
                    started.insert(tid.to_string(), n);
                } else if rest.ends_with("= 0") {
                    synced.push((n, n));
                }
            }
            continue;
        }
        if call.starts_with("<... fdatasync resumed>") {
            if let Some(s) = started.remove(tid)
                && call.ends_with("= 0")
            {
                synced.push((s, n));
            }
            continue;
        }
        let is_read = ["read(", "recvfrom(", "recvmsg("]
            .iter()
            .any(|p| call.starts_with(p));
        let is_write = ["write(", "writev(", "sendto(", "sendmsg("]
            .iter()
            .any(|p| call.starts_with(p));
        let Some(fd) = fd_of(call) else { continue };
        if is_read {
            for (prefix, status) in requests {
                if call.contains(&format!("\"{prefix}")) {
                    open.insert(fd.to_string(), (n, prefix, status));
                }
            }
        } else if is_write
            && let Some((read_at, prefix, status)) = open.get(fd).copied()
            && call.contains(&format!("\"{status}"))
        {
            open.remove(fd);
            assert!(
                synced.iter().any(|(s, e)| *s > read_at && *e < n),
                "`{status}` to `{prefix}` (trace line {}) was written with no fdatasync of the store's log after the request was read (line {})",
                n + 1,
                read_at + 1
            );
            *checked.entry(prefix.to_string()).or_default() += 1;
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_202_and_every_notification_200_follows_a_sync_of_the_store() {
    let Some(strace) = strace() else { return };
    let assets: Vec<String> = (0..2).map(adam).collect();
    let env = Env::new(
        sim_config(small_limits()),
        assets
            .iter()
            .map(|a| SimAsset::app(a, Some(1000)))
            .collect(),
    )
    .await;
    let config = env.dir.path().join("vppd.toml");
    std::fs::write(&config, env.config_text(&FAST_TRACKING, "")).unwrap();
    let mut child = env
        .vppd_run(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(&env.admin()).await;
    let pid = child.id();
    let log = log_fds(pid);
    assert!(!log.is_empty(), "no descriptor on the sled log");

    let trace_file = env.dir.path().join("trace");
    let mut tracer = Command::new(strace)
        .args(["-f", "-qq", "-s", "48", "-o"])
        .arg(&trace_file)
        .args([
            "-e",
            "trace=fdatasync,read,recvfrom,recvmsg,write,writev,sendto,sendmsg",
            "-p",
        ])
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Attached once the trace shows the daemon at work (its own syncs).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&trace_file).map_or(0, |m| m.len()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "strace did not attach"
        );
        let _ = reqwest::get(format!("{}/healthz", env.admin())).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for id in ["d1", "d2"] {
        let (code, body) = post_job(&env.admin(), &job(id, &assets, &[], &serials(id, 20))).await;
        assert_eq!(code, 202, "{body}");
    }
    for id in ["d1", "d2"] {
        let s = wait_job(&env.admin(), id, Duration::from_secs(60)).await;
        assert_eq!(s.state, JobState::Completed, "{s:?}");
    }
    signal(tracer.id(), Signal::Int);
    let _ = tracer.wait();
    signal(child.id(), Signal::Term);
    assert!(child.wait().unwrap().success());

    let trace = std::fs::read_to_string(&trace_file).unwrap();
    let checked = check(
        &trace,
        &log,
        &[
            ("POST /v1/jobs", "HTTP/1.1 202"),
            ("POST /notifications", "HTTP/1.1 200"),
        ],
    );
    assert_eq!(checked.get("POST /v1/jobs"), Some(&2), "{checked:?}");
    assert!(
        checked.get("POST /notifications").is_some_and(|n| *n >= 2),
        "{checked:?}"
    );
}
