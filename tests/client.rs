//! The Apple client against the simulator over real HTTP on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vppd::apple::client::{AssetsQuery, AssignmentsQuery, UsersQuery};
use vppd::apple::token::SToken;
use vppd::apple::types::*;
use vppd::apple::{AppleError, Client, ClientOptions};
use vppd::runtime::metrics::Metrics;
use vppd::sim::{Faults, ManualAction, ManualChange, SimAsset, SimConfig, SimToken, Simulator};

struct Setup {
    sim: Simulator,
    client: Client,
    stoken: String,
}

fn token_text() -> String {
    SToken::encode(
        &format!("client-test-{}", uuid::Uuid::new_v4()),
        time::OffsetDateTime::now_utc() + time::Duration::days(100),
        "Client Test School",
    )
}

async fn setup_with(config: SimConfig, assets: Vec<SimAsset>, rps: u32) -> Setup {
    let sim = Simulator::start(config, "127.0.0.1:0").await.unwrap();
    let stoken = token_text();
    sim.add_token(SimToken {
        stoken: stoken.clone(),
        assets,
        read_only: false,
    })
    .unwrap();
    let mut opts = ClientOptions::new(&sim.base_url(), "main", rps, Duration::from_secs(2));
    opts.initial_backoff = Duration::from_millis(50);
    let client = Client::new(
        opts,
        SToken::parse(&stoken).unwrap(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    client.refresh_limits().await.unwrap();
    Setup {
        sim,
        client,
        stoken,
    }
}

fn limits() -> Limits {
    Limits {
        max_assets: 3,
        max_serial_numbers: 5,
        max_client_user_ids: 5,
        max_request_per_second: Some(1000),
        ..Default::default()
    }
}

async fn setup(assets: Vec<SimAsset>) -> Setup {
    let config = SimConfig {
        limits: limits(),
        page_size: 3,
        ..Default::default()
    };
    setup_with(config, assets, 1000).await
}

fn manage(assets: &[&str], serials: &[&str]) -> ManageAssetsRequest {
    ManageAssetsRequest {
        assets: assets.iter().map(|a| Asset::new(*a, STDQ)).collect(),
        serial_numbers: Some(serials.iter().map(|s| s.to_string()).collect()),
        client_user_ids: None,
    }
}

async fn idle(s: &Setup) {
    assert!(s.sim.wait_idle(Duration::from_secs(10)).await);
}

#[tokio::test]
async fn service_config_limits_are_applied() {
    let s = setup(vec![]).await;
    let config = s.client.service_config().await.unwrap();
    assert_eq!(config.limits["maxAssets"], 3);
    assert!(config.urls.contains_key("associateAssets"));
    assert!(config.error_codes.iter().any(|e| e.error_number == 9709));
    assert_eq!(s.client.limits().max_serial_numbers, 5);
    // min(configured 1000, Apple's 1000)
    assert_eq!(s.client.effective_rate(), 1000);
}

#[tokio::test]
async fn every_read_endpoint_and_pagination_walk() {
    let assets: Vec<SimAsset> = (0..7)
        .map(|i| SimAsset::app(&(300 + i).to_string(), Some(50)))
        .collect();
    let s = setup(assets).await;
    let walk = s.client.get_assets(&AssetsQuery::default()).await.unwrap();
    assert_eq!(walk.items.len(), 7, "3 pages of 3");
    let one = s
        .client
        .get_assets(&AssetsQuery {
            adam_id: Some("301".into()),
            pricing_param: None,
        })
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    assert_eq!(one.items[0].available_count, 50);

    // 3 assets x 5 serials = 15 assignments, walked over 5 pages.
    let ev = s
        .client
        .associate(&manage(&["300", "301", "302"], &["A", "B", "C", "D", "E"]))
        .await
        .unwrap();
    idle(&s).await;
    let status = s.client.event_status(&ev.event_id).await.unwrap();
    assert_eq!(status.event_status, event_status::COMPLETE);
    assert_eq!(status.num_requested, 15);
    assert_eq!(status.num_completed, 15);
    let all = s
        .client
        .get_assignments(&AssignmentsQuery::default())
        .await
        .unwrap();
    assert_eq!(all.items.len(), 15);
    let by_serial = s
        .client
        .get_assignments(&AssignmentsQuery {
            serial_number: Some("C".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_serial.items.len(), 3);
    // sinceVersionId: nothing changed since the walk's version.
    let since = s
        .client
        .get_assignments(&AssignmentsQuery {
            since_version_id: Some(all.version_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(since.items.is_empty());
    let err = s
        .client
        .event_status(&"no-such-event".into())
        .await
        .unwrap_err();
    assert_eq!(err.error_number(), Some(9708));

    let config = s.client.client_config().await.unwrap();
    assert!(!config.uid.is_empty());
    // Users: create, then read back.
    let ev = s
        .client
        .create_users(&ManageUsersRequest {
            users: vec![RequestUser {
                client_user_id: "u-1".into(),
                email: Some("u1@example.com".into()),
                managed_apple_id: None,
            }],
        })
        .await
        .unwrap();
    idle(&s).await;
    assert_eq!(
        s.client
            .event_status(&ev.event_id)
            .await
            .unwrap()
            .event_status,
        event_status::COMPLETE
    );
    let users = s.client.get_users(&UsersQuery::default()).await.unwrap();
    assert_eq!(users.items.len(), 1);
    assert_eq!(users.items[0].status.as_deref(), Some("Registered"));
}

/// A walk during which the data changes reads each page once (no
/// restart), ends with its first page's versionId, and what was written
/// meanwhile is what the next `sinceVersionId` read returns.
#[tokio::test]
async fn a_walk_the_data_moves_under_is_read_once_and_the_next_since_read_has_the_rest() {
    let s = setup(
        (0..3)
            .map(|i| SimAsset::app(&(500 + i).to_string(), Some(50)))
            .collect(),
    )
    .await;
    // 3 assets x 5 serials = 15 assignments: 5 pages of 3.
    s.client
        .associate(&manage(&["500", "501", "502"], &["A", "B", "C", "D", "E"]))
        .await
        .unwrap();
    idle(&s).await;
    let before = s
        .client
        .get_assignments(&AssignmentsQuery::default())
        .await
        .unwrap();
    assert_eq!(before.items.len(), 15);
    s.sim.clear_requests();

    let mut pages = 0;
    let mut items = 0;
    let end = s
        .client
        .walk_assignments(&AssignmentsQuery::default(), |page| {
            pages += 1;
            items += page.len();
            if pages == 1 {
                // Written by hand while the walk is on its first page.
                s.sim
                    .change_by_hand(ManualChange {
                        action: ManualAction::Associate,
                        assets: vec![Asset::new("502", STDQ)],
                        serial_numbers: vec!["LATE".into()],
                        client_user_ids: Vec::new(),
                        delta: None,
                        token: None,
                        after: None,
                    })
                    .unwrap();
            }
        })
        .await
        .unwrap();
    assert!(!end.stable, "the versionId moved during the walk");
    assert!(items >= 15, "every page read: {items} items");
    let reads = s
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/assignments")
        .count();
    assert_eq!(reads, pages, "each page read once, the walk not restarted");
    assert_eq!(
        end.version_id, before.version_id,
        "the first page's versionId, from before the change"
    );

    let since = s
        .client
        .get_assignments(&AssignmentsQuery {
            since_version_id: Some(end.version_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        since
            .items
            .iter()
            .any(|a| a.adam_id == "502" && a.serial_number.as_deref() == Some("LATE")),
        "{:?}",
        since.items
    );
}

#[tokio::test]
async fn limit_violations_are_refused_with_their_code_and_nothing_done() {
    let s = setup(
        (0..4)
            .map(|i| SimAsset::app(&(400 + i).to_string(), Some(50)))
            .collect(),
    )
    .await;
    let over_assets = s
        .client
        .associate(&manage(&["400", "401", "402", "403"], &["A"]))
        .await
        .unwrap_err();
    assert_eq!(over_assets.error_number(), Some(9700));
    assert_eq!(over_assets.status(), Some(400));
    assert!(!over_assets.is_retryable());
    let over_serials = s
        .client
        .associate(&manage(&["400"], &["A", "B", "C", "D", "E", "F"]))
        .await
        .unwrap_err();
    assert_eq!(over_serials.error_number(), Some(9702));
    let dup = s
        .client
        .associate(&manage(&["400"], &["A", "A"]))
        .await
        .unwrap_err();
    assert_eq!(dup.error_number(), Some(9705));
    idle(&s).await;
    assert!(s.sim.assignments(&s.stoken).is_empty());
}

#[tokio::test]
async fn retry_after_is_honoured_and_pauses_other_requests() {
    let s = setup(vec![SimAsset::app("500", Some(10))]).await;
    s.sim.set_faults(Faults {
        fail_next_with_429: 1,
        retry_after_secs: 1,
        ..Default::default()
    });
    s.sim.clear_requests();
    let started = Instant::now();
    let other = {
        let c = s.client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.client_config().await
        })
    };
    s.client.get_assets(&AssetsQuery::default()).await.unwrap();
    other.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    let log = s.sim.requests();
    assert_eq!(log[0].status, 429);
    for later in &log[1..] {
        let gap = later.at.duration_since(log[0].at);
        assert!(
            gap >= Duration::from_millis(950),
            "a request came {gap:?} after Retry-After: 1"
        );
    }
}

#[tokio::test]
async fn retry_after_as_an_http_date() {
    let s = setup(vec![]).await;
    s.sim.set_faults(Faults {
        fail_next_with_429: 1,
        retry_after_secs: 2,
        retry_after_http_date: true,
        ..Default::default()
    });
    let started = Instant::now();
    s.client.client_config().await.unwrap();
    // An HTTP date has one-second resolution.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn server_errors_are_retried() {
    let s = setup(vec![]).await;
    s.sim.set_faults(Faults {
        error_5xx_next: 2,
        retry_after_secs: 0,
        ..Default::default()
    });
    s.sim.clear_requests();
    s.client.client_config().await.unwrap();
    let statuses: Vec<u16> = s.sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
}

#[tokio::test]
async fn an_error_body_with_http_200_is_an_error() {
    let sim = Simulator::start(
        SimConfig {
            limits: limits(),
            ..Default::default()
        },
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let stoken = token_text();
    sim.add_token(SimToken {
        stoken: stoken.clone(),
        assets: vec![SimAsset::app("600", Some(10))],
        read_only: false,
    })
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let mut opts = ClientOptions::new(&sim.base_url(), "main", 1000, Duration::from_secs(2));
    opts.initial_backoff = Duration::from_millis(20);
    let client = Client::new(opts, SToken::parse(&stoken).unwrap(), metrics.clone()).unwrap();
    sim.set_faults(Faults {
        error_body_with_200_next: 1,
        ..Default::default()
    });
    sim.clear_requests();
    // 9603 in a 200 body: detected as Apple's error, and since Apple did
    // nothing, the request is sent again and succeeds.
    client.associate(&manage(&["600"], &["A"])).await.unwrap();
    let errors = metrics
        .apple_errors
        .get_metric_with_label_values(&["main", "9603"])
        .map(|c| c.get())
        .unwrap_or(0);
    assert_eq!(errors, 1);
    let posts: Vec<u16> = sim
        .requests()
        .iter()
        .filter(|r| r.path == "/assets/associate")
        .map(|r| r.status)
        .collect();
    assert_eq!(posts, vec![200, 200]);
    assert!(sim.wait_idle(Duration::from_secs(10)).await);
    assert_eq!(sim.assignments(&stoken).len(), 1);

    // With retries exhausted the caller sees the error, HTTP status 200 kept.
    let mut opts = ClientOptions::new(&sim.base_url(), "main", 1000, Duration::from_secs(2));
    opts.max_attempts = 1;
    let once = Client::new(opts, SToken::parse(&stoken).unwrap(), metrics).unwrap();
    sim.set_faults(Faults {
        error_body_with_200_next: 1,
        ..Default::default()
    });
    match once.get_assets(&AssetsQuery::default()).await.unwrap_err() {
        AppleError::Api { status, error, .. } => {
            assert_eq!(status, 200);
            assert_eq!(error.error_number, 9603);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_cut_connection_after_a_post_is_an_unknown_outcome_not_a_resend() {
    let s = setup(vec![SimAsset::app("700", Some(10))]).await;
    s.sim.set_faults(Faults {
        cut_connection_after_processing_next: 1,
        ..Default::default()
    });
    s.sim.clear_requests();
    let err = s
        .client
        .associate(&manage(&["700"], &["A", "B"]))
        .await
        .unwrap_err();
    assert!(matches!(err, AppleError::UnknownOutcome { .. }), "{err:?}");
    idle(&s).await;
    // Sent once, processed once: the client did not resend it.
    let posts = s
        .sim
        .requests()
        .iter()
        .filter(|r| r.path == "/assets/associate")
        .count();
    assert_eq!(posts, 1);
    assert_eq!(s.sim.assignments(&s.stoken).len(), 2);
}

#[tokio::test]
async fn ordered_processing_makes_a_reassignment_fit_one_license() {
    let s = setup(vec![SimAsset::app("800", Some(1))]).await;
    s.client
        .associate(&manage(&["800"], &["OLD"]))
        .await
        .unwrap();
    idle(&s).await;
    // Sent back to back: the associate succeeds only because Apple
    // processes the disassociate first.
    let d = s
        .client
        .disassociate(&manage(&["800"], &["OLD"]))
        .await
        .unwrap();
    let a = s
        .client
        .associate(&manage(&["800"], &["NEW"]))
        .await
        .unwrap();
    idle(&s).await;
    assert_eq!(
        s.client
            .event_status(&d.event_id)
            .await
            .unwrap()
            .event_status,
        event_status::COMPLETE
    );
    assert_eq!(
        s.client
            .event_status(&a.event_id)
            .await
            .unwrap()
            .event_status,
        event_status::COMPLETE
    );
    let held: Vec<String> = s
        .sim
        .assignments(&s.stoken)
        .into_iter()
        .filter_map(|a| a.serial_number)
        .collect();
    assert_eq!(held, vec!["NEW".to_string()]);
    // And the other way round the pool is exhausted: 9709.
    let a2 = s
        .client
        .associate(&manage(&["800"], &["THIRD"]))
        .await
        .unwrap();
    idle(&s).await;
    let st = s.client.event_status(&a2.event_id).await.unwrap();
    assert_eq!(st.event_status, event_status::FAILED);
    assert_eq!(st.failures.unwrap()[0].error_number, 9709);
}

#[tokio::test]
async fn requests_stay_under_the_rate_limit_in_every_one_second_window() {
    let config = SimConfig {
        limits: Limits {
            max_request_per_second: Some(4),
            ..limits()
        },
        ..Default::default()
    };
    // Configured 10/s, Apple publishes 4/s: 4 wins.
    let s = setup_with(config, vec![], 10).await;
    assert_eq!(s.client.effective_rate(), 4);
    s.sim.clear_requests();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let c = s.client.clone();
        tasks.push(tokio::spawn(async move { c.client_config().await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let log = s.sim.requests();
    assert_eq!(log.len(), 10);
    assert!(
        log.iter().all(|r| r.status == 200),
        "the simulator throttled us"
    );
    for (i, r) in log.iter().enumerate() {
        let in_window = log[i..]
            .iter()
            .filter(|o| o.at.duration_since(r.at) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 4, "{in_window} requests within one second");
    }
}

#[tokio::test]
async fn setting_client_config_needs_a_reachable_notification_url() {
    let s = setup(vec![]).await;
    let unreachable = format!("http://127.0.0.1:{}/notifications", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let err = s
        .client
        .set_client_config(&ClientConfigRequest {
            mdm_info: Some(MdmInfo {
                id: "x".into(),
                name: "vppd".into(),
                metadata: "test".into(),
            }),
            notification_url: Some(unreachable),
            notification_auth_token: Some("secret".into()),
            notification_types: Some(vec!["ASSET_MANAGEMENT".into()]),
        })
        .await
        .unwrap_err();
    assert_eq!(err.error_number(), Some(9728));
    let config = s.client.client_config().await.unwrap();
    assert!(
        config.notification_url.is_none(),
        "a refused config was stored"
    );
}

#[tokio::test]
async fn the_token_never_appears_in_debug_or_errors() {
    let s = setup(vec![]).await;
    s.sim.set_faults(Faults {
        revoked: true,
        ..Default::default()
    });
    let err = s.client.client_config().await.unwrap_err();
    assert!(err.is_token_refused());
    assert_eq!(err.error_number(), Some(9625));
    let bearer = SToken::parse(&s.stoken).unwrap().bearer().to_string();
    for shown in [
        format!("{err}"),
        format!("{err:?}"),
        format!("{:?}", s.client),
    ] {
        assert!(!shown.contains(&bearer), "{shown}");
    }
}

/// A client fenced by a lease sends nothing without one, nothing once the
/// lease has too little left by the monotonic clock (as after a pause
/// past it), and goes on once the lease is renewed.
#[tokio::test]
async fn a_fenced_client_sends_only_while_its_lease_is_valid_for_the_notice() {
    let s = setup(vec![SimAsset::app("1", Some(10))]).await;
    let mut opts = ClientOptions::new(&s.sim.base_url(), "main", 1000, Duration::from_secs(2));
    opts.lease_notice = Some(Duration::from_millis(500));
    let client = Client::new(
        opts,
        SToken::parse(&s.stoken).unwrap(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let before = s.sim.requests().len();

    // No lease yet: the request waits, and nothing reaches Apple.
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.service_config().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    assert_eq!(s.sim.requests().len(), before);

    // A lease valid long enough: it leaves.
    client.hold_lease(Some(Instant::now() + Duration::from_secs(10)));
    waiting.await.unwrap().unwrap();
    assert_eq!(s.sim.requests().len(), before + 1);

    // A lease that runs out within the notice (the clock moved on while
    // the process stood still): held back again, until renewed.
    client.hold_lease(Some(Instant::now() + Duration::from_millis(200)));
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.service_config().await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!waiting.is_finished());
    assert_eq!(s.sim.requests().len(), before + 1);
    client.hold_lease(None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished());
    client.hold_lease(Some(Instant::now() + Duration::from_secs(10)));
    waiting.await.unwrap().unwrap();
    assert_eq!(s.sim.requests().len(), before + 2);
}
