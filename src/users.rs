//! User-based assignment: users made sure of at Apple before a job's
//! associations, invitations for those not yet linked to an Apple Account,
//! and installs for user targets held until their user is `Associated`.
//!
//! Two parts:
//! - [`ensure`], the users step of one job, run by the token's submitter
//!   before the job's first association (or, for a job without any, after
//!   its other phases): Get Users, then Create Users for the users the job
//!   describes and Apple lacks, Update Users for those whose `email` or
//!   `managedAppleId` changed, Retire Users for `retireUsers`, each in the
//!   fewest requests of at most `maxUsers`. Their events are followed like
//!   the others: the users a USER_MANAGEMENT notification reports (folded
//!   into the store by the applier), event status after
//!   `status_poll_after`, and a Get Users sync of what is still unknown.
//!   Then one store commit ([`crate::store::Store::users_ready`]) ends the
//!   step and writes an `InviteToProgram` command for every user of the job
//!   still `Registered`; a crash before it runs the step again (Get Users
//!   first, so nothing Apple already has is created twice), a crash after
//!   it never writes the invitations again.
//! - [`run`], one task per token: moves held installs to the outbox once
//!   their user is `Associated` (USER_ASSOCIATED or USER_MANAGEMENT, as the
//!   applier stored them, or a Get Users sync for users still waiting
//!   `sync_after`), drops those of retired users, and counts the jobs'
//!   associated users. A held install moves in the commit that removes it
//!   from the held set, so it is released once.
//!
//! A `clientUserId` the job does not describe is never created: if Apple
//! does not know it, its pairs fail (9609) as before.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apple::client::UsersQuery;
use crate::apple::types::{ManageUsersRequest, RequestUser, url_key};
use crate::apple::{AppleError, Client};
use crate::context::Context;
use crate::job::{JobSpec, JobUser, Target};
use crate::lifecycle::{BatchRecord, JobChange, now_ms};
use crate::pairs::pair;
use crate::report::{EventStatus, UserRecord};
use crate::retry::Backoff;
use crate::store::{Fold, OutboxAck, StoreError};

/// Apple's user `status` values.
pub mod status {
    pub const REGISTERED: &str = "Registered";
    pub const ASSOCIATED: &str = "Associated";
    pub const RETIRED: &str = "Retired";
    pub const DELETED: &str = "Deleted";
}

/// Apple's placeholder in `invitationEmail`, replaced by a user's code.
const INVITE_CODE_PLACEHOLDER: &str = "%25inviteCode%25";

/// Up to this many users are synced one Get Users (by `clientUserId`) each;
/// more are read in one walk of the whole list.
const SYNC_ONE_BY_ONE: usize = 10;

/// How often the held installs are looked at without news.
const HELD_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Apple(#[from] AppleError),
    #[error("shutting down")]
    Shutdown,
}

fn is_active(record: &UserRecord) -> bool {
    matches!(
        record.status.as_deref(),
        Some(status::REGISTERED | status::ASSOCIATED)
    )
}

fn is_gone(record: &UserRecord) -> bool {
    matches!(
        record.status.as_deref(),
        Some(status::RETIRED | status::DELETED)
    )
}

/// One record per `clientUserId`: Apple keeps the retired records of a user
/// created again beside its active one, and the active one is the user.
pub fn merge(records: impl IntoIterator<Item = UserRecord>) -> HashMap<String, UserRecord> {
    let mut out: HashMap<String, UserRecord> = HashMap::new();
    for r in records {
        match out.get(&r.client_user_id) {
            Some(have) if is_active(have) && !is_active(&r) => {}
            _ => {
                out.insert(r.client_user_id.clone(), r);
            }
        }
    }
    out
}

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
    event_id: Option<String>,
    change: Change,
    users: Vec<RequestUser>,
    next_poll: Instant,
    /// Event status reads that failed in a row.
    errors: u32,
}

/// Event status failing this often in a row for a user event: Get Users
/// tells what Apple made of it instead.
const STATUS_ERRORS_BEFORE_SYNC: u32 = 3;

