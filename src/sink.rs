//! `vppd sink`: a stand-in MDM for trying vppd on one machine. It takes the
//! install webhook's POSTs (any path), answers 200, prints one line per new
//! command and drops a repeated `commandUuid`, as a real MDM should (a
//! delivery whose acknowledgement was lost comes again with the same uuids).
//! `GET` on any path answers the counts as JSON.
//!
//! It reads `requestType` when present (`InstallApplication` otherwise), so
//! `RemoveApplication` and `InviteToProgram` commands print as what they are.
//! It checks no signature: docs/mdm-integration.md and
//! examples/mdm_receiver.rs show a receiver that does.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;

use crate::http::{self, Body, Server};

/// Largest POST taken: far above `install.batch_size` commands.
const MAX_BODY: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen for signals: {0}")]
    Signal(std::io::Error),
}

/// One command as the webhook contract gives it; unknown fields are ignored
/// so a newer daemon's additions do not break an older sink.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Command {
    command_uuid: String,
    #[serde(default)]
    request_type: Option<String>,
    #[serde(default)]
    job_id: Option<String>,
    #[serde(default)]
    adam_id: Option<String>,
    #[serde(default)]
    pricing_param: Option<String>,
    #[serde(default)]
    serial_number: Option<String>,
    #[serde(default)]
    client_user_id: Option<String>,
    #[serde(default)]
    invitation_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Batch {
    commands: Vec<Command>,
}

/// What the sink has seen so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Distinct commandUuids received.
    pub commands: u64,
    /// Commands dropped because their uuid came before.
    pub repeats: u64,
    /// POSTs acknowledged.
    pub posts: u64,
}

pub struct Sink {
    seen: Mutex<HashSet<String>>,
    repeats: AtomicU64,
    posts: AtomicU64,
    quiet: bool,
}

impl Sink {
    pub fn new(quiet: bool) -> Sink {
        Sink {
            seen: Mutex::new(HashSet::new()),
            repeats: AtomicU64::new(0),
            posts: AtomicU64::new(0),
            quiet,
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            commands: self.seen.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
            repeats: self.repeats.load(Ordering::SeqCst),
            posts: self.posts.load(Ordering::SeqCst),
        }
    }

    fn take(&self, batch: Batch) {
        let mut lines = String::new();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for c in batch.commands {
                if seen.contains(&c.command_uuid) {
                    self.repeats.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                if !self.quiet {
                    lines.push_str(&describe(&c));
                    lines.push('\n');
                }
                seen.insert(c.command_uuid);
            }
        }
        self.posts.fetch_add(1, Ordering::SeqCst);
        if !lines.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(lines.as_bytes());
            let _ = out.flush();
        }
    }
}

fn describe(c: &Command) -> String {
    let kind = c.request_type.as_deref().unwrap_or("InstallApplication");
    let mut line = kind.to_string();
    let mut field = |name: &str, value: &Option<String>| {
        if let Some(v) = value {
            line.push_str(&format!(" {name}={v}"));
        }
    };
    field("adamId", &c.adam_id);
    field("pricingParam", &c.pricing_param);
    field("serialNumber", &c.serial_number);
    field("clientUserId", &c.client_user_id);
    field("invitationUrl", &c.invitation_url);
    field("jobId", &c.job_id);
    line.push_str(&format!(" commandUuid={}", c.command_uuid));
    line
}

impl http::Handler for Sink {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() == Method::GET {
            return http::json(StatusCode::OK, &self.counts());
        }
        if req.method() != Method::POST {
            return http::text(StatusCode::METHOD_NOT_ALLOWED, "POST or GET\n");
        }
        let body = match http::read_body(req.into_body(), MAX_BODY).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable POST");
                return http::text(StatusCode::BAD_REQUEST, "unreadable body\n");
            }
        };
        match serde_json::from_slice::<Batch>(&body) {
            Ok(batch) => {
                self.take(batch);
                http::text(StatusCode::OK, "ok\n")
            }
            Err(e) => {
                tracing::warn!(error = %e, "POST is not a command batch");
                http::json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": format!("not a command batch: {e}")}),
                )
            }
        }
    }
}

/// Serves until SIGINT/SIGTERM, then prints the totals on stderr.
pub async fn run(listen: &str, quiet: bool) -> Result<Counts, SinkError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(SinkError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SinkError::Signal)?;
    let sink = std::sync::Arc::new(Sink::new(quiet));
    let server = Server::bind(listen, sink.clone())
        .await
        .map_err(|source| SinkError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    eprintln!(
        "vppd sink listening on http://{} (set [install] webhook_url to it)",
        server.local_addr()
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    server.shutdown().await;
    let counts = sink.counts();
    eprintln!(
        "vppd sink: {} commands received, {} repeats dropped, {} posts",
        counts.commands, counts.repeats, counts.posts
    );
    Ok(counts)
}
