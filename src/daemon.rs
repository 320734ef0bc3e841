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
use crate::lease::{self, Work};
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

/// Listeners bound before the daemon starts: tests bind port 0 and hand them
/// over, `vppd run` takes those systemd passes (socket activation). A `None`
/// binds the configured address.
#[derive(Debug, Default)]
pub struct Listeners {
    pub admin: Option<tokio::net::TcpListener>,
    pub notifications: Option<tokio::net::TcpListener>,
}

pub struct Daemon {
    ctx: Arc<Context>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    servers: Vec<Server>,
    admin_addr: SocketAddr,
    notifications_addr: SocketAddr,
    drain_timeout: Duration,
}

impl Daemon {
    pub async fn start(config: Config, metrics: Arc<Metrics>) -> Result<Daemon, DaemonError> {
        Daemon::start_on(config, metrics, Listeners::default()).await
    }

    pub async fn start_on(
        config: Config,
        metrics: Arc<Metrics>,
        listeners: Listeners,
    ) -> Result<Daemon, DaemonError> {
        let tokens = config.check_files()?;
        let admin_token = config.admin_token()?;
        let store = crate::store::open_configured(&config.store, &config.data_dir).await?;
        let secret = if config.store.is_shared() {
            shared_secret(&config, store.as_ref()).await?
        } else {
            config.notification_secret()?
        };
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
        let mut ctx = Context::new(
            store,
            metrics,
            clients,
            config.tracking.clone(),
            crate::config::InstallConfig {
                signing_secret: config.signing_secret()?,
                ..config.install.clone()
            },
            shutdown_rx,
        );
        ctx.shared_store = config.store.is_shared();
        ctx.max_events_in_flight = config.apple.max_events_in_flight;
        let ctx = Arc::new(ctx);

        let listener = Arc::new(crate::listen::Listener::new(
            ctx.clone(),
            secret.clone(),
            config.notifications.max_body_bytes,
        ));
        let notifications = Server::serve(
            listeners.notifications,
            &config.notifications.listen,
            listener,
            config.notifications.connections,
        )
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
        let admin_server = Server::serve(
            listeners.admin,
            &config.admin.listen,
            admin,
            config.admin.connections,
        )
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
        let mdm_id = config.apple.mdm_id.clone().unwrap_or_else(|| {
            uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                config.notifications.public_url.as_bytes(),
            )
            .to_string()
        });
        // What runs in one replica at a time, started by whichever holds
        // its lease (with sled: this process, at once).
        let mut work = Vec::new();
        let c = ctx.clone();
        work.push(Work {
            name: lease::APPLIER.into(),
            balanced: false,
            start: Box::new(move |set| {
                set.spawn(crate::track::run_applier(c.clone()));
            }),
        });
        let c = ctx.clone();
        work.push(Work {
            name: lease::OUTBOX.into(),
            balanced: false,
            start: Box::new(move |set| {
                set.spawn(crate::release::run(c.clone()));
            }),
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
            let c = ctx.clone();
            let name = token.name.clone();
            work.push(Work {
                name: lease::token_lease(&token.name),
                balanced: true,
                start: Box::new(move |set| {
                    set.spawn(lease::share_pause(c.clone(), name.clone()));
                    set.spawn(registration.clone().run(c.clone()));
                    set.spawn(crate::submit::run(c.clone(), name.clone()));
                    set.spawn(crate::track::run_tracker(c.clone(), name.clone()));
                    set.spawn(crate::drift::run(c.clone(), name.clone()));
                }),
            });
        }
        tasks.spawn(lease::run(ctx.clone(), lease::holder_id(), work));
        tasks.spawn(notify_ready(ctx.clone()));
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
        tracing::info!("stopped");
    }
}

/// The notification secret of replicas sharing a store: the one in the
/// store, else the file's (an upgrade from one host keeps what Apple knows),
/// else a new one. The first replica to store it wins.
async fn shared_secret(
    config: &Config,
    store: &dyn crate::store::Store,
) -> Result<String, DaemonError> {
    const KEY: &str = "notifications/secret";
    if let Some(secret) = store.meta(KEY).await? {
        return Ok(secret);
    }
    let path = &config.notifications.auth_token_file;
    let candidate = if path.exists() {
        crate::config::read_secret_file("notification auth token", path)?
    } else {
        crate::config::random_secret()
    };
    Ok(store.meta_or_insert(KEY, &candidate).await?)
}

/// Registers one token with Apple (limits, then client config), then keeps
/// its limits fresh.
#[derive(Clone)]
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
        self.read_assets(&ctx, &client).await;
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
            self.read_assets(&ctx, &client).await;
        }
    }

    /// Get Assets with the limits: the counts `GET /v1/tokens/{name}/assets`
    /// shows, and a new look for jobs waiting for licenses.
    async fn read_assets(&self, ctx: &Context, client: &Client) {
        match crate::licenses::refresh(ctx, &self.token, client).await {
            Ok(n) => {
                tracing::debug!(token = %self.token, assets = n, "license counts read");
                ctx.licenses_changed(&self.token);
            }
            Err(e) => tracing::warn!(token = %self.token, error = %e, "cannot read license counts"),
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
