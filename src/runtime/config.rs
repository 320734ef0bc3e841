//! The TOML configuration file (see docs/interface in the README and
//! deploy/vppd.toml for every key).
//!
//! Unknown keys are errors: a typo such as `requests_per_secnd` would
//! otherwise silently fall back to a default during a rollout.

pub use crate::domain::duration::parse_duration;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::apple::token::{SToken, TokenError};
use crate::domain::job::JobLimits;
use crate::runtime::http::ConnectionLimits;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{what} file {path}: {message}")]
    SecretFile {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("data_dir {path}: {message}")]
    DataDir { path: PathBuf, message: String },
}

/// What `vppd run` finds at data_dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    /// A writable directory.
    Ready,
    /// Not there yet; its parent is a writable directory, so `run` creates it.
    Missing,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file was read from; errors name it.
    pub path: PathBuf,
    pub data_dir: PathBuf,
    pub apple: AppleConfig,
    pub tokens: Vec<TokenConfig>,
    pub notifications: NotificationsConfig,
    pub tracking: TrackingConfig,
    pub admin: AdminConfig,
    pub install: InstallConfig,
    pub logging: LoggingConfig,
    /// `vppd run --accept-store-loss`: start on a store that holds less than
    /// its marker says it must (see [`crate::store::marker`]). Not in the file.
    pub accept_store_loss: bool,
    pub store: StoreConfig,
}

/// `[store]`: where the durable state lives.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `retain_finished`: how long a finished job (and its batches, events
    /// and failures) is kept after it finished; `None` keeps it forever.
    pub retain_finished: Option<Duration>,
}

/// `[store] retain_finished` when the key is left out.
pub const DEFAULT_RETAIN_FINISHED: Duration = Duration::from_secs(30 * 24 * 3600);

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::default(),
            retain_finished: Some(DEFAULT_RETAIN_FINISHED),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded store in `data_dir`: one process.
    #[default]
    Sled,
    /// A PostgreSQL database shared by several replicas. The file holds the
    /// URL, a secret: only its path is kept here.
    Postgres { url_file: PathBuf },
}

impl StoreConfig {
    /// Opens the store this table names: sled in `data_dir`, or the
    /// PostgreSQL database whose URL is in `url_file`. The one place that
    /// picks a backend; `accept_loss` (`vppd run --accept-store-loss`)
    /// starts on a store that holds less than its watermark says it must.
    pub async fn open(
        &self,
        data_dir: &Path,
        accept_loss: bool,
    ) -> Result<std::sync::Arc<dyn crate::store::Store>, crate::store::StoreError> {
        match &self.kind {
            StoreKind::Sled => crate::store::open(data_dir, accept_loss).await,
            StoreKind::Postgres { url_file } => {
                let origin = url_file.display().to_string();
                let url = read_secret_file("store URL", url_file).map_err(|e| {
                    crate::store::StoreError::Connect {
                        url_file: origin.clone(),
                        source: Box::new(e),
                    }
                })?;
                crate::store::open_shared(&url, &origin, accept_loss).await
            }
        }
    }

    /// Whether several replicas may share this store.
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, StoreKind::Postgres { .. })
    }
}

#[derive(Debug, Clone)]
pub struct AppleConfig {
    pub base_url: String,
    pub requests_per_second: u32,
    pub timeout: Duration,
    /// `mdmInfo.id` registered with Apple; defaults to a UUIDv5 of the public
    /// notification URL, so a reinstall with a wiped data_dir is still "us".
    pub mdm_id: Option<String>,
    /// How often each token's service config (limits) and client config
    /// (is the location still ours?) are re-read.
    pub refresh_every: Duration,
    /// A token's management events unfinished at Apple at once, at most:
    /// Apple works a token's requests in arrival order, so what is already
    /// sent sits ahead of new work.
    pub max_events_in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub name: String,
    pub stoken_file: PathBuf,
    /// Take the token over even when its client config names another MDM.
    pub takeover: bool,
}

#[derive(Debug, Clone)]
pub struct NotificationsConfig {
    pub listen: String,
    pub public_url: String,
    pub auth_token_file: PathBuf,
    pub max_body_bytes: usize,
    pub connections: ConnectionLimits,
}

#[derive(Debug, Clone)]
pub struct TrackingConfig {
    pub status_poll_after: Duration,
    pub status_poll_interval: Duration,
    pub sync_after: Duration,
    /// An event still PENDING this long after it was sent is resubmitted
    /// for its undecided pairs (Apple's advice: 10 minutes).
    pub resubmit_after: Duration,
    /// How often each token's assignments are followed with
    /// `sinceVersionId` for changes made outside vppd.
    pub drift_every: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: String,
    pub token_file: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub max_job_targets: usize,
    pub max_job_assets: usize,
    pub max_job_pairs: u64,
    pub drain_timeout: Duration,
    pub connections: ConnectionLimits,
}

impl AdminConfig {
    pub fn job_limits(&self) -> JobLimits {
        JobLimits {
            max_targets: self.max_job_targets,
            max_assets: self.max_job_assets,
            max_pairs: self.max_job_pairs,
        }
    }
}

#[derive(Clone)]
pub struct InstallConfig {
    pub webhook_url: String,
    /// Sent verbatim as `Authorization`; a credential, so `Debug` hides it.
    pub auth_header: Option<String>,
    pub batch_size: usize,
    pub timeout: Duration,
    /// `[install] signing_secret_file`: every POST is signed when set.
    pub signing_secret_file: Option<PathBuf>,
    /// Read from `signing_secret_file` by [`Config::signing_secret`] when
    /// the daemon starts; `None` in a config only parsed.
    pub signing_secret: Option<crate::domain::signing::SigningSecret>,
}

impl std::fmt::Debug for InstallConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstallConfig")
            .field("webhook_url", &self.webhook_url)
            .field(
                "auth_header",
                &self.auth_header.as_ref().map(|_| "<redacted>"),
            )
            .field("batch_size", &self.batch_size)
            .field("timeout", &self.timeout)
            .field("signing_secret_file", &self.signing_secret_file)
            .field("signing_secret", &self.signing_secret)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub format: LogFormat,
}

