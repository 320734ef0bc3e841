//! Wire types of Apple's App and Book Management API v2.
//!
//! These mirror the JSON exactly (camelCase, `uId`, `websiteURL`, ...). Unknown
//! fields are ignored everywhere because Apple adds fields over time; enum-like
//! strings (`eventStatus`, `notificationType`, ...) stay `String`s so that a new
//! value Apple introduces is kept rather than failing the whole response.
//! Fields Apple marks required, or that a response cannot mean anything
//! without, are not `Option`: serde then names them when they are missing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::ids::EventId;

// Apple's names the domain speaks too live there; the wire re-exports them.
pub use crate::domain::job::{PLUS, STDQ, event_type};
pub use crate::domain::report::notification_type;

/// `totalCount`/`availableCount` of an unlimited free asset.
pub const UNLIMITED_COUNT: i32 = i32::MAX;

/// Apple's error numbers, by what they mean. Code compares against these,
/// never against bare numbers.
pub mod error_number {
    pub const LOGIN_REQUIRED: i32 = 9601;
    pub const INVALID_ARGUMENT: i32 = 9602;
    pub const INTERNAL_ERROR: i32 = 9603;
    pub const USER_NOT_FOUND: i32 = 9609;
    pub const LICENSE_NOT_FOUND: i32 = 9610;
    pub const TOKEN_EXPIRED: i32 = 9621;
    pub const INVALID_TOKEN: i32 = 9622;
    pub const TOKEN_REVOKED: i32 = 9625;
    pub const SERVICE_REMOVED: i32 = 9634;
    pub const FACILITATOR_NOT_ALLOWED: i32 = 9637;
    pub const ACCOUNT_LINKED_TO_ANOTHER_USER: i32 = 9641;
    pub const MAINTENANCE: i32 = 9644;
    pub const TOO_MANY_REQUESTS: i32 = 9646;
    pub const LEGACY_TOKEN: i32 = 9647;
    pub const PAGE_INDEX_OUT_OF_RANGE: i32 = 9650;
    pub const TOO_MANY_ASSETS: i32 = 9700;
    pub const TOO_MANY_CLIENT_USER_IDS: i32 = 9701;
    pub const TOO_MANY_SERIAL_NUMBERS: i32 = 9702;
    pub const DUPLICATE_ASSETS: i32 = 9703;
    pub const DUPLICATE_CLIENT_USER_IDS: i32 = 9704;
    pub const DUPLICATE_SERIAL_NUMBERS: i32 = 9705;
    pub const NOT_REVOCABLE: i32 = 9706;
    pub const NOT_DEVICE_ASSIGNABLE: i32 = 9707;
    pub const EVENT_NOT_FOUND: i32 = 9708;
    pub const NOT_ENOUGH_LICENSES: i32 = 9709;
    pub const NOTIFICATION_URL_AND_TOKEN_REQUIRED: i32 = 9710;
    pub const NOTIFICATION_SETTING_TOO_LONG: i32 = 9711;
    pub const NOTIFICATION_URL_INVALID: i32 = 9712;
    pub const MDM_METADATA_TOO_LONG: i32 = 9713;
    pub const TOO_MANY_USERS: i32 = 9714;
    pub const DUPLICATE_USERS: i32 = 9715;
    pub const USER_EXISTS: i32 = 9716;
    pub const INVALID_EMAIL: i32 = 9717;
    pub const ASSET_REQUIRED: i32 = 9718;
    pub const TARGETS_REQUIRED: i32 = 9719;
    pub const USERS_REQUIRED: i32 = 9720;
    pub const INVALID_VERSION_ID: i32 = 9721;
    pub const INVALID_AUTHORIZATION_HEADER: i32 = 9722;
    pub const MDM_INFO_INCOMPLETE: i32 = 9723;
    pub const MDM_ID_TOO_LONG: i32 = 9724;
    pub const MDM_NAME_TOO_LONG: i32 = 9725;
    pub const UNSUPPORTED_METHOD: i32 = 9726;
    pub const UNSUPPORTED_CONTENT_TYPE: i32 = 9727;
    pub const NOTIFICATION_URL_UNREACHABLE: i32 = 9728;
    pub const SERVICE_UNAVAILABLE: i32 = 9729;
}

