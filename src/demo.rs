//! `vppd demo`: the whole pipeline in one process on loopback. It starts the
//! Apple simulator, the daemon (through its real config parser, listeners,
//! store and job API) and a stand-in MDM that counts every install command
//! per (app, device), runs one N devices x M apps job, and checks the
//! outcome: every assignment confirmed, every install command released
//! exactly once, and only for licenses Apple actually holds.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use crate::apple::token::SToken;
use crate::config::Config;
use crate::daemon::{Daemon, Listeners};
use crate::http::{self, Body, Server};
use crate::job::JobStatus;
use crate::metrics::Metrics;
use crate::plan::{Rect, Shape, count};
use crate::release::CommandBatch;
use crate::sim::{SimAsset, SimConfig, SimToken, Simulator};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup: {0}")]
    Setup(String),
    #[error("demo: {0}")]
    Run(String),
}

/// Apple's pace in the demo, in assignments per second per token: far
/// above anything Apple is known to sustain, yet finite. An Apple that
/// answers 25,000 assignments in a blink builds a queue in front of the
/// release stage that grows with the job, so the confirmation-to-release
/// latency measured that queue, not vppd; at a steady pace it measures how
/// vppd keeps up. `vppd demo --apple-rate 0` runs Apple at full speed.
pub const APPLE_PACE: f64 = 100_000.0;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    pub apps: usize,
    /// Where the store lives; a fresh temporary directory when `None`.
    pub data_dir: Option<PathBuf>,
    pub progress: bool,
    pub timeout: Duration,
    /// Simulator settings (faults, limits, speed).
    pub sim: SimConfig,
    /// Then move the apps to as many other devices, uninstalling them from
    /// the first ones (a second job: disassociate, associate, uninstall).
    pub reassign: bool,
    /// Then a user-based rollout to this many users (none: 0).
    pub users: usize,
    /// Half way through the job, submit a one-device job with `"priority":
    /// "high"` and report how long it waited (a new student's device during
    /// the back-to-school rollout).
    pub urgent: bool,
    /// `[apple] max_events_in_flight`; the default (2) when `None`.
    pub max_events_in_flight: Option<usize>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        let mut sim = SimConfig::default();
        // Short retry spacing: a failed delivery is retried within the demo.
        sim.notifications.retry_spacing = vec![Duration::from_millis(500), Duration::from_secs(1)];
        sim.assignments_per_second = Some(APPLE_PACE);
        DemoOptions {
            devices: 10_000,
            apps: 25,
            data_dir: None,
            progress: true,
            timeout: Duration::from_secs(600),
            sim,
            reassign: false,
            users: 0,
            urgent: false,
            max_events_in_flight: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DemoReport {
    pub devices: usize,
    pub apps: usize,
    pub requests_made: u64,
    pub requests_minimum: u64,
    pub apple_requests_total: u64,
    pub assignments_expected: u64,
    pub assignments_confirmed: u64,
    pub assignments_failed: u64,
    pub licenses_held_at_apple: u64,
    pub commands_released: u64,
    pub commands_duplicated: u64,
    pub commands_missing: u64,
    pub commands_unlicensed: u64,
    pub notifications_received: u64,
    pub wall: Duration,
    pub peak_rss_mb: Option<u64>,
    pub job_state: String,
    /// Confirmation to MDM acknowledgement, estimated from the histogram.
    pub release_latency_p50: Option<f64>,
    pub release_latency_p99: Option<f64>,
    /// With `--reassign`: the second job.
    pub reassign: Option<ReassignReport>,
    /// With `--users N`: the user-based rollout.
    pub users: Option<crate::demo_users::UsersReport>,
    /// A user rollout was asked for.
    pub users_asked: bool,
    /// With `--urgent`: the small job submitted half way through.
    pub urgent: Option<UrgentReport>,
}

/// The one-device job `vppd demo --urgent` submits half way through the
/// rollout.
#[derive(Debug, Clone)]
pub struct UrgentReport {
    pub job_state: String,
    /// Assignments of the rollout confirmed when it was submitted.
    pub submitted_at_confirmed: u64,
    /// From its submission to its completion (install released).
    pub wait: Duration,
    /// Its install commands the MDM received.
    pub installs_released: u64,
}

/// The device of `--urgent`'s job: not one of the rollout's.
pub const URGENT_SERIAL: &str = "URGENT-0001";

/// The second job of `vppd demo --reassign`: every app moved from the first
/// devices to as many others, with uninstall.
#[derive(Debug, Clone)]
pub struct ReassignReport {
    pub job_state: String,
    pub requests_made: u64,
    pub disassociations_confirmed: u64,
    pub assignments_confirmed: u64,
    /// Distinct `RemoveApplication` commands the MDM received.
    pub removals_released: u64,
    /// `InstallApplication` commands for the new devices.
    pub installs_released: u64,
    /// Licenses still held by the first devices (should be 0).
    pub old_still_licensed: u64,
    /// Released installs for new devices without a license.
    pub new_unlicensed: u64,
}

impl ReassignReport {
    fn ok(&self, expected: u64) -> bool {
        self.job_state == "completed"
            && self.disassociations_confirmed == expected
            && self.assignments_confirmed == expected
            && self.removals_released == expected
            && self.installs_released == expected
            && self.old_still_licensed == 0
            && self.new_unlicensed == 0
    }
}

impl DemoReport {
    pub fn ok(&self) -> bool {
        self.job_state == "completed"
            && self.assignments_confirmed == self.assignments_expected
            && self.commands_released == self.assignments_expected
            && self.commands_duplicated == 0
            && self.commands_missing == 0
            && self.commands_unlicensed == 0
            && self
                .reassign
                .as_ref()
                .is_none_or(|r| r.ok(self.assignments_expected))
            && (!self.users_asked || self.users.as_ref().is_some_and(|u| u.ok()))
            && self
                .urgent
                .as_ref()
                .is_none_or(|u| u.job_state == "completed" && u.installs_released == 1)
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("  {k:<32} {v}\n"));
        s.push_str(&format!(
            "vppd demo: {} devices x {} apps = {} assignments\n",
            self.devices, self.apps, self.assignments_expected
        ));
        line(&mut s, "job state", self.job_state.clone());
        line(
            &mut s,
            "assign requests to Apple",
            format!("{} (minimum {})", self.requests_made, self.requests_minimum),
        );
        line(
            &mut s,
            "all requests to Apple",
            self.apple_requests_total.to_string(),
        );
        line(
            &mut s,
            "assignments confirmed",
            format!(
                "{} of {} ({} failed)",
                self.assignments_confirmed, self.assignments_expected, self.assignments_failed
            ),
        );
        line(
            &mut s,
            "licenses held at Apple",
            self.licenses_held_at_apple.to_string(),
        );
        line(
            &mut s,
            "install commands released",
            format!(
                "{} ({} duplicated, {} missing, {} without a license)",
                self.commands_released,
                self.commands_duplicated,
                self.commands_missing,
                self.commands_unlicensed
            ),
        );
        line(
            &mut s,
            "notifications received",
            self.notifications_received.to_string(),
        );
        line(
            &mut s,
            "wall time",
            format!("{:.2} s", self.wall.as_secs_f64()),
        );
        if let (Some(p50), Some(p99)) = (self.release_latency_p50, self.release_latency_p99) {
            line(
                &mut s,
                "confirmation to release",
                format!("p50 {:.1} ms, p99 {:.1} ms", p50 * 1000.0, p99 * 1000.0),
            );
        }
        if let Some(u) = &self.urgent {
            line(
                &mut s,
                "urgent job (1 device, high)",
                format!(
                    "{} in {:.2} s, submitted at {} of {} confirmed; {} install released",
                    u.job_state,
                    u.wait.as_secs_f64(),
                    u.submitted_at_confirmed,
                    self.assignments_expected,
                    u.installs_released
                ),
            );
        }
        if let Some(r) = &self.reassign {
            line(&mut s, "reassign job state", r.job_state.clone());
            line(
                &mut s,
                "reassign requests to Apple",
                r.requests_made.to_string(),
            );
            line(
                &mut s,
                "licenses moved",
                format!(
                    "{} removed, {} assigned ({} still on old devices)",
                    r.disassociations_confirmed, r.assignments_confirmed, r.old_still_licensed
                ),
            );
            line(
                &mut s,
                "removals released",
                format!("{} RemoveApplication commands", r.removals_released),
            );
            line(
                &mut s,
                "installs on new devices",
                format!(
                    "{} ({} without a license)",
                    r.installs_released, r.new_unlicensed
                ),
            );
        }
        if let Some(u) = &self.users {
            u.render(&mut s);
        }
        if let Some(rss) = self.peak_rss_mb {
            line(&mut s, "peak memory (RSS)", format!("{rss} MB"));
        }
        line(
            &mut s,
            "result",
            if self.ok() {
                "OK".into()
            } else {
                "FAILED".into()
            },
        );
        s
    }
}

