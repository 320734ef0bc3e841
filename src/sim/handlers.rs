//! HTTP routing and synchronous validation of the `/mdm/v2` endpoints.
//!
//! Order of checks for an authenticated endpoint (section 9 item 7):
//! front-end faults (503) → unknown path (404) → authorization (401) → rate
//! limit and the 429 fault → the 200-with-error-body fault → method (405) →
//! read-only token (403) → content type (415) → JSON (400 / 9602) → required
//! fields → malformed values (9602) → duplicates → size limits → asset
//! properties. The first failure answers; nothing of a refused request is
//! kept.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Notify;

use super::process::{AssetOp, JobBody, UserOp};
use super::state::{
    AssetState, AssignmentQuery, Org, TargetKind, UserQuery, valid_adam_id, valid_pricing,
};
use super::{LoggedRequest, Shared, control, lock, notify};
use crate::apple::token::fingerprint;
use crate::apple::types::error_number;
use crate::apple::types::{
    self, Asset, ClientConfigResponse, Common, ErrorResponse, EventResponse, GetAssetsResponse,
    GetAssignmentsResponse, GetUsersResponse, ManageAssetsRequest, ManageUsersRequest, MdmInfo,
    Page, ResponseAsset, ResponseErrorCode, ResponseErrorInfo, RevokeAssetsRequest,
    ServiceConfigResponse, StatusResponse, UnlimitedResponseAsset, notification_type, url_key,
};
use crate::runtime::http::{self, Body};

/// Bodies larger than this are refused; the largest legal request (1000
/// users and 1000 serials) is far below it.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// The notification types service config offers, as in Apple's sample.
const OFFERED_NOTIFICATIONS: &[&str] = &[
    notification_type::ASSET_MANAGEMENT,
    notification_type::USER_MANAGEMENT,
    notification_type::USER_ASSOCIATED,
    notification_type::ASSET_COUNT,
];

pub(crate) struct SimHandler {
    shared: Arc<Shared>,
}

/// An answer before it becomes an HTTP response; keeps what the log needs.
pub(crate) struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    error_number: Option<i32>,
    retry_after: Option<String>,
    event_id: Option<String>,
    /// Close the connection instead of answering.
    cut: bool,
}

impl Reply {
    fn ok<T: serde::Serialize>(value: &T) -> Reply {
        Reply {
            status: StatusCode::OK,
            body: serde_json::to_vec(value).unwrap_or_default(),
            error_number: None,
            retry_after: None,
            event_id: None,
            cut: false,
        }
    }

    fn error(status: StatusCode, number: i32) -> Reply {
        Reply::error_info(status, number, None)
    }

    fn error_info(status: StatusCode, number: i32, info: Option<ResponseErrorInfo>) -> Reply {
        let body = ErrorResponse {
            error_number: number,
            error_message: types::error_message(number).to_string(),
            error_info: info,
        };
        Reply {
            error_number: Some(number),
            ..Reply::ok(&body)
        }
        .with_status(status)
    }

    fn bad(number: i32) -> Reply {
        Reply::error(StatusCode::BAD_REQUEST, number)
    }

    fn with_status(mut self, status: StatusCode) -> Reply {
        self.status = status;
        self
    }

    fn with_retry_after(mut self, value: String) -> Reply {
        self.retry_after = Some(value);
        self
    }

    fn into_response(self) -> Response<Body> {
        let mut response = http::bytes_response(self.status, "application/json", self.body.into());
        if let Some(value) = self.retry_after
            && let Ok(value) = hyper::header::HeaderValue::from_str(&value)
        {
            response
                .headers_mut()
                .insert(hyper::header::RETRY_AFTER, value);
        }
        response
    }
}

fn info_assets(assets: Vec<Asset>) -> Option<ResponseErrorInfo> {
    Some(ResponseErrorInfo {
        assets: Some(assets),
        ..Default::default()
    })
}

fn info_users(ids: Vec<String>) -> Option<ResponseErrorInfo> {
    Some(ResponseErrorInfo {
        client_user_ids: Some(ids),
        ..Default::default()
    })
}

