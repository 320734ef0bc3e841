//! The edge between Apple's wire types and vppd's own: what Apple reports
//! (assignments, event status, notifications) becomes [`crate::domain::report`]
//! types, its limits become the planner's [`Shape`], and a refusal for size
//! becomes a [`Refusal`]. Nothing past this file reads a wire type.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_json::value::RawValue;

use super::AppleError;
use super::scan;
use super::types::{
    self, AssetCountNotification, ErrorResponse, Limits, ResponseUser, StatusResponse,
    UserAssociatedNotification, UserManagementNotification, error_number, event_status,
    notification_type,
};
use crate::domain::inbox::{self, AssignmentRef, DecodeError, Encoder, StoredNotification};
use crate::domain::job::Target;
use crate::domain::plan::{Refusal, Shape};
use crate::domain::report::{
    Assignee, Assignment, EventFailure, EventStatus, FailureScope, Notification, ReportedError,
    UserRecord,
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

/// A JSON string as received: borrowed from the body unless it has escapes.
/// (serde borrows a `Cow` only as a direct field, not inside an `Option`.)
pub struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text<'a>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

fn empty<'a>() -> Text<'a> {
    Text(Cow::Borrowed(""))
}

fn stdq<'a>() -> Text<'a> {
    Text(Cow::Borrowed(types::STDQ))
}

/// The envelope as received: the payload stays raw text until its type is known.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope<'a> {
    #[serde(borrow)]
    notification_id: Text<'a>,
    #[serde(borrow)]
    notification_type: Text<'a>,
    #[serde(borrow, default)]
    notification: Option<&'a RawValue>,
    #[serde(rename = "uId", default = "empty", borrow)]
    uid: Text<'a>,
}

/// ASSET_MANAGEMENT's payload as received: [`types::AssetManagementNotification`]
/// (same fields, same checks), its strings borrowed from the body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssetManagementIn<'a> {
    #[serde(borrow)]
    event_id: Text<'a>,
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
    #[serde(borrow)]
    result: Text<'a>,
    #[serde(default, borrow)]
    assignments: Vec<AssignmentIn<'a>>,
    #[serde(default)]
    error: Option<ErrorResponse>,
}

/// [`types::Assignment`] as received, borrowed: in a notification's
/// payload and in a page of Get Assignments.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentIn<'a> {
    #[serde(borrow)]
    adam_id: Text<'a>,
    #[serde(default = "stdq", borrow)]
    pricing_param: Text<'a>,
    #[serde(default, borrow)]
    client_user_id: Option<Text<'a>>,
    #[serde(default, borrow)]
    serial_number: Option<Text<'a>>,
    #[serde(default, borrow)]
    user_status: Option<Text<'a>>,
    #[serde(default, borrow)]
    id_hash: Option<Text<'a>>,
}

impl AssignmentIn<'_> {
    /// As [`assignments`] reads it: one without a target names nothing.
    pub fn as_ref(&self) -> Option<AssignmentRef<'_>> {
        let target = match (&self.serial_number, &self.client_user_id) {
            (Some(s), _) => Target::Serial(s),
            (None, Some(u)) => Target::User(u),
            (None, None) => return None,
        };
        Some(AssignmentRef {
            adam_id: &self.adam_id,
            pricing_param: &self.pricing_param,
            target,
        })
    }
}

impl AssignmentIn<'_> {
    /// The wire type, owned.
    pub fn to_wire(&self) -> types::Assignment {
        let text = |t: &Option<Text<'_>>| t.as_ref().map(|t| t.to_string());
        types::Assignment {
            adam_id: self.adam_id.to_string(),
            pricing_param: self.pricing_param.to_string(),
            client_user_id: text(&self.client_user_id),
            serial_number: text(&self.serial_number),
            user_status: text(&self.user_status),
            id_hash: text(&self.id_hash),
        }
    }

    /// [`crate::domain::lifecycle::pair_key`] of the record as Apple lists it.
    pub fn pair_key(&self) -> u64 {
        crate::domain::lifecycle::pair_key(
            &self.adam_id,
            &self.pricing_param,
            self.serial_number.as_deref(),
            self.client_user_id.as_deref(),
        )
    }
}

