//! User-based assignment end to end, through the real `vppd run` binary
//! against the simulator on loopback: users created in the fewest requests
//! of at most `maxUsers`, users Apple has not created again, an undescribed
//! user's pairs failing 9609, one invitation per user per job, installs
//! held until the user is `Associated` (by notification, and by a Get Users
//! sync when notifications are lost), `retireUsers`, and a SIGKILL in the
//! middle.

mod common;

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vppd::domain::job::{JobState, JobStatus, RequestType};
use vppd::sim::{InvitationAcceptance, SimAsset, SimConfig};

fn spawn(env: &Env, run: usize) -> Child {
    let path = env.dir.path().join("vppd.toml");
    std::fs::write(&path, env.config_text(&FAST_TRACKING, "")).unwrap();
    let log = std::fs::File::create(env.dir.path().join(format!("vppd-{run}.log"))).unwrap();
    env.vppd_run(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn logs(env: &Env) -> String {
    let mut out = String::new();
    for run in 0..3 {
        if let Ok(s) = std::fs::read_to_string(env.dir.path().join(format!("vppd-{run}.log"))) {
            out.push_str(&format!("--- run {run}\n{s}"));
        }
    }
    out
}

/// Kills the daemon when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start(env: &Env, run: usize) -> Running {
    let child = Running(spawn(env, run));
    wait_ready(&env.admin()).await;
    child
}

async fn wait_until(env: &Env, id: &str, what: &str, f: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = job_status(&env.admin(), id).await
            && f(&s)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {what}: {:?}\n{}",
            job_status(&env.admin(), id).await,
            logs(env)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn user_env_config(max_users: u32) -> SimConfig {
    let mut limits = small_limits();
    limits.max_users = max_users;
    sim_config(limits)
}

async fn env_with(config: SimConfig) -> Env {
    Env::new(
        config,
        vec![
            SimAsset::app(&adam(0), Some(1000)),
            SimAsset::app(&adam(1), Some(1000)),
        ],
    )
    .await
}

fn described(id: &str) -> serde_json::Value {
    serde_json::json!({"clientUserId": id, "email": format!("{id}@school.example")})
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// POSTs Apple received on a path (`/users/create`, ...).
fn posts(env: &Env, path: &str) -> usize {
    env.sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == path && r.status == 200)
        .count()
}

/// The daemon's view of one user: `GET /v1/tokens/main/users?clientUserId=`.
async fn user(env: &Env, id: &str) -> Option<serde_json::Value> {
    let url = format!("{}/v1/tokens/main/users?clientUserId={id}", env.admin());
    let body: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    body["users"].as_array().unwrap().first().cloned()
}

/// InviteToProgram commands the MDM received: (deliveries, clientUserId, url).
fn invitations(env: &Env) -> Vec<(u32, String, String)> {
    let kinds = env.sink.kinds();
    let urls = env.sink.invitations();
    env.commands()
        .into_iter()
        .filter(|(uuid, _)| kinds.get(uuid) == Some(&RequestType::InviteToProgram))
        .map(|(uuid, (n, adam, target))| {
            assert!(adam.is_empty(), "an invitation names no asset");
            (n, target, urls.get(&uuid).cloned().unwrap_or_default())
        })
        .collect()
}

fn installs_by_target(env: &Env) -> HashMap<String, u32> {
    let kinds = env.sink.kinds();
    let mut out = HashMap::new();
    for (uuid, (n, _, target)) in env.commands() {
        if kinds.get(&uuid) == Some(&RequestType::InstallApplication) {
            *out.entry(target).or_default() += n;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_are_ensured_invited_once_and_installs_wait_for_association() {
    let env = env_with(user_env_config(4)).await;
    let _daemon = start(&env, 0).await;

    // Three users exist already (a job that only describes users).
    let seed = serde_json::json!({
        "id": "seed", "token": "main",
        "users": ids("u", 0..3).iter().map(|u| described(u)).collect::<Vec<_>>(),
    });
    let (code, body) = post_job(&env.admin(), &seed).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_until(&env, "seed", "completed", |s| {
        s.state == JobState::Completed
    })
    .await;
    assert_eq!((s.users.total, s.users.invited), (3, 3), "{s:?}");
    assert_eq!(posts(&env, "/users/create"), 1);
    env.sim.clear_requests();

    // Ten described users (three known, one with a Managed Apple Account)
    // and one the job does not describe and Apple does not know.
    let mut users: Vec<serde_json::Value> = ids("u", 0..10).iter().map(|u| described(u)).collect();
    users[3]["managedAppleId"] = serde_json::json!("u3@appleschool.example");
    let mut targets = ids("u", 0..10);
    targets.push("ghost".into());
    let job = serde_json::json!({
        "id": "rollout", "token": "main",
        "assets": [{"adamId": adam(0)}, {"adamId": adam(1)}],
        "associate": {"clientUserIds": targets},
        "users": users,
    });
    let (code, body) = post_job(&env.admin(), &job).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["users"]["total"], 11, "{body}");
    let s = wait_until(
        &env,
        "rollout",
        "assignments decided, u3's installs released",
        |s| s.assignments.pending == 0 && s.installs.released == 2 && s.users.invited == 9,
    )
    .await;
    // 7 users to create, at most 4 a request: 2 requests; none of the
    // three Apple has, and never the undescribed one.
    assert_eq!(posts(&env, "/users/create"), 2);
    assert!(user(&env, "ghost").await.is_none());
    assert_eq!(
        (s.assignments.confirmed, s.assignments.failed),
        (20, 2),
        "{s:?}"
    );
    let failures: serde_json::Value =
        reqwest::get(format!("{}/v1/jobs/rollout/failures", env.admin()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    for f in failures["failures"].as_array().unwrap() {
        assert_eq!(f["clientUserId"], "ghost", "{f}");
        assert_eq!(f["errorNumber"], 9609, "{f}");
    }
    // The license is assigned; the install waits for the user.
    assert_eq!(s.state, JobState::Running);
    assert_eq!(s.installs.pending, 18, "{s:?}");
    assert_eq!((s.users.total, s.users.associated), (11, 1), "{s:?}");

    // One invitation per Registered user of each job, carrying the user's
    // inviteCode in Apple's invitationEmail URL.
    let invited = invitations(&env);
    assert_eq!(invited.len(), 3 + 9, "{invited:?}");
    for (n, target, url) in &invited {
        assert_eq!(*n, 1, "{target} invited {n} times");
        let u = user(&env, target).await.expect("user known");
        assert_eq!(u["status"], "Registered", "{u}");
        let code = u["inviteCode"].as_str().unwrap();
        assert!(url.contains(&format!("inviteCode={code}")), "{url}");
        assert!(!url.contains("%25inviteCode%25"), "{url}");
    }
    assert!(!invited.iter().any(|(_, t, _)| t == "u3" || t == "ghost"));

    // One user accepts: its two installs go, the others still wait.
    env.sim.accept_invitation(&env.stoken, "u4").unwrap();
    let s = wait_until(&env, "rollout", "u4's installs released", |s| {
        s.installs.released == 4
    })
    .await;
    assert_eq!(s.users.associated, 2, "{s:?}");
    assert_eq!(s.state, JobState::Running);
    let by_target = installs_by_target(&env);
    assert_eq!(by_target.get("u4"), Some(&2));
    assert_eq!(by_target.get("u5"), None);
    assert_eq!(user(&env, "u4").await.unwrap()["status"], "Associated");

    // Everyone accepts: the job completes with every install released once.
    env.sim
        .set_invitation_acceptance(InvitationAcceptance::All)
        .unwrap();
    let s = wait_until(&env, "rollout", "completed", |s| {
        s.state == JobState::Completed
    })
    .await;
    assert_eq!((s.installs.released, s.installs.pending), (20, 0), "{s:?}");
    assert_eq!(s.users.associated, 10, "{s:?}");
    let by_target = installs_by_target(&env);
    for u in ids("u", 0..10) {
        assert_eq!(by_target.get(&u), Some(&2), "{u}: {by_target:?}");
    }
    assert!(env.commands().values().all(|(n, _, _)| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_notifications_event_status_and_get_users_sync_carry_the_users() {
    let mut config = user_env_config(100);
    config.notifications.drop_rate = 1.0;
    let env = env_with(config).await;
    let _daemon = start(&env, 0).await;
    let job = serde_json::json!({
        "id": "quiet", "token": "main",
        "assets": [{"adamId": adam(0)}],
        "associate": {"clientUserIds": ["q0", "q1"]},
        "users": [described("q0"), described("q1")],
    });
    let (code, body) = post_job(&env.admin(), &job).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_until(&env, "quiet", "confirmed and invited", |s| {
        s.assignments.confirmed == 2 && s.users.invited == 2
    })
    .await;
    assert_eq!((s.installs.released, s.installs.pending), (0, 2), "{s:?}");
    // They accept; no USER_ASSOCIATED arrives: a Get Users sync finds them.
    env.sim.accept_invitation(&env.stoken, "q0").unwrap();
    env.sim.accept_invitation(&env.stoken, "q1").unwrap();
    let s = wait_until(&env, "quiet", "completed", |s| {
        s.state == JobState::Completed
    })
    .await;
    assert_eq!((s.installs.released, s.users.associated), (2, 2), "{s:?}");
    assert!(
        env.sim
            .requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == "/users" && r.query.contains("q0")),
        "a Get Users sync"
    );
    assert!(env.commands().values().all(|(n, _, _)| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retiring_a_user_ends_the_wait_for_its_installs() {
    let env = env_with(user_env_config(100)).await;
    let _daemon = start(&env, 0).await;
    let job = serde_json::json!({
        "id": "waits", "token": "main",
        "assets": [{"adamId": adam(0)}],
        "associate": {"clientUserIds": ["r0", "r1"]},
        "users": [described("r0"), described("r1")],
    });
    let (code, body) = post_job(&env.admin(), &job).await;
    assert_eq!(code, 202, "{body}");
    wait_until(&env, "waits", "held", |s| {
        s.assignments.confirmed == 2 && s.users.invited == 2
    })
    .await;
    env.sim.accept_invitation(&env.stoken, "r0").unwrap();
    wait_until(&env, "waits", "r0 released", |s| s.installs.released == 1).await;

    let retire =
        serde_json::json!({"id": "retire", "token": "main", "retireUsers": ["r1", "nobody"]});
    let (code, body) = post_job(&env.admin(), &retire).await;
    assert_eq!(code, 202, "{body}");
    wait_until(&env, "retire", "completed", |s| {
        s.state == JobState::Completed
    })
    .await;
    // Only the active user is retired, in one request.
    assert_eq!(posts(&env, "/users/retire"), 1);
    assert_eq!(user(&env, "r1").await.unwrap()["status"], "Retired");
    let s = wait_until(&env, "waits", "completed", |s| {
        s.state == JobState::Completed
    })
    .await;
    assert_eq!((s.installs.released, s.installs.pending), (1, 0), "{s:?}");
    assert_eq!(installs_by_target(&env).get("r1"), None);

    // A user the job assigns to cannot also be retired by it.
    let bad = serde_json::json!({
        "token": "main", "assets": [{"adamId": adam(0)}],
        "associate": {"clientUserIds": ["x"]}, "retireUsers": ["x"],
    });
    let (code, body) = post_job(&env.admin(), &bad).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("retireUsers"),
        "{body}"
    );
    let bad = serde_json::json!({"token": "main", "users": [{"email": "a@b.example"}]});
    let (code, body) = post_job(&env.admin(), &bad).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("users[0].clientUserId"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_users_created_invitations_unacknowledged_and_installs_held() {
    let env = env_with(user_env_config(3)).await;
    // The MDM is down: nothing is acknowledged before the kill.
    env.sink.fail_with(503);
    let mut daemon = start(&env, 0).await;
    let users = ids("k", 0..7);
    let job = serde_json::json!({
        "id": "crash", "token": "main",
        "assets": [{"adamId": adam(0)}],
        "associate": {"clientUserIds": users},
        "users": users.iter().map(|u| described(u)).collect::<Vec<_>>(),
    });
    let (code, body) = post_job(&env.admin(), &job).await;
    assert_eq!(code, 202, "{body}");
    let s = wait_until(&env, "crash", "confirmed, installs held", |s| {
        s.assignments.confirmed == 7 && s.installs.pending == 7
    })
    .await;
    assert_eq!(s.users.invited, 0, "{s:?}");
    let created = posts(&env, "/users/create");
    assert_eq!(created, 3, "7 users, at most 3 a request");
    // Two accept while vppd is down.
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    env.sim.accept_invitation(&env.stoken, "k0").unwrap();
    env.sim.accept_invitation(&env.stoken, "k1").unwrap();

    env.sink.fail_with(0);
    let _daemon = start(&env, 1).await;
    let s = wait_until(&env, "crash", "invited, k0 and k1 released", |s| {
        s.users.invited == 7 && s.installs.released == 2
    })
    .await;
    assert_eq!(s.installs.pending, 5, "{s:?}");
    env.sim
        .set_invitation_acceptance(InvitationAcceptance::All)
        .unwrap();
    let s = wait_until(&env, "crash", "completed", |s| {
        s.state == JobState::Completed
    })
    .await;
    assert_eq!((s.installs.released, s.users.associated), (7, 7), "{s:?}");
    // Nothing created again, nothing delivered twice.
    assert_eq!(posts(&env, "/users/create"), created);
    assert_eq!(invitations(&env).len(), 7);
    assert!(
        env.commands().values().all(|(n, _, _)| *n == 1),
        "{:?}",
        env.commands()
    );
}

#[test]
fn demo_with_users_runs_a_user_rollout_and_shows_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppd"))
        .args([
            "demo",
            "--devices",
            "20",
            "--apps",
            "2",
            "--users",
            "150",
            "--quiet",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // 150 users, at most 100 a Create Users request: 2.
    assert!(text.contains("150 in 2 Create Users requests"), "{text}");
    assert!(
        text.contains("150 (150 InviteToProgram commands received, 0 repeated)"),
        "{text}"
    );
    assert!(text.contains("users associated"), "{text}");
    assert!(
        text.contains("300 (0 repeated, 0 before the user's invitation)"),
        "{text}"
    );
    assert!(
        text.contains("result                           OK"),
        "{text}"
    );
}
