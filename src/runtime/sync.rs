//! Assignment sync: which pairs of a batch Apple holds now, read from Get
//! Assignments. The submitter reconciles a batch of unknown outcome with it,
//! the tracker settles what notifications and event status leave open.

use std::collections::{HashMap, HashSet};

use crate::apple::client::AssignmentsQuery;
use crate::apple::{AppleError, Client, report};
use crate::domain::job::{JobSpec, Phase, Target};
use crate::domain::lifecycle::BatchRecord;
use crate::domain::pairs::{BatchIndex, pair, target_at};

/// One read of Get Assignments and the pairs of a batch whose state it
/// settles.
pub struct SyncQuery {
    query: AssignmentsQuery,
    /// The pairs asked about (for a revoke batch: the one target).
    pub pairs: Vec<u32>,
    /// A revoke batch's target: "present" means it holds any license.
    revoke: bool,
}

/// The reads that settle `pairs` (of `batch`): per target or per asset,
/// whichever needs fewer requests; per target for a revoke batch (whose
/// pairs are its targets). Each can be read and committed on its own, so a
/// reconciliation cut short keeps what the reads before it learned.
pub fn sync_queries(spec: &JobSpec, batch: &BatchRecord, pairs: &[u32]) -> Vec<SyncQuery> {
    let by_target = |t: &Target| match t {
        Target::Serial(s) => AssignmentsQuery {
            serial_number: Some(s.to_string()),
            ..Default::default()
        },
        Target::User(u) => AssignmentsQuery {
            client_user_id: Some(u.to_string()),
            ..Default::default()
        },
    };
    if batch.phase() == Phase::Revoke {
        return pairs
            .iter()
            .filter_map(|&offset| {
                target_at(spec, batch, offset).map(|t| SyncQuery {
                    query: by_target(&t),
                    pairs: vec![offset],
                    revoke: true,
                })
            })
            .collect();
    }
    // In first-seen order, so that the reads follow the batch's own order.
    let mut by_asset: Vec<(AssetKey, Vec<u32>)> = Vec::new();
    let mut by_tgt: Vec<(Target, Vec<u32>)> = Vec::new();
    let mut asset_at: HashMap<AssetKey, usize> = HashMap::new();
    let mut target_idx: HashMap<Target, usize> = HashMap::new();
    for p in pairs {
        if let Some(pair) = pair(spec, batch, *p) {
            let key = (pair.asset.adam_id.clone(), pair.asset.pricing_param.clone());
            let i = *asset_at.entry(key.clone()).or_insert_with(|| {
                by_asset.push((key, Vec::new()));
                by_asset.len() - 1
            });
            by_asset[i].1.push(*p);
            let j = *target_idx.entry(pair.target).or_insert_with(|| {
                by_tgt.push((pair.target, Vec::new()));
                by_tgt.len() - 1
            });
            by_tgt[j].1.push(*p);
        }
    }
    if by_tgt.len() <= by_asset.len() * 4 {
        by_tgt
            .into_iter()
            .map(|(t, pairs)| SyncQuery {
                query: by_target(&t),
                pairs,
                revoke: false,
            })
            .collect()
    } else {
        by_asset
            .into_iter()
            .map(|((adam_id, pricing_param), pairs)| SyncQuery {
                query: AssignmentsQuery {
                    adam_id: Some(adam_id),
                    pricing_param: Some(pricing_param),
                    ..Default::default()
                },
                pairs,
                revoke: false,
            })
            .collect()
    }
}

type AssetKey = (String, String);

/// Reads one query: which of its pairs Apple lists as assigned now.
pub async fn read_query(
    client: &Client,
    spec: &JobSpec,
    batch: &BatchRecord,
    q: &SyncQuery,
) -> Result<HashSet<u32>, AppleError> {
    let walk = client.get_assignments(&q.query).await?;
    if q.revoke {
        return Ok(if walk.items.is_empty() {
            HashSet::new()
        } else {
            q.pairs.iter().copied().collect()
        });
    }
    let index = BatchIndex::new(spec, batch);
    let wanted: HashSet<u32> = q.pairs.iter().copied().collect();
    let mut present = HashSet::new();
    for a in report::assignments(&walk.items) {
        if let Some(p) = index.pair_of(&a)
            && wanted.contains(&p)
        {
            present.insert(p);
        }
    }
    Ok(present)
}

/// Which of `pairs` (of `batch`) Apple lists as assigned now. For a revoke
/// batch (whose pairs are its targets): the targets that still hold any
/// license.
pub async fn sync_pairs(
    client: &Client,
    spec: &JobSpec,
    batch: &BatchRecord,
    pairs: &[u32],
) -> Result<HashSet<u32>, AppleError> {
    let mut present = HashSet::new();
    for q in sync_queries(spec, batch, pairs) {
        present.extend(read_query(client, spec, batch, &q).await?);
    }
    Ok(present)
}