fn info_serials(ids: Vec<String>) -> Option<ResponseErrorInfo> {
    Some(ResponseErrorInfo {
        serial_numbers: Some(ids),
        ..Default::default()
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    ServiceConfig,
    ClientConfig,
    Assets,
    Assignments,
    Associate,
    Disassociate,
    Revoke,
    Status,
    Users,
    CreateUsers,
    UpdateUsers,
    RetireUsers,
    /// The `invitationEmail` link a person follows (not an MDM endpoint).
    Invitation,
}

impl Endpoint {
    fn parse(path: &str) -> Option<Endpoint> {
        Some(match path.trim_end_matches('/') {
            "/service/config" => Endpoint::ServiceConfig,
            "/client/config" => Endpoint::ClientConfig,
            "/assets" => Endpoint::Assets,
            "/assignments" => Endpoint::Assignments,
            "/assets/associate" => Endpoint::Associate,
            "/assets/disassociate" => Endpoint::Disassociate,
            "/assets/revoke" => Endpoint::Revoke,
            "/status" => Endpoint::Status,
            "/users" => Endpoint::Users,
            "/users/create" => Endpoint::CreateUsers,
            "/users/update" => Endpoint::UpdateUsers,
            "/users/retire" => Endpoint::RetireUsers,
            "/invitation" => Endpoint::Invitation,
            _ => return None,
        })
    }

    fn allows(self, method: &Method) -> bool {
        match self {
            Endpoint::ClientConfig => method == Method::GET || method == Method::POST,
            e if e.is_management() => method == Method::POST,
            _ => method == Method::GET,
        }
    }

    fn is_management(self) -> bool {
        matches!(
            self,
            Endpoint::Associate
                | Endpoint::Disassociate
                | Endpoint::Revoke
                | Endpoint::CreateUsers
                | Endpoint::UpdateUsers
                | Endpoint::RetireUsers
        )
    }
}

impl SimHandler {
    pub fn new(shared: Arc<Shared>) -> SimHandler {
        SimHandler { shared }
    }

    pub async fn handle(&self, req: Request<Incoming>, cut: &Notify) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path == "/_sim" || path.starts_with("/_sim/") {
            return control::handle(&self.shared, req).await;
        }
        let seq = lock(&self.shared.log).arrive();
        let at = Instant::now();
        let method = req.method().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let token_fingerprint = http::bearer(&req)
            .filter(|b| !b.is_empty())
            .map(fingerprint);
        let mut body = None;
        let reply = self.api(req, &path, &mut body).await;
        if !self.shared.config.latency.is_zero() {
            tokio::time::sleep(self.shared.config.latency).await;
        }
        let entry = LoggedRequest {
            method,
            path: path.strip_prefix("/mdm/v2").unwrap_or(&path).to_string(),
            query,
            status: if reply.cut { 0 } else { reply.status.as_u16() },
            error_number: reply.error_number,
            at,
            token_fingerprint,
            body,
            event_id: reply.event_id.clone(),
        };
        lock(&self.shared.log).record(seq, entry);
        if reply.cut {
            cut.notify_one();
            // The connection task drops this future together with the connection.
            return std::future::pending().await;
        }
        reply.into_response()
    }

    async fn api(
        &self,
        req: Request<Incoming>,
        path: &str,
        logged_body: &mut Option<Value>,
    ) -> Reply {
        if let Some(reply) = self.front_end_fault() {
            return reply;
        }
        let Some(endpoint) = path.strip_prefix("/mdm/v2").and_then(Endpoint::parse) else {
            return Reply::error(StatusCode::NOT_FOUND, error_number::INVALID_ARGUMENT);
        };
        let query = Query(http::query_pairs(req.uri().query()));
        match endpoint {
            Endpoint::ServiceConfig | Endpoint::Invitation if req.method() != Method::GET => {
                return Reply::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    error_number::UNSUPPORTED_METHOD,
                );
            }
            Endpoint::ServiceConfig => return self.service_config(),
            Endpoint::Invitation => return self.invitation(&query),
            _ => {}
        }
        let org = match self.authenticate(&req) {
            Ok(org) => org,
            Err(reply) => return reply,
        };
        if let Some(reply) = self.rate_limit(&org) {
            return reply;
        }
        if let Some(reply) = self.error_body_fault() {
            return reply;
        }
        if !endpoint.allows(req.method()) {
            return Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                error_number::UNSUPPORTED_METHOD,
            );
        }
        if endpoint.is_management() && org.read_only {
            return Reply::error(StatusCode::FORBIDDEN, error_number::FACILITATOR_NOT_ALLOWED);
        }
        let body = if req.method() == Method::POST {
            if !http::is_json(&req) {
                return Reply::error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    error_number::UNSUPPORTED_CONTENT_TYPE,
                );
            }
            match read_json(req).await {
                Ok(value) => {
                    *logged_body = Some(value.clone());
                    Some(value)
                }
                Err(reply) => return reply,
            }
        } else {
            None
        };
        let result = match (endpoint, body) {
            (Endpoint::ClientConfig, None) => Ok(Reply::ok(&self.client_config(&org))),
            (Endpoint::ClientConfig, Some(body)) => self.post_client_config(&org, body).await,
            (Endpoint::Assets, _) => self.get_assets(&org, &query),
            (Endpoint::Assignments, _) => self.get_assignments(&org, &query),
            (Endpoint::Users, _) => self.get_users(&org, &query),
            (Endpoint::Status, _) => self.status(&org, &query),
            (Endpoint::Associate, Some(body)) => self.manage_assets(&org, AssetOp::Associate, body),
            (Endpoint::Disassociate, Some(body)) => {
                self.manage_assets(&org, AssetOp::Disassociate, body)
            }
            (Endpoint::Revoke, Some(body)) => self.revoke(&org, body),
            (Endpoint::CreateUsers, Some(body)) => self.manage_users(&org, UserOp::Create, body),
            (Endpoint::UpdateUsers, Some(body)) => self.manage_users(&org, UserOp::Update, body),
            (Endpoint::RetireUsers, Some(body)) => self.manage_users(&org, UserOp::Retire, body),
            // Unreachable given `allows`: every management endpoint is POST-only.
            _ => Err(Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                error_number::UNSUPPORTED_METHOD,
            )),
        };
        result.unwrap_or_else(|reply| reply)
    }

    /// Failures of the service as a whole, before it even looks at the request.
    fn front_end_fault(&self) -> Option<Reply> {
        let mut faults = lock(&self.shared.faults);
        if faults.error_5xx_next > 0 {
            faults.error_5xx_next -= 1;
            let retry = retry_after_value(faults.retry_after_secs, faults.retry_after_http_date);
            return Some(
                Reply::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    error_number::SERVICE_UNAVAILABLE,
                )
                .with_retry_after(retry),
            );
        }
        drop(faults);
        let rate = self.shared.config.error_5xx_rate;
        if rate > 0.0 && rand::random::<f64>() < rate {
            return Some(
                Reply::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    error_number::SERVICE_UNAVAILABLE,
                )
                .with_retry_after("1".into()),
            );
        }
        None
    }

    fn authenticate(&self, req: &Request<Incoming>) -> Result<Arc<Org>, Reply> {
        let unauthorized = |n| Reply::error(StatusCode::UNAUTHORIZED, n);
        let Some(bearer) = http::bearer(req).filter(|b| !b.is_empty()) else {
            return Err(unauthorized(error_number::INVALID_AUTHORIZATION_HEADER));
        };
        if lock(&self.shared.faults).revoked {
            return Err(unauthorized(error_number::TOKEN_REVOKED));
        }
        let Some(org) = self.shared.org(bearer) else {
            return Err(unauthorized(error_number::INVALID_TOKEN));
        };
        if org.token_expired() {
            return Err(unauthorized(error_number::TOKEN_EXPIRED));
        }
        Ok(org)
    }

    fn rate_limit(&self, org: &Org) -> Option<Reply> {
        {
            let mut faults = lock(&self.shared.faults);
            if faults.fail_next_with_429 > 0 {
                faults.fail_next_with_429 -= 1;
                let retry =
                    retry_after_value(faults.retry_after_secs, faults.retry_after_http_date);
                return Some(
                    Reply::error(
                        StatusCode::TOO_MANY_REQUESTS,
                        error_number::TOO_MANY_REQUESTS,
                    )
                    .with_retry_after(retry),
                );
            }
        }
        if !self.shared.config.enforce_rate_limit {
            return None;
        }
        let rate = self.shared.limits().max_request_per_second?;
        if lock(&org.bucket).take(f64::from(rate), Instant::now()) {
            None
        } else {
            Some(
                Reply::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    error_number::TOO_MANY_REQUESTS,
                )
                .with_retry_after("1".into()),
            )
        }
    }

    fn error_body_fault(&self) -> Option<Reply> {
        let mut faults = lock(&self.shared.faults);
        if faults.error_body_with_200_next == 0 {
            return None;
        }
        faults.error_body_with_200_next -= 1;
        Some(Reply::error(StatusCode::OK, error_number::INTERNAL_ERROR))
    }

    fn common(&self, org: &Org) -> Common {
        Common {
            mdm_info: lock(&org.client).mdm_info.clone(),
            token_expiration_date: org
                .token_expiration_date(self.shared.config.always_token_expiration),
            uid: org.uid.clone(),
        }
    }

    fn service_config(&self) -> Reply {
        let base = &self.shared.base_url;
        let urls: BTreeMap<String, String> = [
            (url_key::CLIENT_CONFIG, "/client/config"),
            (url_key::GET_ASSETS, "/assets"),
            (url_key::GET_ASSIGNMENTS, "/assignments"),
            (url_key::ASSOCIATE_ASSETS, "/assets/associate"),
            (url_key::DISASSOCIATE_ASSETS, "/assets/disassociate"),
            (url_key::REVOKE_ASSETS, "/assets/revoke"),
            (url_key::EVENT_STATUS, "/status"),
            (url_key::GET_USERS, "/users"),
            (url_key::CREATE_USERS, "/users/create"),
            (url_key::UPDATE_USERS, "/users/update"),
            (url_key::RETIRE_USERS, "/users/retire"),
            (
                url_key::INVITATION_EMAIL,
                "/invitation?inviteCode=%25inviteCode%25&mt=8",
            ),
            (url_key::CONTENT_METADATA_LOOKUP, "/lookup"),
        ]
        .into_iter()
        .map(|(key, path)| (key.to_string(), format!("{base}{path}")))
        .collect();
        Reply::ok(&ServiceConfigResponse {
            error_codes: types::SERVICE_ERROR_CODES
                .iter()
                .map(|(n, m)| ResponseErrorCode {
                    error_number: *n,
                    error_message: m.to_string(),
                })
                .collect(),
            limits: self.shared.limits().to_map(),
            notification_types: OFFERED_NOTIFICATIONS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            urls,
        })
    }

    /// A person following the invitation link: the user becomes Associated.
    fn invitation(&self, query: &Query) -> Reply {
        let Some(code) = query.get("inviteCode") else {
            return Reply::bad(error_number::INVALID_ARGUMENT);
        };
        let orgs: Vec<Arc<Org>> = super::read(&self.shared.orgs).values().cloned().collect();
        for org in orgs {
            if let Some(user) = org.pending_invitation(code)
                && org.accept_invitation(&self.shared, &user).is_ok()
            {
                return Reply::ok(
                    &serde_json::json!({"clientUserId": user, "status": "Associated"}),
                );
            }
        }
        Reply::bad(error_number::INVALID_ARGUMENT)
    }

    fn client_config(&self, org: &Org) -> ClientConfigResponse {
        let stored = lock(&org.client).clone();
        let common = self.common(org);
        ClientConfigResponse {
            country_iso2a_code: Some("US".to_string()),
            default_platform: Some("volumestore".to_string()),
            location_name: Some(org.org_name.clone()),
            mdm_info: stored.mdm_info,
            notification_auth_token: stored.notification_auth_token,
            notification_url: stored.notification_url,
            subscribed_notification_types: stored.subscribed,
            website_url: Some("https://business.apple.com".to_string()),
            token_expiration_date: common.token_expiration_date,
            uid: common.uid,
        }
    }

    async fn post_client_config(&self, org: &Org, body: Value) -> Result<Reply, Reply> {
        // mdmInfo is read field by field so that a missing field is 9723,
        // not a JSON error.
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Request {
            mdm_info: Option<PartialMdmInfo>,
            notification_url: Option<String>,
            notification_auth_token: Option<String>,
            notification_types: Option<Vec<String>>,
        }
        #[derive(Deserialize)]
        struct PartialMdmInfo {
            id: Option<String>,
            name: Option<String>,
            metadata: Option<String>,
        }
        let request: Request =
            serde_json::from_value(body).map_err(|_| Reply::bad(error_number::INVALID_ARGUMENT))?;
        let limits = self.shared.limits();

        let notification = match (request.notification_url, request.notification_auth_token) {
            (None, None) => None,
            (Some(url), Some(secret)) => Some((url, secret)),
            _ => {
                return Err(Reply::bad(
                    error_number::NOTIFICATION_URL_AND_TOKEN_REQUIRED,
                ));
            }
        };
        if let Some((url, secret)) = &notification {
            let max = limits.max_notification_length as usize;
            if url.chars().count() > max || secret.chars().count() > max {
                return Err(Reply::bad(error_number::NOTIFICATION_SETTING_TOO_LONG));
            }
            // Both empty: the client removes its notification settings.
            let clearing = url.is_empty() && secret.is_empty();
            if !clearing && (secret.is_empty() || !self.acceptable_notification_url(url)) {
                return Err(Reply::bad(if secret.is_empty() {
                    error_number::NOTIFICATION_URL_AND_TOKEN_REQUIRED
                } else {
                    error_number::NOTIFICATION_URL_INVALID
                }));
            }
        }
        let mdm_info = match request.mdm_info {
            None => None,
            Some(PartialMdmInfo {
                id: Some(id),
                name: Some(name),
                metadata: Some(metadata),
            }) if !id.is_empty() && !name.is_empty() => {
                if id.chars().count() > limits.max_mdm_id_length as usize {
                    return Err(Reply::bad(error_number::MDM_ID_TOO_LONG));
                }
                if name.chars().count() > limits.max_mdm_name_length as usize {
                    return Err(Reply::bad(error_number::MDM_NAME_TOO_LONG));
                }
                if metadata.chars().count() > limits.max_mdm_metadata_length as usize {
                    return Err(Reply::bad(error_number::MDM_METADATA_TOO_LONG));
                }
                Some(MdmInfo { id, name, metadata })
            }
            Some(_) => return Err(Reply::bad(error_number::MDM_INFO_INCOMPLETE)),
        };
        let types = match request.notification_types {
            None => None,
            Some(list) => {
                if list
                    .iter()
                    .any(|t| !notification_type::ALL_SUBSCRIBABLE.contains(&t.as_str()))
                {
                    return Err(Reply::bad(error_number::INVALID_ARGUMENT));
                }
                // TEST_NOTIFICATION is accepted but never listed (section 9 item 20).
                let mut kept: Vec<String> = Vec::new();
                for t in list {
                    if t != notification_type::TEST_NOTIFICATION && !kept.contains(&t) {
                        kept.push(t);
                    }
                }
                Some(kept)
            }
        };

        let mut candidate = lock(&org.client).clone();
        if let Some(info) = mdm_info {
            candidate.mdm_info = Some(info);
        }
        if let Some((url, secret)) = notification {
            if url.is_empty() {
                candidate.notification_url = None;
                candidate.notification_auth_token = None;
            } else {
                candidate.notification_url = Some(url);
                candidate.notification_auth_token = Some(secret);
            }
        }
        if let Some(types) = types {
            candidate.subscribed = types;
        }
        if let Some((url, secret)) = candidate.target()
            && !notify::send_test(&self.shared, &org.uid, &url, &secret).await
        {
            return Err(Reply::bad(error_number::NOTIFICATION_URL_UNREACHABLE));
        }
        *lock(&org.client) = candidate;
        Ok(Reply::ok(&self.client_config(org)))
    }

    /// HTTPS always; plain HTTP only to loopback and only when not strict.
    fn acceptable_notification_url(&self, url: &str) -> bool {
        let Ok(parsed) = reqwest::Url::parse(url) else {
            return false;
        };
        let Some(host) = parsed.host_str() else {
            return false;
        };
        match parsed.scheme() {
            "https" => true,
            "http" if !self.shared.config.strict_https => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            _ => false,
        }
    }

    fn get_assets(&self, org: &Org, query: &Query) -> Result<Reply, Reply> {
        let adam_id = query.get("adamId");
        let product_type = query.get("productType");
        if product_type.is_some_and(|p| p != "App" && p != "Book") {
            return Err(Reply::bad(error_number::INVALID_ARGUMENT));
        }
        let pricing = query.pricing()?;
        let device_assignable = query.bool("deviceAssignable")?;
        let revocable = query.bool("revocable")?;
        let min_assigned = query.int("minAssignedCount")?;
        let max_assigned = query.int("maxAssignedCount")?;
        let min_available = query.int("minAvailableCount")?;
        let max_available = query.int("maxAvailableCount")?;
        let unlimited = query.bool("unlimited")?;
        let page_index = query.page_index()?;

        let data = lock(&org.data);
        let matching: Vec<&AssetState> = data
            .asset_list()
            .iter()
            .filter(|a| adam_id.is_none_or(|id| a.adam_id == id))
            .filter(|a| product_type.is_none_or(|p| a.product_type == p))
            .filter(|a| pricing.is_none_or(|p| a.pricing == p))
            .filter(|a| device_assignable.is_none_or(|d| a.device_assignable == d))
            .filter(|a| revocable.is_none_or(|r| a.revocable == r))
            .filter(|a| unlimited != Some(false) || a.total.is_some())
            .filter(|a| {
                let assigned = i64::from(a.assigned);
                let available = a
                    .available()
                    .map_or(i64::from(types::UNLIMITED_COUNT), i64::from);
                min_assigned.is_none_or(|m| assigned >= m)
                    && max_assigned.is_none_or(|m| assigned <= m)
                    && min_available.is_none_or(|m| available >= m)
                    && max_available.is_none_or(|m| available <= m)
            })
            .collect();
        let window = PageWindow::new(matching.len(), self.page_size(), page_index)?;
        let mut assets = Vec::new();
        let mut unlimited_assets = Vec::new();
        for a in &matching[window.start..window.end] {
            if unlimited == Some(true) && a.total.is_none() {
                unlimited_assets.push(UnlimitedResponseAsset {
                    adam_id: a.adam_id.clone(),
                    pricing_param: a.pricing.clone(),
                    product_type: Some(a.product_type.clone()),
                    assigned_count: clamp(u64::from(a.assigned)),
                    device_assignable: a.device_assignable,
                    revocable: a.revocable,
                    supported_platforms: a.platforms(),
                });
            } else {
                assets.push(ResponseAsset {
                    adam_id: a.adam_id.clone(),
                    pricing_param: a.pricing.clone(),
                    product_type: Some(a.product_type.clone()),
                    assigned_count: clamp(u64::from(a.assigned)),
                    available_count: a
                        .available()
                        .map_or(types::UNLIMITED_COUNT, |v| clamp(u64::from(v))),
                    total_count: a
                        .total
                        .map_or(types::UNLIMITED_COUNT, |v| clamp(u64::from(v))),
                    retired_count: 0,
                    device_assignable: a.device_assignable,
                    revocable: a.revocable,
                    supported_platforms: a.platforms(),
                });
            }
        }
        let page = window.page(data.render_version());
        drop(data);
        Ok(Reply::ok(&GetAssetsResponse {
            assets,
            unlimited_assets: (unlimited == Some(true)).then_some(unlimited_assets),
            page,
            common: self.common(org),
        }))
    }

    fn get_assignments(&self, org: &Org, query: &Query) -> Result<Reply, Reply> {
        let pricing = query.pricing()?;
        let exclude_inactive_users = query.bool("excludeInactiveUsers")?.unwrap_or(false);
        let include_user_state = query.bool("includeUserState")?.unwrap_or(false);
        let page_index = query.page_index()?;
        let size = self.page_size();

        let data = lock(&org.data);
        let since_version = match query.get("sinceVersionId") {
            None => None,
            Some(v) => Some(
                data.parse_version(v)
                    .ok_or_else(|| Reply::bad(error_number::INVALID_VERSION_ID))?,
            ),
        };
        let filters = AssignmentQuery {
            adam_id: query.get("adamId"),
            pricing,
            client_user_id: query.get("clientUserId"),
            serial_number: query.get("serialNumber"),
            exclude_inactive_users,
            since_version,
        };
        let start = usize::try_from(page_index)
            .unwrap_or(usize::MAX)
            .saturating_mul(size);
        let (total, pairs) = data.assignments_page(&filters, start, size);
        let window = PageWindow::new(total, size, page_index)?;
        let assignments = pairs
            .into_iter()
            .map(|(a, t)| data.assignment(a, t, include_user_state))
            .collect();
        let page = window.page(data.render_version());
        drop(data);
        Ok(Reply::ok(&GetAssignmentsResponse {
            assignments,
            page,
            common: self.common(org),
        }))
    }

    fn get_users(&self, org: &Org, query: &Query) -> Result<Reply, Reply> {
        let active_only = query.bool("activeOnly")?.unwrap_or(false);
        let retired_only = query.bool("retiredOnly")?.unwrap_or(false);
        let page_index = query.page_index()?;

        let data = lock(&org.data);
        let since_version = match query.get("sinceVersionId") {
            None => None,
            Some(v) => Some(
                data.parse_version(v)
                    .ok_or_else(|| Reply::bad(error_number::INVALID_VERSION_ID))?,
            ),
        };
        let users = data.users_matching(&UserQuery {
            active_only,
            retired_only,
            client_user_id: query.get("clientUserId"),
            since_version,
        });
        let window = PageWindow::new(users.len(), self.page_size(), page_index)?;
        let shown = users[window.start..window.end]
            .iter()
            .map(|u| u.to_response())
            .collect();
        let page = window.page(data.render_version());
        drop(data);
        Ok(Reply::ok(&GetUsersResponse {
            users: shown,
            page,
            common: self.common(org),
        }))
    }

    fn status(&self, org: &Org, query: &Query) -> Result<Reply, Reply> {
        let Some(event_id) = query.get("eventId") else {
            return Err(Reply::bad(error_number::INVALID_ARGUMENT));
        };
        let common = self.common(org);
        let data = lock(&org.data);
        let Some(event) = data.events.get(event_id) else {
            return Err(Reply::bad(error_number::EVENT_NOT_FOUND));
        };
        Ok(Reply::ok(&StatusResponse {
            event_status: event.status().to_string(),
            event_type: event.kind.to_string(),
            num_requested: clamp(event.num_requested),
            num_completed: clamp(event.num_completed),
            failures: event.failures(),
            common,
        }))
    }

    fn manage_assets(&self, org: &Org, op: AssetOp, body: Value) -> Result<Reply, Reply> {
        let request: ManageAssetsRequest =
            serde_json::from_value(body).map_err(|_| Reply::bad(error_number::INVALID_ARGUMENT))?;
        let users = request.client_user_ids.unwrap_or_default();
        let serials = request.serial_numbers.unwrap_or_default();
        if request.assets.is_empty() {
            return Err(Reply::bad(error_number::ASSET_REQUIRED));
        }
        if users.is_empty() && serials.is_empty() {
            return Err(Reply::bad(error_number::TARGETS_REQUIRED));
        }
        // Section 9 item 24: a missing pricingParam is STDQ, also for duplicates.
        let assets: Vec<Asset> = request
            .assets
            .iter()
            .map(|a| Asset::new(a.adam_id.clone(), a.pricing().to_string()))
            .collect();
        let malformed: Vec<Asset> = assets
            .iter()
            .filter(|a| !valid_adam_id(&a.adam_id) || !valid_pricing(a.pricing()))
            .cloned()
            .collect();
        if !malformed.is_empty() {
            return Err(Reply::error_info(
                StatusCode::BAD_REQUEST,
                error_number::INVALID_ARGUMENT,
                info_assets(malformed),
            ));
        }
        check_target_strings(&users, &serials)?;
        if let Some(dups) = duplicates(&assets) {
            return Err(Reply::error_info(
                StatusCode::BAD_REQUEST,
                error_number::DUPLICATE_ASSETS,
                info_assets(dups),
            ));
        }
        check_target_duplicates(&users, &serials)?;
        let limits = self.shared.limits();
        if assets.len() > limits.max_assets as usize {
            return Err(Reply::bad(error_number::TOO_MANY_ASSETS));
        }
        if users.len() > limits.max_client_user_ids as usize {
            return Err(Reply::bad(error_number::TOO_MANY_CLIENT_USER_IDS));
        }
        if serials.len() > limits.max_serial_numbers as usize {
            return Err(Reply::bad(error_number::TOO_MANY_SERIAL_NUMBERS));
        }
        {
            let data = lock(&org.data);
            let known = |a: &Asset| {
                data.find_asset(&a.adam_id, a.pricing())
                    .map(|i| data.asset(i))
            };
            if !serials.is_empty() {
                let refused: Vec<Asset> = assets
                    .iter()
                    .filter(|a| known(a).is_some_and(|s| !s.device_assignable))
                    .cloned()
                    .collect();
                if !refused.is_empty() {
                    return Err(Reply::error_info(
                        StatusCode::BAD_REQUEST,
                        error_number::NOT_DEVICE_ASSIGNABLE,
                        info_assets(refused),
                    ));
                }
            }
            if op == AssetOp::Disassociate {
                let refused: Vec<Asset> = assets
                    .iter()
                    .filter(|a| known(a).is_some_and(|s| !s.revocable))
                    .cloned()
                    .collect();
                if !refused.is_empty() {
                    return Err(Reply::error_info(
                        StatusCode::BAD_REQUEST,
                        error_number::NOT_REVOCABLE,
                        info_assets(refused),
                    ));
                }
            }
        }
        let targets = targets_of(users, serials);
        Ok(self.accept(
            org,
            JobBody::Assets {
                op,
                assets,
                targets,
            },
        ))
    }

    fn revoke(&self, org: &Org, body: Value) -> Result<Reply, Reply> {
        let request: RevokeAssetsRequest =
            serde_json::from_value(body).map_err(|_| Reply::bad(error_number::INVALID_ARGUMENT))?;
        let users = request.client_user_ids.unwrap_or_default();
        let serials = request.serial_numbers.unwrap_or_default();
        if users.is_empty() && serials.is_empty() {
            return Err(Reply::bad(error_number::TARGETS_REQUIRED));
        }
        check_target_strings(&users, &serials)?;
        check_target_duplicates(&users, &serials)?;
        let limits = self.shared.limits();
        if users.len() > limits.max_revoke_client_user_ids as usize {
            return Err(Reply::bad(error_number::TOO_MANY_CLIENT_USER_IDS));
        }
        if serials.len() > limits.max_revoke_serial_numbers as usize {
            return Err(Reply::bad(error_number::TOO_MANY_SERIAL_NUMBERS));
        }
        Ok(self.accept(
            org,
            JobBody::Revoke {
                targets: targets_of(users, serials),
            },
        ))
    }

    fn manage_users(&self, org: &Org, op: UserOp, body: Value) -> Result<Reply, Reply> {
        let request: ManageUsersRequest =
            serde_json::from_value(body).map_err(|_| Reply::bad(error_number::INVALID_ARGUMENT))?;
        if request.users.is_empty() {
            return Err(Reply::bad(error_number::USERS_REQUIRED));
        }
        let ids: Vec<String> = request
            .users
            .iter()
            .map(|u| u.client_user_id.clone())
            .collect();
        if ids.iter().any(|id| id.trim().is_empty()) {
            return Err(Reply::bad(error_number::INVALID_ARGUMENT));
        }
        if let Some(dups) = duplicates(&ids) {
            return Err(Reply::error_info(
                StatusCode::BAD_REQUEST,
                error_number::DUPLICATE_USERS,
                info_users(dups),
            ));
        }
        if request.users.len() > self.shared.limits().max_users as usize {
            return Err(Reply::bad(error_number::TOO_MANY_USERS));
        }
        if op != UserOp::Retire {
            let bad_email: Vec<String> = request
                .users
                .iter()
                .filter(|u| u.email.as_deref().is_some_and(|e| !valid_email(e)))
                .map(|u| u.client_user_id.clone())
                .collect();
            if !bad_email.is_empty() {
                return Err(Reply::error_info(
                    StatusCode::BAD_REQUEST,
                    error_number::INVALID_EMAIL,
                    info_users(bad_email),
                ));
            }
        }
        Ok(self.accept(
            org,
            JobBody::Users {
                op,
                users: request.users,
            },
        ))
    }

    /// Creates the event and queues it. Both happen under the organization's
    /// lock so that queue order is acceptance order.
    fn accept(&self, org: &Org, body: JobBody) -> Reply {
        let hold_after = self.shared.take_hold();
        let event_id = uuid::Uuid::new_v4().to_string();
        let Some(event_id) = org.enqueue(&self.shared, event_id, body, hold_after) else {
            return Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                error_number::INTERNAL_ERROR,
            );
        };
        let cut = {
            let mut faults = lock(&self.shared.faults);
            let cut = faults.cut_connection_after_processing_next > 0;
            if cut {
                faults.cut_connection_after_processing_next -= 1;
            }
            cut
        };
        Reply {
            event_id: Some(event_id.clone()),
            cut,
            ..Reply::ok(&EventResponse {
                event_id: event_id.into(),
                common: self.common(org),
            })
        }
    }

    fn page_size(&self) -> usize {
        self.shared.config.page_size.max(1)
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Reply> {
    let bytes = http::read_body(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| match e {
            http::BodyError::TooLarge { .. } => Reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                error_number::INVALID_ARGUMENT,
            ),
            http::BodyError::Read(_) | http::BodyError::TimedOut { .. } => {
                Reply::bad(error_number::INVALID_ARGUMENT)
            }
        })?;
    serde_json::from_slice(&bytes).map_err(|_| Reply::bad(error_number::INVALID_ARGUMENT))
}

