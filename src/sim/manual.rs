//! Changes made by hand: what a person does in Apple School or Business
//! Manager (or another tool on the same location) behind the client's back.
//!
//! An associate, disassociate or revoke made by hand becomes an event of
//! the token like any other: it takes its place in the token's ordered
//! queue, gets an eventId no client ever saw (queryable with Event Status),
//! changes the assignments and counts, bumps the `versionId` (so Get
//! Assignments `sinceVersionId` shows what it added), and sends the
//! ASSET_MANAGEMENT notifications Apple sends for events "caused by
//! people" (reference 7.2), with that eventId. Such a change does not
//! change how many licenses the location owns, so it sends no ASSET_COUNT
//! (reference 7.6 and section 9 item 14); `licenses`, a purchase, transfer
//! or refund made by hand, does. A person is not bound by the request
//! limits, so they do not apply; the asset properties do (9706, 9707).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::process::{AssetOp, JobBody};
use super::state::{Org, TargetKind, valid_adam_id, valid_pricing};
use super::{Shared, lock, read};
use crate::apple::types::{self, Asset};

/// What a person changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ManualAction {
    /// Assigns `assets` to `serialNumbers` and `clientUserIds`.
    Associate,
    /// Removes those assignments.
    Disassociate,
    /// Removes every revocable assignment of the targets.
    Revoke,
    /// Adds `delta` licenses of each asset (negative: removes), as a
    /// purchase, transfer or refund; sends ASSET_COUNT.
    Licenses,
}

impl ManualAction {
    fn name(self) -> &'static str {
        match self {
            ManualAction::Associate => "associate",
            ManualAction::Disassociate => "disassociate",
            ManualAction::Revoke => "revoke",
            ManualAction::Licenses => "licenses",
        }
    }
}

/// A change made by hand, as `POST /_sim/changes` takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManualChange {
    pub action: ManualAction,
    #[serde(default)]
    pub assets: Vec<Asset>,
    #[serde(default)]
    pub serial_numbers: Vec<String>,
    #[serde(default)]
    pub client_user_ids: Vec<String>,
    /// For `licenses`: the change of each asset's `totalCount`.
    #[serde(default)]
    pub delta: Option<i32>,
    /// The token's fingerprint; every token served when absent.
    #[serde(default)]
    pub token: Option<String>,
    /// Made this long from now (the config's duration syntax, e.g. `"30s"`);
    /// at once when absent.
    #[serde(default)]
    pub after: Option<String>,
}

/// A change made or scheduled, per token, as `GET /_sim/changes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManualRecord {
    /// Numbers the records in the order they were asked for.
    pub id: u64,
    /// Fingerprint of the token.
    pub token: String,
    pub action: ManualAction,
    /// The event it is processed as; none for `licenses`.
    pub event_id: Option<String>,
    /// `scheduled`, `made` or `failed`.
    pub state: String,
    /// When it is (or was) due, in milliseconds since the simulator started.
    pub due_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Default)]
pub(crate) struct ManualLog {
    next_id: u64,
    records: Vec<ManualRecord>,
}

impl ManualLog {
    pub fn records(&self) -> Vec<ManualRecord> {
        self.records.clone()
    }

    fn get(&self, id: u64) -> Option<ManualRecord> {
        self.records.iter().find(|r| r.id == id).cloned()
    }

    fn set_state(&mut self, id: u64, state: &str, error: Option<String>) {
        if let Some(r) = self.records.iter_mut().find(|r| r.id == id) {
            r.state = state.to_string();
            r.error = error;
        }
    }
}

/// What to do to one organization, checked against it when asked.
enum Prepared {
    Event { event_id: String, body: JobBody },
    Licenses { assets: Vec<Asset>, delta: i32 },
}