// The file as written; turned into `Config` by `validate`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: String,
    apple: RawApple,
    #[serde(default)]
    tokens: Vec<RawToken>,
    notifications: RawNotifications,
    #[serde(default)]
    tracking: RawTracking,
    admin: RawAdmin,
    install: RawInstall,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    store: RawStore,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    url_file: Option<String>,
    #[serde(default)]
    retain_finished: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApple {
    base_url: String,
    #[serde(default = "default_rps")]
    requests_per_second: i64,
    #[serde(default = "default_apple_timeout")]
    timeout: String,
    #[serde(default)]
    mdm_id: Option<String>,
    #[serde(default = "default_refresh_every")]
    refresh_every: String,
    #[serde(default = "default_max_events_in_flight")]
    max_events_in_flight: i64,
}

fn default_refresh_every() -> String {
    "5m".into()
}

fn default_max_events_in_flight() -> i64 {
    2
}

fn default_rps() -> i64 {
    5
}
fn default_apple_timeout() -> String {
    "30s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    stoken_file: String,
    #[serde(default)]
    takeover: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotifications {
    listen: String,
    public_url: String,
    auth_token_file: String,
    #[serde(default)]
    max_body_bytes: Option<i64>,
    #[serde(default)]
    max_connections: Option<i64>,
    #[serde(default)]
    idle_timeout: Option<String>,
    #[serde(default)]
    header_read_timeout: Option<String>,
    #[serde(default)]
    body_read_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTracking {
    #[serde(default = "default_poll_after")]
    status_poll_after: String,
    #[serde(default = "default_poll_interval")]
    status_poll_interval: String,
    #[serde(default = "default_sync_after")]
    sync_after: String,
    #[serde(default = "default_resubmit_after")]
    resubmit_after: String,
    #[serde(default = "default_drift_every")]
    drift_every: String,
}

fn default_drift_every() -> String {
    "15m".into()
}

impl Default for RawTracking {
    fn default() -> Self {
        RawTracking {
            status_poll_after: default_poll_after(),
            status_poll_interval: default_poll_interval(),
            sync_after: default_sync_after(),
            resubmit_after: default_resubmit_after(),
            drift_every: default_drift_every(),
        }
    }
}

fn default_poll_after() -> String {
    "60s".into()
}
fn default_poll_interval() -> String {
    "30s".into()
}
fn default_resubmit_after() -> String {
    "10m".into()
}

fn default_sync_after() -> String {
    "120s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
    #[serde(default)]
    token_file: String,
    #[serde(default)]
    allow_unauthenticated: bool,
    #[serde(default)]
    max_body_bytes: Option<i64>,
    #[serde(default)]
    max_job_targets: Option<i64>,
    #[serde(default)]
    max_job_assets: Option<i64>,
    #[serde(default)]
    max_job_pairs: Option<i64>,
    #[serde(default)]
    drain_timeout: Option<String>,
    #[serde(default)]
    max_connections: Option<i64>,
    #[serde(default)]
    idle_timeout: Option<String>,
    #[serde(default)]
    header_read_timeout: Option<String>,
    #[serde(default)]
    body_read_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstall {
    webhook_url: String,
    #[serde(default)]
    auth_header: String,
    #[serde(default = "default_batch_size")]
    batch_size: i64,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    signing_secret_file: String,
}

fn default_batch_size() -> i64 {
    1000
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    #[serde(default)]
    format: Option<String>,
}

impl Config {
    /// Reads and validates the file. Token and secret files are checked by
    /// [`Config::check_files`], which `vppd run` and `vppd check-config` call.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: match e.span() {
                Some(span) => format!("{}{}", locate(text, span.start), e.message()),
                None => e.message().to_string(),
            },
        })?;
        validate(raw, path)
    }

    /// Reads every token file and the admin token file, and checks that
    /// data_dir is (or can become) a writable directory when the store lives
    /// there; fails naming the file.
    pub fn check_files(&self) -> Result<Vec<(String, SToken)>, ConfigError> {
        // With PostgreSQL, data_dir holds no store: nothing to check there.
        let data_dir = if self.store.is_shared() {
            DataDir::Ready
        } else {
            self.check_data_dir()?
        };
        let mut tokens = Vec::new();
        for t in &self.tokens {
            tokens.push((t.name.clone(), SToken::from_file(&t.stoken_file)?));
        }
        if let Some(path) = &self.admin.token_file {
            read_long_secret("admin token", path)?;
        }
        if let StoreKind::Postgres { url_file } = &self.store.kind {
            let url = read_secret_file("store URL", url_file)?;
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::SecretFile {
                    what: "store URL",
                    path: url_file.clone(),
                    message: "must hold one URL like postgres://user:password@host:5432/db".into(),
                });
            }
        }
        self.signing_secret()?;
        if self.notifications.auth_token_file.exists() {
            read_secret_file(
                "notification auth token",
                &self.notifications.auth_token_file,
            )?;
        } else if !self.store.is_shared()
            && let Some(parent) = self.notifications.auth_token_file.parent()
            && !parent.as_os_str().is_empty()
            && !parent.is_dir()
            // `run` creates data_dir before it generates the secret there.
            && !(data_dir == DataDir::Missing && parent == self.data_dir)
        {
            return Err(ConfigError::SecretFile {
                what: "notification auth token",
                path: self.notifications.auth_token_file.clone(),
                message: format!(
                    "is missing and cannot be generated: directory {} does not exist",
                    parent.display()
                ),
            });
        }
        Ok(tokens)
    }

    /// Whether data_dir is a writable directory, or can be created as one.
    /// Writes nothing (the write probe is an unnamed temporary file).
    pub fn check_data_dir(&self) -> Result<DataDir, ConfigError> {
        let dir = &self.data_dir;
        let fail = |message: String| ConfigError::DataDir {
            path: dir.clone(),
            message,
        };
        let create_it = format!(
            "create it for the user vppd runs as: sudo install -d -m 0700 -o USER {}",
            dir.display()
        );
        // The nearest path of data_dir and its ancestors that exists.
        let mut candidate: &Path = dir;
        let found = loop {
            let probe = if candidate.as_os_str().is_empty() {
                Path::new(".")
            } else {
                candidate
            };
            match std::fs::metadata(probe) {
                Ok(meta) => break (probe, meta),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    match candidate.parent() {
                        Some(parent) => candidate = parent,
                        None => return Err(fail(format!("cannot be read: {e}"))),
                    }
                }
                Err(e) => return Err(fail(format!("cannot be read: {e}"))),
            }
        };
        let (existing, meta) = found;
        if !meta.is_dir() {
            return Err(fail(if existing == dir.as_path() {
                "is a file, not a directory: point data_dir at a directory (vppd creates it)".into()
            } else {
                format!(
                    "is under {}, which is a file: point data_dir at a directory",
                    existing.display()
                )
            }));
        }
        if let Err(e) = tempfile::tempfile_in(existing) {
            return Err(fail(if existing == dir.as_path() {
                format!(
                    "is not writable by this user ({e}): give it to the user vppd runs as (chown USER, chmod 0700)"
                )
            } else {
                format!(
                    "does not exist, and {} is not writable by this user ({e}): {create_it}",
                    existing.display()
                )
            }));
        }
        if existing == dir.as_path() {
            return Ok(DataDir::Ready);
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|p| p != existing) {
            return Err(fail(format!(
                "does not exist, nor does its parent: {create_it}"
            )));
        }
        Ok(DataDir::Missing)
    }

    /// Creates data_dir (mode 0700) when it is missing and its parent is a
    /// writable directory, so a fresh host needs no manual step; returns
    /// whether it did.
    pub fn create_data_dir(&self) -> Result<bool, ConfigError> {
        if self.check_data_dir()? == DataDir::Ready {
            return Ok(false);
        }
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder
            .create(&self.data_dir)
            .map_err(|e| ConfigError::DataDir {
                path: self.data_dir.clone(),
                message: format!(
                    "cannot be created ({e}): create it for the user vppd runs as: sudo install -d -m 0700 -o USER {}",
                    self.data_dir.display()
                ),
            })?;
        Ok(true)
    }

    /// What is allowed but unsafe, one line each: secret files others can
    /// read. `check-config` prints them and
    /// `run` logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut files: Vec<(String, &Path)> = self
            .tokens
            .iter()
            .map(|t| {
                (
                    format!("sToken file (token `{}`)", t.name),
                    t.stoken_file.as_path(),
                )
            })
            .collect();
        files.push((
            "notification auth token file".into(),
            &self.notifications.auth_token_file,
        ));
        if let Some(p) = &self.admin.token_file {
            files.push(("admin token file".into(), p));
        }
        if let Some(p) = &self.install.signing_secret_file {
            files.push(("webhook signing secret file".into(), p));
        }
        if let StoreKind::Postgres { url_file } = &self.store.kind {
            files.push(("store URL file (store.url_file)".into(), url_file));
        }
        if let Ok(base) = reqwest::Url::parse(&self.apple.base_url)
            && base.scheme() == "http"
            && !is_loopback(&base)
        {
            out.push(format!(
                "apple.base_url `{}` is plain http to another host of the private network: the sToken travels in clear on it; use https:// beyond a test network",
                self.apple.base_url
            ));
        }
        if self.install.auth_header.is_some()
            && let Ok(hook) = reqwest::Url::parse(&self.install.webhook_url)
            && hook.scheme() == "http"
            && !is_loopback(&hook)
        {
            out.push(format!(
                "install.auth_header travels in clear to install.webhook_url `{}` (plain http to another host of the private network); use https:// beyond a test network",
                self.install.webhook_url
            ));
        }
        for (what, path) in files {
            if let Some((mode, who)) = readable_by_others(path) {
                out.push(format!(
                    "{what} {} is mode {mode:04o}: readable by {who}; chmod 0600 it",
                    path.display()
                ));
            }
        }
        out
    }

    pub fn token(&self, name: &str) -> Option<&TokenConfig> {
        self.tokens.iter().find(|t| t.name == name)
    }

    /// The admin bearer token, if one is configured.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        match &self.admin.token_file {
            Some(path) => read_long_secret("admin token", path).map(Some),
            None => Ok(None),
        }
    }

    /// The webhook signing secret, if `[install] signing_secret_file` is set:
    /// the file's content without surrounding whitespace.
    pub fn signing_secret(
        &self,
    ) -> Result<Option<crate::domain::signing::SigningSecret>, ConfigError> {
        let Some(path) = &self.install.signing_secret_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
            what: "install signing secret",
            path: path.clone(),
            message: format!("cannot be read: {e}"),
        })?;
        long_enough("install signing secret", path, text.trim())?;
        crate::domain::signing::SigningSecret::from_text(&text)
            .map(Some)
            .ok_or_else(|| ConfigError::SecretFile {
                what: "install signing secret",
                path: path.clone(),
                message: "is empty".into(),
            })
    }

    /// The notification shared secret: read, or generated (random, mode 0600)
    /// when the file does not exist yet.
    pub fn notification_secret(&self) -> Result<String, ConfigError> {
        let path = &self.notifications.auth_token_file;
        if path.exists() {
            return read_secret_file("notification auth token", path);
        }
        let secret = random_secret();
        write_secret_file(path, &secret).map_err(|e| ConfigError::SecretFile {
            what: "notification auth token",
            path: path.clone(),
            message: format!("cannot be generated: {e}"),
        })?;
        Ok(secret)
    }
}

