//! Wires every stage together for `vppd run` (and the demo): opens the
//! store, builds one Apple client per token, starts both listeners and the
//! long-running tasks, registers each token with Apple, and drains on
//! shutdown.
//!
//! Startup order matters: the notification listener is up before client
//! config is posted, because Apple sends a TEST_NOTIFICATION first and
//! refuses the config if it cannot be delivered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::apple::types::{ClientConfigRequest, MdmInfo, error_number, notification_type};
use crate::apple::{Client, ClientOptions};
use crate::config::{Config, ConfigError};
use crate::context::Context;
use crate::http::Server;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {what} address {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("token `{token}`: {message}")]
    Client { token: String, message: String },
}

/// How often service config (the dynamic limits) is re-read.
const LIMITS_REFRESH: Duration = Duration::from_secs(300);

pub struct Daemon {
    ctx: Arc<Context>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    servers: Vec<Server>,
    admin_addr: SocketAddr,
    notifications_addr: SocketAddr,
    drain_timeout: Duration,
    data_dir: std::path::PathBuf,
}

impl Daemon {
    pub async fn start(config: Config, metrics: Arc<Metrics>) -> Result<Daemon, DaemonError> {
        let tokens = config.check_files()?;
        let secret = config.notification_secret()?;
        let admin_token = config.admin_token()?;
        let store = crate::store::open(&config.data_dir, config.accept_store_loss).await?;
        if !config.notifications.public_url.starts_with("https://") {
            tracing::warn!(public_url = %config.notifications.public_url, "notifications.public_url is not https://; Apple requires HTTPS, so a TLS reverse proxy must front it");
        }
        let mut clients = HashMap::new();
        for (name, stoken) in tokens {
            let days_left = (stoken.expires_at() - time::OffsetDateTime::now_utc()).whole_days();
            if days_left < 0 {
                tracing::error!(token = %name, "sToken has expired; download a new one from Apple School/Business Manager");
            } else if days_left < 15 {
                tracing::warn!(token = %name, days_left, "sToken expires soon");
            }
            let opts = ClientOptions::new(
                &config.apple.base_url,
                &name,
                config.apple.requests_per_second,
                config.apple.timeout,
            );
            let client =
                Client::new(opts, stoken, metrics.clone()).map_err(|e| DaemonError::Client {
                    token: name.clone(),
                    message: e.to_string(),
                })?;
            clients.insert(name, client);
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let ctx = Arc::new(Context::new(
            store,
            metrics,
            clients,
            config.tracking.clone(),
            config.install.clone(),
            shutdown_rx,
        ));

        let listener = Arc::new(crate::listen::Listener::new(
            ctx.clone(),
            secret.clone(),
            config.notifications.max_body_bytes,
        ));
        let notifications = Server::bind(&config.notifications.listen, listener)
            .await
            .map_err(|source| DaemonError::Listen {
                what: "notifications.listen",
                addr: config.notifications.listen.clone(),
                source,
            })?;
        let admin = Arc::new(crate::admin::Admin::new(
            ctx.clone(),
            admin_token,
            config.admin.max_body_bytes,
            config.admin.max_job_targets,
        ));
        let admin_server = Server::bind(&config.admin.listen, admin)
            .await
            .map_err(|source| DaemonError::Listen {
                what: "admin.listen",
                addr: config.admin.listen.clone(),
                source,
            })?;
        let admin_addr = admin_server.local_addr();
        let notifications_addr = notifications.local_addr();
        tracing::info!(admin = %admin_addr, notifications = %notifications_addr, "listening");

        let mut tasks = JoinSet::new();
        tasks.spawn(crate::track::run_applier(ctx.clone()));
        tasks.spawn(crate::release::run(ctx.clone()));
        let mdm_id = config.apple.mdm_id.clone().unwrap_or_else(|| {
            uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                config.notifications.public_url.as_bytes(),
            )
            .to_string()
        });
        for token in &config.tokens {
            let registration = Registration {
                token: token.name.clone(),
                takeover: token.takeover,
                public_url: config.notifications.public_url.clone(),
                secret: secret.clone(),
                mdm_id: mdm_id.clone(),
            };
            ctx.metrics.start_token_series(&token.name);
            tasks.spawn(registration.run(ctx.clone()));
            tasks.spawn(crate::submit::run(ctx.clone(), token.name.clone()));
            tasks.spawn(crate::track::run_tracker(ctx.clone(), token.name.clone()));
        }
        tasks.spawn(notify_ready(ctx.clone()));
        tasks.spawn(keep_marker(ctx.clone(), config.data_dir.clone()));
        // STATUS= and WATCHDOG=1 for systemd; a no-op without NOTIFY_SOCKET.
        tasks.spawn(crate::systemd::report(ctx.clone()));
        Ok(Daemon {
            ctx,
            shutdown,
            tasks,
            servers: vec![admin_server, notifications],
            admin_addr,
            notifications_addr,
            drain_timeout: config.admin.drain_timeout,
            data_dir: config.data_dir.clone(),
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn notifications_addr(&self) -> SocketAddr {
        self.notifications_addr
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Stops taking jobs, lets in-flight work and HTTP requests finish
    /// (within `admin.drain_timeout`). Every store commit is durable when it
    /// returns, so nothing is left to flush.
    pub async fn shutdown(mut self) {
        tracing::info!("draining");
        self.ctx.draining.store(true, Ordering::SeqCst);
        sd_notify("STOPPING=1");
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("drain timeout reached; stopping remaining tasks");
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        for server in self.servers.drain(..) {
            let _ = tokio::time::timeout_at(
                deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)),
                server.shutdown(),
            )
            .await;
        }
        if let Err(error) =
            crate::store::marker::refresh(&self.data_dir, self.ctx.store.as_ref()).await
        {
            tracing::warn!(%error, "cannot update the store marker");
        }
        tracing::info!("stopped");
    }
}

/// Keeps the store marker (what the store must at least contain) close to
/// the store, so that a damaged or stale store is noticed at the next start.
async fn keep_marker(ctx: Arc<Context>, data_dir: std::path::PathBuf) {
    while ctx.sleep(crate::store::marker::MARKER_EVERY).await {
        if let Err(error) = crate::store::marker::refresh(&data_dir, ctx.store.as_ref()).await {
            tracing::warn!(%error, "cannot update the store marker");
        }
    }
}

/// Registers one token with Apple (limits, then client config), then keeps
/// its limits fresh.
struct Registration {
    token: String,
    takeover: bool,
    public_url: String,
    secret: String,
    mdm_id: String,
}

impl Registration {
    async fn run(self, ctx: Arc<Context>) {
        let Some(client) = ctx.clients.get(&self.token).cloned() else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            match self.register(&ctx, &client).await {
                Ok(()) => break,
                Err(message) => {
                    let delay = backoff.next_delay();
                    tracing::error!(token = %self.token, error = %message, retry_in = ?delay, "registration with Apple failed");
                    if !ctx.sleep(delay).await {
                        return;
                    }
                }
            }
        }
        if let Some(flag) = ctx.registered.get(&self.token) {
            flag.store(true, Ordering::SeqCst);
        }
        ctx.wake_submitter(&self.token);
        tracing::info!(token = %self.token, "registered with Apple");
        loop {
            if !ctx.sleep(LIMITS_REFRESH).await {
                return;
            }
            match client.refresh_limits().await {
                Ok(limits) => tracing::debug!(token = %self.token, ?limits, "limits refreshed"),
                Err(e) => {
                    tracing::warn!(token = %self.token, error = %e, "cannot refresh service config")
                }
            }
        }
    }

    async fn register(&self, ctx: &Context, client: &Client) -> Result<(), String> {
        client
            .refresh_limits()
            .await
            .map_err(|e| format!("reading service config: {e}"))?;
        let current = client
            .client_config()
            .await
            .map_err(|e| format!("reading client config: {e}"))?;
        if !current.uid.is_empty() {
            let _ = ctx
                .store
                .put_meta(&format!("uid/{}", current.uid), &self.token)
                .await;
            let _ = ctx
                .store
                .put_meta(&format!("token/{}/uid", self.token), &current.uid)
                .await;
        }
        if let Some(info) = &current.mdm_info {
            if info.id != self.mdm_id && !self.takeover {
                return Err(format!(
                    "the location is managed by another MDM (name `{}`, id `{}`); one location must have one MDM. Set takeover = true for this token to take it over",
                    info.name, info.id
                ));
            }
            if info.id != self.mdm_id {
                tracing::warn!(token = %self.token, other = %info.name, "taking the location over from another MDM (takeover = true)");
            }
        }
        let request = ClientConfigRequest {
            mdm_info: Some(MdmInfo {
                id: self.mdm_id.clone(),
                name: "vppd".into(),
                metadata: env!("CARGO_PKG_VERSION").into(),
            }),
            notification_url: Some(self.public_url.clone()),
            notification_auth_token: Some(self.secret.clone()),
            notification_types: Some(vec![
                notification_type::ASSET_MANAGEMENT.into(),
                notification_type::ASSET_COUNT.into(),
                notification_type::USER_MANAGEMENT.into(),
                notification_type::USER_ASSOCIATED.into(),
            ]),
        };
        client
            .set_client_config(&request)
            .await
            .map_err(|e| match e.error_number() {
                Some(error_number::NOTIFICATION_URL_UNREACHABLE) => format!(
                    "Apple could not deliver its test notification to {} ({}): check the reverse proxy, firewall and that it reaches notifications.listen",
                    self.public_url,
                    error_number::NOTIFICATION_URL_UNREACHABLE
                ),
                _ => format!("setting client config: {e}"),
            })?;
        Ok(())
    }
}

/// Tells systemd (Type=notify) once the daemon is ready; a no-op without it.
async fn notify_ready(ctx: Arc<Context>) {
    loop {
        if ctx.is_ready() {
            ctx.metrics.ready.set(1);
            sd_notify("READY=1");
            tracing::info!("ready");
            return;
        }
        if !ctx.sleep(Duration::from_millis(100)).await {
            return;
        }
    }
}

/// Sends a state line to `$NOTIFY_SOCKET`, if systemd gave one.
pub fn sd_notify(state: &str) {
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let path = path.to_string_lossy().into_owned();
        let addr = match path.strip_prefix('@') {
            Some(name) => UnixAddr::from_abstract_name(name.as_bytes()),
            None => UnixAddr::from_pathname(&path),
        };
        let Ok(addr) = addr else { return };
        if let Ok(sock) = UnixDatagram::unbound()
            && let Err(e) = sock.send_to_addr(state.as_bytes(), &addr)
        {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = state;
}