/// The demo's stand-in MDM: one counter per (app, device) of the job, so
/// that a million devices x 25 apps cost 25 MB instead of a record per
/// command uuid (the demo's peak memory was mostly this record). Commands
/// are read without copying their strings. A command naming anything
/// outside the job is counted apart, as an error.
pub struct PairSink {
    apps: usize,
    devices: usize,
    counts: Vec<std::sync::atomic::AtomicU8>,
    foreign: std::sync::atomic::AtomicU64,
    /// Every command that is not an install of the first job's pairs
    /// (removals, installs on other devices): few, so kept whole.
    others: Mutex<Vec<(crate::job::RequestType, String, String)>>,
}

/// What the sink reads of a command; the rest of it is skipped.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SeenCommand<'a> {
    /// Absent on an invitation.
    #[serde(borrow, default)]
    adam_id: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    serial_number: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    client_user_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    request_type: crate::job::RequestType,
}

#[derive(serde::Deserialize)]
struct SeenBatch<'a> {
    #[serde(borrow)]
    commands: Vec<SeenCommand<'a>>,
}

impl PairSink {
    pub fn new(apps: usize, devices: usize) -> PairSink {
        PairSink {
            apps,
            devices,
            counts: (0..apps * devices)
                .map(|_| std::sync::atomic::AtomicU8::new(0))
                .collect(),
            foreign: Default::default(),
            others: Mutex::new(Vec::new()),
        }
    }