fn targets_of(users: Vec<String>, serials: Vec<String>) -> Vec<(TargetKind, String)> {
    users
        .into_iter()
        .map(|u| (TargetKind::User, u))
        .chain(serials.into_iter().map(|s| (TargetKind::Serial, s)))
        .collect()
}

fn check_target_strings(users: &[String], serials: &[String]) -> Result<(), Reply> {
    if users.iter().chain(serials).any(|t| t.trim().is_empty()) {
        return Err(Reply::bad(error_number::INVALID_ARGUMENT));
    }
    Ok(())
}

fn check_target_duplicates(users: &[String], serials: &[String]) -> Result<(), Reply> {
    if let Some(dups) = duplicates(users) {
        return Err(Reply::error_info(
            StatusCode::BAD_REQUEST,
            error_number::DUPLICATE_CLIENT_USER_IDS,
            info_users(dups),
        ));
    }
    if let Some(dups) = duplicates(serials) {
        return Err(Reply::error_info(
            StatusCode::BAD_REQUEST,
            error_number::DUPLICATE_SERIAL_NUMBERS,
            info_serials(dups),
        ));
    }
    Ok(())
}

/// The values that occur more than once, each named once.
fn duplicates<T: Clone + Eq + std::hash::Hash>(items: &[T]) -> Option<Vec<T>> {
    let mut seen = HashSet::with_capacity(items.len());
    let mut reported = HashSet::new();
    let mut dups = Vec::new();
    for item in items {
        if !seen.insert(item) && reported.insert(item) {
            dups.push(item.clone());
        }
    }
    (!dups.is_empty()).then_some(dups)
}