pub mod event_status {
    pub const PENDING: &str = "PENDING";
    pub const COMPLETE: &str = "COMPLETE";
    pub const FAILED: &str = "FAILED";
}

pub mod result {
    pub const SUCCESS: &str = "SUCCESS";
    pub const FAILURE: &str = "FAILURE";
}

/// Keys of the service config `limits` map that vppd reads.
pub mod limit_key {
    pub const MAX_ASSETS: &str = "maxAssets";
    pub const MAX_USERS: &str = "maxUsers";
    pub const MAX_NOTIFICATION_LENGTH: &str = "maxNotificationLength";
    pub const MAX_REVOKE_CLIENT_USER_IDS: &str = "maxRevokeClientUserIds";
    pub const MAX_CLIENT_USER_IDS: &str = "maxClientUserIds";
    pub const MAX_SERIAL_NUMBERS: &str = "maxSerialNumbers";
    pub const MAX_REVOKE_SERIAL_NUMBERS: &str = "maxRevokeSerialNumbers";
    pub const MAX_REQUEST_PER_SECOND: &str = "maxRequestPerSecond";
    pub const MAX_SUBSCRIPTIONS: &str = "maxSubscriptions";
    pub const MAX_SUBSCRIPTION_CLIENT_USER_IDS: &str = "maxSubscriptionClientUserIds";
    pub const MAX_MDM_NAME_LENGTH: &str = "maxMdmNameLength";
    pub const MAX_MDM_METADATA_LENGTH: &str = "maxMdmMetadataLength";
    pub const MAX_MDM_ID_LENGTH: &str = "maxMdmIdLength";
}

/// Keys of the service config `urls` map.
pub mod url_key {
    pub const CLIENT_CONFIG: &str = "clientConfig";
    pub const GET_ASSETS: &str = "getAssets";
    pub const GET_ASSIGNMENTS: &str = "getAssignments";
    pub const ASSOCIATE_ASSETS: &str = "associateAssets";
    pub const DISASSOCIATE_ASSETS: &str = "disassociateAssets";
    pub const REVOKE_ASSETS: &str = "revokeAssets";
    pub const EVENT_STATUS: &str = "eventStatus";
    pub const GET_USERS: &str = "getUsers";
    pub const CREATE_USERS: &str = "createUsers";
    pub const UPDATE_USERS: &str = "updateUsers";
    pub const RETIRE_USERS: &str = "retireUsers";
    pub const INVITATION_EMAIL: &str = "invitationEmail";
    pub const CONTENT_METADATA_LOOKUP: &str = "contentMetadataLookup";
}

/// An asset as named in requests: (`adamId`, `pricingParam`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Asset {
    pub adam_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing_param: Option<String>,
}

impl Asset {
    pub fn new(adam_id: impl Into<String>, pricing_param: impl Into<String>) -> Self {
        Asset {
            adam_id: adam_id.into(),
            pricing_param: Some(pricing_param.into()),
        }
    }

    /// The pricing parameter with Apple's default applied.
    pub fn pricing(&self) -> &str {
        self.pricing_param.as_deref().unwrap_or(STDQ)
    }
}

/// Item of `assets` in Get Assets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseAsset {
    pub adam_id: String,
    #[serde(default = "default_pricing")]
    pub pricing_param: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_type: Option<String>,
    #[serde(default)]
    pub assigned_count: i32,
    #[serde(default)]
    pub available_count: i32,
    #[serde(default)]
    pub total_count: i32,
    #[serde(default)]
    pub retired_count: i32,
    #[serde(default)]
    pub device_assignable: bool,
    #[serde(default)]
    pub revocable: bool,
    #[serde(default)]
    pub supported_platforms: Vec<String>,
}

/// Item of `unlimitedAssets` in Get Assets with `unlimited=true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnlimitedResponseAsset {
    pub adam_id: String,
    #[serde(default = "default_pricing")]
    pub pricing_param: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_type: Option<String>,
    #[serde(default)]
    pub assigned_count: i32,
    #[serde(default)]
    pub device_assignable: bool,
    #[serde(default)]
    pub revocable: bool,
    #[serde(default)]
    pub supported_platforms: Vec<String>,
}

fn default_pricing() -> String {
    STDQ.to_string()
}