/// A page of Get Assignments ([`types::GetAssignmentsResponse`], whose
/// fields it requires), its records borrowed from the page's bytes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentsPageIn<'a> {
    #[serde(default, borrow)]
    pub assignments: Vec<AssignmentIn<'a>>,
    #[serde(default)]
    pub next_page_index: Option<i32>,
    #[serde(borrow)]
    pub version_id: Text<'a>,
    // Not used, but required as the owned type requires them.
    #[allow(dead_code)]
    current_page_index: i32,
    #[allow(dead_code)]
    size: i32,
    #[allow(dead_code)]
    total_pages: i32,
}

/// Why a notification cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotificationError {
    #[error("not a notification envelope: {0}")]
    Envelope(String),
    #[error("{kind} payload: {message}")]
    Payload { kind: String, message: String },
    /// A recorded item in the binary form that cannot be read.
    #[error("recorded notification {0}")]
    Stored(#[from] DecodeError),
}

impl NotificationError {
    /// The notificationType, when the envelope was readable.
    pub fn kind(&self) -> Option<&str> {
        match self {
            NotificationError::Envelope(_) | NotificationError::Stored(_) => None,
            NotificationError::Payload { kind, .. } => Some(kind),
        }
    }
}

/// A notification the listener has read and checked: what it answers by,
/// and what the store keeps ([`crate::domain::inbox`]).
pub enum Received<'a> {
    /// An ASSET_MANAGEMENT notification read by [`scan`], borrowed from the
    /// body: the listener maps its assignments to pair numbers when it can
    /// ([`crate::runtime::sent`]) and encodes it only when it cannot.
    Scanned(StoredNotification<'a>),
    /// Anything else, read by serde and already in its stored form.
    Read {
        id: Cow<'a, str>,
        /// Apple's notificationType, as sent.
        kind: Cow<'a, str>,
        uid: Cow<'a, str>,
        stored: Vec<u8>,
    },
}

impl Received<'_> {
    pub fn id(&self) -> &str {
        match self {
            Received::Scanned(n) => n.id,
            Received::Read { id, .. } => id,
        }
    }

    /// Apple's notificationType, as sent.
    pub fn kind(&self) -> &str {
        match self {
            Received::Scanned(n) => n.kind,
            Received::Read { kind, .. } => kind,
        }
    }

    pub fn uid(&self) -> &str {
        match self {
            Received::Scanned(n) => n.uid,
            Received::Read { uid, .. } => uid,
        }
    }

    /// The form stored as Apple named things ([`inbox`] format 1).
    pub fn stored(&self) -> Cow<'_, [u8]> {
        match self {
            Received::Scanned(n) => Cow::Owned(inbox::encode_borrowed(n)),
            Received::Read { stored, .. } => Cow::Borrowed(stored),
        }
    }
}

/// An ASSET_MANAGEMENT notification read in one pass: Apple sends the
/// payload before its type, so the envelope is first read as if it were
/// one, and by [`RawEnvelope`] only when it is not.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AssetEnvelope<'a> {
    #[serde(borrow)]
    notification_id: Text<'a>,
    #[serde(borrow)]
    notification_type: Text<'a>,
    #[serde(borrow)]
    notification: AssetManagementIn<'a>,
    #[serde(rename = "uId", default = "empty", borrow)]
    uid: Text<'a>,
}

/// Reads and checks a notification: the envelope, then the payload of a
/// known type, parsed once and written straight into its stored form (no
/// string is copied per assignment unless JSON escapes it). An unknown
/// type is stored as one with nothing to apply.
///
/// Nearly every notification of a rollout is an ASSET_MANAGEMENT one, and
/// reading its envelope and then its payload went over the payload twice
/// (a tenth of the daemon's CPU was this function): such a notification is
/// read in one pass, and anything else, or anything that pass refuses, is
/// read by [`receive_in_two_passes`], which also words every refusal.
///
/// Before either, [`scan::asset_management`] reads the shape nearly every
/// notification has without serde; it takes only what serde would read
/// the same way and leaves the rest to it.
pub fn receive_notification(body: &[u8]) -> Result<Received<'_>, NotificationError> {
    if let Ok(text) = std::str::from_utf8(body)
        && let Some(n) = scan::asset_management(text)
    {
        return Ok(Received::Scanned(n));
    }
    read_with_serde(body)
}

