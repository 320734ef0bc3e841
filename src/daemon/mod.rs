//! Wires every stage together for `vppd run` (and the demo): opens the
//! store, loads the tokens (config file and API) into the registry, starts
//! both listeners and the long-running tasks, hands each token's work
//! (registration, submitter, tracker) to the lease keeper, which starts it
//! wherever the token's lease is held (also for tokens added at run time),
//! and drains on shutdown.
//!
//! Startup order matters: the notification listener is up before client
//! config is posted, because Apple sends a TEST_NOTIFICATION first and
//! refuses the config if it cannot be delivered.

pub mod systemd;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::apple::token::SToken;
use crate::daemon::systemd::sd_notify;
pub use crate::runtime::activation::Listeners;
use crate::runtime::config::{Config, ConfigError};
use crate::runtime::context::Context;
use crate::runtime::http::Server;
use crate::runtime::lease::{self, Work};
use crate::runtime::metrics::Metrics;
use crate::runtime::register::Registrar;
use crate::runtime::tokens::{ClientFactory, Source, Token};
use crate::store::{StoreError, TokenRecord};

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

pub struct Daemon {
    ctx: Arc<Context>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    servers: Vec<Server>,
    admin_addr: SocketAddr,
    notifications_addr: SocketAddr,
    drain_timeout: Duration,
    /// The sled store's data_dir, for its marker; `None` when the store is
    /// shared and keeps its watermark itself.
    marker_dir: Option<std::path::PathBuf>,
}

impl Daemon {
    pub async fn start(config: Config, metrics: Arc<Metrics>) -> Result<Daemon, DaemonError> {
        Daemon::start_on(config, metrics, Listeners::default()).await
    }

