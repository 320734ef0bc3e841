//! The Apple simulator over real HTTP on loopback, driven with plain reqwest
//! (not vppd's client), so that these tests pin the simulator's wire
//! behaviour against the reference (docs/apple-api-v2.md) on their own.

#[path = "common/signal.rs"]
mod signal;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signal::{Signal, signal};

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use vppd::apple::token::{SToken, fingerprint};
use vppd::apple::types::{Limits, SERVICE_ERROR_CODES};
use vppd::runtime::http::{self, Body};
use vppd::sim::{
    Faults, HoldSettings, NotificationFaults, SimAsset, SimConfig, SimToken, Simulator,
};

// ---------------------------------------------------------------- harness

fn token_text(days: i64) -> String {
    SToken::encode(
        &format!("sim-test-{}", uuid::Uuid::new_v4()),
        time::OffsetDateTime::now_utc() + time::Duration::days(days),
        "Test School",
    )
}

/// Fast retries and no rate limit unless a test wants them.
fn config() -> SimConfig {
    SimConfig {
        enforce_rate_limit: false,
        notifications: NotificationFaults {
            retry_spacing: vec![Duration::from_millis(20)],
            attempt_timeout: Duration::from_secs(2),
            ..NotificationFaults::default()
        },
        ..SimConfig::default()
    }
}

fn book(adam_id: &str, total: Option<u32>) -> SimAsset {
    SimAsset {
        adam_id: adam_id.to_string(),
        pricing_param: "STDQ".to_string(),
        product_type: "Book".to_string(),
        total,
        device_assignable: false,
        revocable: true,
    }
}

struct Sim {
    sim: Simulator,
    http: reqwest::Client,
    token: String,
    base: String,
}

struct Answer {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

impl Answer {
    fn error(&self) -> Option<i64> {
        self.body["errorNumber"].as_i64()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

async fn start(config: SimConfig, assets: Vec<SimAsset>) -> Sim {
    let sim = Simulator::start(config, "127.0.0.1:0").await.unwrap();
    let token = token_text(365);
    sim.add_token(SimToken {
        stoken: token.clone(),
        assets,
        read_only: false,
    })
    .unwrap();
    Sim {
        base: sim.base_url(),
        sim,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        token,
    }
}

impl Sim {
    async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "every answer is JSON: {status} {text}"
        );
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            body,
            headers,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.get_as(&self.token, path).await
    }

    async fn get_as(&self, token: &str, path: &str) -> Answer {
        self.send(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(token),
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.post_as(&self.token, path, body).await
    }

    async fn post_as(&self, token: &str, path: &str, body: Value) -> Answer {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .bearer_auth(token)
                .json(&body),
        )
        .await
    }

    /// Posts a management request that must be accepted; returns its eventId.
    async fn event(&self, path: &str, body: Value) -> String {
        let a = self.post(path, body).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["eventId"].as_str().unwrap().to_string()
    }

    async fn idle(&self) {
        assert!(
            self.sim.wait_idle(Duration::from_secs(20)).await,
            "simulator never went idle"
        );
    }

    async fn status(&self, event_id: &str) -> Value {
        let a = self.get(&format!("/status?eventId={event_id}")).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body
    }

    /// Runs an event to its end and returns its status.
    async fn run(&self, path: &str, body: Value) -> Value {
        let id = self.event(path, body).await;
        self.idle().await;
        self.status(&id).await
    }

    async fn create_users(&self, ids: &[&str]) {
        let users: Vec<Value> = ids.iter().map(|id| json!({"clientUserId": id})).collect();
        let s = self.run("/users/create", json!({ "users": users })).await;
        assert_eq!(s["eventStatus"], "COMPLETE", "{s}");
    }

    async fn subscribe(&self, receiver: &Receiver, types: &[&str]) -> Answer {
        self.post(
            "/client/config",
            json!({
                "notificationUrl": receiver.url,
                "notificationAuthToken": receiver.secret,
                "notificationTypes": types,
            }),
        )
        .await
    }

    fn pairs(&self) -> HashSet<(String, String)> {
        self.sim
            .assignments(&self.token)
            .into_iter()
            .map(|a| (a.adam_id, a.serial_number.or(a.client_user_id).unwrap()))
            .collect()
    }
}

fn pair(adam: &str, target: &str) -> (String, String) {
    (adam.to_string(), target.to_string())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn serials(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:05}")).collect()
}

// ------------------------------------------------------ notification receiver

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Received {
    auth: Option<String>,
    content_type: Option<String>,
    answered: u16,
    envelope: Value,
}

#[derive(Default)]
struct ReceiverState {
    got: Mutex<Vec<Received>>,
    /// Statuses to answer, in order; 200 once empty.
    script: Mutex<VecDeque<u16>>,
    /// Answer every request with this status when set.
    always: Mutex<Option<u16>>,
}

impl http::Handler for ReceiverState {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let auth = header("authorization");
        let content_type = header("content-type");
        let bytes = http::read_body(req.into_body(), 16 << 20).await.unwrap();
        let envelope: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let answered = match *self.always.lock().unwrap() {
            Some(status) => status,
            None => self.script.lock().unwrap().pop_front().unwrap_or(200),
        };
        self.got.lock().unwrap().push(Received {
            auth,
            content_type,
            answered,
            envelope,
        });
        http::json(StatusCode::from_u16(answered).unwrap(), &json!({}))
    }
}

struct Receiver {
    state: Arc<ReceiverState>,
    url: String,
    secret: String,
    _server: http::Server,
}

impl Receiver {
    async fn start() -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let server = http::Server::bind("127.0.0.1:0", state.clone())
            .await
            .unwrap();
        Receiver {
            url: format!("http://{}/notifications", server.local_addr()),
            secret: format!("secret-{}", uuid::Uuid::new_v4().simple()),
            state,
            _server: server,
        }
    }

    fn all(&self) -> Vec<Received> {
        self.state.got.lock().unwrap().clone()
    }

    /// Envelopes answered with 2xx, TEST_NOTIFICATIONs left out.
    fn delivered(&self) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|r| r.answered < 300 && r.envelope["notificationType"] != "TEST_NOTIFICATION")
            .map(|r| r.envelope)
            .collect()
    }

    fn of_type(&self, kind: &str) -> Vec<Value> {
        self.delivered()
            .into_iter()
            .filter(|e| e["notificationType"] == kind)
            .collect()
    }

    fn script(&self, statuses: &[u16]) {
        *self.state.script.lock().unwrap() = statuses.iter().copied().collect();
    }

    fn clear(&self) {
        self.state.got.lock().unwrap().clear();
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn service_config_publishes_limits_urls_notification_types_and_codes() {
    let s = start(config(), vec![]).await;
    // No token needed.
    let resp = s
        .send(s.http.get(format!("{}/service/config", s.base)))
        .await;
    assert_eq!(resp.status, 200);
    let c = resp.body;
    assert_eq!(c["limits"]["maxAssets"], 25);
    assert_eq!(c["limits"]["maxSerialNumbers"], 1000);
    assert_eq!(c["limits"]["maxRevokeSerialNumbers"], 100);
    assert_eq!(c["limits"]["maxRequestPerSecond"], 15);
    assert_eq!(c["limits"]["maxNotificationLength"], 512);
    let urls = c["urls"].as_object().unwrap();
    for key in [
        "clientConfig",
        "getAssets",
        "getAssignments",
        "associateAssets",
        "disassociateAssets",
        "revokeAssets",
        "eventStatus",
        "getUsers",
        "createUsers",
        "updateUsers",
        "retireUsers",
        "invitationEmail",
        "contentMetadataLookup",
    ] {
        let url = urls[key]
            .as_str()
            .unwrap_or_else(|| panic!("missing {key}"));
        assert!(url.starts_with(&s.base), "{key}: {url}");
    }
    assert_eq!(
        urls["associateAssets"],
        format!("{}/assets/associate", s.base)
    );
    assert_eq!(urls["eventStatus"], format!("{}/status", s.base));
    assert!(
        urls["invitationEmail"]
            .as_str()
            .unwrap()
            .contains("%25inviteCode%25")
    );
    let types = strings(&c["notificationTypes"]);
    for t in [
        "ASSET_MANAGEMENT",
        "USER_MANAGEMENT",
        "USER_ASSOCIATED",
        "ASSET_COUNT",
    ] {
        assert!(types.contains(&t.to_string()), "{t}");
    }
    let codes = c["errorCodes"].as_array().unwrap();
    assert_eq!(codes.len(), SERVICE_ERROR_CODES.len());
    assert_eq!(codes[0]["errorNumber"], 9601);
    assert_eq!(codes[0]["errorMessage"], "Login required.");

    // Limits change at run time; an unpublished rate limit disappears.
    s.sim.set_limits(Limits {
        max_assets: 3,
        max_request_per_second: None,
        ..Limits::default()
    });
    let c = s.get("/service/config").await.body;
    assert_eq!(c["limits"]["maxAssets"], 3);
    assert!(c["limits"].get("maxRequestPerSecond").is_none());
}

#[tokio::test]
async fn authentication_failures() {
    let s = start(config(), vec![SimAsset::app("1", Some(5))]).await;
    let assets = format!("{}/assets", s.base);

    let none = s.send(s.http.get(&assets)).await;
    assert_eq!((none.status, none.error()), (401, Some(9722)));
    let basic = s
        .send(s.http.get(&assets).header("authorization", "Basic abc"))
        .await;
    assert_eq!((basic.status, basic.error()), (401, Some(9722)));

    let unknown = s.get_as(&token_text(30), "/assets").await;
    assert_eq!((unknown.status, unknown.error()), (401, Some(9622)));

    let expired = token_text(-1);
    s.sim
        .add_token(SimToken {
            stoken: expired.clone(),
            assets: vec![],
            read_only: false,
        })
        .unwrap();
    for path in ["/assets", "/client/config", "/users"] {
        let a = s.get_as(&expired, path).await;
        assert_eq!((a.status, a.error()), (401, Some(9621)), "{path}");
    }

    // Read-only: reads work, management calls get 403 / 9637.
    let read_only = token_text(30);
    s.sim
        .add_token(SimToken {
            stoken: read_only.clone(),
            assets: vec![SimAsset::app("1", Some(5))],
            read_only: true,
        })
        .unwrap();
    assert_eq!(s.get_as(&read_only, "/assets").await.status, 200);
    assert_eq!(s.get_as(&read_only, "/assignments").await.status, 200);
    assert_eq!(s.get_as(&read_only, "/users").await.status, 200);
    let body = json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S1"]});
    let refused = s
        .post_as(&read_only, "/assets/associate", body.clone())
        .await;
    assert_eq!((refused.status, refused.error()), (403, Some(9637)));
    let refused = s
        .post_as(
            &read_only,
            "/users/create",
            json!({"users": [{"clientUserId": "u"}]}),
        )
        .await;
    assert_eq!((refused.status, refused.error()), (403, Some(9637)));

    // The revoked fault refuses every authenticated call, not service config.
    s.sim.set_faults(Faults {
        revoked: true,
        ..Faults::default()
    });
    let revoked = s.get("/assets").await;
    assert_eq!((revoked.status, revoked.error()), (401, Some(9625)));
    assert_eq!(s.get("/service/config").await.status, 200);
    s.sim.set_faults(Faults::default());
    assert_eq!(s.post("/assets/associate", body).await.status, 200);
}

#[tokio::test]
async fn common_fields_and_token_expiration_date() {
    let s = start(config(), vec![]).await;
    let a = s.get("/assets").await.body;
    let uid = a["uId"].as_str().unwrap().to_string();
    assert_eq!(uid.len(), 16);
    assert!(uid.bytes().all(|b| b.is_ascii_digit()));
    assert!(
        a.get("tokenExpirationDate").is_none(),
        "a year away: no warning"
    );
    assert!(a.get("mdmInfo").is_none());
    // Deterministic per token.
    assert_eq!(s.get("/users").await.body["uId"], uid.as_str());

    let soon = token_text(10);
    s.sim
        .add_token(SimToken {
            stoken: soon.clone(),
            assets: vec![],
            read_only: false,
        })
        .unwrap();
    let b = s.get_as(&soon, "/client/config").await.body;
    let date = b["tokenExpirationDate"].as_str().unwrap();
    assert!(date.ends_with("+0000"), "{date}");
    assert_ne!(b["uId"], uid.as_str());

    let always = start(
        SimConfig {
            always_token_expiration: true,
            ..config()
        },
        vec![],
    )
    .await;
    assert!(always.get("/assets").await.body["tokenExpirationDate"].is_string());
}

#[tokio::test]
async fn client_config_round_trip_and_subscriptions() {
    let s = start(config(), vec![]).await;
    let receiver = Receiver::start().await;
    let before = s.get("/client/config").await.body;
    assert_eq!(before["locationName"], "Test School");
    assert_eq!(before["countryISO2ACode"], "US");
    assert_eq!(before["subscribedNotificationTypes"], json!([]));
    assert!(before.get("mdmInfo").is_none());
    assert!(before.get("notificationUrl").is_none());

    let mdm = json!({"id": "522d5c43", "name": "vppd", "metadata": "0.1.0"});
    let a = s.post("/client/config", json!({ "mdmInfo": mdm })).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["mdmInfo"], mdm);
    // Echoed on later responses of every endpoint.
    assert_eq!(s.get("/assets").await.body["mdmInfo"], mdm);

    let a = s
        .subscribe(
            &receiver,
            &["ASSET_MANAGEMENT", "TEST_NOTIFICATION", "ASSET_COUNT"],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body["subscribedNotificationTypes"],
        json!(["ASSET_MANAGEMENT", "ASSET_COUNT"])
    );
    assert_eq!(a.body["notificationUrl"], receiver.url.as_str());
    assert_eq!(a.body["notificationAuthToken"], receiver.secret.as_str());
    assert_eq!(a.body["mdmInfo"], mdm, "omitted fields keep their values");

    // The TEST_NOTIFICATION went to the new URL with the new secret.
    let got = receiver.all();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].auth.as_deref(),
        Some(format!("Bearer {}", receiver.secret).as_str())
    );
    assert_eq!(got[0].envelope["notificationType"], "TEST_NOTIFICATION");
    assert_eq!(got[0].envelope["notification"], json!({}));
    assert_eq!(got[0].envelope["uId"], a.body["uId"]);

    // An empty list unsubscribes; URL and secret stay (and are tested again).
    let a = s
        .post("/client/config", json!({"notificationTypes": []}))
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["subscribedNotificationTypes"], json!([]));
    assert_eq!(a.body["notificationUrl"], receiver.url.as_str());
    assert_eq!(receiver.all().len(), 2);
    let stored = s.get("/client/config").await.body;
    assert_eq!(stored["subscribedNotificationTypes"], json!([]));
}