/// Checks a change, then makes it (or schedules it) on each organization
/// it names. Nothing is made when any check fails.
pub(crate) fn make(
    shared: &Arc<Shared>,
    change: ManualChange,
) -> Result<Vec<ManualRecord>, String> {
    let after = match change.after.as_deref() {
        None => Duration::ZERO,
        Some(text) => {
            crate::domain::duration::parse_duration(text).map_err(|e| format!("after: {e}"))?
        }
    };
    check_shape(&change)?;
    let orgs: Vec<Arc<Org>> = {
        let orgs = read(&shared.orgs);
        match &change.token {
            Some(fp) => vec![
                orgs.values()
                    .find(|o| o.fingerprint == *fp)
                    .cloned()
                    .ok_or("no token has this fingerprint (GET /_sim/tokens lists them)")?,
            ],
            None => {
                let mut all: Vec<Arc<Org>> = orgs.values().cloned().collect();
                all.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
                all
            }
        }
    };
    let prepared: Vec<(Arc<Org>, Prepared)> = orgs
        .into_iter()
        .map(|org| prepare(&org, &change).map(|p| (org, p)))
        .collect::<Result<_, _>>()?;
    let due = Instant::now() + after;
    let due_ms = due.saturating_duration_since(shared.started).as_millis() as u64;
    let mut records = Vec::new();
    for (org, work) in prepared {
        let record = {
            let mut log = lock(&shared.manual);
            log.next_id += 1;
            let record = ManualRecord {
                id: log.next_id,
                token: org.fingerprint.clone(),
                action: change.action,
                event_id: match &work {
                    Prepared::Event { event_id, .. } => Some(event_id.clone()),
                    Prepared::Licenses { .. } => None,
                },
                state: "scheduled".to_string(),
                due_ms,
                error: None,
            };
            log.records.push(record.clone());
            record
        };
        if after.is_zero() {
            apply(shared, &org, record.id, change.action, work);
        } else {
            let task_shared = shared.clone();
            let id = record.id;
            let action = change.action;
            let task = shared.runtime.spawn(async move {
                tokio::time::sleep_until(due.into()).await;
                apply(&task_shared, &org, id, action, work);
            });
            lock(&shared.tasks).push(task);
        }
        // As it stands now: made already when it was due at once.
        let current = lock(&shared.manual).get(record.id);
        records.push(current.unwrap_or(record));
    }
    Ok(records)
}

fn apply(shared: &Shared, org: &Org, id: u64, action: ManualAction, work: Prepared) {
    let outcome = match work {
        Prepared::Event { event_id, body } => org
            .enqueue(shared, event_id, body, None)
            .map(|_| ())
            .ok_or_else(|| "the simulator is shutting down".to_string()),
        Prepared::Licenses { assets, delta } => assets.iter().try_for_each(|a| {
            org.change_licenses(shared, &a.adam_id, a.pricing(), delta)
                .map_err(|e| e.to_string())
        }),
    };
    tracing::info!(
        token = %org.fingerprint,
        action = action.name(),
        ok = outcome.is_ok(),
        "change made by hand"
    );
    let mut log = lock(&shared.manual);
    match outcome {
        Ok(()) => log.set_state(id, "made", None),
        Err(e) => log.set_state(id, "failed", Some(e)),
    }
}

/// The fields each action needs, and nothing it would ignore.
fn check_shape(change: &ManualChange) -> Result<(), String> {
    let has_targets = !change.serial_numbers.is_empty() || !change.client_user_ids.is_empty();
    for asset in &change.assets {
        if !valid_adam_id(&asset.adam_id) || !valid_pricing(asset.pricing()) {
            return Err(format!(
                "asset {} {}: adamId must be digits and pricingParam STDQ or PLUS",
                asset.adam_id,
                asset.pricing()
            ));
        }
    }
    if change
        .serial_numbers
        .iter()
        .chain(&change.client_user_ids)
        .any(|t| t.trim().is_empty())
    {
        return Err("serialNumbers and clientUserIds must not be empty strings".to_string());
    }
    match change.action {
        ManualAction::Associate | ManualAction::Disassociate => {
            if change.assets.is_empty() || !has_targets {
                return Err(format!(
                    "{} needs assets and serialNumbers or clientUserIds",
                    change.action.name()
                ));
            }
            if change.delta.is_some() {
                return Err("delta belongs to licenses only".to_string());
            }
        }
        ManualAction::Revoke => {
            if !has_targets || !change.assets.is_empty() || change.delta.is_some() {
                return Err(
                    "revoke needs serialNumbers or clientUserIds, and no assets or delta"
                        .to_string(),
                );
            }
        }
        ManualAction::Licenses => {
            if change.assets.is_empty() || has_targets || change.delta.is_none_or(|d| d == 0) {
                return Err(
                    "licenses needs assets and a non-zero delta, and no targets".to_string()
                );
            }
        }
    }
    Ok(())
}

