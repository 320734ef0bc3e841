//! The domain types of an assignment job, defined once and used by every
//! stage: the validated job spec, its targets, pairs and status document.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::apple::types::{PLUS, STDQ};

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
    /// `"high"` or `"normal"` (the default): a high-priority job's batches
    /// go ahead of every normal batch of the token not yet sent.
    #[serde(default)]
    pub priority: Option<serde_json::Value>,
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
    pub id: String,
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

impl JobRequest {
    /// Validates and normalizes. `known_token` says whether a token name is
    /// configured; `max_targets` caps serials plus users over both phases.
    pub fn validate(
        self,
        known_token: impl Fn(&str) -> bool,
        max_targets: usize,
    ) -> Result<JobSpec, JobError> {
        let err = |m: String| Err(JobError(m));
        let id = match self.id {
            Some(id) => {
                if id.is_empty() || id.len() > MAX_ID_LEN {
                    return err(format!("id: must be 1 to {MAX_ID_LEN} characters"));
                }
                if !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    return err(format!(
                        "id: `{id}` may hold only letters, digits, '-', '_' and '.'"
                    ));
                }
                id
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        if self.token.is_empty() {
            return err("token: must name a configured token".into());
        }
        if !known_token(&self.token) {
            return err(format!("token: `{}` is not a configured token", self.token));
        }
        let mut assets = Vec::with_capacity(self.assets.len());
        let mut seen = HashSet::new();
        for (i, a) in self.assets.into_iter().enumerate() {
            let adam_id = match &a.adam_id {
                serde_json::Value::String(s) => s.clone(),
                // Apple's own subscription payloads use numbers; accept them.
                serde_json::Value::Number(n) if n.is_u64() => n.to_string(),
                _ => return err(format!("assets[{i}].adamId: must be a string of digits")),
            };
            if adam_id.is_empty()
                || !adam_id.chars().all(|c| c.is_ascii_digit())
                || adam_id.len() > 32
            {
                return err(format!(
                    "assets[{i}].adamId: `{adam_id}` is not a store identifier (digits only)"
                ));
            }
            let pricing_param = a.pricing_param.unwrap_or_else(|| STDQ.to_string());
            if pricing_param != STDQ && pricing_param != PLUS {
                return err(format!(
                    "assets[{i}].pricingParam: `{pricing_param}` is not STDQ or PLUS"
                ));
            }
            let asset = JobAsset {
                adam_id,
                pricing_param,
            };
            if seen.insert(asset.clone()) {
                assets.push(asset);
            }
        }
        let priority = Priority::parse(self.priority)?;
        let disassociate =
            normalize_targets(self.disassociate.unwrap_or_default(), "disassociate")?;
        let associate = normalize_targets(self.associate.unwrap_or_default(), "associate")?;
        let revoke = normalize_targets(self.revoke.unwrap_or_default(), "revoke")?;
        if disassociate.is_empty() && associate.is_empty() && revoke.is_empty() {
            return err(
                "associate: at least one of disassociate / revoke / associate needs a serial number or client user id"
                    .into(),
            );
        }
        if assets.is_empty() && !(disassociate.is_empty() && associate.is_empty()) {
            return err(
                "assets: at least one asset is needed (only a job that just revokes has none)"
                    .into(),
            );
        }
        let total = disassociate.len() + associate.len() + revoke.len();
        if total > max_targets {
            return err(format!(
                "associate: the job names {total} targets, more than admin.max_job_targets ({max_targets})"
            ));
        }
        // One target in both phases would be released and then taken again
        // (or the other way round) in one job: almost certainly a mistake.
        let dis_serials: HashSet<&str> = disassociate
            .serial_numbers
            .iter()
            .map(String::as_str)
            .collect();
        if let Some(s) = associate
            .serial_numbers
            .iter()
            .find(|s| dis_serials.contains(s.as_str()))
        {
            return err(format!(
                "associate.serialNumbers: `{s}` is also in disassociate.serialNumbers"
            ));
        }
        let dis_users: HashSet<&str> = disassociate
            .client_user_ids
            .iter()
            .map(String::as_str)
            .collect();
        if let Some(u) = associate
            .client_user_ids
            .iter()
            .find(|u| dis_users.contains(u.as_str()))
        {
            return err(format!(
                "associate.clientUserIds: `{u}` is also in disassociate.clientUserIds"
            ));
        }
        Ok(JobSpec {
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
            priority,
        })
    }
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
            Phase::Disassociate => crate::apple::types::event_type::DISASSOCIATE,
            Phase::Revoke => crate::apple::types::event_type::REVOKE,
            Phase::Associate => crate::apple::types::event_type::ASSOCIATE,
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

/// The status document of the job API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    pub id: String,
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
pub fn command_uuid(job_id: &str, asset: &JobAsset, target: Target<'_>) -> uuid::Uuid {
    command_uuid_of(RequestType::InstallApplication, job_id, asset, target)
}

/// Stable command id for (request type, job, asset, target). Installs keep
/// the ids they always had; a removal of the same pair (a job that revokes
/// a device and then assigns to it) has its own.
pub fn command_uuid_of(
    request: RequestType,
    job_id: &str,
    asset: &JobAsset,
    target: Target<'_>,
) -> uuid::Uuid {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5b1e_7c1d_93a4_4f0e_9d7a_6c2b_8e41_0f3a);
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
    uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> Result<JobSpec, JobError> {
        let r: JobRequest = serde_json::from_value(json).map_err(|e| JobError(e.to_string()))?;
        r.validate(|t| t == "main", 100)
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
        let u1 = command_uuid("j", &a, Target::Serial("S"));
        assert_eq!(u1, command_uuid("j", &a, Target::Serial("S")));
        assert_ne!(u1, command_uuid("j", &a, Target::User("S")));
        assert_ne!(u1, command_uuid("k", &a, Target::Serial("S")));
        assert_eq!(u1.get_version_num(), 5);
    }
}
