//! User-based assignment, the part that follows users after the users
//! step: one task per token ([`run`]) moves held installs to the outbox
//! once their user is `Associated` (USER_ASSOCIATED or USER_MANAGEMENT, as
//! the applier stored them, or a Get Users sync for users still waiting
//! `sync_after`), drops those of retired users, and counts the jobs'
//! associated users. A held install moves in the commit that removes it
//! from the held set, so it is released once.
//!
//! This stage sends Apple no management request: creating, updating and
//! retiring users is the job's users step, which the token's submitter
//! runs (`submit/users.rs`) under the same ordering as its batches. What
//! both know of users at Apple is [`crate::runtime::user_records`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::apple::Client;
use crate::domain::job::{JobSpec, Target};
use crate::domain::lifecycle::{BatchRecord, JobChange, now_ms};
use crate::domain::pairs::pair;
use crate::domain::report::UserRecord;
use crate::runtime::context::Context;
pub use crate::runtime::user_records::{UsersError, merge, status};
use crate::runtime::user_records::{is_associated, is_gone, read_users, store_users};
use crate::store::{JobId, OutboxAck};

/// How often the held installs are looked at without news.
const HELD_POLL: Duration = Duration::from_secs(1);

/// Moves the held installs of `token` to the outbox as their users become
/// `Associated`, until shutdown.
pub async fn run(ctx: Arc<Context>, entry: Arc<crate::runtime::tokens::Token>) {
    let client = entry.client().clone();
    let token = entry.name().to_string();
    let mut specs: HashMap<JobId, Arc<JobSpec>> = HashMap::new();
    let mut batches: HashMap<(JobId, u32), Arc<BatchRecord>> = HashMap::new();
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
    specs: &mut HashMap<JobId, Arc<JobSpec>>,
    batches: &mut HashMap<(JobId, u32), Arc<BatchRecord>>,
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
                Some(r) if is_associated(r) => up.push(p),
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
        store_users(&**store, token, users).await?;
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
                .is_some_and(|r| is_associated(&r))
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
