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
//! Its cost follows what it must remember, not the token's size: Apple's
//! pages are streamed and dropped, each walk read once; what vppd's jobs
//! explain is looked up in their specs (borrowed, never copied); only pair
//! keys of foreign pairs are kept, and the re-read of vppd's own pairs
//! holds one asset's at a time.
//!
//! The record and its transitions are [`crate::domain::lifecycle::DriftRecord`];
//! every change goes through [`crate::store::Store::update_drift`].

use std::collections::{HashMap, HashSet};

use foldhash::HashMapExt;
use std::sync::Arc;
use std::time::Duration;

use crate::apple::client::AssignmentsQuery;
use crate::apple::report::AssignmentIn;
use crate::apple::{AppleError, Client, error_number};
use crate::domain::inbox::AssignmentRef;
use crate::domain::job::{JobSpec, JobState, Phase, Target, Targets};
use crate::domain::lifecycle::{
    BatchRecord, DriftChange, DriftItem, DriftRecord, JobRecord, now_ms, pair_key,
};
use crate::domain::pairs::{FastMap, TargetSet};
use crate::domain::retry::Backoff;
use crate::runtime::context::Context;
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
pub async fn run(ctx: Arc<Context>, entry: Arc<crate::runtime::tokens::Token>) {
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
    let jobs = OwnJob::load(ctx, token).await?;
    let own = OwnPairs::new(&jobs);
    let now = now_ms();
    let change = match record.as_ref().and_then(|r| r.version_id.clone()) {
        // The baseline runs when the token is ready, at the follower's
        // normal pace, even while a rollout of vppd's is writing to the
        // token: the walk reads every page once and keeps only the pairs no
        // job explains, so vppd's own writes cost it the pages and nothing
        // more. Waiting for a quiet token instead would leave it unfollowed
        // for as long as rollouts run, and count what changed by hand
        // meanwhile as where the token started. Nothing written during the
        // walk is lost: the next `sinceVersionId` read starts from the first
        // page's versionId (apple-api-v2.md 4.3), so the walk is never
        // restarted. (A record moved across pages by a removal during the
        // walk can be missed; it is a pair that was there before, so at
        // worst one that changes again later shows as added.)
        None => {
            let mut foreign = HashSet::new();
            let end = client
                .walk_assignments(&AssignmentsQuery::default(), |page| {
                    for a in page.iter().filter_map(|a| a.as_ref()) {
                        if let Some(key) = own.unexplained_key(&a) {
                            foreign.insert(key);
                        }
                    }
                })
                .await?;
            tracing::info!(token = %token, version_id = %end.version_id, "following the token's assignments for drift");
            DriftChange::Baseline {
                version_id: end.version_id,
                foreign: foreign.into_iter().collect(),
                now,
            }
        }
        Some(since) => {
            let query = AssignmentsQuery {
                since_version_id: Some(since),
                ..Default::default()
            };
            let mut found = Unexplained::default();
            match client
                .walk_assignments(&query, |page| found.add(&own, page, now))
                .await
            {
                Ok(end) => DriftChange::Read {
                    unexplained: found.items,
                    version_id: end.version_id,
                    now,
                },
                Err(e) if e.error_number() == Some(error_number::INVALID_VERSION_ID) => {
                    tracing::warn!(token = %token, "Apple no longer knows the versionId vppd follows; reading every assignment again");
                    let known = record.as_ref();
                    reread_all(client, &own, known, now).await?
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
    // The read that starts following is the look at vppd's pairs too:
    // what went before it is not drift, and re-reading them now, asset by
    // asset, would read the token a second time while a rollout fills it.
    let reread_own = reread_own && record.as_ref().is_some_and(DriftRecord::following);
    let batches = if reread_own || needs_attribution(ctx, token, &own).await? {
        Some(OwnJob::batches(ctx, &jobs).await?)
    } else {
        None
    };
    if let Some(batches) = &batches {
        attribute_removals(ctx, token, &own, batches).await?;
        if reread_own {
            reread_own_pairs(ctx, client, token, &own, batches).await?;
        }
    }
    Ok(())
}

/// Pairs a walk found that no job of vppd's explains, each once.
#[derive(Default)]
struct Unexplained {
    keys: HashSet<u64>,
    items: Vec<DriftItem>,
}

impl Unexplained {
    fn add(&mut self, own: &OwnPairs<'_>, page: &[AssignmentIn<'_>], now: u64) {
        for a in page.iter().filter_map(|a| a.as_ref()) {
            if let Some(key) = own.unexplained_key(&a)
                && self.keys.insert(key)
            {
                self.items.push(DriftItem::of(&a.to_owned(), now, None));
            }
        }
    }
}

/// A full re-read after Apple refused the version vppd follows (9721), in
/// one pass kept from its first page's versionId like the baseline. A
/// foreign pair vppd knew and the pass did not see counts as removed, so
/// when the data moved under the pass (and so a record may have been
/// missed) and such a pair is missing, the pass is repeated, at most twice,
/// and what any pass saw is there. Only then: a rollout of vppd's moves
/// the data all along, and its pairs are not the ones at stake.
async fn reread_all(
    client: &Client,
    own: &OwnPairs<'_>,
    known: Option<&DriftRecord>,
    now: u64,
) -> Result<DriftChange, DriftError> {
    let mut found = Unexplained::default();
    let mut version_id = None;
    for _ in 0..3 {
        let end = client
            .walk_assignments(&AssignmentsQuery::default(), |page| {
                found.add(own, page, now)
            })
            .await?;
        version_id.get_or_insert(end.version_id);
        let missing = known.is_some_and(|r| r.foreign_keys().any(|k| !found.keys.contains(&k)));
        if end.stable || !missing {
            break;
        }
    }
    Ok(DriftChange::Reread {
        unexplained: found.items,
        version_id: version_id.unwrap_or_default(),
        now,
    })
}

/// Whether a removal recorded without a job (named by a notification) may
/// be of a pair vppd made: only then are the batches read to find its job.
async fn needs_attribution(
    ctx: &Context,
    token: &str,
    own: &OwnPairs<'_>,
) -> Result<bool, StoreError> {
    Ok(ctx.store.drift(token).await?.is_some_and(|record| {
        record
            .removed
            .items
            .iter()
            .any(|i| i.job_id.is_none() && own.explains_item(i))
    }))
}

/// Removals named by notifications carry no job yet: vppd's own pairs gain
/// theirs from the store, without asking Apple, asset by asset.
async fn attribute_removals(
    ctx: &Context,
    token: &str,
    own: &OwnPairs<'_>,
    batches: &[Vec<BatchRecord>],
) -> Result<(), StoreError> {
    let Some(record) = ctx.store.drift(token).await? else {
        return Ok(());
    };
    let mut by_asset: HashMap<(&str, &str), Vec<&DriftItem>> = HashMap::new();
    for item in &record.removed.items {
        if item.job_id.is_none() && own.explains_item(item) {
            by_asset
                .entry((item.adam_id.as_str(), item.pricing_param.as_str()))
                .or_default()
                .push(item);
        }
    }
    let mut attributed = Vec::new();
    for (asset, items) in by_asset {
        let made = own.made_of(batches, asset);
        for item in items {
            if let Some(made) = made.get(&item.key()) {
                attributed.push(DriftItem {
                    job_id: Some(own.jobs[made.job as usize].record.id().as_str().to_owned()),
                    ..item.clone()
                });
            }
        }
    }
    if !attributed.is_empty() {
        ctx.store
            .update_drift(token, DriftChange::Removed { items: attributed })
            .await?;
    }
    Ok(())
}

/// Filtered re-read, asset by asset, of the pairs vppd made: those Apple no
/// longer holds were removed outside vppd. Only one asset's pairs are held
/// at a time: the ones vppd made (keys, borrowing the specs), from which
/// each page of Apple's read strikes what it holds.
async fn reread_own_pairs(
    ctx: &Context,
    client: &Client,
    token: &str,
    own: &OwnPairs<'_>,
    batches: &[Vec<BatchRecord>],
) -> Result<(), DriftError> {
    for (adam_id, pricing_param) in own.assets() {
        let mut made = own.made_of(batches, (adam_id, pricing_param));
        made.retain(|_, m| m.target(own).is_some_and(|t| !own.removing.contains(&t)));
        if made.is_empty() {
            continue;
        }
        let query = AssignmentsQuery {
            adam_id: Some(adam_id.to_string()),
            pricing_param: Some(pricing_param.to_string()),
            ..Default::default()
        };
        let mut there = Vec::new();
        // A pair missing from a read the data moved under may have been
        // skipped rather than removed: read again (at most twice more),
        // and only while some pair is missing.
        for _ in 0..3 {
            let end = client
                .walk_assignments(&query, |page| {
                    for a in page {
                        let key = a.pair_key();
                        if made.remove(&key).is_some() {
                            there.push(key);
                        }
                    }
                })
                .await?;
            if end.stable || made.is_empty() {
                break;
            }
        }
        let now = now_ms();
        // A job of vppd's may have started removing some of them while
        // Apple was read: those are not drift.
        let removing_specs = removing_now(ctx, token, own.last_seq).await?;
        let removing = removing_targets(&removing_specs);
        let gone: Vec<DriftItem> = made
            .values()
            .filter(|m| m.target(own).is_some_and(|t| !removing.contains(&t)))
            .map(|m| m.item(own, adam_id, pricing_param, now))
            .collect();
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

/// [`pair_key`] of an asset and one of vppd's targets.
fn target_key(adam_id: &str, pricing_param: &str, target: Target<'_>) -> u64 {
    match target {
        Target::Serial(s) => pair_key(adam_id, pricing_param, Some(s), None),
        Target::User(u) => pair_key(adam_id, pricing_param, None, Some(u)),
    }
}

/// Specs of the jobs of vppd's not yet finished (or created after
/// `after_seq`): the targets they disassociate or revoke may lose their
/// pairs through vppd's own doing.
async fn removing_now(
    ctx: &Context,
    token: &str,
    after_seq: u64,
) -> Result<Vec<Arc<JobSpec>>, StoreError> {
    let mut out = Vec::new();
    for job in ctx.store.jobs_of(token).await? {
        if job.state().is_final() && job.seq() <= after_seq {
            continue;
        }
        if let Some(spec) = ctx.store.spec(job.id()).await? {
            out.push(spec);
        }
    }
    Ok(out)
}

/// The targets that `specs` disassociate or revoke.
fn removing_targets(specs: &[Arc<JobSpec>]) -> HashSet<Target<'_>> {
    let mut out = HashSet::new();
    for spec in specs {
        for phase in [Phase::Disassociate, Phase::Revoke] {
            out.extend(targets_of(spec.targets(phase)));
        }
    }
    out
}

fn targets_of(t: &Targets) -> impl Iterator<Item = Target<'_>> {
    t.serial_numbers
        .iter()
        .map(|s| Target::Serial(s))
        .chain(t.client_user_ids.iter().map(|u| Target::User(u)))
}

/// A job of vppd's on the token, as the store has it (the spec shared with
/// the store's cache).
struct OwnJob {
    record: JobRecord,
    spec: Arc<JobSpec>,
}

impl OwnJob {
    /// The token's jobs in the store's order.
    async fn load(ctx: &Context, token: &str) -> Result<Vec<OwnJob>, StoreError> {
        let mut out = Vec::new();
        for record in ctx.store.jobs_of(token).await? {
            if let Some(spec) = ctx.store.spec(record.id()).await? {
                out.push(OwnJob { record, spec });
            }
        }
        Ok(out)
    }

    /// Each job's batches that changed some pair at Apple (a batch with no
    /// confirmed pair changed none).
    async fn batches(ctx: &Context, jobs: &[OwnJob]) -> Result<Vec<Vec<BatchRecord>>, StoreError> {
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let mut batches = ctx.store.batches_of(job.record.id()).await?;
            batches.retain(|b| b.confirmed() > 0);
            out.push(batches);
        }
        Ok(out)
    }
}

/// A pair vppd made: the job (an index into [`OwnPairs::jobs`]) and its
/// target, an index into that job's associations ([`TargetSet::get`]):
/// a re-read holds one of these for each of an asset's pairs.
#[derive(Clone, Copy)]
struct Made {
    job: u32,
    target: u32,
}

impl Made {
    fn target<'a>(&self, own: &OwnPairs<'a>) -> Option<Target<'a>> {
        own.associates[self.job as usize].get(self.target)
    }

    fn item(&self, own: &OwnPairs<'_>, adam_id: &str, pricing_param: &str, now: u64) -> DriftItem {
        let (serial_number, client_user_id) = match self.target(own) {
            Some(Target::Serial(s)) => (Some(s.to_string()), None),
            Some(Target::User(u)) => (None, Some(u.to_string())),
            None => (None, None),
        };
        DriftItem {
            adam_id: adam_id.to_string(),
            pricing_param: pricing_param.to_string(),
            serial_number,
            client_user_id,
            seen_ms: now,
            job_id: Some(own.jobs[self.job as usize].record.id().as_str().to_owned()),
        }
    }
}

