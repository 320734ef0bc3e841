//! What the two listeners let a client hold: idle, slow-head and slow-body
//! connections are closed, connections are bounded per listener (and the
//! next one is served once a slot frees), and running out of file
//! descriptors backs off instead of flooding the log.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vppd::daemon::Daemon;
use vppd::sim::SimAsset;

/// Far longer than any timeout configured below: reaching it means the
/// server never closed the connection.
const NEVER: Duration = Duration::from_secs(30);

async fn env() -> Env {
    Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(10))],
    )
    .await
}

/// The daemon with extra keys in `[admin]` and `[notifications]`.
async fn daemon(env: &Env, admin: &str, notifications: &str) -> Daemon {
    let text = env.config_text(&PATIENT_TRACKING, admin).replace(
        "[notifications]\n",
        &format!("[notifications]\n{notifications}\n"),
    );
    let path = env.dir.path().join("vppd.toml");
    std::fs::write(&path, &text).unwrap();
    let config = vppd::runtime::config::Config::parse(&text, &path).unwrap();
    let daemon = env.start_daemon_on(config).await;
    wait_ready(&env.admin()).await;
    daemon
}

/// Reads until the server closes the connection; what it sent before.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(NEVER, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(
        closed.is_ok(),
        "connection still open after {NEVER:?}: {text}"
    );
    text
}

/// Whether the server closed the connection within `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: vppd\r\n\r\n";

/// Sends one keep-alive request and reads its whole (small) answer.
async fn healthz_on(stream: &mut TcpStream) -> String {
    stream.write_all(HEALTHZ).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.ends_with("ok\n") {
        let n = tokio::time::timeout(NEVER, stream.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed before answering: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_to_both_listeners_are_closed() {
    let env = env().await;
    let daemon = daemon(
        &env,
        "idle_timeout = \"300ms\"\nheader_read_timeout = \"60s\"",
        "idle_timeout = \"300ms\"\nheader_read_timeout = \"60s\"",
    )
    .await;
    // Never sends a byte.
    let mut admin = TcpStream::connect(("127.0.0.1", env.admin_port))
        .await
        .unwrap();
    let mut notifications = TcpStream::connect(("127.0.0.1", env.notif_port))
        .await
        .unwrap();
    assert_eq!(until_closed(&mut admin).await, "");
    assert_eq!(until_closed(&mut notifications).await, "");
    // Kept alive after a request, then quiet.
    let mut kept = TcpStream::connect(("127.0.0.1", env.admin_port))
        .await
        .unwrap();
    assert!(healthz_on(&mut kept).await.starts_with("HTTP/1.1 200"));
    assert_eq!(until_closed(&mut kept).await, "");
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_head_sent_byte_by_byte_is_cut_off() {
    let env = env().await;
    let daemon = daemon(
        &env,
        "idle_timeout = \"60s\"\nheader_read_timeout = \"500ms\"",
        "idle_timeout = \"60s\"\nheader_read_timeout = \"500ms\"",
    )
    .await;
    for port in [env.admin_port, env.notif_port] {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        // Each header line comes well within the idle timeout of the last,
        // so only a deadline on the whole head ends this.
        let started = Instant::now();
        let mut closed = false;
        while started.elapsed() < NEVER {
            if stream.write_all(b"X-Slow: 1\r\n").await.is_err()
                || closed_within(&mut stream, Duration::from_millis(100)).await
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "port {port}: a trickled head kept its connection");
    }
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_sent_byte_by_byte_gets_408_and_the_connection_closes() {
    let env = env().await;
    let daemon = daemon(
        &env,
        "body_read_timeout = \"500ms\"",
        "body_read_timeout = \"500ms\"",
    )
    .await;
    let secret = env.secret();
    for (port, head) in [
        (
            env.admin_port,
            "POST /v1/jobs HTTP/1.1\r\nHost: vppd\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n".to_string(),
        ),
        (
            env.notif_port,
            format!("POST /notifications HTTP/1.1\r\nHost: vppd\r\nAuthorization: Bearer {secret}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"),
        ),
    ] {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let trickle = tokio::spawn(async move {
            for _ in 0..300 {
                if write.write_all(b" ").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = tokio::time::timeout(NEVER, async {
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        trickle.abort();
        let answer = String::from_utf8_lossy(&seen);
        assert!(closed.is_ok(), "port {port}: still open: {answer}");
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "port {port}: {answer}"
        );
    }
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_connection_bound_healthz_waits_for_a_free_slot() {
    let env = env().await;
    let daemon = daemon(&env, "max_connections = 2\nidle_timeout = \"60s\"", "").await;
    // Two connections that are surely accepted: each got an answer.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", env.admin_port))
            .await
            .unwrap();
        assert!(healthz_on(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let admin = env.admin();
    let probe = tokio::spawn(async move {
        reqwest::Client::new()
            .get(format!("{admin}/healthz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !probe.is_finished(),
        "a third connection was served past max_connections = 2"
    );
    drop(held.pop());
    let status = tokio::time::timeout(NEVER, probe)
        .await
        .expect("healthz not answered once a slot was free")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_holding_every_slot_time_out_and_healthz_answers() {
    let env = env().await;
    let daemon = daemon(&env, "max_connections = 3\nidle_timeout = \"1s\"", "").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", env.admin_port))
            .await
            .unwrap();
        healthz_on(&mut s).await;
        held.push(s);
    }
    let r = tokio::time::timeout(NEVER, reqwest::get(format!("{}/healthz", env.admin())))
        .await
        .expect("healthz never answered")
        .unwrap();
    assert_eq!(r.status(), 200);
    daemon.shutdown().await;
}

/// Descriptors the process `pid` holds now.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_descriptors_the_listener_backs_off_quietly_and_recovers() {
    let env = env().await;
    let path = env.dir.path().join("vppd.toml");
    std::fs::write(&path, env.config_text(&PATIENT_TRACKING, "")).unwrap();
    let log_path = env.dir.path().join("vppd.log");
    const LIMIT: usize = 128;
    // The limit is set in the shell that then becomes vppd: it is the
    // daemon's alone, not this test process's.
    let mut child = env
        .vppd_run_after(&format!("ulimit -n {LIMIT} && "), &path)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    wait_ready(&env.admin()).await;
    let pid = child.id();
    // Every descriptor left, and some more: the extra ones stay in the
    // backlog while accept fails with EMFILE.
    let mut flood = Vec::new();
    for _ in 0..(LIMIT - open_fds(pid) + 20) {
        flood.push(
            TcpStream::connect(("127.0.0.1", env.admin_port))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(flood);
    let r = tokio::time::timeout(NEVER, reqwest::get(format!("{}/healthz", env.admin())))
        .await
        .expect("healthz never answered after the flood")
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = common::signal::send(pid, Signal::Term);
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let emfile = log
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .count();
    assert!(emfile >= 1, "the flood never hit the limit:\n{log}");
    // Three seconds out of descriptors: a line or two, not one per retry.
    assert!(emfile <= 3, "{emfile} lines about EMFILE:\n{log}");
}