#[tokio::test]
async fn client_config_validation() {
    let s = start(
        SimConfig {
            limits: Limits {
                max_notification_length: 40,
                max_mdm_id_length: 4,
                max_mdm_name_length: 4,
                max_mdm_metadata_length: 4,
                ..Limits::default()
            },
            ..config()
        },
        vec![],
    )
    .await;
    let cases = [
        (json!({"notificationUrl": "https://x.example/n"}), 9710),
        (json!({"notificationAuthToken": "s"}), 9710),
        (
            json!({"notificationUrl": format!("https://x.example/{}", "a".repeat(40)), "notificationAuthToken": "s"}),
            9711,
        ),
        (
            json!({"notificationUrl": "https://x.example/n", "notificationAuthToken": "s".repeat(41)}),
            9711,
        ),
        (
            json!({"notificationUrl": "not a url", "notificationAuthToken": "s"}),
            9712,
        ),
        (
            json!({"notificationUrl": "ftp://127.0.0.1/n", "notificationAuthToken": "s"}),
            9712,
        ),
        // Plain HTTP only to loopback.
        (
            json!({"notificationUrl": "http://192.0.2.1/n", "notificationAuthToken": "s"}),
            9712,
        ),
        (json!({"mdmInfo": {"id": "a", "name": "b"}}), 9723),
        (
            json!({"mdmInfo": {"id": "", "name": "b", "metadata": "c"}}),
            9723,
        ),
        (
            json!({"mdmInfo": {"id": "12345", "name": "b", "metadata": "c"}}),
            9724,
        ),
        (
            json!({"mdmInfo": {"id": "a", "name": "12345", "metadata": "c"}}),
            9725,
        ),
        (
            json!({"mdmInfo": {"id": "a", "name": "b", "metadata": "12345"}}),
            9713,
        ),
        (
            json!({"notificationTypes": ["ASSET_MANAGEMENT", "GAME_OVER"]}),
            9602,
        ),
        (json!({"notificationTypes": "ASSET_MANAGEMENT"}), 9602),
    ];
    for (body, code) in cases {
        let a = s.post("/client/config", body.clone()).await;
        assert_eq!((a.status, a.error()), (400, Some(code)), "{body}");
    }
    let stored = s.get("/client/config").await.body;
    assert!(stored.get("mdmInfo").is_none());
    assert!(stored.get("notificationUrl").is_none());

    // strict_https refuses even loopback HTTP.
    let strict = start(
        SimConfig {
            strict_https: true,
            ..config()
        },
        vec![],
    )
    .await;
    let receiver = Receiver::start().await;
    let a = strict.subscribe(&receiver, &["ASSET_MANAGEMENT"]).await;
    assert_eq!(a.error(), Some(9712));
    assert!(receiver.all().is_empty());
}

#[tokio::test]
async fn a_failed_test_notification_is_9728_and_stores_nothing() {
    let s = start(config(), vec![]).await;
    let receiver = Receiver::start().await;
    *receiver.state.always.lock().unwrap() = Some(500);
    let a = s
        .post(
            "/client/config",
            json!({
                "notificationUrl": receiver.url,
                "notificationAuthToken": receiver.secret,
                "notificationTypes": ["ASSET_MANAGEMENT"],
                "mdmInfo": {"id": "a", "name": "b", "metadata": "c"},
            }),
        )
        .await;
    assert_eq!((a.status, a.error()), (400, Some(9728)));
    assert_eq!(receiver.all().len(), 1, "exactly one attempt");
    let stored = s.get("/client/config").await.body;
    assert!(stored.get("notificationUrl").is_none());
    assert!(
        stored.get("mdmInfo").is_none(),
        "nothing of the POST is stored"
    );
    assert_eq!(stored["subscribedNotificationTypes"], json!([]));

    // Nobody listening at all.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let a = s
        .post(
            "/client/config",
            json!({"notificationUrl": format!("http://127.0.0.1:{port}/n"), "notificationAuthToken": "s"}),
        )
        .await;
    assert_eq!(a.error(), Some(9728));
}

#[tokio::test]
async fn get_assets_counts_and_filters() {
    let plus = SimAsset {
        pricing_param: "PLUS".to_string(),
        ..SimAsset::app("300", Some(4))
    };
    let fixed = SimAsset {
        revocable: false,
        ..SimAsset::app("400", Some(2))
    };
    let s = start(
        config(),
        vec![
            SimAsset::app("100", Some(10)),
            SimAsset::app("200", None),
            plus,
            fixed,
            book("500", Some(3)),
        ],
    )
    .await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "100"}, {"adamId": "200"}], "serialNumbers": ["S1", "S2"]}),
    )
    .await;

    let all = s.get("/assets").await;
    assert_eq!(all.status, 200);
    let assets = all.body["assets"].as_array().unwrap().clone();
    assert_eq!(assets.len(), 5);
    assert!(all.body.get("unlimitedAssets").is_none());
    let by_id: HashMap<String, Value> = assets
        .into_iter()
        .map(|a| {
            (
                format!(
                    "{}:{}",
                    a["adamId"].as_str().unwrap(),
                    a["pricingParam"].as_str().unwrap()
                ),
                a,
            )
        })
        .collect();
    let a100 = &by_id["100:STDQ"];
    assert_eq!(
        (
            a100["assignedCount"].as_i64(),
            a100["availableCount"].as_i64(),
            a100["totalCount"].as_i64()
        ),
        (Some(2), Some(8), Some(10))
    );
    assert_eq!(a100["retiredCount"], 0);
    assert_eq!(a100["productType"], "App");
    assert_eq!(a100["supportedPlatforms"], json!(["iOS", "macOS"]));
    assert_eq!(a100["deviceAssignable"], true);
    let a200 = &by_id["200:STDQ"];
    assert_eq!(a200["totalCount"], 2147483647);
    assert_eq!(a200["availableCount"], 2147483647);
    assert_eq!(a200["assignedCount"], 2);
    assert_eq!(by_id["500:STDQ"]["productType"], "Book");
    assert_eq!(
        s.sim.asset_counts(&s.token, "100", "STDQ"),
        Some((2, Some(8)))
    );
    assert_eq!(s.sim.asset_counts(&s.token, "200", "STDQ"), Some((2, None)));

    let ids = |body: &Value, key: &str| -> Vec<String> {
        body[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x["adamId"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let split = s.get("/assets?unlimited=true").await.body;
    assert_eq!(ids(&split, "unlimitedAssets"), vec!["200"]);
    assert!(!ids(&split, "assets").contains(&"200".to_string()));
    assert!(split["unlimitedAssets"][0].get("totalCount").is_none());
    assert_eq!(split["unlimitedAssets"][0]["assignedCount"], 2);
    let limited = s.get("/assets?unlimited=false").await.body;
    assert_eq!(ids(&limited, "assets").len(), 4);
    assert!(limited.get("unlimitedAssets").is_none());

    let cases: [(&str, Vec<&str>); 10] = [
        ("adamId=300", vec!["300"]),
        ("productType=Book", vec!["500"]),
        ("pricingParam=PLUS", vec!["300"]),
        ("deviceAssignable=false", vec!["500"]),
        ("revocable=0", vec!["400"]),
        ("minAssignedCount=1", vec!["100", "200"]),
        ("maxAssignedCount=0", vec!["300", "400", "500"]),
        ("minAvailableCount=5", vec!["100", "200"]),
        ("maxAvailableCount=3", vec!["400", "500"]),
        (
            "productType=App&maxAvailableCount=3&unknownParam=1",
            vec!["400"],
        ),
    ];
    for (query, want) in cases {
        let a = s.get(&format!("/assets?{query}")).await;
        assert_eq!(a.status, 200, "{query}");
        assert_eq!(ids(&a.body, "assets"), want, "{query}");
    }
    for bad in [
        "productType=Game",
        "pricingParam=GOLD",
        "revocable=maybe",
        "minAssignedCount=x",
    ] {
        let a = s.get(&format!("/assets?{bad}")).await;
        assert_eq!((a.status, a.error()), (400, Some(9602)), "{bad}");
    }
}

#[tokio::test]
async fn pagination_walks_pages_and_refuses_out_of_range() {
    let s = start(
        SimConfig {
            page_size: 3,
            ..config()
        },
        vec![SimAsset::app("1", Some(100))],
    )
    .await;
    let targets = serials("P", 7);
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": targets}),
    )
    .await;

    let mut seen = Vec::new();
    let mut index = 0;
    let mut versions = HashSet::new();
    loop {
        let page = s.get(&format!("/assignments?pageIndex={index}")).await.body;
        assert_eq!(page["currentPageIndex"], index);
        assert_eq!(page["totalPages"], 3);
        versions.insert(page["versionId"].as_str().unwrap().to_string());
        let items = page["assignments"].as_array().unwrap();
        assert_eq!(page["size"].as_u64().unwrap() as usize, items.len());
        seen.extend(
            items
                .iter()
                .map(|a| a["serialNumber"].as_str().unwrap().to_string()),
        );
        match page.get("nextPageIndex") {
            Some(next) => index = next.as_i64().unwrap(),
            None => break,
        }
    }
    assert_eq!(index, 2);
    assert_eq!(versions.len(), 1, "no writes during the walk");
    seen.sort();
    assert_eq!(seen, targets);

    for (query, code) in [
        ("pageIndex=3", 9650),
        ("pageIndex=-1", 9650),
        ("pageIndex=x", 9602),
    ] {
        let a = s.get(&format!("/assignments?{query}")).await;
        assert_eq!((a.status, a.error()), (400, Some(code)), "{query}");
    }
    // An empty result is one page of size 0.
    let empty = s.get("/assignments?adamId=999").await.body;
    assert_eq!(
        (
            &empty["currentPageIndex"],
            &empty["size"],
            &empty["totalPages"]
        ),
        (&json!(0), &json!(0), &json!(1))
    );
    assert!(empty.get("nextPageIndex").is_none());
    assert_eq!(empty["assignments"], json!([]));
    assert_eq!(
        s.get("/assignments?adamId=999&pageIndex=1").await.error(),
        Some(9650)
    );

    // Users and assets page the same way.
    s.create_users(&["u1", "u2", "u3", "u4"]).await;
    let users = s.get("/users?pageIndex=1").await.body;
    assert_eq!(
        (&users["size"], &users["totalPages"]),
        (&json!(1), &json!(2))
    );
    assert!(users.get("nextPageIndex").is_none());
    assert_eq!(s.get("/assets?pageIndex=1").await.error(), Some(9650));
}

#[tokio::test]
async fn since_version_returns_what_changed_after_it() {
    let s = start(config(), vec![SimAsset::app("1", Some(10))]).await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
    )
    .await;
    let v1 = s.get("/assignments").await.body["versionId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v1.len(), 36, "UUID-like: {v1}");

    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["B"]}),
    )
    .await;
    let changed = s
        .get(&format!("/assignments?sinceVersionId={v1}"))
        .await
        .body;
    assert_eq!(
        changed["assignments"],
        json!([{"adamId": "1", "pricingParam": "STDQ", "serialNumber": "B"}])
    );
    let v2 = changed["versionId"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);

    // Nothing changed: an empty answer, not an error.
    let none = s
        .get(&format!("/assignments?sinceVersionId={v2}"))
        .await
        .body;
    assert_eq!(none["size"], 0);

    // Removals do not show; the version moves on.
    s.run(
        "/assets/disassociate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
    )
    .await;
    let after = s
        .get(&format!("/assignments?sinceVersionId={v2}"))
        .await
        .body;
    assert_eq!(after["size"], 0);
    assert_ne!(after["versionId"], v2.as_str());

    for bad in ["nonsense", "70e8c740-514c-11eb-bb63-a90b882fcd52"] {
        let a = s.get(&format!("/assignments?sinceVersionId={bad}")).await;
        assert_eq!((a.status, a.error()), (400, Some(9721)), "{bad}");
    }
    // A version from the future was never issued.
    let n = u64::from_str_radix(&v2[24..], 16).unwrap();
    let future = format!("{}{:012x}", &v2[..24], n + 100);
    assert_eq!(
        s.get(&format!("/assignments?sinceVersionId={future}"))
            .await
            .error(),
        Some(9721)
    );

    // Users: a retirement is a change.
    s.create_users(&["u1", "u2"]).await;
    let v3 = s.get("/users").await.body["versionId"]
        .as_str()
        .unwrap()
        .to_string();
    s.run("/users/retire", json!({"users": [{"clientUserId": "u1"}]}))
        .await;
    let users = s.get(&format!("/users?sinceVersionId={v3}")).await.body;
    assert_eq!(users["users"].as_array().unwrap().len(), 1);
    assert_eq!(users["users"][0]["status"], "Retired");
    assert_eq!(
        s.get("/users?sinceVersionId=bogus").await.error(),
        Some(9721)
    );
}

