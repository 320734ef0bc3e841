//! What vppd itself costs per assignment, measured as production would see
//! it: the daemon (`vppd run`), Apple's stand-in (`vppd sim`) and a stand-in
//! MDM (this process) are three separate processes on loopback. One job of N
//! devices x 25 apps runs to `completed`; then the daemon's own CPU time and
//! peak RSS are read from /proc and the store's size from disk.
//!
//! ```sh
//! cargo bench --bench cost                      # 10,000 devices
//! VPPD_BENCH_DEVICES=10000,100000,1000000 cargo bench --bench cost
//! VPPD_BENCH_INGEST=20000 cargo bench --bench cost   # notification ingest
//! VPPD_BENCH_BACKLOG=100000 cargo bench --bench cost  # a foreign backlog
//! VPPD_PG_FSYNC=on scripts/with-postgres.sh env VPPD_BENCH_STORES=sled,postgres \
//!     cargo bench --bench cost                  # both stores, side by side
//! ```
//!
//! Before and after a change, side by side: keep a copy of the earlier
//! `target/release/vppd` and run it with `VPPD_BENCH_DAEMON=/path/to/it`
//! (the simulator and the MDM stay this build's). A profile of the daemon:
//! `VPPD_BENCH_WRAP="perf record -F 199 --call-graph dwarf,16384 -o vppd.perf --"`
//! (the CPU and RSS printed are then the profiler's, not the daemon's).
//!
//! `VPPD_BENCH_STORES` lists the stores to run each measurement on (default
//! `sled`); `postgres` needs `VPPD_TEST_POSTGRES_URL` (as
//! `scripts/with-postgres.sh` exports it) and gets a fresh schema per run,
//! whose tables and indexes are the store size.
//!
//! Ingest mode starts only the daemon and posts 100-item notifications from
//! this process (the load generator) with 32 concurrent senders; it reports
//! notifications/s and the acknowledgement latency percentiles.
//!
//! Backlog mode runs a job of `VPPD_BENCH_DEVICES` (default 1,000) devices
//! x 5 apps, then posts N notifications for events vppd never submitted
//! (licenses assigned in Apple School/Business Manager: 100 items each,
//! each its own eventId), then runs the same job again on other devices
//! right behind that backlog: ingest rate and latency, both jobs' wall
//! time, and how long SIGTERM takes to exit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::body::Bytes;

mod common;
use common::{
    BoxError, Proc, Sink, cpu_seconds, cpu_split, free_port, proc_status_mb, start_sink, stop,
    wait_ready,
};

const APPS: usize = 25;
const VPPD: &str = env!("CARGO_BIN_EXE_vppd");

fn start_sim(dir: &Path, devices: usize) -> Result<(Proc, String), BoxError> {
    let token = dir.join("sim.vpptoken");
    let stoken = vppd::apple::token::SToken::encode(
        &format!("bench-{}", uuid::Uuid::new_v4().simple()),
        time::OffsetDateTime::now_utc() + time::Duration::days(300),
        "Bench District",
    );
    std::fs::write(&token, stoken)?;
    let mut child = Command::new(VPPD)
        .args([
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--max-request-per-second",
            "0",
        ])
        .args([
            "--apps",
            &APPS.to_string(),
            "--licenses",
            &devices.to_string(),
        ])
        .arg("--token-file")
        .arg(&token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("sim stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http"))
        .ok_or_else(|| format!("unexpected first line from vppd sim: {line:?}"))?
        .to_string();
    Ok((Proc(child), url))
}

/// Where the daemon under measurement keeps its store.
#[derive(Clone)]
enum Backend {
    Sled,
    /// A fresh schema on the server `VPPD_TEST_POSTGRES_URL` names.
    Postgres {
        url: String,
        schema: String,
    },
}

