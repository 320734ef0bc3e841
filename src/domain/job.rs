//! The domain types of an assignment job, defined once and used by every
//! stage: the validated job spec, its targets, pairs and status document.

use std::collections::HashSet;
use std::fmt::{Display, Write as _};

use serde::{Deserialize, Serialize};

pub use crate::domain::ids::{CommandUuid, JobId};

/// `pricingParam` value for standard quality; Apple treats a missing value as this.
pub const STDQ: &str = "STDQ";
/// `pricingParam` value for high quality.
pub const PLUS: &str = "PLUS";

/// Apple's `eventType` values: the management requests a job makes.
pub mod event_type {
    pub const ASSOCIATE: &str = "ASSOCIATE";
    pub const DISASSOCIATE: &str = "DISASSOCIATE";
    pub const REVOKE: &str = "REVOKE";
    pub const CREATE: &str = "CREATE";
    pub const UPDATE: &str = "UPDATE";
    pub const RETIRE: &str = "RETIRE";
}

/// An asset the job assigns: Apple identifies it by (`adamId`, `pricingParam`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobAsset {
    pub adam_id: String,
    pub pricing_param: String,
}

/// Devices and users of one phase.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Targets {
    #[serde(default)]
    pub serial_numbers: Vec<String>,
    #[serde(default)]
    pub client_user_ids: Vec<String>,
}

impl Targets {
    pub fn len(&self) -> usize {
        self.serial_numbers.len() + self.client_user_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What `POST /v1/jobs` accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobRequest {
    #[serde(default)]
    pub id: Option<String>,
    pub token: String,
    /// Not needed by a job that only revokes.
    #[serde(default)]
    pub assets: Vec<RequestAsset>,
    #[serde(default)]
    pub disassociate: Option<Targets>,
    /// Apple's revoke: every revocable license of these targets, whatever
    /// the asset.
    #[serde(default)]
    pub revoke: Option<Targets>,
    #[serde(default)]
    pub associate: Option<Targets>,
    #[serde(default)]
    pub install: Option<bool>,
    /// Release a `RemoveApplication` command for every confirmed
    /// disassociation and revocation.
    #[serde(default)]
    pub uninstall: Option<bool>,
    /// On a license shortfall, wait (state `accepted`, `waitingFor` saying
    /// what is short) instead of failing.
    #[serde(default)]
    pub wait_for_licenses: Option<bool>,
    /// Go on when licenses fall short: the pairs Apple cannot serve fail
    /// individually instead of failing the whole job up front.
    #[serde(default, alias = "partial")]
    pub allow_partial: Option<bool>,
    /// Users the job describes: created at Apple (or updated) before the
    /// job's first association when Apple lacks them.
    #[serde(default)]
    pub users: Vec<JobUser>,
    /// Users to retire (Apple's Retire Users), before the associations.
    #[serde(default)]
    pub retire_users: Vec<String>,
    /// `"high"` or `"normal"` (the default): a high-priority job's batches
    /// go ahead of every normal batch of the token not yet sent.
    #[serde(default)]
    pub priority: Option<serde_json::Value>,
}

/// A user the job describes (Apple's `RequestUser`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobUser {
    #[serde(default)]
    pub client_user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_apple_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAsset {
    pub adam_id: serde_json::Value,
    #[serde(default)]
    pub pricing_param: Option<String>,
}

/// A validated, normalized job: duplicates removed, defaults applied.
/// Two requests that normalize to the same spec are the same job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    pub id: JobId,
    pub token: String,
    pub assets: Vec<JobAsset>,
    pub disassociate: Targets,
    pub associate: Targets,
    pub install: bool,
    pub allow_partial: bool,
    // Later fields are left out while at their default, so that the spec
    // hash of a job stored before they existed does not change.
    #[serde(default, skip_serializing_if = "Targets::is_empty")]
    pub revoke: Targets,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uninstall: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wait_for_licenses: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<JobUser>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retire_users: Vec<String>,
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
}

/// How a job's batches are ordered against the other jobs of its token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Round robin with the token's other normal jobs.
    #[default]
    Normal,
    /// Ahead of every normal batch not yet sent.
    High,
}

