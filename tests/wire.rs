//! The wire types against every JSON example of the API reference: each
//! parses, and serializes back to the same JSON (no field lost, none
//! invented). Notification payloads are checked in their typed form too.

use serde::Serialize;
use serde::de::DeserializeOwned;
use vppd::apple::types::*;

fn round_trip<T: DeserializeOwned + Serialize>(json: &str) -> T {
    let original: serde_json::Value = serde_json::from_str(json).unwrap();
    let parsed: T = serde_json::from_str(json).unwrap();
    let back = serde_json::to_value(&parsed).unwrap();
    assert_eq!(back, original, "round trip changed the JSON");
    parsed
}

fn envelope<T: DeserializeOwned + Serialize>(json: &str) -> (NotificationEnvelope, T) {
    let env: NotificationEnvelope = round_trip(json);
    let payload: T = serde_json::from_value(env.notification.clone()).unwrap();
    assert_eq!(serde_json::to_value(&payload).unwrap(), env.notification);
    (env, payload)
}

#[test]
fn example_01_serviceconfigresponse() {
    let _: ServiceConfigResponse = round_trip(EXAMPLE_SERVICE_CONFIG);
}

#[test]
fn example_02_clientconfigresponse() {
    let _: ClientConfigResponse = round_trip(
        r##"{
  "countryISO2ACode": "US",
  "defaultPlatform": "volumestore",
  "locationName": "Lincoln High School",
  "mdmInfo": {"id": "522d5c43-44ca-4f7e-ba7a-53570cf60765", "name": "vppd", "metadata": "0.3.1"},
  "notificationAuthToken": "q7Jd2mW9rX4pL0sVb8Nc",
  "notificationUrl": "https://mdm.example.com/vppd/notifications",
  "subscribedNotificationTypes": ["ASSET_MANAGEMENT", "ASSET_COUNT", "USER_MANAGEMENT", "USER_ASSOCIATED"],
  "tokenExpirationDate": "2030-11-08T22:33:22+0000",
  "uId": "2049025000431439",
  "websiteURL": "https://school.apple.com"
}"##,
    );
}

#[test]
fn example_03_clientconfigrequest() {
    let _: ClientConfigRequest = round_trip(
        r##"{
  "mdmInfo": {"id": "522d5c43-44ca-4f7e-ba7a-53570cf60765", "name": "vppd", "metadata": "0.3.1"},
  "notificationUrl": "https://mdm.example.com/vppd/notifications",
  "notificationAuthToken": "q7Jd2mW9rX4pL0sVb8Nc",
  "notificationTypes": ["ASSET_MANAGEMENT", "ASSET_COUNT", "USER_MANAGEMENT", "USER_ASSOCIATED"]
}"##,
    );
}

#[test]
fn example_04_getassetsresponse() {
    let _: GetAssetsResponse = round_trip(
        r##"{
  "assets": [
    {
      "adamId": "361309726", "pricingParam": "STDQ", "productType": "App",
      "assignedCount": 5000, "availableCount": 10000, "totalCount": 15000, "retiredCount": 0,
      "deviceAssignable": true, "revocable": true, "supportedPlatforms": ["iOS", "macOS"]
    },
    {
      "adamId": "408709785", "pricingParam": "STDQ", "productType": "App",
      "assignedCount": 0, "availableCount": 2147483647, "totalCount": 2147483647, "retiredCount": 0,
      "deviceAssignable": true, "revocable": true, "supportedPlatforms": ["iOS"]
    }
  ],
  "currentPageIndex": 0,
  "size": 2,
  "totalPages": 1,
  "tokenExpirationDate": "2030-11-08T22:33:22+0000",
  "uId": "2049025000431439",
  "versionId": "70e8c740-514c-11eb-bb63-a90b882fcd52"
}"##,
    );
}

#[test]
fn example_05_getassignmentsresponse() {
    let _: GetAssignmentsResponse = round_trip(
        r##"{
  "assignments": [
    {"adamId": "361309726", "pricingParam": "STDQ", "serialNumber": "C02Y402HLCM6"},
    {"adamId": "361309726", "pricingParam": "STDQ", "clientUserId": "client-100"}
  ],
  "currentPageIndex": 0,
  "size": 2,
  "totalPages": 1,
  "tokenExpirationDate": "2030-11-08T22:33:22+0000",
  "uId": "2049025000431439",
  "versionId": "009061cb-87d1-4ea8-ae4c-7849dc49224e"
}"##,
    );
}

