//! Tenant isolation, as an attacker holding one customer's sToken would
//! try it: each customer reads its own notification secret back from
//! Apple (its location's client config), and with it tries to speak for
//! another customer. Two customers, `main` and `east`, over real HTTP
//! against the simulator.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use vppd::apple::token::SToken;
use vppd::apple::{Client, ClientOptions};
use vppd::domain::job::JobState;
use vppd::runtime::metrics::Metrics;
use vppd::sim::{HoldSettings, SimAsset, SimToken};

/// What a customer reads back from Apple with its own sToken.
async fn client_config(env: &Env, stoken: &str) -> (String, String) {
    let opts = ClientOptions::new(&env.sim.base_url(), "attacker", 10, Duration::from_secs(5));
    let client = Client::new(
        opts,
        SToken::parse(stoken).unwrap(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let config = client.client_config().await.unwrap();
    (
        config.uid,
        config.notification_auth_token.unwrap_or_default(),
    )
}

async fn post(env: &Env, secret: &str, body: &serde_json::Value) -> u16 {
    reqwest::Client::new()
        .post(env.notifications_url())
        .bearer_auth(secret)
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn forged_count(admin: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("vppd_notifications_total{") && l.contains("outcome=\"forged\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_customer_cannot_speak_for_another_with_its_own_secret() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(100))],
    )
    .await;
    let east_stoken = SToken::encode(
        &format!("east-{}", uuid::Uuid::new_v4()),
        time::OffsetDateTime::now_utc() + time::Duration::days(200),
        "East",
    );
    env.sim
        .add_token(SimToken {
            stoken: east_stoken.clone(),
            assets: vec![SimAsset::app(&adam(0), Some(100))],
            read_only: false,
        })
        .unwrap();
    let (_config, mut child) = env.spawn_quiet().await;
    wait_token(&env.admin(), "main", "ready").await;
    let r = reqwest::Client::new()
        .put(format!("{}/v1/tokens/east", env.admin()))
        .json(&serde_json::json!({"stoken": east_stoken}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    wait_token(&env.admin(), "east", "ready").await;

    let main_stoken = std::fs::read_to_string(&env.token_file).unwrap();
    let (main_uid, main_secret) = client_config(&env, main_stoken.trim()).await;
    let (east_uid, east_secret) = client_config(&env, &east_stoken).await;
    assert!(main_secret.len() >= 43, "a generated secret of 32 bytes");
    assert_ne!(main_secret, east_secret, "each token its own secret");
    assert_ne!(main_secret, env.secret(), "not the older shared one");

    // East's job: its event stays at Apple, unprocessed.
    env.sim.set_hold(HoldSettings {
        all: true,
        next: 0,
        after_tasks: 0,
    });
    let serials = serials("E", 3);
    let mut job = job("east-job", &[adam(0)], &[], &serials);
    job["token"] = "east".into();
    let (code, body) = post_job(&env.admin(), &job).await;
    assert_eq!(code, 202, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let event_id = loop {
        if let Some(e) = env.sim.held_events().first() {
            break e.event_id.clone();
        }
        assert!(std::time::Instant::now() < deadline, "no event held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Recorded by vppd before anyone can name it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while job_status(&env.admin(), "east-job")
        .await
        .unwrap()
        .requests
        .submitted
        == 0
    {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let confirm = |n: &str, uid: &str| {
        serde_json::json!({
            "notificationId": n, "notificationType": "ASSET_MANAGEMENT", "uId": uid,
            "notification": {"eventId": event_id, "type": "ASSOCIATE", "result": "SUCCESS",
                "assignments": serials.iter().map(|s| serde_json::json!(
                    {"adamId": adam(0), "pricingParam": "STDQ", "serialNumber": s})).collect::<Vec<_>>()}
        })
    };
    // Main's secret, east's uId and east's event.
    assert_eq!(
        post(&env, &main_secret, &confirm("f-1", &east_uid)).await,
        403
    );
    // Main's secret and uId, east's event.
    assert_eq!(
        post(&env, &main_secret, &confirm("f-2", &main_uid)).await,
        403
    );
    // Main's secret, east's uId, a count change for east.
    let count = serde_json::json!({
        "notificationId": "f-3", "notificationType": "ASSET_COUNT", "uId": east_uid,
        "notification": {"adamId": adam(0), "pricingParam": "STDQ", "countDelta": 50}
    });
    assert_eq!(post(&env, &main_secret, &count).await, 403);
    // A secret no token has.
    assert_eq!(
        post(&env, "not-a-secret-of-anyone", &confirm("f-4", &east_uid)).await,
        401
    );
    assert_eq!(forged_count(&env.admin()).await, 3.0);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = job_status(&env.admin(), "east-job").await.unwrap();
    assert_eq!(
        s.assignments.confirmed, 0,
        "forged confirmations applied: {s:?}"
    );
    assert_eq!(
        s.installs.released, 0,
        "installs released on a forgery: {s:?}"
    );
    assert!(env.commands().is_empty());

    // East's own notifications, under east's secret, finish the job.
    env.sim.set_hold(HoldSettings::default());
    env.sim.release_held(None);
    let s = wait_job(&env.admin(), "east-job", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.installs.released, 3);

    // Rotation: the new secret is registered with east's location; the
    // old one is still accepted meanwhile.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/tokens/east/rotate-secret", env.admin()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let rotated = loop {
        let (_, secret) = client_config(&env, &east_stoken).await;
        if secret != east_secret {
            break secret;
        }
        assert!(std::time::Instant::now() < deadline, "never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(rotated.len() >= 43);
    let own_count = |n: &str| {
        serde_json::json!({
            "notificationId": n, "notificationType": "ASSET_COUNT", "uId": east_uid,
            "notification": {"adamId": adam(0), "pricingParam": "STDQ", "countDelta": 0}
        })
    };
    assert_eq!(post(&env, &east_secret, &own_count("r-1")).await, 200);
    assert_eq!(post(&env, &rotated, &own_count("r-2")).await, 200);

    // Deleted: its secret is answered and ignored for a while.
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/tokens/east", env.admin()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(post(&env, &rotated, &own_count("d-1")).await, 200);
    let text = reqwest::get(format!("{}/metrics", env.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("vppd_notifications_total{")
                && l.contains("outcome=\"deleted\"")
                && l.ends_with(" 1")),
        "{text}"
    );

    signal(child.id(), Signal::Term);
    assert!(child.wait().unwrap().success());
}