/// Secrets an operator writes (the admin token, the signing secret) are
/// at least this long: a short one can be guessed.
pub const MIN_SECRET_CHARS: usize = 32;

/// [`read_secret_file`] of a secret an operator chose, refused when it is
/// shorter than [`MIN_SECRET_CHARS`].
pub fn read_long_secret(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    let secret = read_secret_file(what, path)?;
    long_enough(what, path, &secret)?;
    Ok(secret)
}

/// Refuses a secret shorter than [`MIN_SECRET_CHARS`], naming its file.
fn long_enough(what: &'static str, path: &Path, secret: &str) -> Result<(), ConfigError> {
    let chars = secret.chars().count();
    if chars < MIN_SECRET_CHARS {
        return Err(ConfigError::SecretFile {
            what,
            path: path.to_path_buf(),
            message: format!(
                "holds {chars} characters; at least {MIN_SECRET_CHARS} are needed (e.g. `openssl rand -base64 32`)"
            ),
        });
    }
    Ok(())
}

pub fn read_secret_file(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
        what,
        path: path.to_path_buf(),
        message: format!("cannot be read: {e}"),
    })?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(ConfigError::SecretFile {
            what,
            path: path.to_path_buf(),
            message: "is empty".into(),
        });
    }
    if secret.chars().any(|c| c.is_control() || c == ' ') {
        return Err(ConfigError::SecretFile {
            what,
            path: path.to_path_buf(),
            message: "must hold one line without spaces".into(),
        });
    }
    Ok(secret)
}