impl Backend {
    async fn new(kind: &str, run: &str) -> Result<Backend, BoxError> {
        match kind {
            "sled" => Ok(Backend::Sled),
            "postgres" => {
                let base = std::env::var("VPPD_TEST_POSTGRES_URL").map_err(
                    |_| "VPPD_BENCH_STORES names postgres: run under scripts/with-postgres.sh",
                )?;
                let schema = format!("bench_{run}_{}", std::process::id());
                let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await?;
                let task = tokio::spawn(conn);
                client
                    .batch_execute(&format!("CREATE SCHEMA {schema}"))
                    .await?;
                drop(client);
                let _ = task.await;
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
                Ok(Backend::Postgres { url, schema })
            }
            other => {
                Err(format!("VPPD_BENCH_STORES: unknown store `{other}` (sled, postgres)").into())
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Postgres { .. } => "postgres",
        }
    }

    /// The `[store]` lines of the daemon's config.
    fn config(&self, dir: &Path) -> Result<String, BoxError> {
        match self {
            Backend::Sled => Ok(String::new()),
            Backend::Postgres { url, .. } => {
                let file = dir.join("postgres-url");
                std::fs::write(&file, url)?;
                Ok(format!(
                    "[store]\nkind = \"postgres\"\nurl_file = \"{}\"",
                    file.display()
                ))
            }
        }
    }

    /// Bytes the store takes: the data directory, or the schema's tables
    /// with their indexes and TOAST.
    async fn bytes(&self, data_dir: &Path) -> Result<u64, BoxError> {
        match self {
            Backend::Sled => Ok(vppd::store::files::dir_bytes(data_dir)),
            Backend::Postgres { url, schema } => {
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
                let task = tokio::spawn(conn);
                let row = client
                    .query_one(
                        "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::bigint \
                         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE n.nspname = $1 AND c.relkind = 'r'",
                        &[schema],
                    )
                    .await?;
                drop(client);
                let _ = task.await;
                Ok(row.get::<_, i64>(0).max(0) as u64)
            }
        }
    }
}

struct Daemon {
    proc: Proc,
    admin: String,
    notifications: String,
    secret_file: PathBuf,
    data_dir: PathBuf,
}

fn start_daemon(
    dir: &Path,
    apple: &str,
    sink: SocketAddr,
    backend: &Backend,
) -> Result<Daemon, BoxError> {
    let store = backend.config(dir)?;
    let admin_port = free_port()?;
    let notif_port = free_port()?;
    let data_dir = dir.join("data");
    let secret_file = dir.join("notification-secret");
    // With PostgreSQL the secret lives in the store, seeded from this file
    // when it exists; with sled vppd would generate it here.
    std::fs::write(
        &secret_file,
        format!("bench-{:032x}\n", rand::random::<u128>()),
    )?;
    let config = format!(
        r#"
data_dir = "{data}"
{store}
[apple]
base_url = "{apple}"
requests_per_second = 100
timeout = "30s"
[[tokens]]
name = "main"
stoken_file = "{token}"
[notifications]
listen = "127.0.0.1:{notif_port}"
public_url = "http://127.0.0.1:{notif_port}/notifications"
auth_token_file = "{secret}"
[tracking]
status_poll_after = "20s"
status_poll_interval = "5s"
sync_after = "40s"
[admin]
listen = "127.0.0.1:{admin_port}"
max_job_targets = 2000000
[install]
webhook_url = "http://{sink}/installs"
batch_size = 1000
"#,
        data = data_dir.display(),
        token = dir.join("sim.vpptoken").display(),
        secret = secret_file.display(),
    );
    let path = dir.join("vppd.toml");
    std::fs::write(&path, config)?;
    let log = std::fs::File::create(dir.join("vppd.log"))?;
    // VPPD_BENCH_WRAP runs the daemon under a profiler, e.g.
    // `perf record -F 499 -g -o /tmp/vppd.perf --`.
    let wrap = std::env::var("VPPD_BENCH_WRAP").unwrap_or_default();
    // VPPD_BENCH_DAEMON runs another build of the daemon (a copy of an
    // earlier target/release/vppd) against the same simulator and MDM:
    // before and after, side by side.
    let daemon = std::env::var("VPPD_BENCH_DAEMON").unwrap_or_else(|_| VPPD.to_string());
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(&daemon);
            c
        }
        None => Command::new(&daemon),
    };
    let child = command
        .args(["run", "--config"])
        // As deploy/vppd.service runs it.
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(Daemon {
        proc: Proc(child),
        admin: format!("http://127.0.0.1:{admin_port}"),
        notifications: format!("http://127.0.0.1:{notif_port}/notifications"),
        secret_file,
        data_dir,
    })
}