/// [`receive_notification`] without the scanner: what the scanner is
/// held to by its tests, and timed against in `benches/read.rs`.
pub fn read_with_serde(body: &[u8]) -> Result<Received<'_>, NotificationError> {
    if let Ok(envelope) = crate::domain::json::from_bytes::<AssetEnvelope<'_>>(body)
        && *envelope.notification_type == *notification_type::ASSET_MANAGEMENT
        && !envelope.notification_id.trim().is_empty()
    {
        let out = Encoder::new(
            &envelope.notification_type,
            &envelope.notification_id,
            &envelope.uid,
            body.len() / 4,
        );
        let stored = asset_management(out, &envelope.notification);
        return Ok(Received::Read {
            id: envelope.notification_id.0,
            kind: envelope.notification_type.0,
            uid: envelope.uid.0,
            stored,
        });
    }
    receive_in_two_passes(body)
}

fn asset_management(out: Encoder, n: &AssetManagementIn<'_>) -> Vec<u8> {
    let error = (*n.result != *types::result::SUCCESS).then(|| {
        n.error
            .as_ref()
            .map(|e| (e.error_number, e.error_message.as_str()))
            .unwrap_or((0, scan::FAILURE_WITHOUT_ERROR))
    });
    out.assets(
        &n.event_id,
        *n.kind != *types::event_type::ASSOCIATE,
        error,
        n.assignments.iter().filter_map(AssignmentIn::as_ref),
    )
}

/// [`receive_notification`] for every type: the envelope with its payload
/// as raw text, then the payload as its type says.
fn receive_in_two_passes(body: &[u8]) -> Result<Received<'_>, NotificationError> {
    let envelope: RawEnvelope<'_> = crate::domain::json::from_bytes(body)
        .map_err(|e| NotificationError::Envelope(e.to_string()))?;
    if envelope.notification_id.trim().is_empty() || envelope.notification_type.trim().is_empty() {
        return Err(NotificationError::Envelope(
            "notificationId and notificationType must not be empty".into(),
        ));
    }
    let payload = envelope.notification.map(|r| r.get()).unwrap_or("null");
    let kind: &str = &envelope.notification_type;
    let uid = envelope.uid.0;
    let bad = |e: serde_json::Error| NotificationError::Payload {
        kind: kind.to_string(),
        message: e.to_string(),
    };
    let out = Encoder::new(kind, &envelope.notification_id, &uid, body.len() / 4);
    let stored = match kind {
        notification_type::ASSET_MANAGEMENT => {
            let n: AssetManagementIn<'_> = serde_json::from_str(payload).map_err(bad)?;
            asset_management(out, &n)
        }
        notification_type::ASSET_COUNT => {
            let n: AssetCountNotification = serde_json::from_str(payload).map_err(bad)?;
            out.license_count(&n.adam_id, &n.pricing_param, n.count_delta as i64)
        }
        notification_type::USER_MANAGEMENT => {
            let n: UserManagementNotification = serde_json::from_str(payload).map_err(bad)?;
            let users: Vec<UserRecord> = n.users.into_iter().map(UserRecord::from).collect();
            out.users(users.iter())
        }
        notification_type::USER_ASSOCIATED => {
            let n: UserAssociatedNotification = serde_json::from_str(payload).map_err(bad)?;
            let users: Vec<UserRecord> = n
                .associated_users
                .into_iter()
                .map(UserRecord::from)
                .collect();
            out.users(users.iter())
        }
        _ => out.other(),
    };
    Ok(Received::Read {
        id: envelope.notification_id.0,
        kind: envelope.notification_type.0,
        uid,
        stored,
    })
}

/// Reads a notification (see [`receive_notification`]) in vppd's terms,
/// owned: what the applier reads back from the stored form.
pub fn read_notification(body: &[u8]) -> Result<Notification, NotificationError> {
    let received = receive_notification(body)?;
    Ok(inbox::decode(&received.stored())?.to_owned())
}

