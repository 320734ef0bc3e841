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
//! Token leases follow the tokens: each round the keeper looks at the
//! registry (brought in line with the store first, when the stored token
//! list changed; see [`crate::runtime::token_sync`]), takes leases of tokens added
//! through any replica and gives up those of removed ones.
//!
//! With sled the store is one process's, every lease is granted at once,
//! and nothing changes for a single host.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;

use crate::domain::balance;
use crate::runtime::context::Context;
use crate::runtime::tokens::Token;

/// How long a lease lasts unrenewed.
pub const TTL: Duration = Duration::from_secs(15);
/// How often held leases are renewed and free ones looked for.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A holder stops a lease's work this long before the lease could expire.
const MARGIN: Duration = Duration::from_secs(5);

/// How long a token's lease must stay valid for its client to send a
/// request ([`crate::apple::ClientOptions::lease_notice`]): Apple's
/// timeout, or, when that is longer than a lease can promise between two
/// renewals, what it can (each request's timeout is then cut to the
/// lease's remainder).
pub fn notice(apple_timeout: Duration) -> Duration {
    let promised = TTL.saturating_sub(MARGIN + RENEW_EVERY + Duration::from_secs(1));
    apple_timeout.min(promised)
}
/// A lease given up cleanly expires this long after (more than the rate
/// window of one second).
pub const LINGER: Duration = Duration::from_secs(2);

/// The tasks of one lease, started whenever this replica gets it.
pub type Start = Arc<dyn Fn(&mut JoinSet<()>) + Send + Sync>;

/// The tasks of one token's lease.
pub type TokenStart = Arc<dyn Fn(Arc<Token>, &mut JoinSet<()>) + Send + Sync>;

/// How often the stored token list is read again even though its change
/// marker says nothing changed (a marker write may have failed).
const RESYNC_EVERY: Duration = Duration::from_secs(60);

/// One piece of work that runs in one replica at a time.
#[derive(Clone)]
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
pub const RETENTION: &str = "retention";
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
    // 128 random bits: two replicas never share a holder id, whatever
    // their hosts and pids (a clone of a VM, containers all pid 1).
    let random: u128 = rand::random();
    format!("{host}-{}-{random:032x}", std::process::id())
}

struct Running {
    tasks: JoinSet<()>,
    /// The token this lease works (removed and added again under the same
    /// name, it is another token: its work starts afresh).
    token: Option<Arc<Token>>,
    /// Past this, the work stops unless renewed.
    valid_until: Instant,
}

/// Keeps this replica's leases until shutdown, then gives them up.
/// `fixed` is the singleton work; each token in the registry is worked by
/// `token_work` under its own lease.
pub async fn run(ctx: Arc<Context>, holder: String, fixed: Vec<Work>, token_work: TokenStart) {
    tracing::info!(replica = %holder, "lease keeper started");
    let mut keeper = Keeper {
        me: format!("{REPLICA_PREFIX}{holder}"),
        ctx,
        holder,
        fixed,
        token_work,
        running: HashMap::new(),
        seen_marker: None,
        last_sync: Instant::now(),
    };
    while !keeper.ctx.is_shutting_down() {
        let started = Instant::now();
        keeper.round(started).await;
        keeper.wait(started + RENEW_EVERY).await;
    }
    keeper.give_up_all().await;
}

/// The lease keeper's state between rounds; the decisions are
/// [`balance`]'s, this does the I/O.
struct Keeper {
    ctx: Arc<Context>,
    holder: String,
    /// This replica's own lease.
    me: String,
    fixed: Vec<Work>,
    token_work: TokenStart,
    running: HashMap<String, Running>,
    seen_marker: Option<String>,
    last_sync: Instant,
}

/// The work there is this round: the tokens in the registry by lease
/// name, and every piece of work (singletons and tokens) by lease name.
struct Offer {
    tokens: HashMap<String, Arc<Token>>,
    work: HashMap<String, Work>,
}

