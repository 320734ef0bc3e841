//! Many tenants, measured as production would see them: the daemon (`vppd
//! run`, one process per replica), Apple's stand-in (`vppd sim`, one
//! organization per token) and a stand-in MDM (this process) are separate
//! processes on loopback. N tokens (default 1,000) are added through the
//! token API while vppd runs, one 200-device x 5-app job each is posted at
//! once, and every job must complete with every install received exactly
//! once. Then the same work (N such jobs) on one token, for comparison.
//!
//! Prints, for each run: wall time, the spread of job completion times
//! across tokens, and per daemon process: how many tokens it worked (its
//! `token/NAME` leases), CPU seconds, RSS with the tokens ready and idle,
//! and peak RSS (VmHWM), all read from /proc, so the figures are the
//! daemon's alone (not the simulator's nor the MDM's).
//!
//! ```sh
//! cargo bench --bench tenants                         # 1,000 tokens, sled
//! VPPD_BENCH_TOKENS=300 VPPD_BENCH_SKIP_SINGLE=1 cargo bench --bench tenants
//! # 3 replicas sharing 300 tokens on PostgreSQL:
//! scripts/with-postgres.sh env VPPD_BENCH_REPLICAS=3 VPPD_BENCH_TOKENS=300 \
//!     VPPD_BENCH_SKIP_SINGLE=1 cargo bench --bench tenants
//! ```
//!
//! `VPPD_BENCH_TOKENS` sets N; `VPPD_BENCH_SKIP_SINGLE=1` skips the
//! one-token run. `VPPD_BENCH_REPLICAS=R` (R > 1) runs R `vppd run`
//! processes on one PostgreSQL schema (`VPPD_TEST_POSTGRES_URL`, as
//! `scripts/with-postgres.sh` exports it), with one `public_url` for all,
//! served by a TCP balancer in this process (as HAProxy would), tokens put
//! and jobs posted round robin over the replicas. `VPPD_BENCH_STORE=postgres`
//! puts a single daemon on PostgreSQL too. The daemons' logs (RUST_LOG
//! info) and configs stay in the directory printed at the start when a run
//! fails, or always with `VPPD_BENCH_KEEP=1`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;
use common::{
    BoxError, Proc, Sink, cpu_seconds, free_port, proc_status_mb, start_sink, stop, wait_ready,
};

const DEVICES: usize = 200;
const APPS: usize = 5;
const VPPD: &str = env!("CARGO_BIN_EXE_vppd");