#[tokio::test]
async fn associate_and_query_assignments() {
    let s = start(
        config(),
        vec![SimAsset::app("1", Some(10)), SimAsset::app("2", Some(10))],
    )
    .await;
    s.create_users(&["u1", "u2"]).await;
    let status = s
        .run(
            "/assets/associate",
            json!({
                "assets": [{"adamId": "1", "pricingParam": "STDQ"}, {"adamId": "2"}],
                "clientUserIds": ["u1", "u2"],
                "serialNumbers": ["S1", "S2"],
            }),
        )
        .await;
    assert_eq!(status["eventStatus"], "COMPLETE");
    assert_eq!(status["eventType"], "ASSOCIATE");
    assert_eq!(
        (
            status["numRequested"].as_i64(),
            status["numCompleted"].as_i64()
        ),
        (Some(8), Some(8))
    );
    assert!(status.get("failures").is_none());
    assert!(status["uId"].is_string());
    assert_eq!(s.pairs().len(), 8);
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((4, Some(6)))
    );

    let by_serial = s.get("/assignments?serialNumber=S1").await.body;
    assert_eq!(
        by_serial["assignments"],
        json!([
            {"adamId": "1", "pricingParam": "STDQ", "serialNumber": "S1"},
            {"adamId": "2", "pricingParam": "STDQ", "serialNumber": "S1"},
        ])
    );
    let both = s.get("/assignments?adamId=2&clientUserId=u2").await.body;
    assert_eq!(
        both["assignments"],
        json!([{"adamId": "2", "pricingParam": "STDQ", "clientUserId": "u2"}])
    );
    assert_eq!(s.get("/assignments?adamId=1").await.body["size"], 4);
    assert_eq!(
        s.get("/assignments?pricingParam=PLUS").await.body["size"],
        0
    );
    assert_eq!(
        s.get("/assignments?serialNumber=nobody").await.body["size"],
        0
    );

    let with_state = s
        .get("/assignments?clientUserId=u1&includeUserState=true")
        .await
        .body;
    assert_eq!(with_state["assignments"][0]["userStatus"], "Registered");
    assert!(
        s.get("/assignments?clientUserId=u1").await.body["assignments"][0]
            .get("userStatus")
            .is_none()
    );

    // Associating again is idempotent: success, no extra license.
    let again = s
        .run(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S1"]}),
        )
        .await;
    assert_eq!(again["eventStatus"], "COMPLETE");
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((4, Some(6)))
    );

    // A retired user keeps its licenses; excludeInactiveUsers hides them.
    s.run("/users/retire", json!({"users": [{"clientUserId": "u1"}]}))
        .await;
    assert_eq!(s.get("/assignments?clientUserId=u1").await.body["size"], 2);
    let active = s.get("/assignments?excludeInactiveUsers=true").await.body;
    assert_eq!(active["size"], 6);
    let retired_state = s
        .get("/assignments?clientUserId=u1&includeUserState=1")
        .await
        .body;
    assert_eq!(retired_state["assignments"][0]["userStatus"], "Retired");
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((4, Some(6)))
    );

    // Disassociate frees licenses; a missing pair is a no-op success.
    let d = s
        .run(
            "/assets/disassociate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S1", "never-assigned"]}),
        )
        .await;
    assert_eq!(
        (d["eventStatus"].as_str(), d["numCompleted"].as_i64()),
        (Some("COMPLETE"), Some(2))
    );
    assert_eq!(d["eventType"], "DISASSOCIATE");
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((3, Some(7)))
    );
    assert!(!s.pairs().contains(&pair("1", "S1")));
}

#[tokio::test]
async fn limit_violations_refuse_the_whole_request() {
    let not_revocable = SimAsset {
        revocable: false,
        ..SimAsset::app("3", Some(10))
    };
    let s = start(
        SimConfig {
            limits: Limits {
                max_assets: 2,
                max_serial_numbers: 3,
                max_client_user_ids: 2,
                max_revoke_serial_numbers: 2,
                max_revoke_client_user_ids: 1,
                max_users: 2,
                ..Limits::default()
            },
            ..config()
        },
        vec![
            SimAsset::app("1", Some(10)),
            SimAsset::app("2", Some(10)),
            not_revocable,
            book("4", Some(10)),
        ],
    )
    .await;
    s.create_users(&["u1", "u2"]).await;
    s.create_users(&["u3"]).await;
    s.sim.clear_requests();
    let a1 = json!([{"adamId": "1"}]);
    let cases = [
        ("/assets/associate", json!({"serialNumbers": ["S1"]}), 9718),
        (
            "/assets/associate",
            json!({"assets": [], "serialNumbers": ["S1"]}),
            9718,
        ),
        ("/assets/associate", json!({"assets": a1}), 9719),
        (
            "/assets/associate",
            json!({"assets": a1, "serialNumbers": [], "clientUserIds": []}),
            9719,
        ),
        (
            "/assets/associate",
            json!({"assets": [{"adamId": "abc"}], "serialNumbers": ["S1"]}),
            9602,
        ),
        (
            "/assets/associate",
            json!({"assets": [{"adamId": ""}], "serialNumbers": ["S1"]}),
            9602,
        ),
        (
            "/assets/associate",
            json!({"assets": [{"adamId": "1", "pricingParam": "GOLD"}], "serialNumbers": ["S1"]}),
            9602,
        ),
        (
            "/assets/associate",
            json!({"assets": [{"adamId": 1}], "serialNumbers": ["S1"]}),
            9602,
        ),
        (
            "/assets/associate",
            json!({"assets": a1, "serialNumbers": [""]}),
            9602,
        ),
        (
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}, {"adamId": "1", "pricingParam": "STDQ"}], "serialNumbers": ["S1"]}),
            9703,
        ),
        (
            "/assets/associate",
            json!({"assets": a1, "clientUserIds": ["u1", "u1"]}),
            9704,
        ),
        (
            "/assets/associate",
            json!({"assets": a1, "serialNumbers": ["S1", "S2", "S1"]}),
            9705,
        ),
        (
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}, {"adamId": "2"}, {"adamId": "3"}], "serialNumbers": ["S1"]}),
            9700,
        ),
        (
            "/assets/associate",
            json!({"assets": a1, "clientUserIds": ["u1", "u2", "u3"]}),
            9701,
        ),
        (
            "/assets/associate",
            json!({"assets": a1, "serialNumbers": ["S1", "S2", "S3", "S4"]}),
            9702,
        ),
        // Duplicates are checked before sizes (section 9 item 7).
        (
            "/assets/associate",
            json!({"assets": a1, "serialNumbers": ["S1", "S2", "S3", "S1"]}),
            9705,
        ),
        (
            "/assets/associate",
            json!({"assets": [{"adamId": "4"}], "serialNumbers": ["S1"]}),
            9707,
        ),
        (
            "/assets/disassociate",
            json!({"assets": [{"adamId": "4"}], "serialNumbers": ["S1"]}),
            9707,
        ),
        (
            "/assets/disassociate",
            json!({"assets": [{"adamId": "3"}], "serialNumbers": ["S1"]}),
            9706,
        ),
        (
            "/assets/disassociate",
            json!({"assets": [{"adamId": "1"}, {"adamId": "2"}, {"adamId": "3"}], "serialNumbers": ["S1"]}),
            9700,
        ),
        ("/assets/revoke", json!({}), 9719),
        (
            "/assets/revoke",
            json!({"serialNumbers": ["S1", "S2", "S3"]}),
            9702,
        ),
        (
            "/assets/revoke",
            json!({"clientUserIds": ["u1", "u2"]}),
            9701,
        ),
        (
            "/assets/revoke",
            json!({"serialNumbers": ["S1", "S1"]}),
            9705,
        ),
        ("/users/create", json!({}), 9720),
        ("/users/create", json!({"users": []}), 9720),
        (
            "/users/create",
            json!({"users": [{"email": "x@example.com"}]}),
            9602,
        ),
        (
            "/users/create",
            json!({"users": [{"clientUserId": "a"}, {"clientUserId": "a"}]}),
            9715,
        ),
        (
            "/users/create",
            json!({"users": [{"clientUserId": "a"}, {"clientUserId": "b"}, {"clientUserId": "c"}]}),
            9714,
        ),
        (
            "/users/update",
            json!({"users": [{"clientUserId": "a", "email": "not-an-email"}]}),
            9717,
        ),
        (
            "/users/retire",
            json!({"users": [{"clientUserId": "a"}, {"clientUserId": "b"}, {"clientUserId": "c"}]}),
            9714,
        ),
    ];
    for (path, body, code) in &cases {
        let a = s.post(path, body.clone()).await;
        assert_eq!((a.status, a.error()), (400, Some(*code)), "{path} {body}");
        assert!(a.body.get("eventId").is_none());
        assert!(a.body["errorMessage"].is_string());
    }
    // Nothing was processed or even queued.
    assert!(s.sim.wait_idle(Duration::from_millis(10)).await);
    assert!(s.pairs().is_empty());
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((0, Some(10)))
    );
    let log = s.sim.requests();
    assert_eq!(log.len(), cases.len());
    assert!(log.iter().all(|r| r.event_id.is_none() && r.status == 400));

    // errorInfo names the offending values.
    let dup = s
        .post(
            "/assets/associate",
            json!({"assets": [{"adamId": "2"}, {"adamId": "2"}], "serialNumbers": ["S1"]}),
        )
        .await;
    assert_eq!(
        dup.body["errorInfo"]["assets"],
        json!([{"adamId": "2", "pricingParam": "STDQ"}])
    );
    let not_device = s
        .post(
            "/assets/associate",
            json!({"assets": [{"adamId": "4"}], "serialNumbers": ["S1"]}),
        )
        .await;
    assert_eq!(not_device.body["errorInfo"]["assets"][0]["adamId"], "4");
    // A book is fine for users.
    let for_users = s
        .run(
            "/assets/associate",
            json!({"assets": [{"adamId": "4"}], "clientUserIds": ["u1"]}),
        )
        .await;
    assert_eq!(for_users["eventStatus"], "COMPLETE");
    // Limits count each list separately.
    let mixed = s
        .run(
            "/assets/associate",
            json!({"assets": a1, "clientUserIds": ["u1", "u2"], "serialNumbers": ["S1", "S2", "S3"]}),
        )
        .await;
    assert_eq!(mixed["numCompleted"], 5);
}

#[tokio::test]
async fn content_type_method_path_and_json_errors() {
    let s = start(config(), vec![SimAsset::app("1", Some(10))]).await;
    let url = format!("{}/assets/associate", s.base);
    let body = r#"{"assets":[{"adamId":"1"}],"serialNumbers":["S1"]}"#;

    let text = s
        .send(
            s.http
                .post(&url)
                .bearer_auth(&s.token)
                .header("content-type", "text/plain")
                .body(body),
        )
        .await;
    assert_eq!((text.status, text.error()), (415, Some(9727)));
    let missing = s
        .send(s.http.post(&url).bearer_auth(&s.token).body(body))
        .await;
    assert_eq!((missing.status, missing.error()), (415, Some(9727)));
    let with_charset = s
        .send(
            s.http
                .post(&url)
                .bearer_auth(&s.token)
                .header("content-type", "application/json; charset=utf-8")
                .body(body),
        )
        .await;
    assert_eq!(with_charset.status, 200);

    let bad_json = s
        .send(
            s.http
                .post(&url)
                .bearer_auth(&s.token)
                .header("content-type", "application/json")
                .body("{nope"),
        )
        .await;
    assert_eq!((bad_json.status, bad_json.error()), (400, Some(9602)));
    let not_object = s.post("/assets/associate", json!([1, 2])).await;
    assert_eq!(not_object.error(), Some(9602));

    let get = s.get("/assets/associate").await;
    assert_eq!((get.status, get.error()), (405, Some(9726)));
    let post = s.post("/assets", json!({})).await;
    assert_eq!((post.status, post.error()), (405, Some(9726)));
    let delete = s
        .send(
            s.http
                .delete(format!("{}/client/config", s.base))
                .bearer_auth(&s.token),
        )
        .await;
    assert_eq!((delete.status, delete.error()), (405, Some(9726)));
    let post_config = s.post("/service/config", json!({})).await;
    assert_eq!((post_config.status, post_config.error()), (405, Some(9726)));

    let unknown = s.get("/subscriptions").await;
    assert_eq!((unknown.status, unknown.error()), (404, Some(9602)));
    let outside = s
        .send(
            s.http
                .get(format!("{}/elsewhere", s.base.trim_end_matches("/mdm/v2"))),
        )
        .await;
    assert_eq!((outside.status, outside.error()), (404, Some(9602)));
    // Authorization comes before method and content type.
    let anonymous = s.send(s.http.get(&url)).await;
    assert_eq!(anonymous.error(), Some(9722));
}