#[test]
fn example_06_manageassetsrequest() {
    let _: ManageAssetsRequest = round_trip(
        r##"{
  "assets": [
    {"adamId": "361309726", "pricingParam": "STDQ"},
    {"adamId": "408709785", "pricingParam": "STDQ"}
  ],
  "clientUserIds": ["client-1", "client-2"],
  "serialNumbers": ["C02Y402HLCM6", "DMPXK1ABJF8J"]
}"##,
    );
}

#[test]
fn example_07_eventresponse() {
    let _: EventResponse = round_trip(
        r##"{
  "eventId": "92467a8e-8a50-4df9-9b30-f7ff4a99dea7",
  "tokenExpirationDate": "2030-11-08T22:33:22+0000",
  "uId": "2049025000431439"
}"##,
    );
}

#[test]
fn example_08_manageassetsrequest() {
    let _: ManageAssetsRequest = round_trip(
        r##"{
  "assets": [{"adamId": "361309726", "pricingParam": "STDQ"}],
  "serialNumbers": ["OLD-SERIAL-1", "OLD-SERIAL-2"]
}"##,
    );
}

#[test]
fn example_09_eventresponse() {
    let _: EventResponse = round_trip(
        r##"{"eventId": "9f418433-09c5-41e8-abc6-9016ac104d5b", "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439"}"##,
    );
}

#[test]
fn example_10_revokeassetsrequest() {
    let _: RevokeAssetsRequest =
        round_trip(r##"{"clientUserIds": ["client-100"], "serialNumbers": ["C02Y402HLCM6"]}"##);
}

#[test]
fn example_11_eventresponse() {
    let _: EventResponse = round_trip(
        r##"{"eventId": "5c2113e7-bf12-458a-9a6d-55bd75904392", "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439"}"##,
    );
}

#[test]
fn example_12_statusresponse() {
    let _: StatusResponse = round_trip(
        r##"{"eventStatus": "PENDING", "eventType": "ASSOCIATE", "numCompleted": 8, "numRequested": 16,
 "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439"}"##,
    );
}

#[test]
fn example_13_statusresponse() {
    let _: StatusResponse = round_trip(
        r##"{
  "eventStatus": "FAILED",
  "eventType": "ASSOCIATE",
  "failures": [
    {
      "errorNumber": 9609,
      "errorMessage": "Registered user not found",
      "errorInfo": {"clientUserIds": ["client-4"]}
    }
  ],
  "numCompleted": 14,
  "numRequested": 16,
  "tokenExpirationDate": "2030-11-08T22:33:22+0000",
  "uId": "2049025000431439"
}"##,
    );
}

#[test]
fn example_14_getusersresponse() {
    let _: GetUsersResponse = round_trip(
        r##"{
  "currentPageIndex": 0,
  "size": 2,
  "totalPages": 1,
  "tokenExpirationDate": "2030-11-08T22:33:22+0000",
  "uId": "2049025000431439",
  "users": [
    {"clientUserId": "client-101", "email": "client-101@example.com",
     "inviteCode": "46bc93ea3acd41e0a4919c02db0d7d3a", "status": "Registered"},
    {"clientUserId": "client-102", "email": "client-102@example.com",
     "idHash": "rRVS8rlBrJjRqYwL8aNGDJG2CbU=", "status": "Associated"}
  ],
  "versionId": "021f10a0-7035-11eb-9f67-bd1df52e1e13"
}"##,
    );
}

#[test]
fn example_15_manageusersrequest() {
    let _: ManageUsersRequest = round_trip(
        r##"{
  "users": [
    {"clientUserId": "client-100", "email": "ana@example.com", "managedAppleId": "ana@appleschool.example.com"},
    {"clientUserId": "client-101", "email": "ben@example.com"}
  ]
}"##,
    );
}

#[test]
fn example_16_eventresponse() {
    let _: EventResponse = round_trip(
        r##"{"eventId": "af70eb9b-0ab6-405d-87d8-3b9ed0c4f370", "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439"}"##,
    );
}

