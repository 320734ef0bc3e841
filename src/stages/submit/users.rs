//! The users step of a job, run by the token's submitter before the job's
//! first association (or, for a job without any, after its other phases):
//! Get Users, then Create Users for the users the job describes and Apple
//! lacks, Update Users for those whose `email` or `managedAppleId`
//! changed, Retire Users for `retireUsers`, each in the fewest requests of
//! at most `maxUsers`. These are management requests, so they leave from
//! the submitter, like the token's batches. Their events are followed like
//! the others: the users a USER_MANAGEMENT notification reports (folded
//! into the store by the applier), event status after `status_poll_after`,
//! and a Get Users sync of what is still unknown. Then one store commit
//! ([`crate::store::Store::users_ready`]) ends the step and writes an
//! `InviteToProgram` command for every user of the job still `Registered`;
//! a crash before it runs the step again (Get Users first, so nothing Apple
//! already has is created twice), a crash after it never writes the
//! invitations again.
//!
//! A `clientUserId` the job does not describe is never created: if Apple
//! does not know it, its pairs fail (9609) as before.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::apple::types::{ManageUsersRequest, RequestUser, url_key};
use crate::apple::{AppleError, Client};
use crate::domain::job::{JobSpec, JobUser};
use crate::domain::report::{EventStatus, UserRecord};
use crate::domain::retry::Backoff;
use crate::runtime::context::Context;
use crate::runtime::user_records::{
    UsersError, is_active, is_associated, is_gone, merge, read_users, status, store_users,
};
use crate::store::{EventId, StoreError};

/// Apple's placeholder in `invitationEmail`, replaced by a user's code.
const INVITE_CODE_PLACEHOLDER: &str = "%25inviteCode%25";

/// The `invitationUrl` of a user: service config's `invitationEmail` with
/// the user's `inviteCode` in place of Apple's placeholder.
pub fn invitation_url(template: &str, invite_code: &str) -> String {
    if template.contains(INVITE_CODE_PLACEHOLDER) {
        template.replace(INVITE_CODE_PLACEHOLDER, invite_code)
    } else {
        template.replace("%inviteCode%", invite_code)
    }
}

/// What the users step sends for one kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Create,
    Update,
    Retire,
}

impl Change {
    fn as_str(self) -> &'static str {
        match self {
            Change::Create => "create",
            Change::Update => "update",
            Change::Retire => "retire",
        }
    }

    /// Whether Apple's record shows the change made.
    fn shows(self, wanted: &RequestUser, record: Option<&UserRecord>) -> bool {
        let Some(r) = record else {
            return false;
        };
        match self {
            Change::Create => is_active(r),
            Change::Update => {
                is_active(r)
                    && wanted
                        .email
                        .as_ref()
                        .is_none_or(|e| r.email.as_ref() == Some(e))
                    && (wanted.managed_apple_id.is_none()
                        || r.status.as_deref() == Some(status::ASSOCIATED))
            }
            Change::Retire => is_gone(r),
        }
    }
}

/// The requests the users step needs, given what Apple has: users the job
/// describes and Apple lacks are created, those whose `email` changed or
/// that a `managedAppleId` is to link are updated, and `retireUsers` still
/// active are retired.
fn changes(spec: &JobSpec, known: &HashMap<String, UserRecord>) -> Vec<(Change, RequestUser)> {
    let request = |u: &JobUser| RequestUser {
        client_user_id: u.client_user_id.clone(),
        email: u.email.clone(),
        managed_apple_id: u.managed_apple_id.clone(),
    };
    let mut out = Vec::new();
    for u in &spec.users {
        match known.get(&u.client_user_id).filter(|r| is_active(r)) {
            None => out.push((Change::Create, request(u))),
            Some(r) => {
                let email_changed = u.email.is_some() && u.email != r.email;
                let to_link =
                    u.managed_apple_id.is_some() && r.status.as_deref() != Some(status::ASSOCIATED);
                if email_changed || to_link {
                    out.push((Change::Update, request(u)));
                }
            }
        }
    }
    for id in &spec.retire_users {
        if known.get(id).is_some_and(is_active) {
            out.push((
                Change::Retire,
                RequestUser {
                    client_user_id: id.clone(),
                    email: None,
                    managed_apple_id: None,
                },
            ));
        }
    }
    out
}