fn prepare(org: &Org, change: &ManualChange) -> Result<Prepared, String> {
    let mut assets: Vec<Asset> = Vec::new();
    for a in &change.assets {
        let asset = Asset::new(a.adam_id.clone(), a.pricing().to_string());
        if !assets.contains(&asset) {
            assets.push(asset);
        }
    }
    let mut targets: Vec<(TargetKind, String)> = Vec::new();
    let named = change
        .client_user_ids
        .iter()
        .map(|u| (TargetKind::User, u))
        .chain(
            change
                .serial_numbers
                .iter()
                .map(|s| (TargetKind::Serial, s)),
        );
    for (kind, name) in named {
        if !targets.iter().any(|(k, n)| *k == kind && n == name) {
            targets.push((kind, name.clone()));
        }
    }
    let event = |body| Prepared::Event {
        event_id: uuid::Uuid::new_v4().to_string(),
        body,
    };
    let op = match change.action {
        ManualAction::Licenses => {
            return Ok(Prepared::Licenses {
                assets,
                delta: change.delta.unwrap_or(0),
            });
        }
        ManualAction::Revoke => return Ok(event(JobBody::Revoke { targets })),
        ManualAction::Associate => AssetOp::Associate,
        ManualAction::Disassociate => AssetOp::Disassociate,
    };
    {
        let data = lock(&org.data);
        for asset in &assets {
            let Some(state) = data
                .find_asset(&asset.adam_id, asset.pricing())
                .map(|i| data.asset(i))
            else {
                continue;
            };
            if !change.serial_numbers.is_empty() && !state.device_assignable {
                return Err(format!(
                    "{}: asset {} cannot be assigned to devices (9707)",
                    org.fingerprint, asset.adam_id
                ));
            }
            if op == AssetOp::Disassociate && !state.revocable {
                return Err(format!(
                    "{}: asset {} is not revocable (9706)",
                    org.fingerprint, asset.adam_id
                ));
            }
        }
    }
    Ok(event(JobBody::Assets {
        op,
        assets,
        targets,
    }))
}

/// Parses the `--change` syntax: an action word, then `key=value` words:
/// `assets=ADAMID[:PRICING],...`, `serials=A,B`, `users=u1,u2`, `delta=N`,
/// `after=DURATION`, `token=FINGERPRINT`. For example
/// `"disassociate assets=361309726 serials=C02Y402HLCM6 after=60s"`.
pub fn parse_change(text: &str) -> Result<ManualChange, String> {
    let mut words = text.split_whitespace();
    let action = match words.next() {
        Some("associate") => ManualAction::Associate,
        Some("disassociate") => ManualAction::Disassociate,
        Some("revoke") => ManualAction::Revoke,
        Some("licenses") => ManualAction::Licenses,
        other => {
            return Err(format!(
                "{:?} is not an action: start with associate, disassociate, revoke or licenses",
                other.unwrap_or("")
            ));
        }
    };
    let mut change = ManualChange {
        action,
        assets: Vec::new(),
        serial_numbers: Vec::new(),
        client_user_ids: Vec::new(),
        delta: None,
        token: None,
        after: None,
    };
    let list = |v: &str| -> Vec<String> {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    for word in words {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| format!("{word:?} is not key=value"))?;
        match key {
            "assets" => {
                for id in list(value) {
                    let (adam_id, pricing) = id.split_once(':').unwrap_or((&id, types::STDQ));
                    change.assets.push(Asset::new(adam_id, pricing));
                }
            }
            "serials" => change.serial_numbers.extend(list(value)),
            "users" => change.client_user_ids.extend(list(value)),
            "delta" => {
                change.delta = Some(
                    value
                        .parse()
                        .map_err(|_| format!("delta {value:?} is not a whole number"))?,
                );
            }
            "after" => {
                crate::domain::duration::parse_duration(value)
                    .map_err(|e| format!("after: {e}"))?;
                change.after = Some(value.to_string());
            }
            "token" => change.token = Some(value.to_string()),
            _ => {
                return Err(format!(
                    "unknown key {key:?}: use assets, serials, users, delta, after or token"
                ));
            }
        }
    }
    check_shape(&change)?;
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_specs() {
        let c = parse_change("associate assets=1,2:PLUS serials=A,B users=u1 after=30s").unwrap();
        assert_eq!(c.action, ManualAction::Associate);
        assert_eq!(
            c.assets,
            vec![Asset::new("1", "STDQ"), Asset::new("2", "PLUS")]
        );
        assert_eq!(c.serial_numbers, vec!["A", "B"]);
        assert_eq!(c.client_user_ids, vec!["u1"]);
        assert_eq!(c.after.as_deref(), Some("30s"));
        let l = parse_change("licenses assets=1 delta=-5").unwrap();
        assert_eq!(l.delta, Some(-5));
        assert!(parse_change("revoke serials=A").is_ok());
        for bad in [
            "",
            "buy assets=1",
            "associate assets=1",
            "associate serials=A",
            "revoke assets=1 serials=A",
            "licenses assets=1",
            "licenses assets=1 delta=0",
            "licenses assets=1 delta=2 serials=A",
            "associate assets=x serials=A",
            "associate assets=1:GOLD serials=A",
            "associate assets=1 serials=A after=soon",
            "associate assets=1 serials=A colour=red",
            "associate assets=1 serials",
        ] {
            assert!(parse_change(bad).is_err(), "{bad}");
        }
    }
}
