//! Wires every stage together for `vppd run` (and the demo): opens the
//! store, loads the tokens (config file and API) into the registry, starts
//! both listeners and the long-running tasks, starts each token's tasks
//! (registration, submitter, tracker; also for tokens added at run time),
//! and drains on shutdown.
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

use tokio::sync::mpsc;

use crate::apple::token::SToken;
use crate::config::{Config, ConfigError};
use crate::context::Context;
use crate::http::Server;
use crate::metrics::Metrics;
use crate::register::Registrar;
use crate::store::{StoreError, TokenRecord};
use crate::tokens::{ClientFactory, Source, Token};

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
}

impl Daemon {
    pub async fn start(config: Config, metrics: Arc<Metrics>) -> Result<Daemon, DaemonError> {
        let file_tokens = config.check_files()?;
        let secret = config.notification_secret()?;
        let admin_token = config.admin_token()?;
        let store = crate::store::open(&config.data_dir)?;
        if !config.notifications.public_url.starts_with("https://") {
            tracing::warn!(public_url = %config.notifications.public_url, "notifications.public_url is not https://; Apple requires HTTPS, so a TLS reverse proxy must front it");
        }
        let factory = ClientFactory::new(&config.apple, metrics.clone()).map_err(|e| {
            DaemonError::Client {
                token: "*".into(),
                message: e.to_string(),
            }
        })?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        let ctx = Arc::new(
            Context::new(
                store.clone(),
                metrics,
                config.tracking.clone(),
                config.install.clone(),
                shutdown_rx,
            )
            .with_token_tasks(started_tx)
            .with_clients(factory.clone()),
        );
        load_tokens(&ctx, &config, file_tokens, &factory).await?;

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
        tracing::info!(admin = %admin_addr, notifications = %notifications_addr, tokens = ctx.tokens.len(), "listening");

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
        let registrar = Arc::new(Registrar {
            public_url: config.notifications.public_url.clone(),
            secret: secret.clone(),
            mdm_id,
            refresh_every: config.apple.refresh_every,
        });
        tasks.spawn(supervise_tokens(ctx.clone(), started_rx, registrar));
        for token in ctx.tokens.all() {
            ctx.start_token(token);
        }
        ctx.listening.store(true, Ordering::SeqCst);
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
    let add = |name: String, source: Source, stoken: SToken, takeover: bool| {
        (name, source, stoken, takeover)
    };
    let mut all = Vec::new();
    for (name, from_file) in file_tokens {
        let file_takeover = config.token(&name).is_some_and(|t| t.takeover);
        let entry = match stored.remove(&name) {
            Some(record) => match SToken::parse(&record.stoken) {
                Ok(stoken) => add(
                    name,
                    Source::Config,
                    stoken,
                    record.takeover || file_takeover,
                ),
                Err(e) => {
                    tracing::error!(token = %name, error = %e, "the stored copy of this token cannot be read; using the config file's");
                    add(name, Source::Config, from_file, file_takeover)
                }
            },
            None => add(name, Source::Config, from_file, file_takeover),
        };
        all.push(entry);
    }
    for (name, record) in stored {
        match SToken::parse(&record.stoken) {
            Ok(stoken) => all.push(add(name, Source::Api, stoken, record.takeover)),
            Err(e) => {
                tracing::error!(token = %name, error = %e, "a stored token cannot be read; PUT it again")
            }
        }
    }
    for (name, source, stoken, takeover) in all {
        let uid = ctx.store.meta(&format!("token/{name}/uid")).await?;
        let client = factory.client(&name, stoken);
        ctx.tokens.insert(&name, source, client, uid, takeover);
    }
    Ok(())
}

/// Starts the tasks of every token put into the registry (at start and at
/// run time), and on shutdown waits for them all. A removed token's tasks
/// end by themselves.
async fn supervise_tokens(
    ctx: Arc<Context>,
    mut started: mpsc::UnboundedReceiver<Arc<Token>>,
    registrar: Arc<Registrar>,
) {
    let mut children = JoinSet::new();
    loop {
        tokio::select! {
            token = started.recv() => {
                let Some(token) = token else { break };
                ctx.metrics.start_token_series(token.name());
                children.spawn(crate::register::run(ctx.clone(), token.clone(), registrar.clone()));
                children.spawn(crate::submit::run(ctx.clone(), token.clone()));
                children.spawn(crate::track::run_tracker(ctx.clone(), token));
            }
            Some(_) = children.join_next(), if !children.is_empty() => {}
            _ = ctx.shutdown_signal() => break,
        }
    }
    while children.join_next().await.is_some() {}
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