/// An (asset, target) assignment, in Get Assignments and ASSET_MANAGEMENT.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub adam_id: String,
    #[serde(default = "default_pricing")]
    pub pricing_param: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_hash: Option<String>,
}

/// Item of `users` in user management requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestUser {
    pub client_user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_apple_id: Option<String>,
}

/// Item of `users` in Get Users and USER_MANAGEMENT, of `associatedUsers` in USER_ASSOCIATED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseUser {
    pub client_user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MdmInfo {
    pub id: String,
    pub name: String,
    pub metadata: String,
}

/// Apple's error body. Also used for `failures` items and notification `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResponse {
    pub error_number: i32,
    #[serde(default)]
    pub error_message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ResponseErrorInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseErrorInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assets: Option<Vec<Asset>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_user_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_numbers: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseErrorCode {
    pub error_number: i32,
    #[serde(default)]
    pub error_message: String,
}

/// `GET /service/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceConfigResponse {
    #[serde(default)]
    pub error_codes: Vec<ResponseErrorCode>,
    pub limits: BTreeMap<String, i32>,
    #[serde(default)]
    pub notification_types: Vec<String>,
    #[serde(default)]
    pub urls: BTreeMap<String, String>,
}

/// `GET` and `POST /client/config` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfigResponse {
    #[serde(
        rename = "countryISO2ACode",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub country_iso2a_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_platform: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdm_info: Option<MdmInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_auth_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_url: Option<String>,
    #[serde(default)]
    pub subscribed_notification_types: Vec<String>,
    #[serde(
        rename = "websiteURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub website_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expiration_date: Option<String>,
    #[serde(rename = "uId")]
    pub uid: String,
}

/// `POST /client/config` body. Fields left out keep their stored values.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfigRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdm_info: Option<MdmInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_auth_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_types: Option<Vec<String>>,
}

impl std::fmt::Debug for ClientConfigRequest {
    // The notification auth token is a shared secret: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfigRequest")
            .field("mdm_info", &self.mdm_info)
            .field("notification_url", &self.notification_url)
            .field(
                "notification_auth_token",
                &self.notification_auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("notification_types", &self.notification_types)
            .finish()
    }
}

/// Pagination fields shared by Get Assets, Get Assignments and Get Users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    pub current_page_index: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_index: Option<i32>,
    pub size: i32,
    pub total_pages: i32,
    pub version_id: String,
}

/// Fields every authenticated response carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Common {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdm_info: Option<MdmInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expiration_date: Option<String>,
    #[serde(rename = "uId", default)]
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetAssetsResponse {
    #[serde(default)]
    pub assets: Vec<ResponseAsset>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlimited_assets: Option<Vec<UnlimitedResponseAsset>>,
    #[serde(flatten)]
    pub page: Page,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetAssignmentsResponse {
    #[serde(default)]
    pub assignments: Vec<Assignment>,
    #[serde(flatten)]
    pub page: Page,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetUsersResponse {
    #[serde(default)]
    pub users: Vec<ResponseUser>,
    #[serde(flatten)]
    pub page: Page,
    #[serde(flatten)]
    pub common: Common,
}

/// Body of associate and disassociate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManageAssetsRequest {
    #[serde(default)]
    pub assets: Vec<Asset>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_user_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_numbers: Option<Vec<String>>,
}

/// Body of revoke.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokeAssetsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_user_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_numbers: Option<Vec<String>>,
}

/// Body of users create, update and retire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManageUsersRequest {
    #[serde(default)]
    pub users: Vec<RequestUser>,
}

/// 200 body of every management POST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventResponse {
    pub event_id: EventId,
    #[serde(flatten)]
    pub common: Common,
}

/// `GET /status?eventId=`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    pub event_status: String,
    #[serde(default)]
    pub event_type: String,
    #[serde(default)]
    pub num_requested: i32,
    #[serde(default)]
    pub num_completed: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<Vec<ErrorResponse>>,
    #[serde(flatten)]
    pub common: Common,
}

/// The notification envelope Apple POSTs to `notificationUrl`.
///
/// `notification` stays raw JSON here: its shape depends on
/// `notificationType`, and an unknown type must still be acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationEnvelope {
    pub notification_id: String,
    pub notification_type: String,
    #[serde(default)]
    pub notification: serde_json::Value,
    #[serde(rename = "uId", default)]
    pub uid: String,
}

