//! The stand-in MDM: one receiver of the install webhook for `vppd sink`,
//! `vppd demo` and the tests. It takes the webhook's POSTs (any path),
//! answers 200 and remembers each command once by its `commandUuid`,
//! counting a repeat apart, as a real MDM should (a delivery whose
//! acknowledgement was lost comes again with the same uuids). `GET` on any
//! path answers the counts as JSON.
//!
//! What differs between its users are options ([`SinkOptions`]): `vppd
//! sink` prints one line per new command; the tests keep the last POSTs
//! whole to check their signatures, and can make it refuse
//! ([`Sink::fail_with`], [`Sink::accept_limit`]); the demo counts the
//! installs of its job on a [`Grid`], one counter per (app, device), since a
//! record per command would cost more memory than the daemon itself.
//!
//! It reads `requestType` when present (`InstallApplication` otherwise), so
//! `RemoveApplication` and `InviteToProgram` commands print as what they are.
//! It checks no signature: docs/mdm-integration.md and
//! examples/mdm_receiver.rs show a receiver that does.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;

use crate::domain::job::RequestType;
use crate::runtime::http::{self, Body, Server};

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

/// One command as the webhook contract gives it, read without copying its
/// strings; unknown fields are ignored so a newer daemon's additions do not
/// break an older sink.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Command<'a> {
    #[serde(borrow)]
    command_uuid: Cow<'a, str>,
    #[serde(borrow, default)]
    request_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    job_id: Option<Cow<'a, str>>,
    /// Absent on an invitation.
    #[serde(borrow, default)]
    adam_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pricing_param: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    serial_number: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client_user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    invitation_url: Option<Cow<'a, str>>,
}

impl Command<'_> {
    /// The request type this build knows it as; `None` for a newer one.
    fn kind(&self) -> Option<RequestType> {
        let Some(name) = self.request_type.as_deref() else {
            return Some(RequestType::InstallApplication);
        };
        [
            RequestType::InstallApplication,
            RequestType::RemoveApplication,
            RequestType::InviteToProgram,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }

    /// The one line `vppd sink` prints for it.
    fn describe(&self) -> String {
        let kind = self.request_type.as_deref().unwrap_or("InstallApplication");
        let mut line = kind.to_string();
        let mut field = |name: &str, value: &Option<Cow<'_, str>>| {
            if let Some(v) = value {
                line.push_str(&format!(" {name}={v}"));
            }
        };
        field("adamId", &self.adam_id);
        field("pricingParam", &self.pricing_param);
        field("serialNumber", &self.serial_number);
        field("clientUserId", &self.client_user_id);
        field("invitationUrl", &self.invitation_url);
        field("jobId", &self.job_id);
        line.push_str(&format!(" commandUuid={}", self.command_uuid));
        line
    }
}

#[derive(Debug, Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    commands: Vec<Command<'a>>,
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

/// One distinct command the sink received (outside its [`Grid`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// `None`: a request type this build does not know.
    pub kind: Option<RequestType>,
    /// Empty on an invitation.
    pub adam_id: String,
    pub serial_number: Option<String>,
    pub client_user_id: Option<String>,
    pub invitation_url: Option<String>,
    /// How often it came (1 and the repeats).
    pub times: u32,
    /// Its place in the order of first arrivals, from 0.
    pub first: u64,
}

impl Received {
    /// The device's serial number or the user's id; empty when neither.
    pub fn target(&self) -> &str {
        self.serial_number
            .as_deref()
            .or(self.client_user_id.as_deref())
            .unwrap_or_default()
    }

    pub fn is(&self, kind: RequestType) -> bool {
        self.kind == Some(kind)
    }
}

/// (`X-Vppd-Timestamp`, `X-Vppd-Signature`, raw body) of one POST.
pub type SignedPost = (Option<String>, Option<String>, Vec<u8>);

/// The name of the demo's `i`th app; [`Grid`] reads it back.
pub fn adam_id(i: usize) -> String {
    (FIRST_ADAM_ID + i).to_string()
}

/// The serial number of the demo's `i`th device; [`Grid`] reads it back.
pub fn serial(i: usize) -> String {
    format!("{SERIAL_PREFIX}{i:08}")
}

const FIRST_ADAM_ID: usize = 100_000_001;
const SERIAL_PREFIX: &str = "DEMO";

