//! The edge between Apple's wire types and vppd's own: what Apple reports
//! (assignments, event status, notifications) becomes [`crate::report`]
//! types, its limits become the planner's [`Shape`], and a refusal for size
//! becomes a [`Refusal`]. Nothing past this file reads a wire type.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::AppleError;
use super::types::{
    self, AssetCountNotification, AssetManagementNotification, ErrorResponse, Limits, ResponseUser,
    StatusResponse, UserAssociatedNotification, UserManagementNotification, error_number,
    event_status, notification_type,
};
use crate::plan::{Refusal, Shape};
use crate::report::{
    Assignee, Assignment, EventFailure, EventStatus, FailureScope, Notification, NotificationBody,
    ReportedError, UserRecord,
};

impl From<&Limits> for Shape {
    fn from(l: &Limits) -> Shape {
        Shape {
            max_assets: l.max_assets.max(1),
            max_serials: l.max_serial_numbers.max(1),
            max_users: l.max_client_user_ids.max(1),
            max_revoke_serials: l.max_revoke_serial_numbers.max(1),
            max_revoke_users: l.max_revoke_client_user_ids.max(1),
        }
    }
}

impl AppleError {
    /// Apple refused a request for being over one of its limits (an error
    /// answer, not a 200): the request is to be split, not resent.
    pub fn refusal(&self) -> Option<Refusal> {
        if self.status() == Some(200) {
            return None;
        }
        match self.error_number()? {
            error_number::TOO_MANY_ASSETS => Some(Refusal::Assets),
            error_number::TOO_MANY_CLIENT_USER_IDS => Some(Refusal::ClientUserIds),
            error_number::TOO_MANY_SERIAL_NUMBERS => Some(Refusal::SerialNumbers),
            _ => None,
        }
    }

    /// Event status does not know the eventId.
    pub fn is_unknown_event(&self) -> bool {
        self.error_number() == Some(error_number::EVENT_NOT_FOUND)
    }

    /// Apple refused the request outright (neither retryable nor the token):
    /// its error, for the pairs of the request.
    pub fn reported(&self) -> Option<ReportedError> {
        match self {
            AppleError::Api { error, .. } => Some(reported(error)),
            _ => None,
        }
    }
}

fn reported(e: &ErrorResponse) -> ReportedError {
    ReportedError {
        number: e.error_number,
        message: e.error_message.clone(),
    }
}

impl From<&types::Assignment> for Option<Assignment> {
    fn from(a: &types::Assignment) -> Option<Assignment> {
        let assignee = match (&a.serial_number, &a.client_user_id) {
            (Some(s), _) => Assignee::Serial(s.clone()),
            (None, Some(u)) => Assignee::User(u.clone()),
            (None, None) => return None,
        };
        Some(Assignment {
            adam_id: a.adam_id.clone(),
            pricing_param: a.pricing_param.clone(),
            assignee,
        })
    }
}

/// Apple's assignments in vppd's terms; one without a target names nothing.
pub fn assignments(list: &[types::Assignment]) -> Vec<Assignment> {
    list.iter().filter_map(Option::<Assignment>::from).collect()
}

impl From<&StatusResponse> for EventStatus {
    fn from(s: &StatusResponse) -> EventStatus {
        match s.event_status.as_str() {
            event_status::PENDING => EventStatus::Pending,
            event_status::COMPLETE => EventStatus::Complete,
            _ => EventStatus::Failed(
                s.failures
                    .iter()
                    .flatten()
                    .map(|f| EventFailure {
                        error: reported(f),
                        scope: f.error_info.as_ref().map(|info| FailureScope {
                            assets: info.assets.as_ref().map(|list| {
                                list.iter()
                                    .map(|a| (a.adam_id.clone(), a.pricing().to_string()))
                                    .collect()
                            }),
                            serial_numbers: info.serial_numbers.clone(),
                            client_user_ids: info.client_user_ids.clone(),
                        }),
                    })
                    .collect(),
            ),
        }
    }
}

impl From<ResponseUser> for UserRecord {
    fn from(u: ResponseUser) -> UserRecord {
        UserRecord {
            client_user_id: u.client_user_id,
            email: u.email,
            invite_code: u.invite_code,
            id_hash: u.id_hash,
            status: u.status,
        }
    }
}

/// The envelope as received: the payload stays raw text until its type is known.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope<'a> {
    notification_id: String,
    notification_type: String,
    #[serde(borrow, default)]
    notification: Option<&'a RawValue>,
    #[serde(rename = "uId", default)]
    uid: String,
}

/// Why a notification cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotificationError {
    #[error("not a notification envelope: {0}")]
    Envelope(String),
    #[error("{kind} payload: {message}")]
    Payload { kind: String, message: String },
}