    /// Commands other than installs of the first job's pairs, in arrival order.
    pub fn others(&self) -> Vec<(crate::job::RequestType, String, String)> {
        self.others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The slot of (app, device) named as [`adam_id`] and [`serial`] name them.
    fn slot(&self, adam_id: &str, serial: &str) -> Option<usize> {
        let app = adam_id.parse::<usize>().ok()?.checked_sub(100_000_001)?;
        let device = serial.strip_prefix("DEMO")?.parse::<usize>().ok()?;
        (app < self.apps && device < self.devices).then_some(app * self.devices + device)
    }

    /// How often each (app, device) got its command: 0, 1, 2 (or more).
    pub fn count(&self, app: usize, device: usize) -> u8 {
        self.counts[app * self.devices + device].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Install commands the sink received for `serial` outside the grid.
    pub fn installs_outside(&self, serial: &str) -> u64 {
        self.others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(kind, _, s)| {
                *kind == crate::job::RequestType::InstallApplication && s == serial
            })
            .count() as u64
    }

    /// Commands for anything outside the job.
    pub fn foreign(&self) -> u64 {
        self.foreign.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl http::Handler for PairSink {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        use std::sync::atomic::Ordering;
        let Ok(body) = http::read_body(req.into_body(), 64 << 20).await else {
            return http::text(StatusCode::BAD_REQUEST, "bad body\n");
        };
        let Ok(batch) = serde_json::from_slice::<SeenBatch<'_>>(&body) else {
            return http::text(StatusCode::BAD_REQUEST, "not a command batch\n");
        };
        for c in batch.commands {
            let install = c.request_type == crate::job::RequestType::InstallApplication;
            let slot = c
                .serial_number
                .as_deref()
                .filter(|_| install)
                .and_then(|serial| self.slot(&c.adam_id, serial));
            if slot.is_none() {
                self.others.lock().unwrap_or_else(|p| p.into_inner()).push((
                    c.request_type,
                    c.adam_id.to_string(),
                    c.serial_number
                        .as_deref()
                        .or(c.client_user_id.as_deref())
                        .unwrap_or_default()
                        .to_string(),
                ));
                if !install || c.client_user_id.is_some() {
                    continue;
                }
            }
            match slot {
                Some(i) => {
                    let _ =
                        self.counts[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            Some(n.saturating_add(1))
                        });
                }
                None => {
                    self.foreign.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        http::text(StatusCode::OK, "ok\n")
    }
}

/// The stand-in MDM: counts every install command by its uuid.
pub struct Sink {
    pub commands: Mutex<HashMap<String, (u32, String, String)>>,
    pub posts: std::sync::atomic::AtomicU64,
    /// Answer this status instead of 200 (to simulate an MDM outage).
    pub fail_with: std::sync::atomic::AtomicU16,
    /// Once this many commands were acknowledged, answer 503 to the rest.
    pub accept_limit: std::sync::atomic::AtomicU64,
    /// `requestType` of each command seen, by uuid.
    pub kinds: Mutex<HashMap<String, crate::job::RequestType>>,
    /// The last POSTs as received, with their signature headers.
    pub signed: Mutex<Vec<SignedPost>>,
    /// `invitationUrl` of each `InviteToProgram` command seen, by uuid.
    pub invitations: Mutex<HashMap<String, String>>,
}

/// (`X-Vppd-Timestamp`, `X-Vppd-Signature`, raw body) of one POST.
pub type SignedPost = (Option<String>, Option<String>, Vec<u8>);

impl Sink {
    /// Distinct commands seen of one request type.
    pub fn count(&self, kind: crate::job::RequestType) -> usize {
        self.kinds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|k| **k == kind)
            .count()
    }
}

impl Default for Sink {
    fn default() -> Self {
        Sink {
            commands: Mutex::new(HashMap::new()),
            posts: Default::default(),
            fail_with: Default::default(),
            accept_limit: std::sync::atomic::AtomicU64::new(u64::MAX),
            kinds: Mutex::new(HashMap::new()),
            signed: Mutex::new(Vec::new()),
            invitations: Mutex::new(HashMap::new()),
        }
    }
}

impl http::Handler for Sink {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let fail = self.fail_with.load(std::sync::atomic::Ordering::SeqCst);
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (ts, sig) = (
            header(crate::signing::TIMESTAMP_HEADER),
            header(crate::signing::SIGNATURE_HEADER),
        );
        let Ok(body) = http::read_body(req.into_body(), 64 << 20).await else {
            return http::text(StatusCode::BAD_REQUEST, "bad body\n");
        };
        {
            // The last few only: enough for tests, bounded for the demo.
            let mut signed = self.signed.lock().unwrap_or_else(|p| p.into_inner());
            if signed.len() >= 64 {
                signed.remove(0);
            }
            signed.push((ts, sig, body.to_vec()));
        }
        if fail != 0 {
            return http::text(
                StatusCode::from_u16(fail).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "down\n",
            );
        }
        let Ok(batch) = serde_json::from_slice::<CommandBatch>(&body) else {
            return http::text(StatusCode::BAD_REQUEST, "not a command batch\n");
        };
        let mut seen = self.commands.lock().unwrap_or_else(|p| p.into_inner());
        let limit = self.accept_limit.load(std::sync::atomic::Ordering::SeqCst);
        if seen.len() as u64 >= limit {
            return http::text(StatusCode::SERVICE_UNAVAILABLE, "down\n");
        }
        self.posts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let mut invitations = self.invitations.lock().unwrap_or_else(|p| p.into_inner());
        for c in batch.commands {
            kinds.insert(c.command_uuid.clone(), c.request_type);
            if let Some(url) = &c.invitation_url {
                invitations.insert(c.command_uuid.clone(), url.clone());
            }
            let target = c.serial_number.or(c.client_user_id).unwrap_or_default();
            seen.entry(c.command_uuid)
                .or_insert((0, c.adam_id, target))
                .0 += 1;
        }
        http::text(StatusCode::OK, "ok\n")
    }
}

/// A loopback listener on a port the system picks, and that port.
async fn bind_loopback(what: &str) -> Result<(tokio::net::TcpListener, u16), DemoError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| DemoError::Setup(format!("{what} listener: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| DemoError::Setup(format!("{what} listener: {e}")))?
        .port();
    Ok((listener, port))
}

pub fn adam_id(i: usize) -> String {
    (100_000_001 + i).to_string()
}

pub fn serial(i: usize) -> String {
    format!("DEMO{i:08}")
}

/// The devices `--reassign` moves the apps to.
pub fn new_serial(i: usize) -> String {
    format!("MOVE{i:08}")
}

pub async fn run(opts: DemoOptions) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let temp = match &opts.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("vppd-demo-")
                .tempdir()
                .map_err(|e| DemoError::Setup(format!("temporary directory: {e}")))?,
        ),
    };
    let dir = match (&opts.data_dir, &temp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => return Err(DemoError::Setup("no data directory".into())),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| DemoError::Setup(format!("{}: {e}", dir.display())))?;

    // Apple's side and the MDM run on a runtime of their own: in real life
    // they are other machines, and sharing the daemon's two worker threads
    // would let the simulator's event processing stall the daemon's tasks.
    let outside = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("demo-outside")
        .enable_all()
        .build()
        .map_err(|e| DemoError::Setup(format!("runtime: {e}")))?;
    let sim_config = opts.sim.clone();
    let sim = outside
        .spawn(async move { Simulator::start(sim_config, "127.0.0.1:0").await })
        .await
        .map_err(|e| DemoError::Setup(format!("simulator: {e}")))?
        .map_err(|e| DemoError::Setup(format!("simulator: {e}")))?;
    let inner_token = format!("demo-{}", uuid::Uuid::new_v4());
    let expires = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let stoken = SToken::encode(&inner_token, expires, "Demo School District");
    let token_file = dir.join("demo.vpptoken");
    std::fs::write(&token_file, &stoken)
        .map_err(|e| DemoError::Setup(format!("token file: {e}")))?;
    sim.add_token(SimToken {
        stoken: stoken.clone(),
        assets: (0..opts.apps)
            .map(|i| {
                // The urgent job's device takes one more license of the first app.
                let extra = (opts.urgent && i == 0) as u32;
                SimAsset::app(
                    &adam_id(i),
                    Some((opts.devices + opts.users) as u32 + extra),
                )
            })
            .collect(),
        read_only: false,
    })
    .map_err(|e| DemoError::Setup(format!("simulator token: {e}")))?;

    let sink = Arc::new(PairSink::new(opts.apps, opts.devices));
    let sink_handler = sink.clone();
    let sink_server = outside
        .spawn(async move { Server::bind("127.0.0.1:0", sink_handler).await })
        .await
        .map_err(|e| DemoError::Setup(format!("MDM sink: {e}")))?
        .map_err(|e| DemoError::Setup(format!("MDM sink: {e}")))?;

    let (notif_listener, notif_port) = bind_loopback("notification").await?;
    let (admin_listener, admin_port) = bind_loopback("admin").await?;
    let config_text = format!(
        r#"
data_dir = "{data}"
[apple]
base_url = "{apple}"
requests_per_second = 15
timeout = "30s"
{max_in_flight}
[[tokens]]
name = "demo"
stoken_file = "{token}"
[notifications]
listen = "127.0.0.1:{notif_port}"
public_url = "http://127.0.0.1:{notif_port}/notifications"
auth_token_file = "{secret}"
[tracking]
status_poll_after = "5s"
status_poll_interval = "2s"
sync_after = "10s"
[admin]
listen = "127.0.0.1:{admin_port}"
[install]
webhook_url = "http://{sink}/installs"
batch_size = 10000
"#,
        data = dir.join("data").display(),
        apple = sim.base_url(),
        token = token_file.display(),
        secret = dir.join("notification-secret").display(),
        sink = sink_server.local_addr(),
        max_in_flight = opts
            .max_events_in_flight
            .map(|n| format!("max_events_in_flight = {n}"))
            .unwrap_or_default(),
    );
    let config = Config::parse(&config_text, &dir.join("demo.toml"))
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    let listeners = Listeners {
        admin: Some(admin_listener),
        notifications: Some(notif_listener),
    };
    let daemon = Daemon::start_on(config, metrics.clone(), listeners)
        .await
        .map_err(|e| DemoError::Setup(format!("daemon: {e}")))?;
    let admin = format!("http://{}", daemon.admin_addr());
    let result = drive(&opts, &admin, &sim, &stoken, &sink, &metrics, started).await;
    daemon.shutdown().await;
    let _ = outside
        .spawn(async move {
            sink_server.shutdown().await;
            sim.shutdown().await;
        })
        .await;
    outside.shutdown_background();
    drop(temp);
    result
}