impl Keeper {
    /// One round: follow the token list, look at the other replicas, give
    /// up what the policy says, renew and take, and stop what lapsed.
    async fn round(&mut self, started: Instant) {
        // First, before any store call that could wait: after a pause (a
        // frozen VM, SIGSTOP) work whose lease lapsed meanwhile stops now.
        self.stop_lapsed().await;
        if self.ctx.shared_store {
            let follow = follow_tokens(&self.ctx, &mut self.seen_marker, &mut self.last_sync);
            if tokio::time::timeout(RENEW_EVERY, follow).await.is_err() {
                tracing::warn!("reading the stored tokens timed out; will retry");
            }
        }
        let offer = self.offer();
        let survey = tokio::time::timeout(RENEW_EVERY, survey(&self.ctx, &self.me, &self.holder))
            .await
            .unwrap_or_else(|_| Survey::unknown());
        self.ctx.metrics.replicas.set(survey.replicas as i64);
        let round = balance::plan(&self.view(&offer, survey));
        for name in &round.stale {
            self.stop(name, "the token was removed or replaced").await;
        }
        self.release(&round.removed).await;
        for name in &round.surplus {
            self.stop(name, "another replica takes its share").await;
        }
        self.release(&round.surplus).await;
        let taken = tokio::time::timeout(
            RENEW_EVERY,
            self.ctx.store.take_leases(&round.wanted, &self.holder, TTL),
        )
        .await;
        match taken {
            Ok(Ok(granted)) => self.apply(granted, &offer, started + TTL - MARGIN).await,
            Ok(Err(error)) => tracing::warn!(%error, "cannot renew leases; will retry"),
            Err(_) => tracing::warn!("renewing leases timed out; will retry"),
        }
        self.stop_lapsed().await;
    }

    /// Stops the work whose lease may lapse before it could be renewed.
    async fn stop_lapsed(&mut self) {
        let deadlines = self.running.iter().map(|(n, r)| (n, &r.valid_until));
        for name in balance::lapsed(deadlines, &Instant::now()) {
            self.stop(&name, "its lease could not be renewed").await;
        }
    }

    fn offer(&self) -> Offer {
        let tokens: HashMap<String, Arc<Token>> = self
            .ctx
            .tokens
            .all()
            .into_iter()
            .map(|t| (token_lease(t.name()), t))
            .collect();
        let mut work: HashMap<String, Work> = self
            .fixed
            .iter()
            .map(|w| (w.name.clone(), w.clone()))
            .collect();
        for (name, token) in &tokens {
            let (token, start) = (token.clone(), self.token_work.clone());
            work.insert(
                name.clone(),
                Work {
                    name: name.clone(),
                    balanced: true,
                    start: Arc::new(move |set| start(token.clone(), set)),
                },
            );
        }
        Offer { tokens, work }
    }

    fn view(&self, offer: &Offer, survey: Survey) -> balance::View {
        // Removed and added again under the same name: another token.
        let replaced = self
            .running
            .iter()
            .filter(|(name, r)| match (&r.token, offer.tokens.get(*name)) {
                (Some(old), Some(now)) => !Arc::ptr_eq(old, now),
                _ => false,
            })
            .map(|(name, _)| name.clone())
            .collect();
        balance::View {
            me: self.me.clone(),
            work: offer
                .work
                .iter()
                .map(|(n, w)| (n.clone(), w.balanced))
                .collect(),
            running: self.running.keys().cloned().collect(),
            replaced,
            replicas: survey.replicas,
            held_elsewhere: survey.held_elsewhere,
        }
    }

    /// Stops the work the store did not grant, renews what it did and
    /// starts what is new here.
    async fn apply(&mut self, granted: Vec<String>, offer: &Offer, valid_until: Instant) {
        let running: BTreeSet<String> = self.running.keys().cloned().collect();
        let work = offer
            .work
            .iter()
            .map(|(n, w)| (n.clone(), w.balanced))
            .collect();
        let settled = balance::settle(&running, &granted.into_iter().collect(), &work);
        for name in &settled.lost {
            self.stop(name, "another replica holds it").await;
        }
        for name in &settled.renewed {
            if let Some(r) = self.running.get_mut(name) {
                r.valid_until = valid_until;
                if let Some(t) = &r.token {
                    t.client().hold_lease(Some(valid_until));
                }
            }
        }
        for name in settled.started {
            let Some(w) = offer.work.get(&name) else {
                continue;
            };
            let token = offer.tokens.get(&name).cloned();
            if let Some(t) = &token {
                self.ctx.tokens.lease_taken(t);
                t.client().hold_lease(Some(valid_until));
            }
            let mut tasks = JoinSet::new();
            (w.start)(&mut tasks);
            self.ctx
                .metrics
                .lease_held
                .with_label_values(&[&name])
                .set(1);
            tracing::info!(lease = %name, "lease taken: working it here");
            self.running.insert(
                name,
                Running {
                    tasks,
                    token,
                    valid_until,
                },
            );
        }
    }