#[tokio::test]
async fn license_shortfall_fails_the_pairs_beyond_the_available_count() {
    let s = start(config(), vec![SimAsset::app("1", Some(3))]).await;
    s.create_users(&["u1", "u2"]).await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S0"]}),
    )
    .await;
    // 2 licenses left; users first, then serials; S0 already holds one.
    let status = s
        .run(
            "/assets/associate",
            json!({
                "assets": [{"adamId": "1"}, {"adamId": "777"}],
                "clientUserIds": ["u1", "u2", "ghost"],
                "serialNumbers": ["S0", "S1", "S2"],
            }),
        )
        .await;
    assert_eq!(status["eventStatus"], "FAILED");
    assert_eq!(status["numRequested"], 12);
    // Asset 1: u1, u2, S0 succeed; ghost 9609; S1, S2 9709. Asset 777 unknown: all 9709.
    assert_eq!(status["numCompleted"], 3);
    let failures = status["failures"].as_array().unwrap();
    let by_code: HashMap<i64, &Value> = failures
        .iter()
        .map(|f| (f["errorNumber"].as_i64().unwrap(), &f["errorInfo"]))
        .collect();
    assert_eq!(by_code.len(), 2, "one entry per error number: {failures:?}");
    assert_eq!(by_code[&9609]["clientUserIds"], json!(["ghost"]));
    assert_eq!(
        by_code[&9609]["assets"],
        json!([{"adamId": "1", "pricingParam": "STDQ"}])
    );
    assert_eq!(by_code[&9709]["serialNumbers"], json!(["S1", "S2", "S0"]));
    assert_eq!(
        by_code[&9709]["clientUserIds"],
        json!(["u1", "u2", "ghost"])
    );
    assert_eq!(
        by_code[&9709]["assets"],
        json!([{"adamId": "1", "pricingParam": "STDQ"}, {"adamId": "777", "pricingParam": "STDQ"}])
    );
    let expected: HashSet<_> = [pair("1", "S0"), pair("1", "u1"), pair("1", "u2")].into();
    assert_eq!(s.pairs(), expected);
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((3, Some(0)))
    );
    assert_eq!(
        s.get("/assets").await.body["assets"][0]["availableCount"],
        0
    );
}

#[tokio::test]
async fn all_or_nothing_shortfall_mode() {
    let s = start(
        SimConfig {
            shortfall_all_or_nothing: true,
            ..config()
        },
        vec![SimAsset::app("1", Some(3))],
    )
    .await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S0"]}),
    )
    .await;
    let status = s
        .run(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S0", "S1", "S2", "S3"]}),
        )
        .await;
    assert_eq!(
        (
            status["eventStatus"].as_str(),
            status["numCompleted"].as_i64()
        ),
        (Some("FAILED"), Some(1))
    );
    assert_eq!(
        status["failures"][0]["errorInfo"]["serialNumbers"],
        json!(["S1", "S2", "S3"])
    );
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((1, Some(2)))
    );
    // When everything fits, it all goes through.
    let fits = s
        .run(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S1", "S2"]}),
        )
        .await;
    assert_eq!(fits["eventStatus"], "COMPLETE");
}

#[tokio::test]
async fn events_of_a_token_run_in_submission_order() {
    // Slow processing so that both events are queued before either runs.
    let s = start(
        SimConfig {
            event_delay: Duration::from_millis(300),
            assignments_per_second: Some(50.0),
            ..config()
        },
        vec![SimAsset::app("1", Some(1))],
    )
    .await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["OLD"]}),
    )
    .await;
    let asset = json!([{"adamId": "1"}]);
    // The single license moves only because the disassociate runs first.
    let d = s
        .event(
            "/assets/disassociate",
            json!({"assets": asset, "serialNumbers": ["OLD"]}),
        )
        .await;
    let a = s
        .event(
            "/assets/associate",
            json!({"assets": asset, "serialNumbers": ["NEW"]}),
        )
        .await;
    assert_eq!(s.status(&a).await["eventStatus"], "PENDING");
    s.idle().await;
    assert_eq!(s.status(&d).await["eventStatus"], "COMPLETE");
    assert_eq!(s.status(&a).await["eventStatus"], "COMPLETE");
    assert_eq!(s.pairs(), [pair("1", "NEW")].into());

    // The other way round the associate finds no license.
    let a = s
        .event(
            "/assets/associate",
            json!({"assets": asset, "serialNumbers": ["THIRD"]}),
        )
        .await;
    let d = s
        .event(
            "/assets/disassociate",
            json!({"assets": asset, "serialNumbers": ["NEW"]}),
        )
        .await;
    s.idle().await;
    let failed = s.status(&a).await;
    assert_eq!(failed["eventStatus"], "FAILED");
    assert_eq!(failed["failures"][0]["errorNumber"], 9709);
    assert_eq!(s.status(&d).await["eventStatus"], "COMPLETE");
    assert!(s.pairs().is_empty());
}

#[tokio::test]
async fn event_status_moves_from_pending_to_done() {
    let s = start(
        SimConfig {
            // 2 s in all: room for a slow machine to look part way.
            assignments_per_second: Some(20.0),
            ..config()
        },
        vec![SimAsset::app("1", Some(100))],
    )
    .await;
    let id = s
        .event(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": serials("E", 40)}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let pending = s.status(&id).await;
    assert_eq!(pending["eventStatus"], "PENDING");
    assert_eq!(pending["numRequested"], 40);
    let done = pending["numCompleted"].as_i64().unwrap();
    assert!(done > 0 && done < 40, "part way: {done}");
    s.idle().await;
    let complete = s.status(&id).await;
    assert_eq!(
        (
            complete["eventStatus"].as_str(),
            complete["numCompleted"].as_i64()
        ),
        (Some("COMPLETE"), Some(40))
    );

    let unknown = s
        .get("/status?eventId=00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!((unknown.status, unknown.error()), (400, Some(9708)));
    assert_eq!(s.get("/status").await.error(), Some(9602));
}

#[tokio::test]
async fn disassociating_a_missing_pair_can_fail_with_9610() {
    let s = start(
        SimConfig {
            disassociate_missing_fails: true,
            ..config()
        },
        vec![SimAsset::app("1", Some(10))],
    )
    .await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
    )
    .await;
    let status = s
        .run(
            "/assets/disassociate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A", "B"]}),
        )
        .await;
    assert_eq!(status["eventStatus"], "FAILED");
    assert_eq!(status["numCompleted"], 1);
    assert_eq!(status["failures"][0]["errorNumber"], 9610);
    assert_eq!(
        status["failures"][0]["errorInfo"]["serialNumbers"],
        json!(["B"])
    );
}

#[tokio::test]
async fn revoke_removes_every_revocable_assignment_of_the_targets() {
    let kept = SimAsset {
        revocable: false,
        ..SimAsset::app("2", Some(10))
    };
    let s = start(
        config(),
        vec![
            SimAsset::app("1", Some(10)),
            kept,
            SimAsset::app("3", Some(10)),
        ],
    )
    .await;
    s.create_users(&["u1"]).await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}, {"adamId": "2"}, {"adamId": "3"}], "serialNumbers": ["S1", "S2"], "clientUserIds": ["u1"]}),
    )
    .await;
    let status = s
        .run(
            "/assets/revoke",
            json!({"serialNumbers": ["S1"], "clientUserIds": ["u1"]}),
        )
        .await;
    assert_eq!(status["eventType"], "REVOKE");
    assert_eq!(status["eventStatus"], "COMPLETE");
    assert_eq!(
        (
            status["numRequested"].as_i64(),
            status["numCompleted"].as_i64()
        ),
        (Some(4), Some(4))
    );
    let expected: HashSet<_> = [
        pair("1", "S2"),
        pair("2", "S2"),
        pair("3", "S2"),
        pair("2", "S1"),
        pair("2", "u1"),
    ]
    .into();
    assert_eq!(s.pairs(), expected);
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((1, Some(9)))
    );

    // Nothing to revoke: complete at once with nothing requested.
    let empty = s
        .run("/assets/revoke", json!({"serialNumbers": ["nobody"]}))
        .await;
    assert_eq!(
        (
            empty["eventStatus"].as_str(),
            empty["numRequested"].as_i64()
        ),
        (Some("COMPLETE"), Some(0))
    );
}

#[tokio::test]
async fn user_lifecycle() {
    let s = start(config(), vec![SimAsset::app("1", Some(10))]).await;
    let created = s
        .run(
            "/users/create",
            json!({"users": [
                {"clientUserId": "u1", "email": "ana@example.com"},
                {"clientUserId": "u2", "email": "ben@example.com", "managedAppleId": "ben@school.example.com"},
            ]}),
        )
        .await;
    assert_eq!(
        (
            created["eventType"].as_str(),
            created["eventStatus"].as_str()
        ),
        (Some("CREATE"), Some("COMPLETE"))
    );
    let users = s.get("/users").await.body["users"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(users[0]["status"], "Registered");
    assert_eq!(users[0]["email"], "ana@example.com");
    assert_eq!(users[0]["inviteCode"].as_str().unwrap().len(), 32);
    assert!(users[0].get("idHash").is_none());
    assert_eq!(users[1]["status"], "Associated");
    assert!(users[1]["idHash"].is_string());
    assert!(users[1].get("inviteCode").is_none());

    // An active user with that clientUserId exists: 9716, asynchronously.
    let dup = s
        .run(
            "/users/create",
            json!({"users": [{"clientUserId": "u1"}, {"clientUserId": "u3"}]}),
        )
        .await;
    assert_eq!(
        (dup["eventStatus"].as_str(), dup["numCompleted"].as_i64()),
        (Some("FAILED"), Some(1))
    );
    assert_eq!(dup["failures"][0]["errorNumber"], 9716);
    assert_eq!(
        dup["failures"][0]["errorInfo"]["clientUserIds"],
        json!(["u1"])
    );

    let updated = s
        .run(
            "/users/update",
            json!({"users": [{"clientUserId": "u1", "email": "ana@new.example.com", "managedAppleId": "ana@school.example.com"}, {"clientUserId": "nobody"}]}),
        )
        .await;
    assert_eq!(updated["eventType"], "UPDATE");
    assert_eq!(updated["failures"][0]["errorNumber"], 9609);
    let u1 = s.get("/users?clientUserId=u1").await.body["users"][0].clone();
    assert_eq!(
        (u1["email"].as_str(), u1["status"].as_str()),
        (Some("ana@new.example.com"), Some("Associated"))
    );

    let retired = s
        .run(
            "/users/retire",
            json!({"users": [{"clientUserId": "u1"}, {"clientUserId": "ghost"}]}),
        )
        .await;
    assert_eq!(retired["eventType"], "RETIRE");
    assert_eq!(
        retired["failures"][0]["errorInfo"]["clientUserIds"],
        json!(["ghost"])
    );
    assert_eq!(
        s.get("/users?retiredOnly=true").await.body["users"][0]["clientUserId"],
        "u1"
    );
    assert_eq!(s.get("/users?activeOnly=true").await.body["size"], 2);

    // A retired user cannot receive licenses; re-created, it can.
    let to_retired = s
        .run(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "clientUserIds": ["u1"]}),
        )
        .await;
    assert_eq!(to_retired["failures"][0]["errorNumber"], 9609);
    s.create_users(&["u1"]).await;
    let records = s.get("/users?clientUserId=u1").await.body;
    let statuses: Vec<&str> = records["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["Retired", "Registered"]);
    let now_ok = s
        .run(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "clientUserIds": ["u1"]}),
        )
        .await;
    assert_eq!(now_ok["eventStatus"], "COMPLETE");
}

