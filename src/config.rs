//! The TOML configuration file (see docs/interface in the README and
//! deploy/vppd.toml for every key).
//!
//! Unknown keys are errors: a typo such as `requests_per_secnd` would
//! otherwise silently fall back to a default during a rollout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::apple::token::{SToken, TokenError};
use crate::http::ConnectionLimits;

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
    pub store: StoreConfig,
}

/// `[store]`: where the durable state lives.
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    pub kind: StoreKind,
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
    pub drain_timeout: Duration,
    pub connections: ConnectionLimits,
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
    pub signing_secret: Option<crate::signing::SigningSecret>,
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
    #[serde(default = "default_max_events_in_flight")]
    max_events_in_flight: i64,
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
    max_body_bytes: Option<i64>,
    #[serde(default)]
    max_job_targets: Option<i64>,
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
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })?;
        validate(raw, path)
    }

    /// Reads every token file and the admin token file; fails naming the file.
    pub fn check_files(&self) -> Result<Vec<(String, SToken)>, ConfigError> {
        let mut tokens = Vec::new();
        for t in &self.tokens {
            tokens.push((t.name.clone(), SToken::from_file(&t.stoken_file)?));
        }
        if let Some(path) = &self.admin.token_file {
            read_secret_file("admin token", path)?;
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

    pub fn token(&self, name: &str) -> Option<&TokenConfig> {
        self.tokens.iter().find(|t| t.name == name)
    }

    /// The admin bearer token, if one is configured.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        match &self.admin.token_file {
            Some(path) => read_secret_file("admin token", path).map(Some),
            None => Ok(None),
        }
    }

    /// The webhook signing secret, if `[install] signing_secret_file` is set:
    /// the file's content without surrounding whitespace.
    pub fn signing_secret(&self) -> Result<Option<crate::signing::SigningSecret>, ConfigError> {
        let Some(path) = &self.install.signing_secret_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
            what: "install signing secret",
            path: path.clone(),
            message: format!("cannot be read: {e}"),
        })?;
        crate::signing::SigningSecret::from_text(&text)
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

