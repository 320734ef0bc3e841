//! `/_sim/*`: the control endpoints for a simulator running as its own
//! process (`vppd sim`), so that tests in another process can read the
//! request log and switch faults. Outside `/mdm/v2`, never logged, no token.
//! The module doc of [`super`] lists them.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Faults, HoldSettings, InvitationAcceptance, LoggedRequest, ManualChange, Shared, lock, read,
};
use crate::apple::types::{self, Limits};
use crate::runtime::http::{self, Body};

const MAX_BODY: usize = 1024 * 1024;

pub(crate) async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let result = match (method, path.as_str()) {
        (Method::GET, "/_sim/requests") => Ok(requests(shared)),
        (Method::DELETE, "/_sim/requests") => {
            lock(&shared.log).clear();
            Ok(json!({}))
        }
        (Method::GET, "/_sim/faults") => Ok(to_value(&*lock(&shared.faults))),
        (Method::POST, "/_sim/faults") => match body(req).await {
            Ok(patch) => set_faults(shared, patch),
            Err(e) => Err(e),
        },
        (Method::GET, "/_sim/limits") => Ok(to_value(&shared.limits())),
        (Method::POST, "/_sim/limits") => match body(req).await {
            Ok(patch) => set_limits(shared, patch),
            Err(e) => Err(e),
        },
        (Method::POST, "/_sim/licenses") => match body(req).await {
            Ok(body) => licenses(shared, body),
            Err(e) => Err(e),
        },
        (Method::POST, "/_sim/invitations") => match body(req).await {
            Ok(body) => invitations(shared, body),
            Err(e) => Err(e),
        },
        (Method::GET, "/_sim/invitations/acceptance") => Ok(acceptance(shared)),
        (Method::POST, "/_sim/invitations/acceptance") => match body(req).await {
            Ok(body) => set_acceptance(shared, body),
            Err(e) => Err(e),
        },
        (Method::GET, "/_sim/stats") => {
            let mut stats = to_value(&shared.stats.snapshot());
            stats["busy"] = json!(shared.busy.load(std::sync::atomic::Ordering::SeqCst));
            Ok(stats)
        }
        (Method::GET, "/_sim/tokens") => Ok(tokens(shared)),
        (Method::GET, "/_sim/changes") => Ok(to_value(&lock(&shared.manual).records())),
        (Method::POST, "/_sim/changes") => match body(req).await {
            Ok(body) => change_by_hand(shared, body),
            Err(e) => Err(e),
        },
        (Method::POST, "/_sim/versions/forget") => {
            shared.forget_versions();
            Ok(json!({}))
        }
        (Method::GET, "/_sim/hold") => Ok(hold(shared)),
        (Method::POST, "/_sim/hold") => match body(req).await {
            Ok(patch) => set_hold(shared, patch),
            Err(e) => Err(e),
        },
        (Method::POST, "/_sim/hold/release") => match body(req).await {
            Ok(body) => release(shared, body),
            Err(e) => Err(e),
        },
        _ => {
            return http::json(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("no control endpoint {} {path}", req.method())}),
            );
        }
    };
    match result {
        Ok(value) => http::json(StatusCode::OK, &value),
        Err(message) => http::json(StatusCode::BAD_REQUEST, &json!({ "error": message })),
    }
}

async fn body(req: Request<Incoming>) -> Result<Value, String> {
    if !http::is_json(&req) {
        return Err("send the body as application/json".to_string());
    }
    let bytes = http::read_body(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("the body is not valid JSON: {e}"))
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Applies the fields of `patch` onto `current`; unknown fields are refused
/// so that a typo does not silently switch nothing.
fn merge<T: serde::Serialize + serde::de::DeserializeOwned>(
    current: &T,
    patch: Value,
) -> Result<T, String> {
    let Value::Object(fields) = patch else {
        return Err("expected a JSON object".to_string());
    };
    let mut merged = to_value(current);
    for (key, value) in fields {
        match merged.get_mut(&key) {
            Some(slot) => *slot = value,
            None => return Err(format!("unknown field {key}")),
        }
    }
    serde_json::from_value(merged).map_err(|e| e.to_string())
}

fn set_faults(shared: &Shared, patch: Value) -> Result<Value, String> {
    let mut faults = lock(&shared.faults);
    let merged: Faults = merge(&*faults, patch)?;
    *faults = merged;
    Ok(to_value(&*faults))
}

fn set_limits(shared: &Shared, patch: Value) -> Result<Value, String> {
    let mut limits = lock(&shared.limits);
    let merged: Limits = merge(&*limits, patch)?;
    *limits = merged;
    Ok(to_value(&*limits))
}

fn licenses(shared: &Shared, body: Value) -> Result<Value, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Change {
        token: Option<String>,
        adam_id: String,
        pricing_param: Option<String>,
        delta: i32,
    }
    let change: Change = serde_json::from_value(body).map_err(|e| e.to_string())?;
    let org = shared
        .org_by_fingerprint(change.token.as_deref())
        .ok_or("name the token by its fingerprint (GET /_sim/tokens lists them)")?;
    let pricing = change.pricing_param.as_deref().unwrap_or(types::STDQ);
    org.change_licenses(shared, &change.adam_id, pricing, change.delta)
        .map_err(|e| e.to_string())?;
    let data = lock(&org.data);
    let counts = data
        .find_asset(&change.adam_id, pricing)
        .map(|i| data.asset(i));
    Ok(json!({
        "adamId": change.adam_id,
        "pricingParam": pricing,
        "assignedCount": counts.map(|a| a.assigned),
        "totalCount": counts.and_then(|a| a.total),
    }))
}

