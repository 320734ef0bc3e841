//! The bodies of management requests for a batch, which the submitter
//! sends: first send, resend after reconciling, and the resubmission of an
//! event Apple left PENDING too long.

use std::collections::BTreeMap;

use crate::apple::types::{Asset, ManageAssetsRequest, RevokeAssetsRequest};
use crate::domain::job::{JobSpec, Target};
use crate::domain::lifecycle::BatchRecord;
use crate::domain::pairs::target_at;

/// The revoke request for a revoke batch: its targets not yet done.
pub fn revoke_request_for(spec: &JobSpec, batch: &BatchRecord) -> RevokeAssetsRequest {
    let mut serials = Vec::new();
    let mut users = Vec::new();
    for p in batch.undecided_pairs() {
        match target_at(spec, batch, p) {
            Some(Target::Serial(s)) => serials.push(s.to_string()),
            Some(Target::User(u)) => users.push(u.to_string()),
            None => {}
        }
    }
    RevokeAssetsRequest {
        serial_numbers: (!serials.is_empty()).then_some(serials),
        client_user_ids: (!users.is_empty()).then_some(users),
    }
}

/// The request for a batch: the assets and targets that still have an
/// undecided pair (the whole rect for a fresh batch).
pub fn request_for(spec: &JobSpec, batch: &BatchRecord) -> ManageAssetsRequest {
    let rect = batch.rect();
    let n_targets = rect.n_targets();
    let mut asset_open = vec![false; rect.n_assets() as usize];
    let mut target_open = vec![false; n_targets as usize];
    for p in batch.undecided_pairs() {
        asset_open[(p / n_targets.max(1)) as usize] = true;
        target_open[(p % n_targets.max(1)) as usize] = true;
    }
    let targets = spec.targets(batch.phase());
    let assets = asset_open
        .iter()
        .enumerate()
        .filter(|(_, open)| **open)
        .filter_map(|(i, _)| spec.assets.get(rect.assets.start as usize + i))
        .map(|a| Asset::new(a.adam_id.clone(), a.pricing_param.clone()))
        .collect();
    let mut serials = Vec::new();
    let mut users = Vec::new();
    for (t, open) in target_open.iter().enumerate() {
        if !open {
            continue;
        }
        let t = t as u32;
        if t < rect.n_serials() {
            if let Some(s) = targets
                .serial_numbers
                .get((rect.serials.start + t) as usize)
            {
                serials.push(s.clone());
            }
        } else if let Some(u) = targets
            .client_user_ids
            .get((rect.users.start + t - rect.n_serials()) as usize)
        {
            users.push(u.clone());
        }
    }
    ManageAssetsRequest {
        assets,
        serial_numbers: (!serials.is_empty()).then_some(serials),
        client_user_ids: (!users.is_empty()).then_some(users),
    }
}