async fn job_state(
    http: &reqwest::Client,
    admin: &str,
    id: &str,
) -> Result<serde_json::Value, BoxError> {
    Ok(http
        .get(format!("{admin}/v1/jobs/{id}"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn run_job(devices: usize, backend: &Backend) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let (_sim, apple) = start_sim(dir.path(), devices)?;
    let sink = Arc::new(Sink::default());
    let sink_addr = start_sink(sink.clone()).await?;
    let daemon = start_daemon(dir.path(), &apple, sink_addr, backend)?;
    wait_ready(&http, &daemon.admin).await?;
    let pid = daemon.proc.0.id();
    let cpu_idle = cpu_seconds(pid)?;
    let (user_idle, system_idle) = cpu_split(pid)?;
    let written_idle = written_bytes(pid)?;

    let assets: Vec<_> = (0..APPS)
        .map(|i| serde_json::json!({"adamId": (100_000_001 + i).to_string(), "pricingParam": "STDQ"}))
        .collect();
    let serials: Vec<String> = (0..devices).map(|i| format!("BENCH{i:08}")).collect();
    let job = serde_json::json!({
        "id": "cost", "token": "main", "assets": assets,
        "associate": {"serialNumbers": serials}, "install": true,
    });
    let started = Instant::now();
    let r = http
        .post(format!("{}/v1/jobs", daemon.admin))
        .json(&job)
        .send()
        .await?;
    if !r.status().is_success() {
        return Err(format!("job refused: {} {}", r.status(), r.text().await?).into());
    }
    let pairs = (devices * APPS) as f64;
    let mut store_peak = 0;
    let mut sampled = Instant::now();
    let status = loop {
        let s = job_state(&http, &daemon.admin, "cost").await?;
        if sampled.elapsed() > Duration::from_secs(1) {
            store_peak = store_peak.max(backend.bytes(&daemon.data_dir).await?);
            sampled = Instant::now();
        }
        match s["state"].as_str() {
            Some("completed") => break s,
            Some("failed") | Some("canceled") => return Err(format!("job ended: {s}").into()),
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err("job not done in 30 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu_idle;
    let (user, sys) = cpu_split(pid)?;
    let (user, sys) = (user - user_idle, sys - system_idle);
    let written = written_bytes(pid)? - written_idle;
    let rss = proc_status_mb(pid, "VmHWM")?;
    let store_end = backend.bytes(&daemon.data_dir).await?;
    let store_peak = store_peak.max(store_end);
    let received = sink.received.load(Ordering::Relaxed);
    let unique = sink.uuids.lock().unwrap_or_else(|p| p.into_inner()).len();
    let requests = apple_requests(&http, &daemon.admin).await?;
    println!(
        "cost {devices} x {APPS} ({pairs} pairs, store {kind}): wall {wall:.2} s; daemon CPU {cpu:.2} s = {cpu_m:.2} s per million pairs (user {user:.2} s, system {sys:.2} s); written to disk {written_mb:.0} MB ({wpp:.0} B/pair); daemon peak RSS {rss:.0} MB; store {store_mb:.1} MB at the end ({bpp:.1} B/pair), {peak_mb:.1} MB at most while running; confirmed {confirmed}, installs released {released}, MDM received {received} ({unique} unique, {dups} repeats); requests to Apple by then: {requests}",
        kind = backend.name(),
        cpu_m = cpu / pairs * 1e6,
        store_mb = store_end as f64 / 1e6,
        bpp = store_end as f64 / pairs,
        written_mb = written as f64 / 1e6,
        wpp = written as f64 / pairs,
        peak_mb = store_peak as f64 / 1e6,
        confirmed = status["assignments"]["confirmed"],
        released = status["installs"]["released"],
        dups = sink.duplicates.load(Ordering::Relaxed),
    );
    if unique != devices * APPS {
        return Err(format!(
            "the MDM got {unique} distinct commands, expected {}",
            devices * APPS
        )
        .into());
    }
    stop(daemon.proc)?;
    Ok(())
}

/// The daemon's requests to Apple so far, by endpoint, from its metrics:
/// the job's own and what else shared the token's rate (the drift
/// follower's reads of Get Assignments, say).
async fn apple_requests(http: &reqwest::Client, admin: &str) -> Result<String, BoxError> {
    let text = http
        .get(format!("{admin}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let mut by_endpoint = std::collections::BTreeMap::<String, f64>::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("vppd_apple_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let endpoint = labels
            .split(',')
            .find_map(|l| l.strip_prefix("endpoint=\""))
            .map(|e| e.trim_end_matches('"').to_string())
            .unwrap_or_default();
        *by_endpoint.entry(endpoint).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(by_endpoint
        .iter()
        .map(|(e, n)| format!("{e} {n}"))
        .collect::<Vec<_>>()
        .join(", "))
}

/// Bytes a process has caused to be written to storage (`write_bytes` of
/// /proc/PID/io).
fn written_bytes(pid: u32) -> Result<u64, BoxError> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    Ok(io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .ok_or_else(|| format!("no write_bytes in /proc/{pid}/io"))?
        .trim()
        .parse()?)
}

fn notification(i: usize) -> Vec<u8> {
    let assignments: Vec<_> = (0..100)
        .map(|k| serde_json::json!({"adamId": "100000001", "pricingParam": "STDQ", "serialNumber": format!("S{:08}", i * 100 + k)}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "notificationId": format!("bench-{i}"),
        "notificationType": "ASSET_MANAGEMENT",
        "uId": "2049025000431439",
        "notification": {"eventId": "bench-event", "type": "ASSOCIATE", "result": "SUCCESS", "assignments": assignments}
    }))
    .unwrap_or_default()
}

/// Posts `bodies` to the notification listener from [`SENDERS`] concurrent
/// senders; the wall time and each acknowledgement's latency.
async fn post_notifications(
    http: &reqwest::Client,
    daemon: &Daemon,
    bodies: Vec<Bytes>,
) -> Result<(f64, Vec<Duration>), BoxError> {
    let secret = std::fs::read_to_string(&daemon.secret_file)?
        .trim()
        .to_string();
    let bodies = Arc::new(bodies);
    let per_sender = bodies.len() / SENDERS;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let (url, secret, bodies, http) = (
            daemon.notifications.clone(),
            secret.clone(),
            bodies.clone(),
            http.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_sender);
            for i in 0..per_sender {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&secret)
                    .header("content-type", "application/json")
                    .body(bodies[s * per_sender + i].clone())
                    .send()
                    .await?;
                if !r.status().is_success() {
                    return Err::<Vec<Duration>, BoxError>(
                        format!("notification refused: {}", r.status()).into(),
                    );
                }
                latencies.push(t.elapsed());
            }
            Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    latencies.sort();
    Ok((started.elapsed().as_secs_f64(), latencies))
}

/// The latency at quantile `q` of sorted `latencies`, in ms.
fn percentile(latencies: &[Duration], q: f64) -> f64 {
    latencies
        .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

const SENDERS: usize = 32;

async fn run_ingest(total: usize, backend: &Backend) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let (_sim, apple) = start_sim(dir.path(), 10)?;
    let sink = Arc::new(Sink::default());
    let sink_addr = start_sink(sink).await?;
    let daemon = start_daemon(dir.path(), &apple, sink_addr, backend)?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    wait_ready(&http, &daemon.admin).await?;
    let bodies = (0..total).map(|i| Bytes::from(notification(i))).collect();
    let (wall, latencies) = post_notifications(&http, &daemon, bodies).await?;
    println!(
        "ingest ({kind}): {n} notifications of 100 items from {SENDERS} senders in another process: {rate:.0}/s; ack p50 {p50:.1} ms, p99 {p99:.1} ms; daemon peak RSS {rss:.0} MB",
        kind = backend.name(),
        n = latencies.len(),
        rate = latencies.len() as f64 / wall,
        p50 = percentile(&latencies, 0.5),
        p99 = percentile(&latencies, 0.99),
        rss = proc_status_mb(daemon.proc.0.id(), "VmHWM")?,
    );
    stop(daemon.proc)?;
    Ok(())
}

/// A notification about an event vppd never submitted: its own eventId,
/// 100 devices of an app outside the benchmark's jobs.
fn foreign_notification(i: usize) -> Vec<u8> {
    let assignments: Vec<_> = (0..100)
        .map(|k| serde_json::json!({"adamId": "999999999", "pricingParam": "STDQ", "serialNumber": format!("F{:08}", i * 100 + k)}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "notificationId": format!("foreign-{i}"),
        "notificationType": "ASSET_MANAGEMENT",
        "uId": "2049025000431439",
        "notification": {"eventId": format!("foreign-event-{i}"), "type": "ASSOCIATE", "result": "SUCCESS", "assignments": assignments}
    }))
    .unwrap_or_default()
}

/// Submits a job of `serials` x [`BACKLOG_APPS`] apps and waits for it to
/// complete; its wall time in seconds.
async fn job_wall(
    http: &reqwest::Client,
    admin: &str,
    id: &str,
    serials: &[String],
) -> Result<f64, BoxError> {
    let assets: Vec<_> = (0..BACKLOG_APPS)
        .map(|i| serde_json::json!({"adamId": (100_000_001 + i).to_string(), "pricingParam": "STDQ"}))
        .collect();
    let job = serde_json::json!({
        "id": id, "token": "main", "assets": assets,
        "associate": {"serialNumbers": serials}, "install": true,
    });
    let started = Instant::now();
    let r = http
        .post(format!("{admin}/v1/jobs"))
        .json(&job)
        .send()
        .await?;
    if !r.status().is_success() {
        return Err(format!("job refused: {} {}", r.status(), r.text().await?).into());
    }
    loop {
        let s = job_state(http, admin, id).await?;
        match s["state"].as_str() {
            Some("completed") => return Ok(started.elapsed().as_secs_f64()),
            Some("failed") | Some("canceled") => return Err(format!("job ended: {s}").into()),
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("job {id} not done in 10 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const BACKLOG_APPS: usize = 5;

async fn run_backlog(total: usize, devices: usize, backend: &Backend) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let (_sim, apple) = start_sim(dir.path(), devices * 2)?;
    let sink = Arc::new(Sink::default());
    let sink_addr = start_sink(sink).await?;
    let daemon = start_daemon(dir.path(), &apple, sink_addr, backend)?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    wait_ready(&http, &daemon.admin).await?;
    let serials = |from: usize| -> Vec<String> {
        (from..from + devices)
            .map(|i| format!("BENCH{i:08}"))
            .collect()
    };
    let before = job_wall(&http, &daemon.admin, "before", &serials(0)).await?;
    let bodies = (0..total)
        .map(|i| Bytes::from(foreign_notification(i)))
        .collect();
    let (wall, latencies) = post_notifications(&http, &daemon, bodies).await?;
    let behind = job_wall(&http, &daemon.admin, "behind", &serials(devices)).await?;
    let pid = daemon.proc.0.id();
    let rss = proc_status_mb(pid, "VmHWM")?;
    let stopping = Instant::now();
    stop(daemon.proc)?;
    let stop_s = stopping.elapsed().as_secs_f64();
    println!(
        "backlog ({kind}): {n} foreign notifications of 100 items: {rate:.0}/s, ack p50 {p50:.1} ms, p99 {p99:.1} ms; job {devices} x {BACKLOG_APPS}: {before:.2} s before the backlog, {behind:.2} s right behind it; SIGTERM to exit {stop_s:.2} s; daemon peak RSS {rss:.0} MB",
        kind = backend.name(),
        n = latencies.len(),
        rate = latencies.len() as f64 / wall,
        p50 = percentile(&latencies, 0.5),
        p99 = percentile(&latencies, 0.99),
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let stores = std::env::var("VPPD_BENCH_STORES").unwrap_or_else(|_| "sled".into());
    let stores: Vec<&str> = stores.split(',').map(str::trim).collect();
    if let Ok(n) = std::env::var("VPPD_BENCH_INGEST") {
        for (i, kind) in stores.iter().enumerate() {
            run_ingest(
                n.parse()?,
                &Backend::new(kind, &format!("ingest{i}")).await?,
            )
            .await?;
        }
        return Ok(());
    }
    if let Ok(n) = std::env::var("VPPD_BENCH_BACKLOG") {
        let devices = std::env::var("VPPD_BENCH_DEVICES").unwrap_or_else(|_| "1000".into());
        for (i, kind) in stores.iter().enumerate() {
            let backend = Backend::new(kind, &format!("backlog{i}")).await?;
            run_backlog(n.parse()?, devices.trim().parse()?, &backend).await?;
        }
        return Ok(());
    }
    let sizes = std::env::var("VPPD_BENCH_DEVICES").unwrap_or_else(|_| "10000".into());
    for (r, n) in sizes.split(',').enumerate() {
        for (i, kind) in stores.iter().enumerate() {
            let backend = Backend::new(kind, &format!("job{r}_{i}")).await?;
            run_job(n.trim().parse()?, &backend).await?;
        }
    }
    Ok(())
}
