//! `vppd demo --users N`: after the device job, a user-based rollout. The
//! job describes N users (none exists at Apple yet) and assigns every app
//! to them; the simulator's users accept their invitations over time (a
//! rate, so that it takes a few seconds), and the summary shows users
//! created, invited and associated and the installs released, each of
//! which must reach the MDM once and only after its user linked.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::cli::sink::{Received, Sink, adam_id};
use crate::domain::job::{JobStatus, RequestType};
use crate::sim::{InvitationAcceptance, Simulator};

/// What can stop the user rollout; the demo reports it as its own.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("demo setup: {0}")]
    Setup(String),
    #[error("demo: {0}")]
    Run(String),
}

pub fn user_id(i: usize) -> String {
    format!("demo-user-{i:06}")
}

/// How long the simulated people take, together, to accept: the rate is
/// set so that all of them have accepted after about this long.
const ACCEPTANCE_SPREAD_SECS: f64 = 4.0;

#[derive(Debug, Clone)]
pub struct UsersReport {
    pub users: usize,
    pub apps: usize,
    pub job_state: String,
    /// Create Users requests Apple answered.
    pub create_requests: u64,
    /// What the job's status document counts.
    pub invited: u64,
    pub associated: u64,
    pub installs_released: u64,
    /// Distinct `InviteToProgram` commands the MDM received, and repeats.
    pub invitations_received: u64,
    pub invitations_repeated: u64,
    /// Distinct user installs the MDM received, repeats, and installs that
    /// reached the MDM before their user's invitation (so before the user
    /// could have accepted).
    pub installs_received: u64,
    pub installs_repeated: u64,
    pub installs_early: u64,
    pub acceptance_per_second: f64,
    pub wall: Duration,
}

impl UsersReport {
    pub fn ok(&self) -> bool {
        let expected = (self.users * self.apps) as u64;
        self.job_state == "completed"
            && self.invited == self.users as u64
            && self.associated == self.users as u64
            && self.invitations_received == self.users as u64
            && self.invitations_repeated == 0
            && self.installs_released == expected
            && self.installs_received == expected
            && self.installs_repeated == 0
            && self.installs_early == 0
    }

    pub fn render(&self, s: &mut String) {
        let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("  {k:<32} {v}\n"));
        line(
            s,
            "user rollout",
            format!("{} users x {} apps", self.users, self.apps),
        );
        line(s, "user job state", self.job_state.clone());
        line(
            s,
            "users created",
            format!(
                "{} in {} Create Users requests",
                self.users, self.create_requests
            ),
        );
        line(
            s,
            "users invited",
            format!(
                "{} ({} InviteToProgram commands received, {} repeated)",
                self.invited, self.invitations_received, self.invitations_repeated
            ),
        );
        line(
            s,
            "users associated",
            format!(
                "{} (accepting at {:.0}/s)",
                self.associated, self.acceptance_per_second
            ),
        );
        line(
            s,
            "user installs released",
            format!(
                "{} ({} repeated, {} before the user's invitation)",
                self.installs_received, self.installs_repeated, self.installs_early
            ),
        );
        line(
            s,
            "user rollout time",
            format!("{:.2} s", self.wall.as_secs_f64()),
        );
    }
}

/// Submits the user job: every app to `users` users none of whom exists
/// at Apple yet.
async fn submit(
    http: &reqwest::Client,
    admin: &str,
    users: usize,
    apps: usize,
) -> Result<(), UsersError> {
    let ids: Vec<String> = (0..users).map(user_id).collect();
    let job = serde_json::json!({
        "id": "users",
        "token": "demo",
        "assets": (0..apps).map(|i| serde_json::json!({"adamId": adam_id(i), "pricingParam": "STDQ"})).collect::<Vec<_>>(),
        "associate": {"clientUserIds": ids},
        "users": ids.iter().map(|u| serde_json::json!({"clientUserId": u, "email": format!("{u}@demo.example")})).collect::<Vec<_>>(),
    });
    let resp = http
        .post(format!("{admin}/v1/jobs"))
        .json(&job)
        .send()
        .await
        .map_err(|e| UsersError::Run(format!("submitting the user job: {e}")))?;
    if resp.status() != StatusCode::ACCEPTED {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(UsersError::Run(format!(
            "user job refused: {status} {body}"
        )));
    }
    Ok(())
}