/// What vppd's jobs of a token explain, borrowed from their specs: no
/// string is copied, whatever the size of the token's jobs.
struct OwnPairs<'a> {
    jobs: &'a [OwnJob],
    /// Per (adamId, pricingParam): the jobs whose assets include it.
    by_asset: FastMap<(&'a str, &'a str), Vec<u32>>,
    /// Per job: the targets it associates.
    associates: Vec<TargetSet<'a>>,
    /// Targets a job not yet finished disassociates or revokes: their pairs
    /// may vanish through vppd's own doing.
    removing: HashSet<Target<'a>>,
    /// The creation order of the newest job read.
    last_seq: u64,
}

impl<'a> OwnPairs<'a> {
    fn new(jobs: &'a [OwnJob]) -> OwnPairs<'a> {
        let mut own = OwnPairs {
            jobs,
            by_asset: FastMap::new(),
            associates: Vec::with_capacity(jobs.len()),
            removing: HashSet::new(),
            last_seq: 0,
        };
        for (j, job) in jobs.iter().enumerate() {
            let (record, spec) = (&job.record, &*job.spec);
            own.last_seq = own.last_seq.max(record.seq());
            for a in &spec.assets {
                let jobs = own
                    .by_asset
                    .entry((a.adam_id.as_str(), a.pricing_param.as_str()))
                    .or_default();
                if jobs.last() != Some(&(j as u32)) {
                    jobs.push(j as u32);
                }
            }
            own.associates
                .push(TargetSet::new(spec.targets(Phase::Associate)));
            if !record.state().is_final() || record.state() == JobState::Canceled {
                own.removing
                    .extend(targets_of(spec.targets(Phase::Disassociate)));
                own.removing.extend(targets_of(spec.targets(Phase::Revoke)));
            }
        }
        own
    }

    /// Whether some job of vppd's associates this pair.
    fn explains(&self, adam_id: &str, pricing_param: &str, target: Target<'_>) -> bool {
        self.by_asset
            .get(&(adam_id, pricing_param))
            .is_some_and(|jobs| {
                jobs.iter()
                    .any(|j| self.associates[*j as usize].contains(target))
            })
    }

    fn explains_item(&self, i: &DriftItem) -> bool {
        let target = match (&i.serial_number, &i.client_user_id) {
            (Some(s), _) => Target::Serial(s),
            (None, Some(u)) => Target::User(u),
            (None, None) => return false,
        };
        self.explains(&i.adam_id, &i.pricing_param, target)
    }

    /// The key of an assignment Apple lists that no job of vppd's
    /// explains; `None` for one a job explains (or that names no target).
    fn unexplained_key(&self, a: &AssignmentRef<'_>) -> Option<u64> {
        if self.explains(a.adam_id, a.pricing_param, a.target) {
            return None;
        }
        Some(target_key(a.adam_id, a.pricing_param, a.target))
    }

    /// Every asset some job of vppd's names.
    fn assets(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.by_asset.keys().copied()
    }

    /// The pairs of one asset vppd associated and Apple confirmed, and no
    /// later job of vppd's removed, by pair key, with the job that made
    /// each: the jobs' batches replayed in order, this asset's row of each.
    fn made_of(
        &self,
        batches: &[Vec<BatchRecord>],
        (adam_id, pricing_param): (&str, &str),
    ) -> FastMap<u64, Made> {
        let key = |t: Target<'_>| target_key(adam_id, pricing_param, t);
        let mut made = FastMap::new();
        for (j, (job, batches)) in self.jobs.iter().zip(batches).enumerate() {
            let spec: &'a JobSpec = &job.spec;
            let asset = spec
                .assets
                .iter()
                .position(|a| a.adam_id == adam_id && a.pricing_param == pricing_param)
                .map(|i| i as u32);
            for batch in batches {
                let rect = batch.rect();
                if batch.phase() == Phase::Revoke {
                    // A revocation takes every license of its target.
                    for o in (0..rect.n_targets()).filter(|o| batch.is_confirmed_pair(*o)) {
                        if let Some(t) = crate::domain::pairs::target_at(spec, batch, o) {
                            made.remove(&key(t));
                        }
                    }
                    continue;
                }
                let Some(row) = asset
                    .filter(|a| rect.assets.contains(a))
                    .map(|a| a - rect.assets.start)
                else {
                    continue;
                };
                let n = rect.n_targets();
                for p in (row * n..(row + 1) * n).filter(|p| batch.is_confirmed_pair(*p)) {
                    let Some(pair) = crate::domain::pairs::pair(spec, batch, p) else {
                        continue;
                    };
                    if batch.phase() == Phase::Associate {
                        let target = self.associates[j].index_in_rect(rect.pair_at(p).1);
                        made.insert(
                            key(pair.target),
                            Made {
                                job: j as u32,
                                target,
                            },
                        );
                    } else {
                        made.remove(&key(pair.target));
                    }
                }
            }
        }
        made
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::lifecycle::tests::SHAPE;
    use crate::domain::lifecycle::{Decision, FailureRecord};

    /// Assets 1000 and 1001 for serials S0, S1 and users U0, U1.
    fn spec() -> JobSpec {
        let base = crate::domain::lifecycle::tests::spec(2, 2, false);
        JobSpec {
            id: "mine".into(),
            associate: Targets {
                client_user_ids: vec!["U0".into(), "U1".into()],
                ..base.associate.clone()
            },
            allow_partial: true,
            ..base
        }
    }

    /// Every pair confirmed except asset 1000 for serial S1.
    #[test]
    fn the_pairs_made_of_an_asset_are_its_confirmed_ones_with_their_targets() {
        let spec = Arc::new(spec());
        let mut record = JobRecord::new(&spec, "h".into(), SHAPE, 1);
        let mut batches = Vec::new();
        let mut now = 1;
        while let Some(mut batch) = record.start_batch(SHAPE, now) {
            assert!(record.batch_sent(&mut batch, "e", now));
            let decisions: Vec<(u32, Decision)> = (0..batch.rect().pairs() as u32)
                .map(|p| {
                    let pair = crate::domain::pairs::pair(&spec, &batch, p).unwrap();
                    let d = if pair.asset.adam_id == "1000" && pair.target == Target::Serial("S1") {
                        Decision::Failed(FailureRecord {
                            error_number: 9709,
                            error_message: "not enough licenses".into(),
                            event_id: None,
                        })
                    } else {
                        Decision::Confirmed { event_id: None }
                    };
                    (p, d)
                })
                .collect();
            record.decide(&mut batch, &decisions, &[], true, true, now);
            batches.push(batch);
            now += 1;
        }
        assert!(!batches.is_empty());
        let jobs = [OwnJob { record, spec }];
        let own = OwnPairs::new(&jobs);
        assert!(own.explains("1000", "STDQ", Target::User("U1")));
        assert!(!own.explains("1000", "STDQ", Target::User("S0")));
        assert!(!own.explains("2000", "STDQ", Target::Serial("S0")));

        let made = own.made_of(&[batches], ("1000", "STDQ"));
        let mut found: Vec<(Target<'_>, bool)> = made
            .iter()
            .map(|(key, m)| {
                let target = m.target(&own).unwrap();
                let want = match target {
                    Target::Serial(s) => pair_key("1000", "STDQ", Some(s), None),
                    Target::User(u) => pair_key("1000", "STDQ", None, Some(u)),
                };
                (target, *key == want)
            })
            .collect();
        found.sort_by_key(|(t, _)| format!("{t:?}"));
        assert_eq!(
            found,
            [
                (Target::Serial("S0"), true),
                (Target::User("U0"), true),
                (Target::User("U1"), true),
            ]
        );
        let item = made.values().next().unwrap().item(&own, "1000", "STDQ", 9);
        assert_eq!(item.job_id.as_deref(), Some("mine"));
        assert!(item.serial_number.is_some() != item.client_user_id.is_some());
    }
}