/// Payload of ASSET_MANAGEMENT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssetManagementNotification {
    pub event_id: EventId,
    #[serde(rename = "type")]
    pub kind: String,
    pub result: String,
    #[serde(default)]
    pub assignments: Vec<Assignment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorResponse>,
}

/// Payload of ASSET_COUNT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssetCountNotification {
    pub adam_id: String,
    #[serde(default = "default_pricing")]
    pub pricing_param: String,
    pub count_delta: i32,
}

/// Payload of USER_MANAGEMENT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserManagementNotification {
    pub event_id: EventId,
    #[serde(rename = "type")]
    pub kind: String,
    pub result: String,
    #[serde(default)]
    pub users: Vec<ResponseUser>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorResponse>,
}

/// Payload of USER_ASSOCIATED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserAssociatedNotification {
    #[serde(default)]
    pub associated_users: Vec<ResponseUser>,
}

/// The dynamic limits that shape requests, read from service config.
///
/// Keys can appear or disappear; a missing key falls back to Apple's sample
/// value, except `maxRequestPerSecond`, whose absence means "no published
/// ceiling" (the configured `requests_per_second` then rules alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub max_assets: u32,
    pub max_serial_numbers: u32,
    pub max_client_user_ids: u32,
    pub max_users: u32,
    pub max_revoke_serial_numbers: u32,
    pub max_revoke_client_user_ids: u32,
    pub max_notification_length: u32,
    pub max_mdm_id_length: u32,
    pub max_mdm_name_length: u32,
    pub max_mdm_metadata_length: u32,
    pub max_request_per_second: Option<u32>,
}

impl Default for Limits {
    /// Apple's sample values.
    fn default() -> Self {
        Limits {
            max_assets: 25,
            max_serial_numbers: 1000,
            max_client_user_ids: 1000,
            max_users: 100,
            max_revoke_serial_numbers: 100,
            max_revoke_client_user_ids: 100,
            max_notification_length: 512,
            max_mdm_id_length: 100,
            max_mdm_name_length: 100,
            max_mdm_metadata_length: 255,
            max_request_per_second: Some(15),
        }
    }
}

impl Limits {
    /// Reads the limits map; a non-positive value is treated as absent because
    /// a request limit of zero would make every request impossible.
    pub fn from_map(map: &BTreeMap<String, i32>) -> Limits {
        let d = Limits::default();
        let get = |key: &str, fallback: u32| -> u32 {
            map.get(key)
                .copied()
                .filter(|v| *v > 0)
                .map(|v| v as u32)
                .unwrap_or(fallback)
        };
        Limits {
            max_assets: get(limit_key::MAX_ASSETS, d.max_assets),
            max_serial_numbers: get(limit_key::MAX_SERIAL_NUMBERS, d.max_serial_numbers),
            max_client_user_ids: get(limit_key::MAX_CLIENT_USER_IDS, d.max_client_user_ids),
            max_users: get(limit_key::MAX_USERS, d.max_users),
            max_revoke_serial_numbers: get(
                limit_key::MAX_REVOKE_SERIAL_NUMBERS,
                d.max_revoke_serial_numbers,
            ),
            max_revoke_client_user_ids: get(
                limit_key::MAX_REVOKE_CLIENT_USER_IDS,
                d.max_revoke_client_user_ids,
            ),
            max_notification_length: get(
                limit_key::MAX_NOTIFICATION_LENGTH,
                d.max_notification_length,
            ),
            max_mdm_id_length: get(limit_key::MAX_MDM_ID_LENGTH, d.max_mdm_id_length),
            max_mdm_name_length: get(limit_key::MAX_MDM_NAME_LENGTH, d.max_mdm_name_length),
            max_mdm_metadata_length: get(
                limit_key::MAX_MDM_METADATA_LENGTH,
                d.max_mdm_metadata_length,
            ),
            max_request_per_second: map
                .get(limit_key::MAX_REQUEST_PER_SECOND)
                .copied()
                .filter(|v| *v > 0)
                .map(|v| v as u32),
        }
    }

