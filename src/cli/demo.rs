//! `vppd demo`: the whole pipeline in one process on loopback. It starts the
//! Apple simulator, the daemon (through its real config parser, listeners,
//! store and job API) and a stand-in MDM that counts every install command
//! per (app, device), runs one N devices x M apps job, and checks the
//! outcome: every assignment confirmed, every install command released
//! exactly once, and only for licenses Apple actually holds.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::apple::token::SToken;
use crate::cli::sink::{Grid, Sink, SinkOptions};
use crate::daemon::{Daemon, Listeners};
use crate::domain::job::{JobStatus, RequestType};
use crate::domain::plan::{Rect, Shape, count};
use crate::runtime::config::Config;
use crate::runtime::http::Server;
use crate::runtime::metrics::Metrics;
use crate::sim::{SimAsset, SimConfig, SimToken, Simulator};

/// How the demo names its apps and devices (the stand-in MDM's grid reads
/// them back).
pub use crate::cli::sink::{adam_id, serial};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup: {0}")]
    Setup(String),
    #[error("demo: {0}")]
    Run(String),
    #[error(transparent)]
    Users(#[from] crate::cli::demo_users::UsersError),
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
    pub users: Option<crate::cli::demo_users::UsersReport>,
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

/// One line of the summary: a label and its value.
fn line(s: &mut String, k: &str, v: String) {
    s.push_str(&format!("  {k:<32} {v}\n"));
}

impl UrgentReport {
    fn render(&self, s: &mut String, rollout: u64) {
        line(
            s,
            "urgent job (1 device, high)",
            format!(
                "{} in {:.2} s, submitted at {} of {} confirmed; {} install released",
                self.job_state,
                self.wait.as_secs_f64(),
                self.submitted_at_confirmed,
                rollout,
                self.installs_released
            ),
        );
    }
}

impl ReassignReport {
    fn render(&self, s: &mut String) {
        line(s, "reassign job state", self.job_state.clone());
        line(
            s,
            "reassign requests to Apple",
            self.requests_made.to_string(),
        );
        line(
            s,
            "licenses moved",
            format!(
                "{} removed, {} assigned ({} still on old devices)",
                self.disassociations_confirmed, self.assignments_confirmed, self.old_still_licensed
            ),
        );
        line(
            s,
            "removals released",
            format!("{} RemoveApplication commands", self.removals_released),
        );
        line(
            s,
            "installs on new devices",
            format!(
                "{} ({} without a license)",
                self.installs_released, self.new_unlicensed
            ),
        );
    }

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
            u.render(&mut s, self.assignments_expected);
        }
        if let Some(r) = &self.reassign {
            r.render(&mut s);
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

/// The devices `--reassign` moves the apps to.
pub fn new_serial(i: usize) -> String {
    format!("MOVE{i:08}")
}

/// The demo's data directory: `opts.data_dir`, or a fresh temporary one
/// (removed when the returned guard is dropped).
fn data_dir(opts: &DemoOptions) -> Result<(PathBuf, Option<tempfile::TempDir>), DemoError> {
    let (dir, temp) = match &opts.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("vppd-demo-")
                .tempdir()
                .map_err(|e| DemoError::Setup(format!("temporary directory: {e}")))?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| DemoError::Setup(format!("{}: {e}", dir.display())))?;
    Ok((dir, temp))
}

/// Apple's side: the simulator on `outside`, with the demo's token and as
/// many licenses of each app as the demo needs; the sToken is written to
/// `token_file`.
async fn start_apple(
    opts: &DemoOptions,
    outside: &tokio::runtime::Runtime,
    token_file: &std::path::Path,
) -> Result<(Simulator, String), DemoError> {
    let sim_config = opts.sim.clone();
    let sim = outside
        .spawn(async move { Simulator::start(sim_config, "127.0.0.1:0").await })
        .await
        .map_err(|e| DemoError::Setup(format!("simulator: {e}")))?
        .map_err(|e| DemoError::Setup(format!("simulator: {e}")))?;
    let inner_token = format!("demo-{}", uuid::Uuid::new_v4());
    let expires = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let stoken = SToken::encode(&inner_token, expires, "Demo School District");
    std::fs::write(token_file, &stoken)
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
    Ok((sim, stoken))
}

/// The daemon's configuration file for the demo.
fn config_text(
    opts: &DemoOptions,
    dir: &std::path::Path,
    apple: &str,
    token_file: &std::path::Path,
    sink: std::net::SocketAddr,
    (notif_port, admin_port): (u16, u16),
) -> String {
    format!(
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
        token = token_file.display(),
        secret = dir.join("notification-secret").display(),
        max_in_flight = opts
            .max_events_in_flight
            .map(|n| format!("max_events_in_flight = {n}"))
            .unwrap_or_default(),
    )
}

pub async fn run(opts: DemoOptions) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let (dir, temp) = data_dir(&opts)?;
    // Apple's side and the MDM run on a runtime of their own: in real life
    // they are other machines, and sharing the daemon's two worker threads
    // would let the simulator's event processing stall the daemon's tasks.
    let outside = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("demo-outside")
        .enable_all()
        .build()
        .map_err(|e| DemoError::Setup(format!("runtime: {e}")))?;
    let token_file = dir.join("demo.vpptoken");
    let (sim, stoken) = start_apple(&opts, &outside, &token_file).await?;
    let sink = Arc::new(Sink::new(SinkOptions {
        grid: Some(Grid::new(opts.apps, opts.devices)),
        ..SinkOptions::default()
    }));
    let sink_handler = sink.clone();
    let sink_server = outside
        .spawn(async move { Server::bind("127.0.0.1:0", sink_handler).await })
        .await
        .map_err(|e| DemoError::Setup(format!("MDM sink: {e}")))?
        .map_err(|e| DemoError::Setup(format!("MDM sink: {e}")))?;

    let (notif_listener, notif_port) = bind_loopback("notification").await?;
    let (admin_listener, admin_port) = bind_loopback("admin").await?;
    let text = config_text(
        &opts,
        &dir,
        &sim.base_url(),
        &token_file,
        sink_server.local_addr(),
        (notif_port, admin_port),
    );
    let config = Config::parse(&text, &dir.join("demo.toml"))
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

/// Waits until the daemon is ready (its token registered with Apple).
async fn wait_ready(http: &reqwest::Client, admin: &str) -> Result<(), DemoError> {
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = http
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > ready_by {
            return Err(DemoError::Run(
                "the daemon did not become ready within 30 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits `job`; `name` ("job", "urgent job") names it in errors.
async fn submit_job(
    http: &reqwest::Client,
    admin: &str,
    job: &serde_json::Value,
    name: &str,
) -> Result<(), DemoError> {
    let resp = http
        .post(format!("{admin}/v1/jobs"))
        .json(job)
        .send()
        .await
        .map_err(|e| DemoError::Run(format!("submitting the {name}: {e}")))?;
    if resp.status() != StatusCode::ACCEPTED {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(DemoError::Run(format!("{name} refused: {status} {body}")));
    }
    Ok(())
}

/// The demo's assets, as a job names them.
fn assets(apps: usize) -> Vec<serde_json::Value> {
    (0..apps)
        .map(|i| serde_json::json!({"adamId": adam_id(i), "pricingParam": "STDQ"}))
        .collect()
}

/// `--urgent`'s job as the rollout is followed: submitted once half of the
/// rollout is confirmed, then followed until it is final.
#[derive(Default)]
struct Urgent {
    /// When it was submitted, and the rollout's confirmed assignments then.
    submitted: Option<(Instant, u64)>,
    /// From submission to its final state, and that state.
    finished: Option<(Duration, String)>,
}

impl Urgent {
    /// One look at the rollout's status `s`.
    async fn step(
        &mut self,
        http: &reqwest::Client,
        admin: &str,
        s: &JobStatus,
        expected: u64,
    ) -> Result<(), DemoError> {
        if self.submitted.is_none() && s.assignments.confirmed * 2 >= expected {
            submit_urgent(http, admin).await?;
            self.submitted = Some((Instant::now(), s.assignments.confirmed));
        }
        if let (Some((at, _)), None) = (self.submitted, &self.finished)
            && let Ok(r) = http.get(format!("{admin}/v1/jobs/urgent")).send().await
            && let Ok(u) = r.json::<JobStatus>().await
            && u.state.is_final()
        {
            self.finished = Some((at.elapsed(), u.state.as_str().to_string()));
        }
        Ok(())
    }

    fn report(&self, installs_released: u64) -> Option<UrgentReport> {
        let (_, at) = self.submitted?;
        let (wait, job_state) = match &self.finished {
            Some((wait, state)) => (*wait, state.clone()),
            None => (Duration::ZERO, "unfinished".to_string()),
        };
        Some(UrgentReport {
            job_state,
            submitted_at_confirmed: at,
            wait,
            installs_released,
        })
    }
}

/// Follows job `id` until it is final (and `urgent`'s job, when given and
/// submitted) or the deadline passes; its last status.
async fn follow(
    http: &reqwest::Client,
    admin: &str,
    id: &str,
    (expected, progress, deadline): (u64, bool, Instant),
    mut urgent: Option<&mut Urgent>,
) -> Result<Option<JobStatus>, DemoError> {
    let mut status = None;
    loop {
        if let Ok(r) = http.get(format!("{admin}/v1/jobs/{id}")).send().await
            && let Ok(s) = r.json::<JobStatus>().await
        {
            if progress {
                progress_line(&s, expected);
            }
            if let Some(u) = urgent.as_deref_mut() {
                u.step(http, admin, &s, expected).await?;
            }
            let done = s.state.is_final()
                && urgent
                    .as_deref()
                    .is_none_or(|u| u.submitted.is_none() || u.finished.is_some());
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
    if progress {
        eprintln!();
    }
    Ok(status)
}

/// What the MDM received of the rollout, checked against what Apple holds.
struct Tally {
    released: u64,
    duplicated: u64,
    unlicensed: u64,
    /// Installs for the urgent job's device.
    urgent_installs: u64,
}

/// Counts the rollout's installs: every released command must name a
/// license Apple holds; the urgent job's is checked on its own.
fn tally(opts: &DemoOptions, sim: &Simulator, stoken: &str, sink: &Sink) -> Tally {
    let others = sink.received();
    let installs = |target: Option<&str>| -> u64 {
        others
            .iter()
            .filter(|r| r.is(RequestType::InstallApplication))
            .filter(|r| r.client_user_id.is_none())
            .filter(|r| target.is_none_or(|t| r.target() == t))
            .map(|r| u64::from(r.times))
            .sum()
    };
    let urgent_installs = installs(Some(URGENT_SERIAL));
    // Installs the grid did not count are for devices outside the job.
    let mut unlicensed = installs(None) - urgent_installs;
    if urgent_installs > 0 && !sim.holds(stoken, &adam_id(0), "STDQ", Some(URGENT_SERIAL), None) {
        unlicensed += urgent_installs;
    }
    let (mut released, mut duplicated) = (0, 0);
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
            let n = u64::from(sink.grid_count(app, device));
            if n > 0 {
                released += 1;
                duplicated += n - 1;
                if !held {
                    unlicensed += 1;
                }
            }
        }
    }
    Tally {
        released,
        duplicated,
        unlicensed,
        urgent_installs,
    }
}

/// Apple's notifications the daemon took (new and repeated).
fn notifications_received(metrics: &Metrics) -> u64 {
    ["accepted", "duplicate"]
        .iter()
        .map(|o| {
            metrics
                .notifications
                .get_metric_with_label_values(&["ASSET_MANAGEMENT", o])
                .map(|c| c.get())
                .unwrap_or(0)
        })
        .sum()
}

/// Assign and disassociate requests Apple answered, and the fewest that
/// the rollout could have taken.
fn requests(opts: &DemoOptions, sim: &Simulator) -> (u64, u64) {
    let made = sim
        .requests()
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
    (made, count(&rect, Shape::from(&opts.sim.limits)))
}

/// The rollout, then `--reassign`'s and `--users`' jobs once it completed.
async fn drive(
    opts: &DemoOptions,
    admin: &str,
    sim: &Simulator,
    stoken: &str,
    sink: &Sink,
    metrics: &Metrics,
    started: Instant,
) -> Result<DemoReport, DemoError> {
    let http = reqwest::Client::new();
    wait_ready(&http, admin).await?;
    let job = serde_json::json!({
        "id": "demo",
        "token": "demo",
        "assets": assets(opts.apps),
        "associate": {"serialNumbers": (0..opts.devices).map(serial).collect::<Vec<_>>()},
        "install": true,
    });
    submit_job(&http, admin, &job, "job").await?;
    let expected = (opts.devices * opts.apps) as u64;
    let deadline = Instant::now() + opts.timeout;
    let mut urgent = opts.urgent.then(Urgent::default);
    let watch = (expected, opts.progress, deadline);
    let status = follow(&http, admin, "demo", watch, urgent.as_mut()).await?;
    let wall = started.elapsed();
    let status = status.ok_or_else(|| DemoError::Run("no job status".into()))?;
    let (requests_made, requests_minimum) = requests(opts, sim);
    let tally = tally(opts, sim, stoken, sink);
    // Taken before the jobs that follow add their own.
    let apple_requests_total = sim.requests().len() as u64;
    let licenses_held_at_apple = sim.assignment_count(stoken) as u64;
    let notifications_received = notifications_received(metrics);
    let completed = status.state.as_str() == "completed";
    let reassign = match opts.reassign && completed {
        true => Some(reassign(opts, admin, sim, stoken, sink, deadline).await?),
        false => None,
    };
    let users = match opts.users > 0 && completed {
        true => Some(
            crate::cli::demo_users::run(
                opts.users,
                opts.apps,
                admin,
                sim,
                sink,
                opts.progress,
                deadline,
            )
            .await?,
        ),
        false => None,
    };
    Ok(DemoReport {
        urgent: urgent.and_then(|u| u.report(tally.urgent_installs)),
        reassign,
        users,
        users_asked: opts.users > 0,
        devices: opts.devices,
        apps: opts.apps,
        requests_made,
        requests_minimum,
        apple_requests_total,
        assignments_expected: expected,
        assignments_confirmed: status.assignments.confirmed,
        assignments_failed: status.assignments.failed,
        licenses_held_at_apple,
        commands_released: tally.released,
        commands_duplicated: tally.duplicated,
        commands_missing: expected.saturating_sub(tally.released),
        commands_unlicensed: tally.unlicensed,
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
    submit_job(http, admin, &job, "urgent job").await
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
    sink: &Sink,
    deadline: Instant,
) -> Result<ReassignReport, DemoError> {
    let http = reqwest::Client::new();
    let before = sim.requests().len();
    let job = serde_json::json!({
        "id": "reassign",
        "token": "demo",
        "assets": assets(opts.apps),
        "disassociate": {"serialNumbers": (0..opts.devices).map(serial).collect::<Vec<_>>()},
        "associate": {"serialNumbers": (0..opts.devices).map(new_serial).collect::<Vec<_>>()},
        "install": true,
        "uninstall": true,
    });
    submit_job(&http, admin, &job, "reassign job").await?;
    let expected = (opts.devices * opts.apps) as u64;
    let watch = (expected, opts.progress, deadline);
    let status = follow(&http, admin, "reassign", watch, None)
        .await?
        .ok_or_else(|| DemoError::Run("no reassign job status".into()))?;
    let requests_made = sim.requests()[before.min(sim.requests().len())..]
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/assets/") && r.status == 200)
        .count() as u64;
    let (mut removals, mut installs, mut new_unlicensed) = (0, 0, 0);
    for r in sink.received() {
        let times = u64::from(r.times);
        match r.kind {
            Some(RequestType::RemoveApplication) => removals += times,
            Some(RequestType::InstallApplication) if r.target().starts_with("MOVE") => {
                installs += times;
                if !sim.holds(stoken, &r.adam_id, "STDQ", Some(r.target()), None) {
                    new_unlicensed += times;
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