/// Deliberately simple: one `@`, something on both sides, a dot in the domain.
fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
}

fn retry_after_value(seconds: u64, as_date: bool) -> String {
    if as_date {
        httpdate::fmt_http_date(SystemTime::now() + std::time::Duration::from_secs(seconds))
    } else {
        seconds.to_string()
    }
}

/// Apple's counts are int32.
fn clamp(v: u64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// The query string, with the parsing rules of section 9 item 22.
struct Query(Vec<(String, String)>);

impl Query {
    /// The first value of a parameter; an empty value counts as absent.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, Reply> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => Ok(Some(false)),
            Some(_) => Err(Reply::bad(error_number::INVALID_ARGUMENT)),
        }
    }

    fn int(&self, key: &str) -> Result<Option<i64>, Reply> {
        self.get(key)
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| Reply::bad(error_number::INVALID_ARGUMENT))
            })
            .transpose()
    }

    fn pricing(&self) -> Result<Option<&str>, Reply> {
        match self.get("pricingParam") {
            Some(p) if !valid_pricing(p) => Err(Reply::bad(error_number::INVALID_ARGUMENT)),
            other => Ok(other),
        }
    }

    fn page_index(&self) -> Result<i64, Reply> {
        Ok(self.int("pageIndex")?.unwrap_or(0))
    }
}