    /// Sleeps until the next round, a lease's deadline, a token added or
    /// removed here (no need to wait for the round), or shutdown.
    async fn wait(&self, next: Instant) {
        let wake = balance::wake(next, self.running.values().map(|r| r.valid_until));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = self.ctx.wake_leases.notified() => {}
            _ = self.ctx.shutdown_signal() => {}
        }
    }

    /// Shutdown: the tasks drain on their own (the daemon bounds how long);
    /// then the leases go, so another replica takes over without waiting
    /// for them to expire.
    async fn give_up_all(mut self) {
        let mut all: Vec<String> = self.running.keys().cloned().collect();
        for (_, r) in self.running.iter_mut() {
            while r.tasks.join_next().await.is_some() {}
        }
        all.push(self.me.clone());
        self.release(&all).await;
    }

    async fn release(&self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        let released = self.ctx.store.release_leases(names, &self.holder, LINGER);
        match tokio::time::timeout(RENEW_EVERY, released).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot give leases up; they expire on their own")
            }
            Err(_) => tracing::warn!("giving leases up timed out; they expire on their own"),
        }
    }

    async fn stop(&mut self, name: &str, why: &str) {
        let Some(mut r) = self.running.remove(name) else {
            return;
        };
        // Before the tasks go: a request they are about to send stays.
        if let Some(token) = &r.token {
            token.client().hold_lease(None);
        }
        r.tasks.abort_all();
        while r.tasks.join_next().await.is_some() {}
        if let Some(token) = &r.token {
            self.ctx.tokens.lease_lost(token);
        }
        self.ctx
            .metrics
            .lease_held
            .with_label_values(&[name])
            .set(0);
        tracing::warn!(lease = %name, reason = why, "lease given up: this replica stops that work");
    }
}

/// Reads the stored token list again when its change marker moved (a
/// token put or deleted through any replica), or after a while anyway.
async fn follow_tokens(ctx: &Context, seen: &mut Option<String>, last_sync: &mut Instant) {
    let marker = match crate::runtime::token_sync::marker(ctx).await {
        Ok(m) => m,
        Err(error) => {
            tracing::warn!(%error, "cannot read the token list's change marker");
            return;
        }
    };
    if marker == *seen && last_sync.elapsed() < RESYNC_EVERY {
        return;
    }
    match crate::runtime::token_sync::sync(ctx).await {
        Ok(()) => {
            *seen = marker;
            *last_sync = Instant::now();
        }
        Err(error) => tracing::warn!(%error, "cannot read the stored tokens; will retry"),
    }
}

/// What the store says about the other replicas this round.
struct Survey {
    /// Live replicas, this one included.
    replicas: usize,
    /// Leases another replica holds and that have not expired.
    held_elsewhere: HashSet<String>,
}

async fn survey(ctx: &Context, me: &str, holder: &str) -> Survey {
    match ctx.store.leases().await {
        Ok(leases) => {
            let live = leases.iter().filter(|l| l.remaining_ms > 0);
            Survey {
                replicas: live
                    .clone()
                    .filter(|l| l.name.starts_with(REPLICA_PREFIX) && l.name != me)
                    .count()
                    .saturating_add(1),
                held_elsewhere: live
                    .filter(|l| l.holder != holder)
                    .map(|l| l.name.clone())
                    .collect(),
            }
        }
        Err(_) => Survey::unknown(),
    }
}

impl Survey {
    /// When the store cannot say: asking for everything is harmless, a
    /// held lease is not granted.
    fn unknown() -> Survey {
        Survey {
            replicas: 1,
            held_elsewhere: HashSet::new(),
        }
    }
}

/// Carries a token's `Retry-After` pause across replicas: applies the one
/// the store holds when this replica starts working the token, then writes
/// every new one. Runs with the token's other tasks.
pub async fn share_pause(ctx: Arc<Context>, entry: Arc<Token>) {
    let client = entry.client().clone();
    let token = entry.name().to_string();
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
