//! Drift: assignments changed at Apple outside vppd (by hand in Apple
//! School/Business Manager, or by another tool on the same location).
//!
//! One follower per token, run by the replica holding the token's lease
//! (it talks to Apple for the token, under the token's rate limit):
//! - the first time, a full read of Get Assignments gives the `versionId`
//!   to follow from; what is there then and no job of vppd's explains is
//!   where the token started, not drift;
//! - every `[tracking] drift_every`, and soon after a notification for an
//!   event vppd did not send, Get Assignments `sinceVersionId` shows what
//!   was added since; what no job of vppd's associates is drift. Only when
//!   Apple refuses the version (9721, too old) is everything read again;
//! - Apple's incremental read never shows removals, so they are learned
//!   from the notifications of events vppd did not send (the applier
//!   records those) and, every `drift_every`, from a filtered re-read (by
//!   asset) of the pairs vppd itself made. A removed pair vppd made carries
//!   the job that made it, so an MDM learns which released installs lost
//!   their license.
//!
//! The record and its transitions are [`crate::lifecycle::DriftRecord`];
//! every change goes through [`crate::store::Store::update_drift`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::apple::client::AssignmentsQuery;
use crate::apple::{AppleError, Client, error_number};
use crate::context::Context;
use crate::job::{JobState, Phase, Target};
use crate::lifecycle::{BatchState, DriftChange, DriftItem, now_ms, pair_key};
use crate::report::{Assignee, Assignment};
use crate::retry::Backoff;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
enum DriftError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Apple(#[from] AppleError),
}

/// After a wake-up, notifications that come together are read together.
const WAKE_GATHER: Duration = Duration::from_millis(500);

/// Runs the drift follower of one token until shutdown.
pub async fn run(ctx: Arc<Context>, entry: Arc<crate::tokens::Token>) {
    let client = entry.client().clone();
    let token = entry.name().to_string();
    // Apple must know where to send notifications before vppd relies on
    // them to learn removals; a failed token is not read either.
    while !entry.is_ready() {
        if entry.is_removed() || !ctx.sleep(Duration::from_secs(5)).await {
            return;
        }
    }
    let every = ctx.tracking.drift_every;
    let mut backoff = Backoff::new(Duration::from_secs(5), every.max(Duration::from_secs(5)));
    // The filtered re-read of vppd's own pairs runs on the timer only: a
    // burst of notifications must not re-read a whole rollout each time.
    let mut reread_own = true;
    loop {
        if entry.is_removed() {
            return;
        }
        if !entry.is_ready() {
            if !ctx.sleep(Duration::from_secs(5)).await {
                return;
            }
            continue;
        }
        match follow(&ctx, &client, &token, reread_own).await {
            Ok(()) => backoff.reset(),
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(token = %token, %error, retry_in = ?delay, "cannot read drift; will retry");
                if !ctx.sleep(delay).await {
                    return;
                }
                continue;
            }
        }
        let woken = tokio::select! {
            _ = entry.wake_drift.notified() => true,
            _ = tokio::time::sleep(every) => false,
            _ = ctx.shutdown_signal() => return,
        };
        if woken && !ctx.sleep(WAKE_GATHER).await {
            return;
        }
        reread_own = !woken;
    }
}

