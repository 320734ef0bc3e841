//! Who works what when several replicas share one store.
//!
//! Work that must run in one place at a time is named by a lease in the
//! store: `token/NAME` (everything that talks to Apple for that token:
//! registration, the limits refresh, the submitter, the tracker), `applier`
//! (folding the notification inbox) and `outbox` (delivering install
//! commands). A replica also keeps a lease `replica/ID` for itself, so that
//! every replica can count the live ones and take its share of the tokens.
//!
//! The keeper renews everything it holds every [`RENEW_EVERY`] for
//! [`TTL`] (by the database's clock), and takes free or expired leases up
//! to its share. It starts a lease's tasks when it gets the lease and
//! aborts them when it loses it, or when it could not renew it for
//! `TTL - MARGIN` by its own clock, measured from before the last renewal
//! was sent: so a replica cut off from the database stops before its lease
//! can expire, and the next holder, who needs the lease to have expired,
//! never overlaps with it. A dead replica's leases expire after [`TTL`] and
//! are taken at the next round of a live one: a token is taken over within
//! `TTL + RENEW_EVERY` plus its registration with Apple.
//!
//! Aborting a lease's tasks is a crash of that work, which the stages
//! already survive (a batch recorded `Sending` is reconciled before
//! anything of it is resent; an outbox entry leaves only on a recorded
//! 2xx). The gap between the old holder's last request and the new
//! holder's first is at least `MARGIN` (or [`LINGER`] after a clean
//! release), longer than the one-second rate window, so the per-token rate
//! limit holds across a handover; a `Retry-After` pause is written to the
//! store (`pause/NAME`) and read by the next holder.
//!
//! With sled the store is one process's, every lease is granted at once,
//! and nothing changes for a single host.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;

use crate::context::Context;

/// How long a lease lasts unrenewed.
pub const TTL: Duration = Duration::from_secs(15);
/// How often held leases are renewed and free ones looked for.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A holder stops a lease's work this long before the lease could expire.
const MARGIN: Duration = Duration::from_secs(5);
/// A lease given up cleanly expires this long after (more than the rate
/// window of one second).
pub const LINGER: Duration = Duration::from_secs(2);

/// The tasks of one lease, started whenever this replica gets it.
pub type Start = Box<dyn Fn(&mut JoinSet<()>) + Send + Sync>;

/// One piece of work that runs in one replica at a time.
pub struct Work {
    pub name: String,
    /// Tokens are shared out evenly among replicas; singletons are not.
    pub balanced: bool,
    pub start: Start,
}

pub fn token_lease(token: &str) -> String {
    format!("token/{token}")
}

pub const APPLIER: &str = "applier";
pub const OUTBOX: &str = "outbox";
const REPLICA_PREFIX: &str = "replica/";

/// Store key of a token's `Retry-After` pause (unix milliseconds).
pub fn pause_key(token: &str) -> String {
    format!("pause/{token}")
}

/// A name for this process among replicas: host, pid and a random part
/// (containers often all run as pid 1).
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vppd".into());
    let random: u16 = rand::random();
    format!("{host}-{}-{random:04x}", std::process::id())
}

struct Running {
    tasks: JoinSet<()>,
    /// Past this, the work stops unless renewed.
    valid_until: Instant,
}