impl Priority {
    pub fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }

    fn parse(value: Option<serde_json::Value>) -> Result<Priority, JobError> {
        match value {
            None | Some(serde_json::Value::Null) => Ok(Priority::Normal),
            Some(serde_json::Value::String(s)) if s == "normal" => Ok(Priority::Normal),
            Some(serde_json::Value::String(s)) if s == "high" => Ok(Priority::High),
            Some(other) => Err(JobError(format!(
                "priority: `{other}` is not \"high\" or \"normal\""
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JobError(pub String);

const MAX_ID_LEN: usize = 128;
const MAX_TARGET_LEN: usize = 256;

/// How large one job may be (the `[admin]` keys of the same names). Every
/// pair costs store space and, once confirmed, an install command, so the
/// product is bounded as well as each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    /// Serial numbers plus client user ids, both phases (`max_job_targets`).
    pub max_targets: usize,
    /// Assets as listed (`max_job_assets`).
    pub max_assets: usize,
    /// Assets x targets, both phases (`max_job_pairs`).
    pub max_pairs: u64,
}

impl JobLimits {
    /// No bound: `vppd plan` without a config checks only the job's shape.
    pub const NONE: JobLimits = JobLimits {
        max_targets: usize::MAX,
        max_assets: usize::MAX,
        max_pairs: u64::MAX,
    };
}

/// Items a list inside an error or a status document shows; the rest are
/// only counted, so a job with a million bad entries makes a short message.
pub const LIST_CAP: usize = 20;

/// The first [`LIST_CAP`] items joined with `separator`, then `and N more`.
/// The iterator is walked to the end to count, never collected.
pub fn capped_list<I>(items: I, separator: &str) -> String
where
    I: IntoIterator,
    I::Item: Display,
{
    let mut out = String::new();
    let mut n = 0usize;
    for item in items {
        if n < LIST_CAP {
            if n > 0 {
                out.push_str(separator);
            }
            let _ = write!(out, "{item}");
        }
        n += 1;
    }
    if n > LIST_CAP {
        let _ = write!(out, "{separator}and {} more", n - LIST_CAP);
    }
    out
}

impl JobRequest {
    /// Validates and normalizes. `known_token` says whether a token name is
    /// configured; `limits` bounds the job's size. The checks run in a
    /// fixed order, so a request with several faults is always refused for
    /// the same one.
    pub fn validate(
        self,
        known_token: impl Fn(&str) -> bool,
        limits: JobLimits,
    ) -> Result<JobSpec, JobError> {
        let id = match self.id {
            Some(id) => check_id(id)?,
            None => JobId::from(uuid::Uuid::new_v4().to_string()),
        };
        if self.token.is_empty() {
            return Err(JobError("token: must name a configured token".into()));
        }
        if !known_token(&self.token) {
            return Err(JobError(format!(
                "token: `{}` is not a configured token",
                self.token
            )));
        }
        let assets = normalize_assets(self.assets, limits)?;
        let priority = Priority::parse(self.priority)?;
        let disassociate =
            normalize_targets(self.disassociate.unwrap_or_default(), "disassociate")?;
        let associate = normalize_targets(self.associate.unwrap_or_default(), "associate")?;
        let revoke = normalize_targets(self.revoke.unwrap_or_default(), "revoke")?;
        let users = normalize_users(self.users)?;
        let retire_users = dedupe(self.retire_users, "retireUsers")?;
        let spec = JobSpec {
            id,
            token: self.token,
            assets,
            disassociate,
            associate,
            install: self.install.unwrap_or(true),
            allow_partial: self.allow_partial.unwrap_or(false),
            revoke,
            uninstall: self.uninstall.unwrap_or(false),
            wait_for_licenses: self.wait_for_licenses.unwrap_or(false),
            users,
            retire_users,
            priority,
        };
        check_steps(&spec)?;
        check_size(&spec, limits)?;
        check_phases_apart(&spec)?;
        Ok(spec)
    }
}

/// A job id the MDM chose: it names the job in URLs, so it is short and
/// plain.
fn check_id(id: String) -> Result<JobId, JobError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(JobError(format!(
            "id: must be 1 to {MAX_ID_LEN} characters"
        )));
    }
    // They name no job in a URL: /v1/jobs/.. is /v1/.
    if id == "." || id == ".." {
        return Err(JobError(format!(
            "id: `{id}` cannot be used (URLs drop it as a path segment); use letters or digits"
        )));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(JobError(format!(
            "id: `{id}` may hold only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(JobId::from(id))
}

/// The assets as Apple names them, each once, in the order first listed.
fn normalize_assets(
    requested: Vec<RequestAsset>,
    limits: JobLimits,
) -> Result<Vec<JobAsset>, JobError> {
    if requested.len() > limits.max_assets {
        return Err(JobError(format!(
            "assets: the job names {} assets, more than admin.max_job_assets ({})",
            requested.len(),
            limits.max_assets
        )));
    }
    let mut assets = Vec::with_capacity(requested.len());
    let mut seen = HashSet::new();
    for (i, a) in requested.into_iter().enumerate() {
        let asset = normalize_asset(i, a)?;
        if seen.insert(asset.clone()) {
            assets.push(asset);
        }
    }
    Ok(assets)
}

/// Asset `i` of the request: an adamId of digits, a known pricingParam.
fn normalize_asset(i: usize, a: RequestAsset) -> Result<JobAsset, JobError> {
    let adam_id = match &a.adam_id {
        serde_json::Value::String(s) => s.clone(),
        // Apple's own subscription payloads use numbers; accept them.
        serde_json::Value::Number(n) if n.is_u64() => n.to_string(),
        _ => {
            return Err(JobError(format!(
                "assets[{i}].adamId: must be a string of digits"
            )));
        }
    };
    if adam_id.is_empty() || !adam_id.chars().all(|c| c.is_ascii_digit()) || adam_id.len() > 32 {
        return Err(JobError(format!(
            "assets[{i}].adamId: `{adam_id}` is not a store identifier (digits only)"
        )));
    }
    let pricing_param = a.pricing_param.unwrap_or_else(|| STDQ.to_string());
    if pricing_param != STDQ && pricing_param != PLUS {
        return Err(JobError(format!(
            "assets[{i}].pricingParam: `{pricing_param}` is not STDQ or PLUS"
        )));
    }
    Ok(JobAsset {
        adam_id,
        pricing_param,
    })
}

/// The job does something, retires no user it also keeps, and names the
/// assets its associations and disassociations need.
fn check_steps(spec: &JobSpec) -> Result<(), JobError> {
    let (disassociate, associate) = (&spec.disassociate, &spec.associate);
    if disassociate.is_empty()
        && associate.is_empty()
        && spec.revoke.is_empty()
        && spec.users.is_empty()
        && spec.retire_users.is_empty()
    {
        return Err(JobError(
            "associate: at least one of disassociate / revoke / associate needs a serial number or client user id (or the job needs users / retireUsers)"
                .into(),
        ));
    }
    let keep: HashSet<&str> = associate
        .client_user_ids
        .iter()
        .chain(spec.users.iter().map(|u| &u.client_user_id))
        .map(String::as_str)
        .collect();
    if let Some(u) = spec.retire_users.iter().find(|u| keep.contains(u.as_str())) {
        return Err(JobError(format!(
            "retireUsers: `{u}` is also a user the job assigns to or describes"
        )));
    }
    if spec.assets.is_empty() && !(disassociate.is_empty() && associate.is_empty()) {
        return Err(JobError(
            "assets: at least one asset is needed (only a job that just revokes has none)".into(),
        ));
    }
    Ok(())
}

/// The job's targets and pairs within `limits`.
fn check_size(spec: &JobSpec, limits: JobLimits) -> Result<(), JobError> {
    let (disassociate, associate) = (&spec.disassociate, &spec.associate);
    let total = disassociate.len()
        + associate.len()
        + spec.revoke.len()
        + spec.users.len()
        + spec.retire_users.len();
    if total > limits.max_targets {
        return Err(JobError(format!(
            "associate: the job names {total} targets, more than admin.max_job_targets ({})",
            limits.max_targets
        )));
    }
    // A revoke names no assets (Apple takes every license of the
    // target), so its targets make no pairs of their own here.
    let paired = disassociate.len() + associate.len();
    let pairs = (spec.assets.len() as u64).saturating_mul(paired as u64);
    if pairs > limits.max_pairs {
        return Err(JobError(format!(
            "assets: the job is {} assets x {paired} targets = {pairs} pairs, more than admin.max_job_pairs ({})",
            spec.assets.len(),
            limits.max_pairs
        )));
    }
    Ok(())
}

/// No target in both phases: it would be released and then taken again
/// (or the other way round) in one job, almost certainly a mistake.
fn check_phases_apart(spec: &JobSpec) -> Result<(), JobError> {
    let (disassociate, associate) = (&spec.disassociate, &spec.associate);
    in_both(
        &associate.serial_numbers,
        &disassociate.serial_numbers,
        "associate.serialNumbers: also in disassociate.serialNumbers",
    )?;
    in_both(
        &associate.client_user_ids,
        &disassociate.client_user_ids,
        "associate.clientUserIds: also in disassociate.clientUserIds",
    )
}

/// Refuses, with `message` and the first of them, the values of `list`
/// that `other` holds too.
fn in_both(list: &[String], other: &[String], message: &str) -> Result<(), JobError> {
    let other: HashSet<&str> = other.iter().map(String::as_str).collect();
    let mut both = list
        .iter()
        .filter(|s| other.contains(s.as_str()))
        .peekable();
    if both.peek().is_some() {
        return Err(JobError(format!(
            "{message}: {}",
            capped_list(both.map(|s| format!("`{s}`")), ", ")
        )));
    }
    Ok(())
}

/// Checks the described users: `clientUserId` required, each user once,
/// `email` / `managedAppleId` non-empty when given.
fn normalize_users(users: Vec<JobUser>) -> Result<Vec<JobUser>, JobError> {
    let mut seen: HashSet<String> = HashSet::with_capacity(users.len());
    let mut out: Vec<JobUser> = Vec::with_capacity(users.len());
    for (i, u) in users.into_iter().enumerate() {
        let id = &u.client_user_id;
        if id.is_empty() {
            return Err(JobError(format!("users[{i}].clientUserId: required")));
        }
        if id.len() > MAX_TARGET_LEN || id.trim() != id || id.chars().any(char::is_control) {
            return Err(JobError(format!(
                "users[{i}].clientUserId: must be 1 to {MAX_TARGET_LEN} characters without surrounding spaces or control characters"
            )));
        }
        for (field, value) in [("email", &u.email), ("managedAppleId", &u.managed_apple_id)] {
            if let Some(v) = value
                && (v.is_empty() || v.len() > MAX_TARGET_LEN || v.trim() != v || !v.contains('@'))
            {
                return Err(JobError(format!(
                    "users[{i}].{field}: `{v}` is not an address (name@domain, at most {MAX_TARGET_LEN} characters)"
                )));
            }
        }
        if !seen.insert(id.clone()) {
            // The same description twice is harmless; two different ones
            // leave vppd no way to choose.
            if out.iter().any(|o| o == &u) {
                continue;
            }
            return Err(JobError(format!(
                "users[{i}].clientUserId: `{id}` is described twice, differently"
            )));
        }
        out.push(u);
    }
    Ok(out)
}

fn normalize_targets(t: Targets, phase: &str) -> Result<Targets, JobError> {
    Ok(Targets {
        serial_numbers: dedupe(t.serial_numbers, &format!("{phase}.serialNumbers"))?,
        client_user_ids: dedupe(t.client_user_ids, &format!("{phase}.clientUserIds"))?,
    })
}

fn dedupe(values: Vec<String>, field: &str) -> Result<Vec<String>, JobError> {
    let mut seen = HashSet::with_capacity(values.len());
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.into_iter().enumerate() {
        if v.is_empty()
            || v.len() > MAX_TARGET_LEN
            || v.trim() != v
            || v.chars().any(char::is_control)
        {
            return Err(JobError(format!(
                "{field}[{i}]: must be 1 to {MAX_TARGET_LEN} characters without surrounding spaces or control characters"
            )));
        }
        if seen.insert(v.clone()) {
            out.push(v);
        }
    }
    Ok(out)
}

/// The phases of a job, in the order they are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Disassociate,
    /// Apple's revoke: a batch names targets only; Apple names the (asset,
    /// target) pairs it removed. Its "pairs" in a batch are its targets.
    Revoke,
    Associate,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Disassociate, Phase::Revoke, Phase::Associate];

    pub fn event_type(self) -> &'static str {
        match self {
            Phase::Disassociate => event_type::DISASSOCIATE,
            Phase::Revoke => event_type::REVOKE,
            Phase::Associate => event_type::ASSOCIATE,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Disassociate => "disassociate",
            Phase::Revoke => "revoke",
            Phase::Associate => "associate",
        }
    }
}

/// A device or a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target<'a> {
    Serial(&'a str),
    User(&'a str),
}

impl JobSpec {
    pub fn targets(&self, phase: Phase) -> &Targets {
        match phase {
            Phase::Disassociate => &self.disassociate,
            Phase::Revoke => &self.revoke,
            Phase::Associate => &self.associate,
        }
    }

    /// The job's distinct user targets: its associations' users, then the
    /// users it describes and does not assign to. Their positions index the
    /// job's user progress.
    pub fn job_users(&self) -> Vec<&str> {
        let mut seen: HashSet<&str> = HashSet::new();
        self.associate
            .client_user_ids
            .iter()
            .chain(self.users.iter().map(|u| &u.client_user_id))
            .map(String::as_str)
            .filter(|u| seen.insert(u))
            .collect()
    }

    /// Whether the job has a users step before its associations: users to
    /// ensure, invite or retire.
    pub fn has_user_step(&self) -> bool {
        !self.associate.client_user_ids.is_empty()
            || !self.users.is_empty()
            || !self.retire_users.is_empty()
    }

    /// Pairs of a phase: assets x targets (a revoke's pairs are known only
    /// once Apple names them: 0 here).
    pub fn pair_count(&self, phase: Phase) -> u64 {
        match phase {
            Phase::Revoke => 0,
            _ => self.assets.len() as u64 * self.targets(phase).len() as u64,
        }
    }
}

/// `state` of the status document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Accepted,
    Running,
    Completed,
    Failed,
    Canceled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Canceled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Accepted => "accepted",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
        }
    }

    pub const ALL: [JobState; 5] = [
        JobState::Accepted,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Canceled,
    ];
}

/// One failed pair, as `GET /v1/jobs/{id}/failures` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub adam_id: String,
    pub pricing_param: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_user_id: Option<String>,
    pub error_number: i32,
    pub error_message: String,
    pub event_id: Option<String>,
    /// Which phase failed; absent means association.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub planned: u64,
    pub submitted: u64,
    pub completed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairCounts {
    pub total: u64,
    pub confirmed: u64,
    pub failed: u64,
    pub pending: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallCounts {
    pub released: u64,
    pub pending: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCounts {
    /// Distinct user targets of the job.
    pub total: u64,
    /// Those now `Associated` (linked to an Apple Account).
    pub associated: u64,
    /// `InviteToProgram` commands released so far.
    pub invited: u64,
}

/// The status document of the job API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    pub id: JobId,
    pub token: String,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub requests: RequestCounts,
    pub assignments: PairCounts,
    pub disassociations: PairCounts,
    pub installs: InstallCounts,
    /// Pairs Apple named as revoked (asset x target actually revoked).
    #[serde(default)]
    pub revocations: PairCounts,
    /// `RemoveApplication` commands of an uninstall job.
    #[serde(default)]
    pub removals: InstallCounts,
    /// User targets: how many, how many are `Associated`, invitations released.
    #[serde(default)]
    pub users: UserCounts,
    /// Why an `accepted` job has not started (e.g. licenses it waits for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<Vec<Failure>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures_truncated: Option<bool>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// What a command released to the MDM asks it to do.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum RequestType {
    /// Install the app of a confirmed association.
    #[default]
    InstallApplication,
    /// Remove the app of a confirmed disassociation or revocation.
    RemoveApplication,
    /// Invite a registered user to the program (user assignment); carries
    /// `invitationUrl` and no asset.
    InviteToProgram,
}

impl RequestType {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestType::InstallApplication => "InstallApplication",
            RequestType::RemoveApplication => "RemoveApplication",
            RequestType::InviteToProgram => "InviteToProgram",
        }
    }
}

