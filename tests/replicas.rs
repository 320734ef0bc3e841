//! Several real `vppd run` processes on one PostgreSQL database
//! (`scripts/with-postgres.sh`), behind a small TCP balancer for Apple's
//! notifications, killed with real signals: the replica working the token
//! dies mid-job (after some sends, after some acknowledged installs) and
//! another finishes the job with nothing lost and nothing released twice;
//! a notification one replica answered 200 before dying is still applied.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use vppd::domain::job::JobState;
use vppd::sim::SimAsset;

/// One replica: its ports and process.
struct Replica {
    admin_port: u16,
    notif_port: u16,
    child: Child,
    n: usize,
}

impl Replica {
    fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }
}

/// A test that fails half-way leaves no replica running (and holding its
/// ports and the database's connections) behind it.
impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shared part: simulator, MDM stand-in, the database and the
/// balancer in front of the replicas' notification listeners.
struct Cluster {
    env: Env,
    url_file: std::path::PathBuf,
    balancer_port: u16,
    backends: Arc<Mutex<Vec<u16>>>,
    tracking: &'static Tracking,
    started: usize,
}

impl Cluster {
    async fn new(
        base_url: &str,
        name: &str,
        sim: vppd::sim::SimConfig,
        assets: &[String],
        tracking: &'static Tracking,
    ) -> Cluster {
        let env = Env::new(
            sim,
            assets
                .iter()
                .map(|a| SimAsset::app(a, Some(1000)))
                .collect(),
        )
        .await;
        let url = pg::schema_url(base_url, &pg::fresh_name(name)).await;
        let url_file = env.dir.path().join("postgres-url");
        std::fs::write(&url_file, format!("{url}\n")).unwrap();
        let backends = Arc::new(Mutex::new(Vec::new()));
        let balancer_port = balance(backends.clone()).await;
        Cluster {
            env,
            url_file,
            balancer_port,
            backends,
            tracking,
            started: 0,
        }
    }

    /// A customer location named `org` in the simulator, with one app of
    /// 100 licenses: its sToken.
    fn add_location(&self, org: &str) -> String {
        let stoken = vppd::apple::token::SToken::encode(
            &format!("{org}-{}", uuid::Uuid::new_v4()),
            time::OffsetDateTime::now_utc() + time::Duration::days(200),
            org,
        );
        self.env
            .sim
            .add_token(vppd::sim::SimToken {
                stoken: stoken.clone(),
                assets: vec![SimAsset::app(&adam(0), Some(100))],
                read_only: false,
            })
            .unwrap();
        stoken
    }

    fn spawn(&mut self) -> Replica {
        let apple = self.env.sim.base_url();
        self.spawn_with_apple(&apple)
    }