/// `line L, column C: [table]: ` for a byte offset of the file, so an error
/// points where an editor does; the table is the one the offset is in.
fn locate(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    // The last table header at or above the offset's line.
    let line_end = text[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(text.len());
    let table = text[..line_end]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(|l| {
            let name = l.trim_start_matches('[');
            name.find(']').map(|end| name[..end].trim().to_string())
        });
    match table {
        Some(t) => format!("line {line}, column {column}: [{t}]: "),
        None => format!("line {line}, column {column}: "),
    }
}

/// Hosts a plain-http URL may carry a credential to: this host, and the
/// private network around it (a single-label name such as a container's
/// service name, or a private, link-local or unique-local address), where
/// a simulator or an MDM beside vppd lives. Anything else (a dotted name,
/// a public address) is the internet, where the credential would travel
/// in clear. A private network is allowed with a warning.
fn is_local_network(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private() || ip.is_link_local(),
        Ok(std::net::IpAddr::V6(ip)) => {
            ip.is_loopback()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        Err(_) => !host.contains('.'),
    }
}

/// This host only.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The file's mode and who besides its owner can read it, if anyone: a
/// directory on the way that they cannot enter hides it from them.
#[cfg(unix)]
fn readable_by_others(path: &Path) -> Option<(u32, &'static str)> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    let mut group = mode & 0o040 != 0;
    let mut others = mode & 0o004 != 0;
    let full = std::fs::canonicalize(path).ok()?;
    for dir in full.ancestors().skip(1) {
        let dir_mode = std::fs::metadata(dir).ok()?.permissions().mode();
        group &= dir_mode & 0o010 != 0;
        others &= dir_mode & 0o001 != 0;
    }
    match (group, others) {
        (true, true) => Some((mode, "group and others")),
        (true, false) => Some((mode, "its group")),
        (false, true) => Some((mode, "others")),
        (false, false) => None,
    }
}

#[cfg(not(unix))]
fn readable_by_others(_: &Path) -> Option<(u32, &'static str)> {
    None
}

/// 32 random bytes, hex: fits Apple's `maxNotificationLength` and any header.
pub fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Writes a secret atomically with mode 0600 (temp file, then rename), so a
/// crash never leaves a half-written secret behind.
pub fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The checks every table's values go through, naming the file and the
/// key in their errors.
struct Check<'a> {
    path: &'a Path,
}

impl Check<'_> {
    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message,
        }
    }

    fn duration(&self, key: &str, value: &str) -> Result<Duration, ConfigError> {
        parse_duration(value).map_err(|m| self.invalid(key, m))
    }

    fn positive(&self, key: &str, value: i64) -> Result<usize, ConfigError> {
        if value <= 0 {
            Err(self.invalid(key, format!("must be positive, got {value}")))
        } else {
            Ok(value as usize)
        }
    }

    fn url(&self, key: &str, value: &str) -> Result<reqwest::Url, ConfigError> {
        let no_scheme = || {
            self.invalid(
                key,
                format!(
                    "`{value}` has no scheme: write https://{value} (or http:// for a service on this host)"
                ),
            )
        };
        // Checked first: `localhost:8000/x` would parse, with `localhost`
        // as its scheme.
        if !value.contains("://") {
            return Err(no_scheme());
        }
        match reqwest::Url::parse(value) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(u),
            Ok(_) => Err(self.invalid(key, format!("`{value}` must be an http(s) URL"))),
            Err(e) => Err(self.invalid(key, format!("`{value}` is not a URL: {e}"))),
        }
    }

    /// One listener table's connection keys, over its defaults.
    fn connection_limits(
        &self,
        table: &str,
        [idle, header, body]: [Option<&str>; 3],
        max: Option<i64>,
        defaults: ConnectionLimits,
    ) -> Result<ConnectionLimits, ConfigError> {
        let mut limits = defaults;
        if let Some(v) = max {
            limits.max_connections = self.positive(&format!("{table}.max_connections"), v)?;
        }
        for (name, value, slot) in [
            ("idle_timeout", idle, &mut limits.idle_timeout),
            (
                "header_read_timeout",
                header,
                &mut limits.header_read_timeout,
            ),
            ("body_read_timeout", body, &mut limits.body_read_timeout),
        ] {
            if let Some(v) = value {
                let key = format!("{table}.{name}");
                *slot = self.duration(&key, v)?;
                if slot.is_zero() {
                    return Err(self.invalid(&key, "must be more than zero".into()));
                }
            }
        }
        Ok(limits)
    }

    fn socket(&self, key: &str, value: &str) -> Result<String, ConfigError> {
        value
            .parse::<SocketAddr>()
            .map(|_| value.to_string())
            .map_err(|_| {
                self.invalid(
                    key,
                    format!("`{value}` is not an address like 127.0.0.1:9180"),
                )
            })
    }
}

fn url_text(value: &str) -> String {
    value.trim_end_matches('/').to_string()
}

/// The config the file describes, every value checked. The tables are
/// checked in the file's order, so the first error is the first wrong key.
fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
    let c = Check { path };
    if raw.data_dir.trim().is_empty() {
        return Err(c.invalid("data_dir", "must not be empty".into()));
    }
    let apple = apple(&c, raw.apple)?;
    let tokens = tokens(&c, raw.tokens)?;
    let notifications = notifications(&c, raw.notifications)?;
    let tracking = tracking(&c, raw.tracking)?;
    let admin = admin(&c, raw.admin)?;
    listeners_apart(&c, &admin, &notifications)?;
    let install = install(&c, raw.install)?;
    let logging = logging(&c, raw.logging)?;
    let store = store(&c, raw.store)?;
    Ok(Config {
        path: path.to_path_buf(),
        data_dir: PathBuf::from(raw.data_dir),
        apple,
        tokens,
        notifications,
        tracking,
        admin,
        install,
        logging,
        accept_store_loss: false,
        store,
    })
}