/// Stable install command id for (job, asset, target): a retried delivery
/// carries the same uuid so the MDM can drop repeats.
pub fn command_uuid(job_id: &JobId, asset: &JobAsset, target: Target<'_>) -> CommandUuid {
    command_uuid_of(RequestType::InstallApplication, job_id, asset, target)
}

/// Stable command id for (request type, job, asset, target). Installs keep
/// the ids they always had; a removal of the same pair (a job that revokes
/// a device and then assigns to it) has its own.
pub fn command_uuid_of(
    request: RequestType,
    job_id: &JobId,
    asset: &JobAsset,
    target: Target<'_>,
) -> CommandUuid {
    let (kind, id) = match (request, target) {
        (RequestType::InstallApplication, Target::Serial(s)) => ("serial", s),
        (RequestType::InstallApplication, Target::User(u)) => ("user", u),
        (_, Target::Serial(s)) => ("remove-serial", s),
        (_, Target::User(u)) => ("remove-user", u),
    };
    let name = format!(
        "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
        job_id, asset.adam_id, asset.pricing_param, kind, id
    );
    CommandUuid::from_uuid(uuid::Uuid::new_v5(&COMMAND_NAMESPACE, name.as_bytes()))
}

/// [`command_uuid_of`] for many commands of one job and request type: the
/// hash of what their names share (namespace, job, asset, kind) is computed
/// once per asset, not once per command, and nothing is allocated per
/// command.
pub struct CommandUuids<'a> {
    request: RequestType,
    job_id: &'a JobId,
    /// The last asset and kind, and the hash state after them.
    prefix: Option<(String, String, bool, sha1::Sha1)>,
}