fn progress_line(s: &JobStatus) {
    use std::io::Write;
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r  users: {} invited, {} associated of {}; {} installs released, {} waiting  ",
        s.users.invited, s.users.associated, s.users.total, s.installs.released, s.installs.pending
    );
    let _ = err.flush();
}

/// Follows the user job until it is final or the deadline passes; once
/// every user was invited, the simulated people start accepting at
/// `per_second`. Its last status.
async fn follow(
    http: &reqwest::Client,
    admin: &str,
    sim: &Simulator,
    (users, per_second): (usize, f64),
    progress: bool,
    deadline: Instant,
) -> Result<Option<JobStatus>, UsersError> {
    let mut accepting = false;
    let mut status: Option<JobStatus> = None;
    loop {
        if let Ok(r) = http.get(format!("{admin}/v1/jobs/users")).send().await
            && let Ok(s) = r.json::<JobStatus>().await
        {
            if progress {
                progress_line(&s);
            }
            if !accepting && s.users.invited >= users as u64 {
                accepting = true;
                sim.set_invitation_acceptance(InvitationAcceptance::Rate { per_second })
                    .map_err(|e| UsersError::Setup(format!("simulator: {e}")))?;
            }
            let done = s.state.is_final();
            status = Some(s);
            if done {
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if progress {
        eprintln!();
    }
    Ok(status)
}

/// The MDM's view of the user commands, from what it received in order of
/// first arrival.
#[derive(Default)]
struct Seen {
    /// Invitations per user, repeats included.
    invitations: HashMap<String, u64>,
    /// Installs per (app, user), repeats included.
    installs: HashMap<(String, String), u64>,
    /// Installs that arrived before their user's invitation had even been
    /// released (the user could not have accepted yet).
    early: u64,
}

impl Seen {
    fn of(received: Vec<Received>) -> Seen {
        let mut seen = Seen::default();
        for r in received {
            let times = u64::from(r.times);
            let target = r.target().to_string();
            match r.kind {
                Some(RequestType::InviteToProgram) => {
                    *seen.invitations.entry(target).or_default() += times
                }
                Some(RequestType::InstallApplication) if target.starts_with("demo-user-") => {
                    if !seen.invitations.contains_key(&target) {
                        seen.early += times;
                    }
                    *seen.installs.entry((r.adam_id, target)).or_default() += times;
                }
                _ => {}
            }
        }
        seen
    }
}

/// The user rollout, after the device job completed.
pub async fn run(
    users: usize,
    apps: usize,
    admin: &str,
    sim: &Simulator,
    sink: &Sink,
    progress: bool,
    deadline: Instant,
) -> Result<UsersReport, UsersError> {
    let started = Instant::now();
    let http = reqwest::Client::new();
    let before = sim.requests().len();
    let seen_before = sink.received().len();
    let per_second = (users as f64 / ACCEPTANCE_SPREAD_SECS).max(1.0);
    // People accept once their invitation reached them (the MDM), not before.
    sim.set_invitation_acceptance(InvitationAcceptance::Off)
        .map_err(|e| UsersError::Setup(format!("simulator: {e}")))?;
    submit(&http, admin, users, apps).await?;
    let status = follow(&http, admin, sim, (users, per_second), progress, deadline)
        .await?
        .ok_or_else(|| UsersError::Run("no status of the user job".into()))?;
    let create_requests = sim.requests()[before..]
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/users/create" && r.status == 200)
        .count() as u64;
    let seen = Seen::of(sink.received().into_iter().skip(seen_before).collect());
    Ok(UsersReport {
        users,
        apps,
        job_state: status.state.as_str().to_string(),
        create_requests,
        invited: status.users.invited,
        associated: status.users.associated,
        installs_released: status.installs.released,
        invitations_received: seen.invitations.len() as u64,
        invitations_repeated: seen.invitations.values().map(|n| n - 1).sum(),
        installs_received: seen.installs.len() as u64,
        installs_repeated: seen.installs.values().map(|n| n - 1).sum(),
        installs_early: seen.early,
        acceptance_per_second: per_second,
        wall: started.elapsed(),
    })
}