/// One public notification URL for every replica: each connection goes to
/// the next replica's listener (round robin), as a load balancer would.
async fn start_balancer(backends: Vec<u16>) -> Result<u16, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let mut turn = 0usize;
        while let Ok((mut inbound, _)) = listener.accept().await {
            turn += 1;
            let backends = backends.clone();
            tokio::spawn(async move {
                for i in 0..backends.len() {
                    let port = backends[(turn + i) % backends.len()];
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// `vppd sim` with one organization per token file, each owning the 5 apps
/// with `licenses` licenses, at full speed.
fn start_sim(
    dir: &Path,
    token_files: &[PathBuf],
    licenses: usize,
) -> Result<(Proc, String), BoxError> {
    let mut cmd = Command::new(VPPD);
    cmd.args(["sim", "--listen", "127.0.0.1:0", "--no-rate-limit"])
        .args(["--max-request-per-second", "0"])
        .args(["--apps", &APPS.to_string()])
        .args(["--licenses", &licenses.to_string()]);
    for f in token_files {
        cmd.arg("--token-file").arg(f);
    }
    let log = std::fs::File::create(dir.join("sim.log"))?;
    let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn()?;
    let stdout = child.stdout.take().ok_or("sim stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http"))
        .ok_or_else(|| format!("unexpected first line from vppd sim: {line:?} (see sim.log)"))?
        .to_string();
    Ok((Proc(child), url))
}

/// The `[store]` lines of the daemons' config: sled (empty), or a fresh
/// schema on the server `VPPD_TEST_POSTGRES_URL` names.
async fn store_config(dir: &Path, kind: &str, run: &str) -> Result<String, BoxError> {
    match kind {
        "sled" => Ok(String::new()),
        "postgres" => {
            let base = std::env::var("VPPD_TEST_POSTGRES_URL").map_err(
                |_| "PostgreSQL needs VPPD_TEST_POSTGRES_URL: run under scripts/with-postgres.sh",
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
            let file = dir.join("postgres-url");
            std::fs::write(
                &file,
                format!("{base}{sep}options=-c%20search_path%3D{schema}"),
            )?;
            Ok(format!(
                "[store]\nkind = \"postgres\"\nurl_file = \"{}\"",
                file.display()
            ))
        }
        other => Err(format!("unknown store `{other}` (sled, postgres)").into()),
    }
}

struct Daemon {
    proc: Proc,
    admin: String,
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.proc.0.id()
    }
}

/// Starts replica `n`: its own listeners and data_dir, the shared store,
/// notification secret file and `public_url`.
fn start_daemon(
    dir: &Path,
    n: usize,
    store: &str,
    apple: &str,
    sink: SocketAddr,
    notif_port: u16,
    public_port: u16,
) -> Result<Daemon, BoxError> {
    let admin_port = free_port()?;
    let config = format!(
        r#"
data_dir = "{data}"
{store}
[apple]
base_url = "{apple}"
requests_per_second = 20
timeout = "30s"
[notifications]
listen = "127.0.0.1:{notif_port}"
public_url = "http://127.0.0.1:{public_port}/notifications"
auth_token_file = "{secret}"
[tracking]
status_poll_after = "20s"
status_poll_interval = "5s"
sync_after = "30s"
[admin]
listen = "127.0.0.1:{admin_port}"
# Every job is posted at once, each on its own connection.
max_connections = 4096
[install]
webhook_url = "http://{sink}/installs"
batch_size = 1000
"#,
        data = dir.join(format!("data-{n}")).display(),
        secret = dir.join("notification-secret").display(),
    );
    let path = dir.join(format!("vppd-{n}.toml"));
    std::fs::write(&path, config)?;
    let log = std::fs::File::create(dir.join(format!("vppd-{n}.log")))?;
    let child = Command::new(VPPD)
        .args(["run", "--config"])
        .arg(&path)
        // As deploy/vppd.service runs it.
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        .env(
            "RUST_LOG",
            std::env::var("VPPD_BENCH_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(Daemon {
        proc: Proc(child),
        admin: format!("http://127.0.0.1:{admin_port}"),
    })
}

/// The token leases a replica holds now (`vppd_lease_held{lease="token/…"} 1`).
async fn token_leases(http: &reqwest::Client, admin: &str) -> Result<usize, BoxError> {
    let text = http
        .get(format!("{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("vppd_lease_held{lease=\"token/") && l.ends_with(" 1"))
        .count())
}

/// Token states as `GET /v1/tokens` of one replica shows them.
async fn token_states(
    http: &reqwest::Client,
    admin: &str,
) -> Result<HashMap<String, usize>, BoxError> {
    let list: serde_json::Value = http
        .get(format!("{admin}/v1/tokens"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut states = HashMap::new();
    for d in list["tokens"].as_array().into_iter().flatten() {
        let state = match (d["state"].as_str(), d["error"].as_str()) {
            (Some("failed"), Some(e)) => format!("failed: {e}"),
            (Some(s), _) => s.to_string(),
            _ => "?".into(),
        };
        *states.entry(state).or_default() += 1;
    }
    Ok(states)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64()
}

/// One daemon process's figures.
struct Usage {
    leases: usize,
    cpu: f64,
    idle_rss_mb: f64,
    peak_rss_mb: f64,
}

struct Run {
    label: String,
    ready_after: Duration,
    accepted: Duration,
    wall: Duration,
    finished: Vec<Duration>,
    completed: usize,
    jobs: usize,
    unique: usize,
    received: u64,
    duplicates: u64,
    daemons: Vec<Usage>,
}

async fn run(
    label: String,
    tokens: usize,
    jobs_per_token: usize,
    replicas: usize,
    store: &str,
) -> Result<Run, BoxError> {
    let keep = std::env::var("VPPD_BENCH_KEEP").is_ok();
    // Kept when the run fails: the daemons' logs say why.
    let dir = tempfile::Builder::new()
        .prefix("vppd-tenants-")
        .disable_cleanup(true)
        .tempdir()?;
    eprintln!("{label}: logs and configs in {}", dir.path().display());
    let result = run_in(dir.path(), &label, tokens, jobs_per_token, replicas, store).await;
    if result.is_ok() && !keep {
        let _ = std::fs::remove_dir_all(dir.path());
    }
    result
}

async fn run_in(
    dir: &Path,
    label: &str,
    tokens: usize,
    jobs_per_token: usize,
    replicas: usize,
    store: &str,
) -> Result<Run, BoxError> {
    let http = reqwest::Client::builder().no_proxy().build()?;
    let expires = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let mut stokens = Vec::new();
    let mut files = Vec::new();
    for t in 0..tokens {
        let stoken = vppd::apple::token::SToken::encode(
            &format!("bench-{t}-{}", uuid::Uuid::new_v4().simple()),
            expires,
            &format!("School {t}"),
        );
        let file = dir.join(format!("t{t}.vpptoken"));
        std::fs::write(&file, &stoken)?;
        stokens.push(stoken);
        files.push(file);
    }
    let (sim, apple) = start_sim(dir, &files, DEVICES * jobs_per_token)?;
    let sink = Arc::new(Sink::default());
    let sink_addr = start_sink(sink.clone()).await?;
    let store = store_config(dir, store, &format!("r{replicas}t{tokens}")).await?;
    // One secret for all: with PostgreSQL the first replica seeds the store
    // from this file, and every replica answers with the stored one.
    std::fs::write(
        dir.join("notification-secret"),
        format!("bench-{:032x}\n", rand::random::<u128>()),
    )?;
    let notif_ports: Vec<u16> = (0..replicas)
        .map(|_| free_port())
        .collect::<Result<_, _>>()?;
    let public_port = if replicas > 1 {
        start_balancer(notif_ports.clone()).await?
    } else {
        notif_ports[0]
    };
    let mut daemons = Vec::new();
    for (n, port) in notif_ports.iter().enumerate() {
        daemons.push(start_daemon(
            dir,
            n,
            &store,
            &apple,
            sink_addr,
            *port,
            public_port,
        )?);
        // The first creates the schema; the others find it.
        wait_ready(&http, &daemons[n].admin).await?;
    }
    let admins: Vec<String> = daemons.iter().map(|d| d.admin.clone()).collect();

    // Tokens added at run time, the way a vendor adds customers, through
    // every replica in turn.
    let started = Instant::now();
    for (t, stoken) in stokens.iter().enumerate() {
        let r = http
            .put(format!("{}/v1/tokens/t{t}", admins[t % replicas]))
            .json(&serde_json::json!({"stoken": stoken}))
            .send()
            .await?;
        if r.status() != 201 {
            return Err(format!("PUT token t{t}: {} {}", r.status(), r.text().await?).into());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        // Every replica must see every token ready.
        let mut all = true;
        let mut seen = Vec::new();
        for admin in &admins {
            let states = token_states(&http, admin).await?;
            let ready = states.get("ready").copied().unwrap_or(0);
            all &= ready == tokens;
            seen.push(states);
        }
        if all {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not every token ready after 5 minutes; token states per replica: {seen:?}"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ready_after = started.elapsed();
    let idle_rss: Vec<f64> = daemons
        .iter()
        .map(|d| proc_status_mb(d.pid(), "VmRSS"))
        .collect::<Result<_, _>>()?;
    let cpu_before: Vec<f64> = daemons
        .iter()
        .map(|d| cpu_seconds(d.pid()))
        .collect::<Result<_, _>>()?;

    let assets: Vec<_> = (0..APPS)
        .map(|i| serde_json::json!({"adamId": vppd::cli::demo::adam_id(i), "pricingParam": "STDQ"}))
        .collect();
    let started = Instant::now();
    let mut posts = Vec::new();
    for t in 0..tokens {
        for j in 0..jobs_per_token {
            let http = http.clone();
            let admin = admins[(t * jobs_per_token + j) % replicas].clone();
            let serials: Vec<String> = (0..DEVICES).map(|i| format!("S{i:06}-{j}")).collect();
            let body = serde_json::json!({
                "id": format!("t{t}-j{j}"),
                "token": format!("t{t}"),
                "assets": assets,
                "associate": {"serialNumbers": serials},
            });
            posts.push(tokio::spawn(async move {
                let r = http
                    .post(format!("{admin}/v1/jobs"))
                    .json(&body)
                    .send()
                    .await?;
                Ok::<_, reqwest::Error>(r.status().as_u16())
            }));
        }
    }
    for p in posts {
        let status = p.await??;
        if status != 202 {
            return Err(format!("job post answered {status}").into());
        }
    }
    let accepted = started.elapsed();
    let total = tokens * jobs_per_token;
    let mut finished: HashMap<String, Duration> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut turn = 0;
    while finished.len() < total {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {total} jobs finished in 30 minutes",
                finished.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Status through any replica.
        turn += 1;
        let list: serde_json::Value = http
            .get(format!("{}/v1/jobs", admins[turn % replicas]))
            .send()
            .await?
            .json()
            .await?;
        for j in list["jobs"].as_array().into_iter().flatten() {
            if matches!(j["state"].as_str(), Some("completed") | Some("failed")) {
                let id = j["id"].as_str().unwrap_or_default().to_string();
                finished.entry(id).or_insert_with(|| started.elapsed());
            }
        }
    }
    let wall = started.elapsed();
    let list: serde_json::Value = http
        .get(format!("{}/v1/jobs", admins[0]))
        .send()
        .await?
        .json()
        .await?;
    let completed = list["jobs"]
        .as_array()
        .map(|a| a.iter().filter(|j| j["state"] == "completed").count())
        .unwrap_or(0);
    let mut usage = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        usage.push(Usage {
            leases: token_leases(&http, &d.admin).await?,
            cpu: cpu_seconds(d.pid())? - cpu_before[i],
            idle_rss_mb: idle_rss[i],
            peak_rss_mb: proc_status_mb(d.pid(), "VmHWM")?,
        });
    }
    let unique = sink.uuids.lock().unwrap_or_else(|p| p.into_inner()).len();
    for d in daemons {
        stop(d.proc)?;
    }
    drop(sim);
    let mut times: Vec<Duration> = finished.into_values().collect();
    times.sort();
    let run = Run {
        label: label.to_string(),
        ready_after,
        accepted,
        wall,
        finished: times,
        completed,
        jobs: total,
        unique,
        received: sink.received.load(Ordering::Relaxed),
        duplicates: sink.duplicates.load(Ordering::Relaxed),
        daemons: usage,
    };
    print(&run);
    if run.completed != total || run.unique != total * DEVICES * APPS || run.duplicates > 0 {
        return Err(format!(
            "{}: {} of {total} jobs completed, the MDM got {} distinct installs of {} ({} repeats)",
            run.label,
            run.completed,
            run.unique,
            total * DEVICES * APPS,
            run.duplicates
        )
        .into());
    }
    Ok(run)
}

fn print(r: &Run) {
    println!(
        "{}: {}/{} jobs completed, MDM received {} installs ({} unique, {} repeats); every token ready through every replica {:.1} s after the first PUT; all jobs accepted after {:.1} s, wall {:.1} s, completion p0 {:.1} s p50 {:.1} s p90 {:.1} s p100 {:.1} s",
        r.label,
        r.completed,
        r.jobs,
        r.received,
        r.unique,
        r.duplicates,
        r.ready_after.as_secs_f64(),
        r.accepted.as_secs_f64(),
        r.wall.as_secs_f64(),
        percentile(&r.finished, 0.0),
        percentile(&r.finished, 0.5),
        percentile(&r.finished, 0.9),
        percentile(&r.finished, 1.0),
    );
    for (i, d) in r.daemons.iter().enumerate() {
        println!(
            "  daemon {i}: {} token leases, CPU {:.1} s for the jobs, RSS {:.0} MB with the tokens ready and idle, peak RSS {:.0} MB",
            d.leases, d.cpu, d.idle_rss_mb, d.peak_rss_mb
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let tokens: usize = std::env::var("VPPD_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let replicas: usize = std::env::var("VPPD_BENCH_REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let store = std::env::var("VPPD_BENCH_STORE")
        .unwrap_or_else(|_| if replicas > 1 { "postgres" } else { "sled" }.into());
    if replicas > 1 && store != "postgres" {
        return Err("several replicas share a PostgreSQL store: VPPD_BENCH_STORE=postgres".into());
    }
    let label = if replicas > 1 {
        format!("{replicas} replicas x {tokens} tokens ({store})")
    } else {
        format!("{tokens} tokens ({store})")
    };
    let many = run(label, tokens, 1, replicas, &store).await?;
    if std::env::var("VPPD_BENCH_SKIP_SINGLE").is_err() {
        let one = run(
            format!("one token, {tokens} jobs ({store})"),
            1,
            tokens,
            1,
            &store,
        )
        .await?;
        println!(
            "wall ratio tenants / one token: {:.2}",
            many.wall.as_secs_f64() / one.wall.as_secs_f64().max(0.001)
        );
    }
    Ok(())
}