    /// Starts the daemon on the listeners given, binding the configured
    /// addresses for those not given.
    pub async fn start_on(
        config: Config,
        metrics: Arc<Metrics>,
        listeners: Listeners,
    ) -> Result<Daemon, DaemonError> {
        let file_tokens = config.check_files()?;
        let admin_token = config.admin_token()?;
        let store = config
            .store
            .open(&config.data_dir, config.accept_store_loss)
            .await?;
        let secret = if config.store.is_shared() {
            shared_secret(&config, store.as_ref()).await?
        } else {
            config.notification_secret()?
        };
        if !config.notifications.public_url.starts_with("https://") {
            tracing::warn!(public_url = %config.notifications.public_url, "notifications.public_url is not https://; Apple requires HTTPS, so a TLS reverse proxy must front it");
        }
        let mut factory = ClientFactory::new(&config.apple, metrics.clone()).map_err(|e| {
            DaemonError::Client {
                token: "*".into(),
                message: e.to_string(),
            }
        })?;
        if config.store.is_shared() {
            // Replicas: a token's requests leave only under its lease.
            factory = factory.fenced(lease::notice(config.apple.timeout));
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut ctx = Context::new(
            store,
            metrics,
            config.tracking.clone(),
            crate::runtime::config::InstallConfig {
                signing_secret: config.signing_secret()?,
                ..config.install.clone()
            },
            shutdown_rx,
        )
        .with_clients(factory.clone())
        .with_shared_store(config.store.is_shared())
        .with_legacy_secret(Some(&secret));
        ctx.max_events_in_flight = config.apple.max_events_in_flight;
        let ctx = Arc::new(ctx);
        load_tokens(&ctx, &config, file_tokens, &factory).await?;

        let servers = serve(&ctx, &config, listeners, admin_token).await?;
        let (admin_addr, notifications_addr) = (servers[0].local_addr(), servers[1].local_addr());
        tracing::info!(admin = %admin_addr, notifications = %notifications_addr, tokens = ctx.tokens.len(), "listening");

        let (fixed, token_work) = lease_work(&ctx, &config);
        let mut tasks = JoinSet::new();
        tasks.spawn(lease::run(
            ctx.clone(),
            lease::holder_id(),
            fixed,
            token_work,
        ));
        if ctx.shared_store {
            tasks.spawn(crate::runtime::token_sync::publish_states(ctx.clone()));
        }
        ctx.listening.store(true, Ordering::SeqCst);
        tasks.spawn(crate::runtime::health::run(ctx.clone()));
        tasks.spawn(notify_ready(ctx.clone()));
        let marker_dir = (!config.store.is_shared()).then(|| config.data_dir.clone());
        tasks.spawn(keep_marker(ctx.clone(), marker_dir.clone()));
        // STATUS= and WATCHDOG=1 for systemd; a no-op without NOTIFY_SOCKET.
        tasks.spawn(crate::daemon::systemd::report(ctx.clone()));
        Ok(Daemon {
            ctx,
            shutdown,
            tasks,
            servers,
            admin_addr,
            notifications_addr,
            drain_timeout: config.admin.drain_timeout,
            marker_dir,
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
    /// (within `admin.drain_timeout`). Every store commit but a fold is
    /// durable when it returns, and the store flushes as it closes.
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
        if let Err(error) = refresh_marker(self.marker_dir.as_deref(), &self.ctx).await {
            tracing::warn!(%error, "cannot update the store marker");
        }
        tracing::info!("stopped");
    }
}

/// Starts both listeners, the notification listener first (Apple tests it
/// before it takes the client config); returns the admin server, then the
/// notification server.
async fn serve(
    ctx: &Arc<Context>,
    config: &Config,
    listeners: Listeners,
    admin_token: Option<String>,
) -> Result<Vec<Server>, DaemonError> {
    let listener = Arc::new(crate::stages::listen::Listener::new(
        ctx.clone(),
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
    let admin = Arc::new(crate::stages::admin::Admin::new(
        ctx.clone(),
        admin_token,
        config.admin.max_body_bytes,
        config.admin.job_limits(),
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
    Ok(vec![admin_server, notifications])
}

/// What runs in one replica at a time, started by whichever holds its
/// lease (with sled: this process, at once): the singletons, and each
/// token's work.
fn lease_work(ctx: &Arc<Context>, config: &Config) -> (Vec<Work>, lease::TokenStart) {
    let singleton = |name: &str, start: lease::Start| Work {
        name: name.into(),
        balanced: false,
        start,
    };
    let (c, d, e) = (ctx.clone(), ctx.clone(), ctx.clone());
    let retain = config.store.retain_finished;
    let fixed = vec![
        singleton(
            lease::APPLIER,
            Arc::new(move |set| {
                set.spawn(crate::stages::track::run_applier(c.clone()));
            }),
        ),
        singleton(
            lease::OUTBOX,
            Arc::new(move |set| {
                set.spawn(crate::stages::release::run(d.clone()));
            }),
        ),
        singleton(
            lease::RETENTION,
            Arc::new(move |set| {
                set.spawn(crate::runtime::retention::run(e.clone(), retain));
            }),
        ),
    ];
    let mdm_id = config.apple.mdm_id.clone().unwrap_or_else(|| {
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_URL,
            config.notifications.public_url.as_bytes(),
        )
        .to_string()
    });
    let registrar = Arc::new(Registrar {
        public_url: config.notifications.public_url.clone(),
        mdm_id,
        refresh_every: config.apple.refresh_every,
    });
    // Started wherever the token's lease is held; a removed token's tasks
    // end by themselves.
    let c = ctx.clone();
    let token_work: lease::TokenStart = Arc::new(move |token: Arc<Token>, set| {
        c.metrics.start_token_series(token.name());
        set.spawn(lease::share_pause(c.clone(), token.clone()));
        set.spawn(crate::runtime::register::run(
            c.clone(),
            token.clone(),
            registrar.clone(),
        ));
        set.spawn(crate::stages::submit::run(c.clone(), token.clone()));
        set.spawn(crate::stages::track::run_tracker(c.clone(), token.clone()));
        set.spawn(crate::stages::users::run(c.clone(), token.clone()));
        set.spawn(crate::stages::drift::run(c.clone(), token));
    });
    (fixed, token_work)
}

/// Keeps the store marker (what the store must at least contain) close to
/// the store, so that a damaged or stale store is noticed at the next start.
async fn keep_marker(ctx: Arc<Context>, marker_dir: Option<std::path::PathBuf>) {
    while ctx.sleep(crate::store::marker::MARKER_EVERY).await {
        if let Err(error) = refresh_marker(marker_dir.as_deref(), &ctx).await {
            tracing::warn!(%error, "cannot update the store marker");
        }
    }
}

/// The sled store's marker file in data_dir, or the shared database's own
/// watermark.
async fn refresh_marker(
    marker_dir: Option<&std::path::Path>,
    ctx: &Context,
) -> Result<(), crate::store::StoreError> {
    match marker_dir {
        Some(dir) => crate::store::marker::refresh(dir, ctx.store.as_ref()).await,
        None => crate::store::marker::refresh_shared(ctx.store.as_ref()).await,
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
        crate::runtime::config::read_secret_file("notification auth token", path)?
    } else {
        crate::runtime::config::random_secret()
    };
    Ok(store.meta_or_insert(KEY, &candidate).await?)
}

/// Puts the config file's tokens and those added through the API into the
/// registry. A stored copy of a config-file token (renewed or taken over
/// through the API) wins over the file.
async fn load_tokens(
    ctx: &Context,
    config: &Config,
    file_tokens: Vec<(String, SToken)>,
    factory: &ClientFactory,
) -> Result<(), DaemonError> {
    let mut stored: HashMap<String, TokenRecord> = ctx
        .store
        .tokens()
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    struct Entry {
        name: String,
        source: Source,
        stoken: SToken,
        takeover: bool,
        record_ms: u64,
    }
    let mut all = Vec::new();
    for (name, from_file) in file_tokens {
        let file_takeover = config.token(&name).is_some_and(|t| t.takeover);
        let entry = match stored.remove(&name) {
            Some(record) => match SToken::parse(&record.stoken) {
                Ok(stoken) => Entry {
                    name,
                    source: Source::Config,
                    stoken,
                    takeover: record.takeover || file_takeover,
                    record_ms: record.updated_ms,
                },
                Err(e) => {
                    tracing::error!(token = %name, error = %e, "the stored copy of this token cannot be read; using the config file's");
                    Entry {
                        name,
                        source: Source::Config,
                        stoken: from_file,
                        takeover: file_takeover,
                        record_ms: record.updated_ms,
                    }
                }
            },
            None => Entry {
                name,
                source: Source::Config,
                stoken: from_file,
                takeover: file_takeover,
                record_ms: 0,
            },
        };
        all.push(entry);
    }
    for (name, record) in stored {
        match SToken::parse(&record.stoken) {
            Ok(stoken) => all.push(Entry {
                name,
                source: Source::Api,
                stoken,
                takeover: record.takeover,
                record_ms: record.updated_ms,
            }),
            Err(e) => {
                tracing::error!(token = %name, error = %e, "a stored token cannot be read; PUT it again")
            }
        }
    }
    for e in all {
        let uid = crate::runtime::token_sync::stored_uid(ctx, &e.name).await?;
        let client = factory.client(&e.name, e.stoken);
        if let Some(token) = ctx
            .tokens
            .insert(&e.name, e.source, client, uid, e.takeover)
        {
            token.set_record_ms(e.record_ms);
        }
    }
    Ok(())
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