    /// The limits map as service config publishes it.
    pub fn to_map(&self) -> BTreeMap<String, i32> {
        let clamp = |v: u32| v.min(i32::MAX as u32) as i32;
        let mut m = BTreeMap::new();
        m.insert(limit_key::MAX_ASSETS.into(), clamp(self.max_assets));
        m.insert(
            limit_key::MAX_SERIAL_NUMBERS.into(),
            clamp(self.max_serial_numbers),
        );
        m.insert(
            limit_key::MAX_CLIENT_USER_IDS.into(),
            clamp(self.max_client_user_ids),
        );
        m.insert(limit_key::MAX_USERS.into(), clamp(self.max_users));
        m.insert(
            limit_key::MAX_REVOKE_SERIAL_NUMBERS.into(),
            clamp(self.max_revoke_serial_numbers),
        );
        m.insert(
            limit_key::MAX_REVOKE_CLIENT_USER_IDS.into(),
            clamp(self.max_revoke_client_user_ids),
        );
        m.insert(
            limit_key::MAX_NOTIFICATION_LENGTH.into(),
            clamp(self.max_notification_length),
        );
        m.insert(
            limit_key::MAX_MDM_ID_LENGTH.into(),
            clamp(self.max_mdm_id_length),
        );
        m.insert(
            limit_key::MAX_MDM_NAME_LENGTH.into(),
            clamp(self.max_mdm_name_length),
        );
        m.insert(
            limit_key::MAX_MDM_METADATA_LENGTH.into(),
            clamp(self.max_mdm_metadata_length),
        );
        m.insert(limit_key::MAX_SUBSCRIPTIONS.into(), 25);
        m.insert(limit_key::MAX_SUBSCRIPTION_CLIENT_USER_IDS.into(), 1000);
        if let Some(rps) = self.max_request_per_second {
            m.insert(limit_key::MAX_REQUEST_PER_SECOND.into(), clamp(rps));
        }
        m
    }
}