/// Requests for exactly the undecided pairs of an associate or disassociate
/// batch, none decided included: assets whose undecided targets are the same
/// share a request. (The rect of [`request_for`] may hold decided pairs when
/// the undecided ones do not form a rectangle; resending a decided pair
/// could undo or repeat what Apple already reported.)
pub fn exact_requests_for(spec: &JobSpec, batch: &BatchRecord) -> Vec<ManageAssetsRequest> {
    let rect = batch.rect();
    let n_targets = rect.n_targets().max(1);
    let mut per_asset: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in batch.undecided_pairs() {
        per_asset
            .entry(p / n_targets)
            .or_default()
            .push(p % n_targets);
    }
    let mut groups: BTreeMap<Vec<u32>, Vec<u32>> = BTreeMap::new();
    for (asset, targets) in per_asset {
        groups.entry(targets).or_default().push(asset);
    }
    let mut out = Vec::with_capacity(groups.len());
    for (targets, assets) in groups {
        let assets = assets
            .iter()
            .filter_map(|i| spec.assets.get((rect.assets.start + i) as usize))
            .map(|a| Asset::new(a.adam_id.clone(), a.pricing_param.clone()))
            .collect();
        let mut serials = Vec::new();
        let mut users = Vec::new();
        for t in targets {
            match target_at(spec, batch, t) {
                Some(Target::Serial(s)) => serials.push(s.to_string()),
                Some(Target::User(u)) => users.push(u.to_string()),
                None => {}
            }
        }
        out.push(ManageAssetsRequest {
            assets,
            serial_numbers: (!serials.is_empty()).then_some(serials),
            client_user_ids: (!users.is_empty()).then_some(users),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::domain::job::{JobAsset, Targets};
    use crate::domain::lifecycle::{Decision, JobRecord};
    use crate::domain::plan::Shape;

    fn spec() -> JobSpec {
        JobSpec {
            id: "j".into(),
            token: "t".into(),
            assets: (0..3)
                .map(|i| JobAsset {
                    adam_id: (100 + i).to_string(),
                    pricing_param: "STDQ".into(),
                })
                .collect(),
            disassociate: Targets::default(),
            associate: Targets {
                serial_numbers: vec!["S0".into(), "S1".into()],
                client_user_ids: vec!["U0".into()],
            },
            install: true,
            allow_partial: false,
            revoke: Targets {
                serial_numbers: vec!["R0".into(), "R1".into()],
                client_user_ids: vec!["RU".into()],
            },
            uninstall: false,
            wait_for_licenses: false,
            users: Vec::new(),
            retire_users: Vec::new(),
            priority: Default::default(),
        }
    }

    /// (adamId, target) pairs a set of requests names.
    fn named(requests: &[ManageAssetsRequest]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for r in requests {
            for a in &r.assets {
                for t in r
                    .serial_numbers
                    .iter()
                    .flatten()
                    .chain(r.client_user_ids.iter().flatten())
                {
                    out.push((a.adam_id.clone(), t.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn exact_requests_name_every_undecided_pair_once_and_no_decided_one() {
        let spec = spec();
        let shape = Shape::uniform(10, 10, 10);
        let mut job = JobRecord::new(&spec, "h".into(), shape, 0);
        // The revoke batch comes first; then the 3 x 3 association.
        let mut revoke = job.start_batch(shape, 0).unwrap();
        let undecided: Vec<String> = revoke_request_for(&spec, &revoke).serial_numbers.unwrap();
        assert_eq!(undecided, ["R0", "R1"]);
        job.decide(
            &mut revoke,
            &[(1, Decision::Confirmed { event_id: None })],
            &[],
            false,
            false,
            0,
        );
        let left = revoke_request_for(&spec, &revoke);
        assert_eq!(left.serial_numbers.unwrap(), ["R0"]);
        assert_eq!(left.client_user_ids.unwrap(), ["RU"]);
        job.decide(
            &mut revoke,
            &[
                (0, Decision::Confirmed { event_id: None }),
                (2, Decision::Confirmed { event_id: None }),
            ],
            &[],
            false,
            false,
            0,
        );

        let mut batch = job.start_batch(shape, 0).unwrap();
        // Decide a non-rectangular set: (asset 0, S0), (asset 1, S1), (asset 2, U0).
        let decided = [0u32, 4, 8];
        let decisions: Vec<_> = decided
            .iter()
            .map(|p| (*p, Decision::Confirmed { event_id: None }))
            .collect();
        job.decide(&mut batch, &decisions, &[], false, false, 0);
        let requests = exact_requests_for(&spec, &batch);
        let pairs = named(&requests);
        let unique: HashSet<_> = pairs.iter().cloned().collect();
        assert_eq!(unique.len(), pairs.len(), "a pair named twice: {pairs:?}");
        let expected: HashSet<(String, String)> = batch
            .undecided_pairs()
            .map(|p| {
                let pair = crate::domain::pairs::pair(&spec, &batch, p).unwrap();
                let t = match pair.target {
                    Target::Serial(s) | Target::User(s) => s.to_string(),
                };
                (pair.asset.adam_id.clone(), t)
            })
            .collect();
        assert_eq!(unique, expected);
        assert_eq!(expected.len(), 6);
        // The rect request would have named decided pairs again.
        assert_eq!(named(&[request_for(&spec, &batch)]).len(), 9);
    }
}
