//! Tokens at runtime, through the daemon against the simulator: tokens
//! added, renewed and deleted while vppd runs; an expired and a
//! foreign-owned token beside healthy ones; a location taken by another
//! MDM mid-run; foreign notifications; restart keeps runtime tokens.

mod common;

use std::time::Duration;

use common::*;
use vppd::apple::token::SToken;
use vppd::domain::job::JobState;
use vppd::sim::{SimAsset, SimToken};

fn stoken(days: i64, org: &str) -> String {
    SToken::encode(
        &format!("tenant-{}", uuid::Uuid::new_v4()),
        time::OffsetDateTime::now_utc() + time::Duration::days(days),
        org,
    )
}

/// A location in the simulator with one app of `licenses` licenses.
fn add_location(env: &Env, stoken: &str, licenses: u32) {
    env.sim
        .add_token(SimToken {
            stoken: stoken.to_string(),
            assets: vec![SimAsset::app(&adam(0), Some(licenses))],
            read_only: false,
        })
        .unwrap();
}

async fn put_token(admin: &str, name: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .put(format!("{admin}/v1/tokens/{name}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn get(admin: &str, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("{admin}{path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn delete(admin: &str, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .delete(format!("{admin}{path}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

fn job_on(id: &str, token: &str, serials: &[String]) -> serde_json::Value {
    let mut j = job(id, &[adam(0)], &[], serials);
    j["token"] = token.into();
    j
}

async fn metrics(admin: &str) -> String {
    reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_added_renewed_and_deleted_at_runtime_and_survive_a_restart() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(50))],
    )
    .await;
    let acme = stoken(300, "Acme School");
    add_location(&env, &acme, 50);
    let other = stoken(300, "Other School");
    add_location(&env, &other, 50);
    let admin = env.admin();
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;

    // The config file's token is listed, and cannot be deleted.
    let (code, list) = get(&admin, "/v1/tokens").await;
    assert_eq!(code, 200);
    assert_eq!(list["tokens"][0]["name"], "main", "{list}");
    assert_eq!(delete(&admin, "/v1/tokens/main").await.0, 409);
    assert_eq!(get(&admin, "/v1/tokens/acme").await.0, 404);
    // A job on a token vppd does not know is still refused.
    assert_eq!(
        post_job(&admin, &job_on("early", "acme", &serials("E", 2)))
            .await
            .0,
        400
    );

    // Added: 201, registered, its jobs run.
    let (code, doc) = put_token(&admin, "acme", serde_json::json!({"stoken": acme})).await;
    assert_eq!(code, 201, "{doc}");
    assert!(
        doc.get("stoken").is_none(),
        "the sToken was returned: {doc}"
    );
    assert!(!doc.to_string().contains(&acme));
    let ready = wait_token(&admin, "acme", "ready").await;
    assert_eq!(ready["locationName"], "Acme School", "{ready}");
    assert!(ready["uId"].is_string());
    assert!(ready["expiresAt"].as_str().unwrap().ends_with('Z'));
    assert!(ready["limits"]["maxSerialNumbers"].is_number(), "{ready}");
    let (code, _) = post_job(&admin, &job_on("a1", "acme", &serials("A", 5))).await;
    assert_eq!(code, 202);
    let s = wait_job(&admin, "a1", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(env.sim.assignments(&acme).len(), 5);

    // Another location under the same name: 409, nothing changes.
    let (code, doc) = put_token(&admin, "acme", serde_json::json!({"stoken": other})).await;
    assert_eq!(code, 409, "{doc}");
    assert!(doc["error"].as_str().unwrap().contains("another name"));

    // Renewed mid-job (same location): 200, the job goes on and completes.
    let renewed = stoken(600, "Acme School");
    env.sim.renew_token(&acme, &renewed).unwrap();
    let (code, _) = post_job(&admin, &job_on("a2", "acme", &serials("B", 40))).await;
    assert_eq!(code, 202);
    let (code, doc) = put_token(&admin, "acme", serde_json::json!({"stoken": renewed})).await;
    assert_eq!(code, 200, "{doc}");
    let s = wait_job(&admin, "a2", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(s.assignments.confirmed, 40);
    let doc = wait_token(&admin, "acme", "ready").await;
    let days = (time::OffsetDateTime::parse(
        doc["expiresAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
        - time::OffsetDateTime::now_utc())
    .whole_days();
    assert!(days > 500, "expiresAt is not the renewed token's: {doc}");
    // The sToken never reaches the store's API answers or the metrics.
    assert!(!metrics(&admin).await.contains(&renewed));

    // Restart: the runtime token is still there, from the store.
    daemon.shutdown().await;
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let doc = wait_token(&admin, "acme", "ready").await;
    assert_eq!(doc["source"], "api");
    let (code, _) = post_job(&admin, &job_on("a3", "acme", &serials("C", 3))).await;
    assert_eq!(code, 202);
    let s = wait_job(&admin, "a3", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");

    // Deleted: forgotten; its notifications are acknowledged and ignored.
    let uid = doc["uId"].as_str().unwrap().to_string();
    let (code, _) = delete(&admin, "/v1/tokens/acme").await;
    assert_eq!(code, 200);
    assert_eq!(get(&admin, "/v1/tokens/acme").await.0, 404);
    assert_eq!(
        post_job(&admin, &job_on("a4", "acme", &serials("D", 1)))
            .await
            .0,
        400
    );
    let before = daemon.context().store.inbox_len().await.unwrap();
    let r = reqwest::Client::new()
        .post(env.notifications_url())
        .bearer_auth(env.secret())
        .json(&serde_json::json!({
            "notificationId": "after-delete", "notificationType": "ASSET_COUNT", "uId": uid,
            "notification": {"adamId": adam(0), "pricingParam": "STDQ", "countDelta": 5}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(daemon.context().store.inbox_len().await.unwrap(), before);
    let text = metrics(&admin).await;
    assert!(
        text.contains(r#"vppd_notifications_total{outcome="foreign",type="ASSET_COUNT"} 1"#),
        "{text}"
    );
    daemon.shutdown().await;
    // Deleted stays deleted across a restart.
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    assert_eq!(get(&admin, "/v1/tokens/acme").await.0, 404);
    daemon.shutdown().await;
}

/// Eight PUTs of one new name at once, each with its own sToken of the
/// same location: one adds it, the others replace it, none is refused, and
/// the sToken the daemon uses is the one it stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_puts_of_one_name_add_it_once_and_leave_one_stoken() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(50))],
    )
    .await;
    let first = stoken(300, "Acme School");
    add_location(&env, &first, 50);
    let mut stokens = vec![first.clone()];
    for _ in 1..8 {
        let next = stoken(300, "Acme School");
        env.sim.renew_token(&first, &next).unwrap();
        stokens.push(next);
    }
    let admin = env.admin();
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;

    let puts = stokens.iter().map(|s| {
        let admin = admin.clone();
        let s = s.clone();
        tokio::spawn(
            async move { put_token(&admin, "acme", serde_json::json!({"stoken": s})).await },
        )
    });
    let mut codes = Vec::new();
    for put in puts {
        let (code, doc) = put.await.unwrap();
        assert!(code == 201 || code == 200, "{code} {doc}");
        codes.push(code);
    }
    assert_eq!(codes.iter().filter(|&&c| c == 201).count(), 1, "{codes:?}");
    wait_token(&admin, "acme", "ready").await;

    let stored = daemon
        .context()
        .store
        .tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.name == "acme")
        .unwrap();
    let stored = SToken::parse(&stored.stoken).unwrap();
    let token = daemon.context().tokens.get("acme").unwrap();
    assert_eq!(
        token.client().token().fingerprint(),
        stored.fingerprint(),
        "the registry and the store hold different sTokens"
    );
    let (code, _) = post_job(&admin, &job_on("c1", "acme", &serials("C", 3))).await;
    assert_eq!(code, 202);
    let s = wait_job(&admin, "c1", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_and_a_foreign_owned_token_wait_beside_a_healthy_one() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(50))],
    )
    .await;
    let expired = stoken(-1, "Lapsed School");
    add_location(&env, &expired, 50);
    let taken = stoken(300, "Taken School");
    add_location(&env, &taken, 50);
    // Another MDM manages the second location.
    let r = reqwest::Client::new()
        .post(format!("{}/client/config", env.sim.base_url()))
        .bearer_auth(&taken)
        .json(&serde_json::json!({"mdmInfo": {"id": "other-mdm", "name": "OtherMDM", "metadata": "1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let admin = env.admin();
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;

    assert_eq!(
        put_token(&admin, "lapsed", serde_json::json!({"stoken": expired}))
            .await
            .0,
        201
    );
    assert_eq!(
        put_token(&admin, "taken", serde_json::json!({"stoken": taken}))
            .await
            .0,
        201
    );
    let doc = wait_token(&admin, "lapsed", "failed").await;
    assert!(
        doc["error"].as_str().unwrap().starts_with("expired on"),
        "{doc}"
    );
    let doc = wait_token(&admin, "taken", "failed").await;
    assert!(
        doc["error"].as_str().unwrap().contains("another MDM"),
        "{doc}"
    );
    // vppd stays ready; the states are metrics too.
    assert_eq!(get(&admin, "/readyz").await.0, 200);
    let text = metrics(&admin).await;
    assert!(
        text.contains(r#"vppd_token_ready{token="lapsed"} 0"#),
        "{text}"
    );
    assert!(text.contains(r#"vppd_token_state{state="expired",token="lapsed"} 1"#));
    assert!(text.contains(r#"vppd_token_state{state="other_mdm",token="taken"} 1"#));
    wait_token(&admin, "main", "ready").await;
    assert!(
        metrics(&admin)
            .await
            .contains(r#"vppd_token_ready{token="main"} 1"#)
    );

    // Their jobs wait, saying why; the healthy token's job completes.
    for (id, token) in [("l1", "lapsed"), ("t1", "taken")] {
        let (code, _) = post_job(&admin, &job_on(id, token, &serials(id, 4))).await;
        assert_eq!(code, 202);
    }
    let (code, _) = post_job(&admin, &job_on("m1", "main", &serials("M", 6))).await;
    assert_eq!(code, 202);
    let s = wait_job(&admin, "m1", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    let l1 = job_status(&admin, "l1").await.unwrap();
    assert_eq!(l1.state, JobState::Accepted);
    assert!(
        l1.waiting_for
            .as_deref()
            .unwrap()
            .starts_with("token lapsed: expired on"),
        "{l1:?}"
    );
    let t1 = job_status(&admin, "t1").await.unwrap();
    assert_eq!(t1.state, JobState::Accepted);
    assert!(t1.waiting_for.unwrap().contains("another MDM"));
    // A token with an unfinished job cannot be deleted.
    let (code, doc) = delete(&admin, "/v1/tokens/lapsed").await;
    assert_eq!(code, 409, "{doc}");
    // Nothing was sent for them.
    assert!(env.sim.assignments(&expired).is_empty());
    assert!(env.sim.assignments(&taken).is_empty());

    // Renewal of the expired one, takeover of the other: both jobs start.
    let fresh = stoken(300, "Lapsed School");
    env.sim.renew_token(&expired, &fresh).unwrap();
    let (code, doc) = put_token(&admin, "lapsed", serde_json::json!({"stoken": fresh})).await;
    assert_eq!(code, 200, "{doc}");
    let (code, doc) = put_token(
        &admin,
        "taken",
        serde_json::json!({"stoken": taken, "takeover": true}),
    )
    .await;
    assert_eq!(code, 200, "{doc}");
    for id in ["l1", "t1"] {
        let s = wait_job(&admin, id, Duration::from_secs(60)).await;
        assert_eq!(s.state, JobState::Completed, "{s:?}");
        assert!(s.waiting_for.is_none());
    }
    assert_eq!(env.sim.assignments(&fresh).len(), 4);
    assert_eq!(env.sim.assignments(&taken).len(), 4);
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_location_taken_by_another_mdm_mid_run_fails_its_token_at_the_next_refresh() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(50))],
    )
    .await;
    let admin = env.admin();
    let path = env.dir.path().join("vppd.toml");
    let text = env.config_text(&PATIENT_TRACKING, "").replace(
        "timeout = \"5s\"\n[[tokens]]",
        "timeout = \"5s\"\nrefresh_every = \"1s\"\n[[tokens]]",
    );
    assert!(text.contains("refresh_every"));
    std::fs::write(&path, &text).unwrap();
    let config = vppd::runtime::config::Config::parse(&text, &path).unwrap();
    let daemon = env.start_daemon_on(config).await;
    wait_token(&admin, "main", "ready").await;
    let r = reqwest::Client::new()
        .post(format!("{}/client/config", env.sim.base_url()))
        .bearer_auth(&env.stoken)
        .json(&serde_json::json!({"mdmInfo": {"id": "other-mdm", "name": "OtherMDM", "metadata": "1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc = wait_token(&admin, "main", "failed").await;
    assert!(doc["error"].as_str().unwrap().contains("OtherMDM"), "{doc}");
    // Nothing more is sent for it: a job waits.
    let (code, _) = post_job(&admin, &job("w1", &[adam(0)], &[], &serials("W", 3))).await;
    assert_eq!(code, 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = job_status(&admin, "w1").await.unwrap();
    assert_eq!(s.state, JobState::Accepted, "{s:?}");
    assert!(env.held().is_empty());
    // Renewed and taken over again through the API (a config-file token:
    // 200, and it still cannot be deleted).
    let renewed = stoken(700, "Renewed");
    env.sim.renew_token(&env.stoken, &renewed).unwrap();
    let (code, doc) = put_token(
        &admin,
        "main",
        serde_json::json!({"stoken": renewed, "takeover": true}),
    )
    .await;
    assert_eq!(code, 200, "{doc}");
    assert_eq!(doc["source"], "config");
    let s = wait_job(&admin, "w1", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");
    assert_eq!(env.held().len(), 3);
    let expires = wait_token(&admin, "main", "ready").await["expiresAt"].clone();
    assert_eq!(delete(&admin, "/v1/tokens/main").await.0, 409);
    daemon.shutdown().await;

    // Restarted with the same file: the stored (renewed) copy wins.
    let config = vppd::runtime::config::Config::parse(&text, &path).unwrap();
    let daemon = env.start_daemon_on(config).await;
    let doc = wait_token(&admin, "main", "ready").await;
    assert_eq!(doc["expiresAt"], expires, "{doc}");
    assert_eq!(doc["source"], "config");
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_token_requests_are_refused_clearly() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(5))],
    )
    .await;
    let admin = env.admin();
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let (code, doc) = put_token(
        &admin,
        "x",
        serde_json::json!({"stoken": "c2VjcmV0LW5vdC1qc29u"}),
    )
    .await;
    assert_eq!(code, 400);
    let e = doc["error"].as_str().unwrap();
    assert!(e.starts_with("stoken:"), "{e}");
    assert!(!e.contains("c2VjcmV0"), "{e}");
    let (code, _) = put_token(&admin, "x", serde_json::json!({"token": "nope"})).await;
    assert_eq!(code, 400);
    let (code, _) = put_token(
        &admin,
        "bad%20name",
        serde_json::json!({"stoken": env.stoken}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        get(&admin, "/v1/tokens").await.1["tokens"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiration_date_in_any_answer_updates_expires_at_and_the_metric() {
    let sim = vppd::sim::Simulator::start(
        vppd::sim::SimConfig {
            always_token_expiration: true,
            ..sim_config(small_limits())
        },
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let old = stoken(30, "Renewing School");
    sim.add_token(SimToken {
        stoken: old.clone(),
        assets: vec![SimAsset::app(&adam(0), Some(1))],
        read_only: false,
    })
    .unwrap();
    let metrics = std::sync::Arc::new(vppd::runtime::metrics::Metrics::new());
    let client = vppd::apple::Client::new(
        vppd::apple::ClientOptions::new(&sim.base_url(), "school", 50, Duration::from_secs(5)),
        SToken::parse(&old).unwrap(),
        metrics.clone(),
    )
    .unwrap();
    // Renewed elsewhere: Apple's answers now carry the new expiry.
    let renewed = stoken(400, "Renewing School");
    sim.renew_token(&old, &renewed).unwrap();
    client
        .get_assets(&vppd::apple::client::AssetsQuery::default())
        .await
        .unwrap();
    let want = SToken::parse(&renewed).unwrap().expires_at();
    assert_eq!(client.expires_at(), want);
    let text = metrics.render();
    let line = format!(
        "vppd_token_expiry_timestamp_seconds{{token=\"school\"}} {}",
        want.unix_timestamp()
    );
    assert!(text.contains(&line), "{text}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_token_commands_add_list_and_remove_a_token() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(5))],
    )
    .await;
    let acme = stoken(300, "Acme School");
    add_location(&env, &acme, 5);
    let file = env.dir.path().join("acme.vpptoken");
    std::fs::write(&file, &acme).unwrap();
    let admin = env.admin();
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    let vppd = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppd"))
            .args(args)
            .env("VPPD_ADMIN", &admin)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = vppd(&["token", "add", "acme", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("token acme added: "), "{out}");
    assert!(!out.contains(&acme) && !err.contains(&acme));
    wait_token(&admin, "acme", "ready").await;
    let (ok, out, err) = vppd(&["token", "list"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("acme\tapi\tready (location Acme School"),
        "{out}"
    );
    assert!(lines[1].starts_with("main\tconfig\tready"), "{out}");
    // A config-file token cannot be removed; an API one can.
    let (ok, _, err) = vppd(&["token", "rm", "main"]);
    assert!(!ok);
    assert!(err.contains("config file"), "{err}");
    let (ok, out, err) = vppd(&["token", "rm", "acme"]);
    assert!(ok, "{err}");
    assert_eq!(out, "token acme removed\n");
    assert_eq!(get(&admin, "/v1/tokens/acme").await.0, 404);
    daemon.shutdown().await;
}

/// A `PUT` whose sToken Apple refuses (here an expired one) never replaces
/// the working token of a location vppd knows: `409` naming why, and the
/// token goes on; `"force": true` replaces it anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_stoken_replaces_a_known_location_only_by_force() {
    let env = Env::new(
        sim_config(small_limits()),
        vec![SimAsset::app(&adam(0), Some(50))],
    )
    .await;
    let expired = stoken(-1, "Lapsed School");
    add_location(&env, &expired, 50);
    let admin = env.admin();
    let (daemon, _) = env.start_daemon(&PATIENT_TRACKING).await;
    wait_token(&admin, "main", "ready").await;

    let (code, body) = put_token(&admin, "main", serde_json::json!({"stoken": expired})).await;
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("force"), "{body}");
    let (code, doc) = get(&admin, "/v1/tokens/main").await;
    assert_eq!(code, 200);
    assert_eq!(doc["state"], "ready", "{doc}");
    let (code, body) = post_job(&admin, &job("still", &[adam(0)], &[], &serials("S", 3))).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_job(&admin, "still", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}");

    let (code, body) = put_token(
        &admin,
        "main",
        serde_json::json!({"stoken": expired, "force": true}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    wait_token(&admin, "main", "failed").await;
    daemon.shutdown().await;
}