#[tokio::test]
async fn notifications_are_chunked_authenticated_and_in_order() {
    let s = start(
        SimConfig {
            notifications: NotificationFaults {
                max_items: 3,
                concurrency: 1,
                ..config().notifications
            },
            ..config()
        },
        vec![SimAsset::app("1", Some(100))],
    )
    .await;
    let receiver = Receiver::start().await;
    assert_eq!(
        s.subscribe(&receiver, &["ASSET_MANAGEMENT", "USER_MANAGEMENT"])
            .await
            .status,
        200
    );
    let uid = s.get("/assets").await.body["uId"].clone();
    let targets = serials("N", 7);
    let event = s
        .event(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}, {"adamId": "999"}], "serialNumbers": targets}),
        )
        .await;
    s.idle().await;

    let all = receiver.all();
    for r in &all {
        assert_eq!(
            r.auth.as_deref(),
            Some(format!("Bearer {}", receiver.secret).as_str())
        );
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
    }
    let got = receiver.of_type("ASSET_MANAGEMENT");
    let shape: Vec<(String, String, usize)> = got
        .iter()
        .map(|e| {
            let n = &e["notification"];
            (
                n["assignments"][0]["adamId"].as_str().unwrap().to_string(),
                n["result"].as_str().unwrap().to_string(),
                n["assignments"].as_array().unwrap().len(),
            )
        })
        .collect();
    let expect = |adam: &str, result: &str, n| (adam.to_string(), result.to_string(), n);
    assert_eq!(
        shape,
        vec![
            expect("1", "SUCCESS", 3),
            expect("1", "SUCCESS", 3),
            expect("1", "SUCCESS", 1),
            expect("999", "FAILURE", 3),
            expect("999", "FAILURE", 3),
            expect("999", "FAILURE", 1),
        ]
    );
    let ids: HashSet<&str> = got
        .iter()
        .map(|e| e["notificationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 6);
    for e in &got {
        assert_eq!(e["uId"], uid);
        assert_eq!(e["notification"]["eventId"], event.as_str());
        assert_eq!(e["notification"]["type"], "ASSOCIATE");
    }
    let first = &got[0]["notification"];
    assert!(first.get("error").is_none());
    let serials_sent: Vec<String> = got[..3]
        .iter()
        .flat_map(|e| e["notification"]["assignments"].as_array().unwrap().clone())
        .map(|a| a["serialNumber"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(serials_sent, targets, "tasks in request order");
    assert_eq!(got[3]["notification"]["error"]["errorNumber"], 9709);

    // User events report the users' new state.
    receiver.clear();
    s.create_users(&["u1"]).await;
    s.idle().await;
    let users = receiver.of_type("USER_MANAGEMENT");
    assert_eq!(users.len(), 1);
    assert_eq!(users[0]["notification"]["type"], "CREATE");
    assert_eq!(users[0]["notification"]["result"], "SUCCESS");
    assert_eq!(users[0]["notification"]["users"][0]["status"], "Registered");
    assert!(users[0]["notification"]["users"][0]["inviteCode"].is_string());

    // Revoke and disassociate notify too; unsubscribed types do not.
    receiver.clear();
    s.run(
        "/assets/disassociate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["N00000"]}),
    )
    .await;
    s.run("/assets/revoke", json!({"serialNumbers": ["N00001"]}))
        .await;
    let kinds: Vec<String> = receiver
        .of_type("ASSET_MANAGEMENT")
        .iter()
        .map(|e| e["notification"]["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, vec!["DISASSOCIATE", "REVOKE"]);
    let stats = s.sim.notifications_sent();
    assert_eq!(
        (stats.generated, stats.delivered, stats.given_up),
        (9, 9, 0)
    );
}

#[tokio::test]
async fn notifications_are_retried_then_given_up() {
    let s = start(config(), vec![SimAsset::app("1", Some(100))]).await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["ASSET_MANAGEMENT"]).await;
    receiver.clear();

    // Two failures, then success on the third attempt.
    receiver.script(&[500, 503]);
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
    )
    .await;
    let attempts = receiver.all();
    assert_eq!(
        attempts.iter().map(|r| r.answered).collect::<Vec<_>>(),
        vec![500, 503, 200]
    );
    let ids: HashSet<&str> = attempts
        .iter()
        .map(|r| r.envelope["notificationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "a retry carries the same notificationId");
    let stats = s.sim.notifications_sent();
    assert_eq!(
        (
            stats.attempts,
            stats.failed_attempts,
            stats.delivered,
            stats.given_up
        ),
        (3, 2, 1, 0)
    );

    // Three failures: given up.
    receiver.clear();
    receiver.script(&[500, 500, 500]);
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["B"]}),
    )
    .await;
    assert_eq!(receiver.all().len(), 3);
    let stats = s.sim.notifications_sent();
    assert_eq!(
        (
            stats.attempts,
            stats.failed_attempts,
            stats.delivered,
            stats.given_up
        ),
        (6, 5, 1, 1)
    );
}

#[tokio::test]
async fn a_slow_receiver_times_out_the_attempt() {
    let slow = start(
        SimConfig {
            notifications: NotificationFaults {
                attempts: 2,
                retry_spacing: vec![Duration::from_millis(10)],
                attempt_timeout: Duration::from_millis(200),
                ..config().notifications
            },
            ..config()
        },
        vec![SimAsset::app("1", Some(100))],
    )
    .await;
    let delayed = DelayedReceiver::start(Duration::from_millis(600)).await;
    let a = slow
        .post(
            "/client/config",
            json!({"notificationUrl": delayed.url, "notificationAuthToken": "s", "notificationTypes": ["ASSET_MANAGEMENT"]}),
        )
        .await;
    // The TEST_NOTIFICATION has 10 s, so the slow receiver still passes it.
    assert_eq!(a.status, 200, "{}", a.body);
    let started = Instant::now();
    slow.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
    )
    .await;
    let stats = slow.sim.notifications_sent();
    assert_eq!(
        (stats.attempts, stats.failed_attempts, stats.given_up),
        (2, 2, 1)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Answers 200 after a delay.
struct DelayedReceiver {
    url: String,
    _server: http::Server,
}

struct Delay(Duration);

impl http::Handler for Delay {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let _ = http::read_body(req.into_body(), 1 << 20).await;
        tokio::time::sleep(self.0).await;
        http::json(StatusCode::OK, &json!({}))
    }
}

impl DelayedReceiver {
    async fn start(delay: Duration) -> DelayedReceiver {
        let server = http::Server::bind("127.0.0.1:0", Arc::new(Delay(delay)))
            .await
            .unwrap();
        DelayedReceiver {
            url: format!("http://{}/n", server.local_addr()),
            _server: server,
        }
    }
}

#[tokio::test]
async fn drop_and_duplicate_faults() {
    let dropping = start(
        SimConfig {
            notifications: NotificationFaults {
                drop_rate: 1.0,
                ..config().notifications
            },
            ..config()
        },
        vec![SimAsset::app("1", Some(100))],
    )
    .await;
    let receiver = Receiver::start().await;
    dropping.subscribe(&receiver, &["ASSET_MANAGEMENT"]).await;
    dropping
        .run(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A", "B"]}),
        )
        .await;
    assert!(receiver.delivered().is_empty());
    let stats = dropping.sim.notifications_sent();
    assert_eq!(
        (stats.generated, stats.dropped_by_fault, stats.attempts),
        (1, 1, 0)
    );

    let duplicating = start(
        SimConfig {
            notifications: NotificationFaults {
                duplicate_rate: 1.0,
                max_items: 1,
                ..config().notifications
            },
            ..config()
        },
        vec![SimAsset::app("1", Some(100))],
    )
    .await;
    let receiver = Receiver::start().await;
    duplicating
        .subscribe(&receiver, &["ASSET_MANAGEMENT"])
        .await;
    duplicating
        .run(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A", "B"]}),
        )
        .await;
    let got = receiver.delivered();
    assert_eq!(got.len(), 4);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for e in &got {
        *counts
            .entry(e["notificationId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![2, 2]);
    let stats = duplicating.sim.notifications_sent();
    assert_eq!(
        (stats.generated, stats.duplicated, stats.delivered),
        (2, 2, 4)
    );
}

#[tokio::test]
async fn reorder_and_delay_faults_still_deliver_everything() {
    let s = start(
        SimConfig {
            notifications: NotificationFaults {
                max_items: 1,
                reorder_window: 4,
                delay: Duration::from_millis(50),
                concurrency: 1,
                ..config().notifications
            },
            ..config()
        },
        vec![SimAsset::app("1", Some(100))],
    )
    .await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["ASSET_MANAGEMENT"]).await;
    let targets = serials("R", 10);
    let started = Instant::now();
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": targets}),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    let mut got: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|e| {
            e["notification"]["assignments"][0]["serialNumber"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(got.len(), 10);
    got.sort();
    assert_eq!(got, targets);
}

#[tokio::test]
async fn rate_limit_and_429_fault_send_retry_after() {
    let s = start(
        SimConfig {
            enforce_rate_limit: true,
            limits: Limits {
                max_request_per_second: Some(2),
                ..Limits::default()
            },
            ..config()
        },
        vec![],
    )
    .await;
    // Sent together so that a slow machine cannot stretch them over a refill.
    let (a, b, c) = tokio::join!(s.get("/assets"), s.get("/assets"), s.get("/assets"));
    let mut answers = [a, b, c];
    answers.sort_by_key(|a| a.status);
    assert_eq!(
        answers.iter().map(|a| a.status).collect::<Vec<_>>(),
        vec![200, 200, 429]
    );
    assert_eq!(answers[2].error(), Some(9646));
    assert_eq!(answers[2].header("retry-after").as_deref(), Some("1"));
    // Service config is not rate limited.
    assert_eq!(s.get("/service/config").await.status, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(s.get("/assets").await.status, 200);

    let f = start(config(), vec![]).await;
    f.sim.set_faults(Faults {
        fail_next_with_429: 2,
        retry_after_secs: 7,
        ..Faults::default()
    });
    for _ in 0..2 {
        let a = f.get("/users").await;
        assert_eq!((a.status, a.error()), (429, Some(9646)));
        assert_eq!(a.header("retry-after").as_deref(), Some("7"));
    }
    assert_eq!(f.get("/users").await.status, 200);
    assert_eq!(f.sim.faults().fail_next_with_429, 0);

    f.sim.set_faults(Faults {
        fail_next_with_429: 1,
        retry_after_secs: 30,
        retry_after_http_date: true,
        ..Faults::default()
    });
    let a = f.get("/users").await;
    let date = httpdate::parse_http_date(&a.header("retry-after").unwrap()).unwrap();
    let ahead = date.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        ahead > Duration::from_secs(25) && ahead <= Duration::from_secs(31),
        "{ahead:?}"
    );
}

#[tokio::test]
async fn error_5xx_faults() {
    let s = start(config(), vec![SimAsset::app("1", Some(10))]).await;
    s.sim.set_faults(Faults {
        error_5xx_next: 2,
        retry_after_secs: 120,
        ..Faults::default()
    });
    let a = s
        .post(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
        )
        .await;
    assert_eq!((a.status, a.error()), (503, Some(9729)));
    assert_eq!(a.header("retry-after").as_deref(), Some("120"));
    let b = s.get("/service/config").await;
    assert_eq!(b.status, 503);
    assert_eq!(s.get("/service/config").await.status, 200);
    s.idle().await;
    assert!(s.pairs().is_empty(), "nothing done");

    let always = start(
        SimConfig {
            error_5xx_rate: 1.0,
            ..config()
        },
        vec![],
    )
    .await;
    let a = always.get("/assets").await;
    assert_eq!((a.status, a.error()), (503, Some(9729)));
    assert_eq!(a.header("retry-after").as_deref(), Some("1"));
}

#[tokio::test]
async fn error_body_with_http_200_does_nothing() {
    let s = start(config(), vec![SimAsset::app("1", Some(10))]).await;
    s.sim.set_faults(Faults {
        error_body_with_200_next: 1,
        ..Faults::default()
    });
    let a = s
        .post(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.error(), Some(9603));
    assert!(a.body.get("eventId").is_none());
    s.idle().await;
    assert!(s.pairs().is_empty());
    let ok = s
        .post(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
        )
        .await;
    assert!(ok.body["eventId"].is_string());
}

#[tokio::test]
async fn a_cut_connection_still_processes_the_event() {
    let s = start(config(), vec![SimAsset::app("1", Some(10))]).await;
    s.sim.set_faults(Faults {
        cut_connection_after_processing_next: 1,
        ..Faults::default()
    });
    let result = s
        .http
        .post(format!("{}/assets/associate", s.base))
        .bearer_auth(&s.token)
        .json(&json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A", "B"]}))
        .send()
        .await;
    assert!(result.is_err(), "no answer at all: {result:?}");
    s.idle().await;
    let got = s.get("/assignments?adamId=1").await.body;
    assert_eq!(got["size"], 2);
    let log = s.sim.requests();
    let cut = log.iter().find(|r| r.path == "/assets/associate").unwrap();
    assert_eq!(cut.status, 0);
    let event = cut.event_id.clone().unwrap();
    assert_eq!(s.status(&event).await["eventStatus"], "COMPLETE");
    // The next request on a new connection is answered normally.
    assert_eq!(s.get("/assets").await.status, 200);
}

#[tokio::test]
async fn asset_count_on_license_changes() {
    let s = start(config(), vec![SimAsset::app("1", Some(10))]).await;
    let receiver = Receiver::start().await;
    // Not subscribed yet: nothing generated.
    s.sim.add_licenses(&s.token, "1", "STDQ", 1).unwrap();
    s.subscribe(&receiver, &["ASSET_COUNT"]).await;
    s.sim.add_licenses(&s.token, "1", "STDQ", 5).unwrap();
    s.sim.add_licenses(&s.token, "1", "STDQ", -2).unwrap();
    s.idle().await;
    let got = receiver.of_type("ASSET_COUNT");
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0]["notification"],
        json!({"adamId": "1", "pricingParam": "STDQ", "countDelta": 5})
    );
    assert_eq!(got[1]["notification"]["countDelta"], -2);
    assert!(got[0]["notification"].get("eventId").is_none());
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((0, Some(14)))
    );
    assert_eq!(s.get("/assets").await.body["assets"][0]["totalCount"], 14);

    // A purchase of a new app creates it; a refund below what is assigned is refused.
    s.sim.add_licenses(&s.token, "2", "STDQ", 1).unwrap();
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "2"}], "serialNumbers": ["A"]}),
    )
    .await;
    assert!(s.sim.add_licenses(&s.token, "2", "STDQ", -1).is_err());
    assert!(s.sim.add_licenses(&s.token, "404", "STDQ", -1).is_err());
    assert!(s.sim.add_licenses(&token_text(1), "1", "STDQ", 1).is_err());
    // Assignments never cause ASSET_COUNT (section 9 item 14).
    s.idle().await;
    assert_eq!(receiver.of_type("ASSET_COUNT").len(), 3);
}

