//! Notification ingest through the real listener and store: concurrent
//! senders POST 100-item ASSET_MANAGEMENT notifications over loopback; each
//! is authenticated, parsed, recorded with its dedupe key in one
//! durable commit (group commit) before the 200.
//! Prints throughput and acknowledgement latency percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vppd::runtime::context::Context;
use vppd::runtime::metrics::Metrics;

const SENDERS: usize = 32;
const PER_SENDER: usize = 500;

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

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = vppd::store::open(dir.path(), false).await.expect("store");
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let config = vppd::runtime::config::Config::parse(
        &std::fs::read_to_string("deploy/vppd.toml").expect("deploy/vppd.toml"),
        std::path::Path::new("deploy/vppd.toml"),
    )
    .expect("example config");
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(Context::new(
        store,
        metrics.clone(),
        config.tracking.clone(),
        config.install.clone(),
        stop_rx,
    ));
    // The location the notifications come from must be one vppd serves,
    // or they are acknowledged and ignored as foreign.
    let stoken = vppd::apple::token::SToken::parse(&vppd::apple::token::SToken::encode(
        "bench",
        time::OffsetDateTime::now_utc() + time::Duration::days(300),
        "Bench",
    ))
    .expect("token");
    let client = vppd::apple::Client::new(
        vppd::apple::ClientOptions::new("http://127.0.0.1:9", "bench", 5, Duration::from_secs(5)),
        stoken,
        metrics,
    )
    .expect("client");
    ctx.tokens.insert(
        "bench",
        vppd::runtime::tokens::Source::Config,
        client,
        Some("2049025000431439".into()),
        false,
    );
    // The token's own secret, as registered with its location.
    let secret = ctx
        .secrets
        .ensure(&*ctx.store, "bench")
        .await
        .expect("secret");
    let listener = Arc::new(vppd::stages::listen::Listener::new(ctx.clone(), 1 << 20));
    let server = vppd::runtime::http::Server::bind("127.0.0.1:0", listener)
        .await
        .expect("bind");
    let url = format!("http://{}/notifications", server.local_addr());
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new((0..SENDERS * PER_SENDER).map(notification).collect());
    let body_size = bodies[0].len();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let url = url.clone();
        let secret = secret.clone();
        let bodies = bodies.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut latencies = Vec::with_capacity(PER_SENDER);
            for i in 0..PER_SENDER {
                let body = bodies[s * PER_SENDER + i].clone();
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&secret)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => latencies.push(t.elapsed()),
                    other => panic!("notification refused: {other:?}"),
                }
            }
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("sender"));
    }
    let wall = started.elapsed();
    latencies.sort();
    let pct = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "ingest: {} notifications of 100 items ({} bytes) from {SENDERS} concurrent senders in {:.2} s = {:.0} notifications/s; ack latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; inbox holds {}",
        latencies.len(),
        body_size,
        wall.as_secs_f64(),
        latencies.len() as f64 / wall.as_secs_f64(),
        pct(0.5).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        latencies
            .last()
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0),
        ctx.store.inbox_len().await.unwrap_or(0),
    );
    server.shutdown().await;
}