/// Requests of at most `max_users` users each, per kind of change: the
/// minimum number.
fn chunks(
    changes: Vec<(Change, RequestUser)>,
    max_users: usize,
) -> Vec<(Change, Vec<RequestUser>)> {
    let mut out: Vec<(Change, Vec<RequestUser>)> = Vec::new();
    for kind in [Change::Create, Change::Update, Change::Retire] {
        let users: Vec<RequestUser> = changes
            .iter()
            .filter(|(c, _)| *c == kind)
            .map(|(_, u)| u.clone())
            .collect();
        for chunk in users.chunks(max_users.max(1)) {
            out.push((kind, chunk.to_vec()));
        }
    }
    out
}

/// A user event sent and not yet seen through.
struct Pending {
    event_id: Option<EventId>,
    change: Change,
    users: Vec<RequestUser>,
    next_poll: Instant,
    /// Event status reads that failed in a row.
    errors: u32,
}

/// Event status failing this often in a row for a user event: Get Users
/// tells what Apple made of it instead.
const STATUS_ERRORS_BEFORE_SYNC: u32 = 3;

/// The users of the job and those it retires: what the step reads.
fn step_ids(spec: &JobSpec) -> Vec<String> {
    let mut ids: Vec<String> = spec.job_users().into_iter().map(String::from).collect();
    ids.extend(spec.retire_users.iter().cloned());
    ids
}

/// Runs the users step of `spec` on `token` (see the module docs) and
/// records its end. Returns once the step is recorded, or with the error
/// that stopped it (the submitter tries again).
pub async fn ensure(ctx: &Context, client: &Client, spec: &JobSpec) -> Result<(), UsersError> {
    let token = spec.token.as_str();
    let ids = step_ids(spec);
    // What Apple has now: nothing it has is created again, also when a
    // crash interrupted this step before.
    let known = merge(read_users(client, &ids).await?);
    store_users(&*ctx.store, token, known.clone()).await?;
    let needed = changes(spec, &known);
    let max_users = client.limits().max_users as usize;
    let mut pending: Vec<Pending> = Vec::new();
    for (change, users) in chunks(needed, max_users) {
        let event_id = send(ctx, client, spec, change, &users).await?;
        let now = Instant::now();
        pending.push(Pending {
            event_id,
            change,
            users,
            next_poll: now + ctx.tracking.status_poll_after,
            errors: 0,
        });
    }
    let to_sync = follow(ctx, client, spec, pending).await?;
    if !to_sync.is_empty() {
        let ids: Vec<String> = to_sync.into_iter().collect();
        let synced = merge(read_users(client, &ids).await?);
        store_users(&*ctx.store, token, synced).await?;
    }
    finish(ctx, client, spec).await
}