#[test]
fn example_17_manageusersrequest() {
    let _: ManageUsersRequest = round_trip(
        r##"{"users": [{"clientUserId": "client-101", "email": "ben.new@example.com", "managedAppleId": "ben@appleschool.example.com"}]}"##,
    );
}

#[test]
fn example_18_eventresponse() {
    let _: EventResponse = round_trip(
        r##"{"eventId": "dcd54e0c-5898-4837-8cea-b220f9570835", "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439"}"##,
    );
}

#[test]
fn example_19_manageusersrequest() {
    let _: ManageUsersRequest = round_trip(
        r##"{"users": [{"clientUserId": "client-100"}, {"clientUserId": "client-101"}]}"##,
    );
}

#[test]
fn example_20_eventresponse() {
    let _: EventResponse = round_trip(
        r##"{"eventId": "dafdad60-4ef6-49b0-8150-64323f56d88d", "tokenExpirationDate": "2030-11-08T22:33:22+0000", "uId": "2049025000431439"}"##,
    );
}

#[test]
fn example_21_getassignmentsresponse() {
    let _: GetAssignmentsResponse = round_trip(
        r##"{
  "assignments": [{"adamId": "377298193", "pricingParam": "STDQ", "serialNumber": "DMPXK1ABJF8J"}],
  "currentPageIndex": 0,
  "size": 1,
  "totalPages": 1,
  "uId": "2049025000431439",
  "versionId": "87051b80-85f6-11eb-a3ab-95f98468c5f3"
}"##,
    );
}

#[test]
fn example_22_test_notification() {
    let env: NotificationEnvelope = round_trip(
        r##"{
  "notification": {},
  "notificationId": "792e327f-63ea-4658-9aec-f16f4327e3a8",
  "notificationType": "TEST_NOTIFICATION",
  "uId": "2049025000431439"
}"##,
    );
    assert_eq!(env.notification_type, notification_type::TEST_NOTIFICATION);
    assert!(!env.uid.is_empty());
}

#[test]
fn example_23_assetmanagementnotification() {
    let (env, _payload): (NotificationEnvelope, AssetManagementNotification) = envelope(
        r##"{
  "notification": {
    "assignments": [
      {"adamId": "408709785", "pricingParam": "STDQ", "serialNumber": "C02Y402HLCM6"},
      {"adamId": "408709785", "pricingParam": "STDQ", "serialNumber": "C02Y402HLCM7"}
    ],
    "eventId": "87cbc650-16cc-4f9e-a833-e622f377a9f7",
    "result": "SUCCESS",
    "type": "ASSOCIATE"
  },
  "notificationId": "ba8bbb23-44c2-44f6-a928-eff6ba5ffac3",
  "notificationType": "ASSET_MANAGEMENT",
  "uId": "2049025000431439"
}"##,
    );
    assert!(!env.notification_id.is_empty());
}

#[test]
fn example_24_assetmanagementnotification() {
    let (env, _payload): (NotificationEnvelope, AssetManagementNotification) = envelope(
        r##"{
  "notification": {
    "assignments": [
      {"adamId": "361309726", "pricingParam": "STDQ", "serialNumber": "DMPXK1ABJF8J"},
      {"adamId": "361309726", "pricingParam": "STDQ", "clientUserId": "client-2"}
    ],
    "error": {
      "errorNumber": 9709,
      "errorMessage": "There aren't enough assets available to complete this association."
    },
    "eventId": "f743928c-cc93-4a17-a53f-50c552ce1e06",
    "result": "FAILURE",
    "type": "ASSOCIATE"
  },
  "notificationId": "0b6c1c2e-1bc1-4285-aa0a-7256293c5ca7",
  "notificationType": "ASSET_MANAGEMENT",
  "uId": "2049025000431439"
}"##,
    );
    assert!(!env.notification_id.is_empty());
}

#[test]
fn example_25_assetmanagementnotification() {
    let (env, _payload): (NotificationEnvelope, AssetManagementNotification) = envelope(
        r##"{
  "notification": {
    "assignments": [{"adamId": "408709785", "clientUserId": "client-100", "pricingParam": "STDQ"}],
    "eventId": "4bd7371e-6482-4933-8e97-c29f25b7f5f5",
    "result": "SUCCESS",
    "type": "DISASSOCIATE"
  },
  "notificationId": "545e1f6f-ca8b-4e6c-98fe-a7ac3ef63b29",
  "notificationType": "ASSET_MANAGEMENT",
  "uId": "2049025000431439"
}"##,
    );
    assert!(!env.notification_id.is_empty());
}

