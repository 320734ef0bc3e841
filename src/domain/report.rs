//! What Apple reports, in vppd's terms: assignments it holds, how an event
//! ended, and the notifications it sends. The Apple edge (`apple`)
//! converts its wire types into these, so the stages never see a wire type.

use serde::{Deserialize, Serialize};

use crate::domain::ids::EventId;
use crate::domain::job::{JobAsset, Target};

/// Who holds a license: a device or a user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Assignee {
    Serial(String),
    User(String),
}

impl Assignee {
    pub fn as_target(&self) -> Target<'_> {
        match self {
            Assignee::Serial(s) => Target::Serial(s),
            Assignee::User(u) => Target::User(u),
        }
    }
}

/// A license Apple holds: asset and assignee.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Assignment {
    pub adam_id: String,
    pub pricing_param: String,
    pub assignee: Assignee,
}

/// An error Apple reported: its number and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedError {
    pub number: i32,
    pub message: String,
}

/// One failure of a finished event, and which pairs it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFailure {
    pub error: ReportedError,
    /// `None`: Apple named nothing, so the failure may concern any pair.
    pub scope: Option<FailureScope>,
}

/// The assets and targets a failure names; an absent or empty list names
/// none of its kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailureScope {
    /// (adamId, pricingParam).
    pub assets: Option<Vec<(String, String)>>,
    pub serial_numbers: Option<Vec<String>>,
    pub client_user_ids: Option<Vec<String>>,
}

impl EventFailure {
    /// Whether this failure may concern the pair (asset, target): a pair
    /// it cannot be told apart from counts as named.
    pub fn names(&self, asset: &JobAsset, target: Target<'_>) -> bool {
        let Some(scope) = &self.scope else {
            return true;
        };
        let listed = |list: &Option<Vec<String>>, x: &str| {
            list.as_ref().is_some_and(|l| l.iter().any(|v| v == x))
        };
        let target_named = match target {
            Target::Serial(s) => listed(&scope.serial_numbers, s),
            Target::User(u) => listed(&scope.client_user_ids, u),
        };
        let no_targets = scope.serial_numbers.as_ref().is_none_or(|l| l.is_empty())
            && scope.client_user_ids.as_ref().is_none_or(|l| l.is_empty());
        let asset_named = match &scope.assets {
            Some(list) if !list.is_empty() => list
                .iter()
                .any(|(a, p)| *a == asset.adam_id && *p == asset.pricing_param),
            _ => true,
        };
        (target_named || no_targets) && asset_named
    }
}

/// Where an event stands, from event status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventStatus {
    Pending,
    /// Finished, every pair done.
    Complete,
    /// Finished with failures (which may name only some pairs).
    Failed(Vec<EventFailure>),
}

impl EventStatus {
    /// A bounded metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Complete => "complete",
            EventStatus::Failed(_) => "failed",
        }
    }
}

/// Apple's `notificationType` values: the kind a [`Notification`] keeps.
pub mod notification_type {
    pub const ASSET_MANAGEMENT: &str = "ASSET_MANAGEMENT";
    pub const ASSET_COUNT: &str = "ASSET_COUNT";
    pub const USER_MANAGEMENT: &str = "USER_MANAGEMENT";
    pub const USER_ASSOCIATED: &str = "USER_ASSOCIATED";
    pub const TEST_NOTIFICATION: &str = "TEST_NOTIFICATION";
    pub const SUBSCRIPTION_MANAGEMENT: &str = "SUBSCRIPTION_MANAGEMENT";
    pub const SUBSCRIPTION_COUNT: &str = "SUBSCRIPTION_COUNT";
    pub const UNLIMITED_ASSET: &str = "UNLIMITED_ASSET";

    /// Every value `notificationTypes` in a client config POST may carry.
    pub const ALL_SUBSCRIBABLE: &[&str] = &[
        TEST_NOTIFICATION,
        ASSET_MANAGEMENT,
        USER_MANAGEMENT,
        USER_ASSOCIATED,
        ASSET_COUNT,
        SUBSCRIPTION_MANAGEMENT,
        SUBSCRIPTION_COUNT,
        UNLIMITED_ASSET,
    ];
}

/// A notification as the applier uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub id: String,
    /// Apple's notificationType, as sent.
    pub kind: String,
    /// The location (`uId`) it concerns.
    pub uid: String,
    pub body: NotificationBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotificationBody {
    /// ASSET_MANAGEMENT: the outcome of an associate/disassociate event for
    /// the assignments it lists.
    Assets {
        event_id: EventId,
        /// `None` on success.
        error: Option<ReportedError>,
        assignments: Vec<Assignment>,
        /// A disassociate or revoke event: the assignments are gone.
        removal: bool,
    },
    /// ASSET_COUNT: licenses added to or removed from an asset.
    LicenseCount {
        adam_id: String,
        pricing_param: String,
        delta: i64,
    },
    /// USER_MANAGEMENT, USER_ASSOCIATED: users as Apple now knows them.
    Users(Vec<UserRecord>),
    /// Acknowledged, nothing to apply (its notificationType).
    Other(String),
}

/// A user of a token, as Apple last reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserRecord {
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

#[cfg(test)]
impl UserRecord {
    /// A user with an id and a status, nothing else.
    pub(crate) fn with_status(id: &str, status: &str) -> UserRecord {
        UserRecord {
            client_user_id: id.into(),
            status: Some(status.into()),
            ..Default::default()
        }
    }
}
