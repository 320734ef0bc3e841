//! Many tenants in one daemon: N tokens (default 1,000) added through the
//! token API while vppd runs, one 200-device x 5-app job each, all posted at
//! once, against the simulator at full speed. Then the same work (N such
//! jobs) on one token, for comparison. Prints, for each: wall time, peak
//! RSS of the process (the simulator and the stand-in MDM included), and
//! the spread of job completion times across tokens.
//!
//! `VPPD_BENCH_TOKENS` sets N; `VPPD_BENCH_SKIP_SINGLE=1` skips the
//! one-token run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vppd::apple::token::SToken;
use vppd::config::Config;
use vppd::daemon::Daemon;
use vppd::demo::{adam_id, peak_rss_mb};
use vppd::http::{self, Server};
use vppd::metrics::Metrics;
use vppd::sim::{SimAsset, SimConfig, SimToken, Simulator};

const DEVICES: usize = 200;
const APPS: usize = 5;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Run {
    label: &'static str,
    /// RSS with every token ready, before the jobs.
    idle_rss_mb: u64,
    /// Until every job was answered 202.
    accepted: Duration,
    wall: Duration,
    finished: Vec<Duration>,
    rss_mb: u64,
    completed: usize,
    jobs: usize,
    installs: usize,
}

/// The stand-in MDM: counts install commands per job (a record per
/// command would make it, not vppd, the largest part of the peak RSS).
#[derive(Default)]
struct CountingSink {
    per_job: std::sync::Mutex<HashMap<String, u64>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SeenCommand<'a> {
    #[serde(borrow)]
    job_id: std::borrow::Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct SeenBatch<'a> {
    #[serde(borrow)]
    commands: Vec<SeenCommand<'a>>,
}

impl http::Handler for CountingSink {
    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<http::Body> {
        let Ok(body) = http::read_body(req.into_body(), 64 << 20).await else {
            return http::text(hyper::StatusCode::BAD_REQUEST, "bad body\n");
        };
        let Ok(batch) = serde_json::from_slice::<SeenBatch<'_>>(&body) else {
            return http::text(hyper::StatusCode::BAD_REQUEST, "not a command batch\n");
        };
        let mut per_job = self.per_job.lock().unwrap_or_else(|p| p.into_inner());
        for c in batch.commands {
            *per_job.entry(c.job_id.into_owned()).or_default() += 1;
        }
        http::text(hyper::StatusCode::OK, "ok\n")
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The process's RSS now (VmRSS), in MB.
fn rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64()
}