/// Reads users from Apple: by `clientUserId` when few, else the whole list.
async fn read_users(client: &Client, ids: &[String]) -> Result<Vec<UserRecord>, AppleError> {
    let mut out = Vec::new();
    if ids.len() <= SYNC_ONE_BY_ONE {
        for id in ids {
            let walk = client
                .get_users(&UsersQuery {
                    client_user_id: Some(id.clone()),
                    ..Default::default()
                })
                .await?;
            out.extend(walk.items.into_iter().map(UserRecord::from));
        }
    } else {
        let walk = client.get_users(&UsersQuery::default()).await?;
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        out.extend(
            walk.items
                .into_iter()
                .filter(|u| wanted.contains(u.client_user_id.as_str()))
                .map(UserRecord::from),
        );
    }
    Ok(out)
}

/// Stores users as Apple reported them (one commit).
async fn store_users(
    ctx: &Context,
    token: &str,
    users: HashMap<String, UserRecord>,
) -> Result<(), StoreError> {
    if users.is_empty() {
        return Ok(());
    }
    ctx.store
        .fold(Fold {
            users: users
                .into_values()
                .map(|u| (token.to_string(), u))
                .collect(),
            ..Fold::default()
        })
        .await?;
    Ok(())
}

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
    store_users(ctx, token, known.clone()).await?;
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
    // Until each event is seen through: by what the applier stored from
    // USER_MANAGEMENT notifications, else event status.
    let mut to_sync: HashSet<String> = HashSet::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for p in pending {
            let mut seen = true;
            for u in &p.users {
                let record = ctx.store.user(token, &u.client_user_id).await?;
                if !p.change.shows(u, record.as_ref()) {
                    seen = false;
                    break;
                }
            }
            if seen {
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
            match client.event_status(&event_id).await {
                Ok(raw) => {
                    let finished = EventStatus::from(&raw) != EventStatus::Pending;
                    if finished {
                        tracing::info!(job = %spec.id, %event_id, change = p.change.as_str(), status = %raw.event_status, "user event finished");
                        to_sync.extend(p.users.iter().map(|u| u.client_user_id.clone()));
                        continue;
                    }
                    still.push(Pending {
                        next_poll: Instant::now() + ctx.tracking.status_poll_interval,
                        errors: 0,
                        ..p
                    });
                }
                Err(e) if e.is_unknown_event() => {
                    to_sync.extend(p.users.iter().map(|u| u.client_user_id.clone()));
                }
                Err(e) if e.is_token_refused() => return Err(e.into()),
                Err(error) if p.errors + 1 >= STATUS_ERRORS_BEFORE_SYNC => {
                    tracing::warn!(job = %spec.id, %event_id, %error, "cannot read a user event's status; Get Users will tell");
                    to_sync.extend(p.users.iter().map(|u| u.client_user_id.clone()));
                }
                Err(error) => {
                    tracing::warn!(job = %spec.id, %event_id, %error, "cannot read a user event's status; will ask again");
                    let errors = p.errors + 1;
                    still.push(Pending {
                        next_poll: Instant::now() + ctx.tracking.status_poll_interval,
                        errors,
                        ..p
                    });
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
    if !to_sync.is_empty() {
        let ids: Vec<String> = to_sync.into_iter().collect();
        let synced = merge(read_users(client, &ids).await?);
        store_users(ctx, token, synced).await?;
    }
    // The job's users as Apple has them now: invitations for those still
    // `Registered`, and those already `Associated`.
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
        .filter(|(_, r)| {
            r.as_ref()
                .is_some_and(|r| r.status.as_deref() == Some(status::ASSOCIATED))
        })
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
) -> Result<Option<String>, UsersError> {
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

/// Moves the held installs of `token` to the outbox as their users become
/// `Associated`, until shutdown.
pub async fn run(ctx: Arc<Context>, entry: Arc<crate::tokens::Token>) {
    let client = entry.client().clone();
    let token = entry.name().to_string();
    let mut specs: HashMap<String, Arc<JobSpec>> = HashMap::new();
    let mut batches: HashMap<(String, u32), Arc<BatchRecord>> = HashMap::new();
    // When each waiting user was last synced with Get Users.
    let mut synced: HashMap<String, u64> = HashMap::new();
    // Whether the token may have jobs whose users are to be counted: all
    // jobs are read to know, so a token without any skips that on the
    // poll (a thousand tokens each reading every job every second kept
    // both cores busy and held a copy of every job per token).
    let mut count = true;
    loop {
        if ctx.is_shutting_down() || entry.is_removed() {
            return;
        }
        // Armed before the pass: news that comes during it is not lost.
        let news = ctx.wake_users.notified();
        tokio::pin!(news);
        news.as_mut().enable();
        match pass(
            &ctx,
            &client,
            &token,
            &mut specs,
            &mut batches,
            &mut synced,
            count,
        )
        .await
        {
            Ok(users_pending) => count = users_pending,
            Err(UsersError::Shutdown) => return,
            Err(error) => {
                tracing::warn!(token = %token, %error, "cannot follow users; will retry");
                if !ctx.sleep(Duration::from_secs(2)).await {
                    return;
                }
            }
        }
        if specs.len() > 1024 {
            specs.clear();
        }
        if batches.len() > 4096 {
            batches.clear();
        }
        tokio::select! {
            _ = &mut news => count = true,
            _ = tokio::time::sleep(HELD_POLL) => {}
            _ = ctx.shutdown_signal() => return,
        }
    }
}

async fn pass(
    ctx: &Context,
    client: &Client,
    token: &str,
    specs: &mut HashMap<String, Arc<JobSpec>>,
    batches: &mut HashMap<(String, u32), Arc<BatchRecord>>,
    synced: &mut HashMap<String, u64>,
    count: bool,
) -> Result<bool, UsersError> {
    let store = &ctx.store;
    let held = store.held(token).await?;
    let count = count || !held.is_empty();
    let mut records: HashMap<String, Option<UserRecord>> = HashMap::new();
    let mut release: Vec<OutboxAck> = Vec::new();
    let mut drop: Vec<OutboxAck> = Vec::new();
    // Users still waiting, with the oldest confirmation held for them.
    let mut waiting: HashMap<String, u64> = HashMap::new();
    for item in &held {
        let entry = &item.entry;
        let spec = match specs.get(&entry.job_id) {
            Some(s) => s.clone(),
            None => match store.spec(&entry.job_id).await? {
                Some(s) => {
                    specs.insert(entry.job_id.clone(), s.clone());
                    s
                }
                None => continue,
            },
        };
        let key = (entry.job_id.clone(), entry.batch);
        let batch = match batches.get(&key) {
            Some(b) => b.clone(),
            None => match store.batch(&entry.job_id, entry.batch).await? {
                Some(b) => {
                    let b = Arc::new(b);
                    batches.insert(key, b.clone());
                    b
                }
                None => continue,
            },
        };
        let (mut up, mut gone) = (Vec::new(), Vec::new());
        for &p in &entry.pairs {
            let Some(Target::User(user)) = pair(&spec, &batch, p).map(|x| x.target) else {
                continue;
            };
            if !records.contains_key(user) {
                records.insert(user.to_string(), store.user(token, user).await?);
            }
            match records.get(user).and_then(Option::as_ref) {
                Some(r) if r.status.as_deref() == Some(status::ASSOCIATED) => up.push(p),
                Some(r) if is_gone(r) => gone.push(p),
                _ => {
                    let at = waiting
                        .entry(user.to_string())
                        .or_insert(entry.confirmed_ms);
                    *at = (*at).min(entry.confirmed_ms);
                }
            }
        }
        if !up.is_empty() {
            release.push(OutboxAck {
                entry: item.id,
                pairs: up,
            });
        }
        if !gone.is_empty() {
            drop.push(OutboxAck {
                entry: item.id,
                pairs: gone,
            });
        }
    }
    if !release.is_empty() || !drop.is_empty() {
        let settled = store.settle_held(token, &release, &drop).await?;
        if settled.released > 0 {
            tracing::debug!(
                token,
                installs = settled.released,
                "held installs released: their users are associated"
            );
            ctx.wake_release.notify_one();
        }
        if settled.dropped > 0 {
            tracing::info!(
                token,
                installs = settled.dropped,
                "held installs dropped: their users were retired"
            );
        }
        for (job, state) in settled.finished {
            tracing::info!(%job, state = state.as_str(), "job finished");
        }
    }
    let users_pending = count && count_associated(ctx, token).await?;
    // Users still waiting `sync_after` since their install was held, and
    // not synced for as long: Get Users tells whether they linked.
    let now = now_ms();
    let after = ctx.tracking.sync_after.as_millis() as u64;
    let due: Vec<String> = waiting
        .into_iter()
        .filter(|(u, at)| {
            now.saturating_sub(*at) >= after
                && synced
                    .get(u)
                    .is_none_or(|last| now.saturating_sub(*last) >= after)
        })
        .map(|(u, _)| u)
        .collect();
    synced.retain(|_, last| now.saturating_sub(*last) < after.saturating_mul(4).max(60_000));
    if !due.is_empty() {
        tracing::info!(
            token,
            users = due.len(),
            "users still waiting to be associated; syncing with Get Users"
        );
        let users = merge(read_users(client, &due).await?);
        for u in &due {
            synced.insert(u.clone(), now);
        }
        store_users(ctx, token, users).await?;
        ctx.wake_users.notify_waiters();
    }
    Ok(users_pending)
}

/// Counts, per unfinished job of `token` whose users step is done, the
/// user targets now `Associated`; whether such a job still waits for some.
async fn count_associated(ctx: &Context, token: &str) -> Result<bool, UsersError> {
    let store = &ctx.store;
    let mut pending = false;
    for job in store.jobs_of(token).await? {
        if job.state().is_final() {
            continue;
        }
        let Some(progress) = job.users() else {
            continue;
        };
        if progress.all_associated() {
            continue;
        }
        pending = true;
        if !progress.ready() {
            continue;
        }
        let Some(spec) = store.spec(job.id()).await? else {
            continue;
        };
        let mut now_associated = Vec::new();
        for (i, u) in spec.job_users().into_iter().enumerate() {
            if progress.is_associated(i as u32) {
                continue;
            }
            if store
                .user(token, u)
                .await?
                .is_some_and(|r| r.status.as_deref() == Some(status::ASSOCIATED))
            {
                now_associated.push(i as u32);
            }
        }
        if !now_associated.is_empty() {
            store
                .update_job(job.id(), JobChange::UsersAssociated(now_associated))
                .await?;
        }
    }
    Ok(pending)
}

/// `GET /v1/tokens/{name}/users[?clientUserId=…]`: the token's users as
/// vppd last learned them (Get Users, USER_MANAGEMENT, USER_ASSOCIATED):
/// `{"users": [{"clientUserId", "email", "inviteCode", "idHash", "status"}]}`,
/// only the one named when `clientUserId` is given (none if unknown).
pub async fn document(
    ctx: &Context,
    token: &str,
    query: &[(String, String)],
) -> hyper::Response<crate::http::Body> {
    use hyper::StatusCode;
    let fail = |status: StatusCode, message: String| {
        crate::http::json(status, &serde_json::json!({ "error": message }))
    };
    if !ctx.tokens.contains(token)
        && let Err(e) = crate::token_sync::sync(ctx).await
    {
        return fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    if !ctx.tokens.contains(token) {
        return fail(StatusCode::NOT_FOUND, format!("no token `{token}`"));
    }
    let wanted = query
        .iter()
        .find(|(k, _)| k == "clientUserId")
        .map(|(_, v)| v.as_str());
    let users = match wanted {
        Some("") => {
            return fail(
                StatusCode::BAD_REQUEST,
                "clientUserId: must not be empty".into(),
            );
        }
        Some(id) => ctx
            .store
            .user(token, id)
            .await
            .map(|u| u.into_iter().collect()),
        None => ctx.store.users(token).await,
    };
    match users {
        Ok(users) => crate::http::json(
            StatusCode::OK,
            &serde_json::json!({ "users": users as Vec<UserRecord> }),
        ),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, status: &str) -> UserRecord {
        UserRecord {
            client_user_id: id.into(),
            status: Some(status.into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_active_record_wins() {
        let merged = merge([
            user("a", status::RETIRED),
            user("a", status::REGISTERED),
            user("a", status::RETIRED),
            user("b", status::RETIRED),
        ]);
        assert_eq!(merged["a"].status.as_deref(), Some(status::REGISTERED));
        assert_eq!(merged["b"].status.as_deref(), Some(status::RETIRED));
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
        let r: crate::job::JobRequest = serde_json::from_value(serde_json::json!({
            "token": "main",
            "assets": [{"adamId": "1"}],
            "associate": {"clientUserIds": ["u1"]},
            "users": users,
            "retireUsers": retire,
        }))
        .unwrap();
        r.validate(|_| true, crate::job::JobLimits::NONE).unwrap()
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