/// Parses durations such as `250ms`, `30s`, `5m`, `2h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like \"250ms\", \"30s\" or \"5m\""))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!("`{s}`: unknown unit `{other}` (use ms, s, m or h)"));
        }
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    let duration = |key: &str, value: &str| parse_duration(value).map_err(|m| invalid(key, m));
    let positive = |key: &str, value: i64| -> Result<usize, ConfigError> {
        if value <= 0 {
            Err(invalid(key, format!("must be positive, got {value}")))
        } else {
            Ok(value as usize)
        }
    };
    let url = |key: &str, value: &str| -> Result<String, ConfigError> {
        match reqwest::Url::parse(value) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                Ok(value.trim_end_matches('/').to_string())
            }
            Ok(_) => Err(invalid(key, format!("`{value}` must be an http(s) URL"))),
            Err(e) => Err(invalid(key, format!("`{value}` is not a URL: {e}"))),
        }
    };
    // One listener table's connection keys, over its defaults.
    let connection_limits = |table: &str,
                             [idle, header, body]: [Option<&str>; 3],
                             max: Option<i64>,
                             defaults: ConnectionLimits|
     -> Result<ConnectionLimits, ConfigError> {
        let mut limits = defaults;
        if let Some(v) = max {
            limits.max_connections = positive(&format!("{table}.max_connections"), v)?;
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
                *slot = duration(&key, v)?;
                if slot.is_zero() {
                    return Err(invalid(&key, "must be more than zero".into()));
                }
            }
        }
        Ok(limits)
    };
    let socket = |key: &str, value: &str| -> Result<String, ConfigError> {
        value
            .parse::<SocketAddr>()
            .map(|_| value.to_string())
            .map_err(|_| {
                invalid(
                    key,
                    format!("`{value}` is not an address like 127.0.0.1:9180"),
                )
            })
    };

    if raw.data_dir.trim().is_empty() {
        return Err(invalid("data_dir", "must not be empty".into()));
    }
    let base_url = url("apple.base_url", &raw.apple.base_url)?;
    let rps = positive("apple.requests_per_second", raw.apple.requests_per_second)?;
    let apple = AppleConfig {
        base_url,
        requests_per_second: rps.min(u32::MAX as usize) as u32,
        timeout: duration("apple.timeout", &raw.apple.timeout)?,
        mdm_id: raw.apple.mdm_id.filter(|s| !s.trim().is_empty()),
        max_events_in_flight: positive(
            "apple.max_events_in_flight",
            raw.apple.max_events_in_flight,
        )?,
    };
    if apple.timeout.is_zero() {
        return Err(invalid("apple.timeout", "must be more than zero".into()));
    }

    if raw.tokens.is_empty() {
        return Err(invalid(
            "tokens",
            "at least one [[tokens]] entry is needed".into(),
        ));
    }
    let mut tokens = Vec::new();
    for (i, t) in raw.tokens.into_iter().enumerate() {
        let key = format!("tokens[{i}]");
        if t.name.trim().is_empty() {
            return Err(invalid(&format!("{key}.name"), "must not be empty".into()));
        }
        if tokens.iter().any(|o: &TokenConfig| o.name == t.name) {
            return Err(invalid(
                &format!("{key}.name"),
                format!("`{}` is used twice", t.name),
            ));
        }
        if t.stoken_file.trim().is_empty() {
            return Err(invalid(
                &format!("{key}.stoken_file"),
                "must not be empty".into(),
            ));
        }
        tokens.push(TokenConfig {
            name: t.name,
            stoken_file: PathBuf::from(t.stoken_file),
            takeover: t.takeover,
        });
    }

    let notifications = NotificationsConfig {
        listen: socket("notifications.listen", &raw.notifications.listen)?,
        public_url: url("notifications.public_url", &raw.notifications.public_url)?,
        auth_token_file: {
            if raw.notifications.auth_token_file.trim().is_empty() {
                return Err(invalid(
                    "notifications.auth_token_file",
                    "must not be empty".into(),
                ));
            }
            PathBuf::from(raw.notifications.auth_token_file)
        },
        max_body_bytes: match raw.notifications.max_body_bytes {
            Some(v) => positive("notifications.max_body_bytes", v)?,
            None => 1 << 20,
        },
        connections: connection_limits(
            "notifications",
            [
                raw.notifications.idle_timeout.as_deref(),
                raw.notifications.header_read_timeout.as_deref(),
                raw.notifications.body_read_timeout.as_deref(),
            ],
            raw.notifications.max_connections,
            ConnectionLimits {
                max_connections: 1024,
                body_read_timeout: Duration::from_secs(30),
                ..ConnectionLimits::default()
            },
        )?,
    };
    if notifications.public_url.contains('?') {
        return Err(invalid(
            "notifications.public_url",
            "must hold only a host and a path (Apple refuses query strings)".into(),
        ));
    }

    let tracking = TrackingConfig {
        status_poll_after: duration(
            "tracking.status_poll_after",
            &raw.tracking.status_poll_after,
        )?,
        status_poll_interval: duration(
            "tracking.status_poll_interval",
            &raw.tracking.status_poll_interval,
        )?,
        sync_after: duration("tracking.sync_after", &raw.tracking.sync_after)?,
        resubmit_after: duration("tracking.resubmit_after", &raw.tracking.resubmit_after)?,
        drift_every: duration("tracking.drift_every", &raw.tracking.drift_every)?,
    };
    if tracking.drift_every.is_zero() {
        return Err(invalid(
            "tracking.drift_every",
            "must be more than zero".into(),
        ));
    }
    if tracking.resubmit_after.is_zero() {
        return Err(invalid(
            "tracking.resubmit_after",
            "must be more than zero".into(),
        ));
    }
    if tracking.status_poll_interval.is_zero() {
        return Err(invalid(
            "tracking.status_poll_interval",
            "must be more than zero".into(),
        ));
    }

    let admin = AdminConfig {
        listen: socket("admin.listen", &raw.admin.listen)?,
        token_file: Some(raw.admin.token_file)
            .filter(|s| !s.trim().is_empty())
            .map(PathBuf::from),
        max_body_bytes: match raw.admin.max_body_bytes {
            Some(v) => positive("admin.max_body_bytes", v)?,
            None => 64 << 20,
        },
        max_job_targets: match raw.admin.max_job_targets {
            Some(v) => positive("admin.max_job_targets", v)?,
            None => 1_000_000,
        },
        drain_timeout: match &raw.admin.drain_timeout {
            Some(v) => duration("admin.drain_timeout", v)?,
            None => Duration::from_secs(10),
        },
        connections: connection_limits(
            "admin",
            [
                raw.admin.idle_timeout.as_deref(),
                raw.admin.header_read_timeout.as_deref(),
                raw.admin.body_read_timeout.as_deref(),
            ],
            raw.admin.max_connections,
            ConnectionLimits {
                max_connections: 256,
                // Room for a 64 MiB job over a slow link.
                body_read_timeout: Duration::from_secs(120),
                ..ConnectionLimits::default()
            },
        )?,
    };

    let install = InstallConfig {
        webhook_url: url("install.webhook_url", &raw.install.webhook_url)?,
        auth_header: Some(raw.install.auth_header).filter(|s| !s.trim().is_empty()),
        batch_size: positive("install.batch_size", raw.install.batch_size)?,
        timeout: match &raw.install.timeout {
            Some(v) => duration("install.timeout", v)?,
            None => Duration::from_secs(30),
        },
        signing_secret_file: Some(raw.install.signing_secret_file)
            .filter(|s| !s.trim().is_empty())
            .map(PathBuf::from),
        signing_secret: None,
    };
    if let Some(h) = &install.auth_header
        && reqwest::header::HeaderValue::from_str(h).is_err()
    {
        return Err(invalid(
            "install.auth_header",
            "is not a valid HTTP header value".into(),
        ));
    }

    let logging = LoggingConfig {
        format: match raw.logging.format.as_deref() {
            None | Some("plain") => LogFormat::Plain,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "logging.format",
                    format!("`{other}` is not one of \"plain\", \"json\""),
                ));
            }
        },
    };

    let store = StoreConfig {
        kind: match raw.store.kind.as_deref() {
            None | Some("sled") => {
                if raw.store.url_file.is_some() {
                    return Err(invalid(
                        "store.url_file",
                        "is only for kind = \"postgres\"".into(),
                    ));
                }
                StoreKind::Sled
            }
            Some("postgres") => match raw.store.url_file.filter(|f| !f.trim().is_empty()) {
                Some(f) => StoreKind::Postgres {
                    url_file: PathBuf::from(f),
                },
                None => {
                    return Err(invalid(
                        "store.url_file",
                        "is required with kind = \"postgres\": the file holding postgres://user:password@host/db".into(),
                    ));
                }
            },
            Some(other) => {
                return Err(invalid(
                    "store.kind",
                    format!("`{other}` is not one of \"sled\", \"postgres\""),
                ));
            }
        },
    };

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
        store,
    })
}

#[cfg(test)]
mod tests {
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
        ] {
            let err = parse(&format!("{EXAMPLE}\n[store]\n{section}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{section}: {err}");
        }
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
    fn install_debug_hides_the_auth_header() {
        let text = EXAMPLE.replace("auth_header = \"\"", "auth_header = \"Bearer hunter2\"");
        let c = parse(&text).unwrap();
        assert!(!format!("{:?}", c).contains("hunter2"));
    }
}