/// One look at the token's drift.
async fn follow(
    ctx: &Context,
    client: &Client,
    token: &str,
    reread_own: bool,
) -> Result<(), DriftError> {
    let record = ctx.store.drift(token).await?;
    let own = OwnPairs::load(ctx, token).await?;
    let now = now_ms();
    let change = match record.as_ref().and_then(|r| r.version_id.clone()) {
        None => {
            let walk = client.get_assignments(&AssignmentsQuery::default()).await?;
            let foreign = crate::apple::report::assignments(&walk.items)
                .iter()
                .filter(|a| !own.explains(a))
                .map(|a| DriftItem::of(a, now, None).key())
                .collect();
            tracing::info!(token = %token, version_id = %walk.version_id, "following the token's assignments for drift");
            DriftChange::Baseline {
                version_id: walk.version_id,
                foreign,
                now,
            }
        }
        Some(since) => {
            let query = AssignmentsQuery {
                since_version_id: Some(since),
                ..Default::default()
            };
            match client.get_assignments(&query).await {
                Ok(walk) => DriftChange::Read {
                    unexplained: unexplained(&own, &walk.items, now),
                    version_id: walk.version_id,
                    now,
                },
                Err(e) if e.error_number() == Some(error_number::INVALID_VERSION_ID) => {
                    tracing::warn!(token = %token, "Apple no longer knows the versionId vppd follows; reading every assignment again");
                    let walk = client.get_assignments(&AssignmentsQuery::default()).await?;
                    DriftChange::Reread {
                        unexplained: unexplained(&own, &walk.items, now),
                        version_id: walk.version_id,
                        now,
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let counted = ctx.store.update_drift(token, change).await?;
    ctx.metrics.count_drift(token, counted);
    if counted.added > 0 {
        tracing::warn!(token = %token, added = counted.added, "assignments added outside vppd");
    }
    // Removals named by notifications carry no job yet: vppd's own pairs
    // gain theirs from the store, without asking Apple.
    if let Some(record) = ctx.store.drift(token).await? {
        let attributed: Vec<DriftItem> = record
            .removed
            .items
            .iter()
            .filter(|i| i.job_id.is_none())
            .filter_map(|i| {
                let job = own.made.get(&i.key())?;
                Some(DriftItem {
                    job_id: Some(job.job_id.clone()),
                    ..i.clone()
                })
            })
            .collect();
        if !attributed.is_empty() {
            ctx.store
                .update_drift(token, DriftChange::Removed { items: attributed })
                .await?;
        }
    }
    if reread_own {
        reread_own_pairs(ctx, client, token, &own).await?;
    }
    Ok(())
}

fn unexplained(
    own: &OwnPairs,
    items: &[crate::apple::types::Assignment],
    now: u64,
) -> Vec<DriftItem> {
    crate::apple::report::assignments(items)
        .iter()
        .filter(|a| !own.explains(a))
        .map(|a| DriftItem::of(a, now, None))
        .collect()
}

/// Filtered re-read, asset by asset, of the pairs vppd made: those Apple no
/// longer holds were removed outside vppd.
async fn reread_own_pairs(
    ctx: &Context,
    client: &Client,
    token: &str,
    own: &OwnPairs,
) -> Result<(), DriftError> {
    let mut by_asset: HashMap<(&str, &str), Vec<(u64, &Made)>> = HashMap::new();
    for (key, made) in &own.made {
        if own.removing.contains(&made.target) {
            continue;
        }
        by_asset
            .entry((made.adam_id.as_str(), made.pricing_param.as_str()))
            .or_default()
            .push((*key, made));
    }
    for ((adam_id, pricing_param), pairs) in by_asset {
        let walk = client
            .get_assignments(&AssignmentsQuery {
                adam_id: Some(adam_id.to_string()),
                pricing_param: Some(pricing_param.to_string()),
                ..Default::default()
            })
            .await?;
        let present: HashSet<u64> = crate::apple::report::assignments(&walk.items)
            .iter()
            .map(|a| DriftItem::of(a, 0, None).key())
            .collect();
        let now = now_ms();
        // A job of vppd's may have started removing some of them while
        // Apple was read: those are not drift.
        let removing = removing_now(ctx, token, own.last_seq).await?;
        let (mut gone, mut there) = (Vec::new(), Vec::new());
        for (key, made) in pairs {
            if present.contains(&key) {
                there.push(key);
            } else if !removing.contains(&made.target) {
                gone.push(made.item(now));
            }
        }
        ctx.store
            .update_drift(token, DriftChange::Present { keys: there })
            .await?;
        if !gone.is_empty() {
            let counted = ctx
                .store
                .update_drift(token, DriftChange::Removed { items: gone })
                .await?;
            ctx.metrics.count_drift(token, counted);
            if counted.removed > 0 {
                tracing::warn!(token = %token, adam_id, removed = counted.removed, "assignments vppd made were removed outside vppd");
            }
        }
    }
    Ok(())
}

/// Targets that jobs of vppd's not yet finished (or created after
/// `after_seq`) disassociate or revoke.
async fn removing_now(
    ctx: &Context,
    token: &str,
    after_seq: u64,
) -> Result<HashSet<TargetKey>, StoreError> {
    let mut out = HashSet::new();
    for job in ctx.store.jobs().await? {
        if job.token() != token || (job.state().is_final() && job.seq() <= after_seq) {
            continue;
        }
        if let Some(spec) = ctx.store.spec(job.id()).await? {
            for phase in [Phase::Disassociate, Phase::Revoke] {
                let t = spec.targets(phase);
                out.extend(t.serial_numbers.iter().map(|s| (true, s.clone())));
                out.extend(t.client_user_ids.iter().map(|u| (false, u.clone())));
            }
        }
    }
    Ok(out)
}

/// A pair vppd made, and the job that made it.
struct Made {
    adam_id: String,
    pricing_param: String,
    target: (bool, String),
    job_id: String,
}

impl Made {
    fn item(&self, now: u64) -> DriftItem {
        let (serial_number, client_user_id) = match &self.target {
            (true, s) => (Some(s.clone()), None),
            (false, u) => (None, Some(u.clone())),
        };
        DriftItem {
            adam_id: self.adam_id.clone(),
            pricing_param: self.pricing_param.clone(),
            serial_number,
            client_user_id,
            seen_ms: now,
            job_id: Some(self.job_id.clone()),
        }
    }
}

/// (adamId, pricingParam).
type AssetKey = (String, String);
/// (is a serial number, serial number or clientUserId).
type TargetKey = (bool, String);

/// What vppd's jobs of a token explain, read from the store.
struct OwnPairs {
    /// Per job: its assets and the targets it associates.
    associates: Vec<(HashSet<AssetKey>, HashSet<TargetKey>)>,
    /// Pairs vppd associated and Apple confirmed, and not removed by a
    /// later job of vppd's, by pair key.
    made: HashMap<u64, Made>,
    /// Targets a job not yet finished disassociates or revokes: their pairs
    /// may vanish through vppd's own doing.
    removing: HashSet<(bool, String)>,
    /// The creation order of the newest job read.
    last_seq: u64,
}

fn target_key(t: Target<'_>) -> (bool, String) {
    match t {
        Target::Serial(s) => (true, s.to_string()),
        Target::User(u) => (false, u.to_string()),
    }
}

impl OwnPairs {
    async fn load(ctx: &Context, token: &str) -> Result<OwnPairs, StoreError> {
        let mut own = OwnPairs {
            associates: Vec::new(),
            made: HashMap::new(),
            removing: HashSet::new(),
            last_seq: 0,
        };
        for job in ctx.store.jobs().await? {
            if job.token() != token {
                continue;
            }
            own.last_seq = own.last_seq.max(job.seq());
            let Some(spec) = ctx.store.spec(job.id()).await? else {
                continue;
            };
            let targets = |p: Phase| {
                let t = spec.targets(p);
                t.serial_numbers
                    .iter()
                    .map(|s| (true, s.clone()))
                    .chain(t.client_user_ids.iter().map(|u| (false, u.clone())))
                    .collect::<HashSet<_>>()
            };
            own.associates.push((
                spec.assets
                    .iter()
                    .map(|a| (a.adam_id.clone(), a.pricing_param.clone()))
                    .collect(),
                targets(Phase::Associate),
            ));
            if !job.state().is_final() || job.state() == JobState::Canceled {
                own.removing.extend(targets(Phase::Disassociate));
                own.removing.extend(targets(Phase::Revoke));
            }
            for batch in ctx.store.batches_of(job.id()).await? {
                if batch.state() == BatchState::Withdrawn && batch.confirmed() == 0 {
                    continue;
                }
                match batch.phase() {
                    Phase::Associate => {
                        for p in (0..batch.pairs()).filter(|p| batch.is_confirmed_pair(*p)) {
                            let Some(pair) = crate::pairs::pair(&spec, &batch, p) else {
                                continue;
                            };
                            let target = target_key(pair.target);
                            let key = pair_key(
                                &pair.asset.adam_id,
                                &pair.asset.pricing_param,
                                target.0.then_some(target.1.as_str()),
                                (!target.0).then_some(target.1.as_str()),
                            );
                            own.made.insert(
                                key,
                                Made {
                                    adam_id: pair.asset.adam_id.clone(),
                                    pricing_param: pair.asset.pricing_param.clone(),
                                    target,
                                    job_id: job.id().to_string(),
                                },
                            );
                        }
                    }
                    Phase::Disassociate => {
                        for p in (0..batch.pairs()).filter(|p| batch.is_confirmed_pair(*p)) {
                            let Some(pair) = crate::pairs::pair(&spec, &batch, p) else {
                                continue;
                            };
                            let target = target_key(pair.target);
                            own.made.remove(&pair_key(
                                &pair.asset.adam_id,
                                &pair.asset.pricing_param,
                                target.0.then_some(target.1.as_str()),
                                (!target.0).then_some(target.1.as_str()),
                            ));
                        }
                    }
                    Phase::Revoke => {
                        let revoked: HashSet<(bool, String)> = (0..batch.rect().n_targets())
                            .filter(|o| batch.is_confirmed_pair(*o))
                            .filter_map(|o| crate::pairs::target_at(&spec, &batch, o))
                            .map(target_key)
                            .collect();
                        own.made.retain(|_, m| !revoked.contains(&m.target));
                    }
                }
            }
        }
        Ok(own)
    }

    /// Whether some job of vppd's associates this pair.
    fn explains(&self, a: &Assignment) -> bool {
        let target = match &a.assignee {
            Assignee::Serial(s) => (true, s.clone()),
            Assignee::User(u) => (false, u.clone()),
        };
        let asset = (a.adam_id.clone(), a.pricing_param.clone());
        self.associates
            .iter()
            .any(|(assets, targets)| assets.contains(&asset) && targets.contains(&target))
    }
}
