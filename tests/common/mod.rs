//! Helpers shared by the integration tests: a simulator with one token, a
//! stand-in MDM, a config for the daemon, and waiting for jobs. Everything
//! runs for real on loopback: HTTP, sled on disk, the daemon's listeners.

#![allow(dead_code)]

pub mod pg;
pub mod signal;

#[allow(unused_imports)]
pub use signal::{Signal, signal};

use std::sync::Arc;
use std::time::{Duration, Instant};

use vppd::apple::token::SToken;
use vppd::daemon::{Daemon, Listeners};
use vppd::domain::job::JobStatus;
use vppd::runtime::config::Config;
use vppd::runtime::http::Server;
use vppd::runtime::metrics::Metrics;
use vppd::sim::{SimAsset, SimConfig, SimToken, Simulator};

pub use vppd::cli::sink::Sink;

pub fn adam(i: usize) -> String {
    (200_000_001 + i).to_string()
}

pub fn serials(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:06}")).collect()
}

/// A simulator with one token and its assets, and a stand-in MDM.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub sim: Simulator,
    pub stoken: String,
    pub token_file: std::path::PathBuf,
    pub sink: Arc<Sink>,
    pub sink_server: Option<Server>,
    /// Bound once on port 0 and kept for the test's life, so that a
    /// restarted daemon serves the same addresses (Apple's simulator knows
    /// the notification URL) and no other process can take them meanwhile.
    pub admin_listener: std::net::TcpListener,
    pub notif_listener: std::net::TcpListener,
    pub notif_port: u16,
    pub admin_port: u16,
}

/// Tracking intervals short enough for tests to exercise the fallbacks.
pub struct Tracking {
    pub poll_after: &'static str,
    pub poll_interval: &'static str,
    pub sync_after: &'static str,
}

pub const FAST_TRACKING: Tracking = Tracking {
    poll_after: "1s",
    poll_interval: "500ms",
    sync_after: "2s",
};

/// Notifications do the work; the fallback still catches one lost under load.
pub const PATIENT_TRACKING: Tracking = Tracking {
    poll_after: "3s",
    poll_interval: "1s",
    sync_after: "5s",
};

impl Env {
    pub async fn new(sim_config: SimConfig, assets: Vec<SimAsset>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let sim = Simulator::start(sim_config, "127.0.0.1:0").await.unwrap();
        let stoken = SToken::encode(
            &format!("test-{}", uuid::Uuid::new_v4()),
            time::OffsetDateTime::now_utc() + time::Duration::days(300),
            "Test District",
        );
        let token_file = dir.path().join("main.vpptoken");
        std::fs::write(&token_file, &stoken).unwrap();
        sim.add_token(SimToken {
            stoken: stoken.clone(),
            assets,
            read_only: false,
        })
        .unwrap();
        let sink = Arc::new(Sink::default());
        let sink_server = Server::bind("127.0.0.1:0", sink.clone()).await.unwrap();
        let admin_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let notif_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Env {
            dir,
            sim,
            stoken,
            token_file,
            sink,
            sink_server: Some(sink_server),
            notif_port: notif_listener.local_addr().unwrap().port(),
            admin_port: admin_listener.local_addr().unwrap().port(),
            admin_listener,
            notif_listener,
        }
    }

    /// The two listeners, for a daemon started in this process: each start
    /// gets its own handle on the same sockets.
    pub fn listeners(&self) -> Listeners {
        let handle = |l: &std::net::TcpListener| {
            let l = l.try_clone().unwrap();
            l.set_nonblocking(true).unwrap();
            tokio::net::TcpListener::from_std(l).unwrap()
        };
        Listeners {
            admin: Some(handle(&self.admin_listener)),
            notifications: Some(handle(&self.notif_listener)),
        }
    }

    /// Starts the daemon on `config`, on this environment's listeners.
    pub async fn start_daemon_on(&self, config: Config) -> Daemon {
        Daemon::start_on(config, Arc::new(Metrics::new()), self.listeners())
            .await
            .unwrap()
    }

    /// `vppd run --config FILE` as a child process, handed this
    /// environment's listeners by socket activation.
    pub fn vppd_run(&self, config: &std::path::Path) -> std::process::Command {
        self.vppd_run_after("", config)
    }

