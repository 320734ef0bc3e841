//! examples/mdm_receiver.rs, exercised: the signature exactly as the
//! contract defines it, stale and forged POSTs refused, repeats dropped
//! (also across a restart), Apple's command plists, and the hand-off to
//! NanoMDM, MicroMDM and a queue over real HTTP; then the real daemon
//! releasing into it.

mod common;

#[allow(dead_code)]
#[path = "../examples/mdm_receiver.rs"]
mod receiver;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use receiver::*;
use vppd::runtime::http::{self, Server};
use vppd::sim::SimAsset;

const SECRET: &str = "s3cret";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn verifier() -> Verifier {
    // Surrounding whitespace in the secret file is ignored, as vppd does.
    Verifier::new(&format!("  {SECRET}\n"), Duration::from_secs(300))
}

#[test]
fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
    let body = br#"{"commands":[]}"#;
    // Computed independently: HMAC-SHA256(key "s3cret", "1700000000.{body}").
    let known = "sha256=a3e0c8cf8da6811cd66a760532aa0e865a7fd995c3a229af11ed0caafdae6e19";
    assert_eq!(verifier().sign(1_700_000_000, body), known);
    let v = verifier();
    let at = 1_700_000_000;
    assert_eq!(v.verify(Some("1700000000"), Some(known), body, at), Ok(()));
    assert_eq!(
        v.verify(Some("1700000000"), Some(known), body, at + 300),
        Ok(())
    );
    // Stale, or from the future beyond the skew: a replay.
    assert_eq!(
        v.verify(Some("1700000000"), Some(known), body, at + 301),
        Err(Refusal::Stale { skew_secs: 301 })
    );
    assert_eq!(
        v.verify(Some("1700000000"), Some(known), body, at - 301),
        Err(Refusal::Stale { skew_secs: 301 })
    );
    // Any change to the body, the timestamp or the secret.
    assert_eq!(
        v.verify(Some("1700000000"), Some(known), br#"{"commands":[ ]}"#, at),
        Err(Refusal::BadSignature)
    );
    assert_eq!(
        v.verify(Some("1700000001"), Some(known), body, at),
        Err(Refusal::BadSignature)
    );
    let other = Verifier::new("other", Duration::from_secs(300));
    assert_eq!(
        other.verify(Some("1700000000"), Some(known), body, at),
        Err(Refusal::BadSignature)
    );
    assert_eq!(
        v.verify(
            Some("1700000000"),
            Some(&known.replace("sha256=", "")),
            body,
            at
        ),
        Err(Refusal::BadSignature)
    );
    assert_eq!(
        v.verify(None, Some(known), body, at),
        Err(Refusal::MissingHeaders)
    );
    assert_eq!(
        v.verify(Some("yesterday"), Some(known), body, at),
        Err(Refusal::BadTimestamp)
    );
}

#[test]
fn commands_become_apple_mdm_commands() {
    let install = plist(
        "6f1c2b9e-0000-4000-8000-000000000001",
        &MdmCommand::InstallApplication {
            itunes_store_id: 361309726,
        },
    );
    assert_eq!(
        install,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>Command</key>
	<dict>
		<key>RequestType</key>
		<string>InstallApplication</string>
		<key>iTunesStoreID</key>
		<integer>361309726</integer>
		<key>ManagementFlags</key>
		<integer>1</integer>
		<key>Options</key>
		<dict>
			<key>PurchaseMethod</key>
			<integer>1</integer>
		</dict>
	</dict>
	<key>CommandUUID</key>
	<string>6f1c2b9e-0000-4000-8000-000000000001</string>
</dict>
</plist>
"#
    );
    let invite = plist(
        "u",
        &MdmCommand::InviteToProgram {
            invitation_url: "https://example.com/invite?a=1&b=<2>".into(),
        },
    );
    assert!(invite.contains("<string>InviteToProgram</string>"));
    assert!(invite.contains("<key>ProgramID</key>\n\t\t<string>com.apple.cloudvpp</string>"));
    assert!(
        invite.contains("https://example.com/invite?a=1&amp;b=&lt;2&gt;"),
        "{invite}"
    );

    let catalog = HashMap::from([("361309726".to_string(), "com.example.pages".to_string())]);
    let c = |json: serde_json::Value| serde_json::from_value::<VppdCommand>(json).unwrap();
    assert_eq!(
        to_mdm(
            &c(serde_json::json!({"commandUuid": "a", "adamId": "361309726", "serialNumber": "S"})),
            &catalog
        ),
        Ok(MdmCommand::InstallApplication {
            itunes_store_id: 361309726
        })
    );
    assert_eq!(
        to_mdm(
            &c(
                serde_json::json!({"commandUuid": "a", "requestType": "RemoveApplication", "adamId": "361309726", "serialNumber": "S"})
            ),
            &catalog
        ),
        Ok(MdmCommand::RemoveApplication {
            identifier: "com.example.pages".into()
        })
    );
    assert!(
        to_mdm(&c(serde_json::json!({"commandUuid": "a", "requestType": "RemoveApplication", "adamId": "1", "serialNumber": "S"})), &catalog)
            .unwrap_err()
            .contains("not in the catalog")
    );
    assert_eq!(
        micromdm_json(
            "UDID-1",
            &MdmCommand::InstallApplication { itunes_store_id: 5 }
        ),
        serde_json::json!({"udid": "UDID-1", "request_type": "InstallApplication", "itunes_store_id": 5, "management_flags": 1, "options": {"purchase_method": 1}})
    );
}