#[tokio::test]
async fn user_associated_on_accepted_invitation() {
    let s = start(config(), vec![]).await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["USER_ASSOCIATED"]).await;
    s.create_users(&["u1", "u2"]).await;
    assert!(
        receiver.delivered().is_empty(),
        "USER_MANAGEMENT not subscribed"
    );
    let code = s.get("/users?clientUserId=u1").await.body["users"][0]["inviteCode"]
        .as_str()
        .unwrap()
        .to_string();

    s.sim.accept_invitation(&s.token, "u1").unwrap();
    s.idle().await;
    let got = receiver.of_type("USER_ASSOCIATED");
    assert_eq!(got.len(), 1);
    let user = &got[0]["notification"]["associatedUsers"][0];
    assert_eq!(user["clientUserId"], "u1");
    assert_eq!(user["status"], "Associated");
    assert_eq!(user["inviteCode"], code.as_str());
    assert!(user["idHash"].is_string());
    assert_eq!(
        s.get("/users?clientUserId=u1").await.body["users"][0]["status"],
        "Associated"
    );
    assert!(
        s.sim.accept_invitation(&s.token, "u1").is_err(),
        "already accepted"
    );
    assert!(s.sim.accept_invitation(&s.token, "nobody").is_err());

    // The invitationEmail link from service config does the same.
    let template = s.get("/service/config").await.body["urls"]["invitationEmail"]
        .as_str()
        .unwrap()
        .to_string();
    let code2 = s.get("/users?clientUserId=u2").await.body["users"][0]["inviteCode"]
        .as_str()
        .unwrap()
        .to_string();
    let link = template.replace("%25inviteCode%25", &code2);
    let a = s.send(s.http.get(link)).await;
    assert_eq!(a.status, 200);
    s.idle().await;
    assert_eq!(receiver.of_type("USER_ASSOCIATED").len(), 2);
}

#[tokio::test]
async fn the_request_log_records_what_was_asked() {
    let s = start(config(), vec![SimAsset::app("1", Some(10))]).await;
    let _ = s.get("/assets?adamId=1").await;
    let body = json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]});
    let id = s.event("/assets/associate", body.clone()).await;
    let _ = s.get_as("unknown", "/users").await;
    let log = s.sim.requests();
    assert_eq!(log.len(), 3);
    assert_eq!(
        (
            log[0].method.as_str(),
            log[0].path.as_str(),
            log[0].query.as_str()
        ),
        ("GET", "/assets", "adamId=1")
    );
    assert_eq!(log[0].status, 200);
    assert_eq!(
        log[0].token_fingerprint.as_deref(),
        Some(fingerprint(&s.token).as_str())
    );
    assert_eq!(log[1].body.as_ref(), Some(&body));
    assert_eq!(log[1].event_id.as_deref(), Some(id.as_str()));
    assert_eq!((log[2].status, log[2].error_number), (401, Some(9622)));
    assert!(log[0].at <= log[1].at && log[1].at <= log[2].at);
    s.sim.clear_requests();
    assert!(s.sim.requests().is_empty());
}