#[test]
fn example_26_assetmanagementnotification() {
    let (env, _payload): (NotificationEnvelope, AssetManagementNotification) = envelope(
        r##"{
  "notification": {
    "assignments": [
      {"adamId": "408709785", "clientUserId": "client-100", "pricingParam": "STDQ"},
      {"adamId": "329103948", "clientUserId": "client-100", "pricingParam": "STDQ"}
    ],
    "eventId": "7f2a9c14-3b8d-4e6a-b1c5-9d0e2f4a6b8c",
    "result": "SUCCESS",
    "type": "REVOKE"
  },
  "notificationId": "6a2f1e8b-7d4c-4a9e-b3f0-1c5d8e2a4b60",
  "notificationType": "ASSET_MANAGEMENT",
  "uId": "2049025000431439"
}"##,
    );
    assert!(!env.notification_id.is_empty());
}

#[test]
fn example_27_assetcountnotification() {
    let (env, _payload): (NotificationEnvelope, AssetCountNotification) = envelope(
        r##"{
  "notification": {"adamId": "408709785", "countDelta": 50, "pricingParam": "STDQ"},
  "notificationId": "4a7801be-53f0-42e1-9505-81c0d1dc9da3",
  "notificationType": "ASSET_COUNT",
  "uId": "2049025000431439"
}"##,
    );
    assert!(!env.notification_id.is_empty());
}

#[test]
fn example_28_usermanagementnotification() {
    let (env, _payload): (NotificationEnvelope, UserManagementNotification) = envelope(
        r##"{
  "notification": {
    "eventId": "e0def1f8-9158-4343-9c52-8dd32da50b9b",
    "result": "SUCCESS",
    "type": "UPDATE",
    "users": [
      {"clientUserId": "client-100", "email": "client-100@example.com",
       "idHash": "leSKk3IaE2vk2KLmv2k3/200D3=", "status": "Associated"}
    ]
  },
  "notificationId": "4c0bbb9b-d5a6-4860-83ef-5cf362783c1e",
  "notificationType": "USER_MANAGEMENT",
  "uId": "2049025000431439"
}"##,
    );
    assert!(!env.notification_id.is_empty());
}

#[test]
fn example_29_userassociatednotification() {
    let (env, _payload): (NotificationEnvelope, UserAssociatedNotification) = envelope(
        r##"{
  "notification": {
    "associatedUsers": [
      {"clientUserId": "client-100", "email": "client-100@example.com",
       "idHash": "leSKk3IaE2vk2KLmv2k3/200D3=",
       "inviteCode": "f551b37da07146628e8dcbe0111f0364", "status": "Associated"}
    ]
  },
  "notificationId": "90b83144-fb93-4837-9c52-0ae147bdc421",
  "notificationType": "USER_ASSOCIATED",
  "uId": "2049025000431439"
}"##,
    );
    assert!(!env.notification_id.is_empty());
}

#[test]
fn example_30_errorresponse() {
    let _: ErrorResponse = round_trip(
        r##"{"errorNumber": 9726, "errorMessage": "This request contains an unsupported HTTP method for the requested endpoint."}"##,
    );
}

#[test]
fn example_31_errorresponse() {
    let _: ErrorResponse = round_trip(
        r##"{"errorNumber": 9707, "errorMessage": "Asset in request is not device assignable, please send device assignable assets.",
 "errorInfo": {"assets": [{"adamId": "1445987233", "pricingParam": "STDQ"}]}}"##,
    );
}