impl<'a> CommandUuids<'a> {
    pub fn new(request: RequestType, job_id: &'a JobId) -> CommandUuids<'a> {
        CommandUuids {
            request,
            job_id,
            prefix: None,
        }
    }

    pub fn of(&mut self, asset: &JobAsset, target: Target<'_>) -> CommandUuid {
        let (serial, id) = match target {
            Target::Serial(s) => (true, s),
            Target::User(u) => (false, u),
        };
        let fresh = !matches!(&self.prefix, Some((a, p, s, _))
            if *a == asset.adam_id && *p == asset.pricing_param && *s == serial);
        if fresh {
            let kind = match (self.request, serial) {
                (RequestType::InstallApplication, true) => "serial",
                (RequestType::InstallApplication, false) => "user",
                (_, true) => "remove-serial",
                (_, false) => "remove-user",
            };
            let mut h = <sha1::Sha1 as sha1::Digest>::new();
            sha1::Digest::update(&mut h, COMMAND_NAMESPACE.as_bytes());
            for part in [
                self.job_id.as_str(),
                &asset.adam_id,
                &asset.pricing_param,
                kind,
            ] {
                sha1::Digest::update(&mut h, part.as_bytes());
                sha1::Digest::update(&mut h, "\u{1f}".as_bytes());
            }
            self.prefix = Some((
                asset.adam_id.clone(),
                asset.pricing_param.clone(),
                serial,
                h,
            ));
        }
        let mut h = match &self.prefix {
            Some((_, _, _, h)) => h.clone(),
            None => <sha1::Sha1 as sha1::Digest>::new(),
        };
        sha1::Digest::update(&mut h, id.as_bytes());
        let digest = sha1::Digest::finalize(h);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        CommandUuid::from_uuid(uuid::Builder::from_sha1_bytes(bytes).into_uuid())
    }
}

const COMMAND_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5b1e_7c1d_93a4_4f0e_9d7a_6c2b_8e41_0f3a);