/// Follows the step's user events until each is seen through: by what the
/// applier stored from USER_MANAGEMENT notifications, else event status.
/// Returns the users whose outcome Get Users is to tell.
async fn follow(
    ctx: &Context,
    client: &Client,
    spec: &JobSpec,
    mut pending: Vec<Pending>,
) -> Result<HashSet<String>, UsersError> {
    let token = spec.token.as_str();
    let mut to_sync: HashSet<String> = HashSet::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for p in pending {
            if seen_through(ctx, token, &p).await? {
                continue;
            }
            let Some(event_id) = p.event_id.clone() else {
                // The answer was lost: Get Users tells what Apple made of it.
                to_sync.extend(p.users.iter().map(|u| u.client_user_id.clone()));
                continue;
            };
            if Instant::now() < p.next_poll {
                still.push(p);
                continue;
            }
            match poll(ctx, client, spec, &event_id, p).await? {
                Polled::Again(p) => still.push(p),
                Polled::Sync(users) => {
                    to_sync.extend(users.into_iter().map(|u| u.client_user_id));
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if !ctx.wait(&ctx.wake_users, Duration::from_millis(500)).await {
            return Err(UsersError::Shutdown);
        }
    }
    Ok(to_sync)
}

/// Whether the store shows every change of `p` made.
async fn seen_through(ctx: &Context, token: &str, p: &Pending) -> Result<bool, StoreError> {
    for u in &p.users {
        let record = ctx.store.user(token, &u.client_user_id).await?;
        if !p.change.shows(u, record.as_ref()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What one event status read of a user event leaves to do.
enum Polled {
    /// Asked about again later.
    Again(Pending),
    /// Over (or not to be learned from event status): Get Users tells
    /// what Apple made of these users.
    Sync(Vec<RequestUser>),
}

/// Reads the status of the user event `event_id` of `p`.
async fn poll(
    ctx: &Context,
    client: &Client,
    spec: &JobSpec,
    event_id: &EventId,
    p: Pending,
) -> Result<Polled, UsersError> {
    let again = |p: Pending, errors: u32| {
        Polled::Again(Pending {
            next_poll: Instant::now() + ctx.tracking.status_poll_interval,
            errors,
            ..p
        })
    };
    match client.event_status(event_id).await {
        Ok(raw) => {
            if EventStatus::from(&raw) == EventStatus::Pending {
                return Ok(again(p, 0));
            }
            tracing::info!(job = %spec.id, %event_id, change = p.change.as_str(), status = %raw.event_status, "user event finished");
            Ok(Polled::Sync(p.users))
        }
        Err(e) if e.is_unknown_event() => Ok(Polled::Sync(p.users)),
        Err(e) if e.is_token_refused() => Err(e.into()),
        Err(error) if p.errors + 1 >= STATUS_ERRORS_BEFORE_SYNC => {
            tracing::warn!(job = %spec.id, %event_id, %error, "cannot read a user event's status; Get Users will tell");
            Ok(Polled::Sync(p.users))
        }
        Err(error) => {
            tracing::warn!(job = %spec.id, %event_id, %error, "cannot read a user event's status; will ask again");
            let errors = p.errors + 1;
            Ok(again(p, errors))
        }
    }
}

/// Ends the step with the job's users as Apple has them now: invitations
/// for those still `Registered`, and those already `Associated`, in one
/// commit ([`crate::store::Store::users_ready`]).
async fn finish(ctx: &Context, client: &Client, spec: &JobSpec) -> Result<(), UsersError> {
    let token = spec.token.as_str();
    let job_users = spec.job_users();
    let mut records: Vec<Option<UserRecord>> = Vec::with_capacity(job_users.len());
    for u in &job_users {
        records.push(ctx.store.user(token, u).await?);
    }
    let registered: Vec<(&str, &str)> = job_users
        .iter()
        .zip(&records)
        .filter_map(|(u, r)| {
            let r = r.as_ref()?;
            (r.status.as_deref() == Some(status::REGISTERED))
                .then_some(())
                .and(r.invite_code.as_deref())
                .map(|code| (*u, code))
        })
        .collect();
    let mut invitations = Vec::with_capacity(registered.len());
    if !registered.is_empty() {
        let config = client.service_config().await?;
        let Some(template) = config.urls.get(url_key::INVITATION_EMAIL) else {
            tracing::error!(job = %spec.id, token, "Apple's service config has no invitationEmail URL; users stay uninvited");
            return Err(UsersError::Apple(AppleError::Decode {
                endpoint: "service_config",
                message: "no invitationEmail in urls".into(),
            }));
        };
        for (u, code) in registered {
            invitations.push((u.to_string(), invitation_url(template, code)));
        }
    }
    let associated: Vec<u32> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.as_ref().is_some_and(is_associated))
        .map(|(i, _)| i as u32)
        .collect();
    if ctx
        .store
        .users_ready(&spec.id, &invitations, &associated)
        .await?
    {
        tracing::info!(job = %spec.id, token, users = job_users.len(), invitations = invitations.len(), associated = associated.len(), "users step done");
        if !invitations.is_empty() {
            ctx.wake_release.notify_one();
        }
    }
    ctx.wake_users.notify_waiters();
    Ok(())
}

/// Sends one user request until Apple answers; its eventId, `None` when
/// the answer was lost (Get Users then tells what Apple did). A request
/// Apple refuses outright is logged and skipped: its users stay as they
/// are (an undescribed-like user whose pairs fail 9609).
async fn send(
    ctx: &Context,
    client: &Client,
    spec: &JobSpec,
    change: Change,
    users: &[RequestUser],
) -> Result<Option<EventId>, UsersError> {
    let request = ManageUsersRequest {
        users: users.to_vec(),
    };
    let mut retry = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
    loop {
        if ctx.is_shutting_down() {
            return Err(UsersError::Shutdown);
        }
        let result = match change {
            Change::Create => client.create_users(&request).await,
            Change::Update => client.update_users(&request).await,
            Change::Retire => client.retire_users(&request).await,
        };
        match result {
            Ok(event) => {
                tracing::info!(job = %spec.id, change = change.as_str(), users = users.len(), event_id = %event.event_id, "user request accepted by Apple");
                return Ok(Some(event.event_id));
            }
            Err(AppleError::UnknownOutcome { .. } | AppleError::Decode { .. }) => {
                tracing::warn!(job = %spec.id, change = change.as_str(), "user request outcome unknown; Get Users will tell");
                return Ok(None);
            }
            Err(e) if e.is_token_refused() => return Err(e.into()),
            Err(e) if e.is_retryable() || matches!(e, AppleError::Transport { .. }) => {
                let delay = retry.next_delay();
                tracing::warn!(job = %spec.id, error = %e, retry_in = ?delay, "Apple unreachable or busy; retrying the user request");
                if !ctx.sleep(delay).await {
                    return Err(UsersError::Shutdown);
                }
            }
            Err(e) => {
                tracing::warn!(job = %spec.id, change = change.as_str(), error = %e, "Apple refused the user request; its users stay as Apple has them");
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, status: &str) -> UserRecord {
        UserRecord::with_status(id, status)
    }

    #[test]
    fn invitation_url_substitutes_the_code() {
        let t = "https://buy.itunes.apple.com/WebObjects/MZFinance.woa/wa/associateVPPUserWithITSAccount?inviteCode=%25inviteCode%25&mt=8";
        assert_eq!(
            invitation_url(t, "abc"),
            "https://buy.itunes.apple.com/WebObjects/MZFinance.woa/wa/associateVPPUserWithITSAccount?inviteCode=abc&mt=8"
        );
    }

    fn spec(users: Vec<JobUser>, retire: Vec<&str>) -> JobSpec {
        let r: crate::domain::job::JobRequest = serde_json::from_value(serde_json::json!({
            "token": "main",
            "assets": [{"adamId": "1"}],
            "associate": {"clientUserIds": ["u1"]},
            "users": users,
            "retireUsers": retire,
        }))
        .unwrap();
        r.validate(|_| true, crate::domain::job::JobLimits::NONE)
            .unwrap()
    }

    fn described(id: &str, email: Option<&str>, managed: Option<&str>) -> JobUser {
        JobUser {
            client_user_id: id.into(),
            email: email.map(String::from),
            managed_apple_id: managed.map(String::from),
        }
    }

    #[test]
    fn only_what_apple_lacks_is_sent_in_the_fewest_requests() {
        let users: Vec<JobUser> = (0..25)
            .map(|i| described(&format!("u{i}"), Some(&format!("u{i}@x.example")), None))
            .collect();
        let spec = spec(users, vec!["old-1", "old-2"]);
        let mut known = HashMap::new();
        // u0 exists as described, u1 with another email, u2 retired (so
        // created again); old-1 active, old-2 unknown.
        known.insert(
            "u0".into(),
            UserRecord {
                email: Some("u0@x.example".into()),
                ..user("u0", status::REGISTERED)
            },
        );
        known.insert(
            "u1".into(),
            UserRecord {
                email: Some("before@x.example".into()),
                ..user("u1", status::ASSOCIATED)
            },
        );
        known.insert("u2".into(), user("u2", status::RETIRED));
        known.insert("old-1".into(), user("old-1", status::ASSOCIATED));
        let c = changes(&spec, &known);
        let count = |k: Change| c.iter().filter(|(x, _)| *x == k).count();
        assert_eq!(count(Change::Create), 23);
        assert_eq!(count(Change::Update), 1);
        assert_eq!(count(Change::Retire), 1);
        let requests = chunks(c, 10);
        // ceil(23/10) + 1 + 1
        assert_eq!(requests.len(), 5);
        assert!(requests.iter().all(|(_, u)| u.len() <= 10));
    }

    #[test]
    fn a_change_is_seen_in_apples_record() {
        let wanted = RequestUser {
            client_user_id: "u".into(),
            email: Some("n@x.example".into()),
            managed_apple_id: Some("u@school.example".into()),
        };
        assert!(!Change::Create.shows(&wanted, None));
        assert!(Change::Create.shows(&wanted, Some(&user("u", status::REGISTERED))));
        assert!(!Change::Update.shows(&wanted, Some(&user("u", status::ASSOCIATED))));
        let updated = UserRecord {
            email: Some("n@x.example".into()),
            ..user("u", status::ASSOCIATED)
        };
        assert!(Change::Update.shows(&wanted, Some(&updated)));
        assert!(Change::Retire.shows(&wanted, Some(&user("u", status::RETIRED))));
    }
}