impl NotificationError {
    /// The notificationType, when the envelope was readable.
    pub fn kind(&self) -> Option<&str> {
        match self {
            NotificationError::Envelope(_) => None,
            NotificationError::Payload { kind, .. } => Some(kind),
        }
    }
}

/// Reads a notification: the envelope, then the payload of a known type
/// (parsed once). An unknown type is read as [`NotificationBody::Other`].
pub fn read_notification(body: &[u8]) -> Result<Notification, NotificationError> {
    let envelope: RawEnvelope<'_> =
        serde_json::from_slice(body).map_err(|e| NotificationError::Envelope(e.to_string()))?;
    if envelope.notification_id.trim().is_empty() || envelope.notification_type.trim().is_empty() {
        return Err(NotificationError::Envelope(
            "notificationId and notificationType must not be empty".into(),
        ));
    }
    let payload = envelope.notification.map(|r| r.get()).unwrap_or("null");
    let kind = envelope.notification_type.clone();
    let bad = |e: serde_json::Error| NotificationError::Payload {
        kind: kind.clone(),
        message: e.to_string(),
    };
    let body = match envelope.notification_type.as_str() {
        notification_type::ASSET_MANAGEMENT => {
            let n: AssetManagementNotification = serde_json::from_str(payload).map_err(bad)?;
            let error = (n.result != types::result::SUCCESS).then(|| {
                n.error.as_ref().map(reported).unwrap_or(ReportedError {
                    number: 0,
                    message: "Apple reported a failure without an error".into(),
                })
            });
            NotificationBody::Assets {
                assignments: assignments(&n.assignments),
                removal: n.kind != types::event_type::ASSOCIATE,
                event_id: n.event_id,
                error,
            }
        }
        notification_type::ASSET_COUNT => {
            let n: AssetCountNotification = serde_json::from_str(payload).map_err(bad)?;
            NotificationBody::LicenseCount {
                adam_id: n.adam_id,
                pricing_param: n.pricing_param,
                delta: n.count_delta as i64,
            }
        }
        notification_type::USER_MANAGEMENT => {
            let n: UserManagementNotification = serde_json::from_str(payload).map_err(bad)?;
            NotificationBody::Users(n.users.into_iter().map(UserRecord::from).collect())
        }
        notification_type::USER_ASSOCIATED => {
            let n: UserAssociatedNotification = serde_json::from_str(payload).map_err(bad)?;
            NotificationBody::Users(
                n.associated_users
                    .into_iter()
                    .map(UserRecord::from)
                    .collect(),
            )
        }
        other => NotificationBody::Other(other.to_string()),
    };
    Ok(Notification {
        id: envelope.notification_id,
        kind: envelope.notification_type,
        uid: envelope.uid,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_asset_management_notification_reads_into_assignments() {
        let n = read_notification(
            br#"{"notificationId":"n","notificationType":"ASSET_MANAGEMENT","uId":"7",
                "notification":{"eventId":"e","type":"ASSOCIATE","result":"FAILURE",
                "error":{"errorNumber":9709,"errorMessage":"short"},
                "assignments":[{"adamId":"1","pricingParam":"STDQ","serialNumber":"S"},
                               {"adamId":"1","pricingParam":"STDQ","clientUserId":"U"},
                               {"adamId":"1","pricingParam":"STDQ"}]}}"#,
        )
        .unwrap();
        assert_eq!(n.uid, "7");
        let NotificationBody::Assets {
            event_id,
            error,
            assignments,
            ..
        } = n.body
        else {
            panic!("not an asset notification");
        };
        assert_eq!(event_id, "e");
        assert_eq!(
            error.map(|e| e.number),
            Some(error_number::NOT_ENOUGH_LICENSES)
        );
        assert_eq!(
            assignments.iter().map(|a| &a.assignee).collect::<Vec<_>>(),
            vec![&Assignee::Serial("S".into()), &Assignee::User("U".into())]
        );
    }

    #[test]
    fn unreadable_notifications_say_what_is_wrong() {
        assert!(matches!(
            read_notification(b"[1]"),
            Err(NotificationError::Envelope(_))
        ));
        let e = read_notification(
            br#"{"notificationId":"n","notificationType":"ASSET_COUNT","notification":{}}"#,
        )
        .unwrap_err();
        assert_eq!(e.kind(), Some("ASSET_COUNT"));
        let other = read_notification(
            br#"{"notificationId":"n","notificationType":"SOMETHING_NEW","notification":{}}"#,
        )
        .unwrap();
        assert_eq!(other.body, NotificationBody::Other("SOMETHING_NEW".into()));
    }
}