/// The installs of a job of `apps` x `devices` named as [`adam_id`] and
/// [`serial`] name them, one saturating counter per (app, device): a
/// million devices x 25 apps cost 25 MB instead of a record per command.
/// An install is counted here by its pair, whatever its uuid.
pub struct Grid {
    apps: usize,
    devices: usize,
    counts: Vec<AtomicU8>,
}

impl Grid {
    pub fn new(apps: usize, devices: usize) -> Grid {
        Grid {
            apps,
            devices,
            counts: (0..apps * devices).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// The counter of an install of one of the grid's pairs.
    fn slot(&self, c: &Command<'_>) -> Option<&AtomicU8> {
        if c.kind() != Some(RequestType::InstallApplication) {
            return None;
        }
        let app = c
            .adam_id
            .as_deref()?
            .parse::<usize>()
            .ok()?
            .checked_sub(FIRST_ADAM_ID)?;
        let device = c
            .serial_number
            .as_deref()?
            .strip_prefix(SERIAL_PREFIX)?
            .parse::<usize>()
            .ok()?;
        (app < self.apps && device < self.devices)
            .then(|| &self.counts[app * self.devices + device])
    }

    /// Counts one more install in `slot`; true when it is the pair's first.
    fn bump(slot: &AtomicU8) -> bool {
        let before = slot
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(u8::MAX);
        before == 0
    }
}

/// How a [`Sink`] behaves where its users differ.
#[derive(Default)]
pub struct SinkOptions {
    /// Print one line per new command on stdout (`vppd sink`).
    pub print: bool,
    /// Keep the last this many POSTs whole, with their signature headers.
    pub keep_posts: usize,
    /// Count the installs of these pairs on the grid instead of recording
    /// them one by one.
    pub grid: Option<Grid>,
}

/// The stand-in MDM; serve it with [`Server::bind`].
pub struct Sink {
    print: bool,
    keep_posts: usize,
    grid: Option<Grid>,
    /// Every distinct command outside the grid, by uuid.
    received: Mutex<HashMap<String, Received>>,
    signed: Mutex<VecDeque<SignedPost>>,
    distinct: AtomicU64,
    repeats: AtomicU64,
    posts: AtomicU64,
    fail_with: AtomicU16,
    accept_limit: AtomicU64,
}

impl Default for Sink {
    /// What the tests use: every command recorded, the last 64 POSTs kept.
    fn default() -> Self {
        Sink::new(SinkOptions {
            keep_posts: 64,
            ..SinkOptions::default()
        })
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sink {
    pub fn new(options: SinkOptions) -> Sink {
        Sink {
            print: options.print,
            keep_posts: options.keep_posts,
            grid: options.grid,
            received: Mutex::new(HashMap::new()),
            signed: Mutex::new(VecDeque::new()),
            distinct: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            posts: AtomicU64::new(0),
            fail_with: AtomicU16::new(0),
            accept_limit: AtomicU64::new(u64::MAX),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            commands: self.distinct.load(Ordering::SeqCst),
            repeats: self.repeats.load(Ordering::SeqCst),
            posts: self.posts.load(Ordering::SeqCst),
        }
    }

    /// Answer every POST with this status (an MDM outage); 0 answers again.
    pub fn fail_with(&self, status: u16) {
        self.fail_with.store(status, Ordering::SeqCst);
    }

    /// Once this many distinct commands were acknowledged, answer 503 to
    /// the rest (`u64::MAX`: no limit).
    pub fn accept_limit(&self, commands: u64) {
        self.accept_limit.store(commands, Ordering::SeqCst);
    }

    /// Every distinct command outside the grid, in the order they first came.
    pub fn received(&self) -> Vec<Received> {
        let mut all: Vec<Received> = locked(&self.received).values().cloned().collect();
        all.sort_by_key(|r| r.first);
        all
    }

    /// Every distinct command outside the grid: (times, adamId, target) by uuid.
    pub fn commands(&self) -> HashMap<String, (u32, String, String)> {
        self.by_uuid(|r| Some((r.times, r.adam_id.clone(), r.target().to_string())))
    }

    /// The request type of every distinct command outside the grid, by uuid.
    pub fn kinds(&self) -> HashMap<String, RequestType> {
        self.by_uuid(|r| r.kind)
    }

    /// `invitationUrl` of each `InviteToProgram` command seen, by uuid.
    pub fn invitations(&self) -> HashMap<String, String> {
        self.by_uuid(|r| r.invitation_url.clone())
    }

    fn by_uuid<T>(&self, f: impl Fn(&Received) -> Option<T>) -> HashMap<String, T> {
        locked(&self.received)
            .iter()
            .filter_map(|(uuid, r)| Some((uuid.clone(), f(r)?)))
            .collect()
    }

    /// Distinct commands seen of one request type (outside the grid).
    pub fn count(&self, kind: RequestType) -> usize {
        locked(&self.received)
            .values()
            .filter(|r| r.is(kind))
            .count()
    }

    /// How often each (app, device) of the grid got its install: 0, 1, 2
    /// (or more); 0 outside the grid or without one.
    pub fn grid_count(&self, app: usize, device: usize) -> u8 {
        self.grid
            .as_ref()
            .filter(|g| app < g.apps && device < g.devices)
            .map_or(0, |g| {
                g.counts[app * g.devices + device].load(Ordering::Relaxed)
            })
    }

    /// The last POSTs as received, oldest first.
    pub fn signed(&self) -> Vec<SignedPost> {
        locked(&self.signed).iter().cloned().collect()
    }

    fn keep(&self, post: SignedPost) {
        if self.keep_posts == 0 {
            return;
        }
        let mut signed = locked(&self.signed);
        if signed.len() >= self.keep_posts {
            signed.pop_front();
        }
        signed.push_back(post);
    }

    /// Takes a batch unless the acceptance limit was reached (false then).
    fn take(&self, batch: Batch<'_>) -> bool {
        let mut lines = String::new();
        {
            // Held across the check and the records so that concurrent
            // POSTs cannot both pass the limit.
            let mut received = locked(&self.received);
            if self.distinct.load(Ordering::SeqCst) >= self.accept_limit.load(Ordering::SeqCst) {
                return false;
            }
            for c in batch.commands {
                let new = match self.grid.as_ref().and_then(|g| g.slot(&c)) {
                    Some(slot) => Grid::bump(slot),
                    None => self.record(&mut received, &c),
                };
                if !new {
                    self.repeats.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                self.distinct.fetch_add(1, Ordering::SeqCst);
                if self.print {
                    lines.push_str(&c.describe());
                    lines.push('\n');
                }
            }
        }
        self.posts.fetch_add(1, Ordering::SeqCst);
        if !lines.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(lines.as_bytes());
            let _ = out.flush();
        }
        true
    }

    /// Records one command outside the grid; true when its uuid is new.
    fn record(&self, received: &mut HashMap<String, Received>, c: &Command<'_>) -> bool {
        if let Some(r) = received.get_mut(c.command_uuid.as_ref()) {
            r.times = r.times.saturating_add(1);
            return false;
        }
        let owned = |v: &Option<Cow<'_, str>>| v.as_deref().map(str::to_string);
        let first = received.len() as u64;
        received.insert(
            c.command_uuid.to_string(),
            Received {
                kind: c.kind(),
                adam_id: c.adam_id.as_deref().unwrap_or_default().to_string(),
                serial_number: owned(&c.serial_number),
                client_user_id: owned(&c.client_user_id),
                invitation_url: owned(&c.invitation_url),
                times: 1,
                first,
            },
        );
        true
    }

    async fn post(&self, req: Request<Incoming>) -> Response<Body> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (ts, sig) = (
            header(crate::domain::signing::TIMESTAMP_HEADER),
            header(crate::domain::signing::SIGNATURE_HEADER),
        );
        let body = match http::read_body(req.into_body(), MAX_BODY).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable POST");
                return http::text(StatusCode::BAD_REQUEST, "unreadable body\n");
            }
        };
        self.keep((ts, sig, body.to_vec()));
        let fail = self.fail_with.load(Ordering::SeqCst);
        if fail != 0 {
            let status = StatusCode::from_u16(fail).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return http::text(status, "down\n");
        }
        match serde_json::from_slice::<Batch<'_>>(&body) {
            Ok(batch) => match self.take(batch) {
                true => http::text(StatusCode::OK, "ok\n"),
                false => http::text(StatusCode::SERVICE_UNAVAILABLE, "down\n"),
            },
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

impl http::Handler for Sink {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() == Method::GET {
            return http::json(StatusCode::OK, &self.counts());
        }
        if req.method() != Method::POST {
            return http::text(StatusCode::METHOD_NOT_ALLOWED, "POST or GET\n");
        }
        self.post(req).await
    }
}

/// `vppd sink`: serves until SIGINT/SIGTERM, then prints the totals on stderr.
pub async fn run(listen: &str, quiet: bool) -> Result<Counts, SinkError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(SinkError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SinkError::Signal)?;
    let sink = std::sync::Arc::new(Sink::new(SinkOptions {
        print: !quiet,
        ..SinkOptions::default()
    }));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(json: &str) -> Batch<'_> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_repeated_uuid_is_recorded_once_and_counted_as_a_repeat() {
        let sink = Sink::default();
        let b = r#"{"commands": [
            {"commandUuid": "u-1", "adamId": "1", "serialNumber": "S1"},
            {"commandUuid": "u-2", "requestType": "InviteToProgram", "clientUserId": "c", "invitationUrl": "https://i"}
        ]}"#;
        assert!(sink.take(batch(b)));
        assert!(sink.take(batch(b)));
        assert_eq!(
            sink.counts(),
            Counts {
                commands: 2,
                repeats: 2,
                posts: 2
            }
        );
        let commands = sink.commands();
        assert_eq!(commands["u-1"], (2, "1".to_string(), "S1".to_string()));
        assert_eq!(commands["u-2"], (2, String::new(), "c".to_string()));
        assert_eq!(sink.invitations()["u-2"], "https://i");
        assert_eq!(sink.count(RequestType::InviteToProgram), 1);
        let order: Vec<u64> = sink.received().iter().map(|r| r.first).collect();
        assert_eq!(order, [0, 1]);
    }

    #[test]
    fn the_grid_counts_its_pairs_and_records_the_rest() {
        let sink = Sink::new(SinkOptions {
            grid: Some(Grid::new(2, 3)),
            ..SinkOptions::default()
        });
        let b = format!(
            r#"{{"commands": [
                {{"commandUuid": "a", "adamId": "{a}", "serialNumber": "{s}"}},
                {{"commandUuid": "b", "adamId": "{a}", "serialNumber": "{s}"}},
                {{"commandUuid": "c", "adamId": "{a}", "serialNumber": "{outside}"}},
                {{"commandUuid": "d", "requestType": "RemoveApplication", "adamId": "{a}", "serialNumber": "{s}"}}
            ]}}"#,
            a = adam_id(1),
            s = serial(2),
            outside = serial(3),
        );
        assert!(sink.take(batch(&b)));
        assert_eq!(sink.grid_count(1, 2), 2);
        assert_eq!(sink.grid_count(0, 2), 0);
        assert_eq!(sink.grid_count(5, 5), 0);
        let rest: Vec<(Option<RequestType>, String)> = sink
            .received()
            .into_iter()
            .map(|r| (r.kind, r.target().to_string()))
            .collect();
        assert_eq!(
            rest,
            [
                (Some(RequestType::InstallApplication), serial(3)),
                (Some(RequestType::RemoveApplication), serial(2)),
            ]
        );
        assert_eq!(sink.counts().repeats, 1);
    }

    #[test]
    fn past_the_limit_a_batch_is_refused_whole() {
        let sink = Sink::default();
        sink.accept_limit(1);
        assert!(sink.take(batch(r#"{"commands": [{"commandUuid": "a"}]}"#)));
        assert!(!sink.take(batch(r#"{"commands": [{"commandUuid": "b"}]}"#)));
        assert_eq!(sink.counts().posts, 1);
        sink.accept_limit(u64::MAX);
        assert!(sink.take(batch(r#"{"commands": [{"commandUuid": "b"}]}"#)));
    }

    #[test]
    fn a_newer_request_type_is_kept_and_printed_as_it_came() {
        let c: Command<'_> =
            serde_json::from_str(r#"{"commandUuid": "x", "requestType": "Later"}"#).unwrap();
        assert_eq!(c.kind(), None);
        assert_eq!(c.describe(), "Later commandUuid=x");
    }
}