/// `[apple]`.
fn apple(c: &Check, raw: RawApple) -> Result<AppleConfig, ConfigError> {
    let base = c.url("apple.base_url", &raw.base_url)?;
    if base.scheme() == "http" && !is_local_network(&base) {
        return Err(c.invalid(
            "apple.base_url",
            format!(
                "`{}` is plain http to another host, so the sToken would travel in clear: use https:// (plain http only reaches a simulator on this host)",
                raw.base_url
            ),
        ));
    }
    let base_url = url_text(&raw.base_url);
    let rps = c.positive("apple.requests_per_second", raw.requests_per_second)?;
    let apple = AppleConfig {
        base_url,
        requests_per_second: rps.min(u32::MAX as usize) as u32,
        timeout: c.duration("apple.timeout", &raw.timeout)?,
        mdm_id: raw.mdm_id.filter(|s| !s.trim().is_empty()),
        refresh_every: c.duration("apple.refresh_every", &raw.refresh_every)?,
        max_events_in_flight: c.positive("apple.max_events_in_flight", raw.max_events_in_flight)?,
    };
    if apple.refresh_every < Duration::from_secs(1) {
        return Err(c.invalid(
            "apple.refresh_every",
            "must be at least 1s (default \"5m\")".into(),
        ));
    }
    if apple.timeout.is_zero() {
        return Err(c.invalid("apple.timeout", "must be more than zero".into()));
    }
    Ok(apple)
}

/// `[[tokens]]`.
fn tokens(c: &Check, raw: Vec<RawToken>) -> Result<Vec<TokenConfig>, ConfigError> {
    // No [[tokens]] is fine: tokens may all come through the token API.
    let mut tokens = Vec::new();
    for (i, t) in raw.into_iter().enumerate() {
        let key = format!("tokens[{i}]");
        if t.name.trim().is_empty() {
            return Err(c.invalid(&format!("{key}.name"), "must not be empty".into()));
        }
        if tokens.iter().any(|o: &TokenConfig| o.name == t.name) {
            return Err(c.invalid(
                &format!("{key}.name"),
                format!("`{}` is used twice", t.name),
            ));
        }
        if t.stoken_file.trim().is_empty() {
            return Err(c.invalid(&format!("{key}.stoken_file"), "must not be empty".into()));
        }
        tokens.push(TokenConfig {
            name: t.name,
            stoken_file: PathBuf::from(t.stoken_file),
            takeover: t.takeover,
        });
    }
    Ok(tokens)
}

/// `[notifications]`.
fn notifications(c: &Check, raw: RawNotifications) -> Result<NotificationsConfig, ConfigError> {
    let notifications = NotificationsConfig {
        listen: c.socket("notifications.listen", &raw.listen)?,
        public_url: {
            let public = c.url("notifications.public_url", &raw.public_url)?;
            if !public.username().is_empty() || public.password().is_some() {
                return Err(c.invalid(
                    "notifications.public_url",
                    "must not carry credentials (user:password@): Apple would be told them in client config, and it authenticates with the notification secret instead".into(),
                ));
            }
            url_text(&raw.public_url)
        },
        auth_token_file: {
            if raw.auth_token_file.trim().is_empty() {
                return Err(c.invalid("notifications.auth_token_file", "must not be empty".into()));
            }
            PathBuf::from(raw.auth_token_file)
        },
        max_body_bytes: match raw.max_body_bytes {
            Some(v) => c.positive("notifications.max_body_bytes", v)?,
            None => 1 << 20,
        },
        connections: c.connection_limits(
            "notifications",
            [
                raw.idle_timeout.as_deref(),
                raw.header_read_timeout.as_deref(),
                raw.body_read_timeout.as_deref(),
            ],
            raw.max_connections,
            ConnectionLimits {
                max_connections: 1024,
                body_read_timeout: Duration::from_secs(30),
                ..ConnectionLimits::default()
            },
        )?,
    };
    if notifications.public_url.contains('?') {
        return Err(c.invalid(
            "notifications.public_url",
            "must hold only a host and a path (Apple refuses query strings)".into(),
        ));
    }
    Ok(notifications)
}

/// `[tracking]`.
fn tracking(c: &Check, raw: RawTracking) -> Result<TrackingConfig, ConfigError> {
    let tracking = TrackingConfig {
        status_poll_after: c.duration("tracking.status_poll_after", &raw.status_poll_after)?,
        status_poll_interval: c
            .duration("tracking.status_poll_interval", &raw.status_poll_interval)?,
        sync_after: c.duration("tracking.sync_after", &raw.sync_after)?,
        resubmit_after: c.duration("tracking.resubmit_after", &raw.resubmit_after)?,
        drift_every: c.duration("tracking.drift_every", &raw.drift_every)?,
    };
    if tracking.drift_every.is_zero() {
        return Err(c.invalid("tracking.drift_every", "must be more than zero".into()));
    }
    if tracking.resubmit_after.is_zero() {
        return Err(c.invalid("tracking.resubmit_after", "must be more than zero".into()));
    }
    if tracking.status_poll_interval.is_zero() {
        return Err(c.invalid(
            "tracking.status_poll_interval",
            "must be more than zero".into(),
        ));
    }
    Ok(tracking)
}

/// `[admin]`.
fn admin(c: &Check, raw: RawAdmin) -> Result<AdminConfig, ConfigError> {
    let admin = AdminConfig {
        listen: c.socket("admin.listen", &raw.listen)?,
        token_file: Some(raw.token_file)
            .filter(|s| !s.trim().is_empty())
            .map(PathBuf::from),
        max_body_bytes: match raw.max_body_bytes {
            Some(v) => c.positive("admin.max_body_bytes", v)?,
            None => 64 << 20,
        },
        max_job_targets: match raw.max_job_targets {
            Some(v) => c.positive("admin.max_job_targets", v)?,
            None => 1_000_000,
        },
        max_job_assets: match raw.max_job_assets {
            Some(v) => c.positive("admin.max_job_assets", v)?,
            None => 10_000,
        },
        max_job_pairs: match raw.max_job_pairs {
            Some(v) => c.positive("admin.max_job_pairs", v)? as u64,
            None => 25_000_000,
        },
        drain_timeout: match &raw.drain_timeout {
            Some(v) => c.duration("admin.drain_timeout", v)?,
            None => Duration::from_secs(10),
        },
        connections: c.connection_limits(
            "admin",
            [
                raw.idle_timeout.as_deref(),
                raw.header_read_timeout.as_deref(),
                raw.body_read_timeout.as_deref(),
            ],
            raw.max_connections,
            ConnectionLimits {
                max_connections: 256,
                // Room for a 64 MiB job over a slow link.
                body_read_timeout: Duration::from_secs(120),
                ..ConnectionLimits::default()
            },
        )?,
    };
    // Anyone who reaches an open admin API can add or replace any
    // customer's token and revoke its licenses: off loopback it needs a
    // token, unless an operator says an open one is meant.
    let loopback = admin
        .listen
        .parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    if !loopback && admin.token_file.is_none() && !raw.allow_unauthenticated {
        return Err(c.invalid(
            "admin.listen",
            format!(
                "`{}` is not loopback and admin.token_file is not set: anyone who reaches it could change every customer's tokens; set admin.token_file (or admin.allow_unauthenticated = true if that is meant)",
                admin.listen
            ),
        ));
    }
    Ok(admin)
}