/// Stable id of the `InviteToProgram` command of (job, user): one per user
/// per job, the same on every retried delivery.
pub fn invite_uuid(job_id: &JobId, client_user_id: &str) -> CommandUuid {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x2c4f_91aa_7d3e_4b61_a0c8_55e2_13f9_6b7d);
    let name = format!("{job_id}\u{1f}invite\u{1f}{client_user_id}");
    CommandUuid::from_uuid(uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Command uuids computed in a run of one job are those each
        /// command always had.
        #[test]
        fn command_uuids_in_a_run_are_the_stable_ones(
            job in "[a-z0-9-]{1,70}",
            request in proptest::sample::select(vec![
                RequestType::InstallApplication,
                RequestType::RemoveApplication,
            ]),
            pairs in proptest::collection::vec(
                ("[0-9]{1,10}", "STDQ|PLUS", proptest::bool::ANY, "[A-Z0-9]{1,80}"),
                1..30,
            ),
        ) {
            let job = JobId::from(job);
            let mut run = CommandUuids::new(request, &job);
            for (adam_id, pricing_param, serial, id) in pairs {
                let asset = JobAsset { adam_id, pricing_param };
                let target = if serial { Target::Serial(&id) } else { Target::User(&id) };
                proptest::prop_assert_eq!(
                    run.of(&asset, target),
                    command_uuid_of(request, &job, &asset, target)
                );
            }
        }
    }

    fn req(json: serde_json::Value) -> Result<JobSpec, JobError> {
        let r: JobRequest = serde_json::from_value(json).map_err(|e| JobError(e.to_string()))?;
        r.validate(
            |t| t == "main",
            JobLimits {
                max_targets: 100,
                max_assets: 10,
                max_pairs: 300,
            },
        )
    }

    #[test]
    fn contract_example_validates() {
        let spec = req(serde_json::json!({
            "id": "back-to-school-2026", "token": "main",
            "assets": [{"adamId": "361309726", "pricingParam": "STDQ"}],
            "disassociate": {"serialNumbers": ["OLD-1", "OLD-2"], "clientUserIds": []},
            "associate": {"serialNumbers": ["C02Y402HLCM6"], "clientUserIds": ["client-100"]},
            "install": true
        }))
        .unwrap();
        assert_eq!(spec.pair_count(Phase::Associate), 2);
        assert_eq!(spec.pair_count(Phase::Disassociate), 2);
        assert!(spec.install);
    }

    #[test]
    fn duplicates_are_removed_and_defaults_applied() {
        let spec = req(serde_json::json!({
            "token": "main",
            "assets": [{"adamId": "1"}, {"adamId": "1", "pricingParam": "STDQ"}, {"adamId": "1", "pricingParam": "PLUS"}],
            "associate": {"serialNumbers": ["A", "A", "B"]}
        }))
        .unwrap();
        assert_eq!(spec.assets.len(), 2);
        assert_eq!(spec.associate.serial_numbers, vec!["A", "B"]);
        assert!(spec.install);
        assert!(!spec.id.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        for (body, field) in [
            (
                serde_json::json!({"token": "other", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": ["A"]}}),
                "token",
            ),
            (
                serde_json::json!({"token": "main", "assets": [], "associate": {"serialNumbers": ["A"]}}),
                "assets",
            ),
            (
                serde_json::json!({"token": "main", "assets": [{"adamId": ""}], "associate": {"serialNumbers": ["A"]}}),
                "assets[0].adamId",
            ),
            (
                serde_json::json!({"token": "main", "assets": [{"adamId": "12a"}], "associate": {"serialNumbers": ["A"]}}),
                "assets[0].adamId",
            ),
            (
                serde_json::json!({"token": "main", "assets": [{"adamId": "1", "pricingParam": "GOLD"}], "associate": {"serialNumbers": ["A"]}}),
                "assets[0].pricingParam",
            ),
            (
                serde_json::json!({"token": "main", "assets": [{"adamId": "1"}]}),
                "associate",
            ),
            (
                serde_json::json!({"token": "main", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": [""]}}),
                "associate.serialNumbers[0]",
            ),
            (
                serde_json::json!({"token": "main", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": ["A"]}, "disassociate": {"serialNumbers": ["A"]}}),
                "associate.serialNumbers",
            ),
            (
                serde_json::json!({"id": "a/b", "token": "main", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": ["A"]}}),
                "id",
            ),
        ] {
            let e = req(body).unwrap_err().0;
            assert!(e.starts_with(field), "expected {field}: {e}");
        }
        let many: Vec<String> = (0..101).map(|i| format!("S{i}")).collect();
        let e = req(serde_json::json!({"token": "main", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": many}}))
            .unwrap_err()
            .0;
        assert!(e.contains("max_job_targets"), "{e}");
    }

    #[test]
    fn dot_ids_are_refused() {
        for id in [".", ".."] {
            let e = req(serde_json::json!({"id": id, "token": "main", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": ["A"]}}))
                .unwrap_err()
                .0;
            assert!(e.starts_with("id:"), "{e}");
        }
        for id in ["...", ".a", "a..b"] {
            let spec = req(serde_json::json!({"id": id, "token": "main", "assets": [{"adamId": "1"}], "associate": {"serialNumbers": ["A"]}}))
                .unwrap();
            assert_eq!(spec.id, id);
        }
    }

    fn assets(n: usize) -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| serde_json::json!({"adamId": (i + 1).to_string()}))
            .collect()
    }

    #[test]
    fn assets_and_pairs_are_bounded_and_the_count_named() {
        // Limits of `req`: 10 assets, 100 targets, 300 pairs.
        let e = req(serde_json::json!({"token": "main", "assets": assets(11), "associate": {"serialNumbers": ["A"]}}))
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("assets:") && e.contains("11 assets") && e.contains("max_job_assets"),
            "{e}"
        );
        // 4 assets x (30 + 50) targets = 320 pairs.
        let dis: Vec<String> = (0..30).map(|i| format!("D{i}")).collect();
        let assoc: Vec<String> = (0..50).map(|i| format!("S{i}")).collect();
        let e = req(serde_json::json!({"token": "main", "assets": assets(4), "disassociate": {"serialNumbers": dis}, "associate": {"serialNumbers": assoc}}))
            .unwrap_err()
            .0;
        assert!(
            e.starts_with("assets:")
                && e.contains("320 pairs")
                && e.contains("max_job_pairs (300)"),
            "{e}"
        );
        // Exactly at the bound passes; duplicates do not count.
        let assoc: Vec<String> = (0..100).map(|i| format!("S{i}")).collect();
        let mut three = assets(3);
        three.push(serde_json::json!({"adamId": "1"}));
        let spec = req(serde_json::json!({"token": "main", "assets": three, "associate": {"serialNumbers": assoc}}))
            .unwrap();
        assert_eq!(spec.pair_count(Phase::Associate), 300);
    }

    #[test]
    fn lists_are_capped_at_twenty_and_the_rest_counted() {
        let none: [&str; 0] = [];
        assert_eq!(capped_list(none, ", "), "");
        assert_eq!(capped_list(["a"], ", "), "a");
        assert_eq!(capped_list(["a", "b"], "; "), "a; b");
        let twenty = capped_list(1..=20, ", ");
        assert!(
            twenty.ends_with("19, 20") && !twenty.contains("more"),
            "{twenty}"
        );
        assert_eq!(
            capped_list(1..=21, ","),
            "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,and 1 more"
        );
        let million = capped_list(0..1_000_000u32, ", ");
        assert!(million.ends_with(", and 999980 more"), "{million}");
        assert!(million.len() < 200);
    }

    #[test]
    fn targets_in_both_phases_are_listed_capped() {
        let both: Vec<String> = (0..30).map(|i| format!("B{i}")).collect();
        let e = req(serde_json::json!({"token": "main", "assets": [{"adamId": "1"}], "disassociate": {"serialNumbers": both}, "associate": {"serialNumbers": both}}))
            .unwrap_err()
            .0;
        assert!(e.starts_with("associate.serialNumbers:"), "{e}");
        assert!(
            e.contains("`B0`") && e.contains("`B19`") && !e.contains("`B20`"),
            "{e}"
        );
        assert!(e.ends_with("and 10 more"), "{e}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = req(serde_json::json!({"token": "main", "assets": [{"adamId": "1"}], "associate": {"serialnumbers": ["A"]}}))
            .unwrap_err()
            .0;
        assert!(e.contains("serialnumbers"), "{e}");
    }

    #[test]
    fn command_uuid_is_stable_and_distinct() {
        let a = JobAsset {
            adam_id: "1".into(),
            pricing_param: "STDQ".into(),
        };
        let (j, k) = (JobId::from("j"), JobId::from("k"));
        let u1 = command_uuid(&j, &a, Target::Serial("S"));
        assert_eq!(u1, command_uuid(&j, &a, Target::Serial("S")));
        assert_ne!(u1, command_uuid(&j, &a, Target::User("S")));
        assert_ne!(u1, command_uuid(&k, &a, Target::Serial("S")));
        assert_eq!(u1.as_uuid().get_version_num(), 5);
    }
}