#[tokio::test]
async fn control_endpoints_drive_a_running_simulator() {
    let s = start(config(), vec![SimAsset::app("1", Some(1))]).await;
    let root = s.base.trim_end_matches("/mdm/v2").to_string();
    let control = |path: &str| format!("{root}/_sim{path}");
    let tokens: Value = s
        .http
        .get(control("/tokens"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fp = tokens[0]["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fp, fingerprint(&s.token));

    let faults: Value = s
        .http
        .post(control("/faults"))
        .json(&json!({"fail_next_with_429": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            faults["fail_next_with_429"].as_u64(),
            faults["retry_after_secs"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(s.get("/assets").await.status, 429);
    let typo = s
        .http
        .post(control("/faults"))
        .json(&json!({"fail_next": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(typo.status(), 400);

    let limits: Value = s
        .http
        .post(control("/limits"))
        .json(&json!({"maxAssets": 5, "maxRequestPerSecond": null}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(limits["maxAssets"], 5);
    let published = s.get("/service/config").await.body;
    assert_eq!(published["limits"]["maxAssets"], 5);
    assert!(published["limits"].get("maxRequestPerSecond").is_none());

    let licenses = s
        .http
        .post(control("/licenses"))
        .json(&json!({"token": fp, "adamId": "1", "delta": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(licenses.status(), 200);
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((0, Some(5)))
    );

    s.create_users(&["u1"]).await;
    let accepted = s
        .http
        .post(control("/invitations"))
        .json(&json!({"clientUserId": "u1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);
    assert_eq!(
        s.get("/users").await.body["users"][0]["status"],
        "Associated"
    );

    let log: Value = s
        .http
        .get(control("/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = &log.as_array().unwrap()[0];
    assert_eq!(
        (first["path"].as_str(), first["status"].as_u64()),
        (Some("/assets"), Some(429))
    );
    assert_eq!(first["errorNumber"], 9646);
    s.http.delete(control("/requests")).send().await.unwrap();
    assert!(s.sim.requests().is_empty());

    let stats: Value = s
        .http
        .get(control("/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["busy"], 0);
    assert!(stats["generated"].is_u64());
    assert_eq!(
        s.http
            .get(control("/nothing"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn wait_idle_times_out_while_work_remains_and_shutdown_is_clean() {
    let s = start(
        SimConfig {
            event_delay: Duration::from_secs(30),
            ..config()
        },
        vec![SimAsset::app("1", Some(1))],
    )
    .await;
    s.event(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
    )
    .await;
    assert!(!s.sim.wait_idle(Duration::from_millis(50)).await);
    let base = s.base.clone();
    let started = Instant::now();
    s.sim.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        reqwest::get(format!("{base}/service/config"))
            .await
            .is_err()
    );
}

/// The demo's shape: 10,000 devices x 25 apps in 10 requests of 25 assets x
/// 1000 serials, with notifications. Checks correctness only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_devices_times_twenty_five_apps() {
    let apps: Vec<String> = (0..25).map(|i| (100_000_001 + i).to_string()).collect();
    let s = start(
        config(),
        apps.iter()
            .map(|a| SimAsset::app(a, Some(10_000)))
            .collect(),
    )
    .await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["ASSET_MANAGEMENT"]).await;
    receiver.clear();
    let assets: Vec<Value> = apps.iter().map(|a| json!({"adamId": a})).collect();
    let devices = serials("D", 10_000);
    let mut events = Vec::new();
    for chunk in devices.chunks(1000) {
        events.push(
            s.event(
                "/assets/associate",
                json!({"assets": assets, "serialNumbers": chunk}),
            )
            .await,
        );
    }
    assert!(s.sim.wait_idle(Duration::from_secs(120)).await);
    for id in &events {
        let st = s.status(id).await;
        assert_eq!(
            (st["eventStatus"].as_str(), st["numCompleted"].as_i64()),
            (Some("COMPLETE"), Some(25_000))
        );
    }
    for app in &apps {
        assert_eq!(
            s.sim.asset_counts(&s.token, app, "STDQ"),
            Some((10_000, Some(0)))
        );
    }
    assert_eq!(s.sim.assignments(&s.token).len(), 250_000);
    let by_serial = s.get("/assignments?serialNumber=D09999").await.body;
    assert_eq!(by_serial["size"], 25);

    let got = receiver.delivered();
    assert_eq!(got.len(), 2_500);
    let notified: usize = got
        .iter()
        .map(|e| e["notification"]["assignments"].as_array().unwrap().len())
        .sum();
    assert_eq!(notified, 250_000);
    let stats = s.sim.notifications_sent();
    assert_eq!(
        (stats.generated, stats.delivered, stats.given_up),
        (2_500, 2_500, 0)
    );
}

/// `vppd sim` as its own process: flags reach the simulator, the first
/// stdout line names the base URL, and SIGTERM ends it cleanly.
#[tokio::test]
async fn the_cli_serves_until_sigterm() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().unwrap();
    let token = token_text(30);
    let path = dir.path().join("main.vpptoken");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args(["sim", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&path)
        .args(["--apps", "2", "--licenses", "5", "--asset", "42=unlimited"])
        .args([
            "--max-assets",
            "7",
            "--page-size",
            "1",
            "--fail-next-429",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("vppd sim listening on "))
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .expect("the simulator never said where it listens")
        .unwrap()
        .unwrap();
    let base = line
        .trim_start_matches("vppd sim listening on ")
        .to_string();
    assert!(
        base.starts_with("http://127.0.0.1:") && base.ends_with("/mdm/v2"),
        "{base}"
    );

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let config: Value = http
        .get(format!("{base}/service/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["limits"]["maxAssets"], 7);
    let assets = |http: reqwest::Client| {
        let url = format!("{base}/assets");
        let token = token.clone();
        async move { http.get(url).bearer_auth(token).send().await.unwrap() }
    };
    assert_eq!(assets(http.clone()).await.status(), 429, "--fail-next-429");
    let page: Value = assets(http.clone()).await.json().await.unwrap();
    assert_eq!(
        page["totalPages"], 3,
        "2 generated apps and 42, one per page"
    );
    assert_eq!(page["assets"][0]["adamId"], "42");

    signal(child.id(), Signal::Term);
    let exit = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .expect("no exit after SIGTERM")
    .unwrap()
    .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// A newcomer's first run: the token file named does not exist yet. The
/// simulator writes one (0600), says so on stderr, serves it, and owns the
/// adamIds of Apple's examples, so the README's job finds its app.
#[tokio::test]
async fn the_cli_writes_a_missing_token_file_and_owns_the_example_apps() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("main.vpptoken");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args(["sim", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("vppd sim listening on "))
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .expect("the simulator never said where it listens")
        .unwrap()
        .unwrap();
    let base = line
        .trim_start_matches("vppd sim listening on ")
        .to_string();
    let token = SToken::from_file(&path).expect("a valid token was written");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is private");
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let assets: Value = http
        .get(format!("{base}/assets?adamId=361309726"))
        .bearer_auth(token.bearer())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(assets["assets"][0]["availableCount"], 10_000, "{assets}");

    signal(child.id(), Signal::Term);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{:?}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{} did not exist", path.display())),
        "{stderr}"
    );
    assert!(
        !stderr.contains(token.bearer()),
        "the token itself is not printed when it went to a file"
    );
}

/// POSTs (or GETs with `Value::Null`) a control endpoint of the simulator.
async fn control(s: &Sim, path: &str, body: Value) -> (u16, Value) {
    let url = format!("{}/_sim{path}", s.base.trim_end_matches("/mdm/v2"));
    let req = match body {
        Value::Null => s.http.get(url),
        body => s.http.post(url).json(&body),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Section 6: an event still PENDING after 10 minutes is resubmitted. A
/// held event decides its first tasks, then waits; the resubmission of the
/// rest goes ahead of it; released late, the original finds its pairs made
/// and uses no license for them.
#[tokio::test]
async fn held_events_stay_pending_while_a_resubmission_goes_ahead() {
    let s = start(config(), vec![SimAsset::app("1", Some(10))]).await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["ASSET_MANAGEMENT"]).await;
    let (status, hold) = control(&s, "/hold", json!({"next": 1, "afterTasks": 2})).await;
    assert_eq!(status, 200, "{hold}");
    assert_eq!(
        (hold["next"].as_u64(), hold["afterTasks"].as_u64()),
        (Some(1), Some(2))
    );

    let original = s
        .event(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A", "B", "C", "D"]}),
        )
        .await;
    s.idle().await;
    let pending = s.status(&original).await;
    assert_eq!(
        (
            pending["eventStatus"].as_str(),
            pending["numRequested"].as_i64(),
            pending["numCompleted"].as_i64()
        ),
        (Some("PENDING"), Some(4), Some(2))
    );
    let notified: Vec<Value> = receiver.of_type("ASSET_MANAGEMENT");
    assert_eq!(notified.len(), 1, "the decided tasks are notified");
    assert_eq!(notified[0]["notification"]["eventId"], original.as_str());
    assert_eq!(
        notified[0]["notification"]["assignments"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (_, listed) = control(&s, "/hold", Value::Null).await;
    assert_eq!(listed["next"], 0, "the count went down");
    assert_eq!(listed["held"][0]["eventId"], original.as_str());
    assert_eq!(listed["held"][0]["numCompleted"], 2);
    assert_eq!(listed["held"][0]["token"], fingerprint(&s.token).as_str());

    // The resubmission of the undecided pairs is not stuck behind it.
    let resubmitted = s
        .run(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["C", "D"]}),
        )
        .await;
    assert_eq!(resubmitted["eventStatus"], "COMPLETE");
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((4, Some(6)))
    );
    assert_eq!(s.status(&original).await["eventStatus"], "PENDING");

    let (status, released) =
        control(&s, "/hold/release", json!({"eventIds": [original, "nope"]})).await;
    assert_eq!(status, 200);
    assert_eq!(released["released"], json!([original]));
    assert_eq!(released["notHeld"], json!(["nope"]));
    s.idle().await;
    let late = s.status(&original).await;
    assert_eq!(
        (late["eventStatus"].as_str(), late["numCompleted"].as_i64()),
        (Some("COMPLETE"), Some(4))
    );
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((4, Some(6))),
        "the late original used no second license"
    );
    let late_notes: Vec<Value> = receiver
        .of_type("ASSET_MANAGEMENT")
        .into_iter()
        .filter(|n| n["notification"]["eventId"] == original.as_str())
        .collect();
    let late_targets: Vec<String> = late_notes
        .iter()
        .flat_map(|n| {
            n["notification"]["assignments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["serialNumber"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(late_targets, vec!["A", "B", "C", "D"]);
    assert!(s.sim.held_events().is_empty());
}

/// `all` holds every new event from its first task on; a revoke held so
/// finds its work when released, and released events keep their order.
#[tokio::test]
async fn holding_all_events_and_releasing_them_in_order() {
    let s = start(config(), vec![SimAsset::app("1", Some(1))]).await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A"]}),
    )
    .await;
    s.sim.set_hold(HoldSettings {
        all: true,
        ..Default::default()
    });
    let revoke = s
        .event("/assets/revoke", json!({"serialNumbers": ["A"]}))
        .await;
    let associate = s
        .event(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["B"]}),
        )
        .await;
    s.idle().await;
    for id in [&revoke, &associate] {
        let st = s.status(id).await;
        assert_eq!(
            (st["eventStatus"].as_str(), st["numCompleted"].as_i64()),
            (Some("PENDING"), Some(0))
        );
    }
    let held: Vec<String> = s
        .sim
        .held_events()
        .into_iter()
        .map(|h| h.event_id)
        .collect();
    assert_eq!(held, vec![revoke.clone(), associate.clone()]);
    s.sim.set_hold(HoldSettings::default());
    assert_eq!(
        s.sim.release_held(None),
        vec![revoke.clone(), associate.clone()]
    );
    s.idle().await;
    let revoked = s.status(&revoke).await;
    assert_eq!(
        (
            revoked["eventStatus"].as_str(),
            revoked["numRequested"].as_i64()
        ),
        (Some("COMPLETE"), Some(1))
    );
    // The revoke freed the only license before the associate ran.
    assert_eq!(s.status(&associate).await["eventStatus"], "COMPLETE");
    assert_eq!(s.pairs(), [pair("1", "B")].into());
}

/// Reference 3.8 and 7.5: a revoke removes every revocable assignment of
/// its targets whatever the asset, names each (asset, target) pair in
/// REVOKE notifications, counts them in the event status, and the licenses
/// it frees serve the events queued behind it at once.
#[tokio::test]
async fn revoke_notifies_each_pair_and_frees_licenses_for_the_next_events() {
    let fixed = SimAsset {
        revocable: false,
        ..SimAsset::app("3", Some(5))
    };
    let s = start(
        config(),
        vec![
            SimAsset::app("1", Some(2)),
            SimAsset::app("2", Some(2)),
            fixed,
        ],
    )
    .await;
    s.create_users(&["u1"]).await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}, {"adamId": "2"}, {"adamId": "3"}], "serialNumbers": ["S1"], "clientUserIds": ["u1"]}),
    )
    .await;
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((2, Some(0)))
    );
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["ASSET_MANAGEMENT", "ASSET_COUNT"])
        .await;
    let before = s.get("/assignments").await.body["versionId"]
        .as_str()
        .unwrap()
        .to_string();

    // Back to back, without waiting: the associate needs the revoked licenses.
    let revoke = s
        .event(
            "/assets/revoke",
            json!({"serialNumbers": ["S1"], "clientUserIds": ["u1"]}),
        )
        .await;
    let reuse = s
        .event(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}, {"adamId": "2"}], "serialNumbers": ["S2", "S3"]}),
        )
        .await;
    s.idle().await;

    let status = s.status(&revoke).await;
    assert_eq!(
        (
            status["eventType"].as_str(),
            status["eventStatus"].as_str(),
            status["numRequested"].as_i64(),
            status["numCompleted"].as_i64()
        ),
        (Some("REVOKE"), Some("COMPLETE"), Some(4), Some(4))
    );
    assert!(status.get("failures").is_none());
    let reused = s.status(&reuse).await;
    assert_eq!(
        (
            reused["eventStatus"].as_str(),
            reused["numCompleted"].as_i64()
        ),
        (Some("COMPLETE"), Some(4)),
        "{reused}"
    );

    let notes: Vec<Value> = receiver
        .of_type("ASSET_MANAGEMENT")
        .into_iter()
        .filter(|n| n["notification"]["eventId"] == revoke.as_str())
        .collect();
    assert_eq!(notes.len(), 1, "one notification across assets, as in 7.5");
    let note = &notes[0]["notification"];
    assert_eq!(
        (note["type"].as_str(), note["result"].as_str()),
        (Some("REVOKE"), Some("SUCCESS"))
    );
    assert!(note.get("error").is_none());
    let named: HashSet<(String, String)> = note["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(a["pricingParam"], "STDQ");
            assert!(a["serialNumber"].is_string() != a["clientUserId"].is_string());
            let target = a["serialNumber"].as_str().or(a["clientUserId"].as_str());
            pair(a["adamId"].as_str().unwrap(), target.unwrap())
        })
        .collect();
    let expected: HashSet<_> = [
        pair("1", "S1"),
        pair("2", "S1"),
        pair("1", "u1"),
        pair("2", "u1"),
    ]
    .into();
    assert_eq!(named, expected, "the non-revocable asset 3 stays");
    assert!(
        receiver.of_type("ASSET_COUNT").is_empty(),
        "9.14: no ASSET_COUNT for assignments"
    );

    let assets = s.get("/assets").await.body;
    let counts: HashMap<String, (i64, i64)> = assets["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["adamId"].as_str().unwrap().to_string(),
                (
                    a["assignedCount"].as_i64().unwrap(),
                    a["availableCount"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(counts["1"], (2, 0));
    assert_eq!(counts["2"], (2, 0));
    assert_eq!(counts["3"], (2, 3));
    let since = s
        .get(&format!("/assignments?sinceVersionId={before}"))
        .await
        .body;
    let added: HashSet<(String, String)> = since["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            pair(
                a["adamId"].as_str().unwrap(),
                a["serialNumber"].as_str().unwrap(),
            )
        })
        .collect();
    let made: HashSet<_> = [
        pair("1", "S2"),
        pair("2", "S2"),
        pair("1", "S3"),
        pair("2", "S3"),
    ]
    .into();
    assert_eq!(added, made, "additions show, removals do not (9.17)");

    // The same with a disassociate, and the other way round: an associate
    // queued before the disassociate that would free its license fails.
    let freed = s
        .event(
            "/assets/disassociate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S2"]}),
        )
        .await;
    let takes = s
        .event(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S4"]}),
        )
        .await;
    let too_early = s
        .event(
            "/assets/associate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S5"]}),
        )
        .await;
    let late = s
        .event(
            "/assets/disassociate",
            json!({"assets": [{"adamId": "1"}], "serialNumbers": ["S3"]}),
        )
        .await;
    s.idle().await;
    assert_eq!(s.status(&freed).await["eventStatus"], "COMPLETE");
    assert_eq!(s.status(&takes).await["eventStatus"], "COMPLETE");
    let failed = s.status(&too_early).await;
    assert_eq!(failed["failures"][0]["errorNumber"], 9709, "{failed}");
    assert_eq!(s.status(&late).await["eventStatus"], "COMPLETE");
    assert_eq!(
        s.sim.asset_counts(&s.token, "1", "STDQ"),
        Some((1, Some(1)))
    );
}

/// A revoke's notifications are chunked like the others'.
#[tokio::test]
async fn revoke_notifications_are_chunked() {
    let s = start(
        SimConfig {
            notifications: NotificationFaults {
                max_items: 3,
                ..config().notifications
            },
            ..config()
        },
        vec![SimAsset::app("1", Some(10)), SimAsset::app("2", Some(10))],
    )
    .await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}, {"adamId": "2"}], "serialNumbers": ["A", "B"]}),
    )
    .await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["ASSET_MANAGEMENT"]).await;
    s.run("/assets/revoke", json!({"serialNumbers": ["A", "B"]}))
        .await;
    let sizes: Vec<usize> = receiver
        .of_type("ASSET_MANAGEMENT")
        .iter()
        .map(|n| n["notification"]["assignments"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![3, 1]);
}

fn users_of(notification: &Value, key: &str) -> Vec<Value> {
    notification["notification"][key]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Reference 3.11 and 7.7: USER_MANAGEMENT for CREATE, UPDATE and RETIRE
/// with each user's new state, FAILURE with the error, and 9641 for a
/// Managed Apple Account already linked to another user.
#[tokio::test]
async fn user_management_notifications_carry_each_users_new_state() {
    let s = start(
        SimConfig {
            notifications: NotificationFaults {
                concurrency: 1,
                ..config().notifications
            },
            ..config()
        },
        vec![],
    )
    .await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["USER_MANAGEMENT"]).await;
    let created = s
        .event(
            "/users/create",
            json!({"users": [
                {"clientUserId": "client-101", "email": "ben@example.com"},
                {"clientUserId": "client-100", "email": "ana@example.com", "managedAppleId": "ana@appleschool.example.com"},
                {"clientUserId": "client-102", "managedAppleId": "ANA@appleschool.example.com"},
            ]}),
        )
        .await;
    s.idle().await;
    let notes = receiver.of_type("USER_MANAGEMENT");
    let success: Vec<&Value> = notes
        .iter()
        .filter(|n| n["notification"]["result"] == "SUCCESS")
        .collect();
    assert_eq!(success.len(), 1);
    assert_eq!(success[0]["notification"]["eventId"], created.as_str());
    assert_eq!(success[0]["notification"]["type"], "CREATE");
    let users = users_of(success[0], "users");
    assert_eq!(users[0]["clientUserId"], "client-101");
    assert_eq!(users[0]["status"], "Registered");
    assert_eq!(users[0]["email"], "ben@example.com");
    assert_eq!(users[0]["inviteCode"].as_str().unwrap().len(), 32);
    assert!(users[0].get("idHash").is_none());
    assert_eq!(users[1]["status"], "Associated");
    assert!(users[1]["idHash"].is_string());
    assert!(users[1].get("inviteCode").is_none());
    let failure: Vec<&Value> = notes
        .iter()
        .filter(|n| n["notification"]["result"] == "FAILURE")
        .collect();
    assert_eq!(failure.len(), 1);
    assert_eq!(failure[0]["notification"]["error"]["errorNumber"], 9641);
    assert_eq!(
        users_of(failure[0], "users")[0]["clientUserId"],
        "client-102"
    );
    assert_eq!(s.status(&created).await["failures"][0]["errorNumber"], 9641);

    receiver.clear();
    s.run(
        "/users/update",
        json!({"users": [{"clientUserId": "client-101", "email": "ben.new@example.com", "managedAppleId": "ben@appleschool.example.com"}]}),
    )
    .await;
    s.run(
        "/users/retire",
        json!({"users": [{"clientUserId": "client-100"}]}),
    )
    .await;
    let notes = receiver.of_type("USER_MANAGEMENT");
    assert_eq!(notes.len(), 2);
    assert_eq!(notes[0]["notification"]["type"], "UPDATE");
    let updated = &users_of(&notes[0], "users")[0];
    assert_eq!(
        (updated["email"].as_str(), updated["status"].as_str()),
        (Some("ben.new@example.com"), Some("Associated"))
    );
    assert!(updated["idHash"].is_string());
    assert_eq!(notes[1]["notification"]["type"], "RETIRE");
    assert_eq!(users_of(&notes[1], "users")[0]["status"], "Retired");

    // Retired, client-100 no longer holds its Managed Apple Account.
    let relinked = s
        .run(
            "/users/create",
            json!({"users": [{"clientUserId": "client-103", "managedAppleId": "ana@appleschool.example.com"}]}),
        )
        .await;
    assert_eq!(relinked["eventStatus"], "COMPLETE", "{relinked}");
}

/// The acceptance knob in `all` mode: users waiting accept when it is
/// switched on, each user registered later right after its CREATE; one
/// USER_ASSOCIATED per at most maxItems users, with the payload of 7.8.
#[tokio::test]
async fn invitations_accepted_all_at_once() {
    let s = start(
        SimConfig {
            notifications: NotificationFaults {
                max_items: 2,
                concurrency: 1,
                ..config().notifications
            },
            ..config()
        },
        vec![],
    )
    .await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["USER_MANAGEMENT", "USER_ASSOCIATED"])
        .await;
    s.run(
        "/users/create",
        json!({"users": [
            {"clientUserId": "u1", "email": "u1@example.com"},
            {"clientUserId": "u2"},
            {"clientUserId": "m1", "managedAppleId": "m1@appleschool.example.com"},
        ]}),
    )
    .await;
    let before = s.get("/users").await.body["versionId"]
        .as_str()
        .unwrap()
        .to_string();
    let codes: HashMap<String, String> = s.get("/users").await.body["users"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| {
            Some((
                u["clientUserId"].as_str()?.to_string(),
                u["inviteCode"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert_eq!(codes.len(), 2, "the managed user has no invitation");
    assert!(receiver.of_type("USER_ASSOCIATED").is_empty());
    let (_, view) = control(&s, "/invitations/acceptance", Value::Null).await;
    assert_eq!(
        (view["mode"].as_str(), view["waiting"].as_u64()),
        (Some("off"), Some(2))
    );

    let (status, view) = control(&s, "/invitations/acceptance", json!({"mode": "all"})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(
        (view["mode"].as_str(), view["waiting"].as_u64()),
        (Some("all"), Some(0))
    );
    s.idle().await;
    let associated = receiver.of_type("USER_ASSOCIATED");
    assert_eq!(associated.len(), 1);
    let users = users_of(&associated[0], "associatedUsers");
    assert_eq!(users.len(), 2);
    for user in &users {
        let id = user["clientUserId"].as_str().unwrap();
        assert_eq!(user["status"], "Associated");
        assert_eq!(user["inviteCode"], codes[id].as_str(), "the code accepted");
        assert!(user["idHash"].is_string());
    }
    assert_eq!(users[0]["email"], "u1@example.com");
    assert!(associated[0]["notification"].get("eventId").is_none());
    let changed = s.get(&format!("/users?sinceVersionId={before}")).await.body;
    assert_eq!(changed["size"], 2, "sinceVersionId shows the acceptances");

    // From now on each new user accepts right after its CREATE is notified.
    receiver.clear();
    s.run(
        "/users/create",
        json!({"users": [{"clientUserId": "u3"}, {"clientUserId": "u4"}, {"clientUserId": "u5"}]}),
    )
    .await;
    let order: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|e| e["notificationType"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        order,
        vec![
            "USER_MANAGEMENT",
            "USER_MANAGEMENT",
            "USER_ASSOCIATED",
            "USER_ASSOCIATED"
        ],
        "three users in chunks of maxItems 2, acceptances after the CREATE's"
    );
    let statuses: Vec<String> = s.get("/users?activeOnly=true").await.body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["status"].as_str().unwrap().to_string())
        .collect();
    assert!(statuses.iter().all(|st| st == "Associated"), "{statuses:?}");

    let (status, refused) = control(
        &s,
        "/invitations/acceptance",
        json!({"mode": "rate", "perSecond": 0}),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
}

/// `rate` mode: users accept over time until none waits; a one-off `all`
/// through `/_sim/invitations` accepts the rest at once.
#[tokio::test]
async fn invitations_accepted_at_a_rate() {
    let s = start(config(), vec![]).await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["USER_ASSOCIATED"]).await;
    let ids: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    s.create_users(&refs).await;
    s.sim
        .set_invitation_acceptance(vppd::sim::InvitationAcceptance::Rate { per_second: 40.0 })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let accepted: usize = receiver
            .of_type("USER_ASSOCIATED")
            .iter()
            .map(|n| users_of(n, "associatedUsers").len())
            .sum();
        if accepted == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "only {accepted} of 6 accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted_order: Vec<String> = receiver
        .of_type("USER_ASSOCIATED")
        .iter()
        .flat_map(|n| users_of(n, "associatedUsers"))
        .map(|u| u["clientUserId"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = accepted_order.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "each user once");

    s.sim
        .set_invitation_acceptance(vppd::sim::InvitationAcceptance::Off)
        .unwrap();
    s.create_users(&["late1", "late2"]).await;
    let (status, one_off) = control(&s, "/invitations", json!({"all": true})).await;
    assert_eq!(status, 200, "{one_off}");
    assert_eq!(one_off["accepted"], json!(["late1", "late2"]));
    let (status, _) = control(&s, "/invitations", json!({})).await;
    assert_eq!(status, 400);
}

/// Reference 7.2 ("events caused by people"): a change made by hand in
/// Apple School/Business Manager is an event the client never sent, with
/// its own eventId in ASSET_MANAGEMENT and Event Status, a versionId bump
/// that Get Assignments `sinceVersionId` shows (additions only), and
/// ASSET_COUNT only when the number of licenses owned changes.
#[tokio::test]
async fn changes_by_hand_are_events_the_client_never_sent() {
    let s = start(
        SimConfig {
            notifications: NotificationFaults {
                concurrency: 1,
                ..config().notifications
            },
            ..config()
        },
        vec![
            SimAsset::app("1", Some(5)),
            SimAsset::app("2", Some(5)),
            book("9", Some(5)),
        ],
    )
    .await;
    s.run(
        "/assets/associate",
        json!({"assets": [{"adamId": "1"}], "serialNumbers": ["A", "B"]}),
    )
    .await;
    let receiver = Receiver::start().await;
    s.subscribe(&receiver, &["ASSET_MANAGEMENT", "ASSET_COUNT"])
        .await;
    let version = s.get("/assignments").await.body["versionId"]
        .as_str()
        .unwrap()
        .to_string();
    s.sim.clear_requests();

    let (status, made) = control(
        &s,
        "/changes",
        json!({"action": "associate", "assets": [{"adamId": "1"}], "serialNumbers": ["C"]}),
    )
    .await;
    assert_eq!(status, 200, "{made}");
    let record = &made["changes"][0];
    assert_eq!(record["state"], "made");
    assert_eq!(record["token"], fingerprint(&s.token).as_str());
    let added = record["eventId"].as_str().unwrap().to_string();
    s.idle().await;
    let status = s.status(&added).await;
    assert_eq!(
        (
            status["eventType"].as_str(),
            status["eventStatus"].as_str(),
            status["numCompleted"].as_i64()
        ),
        (Some("ASSOCIATE"), Some("COMPLETE"), Some(1))
    );
    let since = s
        .get(&format!("/assignments?sinceVersionId={version}"))
        .await
        .body;
    assert_eq!(since["size"], 1);
    assert_eq!(since["assignments"][0]["serialNumber"], "C");
    let version = since["versionId"].as_str().unwrap().to_string();

    for (action, serial) in [("disassociate", "A"), ("revoke", "B")] {
        let mut change = json!({"action": action, "serialNumbers": [serial]});
        if action == "disassociate" {
            change["assets"] = json!([{"adamId": "1"}]);
        }
        let (status, made) = control(&s, "/changes", change).await;
        assert_eq!(status, 200, "{made}");
    }
    // A purchase is not an event: it does not queue behind the revoke.
    s.idle().await;
    let (_, bought) = control(
        &s,
        "/changes",
        json!({"action": "licenses", "assets": [{"adamId": "2"}], "delta": 3}),
    )
    .await;
    assert!(bought["changes"][0]["eventId"].is_null());
    s.idle().await;

    let notes = receiver.delivered();
    let summary: Vec<(String, String, String)> = notes
        .iter()
        .map(|n| {
            let p = &n["notification"];
            let first = &p["assignments"][0];
            (
                n["notificationType"].as_str().unwrap().to_string(),
                p["type"].as_str().unwrap_or("").to_string(),
                first["serialNumber"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| p["countDelta"].to_string()),
            )
        })
        .collect();
    let expect = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        summary,
        vec![
            expect("ASSET_MANAGEMENT", "ASSOCIATE", "C"),
            expect("ASSET_MANAGEMENT", "DISASSOCIATE", "A"),
            expect("ASSET_MANAGEMENT", "REVOKE", "B"),
            expect("ASSET_COUNT", "", "3"),
        ]
    );
    assert_eq!(notes[0]["notification"]["eventId"], added.as_str());
    let listed: Vec<Value> = control(&s, "/changes", Value::Null)
        .await
        .1
        .as_array()
        .unwrap()
        .clone();
    let ids: Vec<&str> = listed
        .iter()
        .filter_map(|r| r["eventId"].as_str())
        .collect();
    for (note, id) in notes[..3].iter().zip(&ids) {
        assert_eq!(note["notification"]["eventId"], *id);
    }
    assert!(listed.iter().all(|r| r["state"] == "made"));
    assert!(
        s.sim.requests().iter().all(|r| r.method == "GET"),
        "no client request made these changes"
    );
    assert_eq!(s.pairs(), [pair("1", "C")].into());
    assert_eq!(
        s.sim.asset_counts(&s.token, "2", "STDQ"),
        Some((0, Some(8)))
    );
    let since = s
        .get(&format!("/assignments?sinceVersionId={version}"))
        .await
        .body;
    assert_eq!(since["size"], 0, "removals do not show (9.17)");

    // Refused as a whole, nothing made.
    for bad in [
        json!({"action": "associate", "assets": [{"adamId": "9"}], "serialNumbers": ["D"]}),
        json!({"action": "associate", "assets": [{"adamId": "1"}]}),
        json!({"action": "revoke", "serialNumbers": ["C"], "token": "nope"}),
        json!({"action": "associate", "assets": [{"adamId": "1"}], "serialNumbers": ["D"], "after": "later"}),
        json!({"action": "sell"}),
    ] {
        let (status, answer) = control(&s, "/changes", bad.clone()).await;
        assert_eq!(status, 400, "{bad} -> {answer}");
        assert!(answer["error"].is_string());
    }
    assert_eq!(s.sim.changes_by_hand().len(), 4);

    // Scheduled: listed at once, made when due.
    let (_, scheduled) = control(
        &s,
        "/changes",
        json!({"action": "associate", "assets": [{"adamId": "1"}], "serialNumbers": ["LATER"], "after": "150ms"}),
    )
    .await;
    assert_eq!(scheduled["changes"][0]["state"], "scheduled");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.pairs().contains(&pair("1", "LATER")) {
        assert!(Instant::now() < deadline, "the scheduled change never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.sim.changes_by_hand()[4].state, "made");
}

/// The knobs from the command line reach the running simulator's control
/// endpoints; a `--change` is made at start.
#[tokio::test]
async fn the_cli_sets_the_knobs_and_makes_changes_by_hand() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().unwrap();
    let token = token_text(30);
    let path = dir.path().join("main.vpptoken");
    std::fs::write(&path, &token).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args(["sim", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&path)
        .args(["--hold-pending", "2", "--hold-after-tasks", "1"])
        .args(["--accept-invitations", "12.5"])
        .args([
            "--change",
            "associate assets=361309726 serials=HAND-1,HAND-2",
        ])
        .args(["--change", "licenses assets=408709785 delta=1 after=1h"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("vppd sim listening on "))
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .expect("the simulator never said where it listens")
        .unwrap()
        .unwrap();
    let base = line
        .trim_start_matches("vppd sim listening on ")
        .to_string();
    let root = base.trim_end_matches("/mdm/v2").to_string();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |url: String| {
        let http = http.clone();
        let token = token.clone();
        async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let hold = get(format!("{root}/_sim/hold")).await;
    assert_eq!(
        (hold["next"].as_u64(), hold["afterTasks"].as_u64()),
        (Some(2), Some(1))
    );
    let acceptance = get(format!("{root}/_sim/invitations/acceptance")).await;
    assert_eq!(acceptance["mode"], "rate");
    assert_eq!(acceptance["perSecond"], 12.5);
    let changes = get(format!("{root}/_sim/changes")).await;
    let states: Vec<&str> = changes
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["made", "scheduled"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = get(format!("{base}/assignments?adamId=361309726")).await;
        if held["size"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{held}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(child.id(), Signal::Term);
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        exit.success(),
        "a change still scheduled does not hold up the exit"
    );
}