/// The `errorCodes` list of Apple's service config sample, as wire data.
pub const SERVICE_ERROR_CODES: &[(i32, &str)] = &[
    (error_number::LOGIN_REQUIRED, "Login required."),
    (error_number::INVALID_ARGUMENT, "Invalid argument."),
    (error_number::INTERNAL_ERROR, "Internal error."),
    (
        error_number::USER_NOT_FOUND,
        "Unable to find the registered user.",
    ),
    (
        error_number::TOKEN_EXPIRED,
        "The token has expired. You need to generate a new token online using your organization's account at either school.apple.com or business.apple.com.",
    ),
    (
        error_number::TOKEN_REVOKED,
        "The server has revoked the sToken.",
    ),
    (error_number::SERVICE_REMOVED, "Service removed."),
    (
        error_number::TOO_MANY_REQUESTS,
        "There are too many recent requests. Try again momentarily.",
    ),
    (
        error_number::PAGE_INDEX_OUT_OF_RANGE,
        "The provided page index must be greater than 0, and less than the total number of pages.",
    ),
    (
        error_number::TOO_MANY_ASSETS,
        "Max assets limit on request has been passed, please stay within given limit.",
    ),
    (
        error_number::TOO_MANY_CLIENT_USER_IDS,
        "Max clientUserIds limit on request has been passed, please stay within given limit.",
    ),
    (
        error_number::TOO_MANY_SERIAL_NUMBERS,
        "Max serialNumbers limit on request has been passed, please stay within given limit.",
    ),
    (
        error_number::DUPLICATE_ASSETS,
        "Duplicate assets found in request, please send unique assets.",
    ),
    (
        error_number::DUPLICATE_CLIENT_USER_IDS,
        "Duplicate clientUserIds found in request, please send unique clients.",
    ),
    (
        error_number::DUPLICATE_SERIAL_NUMBERS,
        "Duplicate serialNumbers found in request, please send unique serials.",
    ),
    (
        error_number::NOT_REVOCABLE,
        "Asset in request is not revocable, please send revocable assets.",
    ),
    (
        error_number::NOT_DEVICE_ASSIGNABLE,
        "Asset in request is not device assignable, please send device assignable assets.",
    ),
    (error_number::EVENT_NOT_FOUND, "EventId could not be found."),
    (
        error_number::NOT_ENOUGH_LICENSES,
        "There are not enough licenses for this app or book available to assign to the selected group.",
    ),
    (
        error_number::NOTIFICATION_URL_AND_TOKEN_REQUIRED,
        "Both the notification URL and the authentication token are necessary.",
    ),
    (
        error_number::NOTIFICATION_SETTING_TOO_LONG,
        "Either the notification URL or the authentication token exceeds its maximum length. Change the request to stay within the specified limit.",
    ),
    (
        error_number::NOTIFICATION_URL_INVALID,
        "The provided notification URL must be a valid URL and use HTTPS as the protocol.",
    ),
    (
        error_number::MDM_METADATA_TOO_LONG,
        "The MDM metadata exceeds the maximum length. Change the request to stay within the specified limit.",
    ),
    (
        error_number::TOO_MANY_USERS,
        "The number of users exceeds the maximum. Change the request to stay within the specified limit.",
    ),
    (
        error_number::DUPLICATE_USERS,
        "This request contains duplicate users. Change the request to send unique users.",
    ),
    (
        error_number::USER_EXISTS,
        "A registered user already exists with the specified clientUserId.",
    ),
    (
        error_number::INVALID_EMAIL,
        "This request contains an invalid email address. Change the request to send valid email addresses.",
    ),
    (
        error_number::ASSET_REQUIRED,
        "This request doesn't contain an asset, which is a required argument. Change the request to provide an asset.",
    ),
    (
        error_number::TARGETS_REQUIRED,
        "Either clientUserIds or serialNumbers are required arguments. Change the request to provide assignable users and devices.",
    ),
    (
        error_number::USERS_REQUIRED,
        "Users are a required argument. Change the request to provide a user.",
    ),
    (
        error_number::INVALID_VERSION_ID,
        "This request contains an invalid version ID. Change the request to send the version ID from the read APIs.",
    ),
    (
        error_number::INVALID_AUTHORIZATION_HEADER,
        "This request contains an invalid authorization header. Change the request to send an authorization header that matches the format 'Bearer {sToken}'.",
    ),
    (
        error_number::MDM_INFO_INCOMPLETE,
        "You must provide an MDM name, ID, and metadata when setting the MDM information.",
    ),
    (
        error_number::MDM_ID_TOO_LONG,
        "The MDM ID exceeds the maximum length. Change the request to stay within the specified limit.",
    ),
    (
        error_number::MDM_NAME_TOO_LONG,
        "The MDM name exceeds the maximum length. Change the request to stay within the specified limit.",
    ),
    (
        error_number::UNSUPPORTED_METHOD,
        "This request contains an unsupported HTTP method for the requested endpoint.",
    ),
    (
        error_number::UNSUPPORTED_CONTENT_TYPE,
        "This request contains an unsupported Content-Type for the requested endpoint.",
    ),
    (
        error_number::NOTIFICATION_URL_UNREACHABLE,
        "The provided notification URL is unreachable.",
    ),
];

/// Apple's message for an error number, where the service config list has one.
pub fn error_message(number: i32) -> &'static str {
    match number {
        // Not in the service config list, but documented as asynchronous or
        // reported by integrators; the simulator needs a text for them.
        error_number::INVALID_TOKEN => "Invalid authentication token.",
        error_number::FACILITATOR_NOT_ALLOWED => {
            "This operation is not allowed for facilitator accounts."
        }
        error_number::ACCOUNT_LINKED_TO_ANOTHER_USER => {
            "The Apple Account is already linked to another user."
        }
        error_number::MAINTENANCE => "The service is in maintenance mode. Try again later.",
        error_number::LEGACY_TOKEN => "This operation is not supported for legacy tokens.",
        error_number::SERVICE_UNAVAILABLE => {
            "The service is temporarily unavailable. Try again later."
        }
        error_number::LICENSE_NOT_FOUND => "License not found.",
        _ => SERVICE_ERROR_CODES
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, m)| *m)
            .unwrap_or("Unknown error."),
    }
}

/// Whether a 200 body is really Apple's error (section 8.6 of the reference):
/// it carries `errorNumber` and lacks the field a success must have.
pub fn is_error_body(body: &serde_json::Value, success_field: &str) -> bool {
    match body {
        serde_json::Value::Object(map) => is_error_top(|k| map.contains_key(k), success_field),
        _ => false,
    }
}

/// [`is_error_body`] for a body's top-level keys however they were read.
pub fn is_error_top(has_key: impl Fn(&str) -> bool, success_field: &str) -> bool {
    has_key("errorNumber") && !has_key(success_field)
}