fn invitations(shared: &Shared, body: Value) -> Result<Value, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Accept {
        token: Option<String>,
        client_user_id: Option<String>,
        #[serde(default)]
        all: bool,
    }
    let accept: Accept = serde_json::from_value(body).map_err(|e| e.to_string())?;
    match (accept.client_user_id, accept.all) {
        (Some(client_user_id), false) => {
            let org = shared
                .org_by_fingerprint(accept.token.as_deref())
                .ok_or("name the token by its fingerprint (GET /_sim/tokens lists them)")?;
            org.accept_invitation(shared, &client_user_id)
                .map_err(|e| e.to_string())?;
            Ok(json!({"clientUserId": client_user_id, "status": "Associated"}))
        }
        (None, true) => Ok(json!({
            "accepted": shared.accept_all_waiting(accept.token.as_deref()),
        })),
        _ => Err("send either \"clientUserId\" or \"all\": true".to_string()),
    }
}

fn acceptance(shared: &Shared) -> Value {
    let mut value = to_value(&shared.invitation_acceptance());
    let waiting: usize = read(&shared.orgs)
        .values()
        .map(|o| o.waiting_invitations())
        .sum();
    value["waiting"] = json!(waiting);
    value
}

fn set_acceptance(shared: &Shared, body: Value) -> Result<Value, String> {
    let mode: InvitationAcceptance = serde_json::from_value(body).map_err(|e| {
        format!("{e}; send {{\"mode\": \"off\"}}, {{\"mode\": \"all\"}} or {{\"mode\": \"rate\", \"perSecond\": 5}}")
    })?;
    shared.set_invitation_acceptance(mode)?;
    Ok(acceptance(shared))
}

fn change_by_hand(shared: &Arc<Shared>, body: Value) -> Result<Value, String> {
    let change: ManualChange = serde_json::from_value(body).map_err(|e| e.to_string())?;
    let records = super::manual::make(shared, change)?;
    Ok(json!({ "changes": records }))
}

fn hold(shared: &Shared) -> Value {
    let mut value = to_value(&*lock(&shared.hold));
    value["held"] = to_value(&shared.held_events());
    value
}

fn set_hold(shared: &Shared, patch: Value) -> Result<Value, String> {
    {
        let mut hold = lock(&shared.hold);
        let merged: HoldSettings = merge(&*hold, patch)?;
        *hold = merged;
    }
    Ok(hold(shared))
}

fn release(shared: &Shared, body: Value) -> Result<Value, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Release {
        token: Option<String>,
        event_ids: Option<Vec<String>>,
    }
    let release: Release = serde_json::from_value(body).map_err(|e| e.to_string())?;
    let released = shared.release_held(release.token.as_deref(), release.event_ids.as_deref());
    let not_held: Vec<&String> = release
        .event_ids
        .iter()
        .flatten()
        .filter(|id| !released.contains(id))
        .collect();
    Ok(json!({"released": released, "notHeld": not_held}))
}

fn tokens(shared: &Shared) -> Value {
    let orgs = read(&shared.orgs);
    let mut list: Vec<Value> = orgs
        .values()
        .map(|o| {
            json!({
                "fingerprint": o.fingerprint,
                "uId": o.uid,
                "orgName": o.org_name,
                "readOnly": o.read_only,
            })
        })
        .collect();
    list.sort_by(|a, b| a["fingerprint"].as_str().cmp(&b["fingerprint"].as_str()));
    Value::Array(list)
}

fn requests(shared: &Shared) -> Value {
    let entries = lock(&shared.log).entries();
    Value::Array(entries.iter().map(|e| logged(shared, e)).collect())
}

fn logged(shared: &Shared, e: &LoggedRequest) -> Value {
    json!({
        "method": e.method,
        "path": e.path,
        "query": e.query,
        "status": e.status,
        "errorNumber": e.error_number,
        "atMs": e.at.saturating_duration_since(shared.started).as_secs_f64() * 1000.0,
        "tokenFingerprint": e.token_fingerprint,
        "body": e.body,
        "eventId": e.event_id,
    })
}
