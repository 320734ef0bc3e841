//! The operator commands that talk to a running daemon's job API
//! (`vppd submit`, `status`, `cancel`, `failures`) or only read files
//! (`vppd check-config`, `vppd plan`).
//!
//! Errors are written for the person at the terminal: "connection refused"
//! rather than reqwest's "error sending request", a URL without a scheme
//! named as such, the daemon's own `{"error": ...}` text on a refusal.

pub mod demo;
pub mod demo_users;
pub mod progress;
pub mod sink;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cli::progress::JobProgress;
use crate::domain::job::{Failure, JobLimits, JobRequest, JobStatus, Phase};
use crate::domain::plan::{Plan, Shape};
use crate::runtime::config::Config;

/// The admin listener's default address (`[admin] listen`).
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9180";

/// How long `status --watch` keeps retrying a daemon that does not answer
/// (a restart or upgrade takes seconds; a daemon gone for this long is not
/// coming back by itself).
const WATCH_GIVE_UP: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Message(String),
    #[error("--admin `{url}`: {message}")]
    BadUrl { url: String, message: String },
    #[error("cannot reach vppd at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("vppd answered {status}: {message}")]
    Refused { status: u16, message: String },
}

impl CliError {
    /// The daemon may be back in a moment: not reachable, or answering
    /// 502/503/504 (draining, a proxy in front of a restarting daemon).
    fn is_transient(&self) -> bool {
        match self {
            CliError::Unreachable { .. } => true,
            CliError::Refused { status, .. } => matches!(status, 502..=504),
            _ => false,
        }
    }
}

pub fn read_admin_token(path: Option<&Path>) -> Result<Option<String>, CliError> {
    match path {
        None => Ok(None),
        Some(p) => std::fs::read_to_string(p)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| {
                CliError::Message(format!(
                    "admin token file {}: {}",
                    p.display(),
                    io_reason(&e)
                ))
            }),
    }
}

/// An io error's text without the "(os error N)" that only repeats it.
pub fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The root cause of a failed request, in words: "connection refused", "no
/// answer within 60 s", the resolver's message.
fn send_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "no answer within 60 s".into();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut deepest: Option<&(dyn std::error::Error + 'static)> = None;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "connection refused (is `vppd run` up, and is this its admin.listen address?)"
                        .into()
                }
                _ => io_reason(io),
            };
        }
        deepest = Some(s);
        source = s.source();
    }
    match deepest {
        Some(s) => s.to_string(),
        None => e.to_string(),
    }
}