/// The two listeners cannot share a port.
fn listeners_apart(
    c: &Check,
    admin: &AdminConfig,
    notifications: &NotificationsConfig,
) -> Result<(), ConfigError> {
    if let (Ok(a), Ok(n)) = (
        admin.listen.parse::<SocketAddr>(),
        notifications.listen.parse::<SocketAddr>(),
    ) && a.port() != 0
        && a.port() == n.port()
        && (a.ip() == n.ip() || a.ip().is_unspecified() || n.ip().is_unspecified())
    {
        return Err(c.invalid(
            "admin.listen",
            format!(
                "`{}` overlaps notifications.listen (`{}`): the two listeners need different ports",
                admin.listen, notifications.listen
            ),
        ));
    }
    Ok(())
}

/// `[install]`.
fn install(c: &Check, raw: RawInstall) -> Result<InstallConfig, ConfigError> {
    let install = InstallConfig {
        webhook_url: {
            c.url("install.webhook_url", &raw.webhook_url)?;
            url_text(&raw.webhook_url)
        },
        auth_header: Some(raw.auth_header).filter(|s| !s.trim().is_empty()),
        batch_size: c.positive("install.batch_size", raw.batch_size)?,
        timeout: match &raw.timeout {
            Some(v) => c.duration("install.timeout", v)?,
            None => Duration::from_secs(30),
        },
        signing_secret_file: Some(raw.signing_secret_file)
            .filter(|s| !s.trim().is_empty())
            .map(PathBuf::from),
        signing_secret: None,
    };
    if let Some(h) = &install.auth_header
        && reqwest::header::HeaderValue::from_str(h).is_err()
    {
        return Err(c.invalid(
            "install.auth_header",
            "is not a valid HTTP header value".into(),
        ));
    }
    if install.auth_header.is_some()
        && let Ok(hook) = reqwest::Url::parse(&install.webhook_url)
        && hook.scheme() == "http"
        && !is_local_network(&hook)
    {
        return Err(c.invalid(
            "install.auth_header",
            format!(
                "would travel in clear: install.webhook_url `{}` is plain http to another host; use https:// (or an MDM on this host)",
                install.webhook_url
            ),
        ));
    }
    Ok(install)
}

/// `[logging]`.
fn logging(c: &Check, raw: RawLogging) -> Result<LoggingConfig, ConfigError> {
    let logging = LoggingConfig {
        format: match raw.format.as_deref() {
            None | Some("plain") => LogFormat::Plain,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(c.invalid(
                    "logging.format",
                    format!("`{other}` is not one of \"plain\", \"json\""),
                ));
            }
        },
    };
    Ok(logging)
}

