//! The operator commands that talk to a running daemon's job API
//! (`vppd submit`, `vppd status`) or only read files (`vppd check-config`,
//! `vppd plan`).

use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::job::{JobRequest, JobStatus, Phase};
use crate::plan::{Plan, Shape};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Message(String),
    #[error("cannot reach vppd at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("vppd answered {status}: {message}")]
    Refused { status: u16, message: String },
}

fn client(admin_token: Option<&str>) -> Result<reqwest::Client, CliError> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = admin_token {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| CliError::Message("the admin token is not a valid header value".into()))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| CliError::Message(e.to_string()))
}

pub fn read_admin_token(path: Option<&Path>) -> Result<Option<String>, CliError> {
    match path {
        None => Ok(None),
        Some(p) => std::fs::read_to_string(p)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|e| CliError::Message(format!("admin token file {}: {e}", p.display()))),
    }
}

async fn refused(resp: reqwest::Response) -> CliError {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or(text);
    CliError::Refused { status, message }
}

/// Posts a job file; returns the job id.
pub async fn submit(
    admin: &str,
    file: &Path,
    admin_token: Option<&str>,
) -> Result<String, CliError> {
    let body = std::fs::read(file)
        .map_err(|e| CliError::Message(format!("job file {}: {e}", file.display())))?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| CliError::Message(format!("job file {} is not JSON: {e}", file.display())))?;
    let url = format!("{}/v1/jobs", admin.trim_end_matches('/'));
    let resp = client(admin_token)?
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| CliError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
    if !resp.status().is_success() {
        return Err(refused(resp).await);
    }
    let status: JobStatus = resp
        .json()
        .await
        .map_err(|e| CliError::Message(format!("unexpected answer: {e}")))?;
    Ok(status.id)
}

async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
) -> Result<T, CliError> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| CliError::Unreachable {
            url: url.to_string(),
            message: e.to_string(),
        })?;
    if !resp.status().is_success() {
        return Err(refused(resp).await);
    }
    resp.json()
        .await
        .map_err(|e| CliError::Message(format!("unexpected answer from {url}: {e}")))
}

/// Prints one job (or all jobs); with `watch`, a live progress bar until
/// the job ends. Returns the final state of the job when one is named.
pub async fn status(
    admin: &str,
    job: Option<&str>,
    watch: bool,
    admin_token: Option<&str>,
) -> Result<Option<String>, CliError> {
    let http = client(admin_token)?;
    let base = admin.trim_end_matches('/');
    let Some(id) = job else {
        #[derive(serde::Deserialize)]
        struct List {
            jobs: Vec<JobStatus>,
        }
        let list: List = get_json(&http, &format!("{base}/v1/jobs")).await?;
        println!(
            "{:<36} {:<10} {:>12} {:>12} {:>10} {:>12}",
            "JOB", "STATE", "CONFIRMED", "TOTAL", "FAILED", "RELEASED"
        );
        for j in list.jobs {
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
    let url = format!("{base}/v1/jobs/{}", crate::http::percent_encode(id));
    loop {
        let s: JobStatus = get_json(&http, &url).await?;
        if !watch || s.state.is_final() {
            if watch {
                crate::demo::progress_line(&s, s.assignments.total);
                eprintln!();
            }
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            return Ok(Some(s.state.as_str().to_string()));
        }
        crate::demo::progress_line(&s, s.assignments.total);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Validates a config and the files it names; returns a summary.
pub fn check_config(path: &Path) -> Result<String, CliError> {
    let config = Config::load(path).map_err(|e| CliError::Message(e.to_string()))?;
    let tokens = config
        .check_files()
        .map_err(|e| CliError::Message(e.to_string()))?;
    let mut out = format!("{}: OK\n", path.display());
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
    Ok(out)
}

/// Dry run: the batches a job file turns into with the given (or Apple's
/// sample) limits, without calling Apple.
pub fn plan(job_file: &Path, config: Option<&Path>, shape: Shape) -> Result<String, CliError> {
    let body = std::fs::read(job_file)
        .map_err(|e| CliError::Message(format!("job file {}: {e}", job_file.display())))?;
    let request: JobRequest = serde_json::from_slice(&body)
        .map_err(|e| CliError::Message(format!("job file {}: {e}", job_file.display())))?;
    // Without a config every token name passes: only the shape is checked.
    let (names, max_targets): (Option<Vec<String>>, usize) = match config {
        Some(p) => {
            let c = Config::load(p).map_err(|e| CliError::Message(e.to_string()))?;
            (
                Some(c.tokens.iter().map(|t| t.name.clone()).collect()),
                c.admin.max_job_targets,
            )
        }
        None => (None, usize::MAX),
    };
    let known = |t: &str| names.as_ref().is_none_or(|n| n.iter().any(|x| x == t));
    let spec = request
        .validate(known, max_targets)
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