/// The binary form of a recorded inbox item: the item itself, or for a JSON
/// envelope recorded by an older vppd (see [`inbox::is_binary`]), the form
/// the listener now stores for it, read and checked as it was then.
pub fn stored_form(item: &[u8]) -> Result<Cow<'_, [u8]>, NotificationError> {
    if inbox::is_binary(item) {
        return Ok(Cow::Borrowed(item));
    }
    Ok(Cow::Owned(
        receive_notification(item)?.stored().into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::report::NotificationBody;

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
    fn a_borrowed_page_of_assignments_reads_as_the_owned_one() {
        let page = br#"{"assignments":[
                {"adamId":"1","pricingParam":"STDQ","serialNumber":"S\"1","userStatus":"x"},
                {"adamId":"2","clientUserId":"U\u0031","idHash":"h"},
                {"adamId":"3","pricingParam":"PLUS"}],
            "currentPageIndex":0,"nextPageIndex":1,"size":3,"totalPages":2,
            "versionId":"v\u0031","tokenExpirationDate":"2030-01-01T00:00:00+0000"}"#;
        let owned: types::GetAssignmentsResponse = serde_json::from_slice(page).unwrap();
        let borrowed: AssignmentsPageIn<'_> = serde_json::from_slice(page).unwrap();
        assert_eq!(&*borrowed.version_id, owned.page.version_id);
        assert_eq!(&*borrowed.version_id, "v1");
        assert_eq!(borrowed.next_page_index, owned.page.next_page_index);
        assert_eq!(
            borrowed
                .assignments
                .iter()
                .map(AssignmentIn::to_wire)
                .collect::<Vec<_>>(),
            owned.assignments
        );
        assert_eq!(
            borrowed
                .assignments
                .iter()
                .map(AssignmentIn::pair_key)
                .collect::<Vec<_>>(),
            owned
                .assignments
                .iter()
                .map(|a| crate::domain::lifecycle::pair_key(
                    &a.adam_id,
                    &a.pricing_param,
                    a.serial_number.as_deref(),
                    a.client_user_id.as_deref()
                ))
                .collect::<Vec<_>>()
        );
        let targets: Vec<_> = borrowed
            .assignments
            .iter()
            .map(|a| a.as_ref().map(|a| (a.pricing_param, a.target)))
            .collect();
        assert_eq!(
            targets,
            vec![
                Some(("STDQ", Target::Serial("S\"1"))),
                Some(("STDQ", Target::User("U1"))),
                None
            ]
        );
        // What the owned type requires, the borrowed one does too.
        for field in ["versionId", "currentPageIndex", "size", "totalPages"] {
            let without = String::from_utf8_lossy(page).replace(field, "other");
            assert!(serde_json::from_str::<types::GetAssignmentsResponse>(&without).is_err());
            assert!(
                serde_json::from_str::<AssignmentsPageIn<'_>>(&without).is_err(),
                "{field}"
            );
        }
        let number = String::from_utf8_lossy(page).replace(r#""U\u0031""#, "7");
        assert!(serde_json::from_str::<AssignmentsPageIn<'_>>(&number).is_err());
    }

    #[test]
    fn every_type_is_stored_as_read_escapes_included() {
        let assets = read_notification(
            br#"{"notificationId":"n\u0031","notificationType":"ASSET_MANAGEMENT","uId":"7",
                "notification":{"eventId":"e","type":"REVOKE","result":"SUCCESS",
                "assignments":[{"adamId":"1","serialNumber":"S\"1"},
                               {"adamId":"2","pricingParam":"PLUS","clientUserId":"U","idHash":null}]}}"#,
        )
        .unwrap();
        assert_eq!(assets.id, "n1");
        assert_eq!(
            assets.body,
            NotificationBody::Assets {
                event_id: "e".into(),
                error: None,
                removal: true,
                assignments: vec![
                    Assignment {
                        adam_id: "1".into(),
                        pricing_param: "STDQ".into(),
                        assignee: Assignee::Serial("S\"1".into()),
                    },
                    Assignment {
                        adam_id: "2".into(),
                        pricing_param: "PLUS".into(),
                        assignee: Assignee::User("U".into()),
                    },
                ],
            }
        );
        let failed = read_notification(
            br#"{"notificationId":"n","notificationType":"ASSET_MANAGEMENT",
                "notification":{"eventId":"e","type":"ASSOCIATE","result":"FAILURE","assignments":[]}}"#,
        )
        .unwrap();
        assert!(matches!(
            failed.body,
            NotificationBody::Assets {
                error: Some(ReportedError { number: 0, .. }),
                removal: false,
                ..
            }
        ));
        let count = read_notification(
            br#"{"notificationId":"n","notificationType":"ASSET_COUNT","uId":"7",
                "notification":{"adamId":"408709785","countDelta":-50}}"#,
        )
        .unwrap();
        assert_eq!(
            count.body,
            NotificationBody::LicenseCount {
                adam_id: "408709785".into(),
                pricing_param: "STDQ".into(),
                delta: -50
            }
        );
        let users = read_notification(
            br#"{"notificationId":"n","notificationType":"USER_ASSOCIATED","uId":"7",
                "notification":{"associatedUsers":[{"clientUserId":"c-1","email":"a@b",
                "inviteCode":"x","status":"Associated"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            users.body,
            NotificationBody::Users(vec![UserRecord {
                client_user_id: "c-1".into(),
                email: Some("a@b".into()),
                invite_code: Some("x".into()),
                id_hash: None,
                status: Some("Associated".into()),
            }])
        );
        // A stored JSON envelope (an older vppd's) converts to the same form.
        let json =
            br#"{"notificationId":"n","notificationType":"TEST_NOTIFICATION","notification":{}}"#;
        assert_eq!(
            stored_form(json).unwrap().as_ref(),
            receive_notification(json).unwrap().stored().as_ref()
        );
        assert!(matches!(stored_form(json).unwrap(), Cow::Owned(_)));
        let stored = receive_notification(json).unwrap().stored().into_owned();
        assert!(matches!(stored_form(&stored).unwrap(), Cow::Borrowed(_)));
        // Fields are checked as before: a null uId or a number for a
        // serial number is refused.
        assert!(
            read_notification(br#"{"notificationId":"n","notificationType":"X","uId":null}"#)
                .is_err()
        );
        assert!(read_notification(
            br#"{"notificationId":"n","notificationType":"ASSET_MANAGEMENT","notification":{"eventId":"e","type":"ASSOCIATE","result":"SUCCESS","assignments":[{"adamId":"1","serialNumber":5}]}}"#
        )
        .is_err());
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

    mod one_pass {
        use super::*;
        use proptest::prelude::*;

        /// A JSON member: its key and its value, each as JSON text.
        type Member = (String, String);

        fn text() -> impl Strategy<Value = String> {
            // Quotes, backslashes and non-ASCII make serde copy the string.
            r#"[A-Za-z0-9"\\é-]{0,6}"#
        }

        fn json(s: &str) -> String {
            serde_json::to_string(s).unwrap()
        }

        /// Members present or not, in any order; `extra` adds one vppd
        /// does not read.
        fn object(members: Vec<Option<Member>>, extra: bool, order: &[usize]) -> String {
            let mut present: Vec<Member> = members.into_iter().flatten().collect();
            if extra {
                present.push(("\"later\"".into(), "[1,{\"a\":null}]".into()));
            }
            let mut ordered = Vec::new();
            for &i in order {
                if i < present.len() && !ordered.contains(&i) {
                    ordered.push(i);
                }
            }
            let rest: Vec<usize> = (0..present.len())
                .filter(|i| !ordered.contains(i))
                .collect();
            ordered.extend(rest);
            let parts: Vec<String> = ordered
                .iter()
                .map(|&i| format!("{}:{}", present[i].0, present[i].1))
                .collect();
            format!("{{{}}}", parts.join(","))
        }

        fn member(key: &str, value: String) -> Member {
            (json(key), value)
        }

        fn assignment() -> impl Strategy<Value = String> {
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                any::<bool>(),
                proptest::collection::vec(0usize..6, 0..6),
            )
                .prop_map(|(adam, pricing, serial, user, extra, order)| {
                    object(
                        vec![
                            adam.map(|v| member("adamId", json(&v))),
                            pricing.map(|v| member("pricingParam", json(&v))),
                            serial.map(|v| member("serialNumber", json(&v))),
                            user.map(|v| member("clientUserId", json(&v))),
                        ],
                        extra,
                        &order,
                    )
                })
        }

        fn payload() -> impl Strategy<Value = String> {
            let kind = prop_oneof![
                Just("ASSOCIATE".to_string()),
                Just("DISASSOCIATE".to_string()),
                Just("REVOKE".to_string()),
                text(),
            ];
            let result = prop_oneof![
                Just("SUCCESS".to_string()),
                Just("FAILURE".to_string()),
                text(),
            ];
            let error = prop_oneof![
                Just("null".to_string()),
                Just(r#"{"errorNumber":9709,"errorMessage":"short"}"#.to_string()),
                Just(r#"{"errorMessage":"no number"}"#.to_string()),
            ];
            (
                proptest::option::of(text()),
                proptest::option::of(kind),
                proptest::option::of(result),
                proptest::option::of(error),
                proptest::option::of(proptest::collection::vec(assignment(), 0..4)),
                any::<bool>(),
                proptest::collection::vec(0usize..7, 0..7),
            )
                .prop_map(|(event, kind, result, error, list, extra, order)| {
                    object(
                        vec![
                            event.map(|v| member("eventId", json(&v))),
                            kind.map(|v| member("type", json(&v))),
                            result.map(|v| member("result", json(&v))),
                            error.map(|v| member("error", v)),
                            list.map(|l| member("assignments", format!("[{}]", l.join(",")))),
                        ],
                        extra,
                        &order,
                    )
                })
        }

        fn envelope() -> impl Strategy<Value = String> {
            let kind = prop_oneof![
                4 => Just("ASSET_MANAGEMENT".to_string()),
                1 => Just("ASSET_COUNT".to_string()),
                1 => Just("SOMETHING_NEW".to_string()),
                1 => Just("".to_string()),
            ];
            let notification = prop_oneof![
                6 => payload(),
                1 => Just("null".to_string()),
                1 => Just(r#"{"adamId":"1","countDelta":2}"#.to_string()),
                1 => Just("[]".to_string()),
            ];
            (
                proptest::option::of(prop_oneof![text(), Just(" ".to_string())]),
                proptest::option::of(kind),
                proptest::option::of(notification),
                proptest::option::of(text()),
                any::<bool>(),
                proptest::collection::vec(0usize..5, 0..5),
            )
                .prop_map(|(id, kind, notification, uid, extra, order)| {
                    object(
                        vec![
                            id.map(|v| member("notificationId", json(&v))),
                            kind.map(|v| member("notificationType", json(&v))),
                            notification.map(|v| member("notification", v)),
                            uid.map(|v| member("uId", json(&v))),
                        ],
                        extra,
                        &order,
                    )
                })
        }

        fn outcome(
            r: Result<Received<'_>, NotificationError>,
        ) -> Result<(String, String, String, Vec<u8>), NotificationError> {
            r.map(|r| {
                (
                    r.id().to_string(),
                    r.kind().to_string(),
                    r.uid().to_string(),
                    r.stored().into_owned(),
                )
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever the body, the one-pass read accepts, refuses and
            /// stores exactly what the two-pass read does.
            #[test]
            fn one_pass_reads_as_two_passes(body in envelope()) {
                prop_assert_eq!(
                    outcome(receive_notification(body.as_bytes())),
                    outcome(receive_in_two_passes(body.as_bytes())),
                    "{}", body
                );
            }
        }

        #[test]
        fn the_generator_reaches_the_one_pass_read() {
            // A body of the common shape, for which the test above would
            // compare nothing if every generated body fell back.
            let body = br#"{"notification":{"assignments":[{"adamId":"1","pricingParam":"STDQ","serialNumber":"S\"1"}],
                "eventId":"e","result":"SUCCESS","type":"ASSOCIATE"},
                "notificationId":"n","notificationType":"ASSET_MANAGEMENT","uId":"7"}"#;
            assert!(serde_json::from_slice::<AssetEnvelope<'_>>(body).is_ok());
            assert_eq!(
                outcome(receive_notification(body)),
                outcome(receive_in_two_passes(body))
            );
        }
    }
}