/// `[store]`.
fn store(c: &Check, raw: RawStore) -> Result<StoreConfig, ConfigError> {
    let store = StoreConfig {
        kind: match raw.kind.as_deref() {
            None | Some("sled") => {
                if raw.url_file.is_some() {
                    return Err(
                        c.invalid("store.url_file", "is only for kind = \"postgres\"".into())
                    );
                }
                StoreKind::Sled
            }
            Some("postgres") => match raw.url_file.filter(|f| !f.trim().is_empty()) {
                Some(f) => StoreKind::Postgres {
                    url_file: PathBuf::from(f),
                },
                None => {
                    return Err(c.invalid(
                        "store.url_file",
                        "is required with kind = \"postgres\": the file holding postgres://user:password@host/db".into(),
                    ));
                }
            },
            Some(other) => {
                return Err(c.invalid(
                    "store.kind",
                    format!("`{other}` is not one of \"sled\", \"postgres\""),
                ));
            }
        },
        retain_finished: match raw.retain_finished.as_deref().map(str::trim) {
            None => Some(DEFAULT_RETAIN_FINISHED),
            // Keeping everything is a choice to spell out, not a zero typed
            // by accident into a duration.
            Some("off") | Some("0") => None,
            Some(v) => match c.duration("store.retain_finished", v)? {
                d if d.is_zero() => {
                    return Err(c.invalid(
                        "store.retain_finished",
                        format!(
                            "`{v}` is no time at all: write \"off\" (or \"0\") to keep finished jobs forever"
                        ),
                    ));
                }
                d => Some(d),
            },
        },
    };
    Ok(store)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const EXAMPLE: &str = r#"
data_dir = "/var/lib/vppd"

[apple]
base_url = "https://vpp.itunes.apple.com/mdm/v2"
requests_per_second = 5
timeout = "30s"

[[tokens]]
name = "main"
stoken_file = "/etc/vppd/main.vpptoken"

[notifications]
listen = "0.0.0.0:8088"
public_url = "https://mdm.example.com/vppd/notifications"
auth_token_file = "/var/lib/vppd/notification-auth-token"

[tracking]
status_poll_after = "60s"
status_poll_interval = "30s"
sync_after = "120s"

[admin]
listen = "127.0.0.1:9180"
token_file = ""

[install]
webhook_url = "http://127.0.0.1:8000/vpp-installs"
auth_header = ""
batch_size = 1000
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn the_contract_example_parses_with_defaults() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.apple.requests_per_second, 5);
        assert_eq!(c.apple.timeout, Duration::from_secs(30));
        assert_eq!(c.tracking.sync_after, Duration::from_secs(120));
        assert_eq!(c.admin.max_body_bytes, 67_108_864);
        assert_eq!(c.admin.max_job_targets, 1_000_000);
        assert_eq!(c.admin.max_job_assets, 10_000);
        assert_eq!(c.admin.max_job_pairs, 25_000_000);
        assert_eq!(c.admin.drain_timeout, Duration::from_secs(10));
        assert!(c.admin.token_file.is_none());
        assert!(c.install.auth_header.is_none());
        assert_eq!(c.logging.format, LogFormat::Plain);
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = EXAMPLE.replace("requests_per_second = 5", "requests_per_secnd = 5");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("requests_per_secnd"), "{err}");
        assert!(err.contains("test.toml"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (from, to, key) in [
            (
                "timeout = \"30s\"",
                "timeout = \"30 parsecs\"",
                "apple.timeout",
            ),
            ("batch_size = 1000", "batch_size = 0", "install.batch_size"),
            (
                "listen = \"127.0.0.1:9180\"",
                "listen = \"nowhere\"",
                "admin.listen",
            ),
            (
                "public_url = \"https://mdm.example.com/vppd/notifications\"",
                "public_url = \"not a url\"",
                "notifications.public_url",
            ),
            (
                "sync_after = \"120s\"",
                "sync_after = \"soon\"",
                "tracking.sync_after",
            ),
        ] {
            let err = parse(&EXAMPLE.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn the_store_section() {
        assert_eq!(parse(EXAMPLE).unwrap().store.kind, StoreKind::Sled);
        let pg = parse(&format!(
            "{EXAMPLE}\n[store]\nkind = \"postgres\"\nurl_file = \"/etc/vppd/postgres-url\"\n"
        ))
        .unwrap();
        assert_eq!(
            pg.store.kind,
            StoreKind::Postgres {
                url_file: PathBuf::from("/etc/vppd/postgres-url")
            }
        );
        assert!(pg.store.is_shared());
        for (section, key) in [
            ("kind = \"postgres\"", "store.url_file"),
            ("kind = \"mysql\"", "store.kind"),
            ("url_file = \"/x\"", "store.url_file"),
            ("retain_finished = \"0s\"", "store.retain_finished"),
            ("retain_finished = \"a month\"", "store.retain_finished"),
        ] {
            let err = parse(&format!("{EXAMPLE}\n[store]\n{section}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{section}: {err}");
        }
    }

    #[test]
    fn finished_jobs_are_kept_thirty_days_unless_told_otherwise() {
        let retain = |section: &str| {
            parse(&format!("{EXAMPLE}\n[store]\n{section}\n"))
                .unwrap()
                .store
                .retain_finished
        };
        assert_eq!(
            parse(EXAMPLE).unwrap().store.retain_finished,
            Some(Duration::from_secs(30 * 86400))
        );
        assert_eq!(
            retain("retain_finished = \"7d\""),
            Some(Duration::from_secs(7 * 86400))
        );
        assert_eq!(
            retain("retain_finished = \"90m\""),
            Some(Duration::from_secs(5400))
        );
        assert_eq!(retain("retain_finished = \"off\""), None);
        assert_eq!(retain("retain_finished = \"0\""), None);
    }

    #[test]
    fn an_open_admin_api_off_loopback_is_refused_unless_meant() {
        let open = EXAMPLE.replace("listen = \"127.0.0.1:9180\"", "listen = \"0.0.0.0:9180\"");
        let e = Config::parse(&open, Path::new("vppd.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("admin.listen") && e.contains("admin.token_file"),
            "{e}"
        );
        let meant = open.replace(
            "token_file = \"\"",
            "token_file = \"\"\nallow_unauthenticated = true",
        );
        Config::parse(&meant, Path::new("vppd.toml")).unwrap();
        Config::parse(EXAMPLE, Path::new("vppd.toml")).unwrap();
    }

    #[test]
    fn a_short_admin_token_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("admin-token");
        std::fs::write(&short, "ten-chars!\n").unwrap();
        let e = read_long_secret("admin token", &short)
            .unwrap_err()
            .to_string();
        assert!(e.contains("admin-token") && e.contains("32"), "{e}");
        std::fs::write(&short, format!("{}\n", "x".repeat(32))).unwrap();
        assert_eq!(read_long_secret("admin token", &short).unwrap().len(), 32);
    }

    #[test]
    fn the_replica_example_parses() {
        let c = Config::load(Path::new("deploy/replicas/vppd-replica.toml")).unwrap();
        assert!(c.store.is_shared());
    }

    #[test]
    fn the_store_url_is_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("postgres-url");
        std::fs::write(&url_file, "mysql://root:hunter2@db/vppd\n").unwrap();
        let token = dir.path().join("main.vpptoken");
        std::fs::write(
            &token,
            SToken::encode(
                "t",
                time::OffsetDateTime::now_utc() + time::Duration::days(30),
                "X",
            ),
        )
        .unwrap();
        let text = EXAMPLE.replace("/etc/vppd/main.vpptoken", &token.display().to_string())
            + &format!(
                "\n[store]\nkind = \"postgres\"\nurl_file = \"{}\"\n",
                url_file.display()
            );
        let config = parse(&text).unwrap();
        let err = config.check_files().unwrap_err().to_string();
        assert!(err.contains("postgres-url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn generated_secret_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let secret_path = dir.path().join("secret");
        let text = EXAMPLE.replace(
            "/var/lib/vppd/notification-auth-token",
            secret_path.to_str().unwrap(),
        );
        let c = parse(&text).unwrap();
        let first = c.notification_secret().unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(c.notification_secret().unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&secret_path)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn syntax_errors_give_line_column_and_table() {
        let text = EXAMPLE.replace("webhook_url = \"http://127.0.0.1:8000/vpp-installs\"\n", "");
        let err = parse(&text).unwrap_err().to_string();
        let install_line = text.lines().position(|l| l == "[install]").unwrap() + 1;
        assert!(
            err.contains(&format!(
                "line {install_line}, column 1: [install]: missing field `webhook_url`"
            )),
            "{err}"
        );
        assert!(!err.contains("byte"), "{err}");
        let text = EXAMPLE.replace("batch_size = 1000", "batch_size = \"lots\"");
        let err = parse(&text).unwrap_err().to_string();
        let line = text
            .lines()
            .position(|l| l.starts_with("batch_size"))
            .unwrap()
            + 1;
        assert!(
            err.contains(&format!("line {line}, column 14: [install]: ")),
            "{err}"
        );
        let err = parse(&EXAMPLE.replace("data_dir = \"/var/lib/vppd\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `data_dir`"), "{err}");
    }

    #[test]
    fn a_url_without_scheme_is_named_so() {
        for url in [
            "127.0.0.1:8000/vpp-installs",
            "localhost:8000/x",
            "mdm.example.com/x",
        ] {
            let text = EXAMPLE.replace("http://127.0.0.1:8000/vpp-installs", url);
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("install.webhook_url") && err.contains("has no scheme"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn listeners_on_one_port_are_refused() {
        for (admin, notifications) in [
            ("0.0.0.0:8088", "0.0.0.0:8088"),
            ("127.0.0.1:8088", "0.0.0.0:8088"),
            ("0.0.0.0:8088", "127.0.0.1:8088"),
        ] {
            let text = EXAMPLE
                .replace(
                    "listen = \"127.0.0.1:9180\"",
                    &format!("listen = \"{admin}\"\nallow_unauthenticated = true"),
                )
                .replace(
                    "listen = \"0.0.0.0:8088\"",
                    &format!("listen = \"{notifications}\""),
                );
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("admin.listen") && err.contains("notifications.listen"),
                "{err}"
            );
        }
        for (admin, notifications) in [
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("127.0.0.1:8088", "10.0.0.1:8088"),
        ] {
            let text = EXAMPLE
                .replace(
                    "listen = \"127.0.0.1:9180\"",
                    &format!("listen = \"{admin}\""),
                )
                .replace(
                    "listen = \"0.0.0.0:8088\"",
                    &format!("listen = \"{notifications}\""),
                );
            parse(&text).unwrap();
        }
    }

    #[test]
    fn apple_in_plain_http_only_on_loopback() {
        let apple = "https://vpp.itunes.apple.com/mdm/v2";
        for bad in [
            "http://vpp.itunes.apple.com/mdm/v2",
            "http://203.0.113.5:8443/mdm/v2",
            "http://[2001:db8::1]:8443/mdm/v2",
        ] {
            let err = parse(&EXAMPLE.replace(apple, bad)).unwrap_err().to_string();
            assert!(
                err.contains("apple.base_url") && err.contains("https://"),
                "{err}"
            );
        }
        for ok in [
            "http://127.0.0.1:8443/mdm/v2",
            "http://localhost:1/mdm/v2",
            "http://[::1]:8443/mdm/v2",
        ] {
            let config = parse(&EXAMPLE.replace(apple, ok)).unwrap();
            assert_eq!(config.apple.base_url, ok);
            assert!(
                !config
                    .warnings()
                    .iter()
                    .any(|w| w.contains("apple.base_url")),
                "{ok}"
            );
        }
        // A simulator beside vppd on a private network (a container's
        // service name, a private address) works, with a warning.
        for private in [
            "http://apple-sim:8443/mdm/v2",
            "http://10.0.0.5:8443/mdm/v2",
            "http://192.168.1.9/mdm/v2",
            "http://[fd00::5]:8443/mdm/v2",
        ] {
            let config = parse(&EXAMPLE.replace(apple, private)).unwrap();
            assert!(
                config
                    .warnings()
                    .iter()
                    .any(|w| w.contains("apple.base_url") && w.contains("in clear")),
                "{private}"
            );
        }
    }

    #[test]
    fn a_public_url_with_credentials_is_refused() {
        let text = EXAMPLE.replace(
            "https://mdm.example.com/vppd/notifications",
            "https://vppd:hunter2@mdm.example.com/vppd/notifications",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("notifications.public_url") && err.contains("credentials"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_credential_over_plain_http_to_another_host_is_refused() {
        let with = |url: &str, header: &str| {
            let text = EXAMPLE
                .replace("http://127.0.0.1:8000/vpp-installs", url)
                .replace("auth_header = \"\"", &format!("auth_header = \"{header}\""));
            parse(&text).map_err(|e| e.to_string())
        };
        let err = with("http://mdm.internal:8000/installs", "Bearer hunter2").unwrap_err();
        assert!(
            err.contains("install.auth_header")
                && err.contains("http://mdm.internal:8000/installs")
                && !err.contains("hunter2"),
            "{err}"
        );
        with("http://mdm.internal:8000/installs", "").unwrap();
        with("https://mdm.internal/installs", "Bearer x").unwrap();
        with("http://127.0.0.1:8000/installs", "Bearer x").unwrap();
        with("http://localhost:8000/installs", "Bearer x").unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_others_can_read_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("main.vpptoken");
        std::fs::write(&token, "x").unwrap();
        let text = EXAMPLE
            .replace("/etc/vppd/main.vpptoken", token.to_str().unwrap())
            .replace(
                "/var/lib/vppd/notification-auth-token",
                dir.path().join("none").to_str().unwrap(),
            );
        let c = parse(&text).unwrap();
        let chmod = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        chmod(dir.path(), 0o755);
        chmod(&token, 0o644);
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains(token.to_str().unwrap())
                && w[0].contains("0644")
                && w[0].contains("group and others"),
            "{w:?}"
        );
        chmod(&token, 0o640);
        assert!(c.warnings()[0].contains("its group"), "{:?}", c.warnings());
        chmod(&token, 0o600);
        assert!(c.warnings().is_empty());
        // Inside a directory nobody else may enter, the mode does not matter.
        chmod(&token, 0o644);
        chmod(dir.path(), 0o700);
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    }

    #[test]
    fn data_dir_must_be_or_become_a_writable_directory() {
        let dir = tempfile::tempdir().unwrap();
        let with = |data_dir: &Path| {
            let text = EXAMPLE.replace(
                "data_dir = \"/var/lib/vppd\"",
                &format!("data_dir = \"{}\"", data_dir.display()),
            );
            parse(&text).unwrap()
        };
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = with(&file).check_data_dir().unwrap_err().to_string();
        assert!(
            err.contains("data_dir") && err.contains("is a file"),
            "{err}"
        );
        let err = with(&file.join("db"))
            .check_data_dir()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is under") && err.contains("which is a file"),
            "{err}"
        );
        let deep = dir.path().join("a").join("b");
        let err = with(&deep).check_data_dir().unwrap_err().to_string();
        assert!(err.contains("install -d -m 0700"), "{err}");

        let fresh = dir.path().join("data");
        let c = with(&fresh);
        assert_eq!(c.check_data_dir().unwrap(), DataDir::Missing);
        assert!(!fresh.exists(), "a check must not create it");
        assert!(c.create_data_dir().unwrap());
        assert_eq!(c.check_data_dir().unwrap(), DataDir::Ready);
        assert!(!c.create_data_dir().unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
            // Unwritable; root writes anyway, so only checked without it.
            std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o500)).unwrap();
            if tempfile::tempfile_in(&fresh).is_err() {
                let err = c.check_data_dir().unwrap_err().to_string();
                assert!(err.contains("not writable"), "{err}");
            }
            std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
    }

    #[test]
    fn install_debug_hides_the_auth_header() {
        let text = EXAMPLE.replace("auth_header = \"\"", "auth_header = \"Bearer hunter2\"");
        let c = parse(&text).unwrap();
        assert!(!format!("{:?}", c).contains("hunter2"));
    }
}