fn batch(uuids: &[(&str, &str)]) -> Vec<u8> {
    serde_json::json!({"commands": uuids.iter().map(|(uuid, serial)| serde_json::json!({
        "commandUuid": uuid, "jobId": "j", "eventId": "e", "adamId": "361309726",
        "pricingParam": "STDQ", "serialNumber": serial, "clientUserId": null
    })).collect::<Vec<_>>()})
    .to_string()
    .into_bytes()
}

async fn post(url: &str, body: Vec<u8>, timestamp: Option<u64>) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "application/json");
    if let Some(ts) = timestamp {
        req = req
            .header("X-Vppd-Timestamp", ts.to_string())
            .header("X-Vppd-Signature", verifier().sign(ts, &body));
    }
    let r = req.body(body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

fn receiver(mdm: Destination, seen_file: &std::path::Path, signed: bool) -> Receiver {
    Receiver {
        verifier: signed.then(verifier),
        enrollments: HashMap::from([
            ("SERIAL-1".to_string(), "UDID-1".to_string()),
            ("SERIAL-2".to_string(), "UDID-2".to_string()),
        ]),
        catalog: HashMap::new(),
        mdm,
        seen: tokio::sync::Mutex::new(Seen::open(Some(seen_file)).unwrap()),
    }
}

#[tokio::test]
async fn a_queue_gets_each_command_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("queue");
    let seen = dir.path().join("seen");
    let start = || async {
        let r = receiver(Destination::Queue { dir: queue.clone() }, &seen, true);
        Server::bind("127.0.0.1:0", Arc::new(r)).await.unwrap()
    };
    let server = start().await;
    let url = format!("http://{}/vpp-installs", server.local_addr());
    let body = batch(&[
        ("uuid-1", "SERIAL-1"),
        ("uuid-2", "SERIAL-2"),
        ("uuid-3", "NOBODY"),
    ]);

    assert_eq!(post(&url, body.clone(), None).await.0, 401, "unsigned");
    assert_eq!(
        post(&url, body.clone(), Some(now() - 3600)).await.0,
        401,
        "stale"
    );
    let (code, outcome) = post(&url, body.clone(), Some(now())).await;
    assert_eq!(code, 200);
    assert_eq!(
        outcome,
        serde_json::json!({"enqueued": 2, "repeats": 0, "skipped": 1})
    );
    let file = queue.join("UDID-1").join("uuid-1.plist");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        plist(
            "uuid-1",
            &MdmCommand::InstallApplication {
                itunes_store_id: 361309726
            }
        )
    );
    // vppd's retry of the same batch (fresh timestamp, same uuids).
    let (_, outcome) = post(&url, body.clone(), Some(now())).await;
    assert_eq!(
        outcome,
        serde_json::json!({"enqueued": 0, "repeats": 3, "skipped": 0})
    );
    server.shutdown().await;

    std::fs::remove_file(&file).unwrap();
    let server = start().await;
    let url = format!("http://{}/vpp-installs", server.local_addr());
    let (_, outcome) = post(&url, body, Some(now())).await;
    assert_eq!(outcome["repeats"], 3, "the seen file outlives a restart");
    assert!(!file.exists());
    server.shutdown().await;
}

/// Method, path, Authorization header and body of one request.
type Call = (String, String, Option<String>, String);

/// An MDM's API, recording what it was sent; answers `status`.
struct FakeMdmApi {
    status: std::sync::atomic::AtomicU16,
    seen: Mutex<Vec<Call>>,
}

impl http::Handler for FakeMdmApi {
    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<http::Body> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = http::read_body(req.into_body(), 1 << 20).await.unwrap();
        self.seen.lock().unwrap().push((
            method,
            path,
            auth,
            String::from_utf8(body.to_vec()).unwrap(),
        ));
        let status = self.status.load(std::sync::atomic::Ordering::SeqCst);
        http::json(
            hyper::StatusCode::from_u16(status).unwrap(),
            &serde_json::json!({}),
        )
    }
}

async fn fake_mdm() -> (Arc<FakeMdmApi>, Server) {
    let api = Arc::new(FakeMdmApi {
        status: std::sync::atomic::AtomicU16::new(200),
        seen: Mutex::new(Vec::new()),
    });
    let server = Server::bind("127.0.0.1:0", api.clone()).await.unwrap();
    (api, server)
}

