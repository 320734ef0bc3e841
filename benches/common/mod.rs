//! What the process benchmarks share: the stand-in MDM, child processes,
//! and what /proc says of the daemon.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

// The tests' one way of sending signals; benches cannot import tests/common.
#[path = "../../tests/common/signal.rs"]
mod signal;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The stand-in MDM: acknowledges every batch and remembers each command
/// uuid once (16 bytes each), so the run can check that every install
/// arrived exactly once.
#[derive(Default)]
pub struct Sink {
    pub uuids: Mutex<HashSet<u128>>,
    pub duplicates: AtomicU64,
    pub received: AtomicU64,
}

#[derive(serde::Deserialize)]
struct Batch {
    commands: Vec<Cmd>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Cmd {
    command_uuid: uuid::Uuid,
}

async fn sink_handle(
    sink: Arc<Sink>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let body = req.into_body().collect().await?.to_bytes();
    let batch: Batch = serde_json::from_slice(&body)?;
    let mut seen = sink.uuids.lock().unwrap_or_else(|p| p.into_inner());
    for c in batch.commands {
        sink.received.fetch_add(1, Ordering::Relaxed);
        if !seen.insert(c.command_uuid.as_u128()) {
            sink.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
}

pub async fn start_sink(sink: Arc<Sink>) -> Result<SocketAddr, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| sink_handle(sink.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

pub fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running child that is killed if the benchmark stops early.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn wait_ready(http: &reqwest::Client, admin: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{admin}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("{admin} was not ready within 60 s (see its log)").into())
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM), as MB.
pub fn proc_status_mb(pid: u32, field: &str) -> Result<f64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))?
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64, BoxError> {
    let (user, system) = cpu_split(pid)?;
    Ok(user + system)
}

/// utime and stime of a process apart, in seconds: the kernel's share is
/// mostly the store's writes and the sockets.
pub fn cpu_split(pid: u32) -> Result<(f64, f64), BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields are counted after its ')'.
    let rest = stat.rsplit_once(')').ok_or("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).ok_or("no utime")?.parse()?;
    let stime: f64 = fields.get(12).ok_or("no stime")?.parse()?;
    let ticks = clock_ticks();
    Ok((utime / ticks, stime / ticks))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn stop(mut proc: Proc) -> Result<(), BoxError> {
    signal::send(proc.0.id(), signal::Signal::Term)?;
    proc.0.wait()?;
    Ok(())
}