/// A client of one daemon's job API.
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// `admin` must be an http:// or https:// URL; a bare `host:port` is
    /// refused naming the missing scheme.
    pub fn new(admin: &str, admin_token: Option<&str>) -> Result<AdminClient, CliError> {
        let bad = |message: String| CliError::BadUrl {
            url: admin.to_string(),
            message,
        };
        // `127.0.0.1:9180` does not parse as a URL, and `localhost:9180`
        // parses with the scheme "localhost": both lack the scheme.
        if !admin.contains("://") {
            return Err(bad(format!("no URL scheme; write http://{admin}")));
        }
        match reqwest::Url::parse(admin) {
            Ok(url) if !matches!(url.scheme(), "http" | "https") => {
                return Err(bad(format!(
                    "scheme `{}` is not http or https",
                    url.scheme()
                )));
            }
            Ok(url) if !url.has_host() => return Err(bad("no host".into())),
            Ok(_) => {}
            Err(e) => return Err(bad(e.to_string())),
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = admin_token {
            let value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    CliError::Message("the admin token is not a valid header value".into())
                })?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| CliError::Message(format!("cannot build an HTTP client: {e}")))?;
        Ok(AdminClient {
            base: admin.trim_end_matches('/').to_string(),
            http,
        })
    }

    fn job_url(&self, id: &str) -> String {
        format!(
            "{}/v1/jobs/{}",
            self.base,
            crate::runtime::http::percent_encode(id)
        )
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, CliError> {
        let resp = request.send().await.map_err(|e| CliError::Unreachable {
            url: url.to_string(),
            message: send_reason(&e),
        })?;
        if !resp.status().is_success() {
            return Err(refused(resp).await);
        }
        Ok(resp)
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, CliError> {
        self.send(request, url)
            .await?
            .json()
            .await
            .map_err(|e| CliError::Message(format!("unexpected answer from {url}: {e}")))
    }

    pub async fn job(&self, id: &str) -> Result<JobStatus, CliError> {
        let url = self.job_url(id);
        self.json(self.http.get(&url), &url).await
    }

    pub async fn jobs(&self) -> Result<Vec<JobStatus>, CliError> {
        #[derive(serde::Deserialize)]
        struct List {
            jobs: Vec<JobStatus>,
        }
        let url = format!("{}/v1/jobs", self.base);
        let list: List = self.json(self.http.get(&url), &url).await?;
        Ok(list.jobs)
    }

    pub async fn failures(&self, id: &str) -> Result<Vec<Failure>, CliError> {
        #[derive(serde::Deserialize)]
        struct List {
            failures: Vec<Failure>,
        }
        let url = format!("{}/failures", self.job_url(id));
        let list: List = self.json(self.http.get(&url), &url).await?;
        Ok(list.failures)
    }

    pub async fn cancel(&self, id: &str) -> Result<JobStatus, CliError> {
        let url = self.job_url(id);
        self.json(self.http.delete(&url), &url).await
    }

    fn token_url(&self, name: &str) -> String {
        format!(
            "{}/v1/tokens/{}",
            self.base,
            crate::runtime::http::percent_encode(name)
        )
    }

    /// Adds or replaces a token; whether it was added, and its document.
    pub async fn put_token(
        &self,
        name: &str,
        stoken: &str,
        takeover: bool,
    ) -> Result<(bool, serde_json::Value), CliError> {
        let url = self.token_url(name);
        let request = self
            .http
            .put(&url)
            .json(&serde_json::json!({"stoken": stoken, "takeover": takeover}));
        let resp = self.send(request, &url).await?;
        let added = resp.status() == reqwest::StatusCode::CREATED;
        let doc = resp
            .json()
            .await
            .map_err(|e| CliError::Message(format!("unexpected answer from {url}: {e}")))?;
        Ok((added, doc))
    }

    /// `{"tokens": [token documents]}`.
    pub async fn tokens(&self) -> Result<serde_json::Value, CliError> {
        let url = format!("{}/v1/tokens", self.base);
        self.json(self.http.get(&url), &url).await
    }

    pub async fn rotate_secret(&self, name: &str) -> Result<serde_json::Value, CliError> {
        let url = format!("{}/rotate-secret", self.token_url(name));
        self.json(self.http.post(&url), &url).await
    }

    pub async fn delete_token(&self, name: &str) -> Result<serde_json::Value, CliError> {
        let url = self.token_url(name);
        self.json(self.http.delete(&url), &url).await
    }

    /// Posts a job body; returns its status document.
    pub async fn submit(&self, body: Vec<u8>) -> Result<JobStatus, CliError> {
        let url = format!("{}/v1/jobs", self.base);
        let request = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.json(request, &url).await
    }
}

async fn refused(resp: reqwest::Response) -> CliError {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    CliError::Refused { status, message }
}

/// Posts a job file; returns the job id.
pub async fn submit(
    admin: &str,
    file: &Path,
    admin_token: Option<&str>,
) -> Result<String, CliError> {
    let client = AdminClient::new(admin, admin_token)?;
    let body = std::fs::read(file).map_err(|e| {
        CliError::Message(format!("job file {}: {}", file.display(), io_reason(&e)))
    })?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| CliError::Message(format!("job file {} is not JSON: {e}", file.display())))?;
    Ok(client.submit(body).await?.id.into_string())
}