/// One page of a result (section 9 item 19).
struct PageWindow {
    start: usize,
    end: usize,
    index: i64,
    total_pages: usize,
}

impl PageWindow {
    fn new(total: usize, size: usize, index: i64) -> Result<PageWindow, Reply> {
        let total_pages = total.div_ceil(size).max(1);
        let Ok(i) = usize::try_from(index) else {
            return Err(Reply::bad(error_number::PAGE_INDEX_OUT_OF_RANGE));
        };
        if i >= total_pages {
            return Err(Reply::bad(error_number::PAGE_INDEX_OUT_OF_RANGE));
        }
        let start = (i * size).min(total);
        Ok(PageWindow {
            start,
            end: (start + size).min(total),
            index,
            total_pages,
        })
    }

    fn page(&self, version_id: String) -> Page {
        let index = clamp(self.index as u64);
        Page {
            current_page_index: index,
            next_page_index: ((self.index as usize) + 1 < self.total_pages).then(|| index + 1),
            size: clamp((self.end - self.start) as u64),
            total_pages: clamp(self.total_pages as u64),
            version_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_section_9_19() {
        let empty = PageWindow::new(0, 3, 0).ok().unwrap();
        let p = empty.page("v".into());
        assert_eq!(
            (
                p.current_page_index,
                p.size,
                p.total_pages,
                p.next_page_index
            ),
            (0, 0, 1, None)
        );
        assert!(PageWindow::new(0, 3, 1).is_err());
        assert!(PageWindow::new(7, 3, -1).is_err());
        assert!(PageWindow::new(7, 3, 3).is_err());
        let last = PageWindow::new(7, 3, 2).ok().unwrap().page("v".into());
        assert_eq!(
            (last.size, last.total_pages, last.next_page_index),
            (1, 3, None)
        );
        let first = PageWindow::new(7, 3, 0).ok().unwrap().page("v".into());
        assert_eq!(first.next_page_index, Some(1));
    }

    #[test]
    fn duplicates_are_named_once() {
        let items = ["a", "b", "a", "a", "c", "b"].map(String::from);
        assert_eq!(
            duplicates(&items),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(duplicates(&["x".to_string()]), None);
    }

    #[test]
    fn emails() {
        assert!(valid_email("ana@example.com"));
        for bad in [
            "ana",
            "@example.com",
            "ana@example",
            "ana@@example.com",
            "a na@example.com",
            "ana@.com",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