    /// A replica that reaches Apple at `apple` (a [`Tap`] in front of the
    /// simulator, say).
    fn spawn_with_apple(&mut self, apple: &str) -> Replica {
        let n = self.started;
        self.started += 1;
        let admin_port = free_port();
        let notif_port = free_port();
        let t = self.tracking;
        let text = format!(
            r#"
data_dir = "{data}"
[store]
kind = "postgres"
url_file = "{url_file}"
[apple]
base_url = "{apple}"
requests_per_second = 50
timeout = "5s"
[[tokens]]
name = "main"
stoken_file = "{token}"
[notifications]
listen = "127.0.0.1:{notif_port}"
public_url = "http://127.0.0.1:{balancer}/notifications"
auth_token_file = "{secret}"
[tracking]
status_poll_after = "{pa}"
status_poll_interval = "{pi}"
sync_after = "{sa}"
[admin]
listen = "127.0.0.1:{admin_port}"
drain_timeout = "5s"
[install]
webhook_url = "http://{sink}/installs"
batch_size = 25
timeout = "5s"
"#,
            data = self.env.dir.path().join(format!("data-{n}")).display(),
            url_file = self.url_file.display(),
            apple = apple,
            token = self.env.token_file.display(),
            balancer = self.balancer_port,
            secret = self.env.dir.path().join("notification-secret").display(),
            pa = t.poll_after,
            pi = t.poll_interval,
            sa = t.sync_after,
            sink = self.env.sink_server.as_ref().unwrap().local_addr(),
        );
        let path = self.env.dir.path().join(format!("vppd-{n}.toml"));
        std::fs::write(&path, text).unwrap();
        let log = std::fs::File::create(self.env.dir.path().join(format!("vppd-{n}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vppd"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.backends.lock().unwrap().push(notif_port);
        Replica {
            admin_port,
            notif_port,
            child,
            n,
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for n in 0..self.started {
            if let Ok(s) =
                std::fs::read_to_string(self.env.dir.path().join(format!("vppd-{n}.log")))
            {
                out.push_str(&format!("--- replica {n}\n{s}"));
            }
        }
        out
    }
}

/// A TCP balancer: each connection goes to the first backend, starting
/// from a rotating one, that accepts it (as HAProxy with health checks).
async fn balance(backends: Arc<Mutex<Vec<u16>>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut turn = 0usize;
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            turn += 1;
            let ports = backends.lock().unwrap().clone();
            tokio::spawn(async move {
                for i in 0..ports.len() {
                    let port = ports[(turn + i) % ports.len()];
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A TCP relay in front of the simulator for one replica: it notes when
/// each piece of a request arrives from that replica, so a test can tell
/// whether a replica sent Apple anything in a window of time.
struct Tap {
    url: String,
    sent: Arc<Mutex<Vec<Instant>>>,
}

impl Tap {
    async fn start(sim: &vppd::sim::Simulator) -> Tap {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = sim.local_addr();
        let path = sim.base_url();
        let path = path.splitn(4, '/').nth(3).unwrap_or("");
        let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let noted = sent.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let noted = noted.clone();
                tokio::spawn(async move {
                    let Ok(out) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut in_read, mut in_write) = inbound.into_split();
                    let (mut out_read, mut out_write) = out.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 16 << 10];
                        while let Ok(n) = in_read.read(&mut buf).await {
                            if n == 0 || out_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            noted.lock().unwrap().push(Instant::now());
                        }
                        let _ = out_write.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
                        let _ = in_write.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Tap {
            url: format!("http://127.0.0.1:{port}/{path}"),
            sent,
        }
    }

    /// Pieces of requests the replica sent at or after `since`.
    fn sent_since(&self, since: Instant) -> usize {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|t| **t >= since)
            .count()
    }
}

/// The value of the first sample of `name` whose line holds every one of `labels`.
async fn metric(admin: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The replica of `replicas` that works `lease` now (waits for one).
async fn holder(cluster: &Cluster, replicas: &[&Replica], lease: &str) -> usize {
    let line = format!("vppd_lease_held{{lease=\"{lease}\"}} 1");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (i, r) in replicas.iter().enumerate() {
            if let Ok(resp) = reqwest::get(format!("{}/metrics", r.admin())).await
                && let Ok(text) = resp.text().await
                && text.lines().any(|l| l == line)
            {
                return i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "nobody took {lease}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_until(
    cluster: &Cluster,
    admin: &str,
    id: &str,
    what: &str,
    f: impl Fn(&vppd::domain::job::JobStatus) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(s) = job_status(admin, id).await
            && f(&s)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never reached {what}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port for a replica's listener. Each replica is its own process with
/// its own config, restarted on the same ports, so the port is picked here
/// rather than handed over as a bound socket.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kill9(r: &mut Replica) {
    r.child.kill().unwrap();
    r.child.wait().unwrap();
}

fn signal(r: &Replica, sig: Signal) {
    common::signal(r.child.id(), sig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_replica_working_the_token_mid_job_loses_and_repeats_nothing() {
    let Some(base) =
        pg::server_url("killing_the_replica_working_the_token_mid_job_loses_and_repeats_nothing")
    else {
        return;
    };
    let assets: Vec<String> = (0..5).map(adam).collect();
    let mut sim = sim_config(small_limits());
    sim.assignments_per_second = Some(300.0);
    let mut cluster = Cluster::new(&base, "failover", sim, &assets, &FAST_TRACKING).await;
    let devices = serials("F", 60);
    let total = (assets.len() * devices.len()) as u64;

    let mut a = cluster.spawn();
    let mut b = cluster.spawn();
    wait_ready(&a.admin()).await;
    wait_ready(&b.admin()).await;
    // Any replica takes the job; every replica answers for it.
    let (code, body) = post_job(&b.admin(), &job("fo", &assets, &[], &devices)).await;
    assert_eq!(code, 202, "{body}");
    assert!(job_status(&a.admin(), "fo").await.is_some());

    // 1: the worker dies after some sends.
    let w = holder(&cluster, &[&a, &b], "token/main").await;
    let (worker, other) = if w == 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let other_admin = other.admin();
    wait_until(&cluster, &other_admin, "fo", "two batches sent", |s| {
        s.requests.submitted >= 2
    })
    .await;
    kill9(worker);
    let c = cluster.spawn();
    wait_ready(&c.admin()).await;

    // 2: the worker dies after the MDM acknowledged some installs, while it
    // refuses the rest: what it acknowledged never comes again.
    cluster.env.sink.accept_limit(40);
    let (mut x, mut y) = if w == 0 { (b, c) } else { (a, c) };
    wait_until(&cluster, &x.admin(), "fo", "installs released", |s| {
        s.installs.released >= 1
    })
    .await;
    let w2 = holder(&cluster, &[&x, &y], "token/main").await;
    let acknowledged: std::collections::HashSet<String> =
        cluster.env.commands().keys().cloned().collect();
    let survivor = if w2 == 0 {
        kill9(&mut x);
        y
    } else {
        kill9(&mut y);
        x
    };
    cluster.env.sink.accept_limit(u64::MAX);

    // The survivor takes the token over (within 30 s) and finishes.
    let s = wait_job(&survivor.admin(), "fo", Duration::from_secs(120)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}\n{}", cluster.logs());
    assert_eq!(s.assignments.confirmed, total);
    assert_eq!(s.installs.released, total);
    let commands = cluster.env.commands();
    assert_eq!(commands.len() as u64, total, "missing install commands");
    // One more delivery is allowed only for an acknowledgement a replica
    // died before recording: at most one delivery (25 commands) per kill.
    let mut repeated = 0;
    for (uuid, (n, _, _)) in &commands {
        assert!(*n <= 2, "command {uuid} delivered {n} times");
        if *n == 2 {
            repeated += 1;
        }
    }
    assert!(repeated <= 50, "{repeated} commands delivered twice");
    assert!(!acknowledged.is_empty());
    let held = cluster.env.held();
    assert_eq!(held.len() as u64, total);
    let mut survivor = survivor;
    signal(&survivor, Signal::Term);
    assert!(survivor.child.wait().unwrap().success());
    let _ = survivor.n;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notification_answered_by_a_replica_that_then_dies_is_applied() {
    let Some(base) =
        pg::server_url("a_notification_answered_by_a_replica_that_then_dies_is_applied")
    else {
        return;
    };
    // Only notifications decide pairs here: the fallbacks wait too long.
    static SLOW: Tracking = Tracking {
        poll_after: "10m",
        poll_interval: "10m",
        sync_after: "10m",
    };
    let assets: Vec<String> = (0..2).map(adam).collect();
    let mut sim = sim_config(small_limits());
    sim.assignments_per_second = Some(4.0);
    let mut cluster = Cluster::new(&base, "notif", sim, &assets, &SLOW).await;
    let devices = serials("N", 3);

    // A works everything; B only receives notifications.
    let mut a = cluster.spawn();
    wait_ready(&a.admin()).await;
    holder(&cluster, &[&a], "applier").await;
    holder(&cluster, &[&a], "token/main").await;
    let mut b = cluster.spawn();
    wait_ready(&b.admin()).await;
    // From now on Apple's notifications reach B alone.
    cluster
        .backends
        .lock()
        .unwrap()
        .retain(|p| *p == b.notif_port);
    let (code, body) = post_job(&a.admin(), &job("nt", &assets, &[], &devices)).await;
    assert_eq!(code, 202, "{body}");
    wait_until(&cluster, &b.admin(), "nt", "the batch sent", |s| {
        s.requests.submitted >= 1
    })
    .await;
    // A freezes (its applier cannot run); Apple's notification reaches B,
    // which answers 200, and then B dies too.
    signal(&a, Signal::Stop);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = metric(
            &b.admin(),
            "vppd_notifications_received_total",
            &["outcome=\"accepted\"", "ASSET_MANAGEMENT"],
        )
        .await;
        if ok.is_some_and(|v| v >= 1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never recorded a notification\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill9(&mut b);
    kill9(&mut a);
    // A new replica applies what B acknowledged.
    let c = cluster.spawn();
    let s = wait_job(&c.admin(), "nt", Duration::from_secs(90)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}\n{}", cluster.logs());
    assert_eq!(s.assignments.confirmed, 6);
    let mut c = c;
    kill9(&mut c);
}

/// Waits for a replica's `/readyz`; the replicas' logs when it never comes
/// (a loaded machine running other tests may take its time).
async fn ready(cluster: &Cluster, r: &Replica) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(resp) = reqwest::get(format!("{}/readyz", r.admin())).await
            && resp.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {} not ready in 90 s\n{}",
            r.n,
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many of `replicas` report `vppd_lease_held{lease}` 1 right now.
async fn holders_now(replicas: &[&Replica], lease: &str) -> usize {
    let line = format!("vppd_lease_held{{lease=\"{lease}\"}} 1");
    let mut n = 0;
    for r in replicas {
        if let Ok(resp) = reqwest::get(format!("{}/metrics", r.admin())).await
            && let Ok(text) = resp.text().await
            && text.lines().any(|l| l == line)
        {
            n += 1;
        }
    }
    n
}

/// Requests a replica sent to Apple for `token`, all endpoints together.
async fn apple_requests(r: &Replica, token: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", r.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let label = format!("token=\"{token}\"");
    text.lines()
        .filter(|l| l.starts_with("vppd_apple_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_put_through_one_replica_is_worked_by_exactly_one_and_its_job_completes() {
    let Some(base) = pg::server_url(
        "a_token_put_through_one_replica_is_worked_by_exactly_one_and_its_job_completes",
    ) else {
        return;
    };
    let assets = vec![adam(0)];
    let mut cluster = Cluster::new(
        &base,
        "tenant",
        sim_config(small_limits()),
        &assets,
        &FAST_TRACKING,
    )
    .await;
    // A second customer location, unknown to the config file.
    let acme = cluster.add_location("Acme School");
    let a = cluster.spawn();
    let b = cluster.spawn();
    wait_ready(&a.admin()).await;
    wait_ready(&b.admin()).await;

    // Added through A: B lists it at once, and it is a known token for a
    // job posted through B.
    let r = reqwest::Client::new()
        .put(format!("{}/v1/tokens/acme", a.admin()))
        .json(&serde_json::json!({"stoken": acme, "takeover": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let listed: serde_json::Value = reqwest::get(format!("{}/v1/tokens", b.admin()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        listed["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "acme"),
        "{listed}"
    );
    let devices = serials("T", 12);
    let mut j = job("acme-job", &assets, &[], &devices);
    j["token"] = "acme".into();
    let (code, body) = post_job(&b.admin(), &j).await;
    assert_eq!(code, 202, "{body}");

    // Exactly one replica works it, and every replica shows its state.
    let w = holder(&cluster, &[&a, &b], "token/acme").await;
    assert_eq!(holders_now(&[&a, &b], "token/acme").await, 1);
    let (worker, other) = if w == 0 { (&a, &b) } else { (&b, &a) };
    let doc = wait_token(&other.admin(), "acme", "ready").await;
    assert_eq!(doc["locationName"], "Acme School", "{doc}");

    let s = wait_job(&a.admin(), "acme-job", Duration::from_secs(90)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}\n{}", cluster.logs());
    assert_eq!(s.assignments.confirmed, devices.len() as u64);
    assert_eq!(s.installs.released, devices.len() as u64);
    // Only the worker talked to Apple for it.
    assert!(apple_requests(worker, "acme").await > 0.0);
    assert_eq!(
        apple_requests(other, "acme").await,
        0.0,
        "{}",
        cluster.logs()
    );
    assert_eq!(holders_now(&[&a, &b], "token/acme").await, 1);

    // Deleted through the replica that does not work it: the worker gives
    // the lease up and both forget it.
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/tokens/acme", other.admin()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while holders_now(&[&a, &b], "token/acme").await > 0 {
        assert!(
            Instant::now() < deadline,
            "the token's lease was kept after DELETE\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in [&a, &b] {
        let code = reqwest::get(format!("{}/v1/tokens/acme", r.admin()))
            .await
            .unwrap()
            .status();
        assert_eq!(code, 404);
    }
    let (mut a, mut b) = (a, b);
    kill9(&mut a);
    kill9(&mut b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tokens_put_through_one_replica_are_all_worked_and_their_jobs_complete() {
    let Some(base) = pg::server_url(
        "many_tokens_put_through_one_replica_are_all_worked_and_their_jobs_complete",
    ) else {
        return;
    };
    let assets = vec![adam(0)];
    let mut cluster = Cluster::new(
        &base,
        "fleet",
        sim_config(small_limits()),
        &assets,
        &FAST_TRACKING,
    )
    .await;
    let names: Vec<String> = (0..8).map(|i| format!("school{i}")).collect();
    let stokens: Vec<String> = names.iter().map(|n| cluster.add_location(n)).collect();
    let a = cluster.spawn();
    let b = cluster.spawn();
    ready(&cluster, &a).await;
    ready(&cluster, &b).await;

    // Every token is put through A, one right after another, and a job for
    // each is posted through B.
    let http = reqwest::Client::new();
    for (name, stoken) in names.iter().zip(&stokens) {
        let r = http
            .put(format!("{}/v1/tokens/{name}", a.admin()))
            .json(&serde_json::json!({"stoken": stoken}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let devices = serials("M", 6);
    for name in &names {
        let mut j = job(&format!("{name}-job"), &assets, &[], &devices);
        j["token"] = name.as_str().into();
        let (code, body) = post_job(&b.admin(), &j).await;
        assert_eq!(code, 202, "{body}");
    }

    // Each token is worked by exactly one replica, and ready through both.
    for name in &names {
        let lease = format!("token/{name}");
        holder(&cluster, &[&a, &b], &lease).await;
        assert_eq!(holders_now(&[&a, &b], &lease).await, 1, "{lease}");
        for r in [&a, &b] {
            wait_token(&r.admin(), name, "ready").await;
        }
    }
    for name in &names {
        let s = wait_job(&a.admin(), &format!("{name}-job"), Duration::from_secs(90)).await;
        assert_eq!(s.state, JobState::Completed, "{s:?}\n{}", cluster.logs());
        assert_eq!(s.assignments.confirmed, devices.len() as u64);
        assert_eq!(s.installs.released, devices.len() as u64);
    }
    // The tokens are shared out: each replica works some.
    let held = |text: String| {
        text.lines()
            .filter(|l| l.starts_with("vppd_lease_held{lease=\"token/") && l.ends_with(" 1"))
            .count()
    };
    for r in [&a, &b] {
        let text = reqwest::get(format!("{}/metrics", r.admin()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(held(text) >= 1, "{}", cluster.logs());
    }
    let (mut a, mut b) = (a, b);
    kill9(&mut a);
    kill9(&mut b);
}

/// Tokens put through a replica one after another while that replica keeps
/// reading the stored tokens back (every request naming a token it does
/// not know does): each PUT adds its token, and the token stays listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_put_while_the_replica_reads_the_stored_tokens_back_are_each_added_once() {
    let Some(base) = pg::server_url(
        "tokens_put_while_the_replica_reads_the_stored_tokens_back_are_each_added_once",
    ) else {
        return;
    };
    let assets = vec![adam(0)];
    let mut cluster = Cluster::new(
        &base,
        "busy",
        sim_config(small_limits()),
        &assets,
        &FAST_TRACKING,
    )
    .await;
    let names: Vec<String> = (0..24).map(|i| format!("district{i}")).collect();
    let stokens: Vec<String> = names.iter().map(|n| cluster.add_location(n)).collect();
    let a = cluster.spawn();
    ready(&cluster, &a).await;

    // Each of these asks about a token the replica does not know, so each
    // reads the stored tokens back, as the PUTs below store theirs.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let admin = a.admin();
            let stop = stop.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http
                        .get(format!("{admin}/v1/tokens/nowhere/drift"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 404);
                }
            })
        })
        .collect();
    // Put all at once, as a vendor onboarding districts in parallel would.
    let puts: Vec<_> = names
        .iter()
        .zip(&stokens)
        .map(|(name, stoken)| {
            let admin = a.admin();
            let name = name.clone();
            let stoken = stoken.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let r = http
                    .put(format!("{admin}/v1/tokens/{name}"))
                    .json(&serde_json::json!({"stoken": stoken}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201, "{name}: {}", r.text().await.unwrap());
                let r = http
                    .get(format!("{admin}/v1/tokens/{name}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    r.status(),
                    200,
                    "{name} is missing right after it was added"
                );
            })
        })
        .collect();
    for put in puts {
        put.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    for name in &names {
        wait_token(&a.admin(), name, "ready").await;
    }
    let mut a = a;
    kill9(&mut a);
}

/// The replica working the token is frozen (SIGSTOP) mid-job past its
/// lease; the other takes the token over. Woken (SIGCONT), the frozen one
/// sends Apple nothing more: its lease lapsed by its own monotonic clock,
/// so its client holds every request back, and its keeper stops the work.
/// The job completes with nothing released twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_frozen_past_its_lease_sends_apple_nothing_after_it_wakes() {
    let Some(base) =
        pg::server_url("a_replica_frozen_past_its_lease_sends_apple_nothing_after_it_wakes")
    else {
        return;
    };
    let assets: Vec<String> = (0..5).map(adam).collect();
    let mut sim = sim_config(small_limits());
    sim.assignments_per_second = Some(100.0);
    let mut cluster = Cluster::new(&base, "frozen", sim, &assets, &FAST_TRACKING).await;
    let devices = serials("Z", 80);
    let total = (assets.len() * devices.len()) as u64;
    let taps = [
        Tap::start(&cluster.env.sim).await,
        Tap::start(&cluster.env.sim).await,
    ];
    let a = cluster.spawn_with_apple(&taps[0].url);
    let b = cluster.spawn_with_apple(&taps[1].url);
    wait_ready(&a.admin()).await;
    wait_ready(&b.admin()).await;
    let (code, body) = post_job(&a.admin(), &job("fz", &assets, &[], &devices)).await;
    assert_eq!(code, 202, "{body}");

    let w = holder(&cluster, &[&a, &b], "token/main").await;
    let (worker, other) = if w == 0 { (&a, &b) } else { (&b, &a) };
    wait_until(&cluster, &other.admin(), "fz", "a batch sent", |s| {
        s.requests.submitted >= 1
    })
    .await;
    signal(worker, Signal::Stop);
    // The other replica takes the token over once the lease expired.
    let deadline = Instant::now() + Duration::from_secs(60);
    while holders_now(&[other], "token/main").await == 0 {
        assert!(Instant::now() < deadline, "no takeover\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Well past the lease, and the new holder at work.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let woken = Instant::now();
    signal(worker, Signal::Cont);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let tap = &taps[w];
    assert_eq!(
        tap.sent_since(woken),
        0,
        "the woken replica sent Apple requests for a token it no longer holds\n{}",
        cluster.logs()
    );
    assert_eq!(holders_now(&[worker], "token/main").await, 0);

    let s = wait_job(&other.admin(), "fz", Duration::from_secs(120)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}\n{}", cluster.logs());
    assert_eq!(s.installs.released, total);
    // A delivery the frozen replica made but had not recorded may come
    // once more from the new holder of the outbox (as after a kill).
    let mut repeated = 0;
    for (uuid, (n, _, _)) in cluster.env.commands() {
        assert!(n <= 2, "command {uuid} delivered {n} times");
        repeated += usize::from(n == 2);
    }
    assert!(repeated <= 25, "{repeated} commands delivered twice");
}

/// A relay in front of PostgreSQL that the test can cut: every connection
/// through it is dropped and new ones are closed at once, as when the
/// database goes away; uncut, it relays again.
struct Cut {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Cut {
    async fn start(target: std::net::SocketAddr) -> Cut {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut rx = rx.clone();
                if *rx.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut out) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                        _ = rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Cut { port, cut }
    }

    fn set(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// How long until `/readyz` of `r` answers `want`.
async fn readyz_becomes(r: &Replica, want: u16) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(resp) = reqwest::get(format!("{}/readyz", r.admin())).await
            && resp.status().as_u16() == want
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "readyz never {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The database goes away under a running replica: within 10 s it is
/// unready (`/healthz` still 200) and a job is answered 503 with
/// Retry-After, never 2xx; within 10 s of the database's return it is
/// ready again and a job posted then completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_gone_away_makes_the_replica_unready_until_it_returns() {
    let Some(base) =
        pg::server_url("a_database_gone_away_makes_the_replica_unready_until_it_returns")
    else {
        return;
    };
    let assets: Vec<String> = (0..2).map(adam).collect();
    let mut cluster = Cluster::new(
        &base,
        "gone",
        sim_config(small_limits()),
        &assets,
        &FAST_TRACKING,
    )
    .await;
    // The replica reaches the database through the relay.
    let url = std::fs::read_to_string(&cluster.url_file).unwrap();
    let at = url.find("@127.0.0.1:").unwrap() + "@127.0.0.1:".len();
    let end = at + url[at..].find('/').unwrap();
    let port: u16 = url[at..end].parse().unwrap();
    let cut = Cut::start(([127, 0, 0, 1], port).into()).await;
    std::fs::write(
        &cluster.url_file,
        format!("{}{}{}", &url[..at], cut.port, &url[end..]),
    )
    .unwrap();
    let a = cluster.spawn();
    ready(&cluster, &a).await;

    cut.set(true);
    let unready = readyz_becomes(&a, 503).await;
    assert!(
        unready <= Duration::from_secs(10),
        "unready after {unready:?}"
    );
    let health = reqwest::get(format!("{}/healthz", a.admin()))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/jobs", a.admin()))
        .json(&job("while-gone", &assets, &[], &serials("G", 5)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());

    cut.set(false);
    let back = readyz_becomes(&a, 200).await;
    assert!(
        back <= Duration::from_secs(10),
        "ready again after {back:?}"
    );
    let (code, body) = post_job(&a.admin(), &job("after", &assets, &[], &serials("H", 5))).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_job(&a.admin(), "after", Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Completed, "{s:?}\n{}", cluster.logs());
    assert!(job_status(&a.admin(), "while-gone").await.is_none());
}