#[test]
fn example_32_service_config_error_codes_match_the_list_we_serve() {
    let codes: Vec<ResponseErrorCode> = round_trip(
        r##"[
  {"errorNumber": 9601, "errorMessage": "Login required."},
  {"errorNumber": 9602, "errorMessage": "Invalid argument."},
  {"errorNumber": 9603, "errorMessage": "Internal error."},
  {"errorNumber": 9609, "errorMessage": "Unable to find the registered user."},
  {"errorNumber": 9621, "errorMessage": "The token has expired. You need to generate a new token online using your organization's account at either school.apple.com or business.apple.com."},
  {"errorNumber": 9625, "errorMessage": "The server has revoked the sToken."},
  {"errorNumber": 9634, "errorMessage": "Service removed."},
  {"errorNumber": 9646, "errorMessage": "There are too many recent requests. Try again momentarily."},
  {"errorNumber": 9650, "errorMessage": "The provided page index must be greater than 0, and less than the total number of pages."},
  {"errorNumber": 9700, "errorMessage": "Max assets limit on request has been passed, please stay within given limit."},
  {"errorNumber": 9701, "errorMessage": "Max clientUserIds limit on request has been passed, please stay within given limit."},
  {"errorNumber": 9702, "errorMessage": "Max serialNumbers limit on request has been passed, please stay within given limit."},
  {"errorNumber": 9703, "errorMessage": "Duplicate assets found in request, please send unique assets."},
  {"errorNumber": 9704, "errorMessage": "Duplicate clientUserIds found in request, please send unique clients."},
  {"errorNumber": 9705, "errorMessage": "Duplicate serialNumbers found in request, please send unique serials."},
  {"errorNumber": 9706, "errorMessage": "Asset in request is not revocable, please send revocable assets."},
  {"errorNumber": 9707, "errorMessage": "Asset in request is not device assignable, please send device assignable assets."},
  {"errorNumber": 9708, "errorMessage": "EventId could not be found."},
  {"errorNumber": 9709, "errorMessage": "There are not enough licenses for this app or book available to assign to the selected group."},
  {"errorNumber": 9710, "errorMessage": "Both the notification URL and the authentication token are necessary."},
  {"errorNumber": 9711, "errorMessage": "Either the notification URL or the authentication token exceeds its maximum length. Change the request to stay within the specified limit."},
  {"errorNumber": 9712, "errorMessage": "The provided notification URL must be a valid URL and use HTTPS as the protocol."},
  {"errorNumber": 9713, "errorMessage": "The MDM metadata exceeds the maximum length. Change the request to stay within the specified limit."},
  {"errorNumber": 9714, "errorMessage": "The number of users exceeds the maximum. Change the request to stay within the specified limit."},
  {"errorNumber": 9715, "errorMessage": "This request contains duplicate users. Change the request to send unique users."},
  {"errorNumber": 9716, "errorMessage": "A registered user already exists with the specified clientUserId."},
  {"errorNumber": 9717, "errorMessage": "This request contains an invalid email address. Change the request to send valid email addresses."},
  {"errorNumber": 9718, "errorMessage": "This request doesn't contain an asset, which is a required argument. Change the request to provide an asset."},
  {"errorNumber": 9719, "errorMessage": "Either clientUserIds or serialNumbers are required arguments. Change the request to provide assignable users and devices."},
  {"errorNumber": 9720, "errorMessage": "Users are a required argument. Change the request to provide a user."},
  {"errorNumber": 9721, "errorMessage": "This request contains an invalid version ID. Change the request to send the version ID from the read APIs."},
  {"errorNumber": 9722, "errorMessage": "This request contains an invalid authorization header. Change the request to send an authorization header that matches the format 'Bearer {sToken}'."},
  {"errorNumber": 9723, "errorMessage": "You must provide an MDM name, ID, and metadata when setting the MDM information."},
  {"errorNumber": 9724, "errorMessage": "The MDM ID exceeds the maximum length. Change the request to stay within the specified limit."},
  {"errorNumber": 9725, "errorMessage": "The MDM name exceeds the maximum length. Change the request to stay within the specified limit."},
  {"errorNumber": 9726, "errorMessage": "This request contains an unsupported HTTP method for the requested endpoint."},
  {"errorNumber": 9727, "errorMessage": "This request contains an unsupported Content-Type for the requested endpoint."},
  {"errorNumber": 9728, "errorMessage": "The provided notification URL is unreachable."}
]"##,
    );
    let ours: Vec<(i32, &str)> = SERVICE_ERROR_CODES.to_vec();
    let theirs: Vec<(i32, &str)> = codes
        .iter()
        .map(|c| (c.error_number, c.error_message.as_str()))
        .collect();
    assert_eq!(ours, theirs);
}