async fn run(label: &'static str, tokens: usize, jobs_per_token: usize) -> Result<Run, BoxError> {
    let dir = tempfile::tempdir()?;
    let outside = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let sim_config = SimConfig {
        enforce_rate_limit: false,
        ..SimConfig::default()
    };
    let sim = outside
        .spawn(async move { Simulator::start(sim_config, "127.0.0.1:0").await })
        .await??;
    let expires = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let mut stokens = Vec::new();
    for t in 0..tokens {
        let stoken = SToken::encode(
            &format!("bench-{t}-{}", uuid::Uuid::new_v4()),
            expires,
            &format!("School {t}"),
        );
        sim.add_token(SimToken {
            stoken: stoken.clone(),
            assets: (0..APPS)
                .map(|i| SimAsset::app(&adam_id(i), Some((DEVICES * jobs_per_token) as u32)))
                .collect(),
            read_only: false,
        })?;
        stokens.push(stoken);
    }
    let sink = Arc::new(CountingSink::default());
    let sink_handler = sink.clone();
    let sink_server = outside
        .spawn(async move { Server::bind("127.0.0.1:0", sink_handler).await })
        .await??;
    let notif = free_port()?;
    let admin_port = free_port()?;
    let text = format!(
        r#"
data_dir = "{data}"
[apple]
base_url = "{apple}"
requests_per_second = 20
timeout = "30s"
[notifications]
listen = "127.0.0.1:{notif}"
public_url = "http://127.0.0.1:{notif}/notifications"
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
        data = dir.path().join("data").display(),
        apple = sim.base_url(),
        secret = dir.path().join("secret").display(),
        sink = sink_server.local_addr(),
    );
    let config = Config::parse(&text, &dir.path().join("bench.toml"))?;
    let daemon = Daemon::start(config, Arc::new(Metrics::new())).await?;
    let admin = format!("http://{}", daemon.admin_addr());
    let http = reqwest::Client::new();

    // Tokens added at run time, the way a vendor adds customers.
    for (t, stoken) in stokens.iter().enumerate() {
        let r = http
            .put(format!("{admin}/v1/tokens/t{t}"))
            .json(&serde_json::json!({"stoken": stoken}))
            .send()
            .await?;
        if r.status() != 201 {
            return Err(format!("PUT token t{t}: {}", r.status()).into());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list: serde_json::Value = http
            .get(format!("{admin}/v1/tokens"))
            .send()
            .await?
            .json()
            .await?;
        let ready = list["tokens"]
            .as_array()
            .map(|a| a.iter().filter(|d| d["state"] == "ready").count())
            .unwrap_or(0);
        if ready == tokens {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {ready} of {tokens} tokens ready").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let idle_rss_mb = rss_mb();
    let serials: Vec<String> = (0..DEVICES).map(|i| format!("S{i:06}")).collect();
    let assets: Vec<_> = (0..APPS)
        .map(|i| serde_json::json!({"adamId": adam_id(i), "pricingParam": "STDQ"}))
        .collect();
    let started = Instant::now();
    let mut posts = Vec::new();
    for t in 0..tokens {
        for j in 0..jobs_per_token {
            let http = http.clone();
            let admin = admin.clone();
            let body = serde_json::json!({
                "id": format!("t{t}-j{j}"),
                "token": format!("t{t}"),
                "assets": assets,
                "associate": {"serialNumbers": serials.iter().map(|s| format!("{s}-{j}")).collect::<Vec<_>>()},
            });
            posts.push(tokio::spawn(async move {
                http.post(format!("{admin}/v1/jobs"))
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
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
    while finished.len() < total && Instant::now() < deadline {
        let list: serde_json::Value = http
            .get(format!("{admin}/v1/jobs"))
            .send()
            .await?
            .json()
            .await?;
        for j in list["jobs"].as_array().into_iter().flatten() {
            let id = j["id"].as_str().unwrap_or_default().to_string();
            if matches!(j["state"].as_str(), Some("completed") | Some("failed")) {
                finished.entry(id).or_insert_with(|| started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let wall = started.elapsed();
    let list: serde_json::Value = http
        .get(format!("{admin}/v1/jobs"))
        .send()
        .await?
        .json()
        .await?;
    let completed = list["jobs"]
        .as_array()
        .map(|a| a.iter().filter(|j| j["state"] == "completed").count())
        .unwrap_or(0);
    let installs = sink
        .per_job
        .lock()
        .map(|c| c.values().sum::<u64>() as usize)
        .unwrap_or(0);
    let mut times: Vec<Duration> = finished.into_values().collect();
    times.sort();
    daemon.shutdown().await;
    let _ = outside
        .spawn(async move {
            sink_server.shutdown().await;
            sim.shutdown().await;
        })
        .await;
    outside.shutdown_background();
    Ok(Run {
        label,
        idle_rss_mb,
        accepted,
        wall,
        finished: times,
        rss_mb: peak_rss_mb().unwrap_or(0),
        completed,
        jobs: total,
        installs,
    })
}

fn print(r: &Run) {
    println!(
        "{}: {}/{} jobs completed, {} installs released, all accepted after {:.1} s, wall {:.1} s, completion p0 {:.1} s p50 {:.1} s p90 {:.1} s p100 {:.1} s, RSS {} MB with the tokens ready and idle, peak RSS {} MB (whole process)",
        r.label,
        r.completed,
        r.jobs,
        r.installs,
        r.accepted.as_secs_f64(),
        r.wall.as_secs_f64(),
        percentile(&r.finished, 0.0),
        percentile(&r.finished, 0.5),
        percentile(&r.finished, 0.9),
        percentile(&r.finished, 1.0),
        r.idle_rss_mb,
        r.rss_mb,
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let tokens: usize = std::env::var("VPPD_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let many = run("tenants", tokens, 1).await?;
    print(&many);
    if std::env::var("VPPD_BENCH_SKIP_SINGLE").is_err() {
        let one = run("one token", 1, tokens).await?;
        print(&one);
        println!(
            "wall ratio tenants / one token: {:.2}",
            many.wall.as_secs_f64() / one.wall.as_secs_f64().max(0.001)
        );
    }
    Ok(())
}
