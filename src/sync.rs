//! Assignment sync: which pairs of a batch Apple holds now, read from Get
//! Assignments. The submitter reconciles a batch of unknown outcome with it,
//! the tracker settles what notifications and event status leave open.

use std::collections::HashSet;

use crate::apple::client::AssignmentsQuery;
use crate::apple::{AppleError, Client, report};
use crate::job::{JobSpec, Phase, Target};
use crate::lifecycle::BatchRecord;
use crate::pairs::{BatchIndex, pair, target_at};

/// Which of `pairs` (of `batch`) Apple lists as assigned now. Queries per
/// target or per asset, whichever needs fewer requests. For a revoke batch
/// (whose pairs are its targets): the targets that still hold any license.
pub async fn sync_pairs(
    client: &Client,
    spec: &JobSpec,
    batch: &BatchRecord,
    pairs: &[u32],
) -> Result<HashSet<u32>, AppleError> {
    if batch.phase() == Phase::Revoke {
        return targets_holding(client, spec, batch, pairs).await;
    }
    let index = BatchIndex::new(spec, batch);
    let wanted: HashSet<u32> = pairs.iter().copied().collect();
    let mut assets = HashSet::new();
    let mut targets = HashSet::new();
    for p in pairs {
        if let Some(pair) = pair(spec, batch, *p) {
            assets.insert(pair.asset);
            targets.insert(pair.target);
        }
    }
    let queries: Vec<AssignmentsQuery> = if targets.len() <= assets.len() * 4 {
        targets
            .into_iter()
            .map(|t| match t {
                Target::Serial(s) => AssignmentsQuery {
                    serial_number: Some(s.to_string()),
                    ..Default::default()
                },
                Target::User(u) => AssignmentsQuery {
                    client_user_id: Some(u.to_string()),
                    ..Default::default()
                },
            })
            .collect()
    } else {
        assets
            .into_iter()
            .map(|a| AssignmentsQuery {
                adam_id: Some(a.adam_id.clone()),
                pricing_param: Some(a.pricing_param.clone()),
                ..Default::default()
            })
            .collect()
    };
    let mut present = HashSet::new();
    for q in queries {
        let walk = client.get_assignments(&q).await?;
        for a in report::assignments(&walk.items) {
            if let Some(p) = index.pair_of(&a)
                && wanted.contains(&p)
            {
                present.insert(p);
            }
        }
    }
    Ok(present)
}

/// Which targets of a revoke batch Apple still lists with an assignment.
async fn targets_holding(
    client: &Client,
    spec: &JobSpec,
    batch: &BatchRecord,
    targets: &[u32],
) -> Result<HashSet<u32>, AppleError> {
    let mut holding = HashSet::new();
    for &offset in targets {
        let query = match target_at(spec, batch, offset) {
            Some(Target::Serial(s)) => AssignmentsQuery {
                serial_number: Some(s.to_string()),
                ..Default::default()
            },
            Some(Target::User(u)) => AssignmentsQuery {
                client_user_id: Some(u.to_string()),
                ..Default::default()
            },
            None => continue,
        };
        if !client.get_assignments(&query).await?.items.is_empty() {
            holding.insert(offset);
        }
    }
    Ok(holding)
}