fn basic(user: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:api-key"))
    )
}

#[tokio::test]
async fn nanomdm_gets_the_plist_and_a_refusal_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (api, mdm_server) = fake_mdm().await;
    let mdm = Destination::NanoMdm {
        url: format!("http://{}", mdm_server.local_addr()),
        api_key: "api-key".into(),
        http: reqwest::Client::new(),
    };
    let server = Server::bind(
        "127.0.0.1:0",
        Arc::new(receiver(mdm, &dir.path().join("seen"), true)),
    )
    .await
    .unwrap();
    let url = format!("http://{}/", server.local_addr());
    let body = batch(&[("uuid-9", "SERIAL-2")]);

    // NanoMDM down: not acknowledged, so vppd retries, and nothing is
    // remembered as handed on.
    api.status.store(500, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(post(&url, body.clone(), Some(now())).await.0, 503);
    api.status.store(200, std::sync::atomic::Ordering::SeqCst);
    let (code, outcome) = post(&url, body, Some(now())).await;
    assert_eq!((code, outcome["enqueued"].as_u64()), (200, Some(1)));
    let calls = api.seen.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    let (method, path, auth, plist_text) = &calls[1];
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("PUT", "/v1/enqueue/UDID-2")
    );
    assert_eq!(auth.as_deref(), Some(basic("nanomdm").as_str()));
    assert_eq!(
        plist_text,
        &plist(
            "uuid-9",
            &MdmCommand::InstallApplication {
                itunes_store_id: 361309726
            }
        )
    );
    server.shutdown().await;
    mdm_server.shutdown().await;
}

#[tokio::test]
async fn micromdm_gets_its_json() {
    let dir = tempfile::tempdir().unwrap();
    let (api, mdm_server) = fake_mdm().await;
    let mdm = Destination::MicroMdm {
        url: format!("http://{}", mdm_server.local_addr()),
        api_key: "api-key".into(),
        http: reqwest::Client::new(),
    };
    let server = Server::bind(
        "127.0.0.1:0",
        Arc::new(receiver(mdm, &dir.path().join("seen"), true)),
    )
    .await
    .unwrap();
    let url = format!("http://{}/", server.local_addr());
    let (code, _) = post(&url, batch(&[("uuid-5", "SERIAL-1")]), Some(now())).await;
    assert_eq!(code, 200);
    let calls = api.seen.lock().unwrap().clone();
    let (method, path, auth, json) = &calls[0];
    assert_eq!((method.as_str(), path.as_str()), ("POST", "/v1/commands"));
    assert_eq!(auth.as_deref(), Some(basic("micromdm").as_str()));
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(
        json,
        micromdm_json(
            "UDID-1",
            &MdmCommand::InstallApplication {
                itunes_store_id: 361309726
            }
        )
    );
    server.shutdown().await;
    mdm_server.shutdown().await;
}

/// The daemon releases a real job into the receiver, which queues one plist
/// per confirmed assignment. (This daemon is configured without
/// `[install] signing_secret_file`, so the receiver takes unsigned POSTs;
/// signatures are checked above, against the contract.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daemon_releases_into_the_receiver() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![
            SimAsset::app(&adam(0), Some(10)),
            SimAsset::app(&adam(1), Some(10)),
        ],
    )
    .await;
    let queue = env.dir.path().join("queue");
    let mut r = receiver(
        Destination::Queue { dir: queue.clone() },
        &env.dir.path().join("seen"),
        false,
    );
    let devices = serials("M", 3);
    r.enrollments = devices
        .iter()
        .map(|s| (s.clone(), format!("UDID-{s}")))
        .collect();
    let server = Server::bind("127.0.0.1:0", Arc::new(r)).await.unwrap();
    let text = env.config_text(&PATIENT_TRACKING, "").replace(
        &format!(
            "http://{}/installs",
            env.sink_server.as_ref().unwrap().local_addr()
        ),
        &format!("http://{}/vpp-installs", server.local_addr()),
    );
    let path = env.dir.path().join("receiver.toml");
    std::fs::write(&path, &text).unwrap();
    let config = vppd::runtime::config::Config::parse(&text, &path).unwrap();
    let daemon = env.start_daemon_on(config).await;
    wait_ready(&env.admin()).await;
    let (code, _) = post_job(
        &env.admin(),
        &job("to-mdm", &[adam(0), adam(1)], &[], &devices),
    )
    .await;
    assert_eq!(code, 202);
    let done = wait_job(&env.admin(), "to-mdm", Duration::from_secs(60)).await;
    assert_eq!(done.installs.released, 6, "{done:?}");
    daemon.shutdown().await;
    server.shutdown().await;
    let mut files = 0;
    for s in &devices {
        for entry in std::fs::read_dir(queue.join(format!("UDID-{s}"))).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            assert!(
                text.contains("<string>InstallApplication</string>"),
                "{text}"
            );
            files += 1;
        }
    }
    assert_eq!(files, 6);
}