/// Keeps this replica's leases until shutdown, then gives them up.
pub async fn run(ctx: Arc<Context>, holder: String, work: Vec<Work>) {
    let me = format!("{REPLICA_PREFIX}{holder}");
    let by_name: HashMap<String, Work> = work.into_iter().map(|w| (w.name.clone(), w)).collect();
    let balanced_total = by_name.values().filter(|w| w.balanced).count();
    let mut running: HashMap<String, Running> = HashMap::new();
    tracing::info!(replica = %holder, "lease keeper started");
    loop {
        if ctx.is_shutting_down() {
            break;
        }
        let started = Instant::now();
        let replicas = live_replicas(&ctx, &me).await;
        ctx.metrics.replicas.set(replicas as i64);
        let share = balanced_total.div_ceil(replicas.max(1));
        let held_balanced: Vec<&String> = running
            .keys()
            .filter(|n| by_name.get(*n).is_some_and(|w| w.balanced))
            .collect();
        // Give up what is over this replica's share (another replica
        // joined): newest first, so long-held work keeps its place.
        let surplus = held_balanced.len().saturating_sub(share);
        if surplus > 0 {
            let mut names: Vec<String> = held_balanced.iter().map(|n| (*n).clone()).collect();
            names.sort();
            let give_up: Vec<String> = names.into_iter().rev().take(surplus).collect();
            for name in &give_up {
                stop(&ctx, &mut running, name, "another replica takes its share").await;
            }
            if let Err(error) = ctx.store.release_leases(&give_up, &holder, LINGER).await {
                tracing::warn!(%error, "cannot give leases up; they expire on their own");
            }
        }
        let mut wanted: Vec<String> = vec![me.clone()];
        wanted.extend(running.keys().cloned());
        let mut room = share.saturating_sub(
            running
                .keys()
                .filter(|n| by_name.get(*n).is_some_and(|w| w.balanced))
                .count(),
        );
        let mut free: Vec<&Work> = by_name
            .values()
            .filter(|w| !running.contains_key(&w.name))
            .collect();
        free.sort_by(|a, b| a.name.cmp(&b.name));
        for w in free {
            if !w.balanced {
                wanted.push(w.name.clone());
            } else if room > 0 {
                room -= 1;
                wanted.push(w.name.clone());
            }
        }
        let taken =
            tokio::time::timeout(RENEW_EVERY, ctx.store.take_leases(&wanted, &holder, TTL)).await;
        match taken {
            Ok(Ok(held)) => {
                let held: HashSet<String> = held.into_iter().collect();
                let valid_until = started + TTL - MARGIN;
                let lost: Vec<String> = running
                    .keys()
                    .filter(|n| !held.contains(*n))
                    .cloned()
                    .collect();
                for name in lost {
                    stop(&ctx, &mut running, &name, "another replica holds it").await;
                }
                for name in held {
                    if let Some(r) = running.get_mut(&name) {
                        r.valid_until = valid_until;
                    } else if let Some(w) = by_name.get(&name) {
                        let mut tasks = JoinSet::new();
                        (w.start)(&mut tasks);
                        ctx.metrics.lease_held.with_label_values(&[&name]).set(1);
                        tracing::info!(lease = %name, "lease taken: working it here");
                        running.insert(name, Running { tasks, valid_until });
                    }
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "cannot renew leases; will retry"),
            Err(_) => tracing::warn!("renewing leases timed out; will retry"),
        }
        // Work whose lease may lapse before we could renew it stops now.
        let now = Instant::now();
        let lapsed: Vec<String> = running
            .iter()
            .filter(|(_, r)| r.valid_until <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in lapsed {
            stop(&ctx, &mut running, &name, "its lease could not be renewed").await;
        }
        let next = started + RENEW_EVERY;
        let earliest = running.values().map(|r| r.valid_until).min();
        let wake = earliest.map_or(next, |e| e.min(next));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = ctx.shutdown_signal() => {}
        }
    }
    // Shutdown: the tasks drain on their own (the daemon bounds how long);
    // then the leases go, so another replica takes over without waiting
    // for them to expire.
    let names: Vec<String> = running.keys().cloned().collect();
    for (_, r) in running.iter_mut() {
        while r.tasks.join_next().await.is_some() {}
    }
    let mut all = names;
    all.push(me);
    if let Err(error) = ctx.store.release_leases(&all, &holder, LINGER).await {
        tracing::warn!(%error, "cannot give leases up; they expire on their own");
    }
}

async fn stop(ctx: &Context, running: &mut HashMap<String, Running>, name: &str, why: &str) {
    let Some(mut r) = running.remove(name) else {
        return;
    };
    r.tasks.abort_all();
    while r.tasks.join_next().await.is_some() {}
    if let Some(token) = name.strip_prefix("token/")
        && let Some(flag) = ctx.registered.get(token)
    {
        flag.store(false, Ordering::SeqCst);
    }
    ctx.metrics.lease_held.with_label_values(&[name]).set(0);
    tracing::warn!(lease = %name, reason = why, "lease given up: this replica stops that work");
}

/// Live replicas, this one included.
async fn live_replicas(ctx: &Context, me: &str) -> usize {
    match ctx.store.leases().await {
        Ok(leases) => leases
            .iter()
            .filter(|l| l.name.starts_with(REPLICA_PREFIX) && l.remaining_ms > 0 && l.name != me)
            .count()
            .saturating_add(1),
        Err(_) => 1,
    }
}

/// Carries a token's `Retry-After` pause across replicas: applies the one
/// the store holds when this replica starts working the token, then writes
/// every new one. Runs with the token's other tasks.
pub async fn share_pause(ctx: Arc<Context>, token: String) {
    let Some(client) = ctx.clients.get(&token).cloned() else {
        return;
    };
    let key = pause_key(&token);
    let mut pauses = client.watch_pause();
    match ctx.store.meta(&key).await {
        Ok(Some(value)) => {
            if let Ok(ms) = value.parse::<u64>() {
                let until = UNIX_EPOCH + Duration::from_millis(ms);
                if until > SystemTime::now() {
                    tracing::info!(token = %token, "a Retry-After pause from the previous worker still holds");
                    client.pause_until_wall(until);
                }
            }
        }
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(token = %token, %error, "cannot read the shared Retry-After pause")
        }
    }
    pauses.mark_unchanged();
    loop {
        tokio::select! {
            changed = pauses.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = ctx.shutdown_signal() => return,
        }
        let until = *pauses.borrow_and_update();
        let Some(until) = until else { continue };
        let ms = until
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Err(error) = ctx.store.put_meta(&key, &ms.to_string()).await {
            tracing::warn!(token = %token, %error, "cannot share a Retry-After pause");
        }
    }
}