#[test]
fn limits_read_from_the_service_config_example() {
    let config: ServiceConfigResponse = serde_json::from_str(EXAMPLE_SERVICE_CONFIG).unwrap();
    let limits = Limits::from_map(&config.limits);
    assert_eq!(limits, Limits::default());
    // Keys can disappear: maxRequestPerSecond missing means no published ceiling.
    let mut map = config.limits.clone();
    map.remove("maxRequestPerSecond");
    map.remove("maxAssets");
    let limits = Limits::from_map(&map);
    assert_eq!(limits.max_request_per_second, None);
    assert_eq!(limits.max_assets, 25);
}

#[test]
fn unknown_fields_are_tolerated_and_missing_required_ones_named() {
    let status: StatusResponse = serde_json::from_str(
        r#"{"eventStatus": "COMPLETE", "eventType": "ASSOCIATE", "numCompleted": 1, "numRequested": 1, "uId": "1", "somethingNew": {"a": 1}}"#,
    )
    .unwrap();
    assert_eq!(status.event_status, "COMPLETE");
    let err = serde_json::from_str::<EventResponse>(r#"{"uId": "1"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("eventId"), "{err}");
    let err = serde_json::from_str::<AssetManagementNotification>(
        r#"{"eventId": "e", "type": "ASSOCIATE"}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("result"), "{err}");
}

#[test]
fn an_error_body_on_http_200_is_recognised() {
    let body: serde_json::Value =
        serde_json::from_str(r#"{"errorNumber": 9603, "errorMessage": "Internal error."}"#)
            .unwrap();
    assert!(is_error_body(&body, "eventId"));
    let ok: serde_json::Value = serde_json::from_str(r#"{"eventId": "e", "uId": "1"}"#).unwrap();
    assert!(!is_error_body(&ok, "eventId"));
}

const EXAMPLE_SERVICE_CONFIG: &str = r##"{
  "errorCodes": [
    {"errorMessage": "Login required.", "errorNumber": 9601},
    {"errorMessage": "Invalid argument.", "errorNumber": 9602}
  ],
  "limits": {
    "maxAssets": 25,
    "maxUsers": 100,
    "maxNotificationLength": 512,
    "maxRevokeClientUserIds": 100,
    "maxClientUserIds": 1000,
    "maxSerialNumbers": 1000,
    "maxRevokeSerialNumbers": 100,
    "maxRequestPerSecond": 15,
    "maxSubscriptions": 25,
    "maxSubscriptionClientUserIds": 1000,
    "maxMdmNameLength": 100,
    "maxMdmMetadataLength": 255,
    "maxMdmIdLength": 100
  },
  "notificationTypes": ["ASSET_MANAGEMENT", "USER_MANAGEMENT", "USER_ASSOCIATED", "ASSET_COUNT"],
  "urls": {
    "invitationEmail": "https://buy.itunes.apple.com/WebObjects/MZFinance.woa/wa/associateVPPUserWithITSAccount?inviteCode=%25inviteCode%25&mt=8",
    "clientConfig": "https://vpp.itunes.apple.com/mdm/v2/client/config",
    "createUsers": "https://vpp.itunes.apple.com/mdm/v2/users/create",
    "getAssignments": "https://vpp.itunes.apple.com/mdm/v2/assignments",
    "revokeAssets": "https://vpp.itunes.apple.com/mdm/v2/assets/revoke",
    "contentMetadataLookup": "https://uclient-api.itunes.apple.com/WebObjects/MZStorePlatform.woa/wa/lookup",
    "getUsers": "https://vpp.itunes.apple.com/mdm/v2/users",
    "eventStatus": "https://vpp.itunes.apple.com/mdm/v2/status",
    "associateAssets": "https://vpp.itunes.apple.com/mdm/v2/assets/associate",
    "disassociateAssets": "https://vpp.itunes.apple.com/mdm/v2/assets/disassociate",
    "updateUsers": "https://vpp.itunes.apple.com/mdm/v2/users/update",
    "getAssets": "https://vpp.itunes.apple.com/mdm/v2/assets",
    "retireUsers": "https://vpp.itunes.apple.com/mdm/v2/users/retire"
  }
}"##;