/// Prints one job (or all jobs); with `watch`, a live progress bar until
/// the job ends, riding out a daemon restart. Returns the final state of
/// the job when one is named.
pub async fn status(
    admin: &str,
    job: Option<&str>,
    watch: bool,
    admin_token: Option<&str>,
) -> Result<Option<String>, CliError> {
    let client = AdminClient::new(admin, admin_token)?;
    let Some(id) = job else {
        let jobs = client.jobs().await?;
        println!(
            "{:<36} {:<10} {:>12} {:>12} {:>10} {:>12}",
            "JOB", "STATE", "CONFIRMED", "TOTAL", "FAILED", "RELEASED"
        );
        for j in jobs {
            println!(
                "{:<36} {:<10} {:>12} {:>12} {:>10} {:>12}",
                j.id,
                j.state.as_str(),
                j.assignments.confirmed,
                j.assignments.total,
                j.assignments.failed,
                j.installs.released
            );
        }
        return Ok(None);
    };
    if !watch {
        let s = client.job(id).await?;
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(Some(s.state.as_str().to_string()));
    }
    let mut progress = JobProgress::stderr();
    // The job lives in the daemon's store, so it survives a restart of the
    // daemon; the watch does too.
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match client.job(id).await {
            Ok(s) => {
                if unreachable_since.take().is_some() {
                    progress.note("vppd answers again");
                }
                progress.update(&s);
                if s.state.is_final() {
                    progress.finish();
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                    return Ok(Some(s.state.as_str().to_string()));
                }
            }
            Err(e) if e.is_transient() => {
                let since = *unreachable_since.get_or_insert_with(|| {
                    progress.note(&format!("{e}; retrying until it is back"));
                    Instant::now()
                });
                if since.elapsed() > WATCH_GIVE_UP {
                    progress.finish();
                    return Err(CliError::Message(format!(
                        "{e}; gave up after {} minutes",
                        WATCH_GIVE_UP.as_secs() / 60
                    )));
                }
            }
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Cancels what is not yet sent; prints what happened.
pub async fn cancel(admin: &str, id: &str, admin_token: Option<&str>) -> Result<String, CliError> {
    let client = AdminClient::new(admin, admin_token)?;
    let s = client.cancel(id).await?;
    Ok(match s.state {
        crate::domain::job::JobState::Canceled => format!(
            "job {}: canceled; {} of {} requests had been sent to Apple, their outcome is still tracked and confirmed installs are still released\n",
            s.id, s.requests.submitted, s.requests.planned
        ),
        state => format!(
            "job {}: already {}, nothing to cancel\n",
            s.id,
            state.as_str()
        ),
    })
}

/// Every failed pair of a job, as a table or as CSV.
pub async fn failures(
    admin: &str,
    id: &str,
    csv: bool,
    admin_token: Option<&str>,
) -> Result<String, CliError> {
    let client = AdminClient::new(admin, admin_token)?;
    let failures = client.failures(id).await?;
    Ok(if csv {
        failures_csv(&failures)
    } else {
        failures_table(&failures)
    })
}

fn phase_name(f: &Failure) -> &'static str {
    f.phase.unwrap_or(Phase::Associate).as_str()
}

fn failures_table(failures: &[Failure]) -> String {
    let mut out = format!(
        "{:<12} {:<6} {:<14} {:<24} {:>6}  {}\n",
        "ADAMID", "PRICE", "PHASE", "TARGET", "ERROR", "MESSAGE"
    );
    for f in failures {
        let target = match (&f.serial_number, &f.client_user_id) {
            (Some(s), _) => format!("serial {s}"),
            (None, Some(u)) => format!("user {u}"),
            (None, None) => String::new(),
        };
        out.push_str(&format!(
            "{:<12} {:<6} {:<14} {:<24} {:>6}  {}\n",
            f.adam_id,
            f.pricing_param,
            phase_name(f),
            target,
            f.error_number,
            f.error_message
        ));
    }
    out.push_str(&format!("{} failed pairs\n", failures.len()));
    out
}

/// RFC 4180: quote a field holding a comma, quote or line break, doubling
/// the quotes inside.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn failures_csv(failures: &[Failure]) -> String {
    let mut out = String::from(
        "adamId,pricingParam,phase,serialNumber,clientUserId,errorNumber,errorMessage,eventId\n",
    );
    for f in failures {
        let fields = [
            csv_field(&f.adam_id),
            csv_field(&f.pricing_param),
            phase_name(f).to_string(),
            csv_field(f.serial_number.as_deref().unwrap_or("")),
            csv_field(f.client_user_id.as_deref().unwrap_or("")),
            f.error_number.to_string(),
            csv_field(&f.error_message),
            csv_field(f.event_id.as_deref().unwrap_or("")),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// Validates a config and the files it names; returns a summary.
pub fn check_config(path: &Path) -> Result<String, CliError> {
    let config = Config::load(path).map_err(|e| CliError::Message(e.to_string()))?;
    let tokens = config
        .check_files()
        .map_err(|e| CliError::Message(e.to_string()))?;
    let mut out = format!("{}: OK\n", path.display());
    if !config.store.is_shared()
        && config
            .check_data_dir()
            .map_err(|e| CliError::Message(e.to_string()))?
            == crate::runtime::config::DataDir::Missing
    {
        out.push_str(&format!(
            "  data_dir {} does not exist yet: vppd run creates it (mode 0700)\n",
            config.data_dir.display()
        ));
    }
    for (name, t) in tokens {
        let days = (t.expires_at() - time::OffsetDateTime::now_utc()).whole_days();
        out.push_str(&format!(
            "  token `{name}`: {}, expires {} ({} days)\n",
            t.org_name(),
            crate::apple::token::format_apple_date(t.expires_at()),
            days
        ));
        if days < 0 {
            return Err(CliError::Message(format!(
                "token `{name}` ({}) expired on {}",
                config
                    .token(&name)
                    .map(|t| t.stoken_file.display().to_string())
                    .unwrap_or_default(),
                crate::apple::token::format_apple_date(t.expires_at())
            )));
        }
    }
    if !config.notifications.public_url.starts_with("https://") {
        out.push_str("  warning: notifications.public_url is not https://; Apple needs HTTPS in front of it\n");
    }
    for warning in config.warnings() {
        out.push_str(&format!("  warning: {warning}\n"));
    }
    Ok(out)
}

/// Dry run: the batches a job file turns into with the given (or Apple's
/// sample) limits, without calling Apple.
pub fn plan(job_file: &Path, config: Option<&Path>, shape: Shape) -> Result<String, CliError> {
    let body = std::fs::read(job_file).map_err(|e| {
        CliError::Message(format!(
            "job file {}: {}",
            job_file.display(),
            io_reason(&e)
        ))
    })?;
    let request: JobRequest = serde_json::from_slice(&body)
        .map_err(|e| CliError::Message(format!("job file {}: {e}", job_file.display())))?;
    // Without a config every token name passes: only the shape is checked.
    let (names, limits): (Option<Vec<String>>, JobLimits) = match config {
        Some(p) => {
            let c = Config::load(p).map_err(|e| CliError::Message(e.to_string()))?;
            (
                Some(c.tokens.iter().map(|t| t.name.clone()).collect()),
                c.admin.job_limits(),
            )
        }
        None => (None, JobLimits::NONE),
    };
    let known = |t: &str| names.as_ref().is_none_or(|n| n.iter().any(|x| x == t));
    let spec = request
        .validate(known, limits)
        .map_err(|e| CliError::Message(format!("job file {}: {}", job_file.display(), e.0)))?;
    let mut plan = Plan::for_job(&spec);
    let total = plan.remaining(shape);
    let mut out = format!(
        "job {}: {} assets; disassociate {} targets, associate {} targets\nlimits: {} assets, {} serial numbers, {} client user ids per request\n",
        spec.id,
        spec.assets.len(),
        spec.disassociate.len(),
        spec.associate.len(),
        shape.max_assets,
        shape.max_serials,
        shape.max_users
    );
    let mut n = 0;
    while let Some(b) = plan.next_batch(shape) {
        n += 1;
        if n <= 50 {
            out.push_str(&format!(
                "  {:>5}  {:<12} assets {:>4}..{:<4} serials {:>7}..{:<7} users {:>7}..{:<7} ({} pairs)\n",
                n,
                b.phase.as_str(),
                b.rect.assets.start,
                b.rect.assets.end,
                b.rect.serials.start,
                b.rect.serials.end,
                b.rect.users.start,
                b.rect.users.end,
                b.rect.pairs()
            ));
        }
    }
    if n > 50 {
        out.push_str(&format!("  ... {} more\n", n - 50));
    }
    out.push_str(&format!(
        "requests: {total} ({} disassociation pairs, {} association pairs)\n",
        spec.pair_count(Phase::Disassociate),
        spec.pair_count(Phase::Associate)
    ));
    Ok(out)
}

/// `vppd token add NAME FILE`: puts a token file into a running daemon
/// (added, or renewed when NAME exists). Prints the token's state.
pub async fn token_add(
    admin: &str,
    name: &str,
    file: &Path,
    takeover: bool,
    admin_token: Option<&str>,
) -> Result<String, CliError> {
    let stoken = std::fs::read_to_string(file).map_err(|e| {
        CliError::Message(format!("token file {}: {}", file.display(), io_reason(&e)))
    })?;
    // Checked here too, so a wrong file is named before anything is sent.
    crate::apple::token::SToken::parse(&stoken).map_err(|e| {
        CliError::Message(format!(
            "token file {} is not an sToken: {e}",
            file.display()
        ))
    })?;
    let client = AdminClient::new(admin, admin_token)?;
    let (added, doc) = client.put_token(name, stoken.trim(), takeover).await?;
    Ok(format!(
        "token {name} {}: {}\n",
        if added { "added" } else { "replaced" },
        token_line(&doc)
    ))
}

fn token_line(doc: &serde_json::Value) -> String {
    let s = |k: &str| doc[k].as_str().unwrap_or("-").to_string();
    let mut line = format!(
        "{} (location {}, expires {})",
        s("state"),
        s("locationName"),
        s("expiresAt")
    );
    if let Some(e) = doc["error"].as_str() {
        line.push_str(&format!(": {e}"));
    }
    line
}

/// `vppd token list`: one line per token.
pub async fn token_list(admin: &str, admin_token: Option<&str>) -> Result<String, CliError> {
    let client = AdminClient::new(admin, admin_token)?;
    let list = client.tokens().await?;
    let mut out = String::new();
    for doc in list["tokens"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{}\t{}\t{}\n",
            doc["name"].as_str().unwrap_or("-"),
            doc["source"].as_str().unwrap_or("-"),
            token_line(doc)
        ));
    }
    if out.is_empty() {
        out.push_str("no tokens\n");
    }
    Ok(out)
}

/// `vppd token rm NAME`: forgets a token added through the API.
pub async fn token_rm(
    admin: &str,
    name: &str,
    admin_token: Option<&str>,
) -> Result<String, CliError> {
    AdminClient::new(admin, admin_token)?
        .delete_token(name)
        .await?;
    Ok(format!("token {name} removed\n"))
}

/// `vppd token rotate-secret NAME`: a new notification secret for the token.
pub async fn token_rotate_secret(
    admin: &str,
    name: &str,
    admin_token: Option<&str>,
) -> Result<String, CliError> {
    let doc = AdminClient::new(admin, admin_token)?
        .rotate_secret(name)
        .await?;
    Ok(format!(
        "token {name}: new notification secret; the old one is accepted for 10 more minutes; {}\n",
        token_line(&doc)
    ))
}