    /// Writes this environment's config (fast tracking) and starts `vppd
    /// run` on it, output discarded; returns once it is ready.
    pub async fn spawn_quiet(&self) -> (std::path::PathBuf, std::process::Child) {
        let config = self.dir.path().join("vppd.toml");
        std::fs::write(&config, self.config_text(&FAST_TRACKING, "")).unwrap();
        let child = self
            .vppd_run(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_ready(&self.admin()).await;
        (config, child)
    }

    /// `vppd_run`, with shell commands run first in the process that then
    /// becomes vppd (`ulimit -n 64; ` for instance).
    pub fn vppd_run_after(&self, shell: &str, config: &std::path::Path) -> std::process::Command {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fds = [
            self.admin_listener.as_raw_fd(),
            self.notif_listener.as_raw_fd(),
        ];
        // `$$` is the shell's pid, which `exec` keeps: LISTEN_PID must name
        // the process that takes the descriptors.
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{shell}LISTEN_PID=$$ exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_vppd"))
            .args(["run", "--config"])
            .arg(config)
            .env("LISTEN_FDS", fds.len().to_string())
            .env_remove("LISTEN_PID");
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and
        // exec. Moving each descriptor out of the way first keeps one that
        // already sits at 3 or 4 from being overwritten by the other.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0; 2];
                for (i, fd) in fds.iter().enumerate() {
                    high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, fd) in high.iter().enumerate() {
                    // dup2 leaves the copy open across exec.
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    pub fn notifications_url(&self) -> String {
        format!("http://127.0.0.1:{}/notifications", self.notif_port)
    }

    pub fn secret_file(&self) -> std::path::PathBuf {
        self.dir.path().join("notification-secret")
    }

    pub fn secret(&self) -> String {
        std::fs::read_to_string(self.secret_file())
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn config_text(&self, tracking: &Tracking, extra_admin: &str) -> String {
        format!(
            r#"
data_dir = "{data}"
[apple]
base_url = "{apple}"
requests_per_second = 50
timeout = "5s"
[[tokens]]
name = "main"
stoken_file = "{token}"
[notifications]
listen = "127.0.0.1:{notif}"
public_url = "http://127.0.0.1:{notif}/notifications"
auth_token_file = "{secret}"
[tracking]
status_poll_after = "{pa}"
status_poll_interval = "{pi}"
sync_after = "{sa}"
[admin]
listen = "127.0.0.1:{admin}"
drain_timeout = "5s"
{extra_admin}
[install]
webhook_url = "http://{sink}/installs"
batch_size = 25
timeout = "5s"
"#,
            data = self.dir.path().join("data").display(),
            apple = self.sim.base_url(),
            token = self.token_file.display(),
            notif = self.notif_port,
            secret = self.secret_file().display(),
            pa = tracking.poll_after,
            pi = tracking.poll_interval,
            sa = tracking.sync_after,
            admin = self.admin_port,
            sink = self.sink_server.as_ref().unwrap().local_addr(),
        )
    }

    pub fn config(&self, tracking: &Tracking) -> Config {
        let path = self.dir.path().join("vppd.toml");
        let text = self.config_text(tracking, "");
        std::fs::write(&path, &text).unwrap();
        Config::parse(&text, &path).unwrap()
    }

    pub async fn start_daemon(&self, tracking: &Tracking) -> (Daemon, Arc<Metrics>) {
        self.start_daemon_with(tracking, "").await
    }

    /// With extra lines in the `[admin]` section.
    pub async fn start_daemon_with(
        &self,
        tracking: &Tracking,
        extra_admin: &str,
    ) -> (Daemon, Arc<Metrics>) {
        let path = self.dir.path().join("vppd.toml");
        let text = self.config_text(tracking, extra_admin);
        std::fs::write(&path, &text).unwrap();
        let config = Config::parse(&text, &path).unwrap();
        let metrics = Arc::new(Metrics::new());
        let daemon = Daemon::start_on(config, metrics.clone(), self.listeners())
            .await
            .unwrap();
        wait_ready(&self.admin()).await;
        (daemon, metrics)
    }

    /// The location's uId, as Apple (the simulator) reports it: what
    /// notifications for it carry.
    pub async fn uid(&self) -> String {
        let cc: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/client/config", self.sim.base_url()))
            .bearer_auth(&self.stoken)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        cc["uId"].as_str().unwrap().to_string()
    }

    /// Commands the MDM received, by uuid: (deliveries, adamId, target).
    pub fn commands(&self) -> std::collections::HashMap<String, (u32, String, String)> {
        self.sink.commands()
    }

    /// (adamId, serial or user) pairs Apple holds now.
    pub fn held(&self) -> std::collections::HashSet<(String, String)> {
        self.sim
            .assignments(&self.stoken)
            .into_iter()
            .map(|a| (a.adam_id, a.serial_number.or(a.client_user_id).unwrap()))
            .collect()
    }
}

pub async fn wait_ready(admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{admin}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "daemon not ready in 30 s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until token `name` is in `state`; its token document.
pub async fn wait_token(admin: &str, name: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let http = reqwest::Client::new();
    let mut last = serde_json::Value::Null;
    loop {
        if let Ok(r) = http.get(format!("{admin}/v1/tokens/{name}")).send().await
            && r.status().is_success()
            && let Ok(doc) = r.json::<serde_json::Value>().await
        {
            if doc["state"] == state {
                return doc;
            }
            last = doc;
        }
        assert!(
            Instant::now() < deadline,
            "token {name} not {state} in 30 s: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn post_job(admin: &str, job: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{admin}/v1/jobs"))
        .json(job)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

pub async fn job_status(admin: &str, id: &str) -> Option<JobStatus> {
    let r = reqwest::Client::new()
        .get(format!("{admin}/v1/jobs/{id}"))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// Waits until the job reaches a final state.
pub async fn wait_job(admin: &str, id: &str, timeout: Duration) -> JobStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = job_status(admin, id).await {
            if s.state.is_final() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} not finished in {timeout:?}: {s:?}"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "job {id} not found in {timeout:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn job(id: &str, assets: &[String], dis: &[String], assoc: &[String]) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "token": "main",
        "assets": assets.iter().map(|a| serde_json::json!({"adamId": a, "pricingParam": "STDQ"})).collect::<Vec<_>>(),
        "disassociate": {"serialNumbers": dis},
        "associate": {"serialNumbers": assoc},
    })
}

/// Small limits so that small jobs still need several requests.
pub fn small_limits() -> vppd::apple::types::Limits {
    vppd::apple::types::Limits {
        max_assets: 3,
        max_serial_numbers: 7,
        max_client_user_ids: 5,
        ..Default::default()
    }
}

pub fn sim_config(limits: vppd::apple::types::Limits) -> SimConfig {
    let mut c = SimConfig {
        limits,
        ..Default::default()
    };
    c.notifications.retry_spacing = vec![Duration::from_millis(200), Duration::from_millis(400)];
    c
}