async fn drive(
    opts: &DemoOptions,
    admin: &str,
    sim: &Simulator,
    stoken: &str,
    sink: &PairSink,
    metrics: &Metrics,
    started: Instant,
) -> Result<DemoReport, DemoError> {
    let http = reqwest::Client::new();
    // Ready: the token is registered with the simulator.
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = http
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ok {
            break;
        }
        if Instant::now() > ready_by {
            return Err(DemoError::Run(
                "the daemon did not become ready within 30 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job = serde_json::json!({
        "id": "demo",
        "token": "demo",
        "assets": (0..opts.apps).map(|i| serde_json::json!({"adamId": adam_id(i), "pricingParam": "STDQ"})).collect::<Vec<_>>(),
        "associate": {"serialNumbers": (0..opts.devices).map(serial).collect::<Vec<_>>()},
        "install": true,
    });
    let resp = http
        .post(format!("{admin}/v1/jobs"))
        .json(&job)
        .send()
        .await
        .map_err(|e| DemoError::Run(format!("submitting the job: {e}")))?;
    if resp.status() != StatusCode::ACCEPTED {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(DemoError::Run(format!("job refused: {status} {body}")));
    }
    let expected = (opts.devices * opts.apps) as u64;
    let deadline = Instant::now() + opts.timeout;
    let mut status: Option<JobStatus> = None;
    // (submitted when, rollout confirmed then, finished in, state)
    let mut urgent: Option<(Instant, u64, Option<Duration>, String)> = None;
    loop {
        if let Ok(r) = http.get(format!("{admin}/v1/jobs/demo")).send().await
            && let Ok(s) = r.json::<JobStatus>().await
        {
            if opts.progress {
                progress_line(&s, expected);
            }
            if opts.urgent && urgent.is_none() && s.assignments.confirmed * 2 >= expected {
                submit_urgent(&http, admin).await?;
                urgent = Some((Instant::now(), s.assignments.confirmed, None, String::new()));
            }
            if let Some((at, _, finished @ None, state)) = &mut urgent
                && let Ok(r) = http.get(format!("{admin}/v1/jobs/urgent")).send().await
                && let Ok(u) = r.json::<JobStatus>().await
                && u.state.is_final()
            {
                *finished = Some(at.elapsed());
                *state = u.state.as_str().to_string();
            }
            let done = s.state.is_final()
                && urgent
                    .as_ref()
                    .is_none_or(|(_, _, finished, _)| finished.is_some());
            status = Some(s);
            if done {
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if opts.progress {
        eprintln!();
    }
    let wall = started.elapsed();
    let status = status.ok_or_else(|| DemoError::Run("no job status".into()))?;

    let requests = sim.requests();
    let requests_made = requests
        .iter()
        .filter(|r| {
            r.method == "POST"
                && (r.path == "/assets/associate" || r.path == "/assets/disassociate")
                && r.status == 200
        })
        .count() as u64;
    let rect = Rect {
        assets: 0..opts.apps as u32,
        serials: 0..opts.devices as u32,
        users: 0..0,
    };
    let requests_minimum = count(&rect, Shape::from(&opts.sim.limits));
    let held = sim.assignment_count(stoken) as u64;
    let mut released = 0u64;
    let mut duplicated = 0u64;
    // Every released command must name a license Apple holds; the urgent
    // job's is checked on its own.
    let urgent_installs = sink.installs_outside(URGENT_SERIAL);
    let mut unlicensed = sink.foreign() - urgent_installs;
    if urgent_installs > 0 && !sim.holds(stoken, &adam_id(0), "STDQ", Some(URGENT_SERIAL), None) {
        unlicensed += urgent_installs;
    }
    let mut holding = vec![false; opts.devices];
    for app in 0..opts.apps {
        holding.iter_mut().for_each(|h| *h = false);
        sim.for_each_serial_holding(stoken, &adam_id(app), "STDQ", |s| {
            if let Some(device) = s.strip_prefix("DEMO").and_then(|d| d.parse::<usize>().ok())
                && device < opts.devices
            {
                holding[device] = true;
            }
        });
        for (device, held) in holding.iter().enumerate() {
            let n = u64::from(sink.count(app, device));
            if n > 0 {
                released += 1;
                duplicated += n - 1;
                if !held {
                    unlicensed += 1;
                }
            }
        }
    }
    let notifications_received = ["accepted", "duplicate"]
        .iter()
        .map(|o| {
            metrics
                .notifications
                .get_metric_with_label_values(&["ASSET_MANAGEMENT", o])
                .map(|c| c.get())
                .unwrap_or(0)
        })
        .sum();
    let reassign = if opts.reassign && status.state.as_str() == "completed" {
        Some(reassign(opts, admin, sim, stoken, sink, deadline).await?)
    } else {
        None
    };
    let users = if opts.users > 0 && status.state.as_str() == "completed" {
        Some(
            crate::demo_users::run(
                opts.users,
                opts.apps,
                admin,
                sim,
                sink,
                opts.progress,
                deadline,
            )
            .await?,
        )
    } else {
        None
    };
    let urgent = urgent.map(|(_, at, finished, state)| UrgentReport {
        job_state: if state.is_empty() {
            "unfinished".into()
        } else {
            state
        },
        submitted_at_confirmed: at,
        wait: finished.unwrap_or_default(),
        installs_released: urgent_installs,
    });
    Ok(DemoReport {
        urgent,
        reassign,
        users,
        users_asked: opts.users > 0,
        devices: opts.devices,
        apps: opts.apps,
        requests_made,
        requests_minimum,
        apple_requests_total: requests.len() as u64,
        assignments_expected: expected,
        assignments_confirmed: status.assignments.confirmed,
        assignments_failed: status.assignments.failed,
        licenses_held_at_apple: held,
        commands_released: released,
        commands_duplicated: duplicated,
        commands_missing: expected.saturating_sub(released),
        commands_unlicensed: unlicensed,
        notifications_received,
        wall,
        peak_rss_mb: peak_rss_mb(),
        job_state: status.state.as_str().to_string(),
        release_latency_p50: histogram_quantile(&metrics.install_release_latency, 0.5),
        release_latency_p99: histogram_quantile(&metrics.install_release_latency, 0.99),
    })
}

/// A quantile of a Prometheus histogram, interpolated inside its bucket
/// (as `histogram_quantile` does).
pub fn histogram_quantile(h: &prometheus::Histogram, q: f64) -> Option<f64> {
    use prometheus::core::Collector;
    let families = h.collect();
    let metric = families.first()?.get_metric().first()?;
    let hist = metric.get_histogram();
    let total = hist.get_sample_count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut prev_bound = 0.0;
    let mut prev_count = 0u64;
    for b in hist.get_bucket() {
        let count = b.cumulative_count();
        if count as f64 >= rank {
            let in_bucket = (count - prev_count).max(1) as f64;
            return Some(
                prev_bound
                    + (b.upper_bound() - prev_bound) * ((rank - prev_count as f64) / in_bucket),
            );
        }
        prev_bound = b.upper_bound();
        prev_count = count;
    }
    Some(prev_bound)
}

/// One line of progress on stderr, redrawn in place.
pub fn progress_line(s: &JobStatus, expected: u64) {
    let total = expected.max(1);
    let done = s.assignments.confirmed + s.assignments.failed;
    let width = 30;
    let filled = (done * width / total).min(width) as usize;
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r[{}{}] {:>3}%  {} confirmed, {} failed, {} installs released, requests {}/{}  ",
        "#".repeat(filled),
        "-".repeat(width as usize - filled),
        done * 100 / total,
        s.assignments.confirmed,
        s.assignments.failed,
        s.installs.released,
        s.requests.submitted,
        s.requests.planned,
    );
    let _ = err.flush();
}

/// Peak resident memory of this process (Linux), in MB.
pub fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// The one-device, high-priority job of `--urgent`.
async fn submit_urgent(http: &reqwest::Client, admin: &str) -> Result<(), DemoError> {
    let job = serde_json::json!({
        "id": "urgent",
        "token": "demo",
        "assets": [{"adamId": adam_id(0), "pricingParam": "STDQ"}],
        "associate": {"serialNumbers": [URGENT_SERIAL]},
        "priority": "high",
    });
    let resp = http
        .post(format!("{admin}/v1/jobs"))
        .json(&job)
        .send()
        .await
        .map_err(|e| DemoError::Run(format!("submitting the urgent job: {e}")))?;
    if resp.status() != StatusCode::ACCEPTED {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(DemoError::Run(format!(
            "urgent job refused: {status} {body}"
        )));
    }
    Ok(())
}

/// The second job of `--reassign`: moves every app from the first devices to
/// as many new ones, uninstalling from the first. The licenses are exactly
/// enough only because the disassociations free them (the license check
/// counts that).
async fn reassign(
    opts: &DemoOptions,
    admin: &str,
    sim: &Simulator,
    stoken: &str,
    sink: &PairSink,
    deadline: Instant,
) -> Result<ReassignReport, DemoError> {
    let http = reqwest::Client::new();
    let before = sim.requests().len();
    let job = serde_json::json!({
        "id": "reassign",
        "token": "demo",
        "assets": (0..opts.apps).map(|i| serde_json::json!({"adamId": adam_id(i), "pricingParam": "STDQ"})).collect::<Vec<_>>(),
        "disassociate": {"serialNumbers": (0..opts.devices).map(serial).collect::<Vec<_>>()},
        "associate": {"serialNumbers": (0..opts.devices).map(new_serial).collect::<Vec<_>>()},
        "install": true,
        "uninstall": true,
    });
    let resp = http
        .post(format!("{admin}/v1/jobs"))
        .json(&job)
        .send()
        .await
        .map_err(|e| DemoError::Run(format!("submitting the reassign job: {e}")))?;
    if resp.status() != StatusCode::ACCEPTED {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(DemoError::Run(format!(
            "reassign job refused: {status} {body}"
        )));
    }
    let expected = (opts.devices * opts.apps) as u64;
    let mut status: Option<JobStatus> = None;
    loop {
        if let Ok(r) = http.get(format!("{admin}/v1/jobs/reassign")).send().await
            && let Ok(s) = r.json::<JobStatus>().await
        {
            if opts.progress {
                progress_line(&s, expected);
            }
            let done = s.state.is_final();
            status = Some(s);
            if done {
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if opts.progress {
        eprintln!();
    }
    let status = status.ok_or_else(|| DemoError::Run("no reassign job status".into()))?;
    let requests_made = sim.requests()[before.min(sim.requests().len())..]
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/assets/") && r.status == 200)
        .count() as u64;
    let mut removals = 0;
    let mut installs = 0;
    let mut new_unlicensed = 0;
    for (kind, adam, target) in sink.others() {
        match kind {
            crate::job::RequestType::RemoveApplication => removals += 1,
            crate::job::RequestType::InstallApplication if target.starts_with("MOVE") => {
                installs += 1;
                if !sim.holds(stoken, &adam, "STDQ", Some(&target), None) {
                    new_unlicensed += 1;
                }
            }
            _ => {}
        }
    }
    let old_still_licensed = sim
        .assignments(stoken)
        .iter()
        .filter(|a| {
            a.serial_number
                .as_deref()
                .is_some_and(|s| s.starts_with("DEMO"))
        })
        .count() as u64;
    Ok(ReassignReport {
        job_state: status.state.as_str().to_string(),
        requests_made,
        disassociations_confirmed: status.disassociations.confirmed,
        assignments_confirmed: status.assignments.confirmed,
        removals_released: removals,
        installs_released: installs,
        old_still_licensed,
        new_unlicensed,
    })
}
