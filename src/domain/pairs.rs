//! A batch's pairs and the job's assets and targets, both ways, written
//! once: pair index → (asset, target), and what Apple names (adamId,
//! pricingParam, serial or user) → pair index.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};

use foldhash::HashMapExt;

use crate::domain::inbox::AssignmentRef;
use crate::domain::job::{JobAsset, JobSpec, Phase, Target, Targets};
use crate::domain::lifecycle::{BatchRecord, Revoked};
use crate::domain::report::Assignment;

pub use crate::domain::fastmap::{FastMap, FastSet};

/// A target list's targets as a set, kept as indices into the list: each
/// entry is 4 bytes (plus the table's control byte) where a set of
/// borrowed targets takes 24, which for a million-device job is 10 MB
/// against 50. Lookups hash the strings where they are.
pub struct TargetSet<'a> {
    targets: &'a Targets,
    table: hashbrown::HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// Where [`TargetSet::contains`] last found a target. Apple lists
    /// assignments in runs (a batch's targets in the job's order for one
    /// asset, or one target's assets together), so the next target asked
    /// for is most often that one or the one after it: compared where
    /// they lie, in the order of the list, they cost neither the hash nor
    /// the table's random access, which at a million targets miss the
    /// cache every time.
    last: AtomicU32,
}

impl<'a> TargetSet<'a> {
    pub fn new(targets: &'a Targets) -> TargetSet<'a> {
        let mut set = TargetSet {
            targets,
            table: hashbrown::HashTable::with_capacity(targets.len()),
            hasher: foldhash::fast::RandomState::default(),
            last: AtomicU32::new(0),
        };
        for i in 0..targets.len() as u32 {
            let target = at(targets, i);
            let hash = set.hasher.hash_one(target);
            if set.find(hash, target).is_none() {
                let hasher = &set.hasher;
                let list = set.targets;
                set.table
                    .insert_unique(hash, i, |j| hasher.hash_one(at(list, *j)));
            }
        }
        set
    }

    /// Target `index` of the list: its serials first, then its users.
    pub fn get(&self, index: u32) -> Option<Target<'a>> {
        ((index as usize) < self.targets.len()).then(|| at(self.targets, index))
    }

    /// The index [`TargetSet::get`] reads for a target of the list as a
    /// batch's rect names it ([`crate::domain::plan::Rect::pair_at`]: `Ok` a
    /// serial's index, `Err` a user's).
    pub fn index_in_rect(&self, target: Result<u32, u32>) -> u32 {
        match target {
            Ok(s) => s,
            Err(u) => self.targets.serial_numbers.len() as u32 + u,
        }
    }

    /// The index of `target` in the list (its first, if named twice).
    pub fn index(&self, target: Target<'_>) -> Option<u32> {
        self.find(self.hasher.hash_one(target), target)
    }

    pub fn contains(&self, target: Target<'_>) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        let found = [last, last.wrapping_add(1)]
            .into_iter()
            .find(|i| self.get(*i) == Some(target))
            .or_else(|| self.index(target));
        if let Some(i) = found {
            self.last.store(i, Ordering::Relaxed);
        }
        found.is_some()
    }

    fn find(&self, hash: u64, target: Target<'_>) -> Option<u32> {
        self.table
            .find(hash, |i| at(self.targets, *i) == target)
            .copied()
    }
}

/// Target `index` of `targets`, which has it: the table holds only indices
/// below the list's length.
fn at(targets: &Targets, index: u32) -> Target<'_> {
    let serials = targets.serial_numbers.len();
    match targets.serial_numbers.get(index as usize) {
        Some(s) => Target::Serial(s),
        None => Target::User(&targets.client_user_ids[index as usize - serials]),
    }
}

/// One pair of a batch: an asset and a target of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair<'a> {
    pub asset: &'a JobAsset,
    pub target: Target<'a>,
}

/// Pair `index` of `batch` in the job's terms; `None` when the index (or
/// the spec) does not have it, and for a revoke batch (whose pairs are its
/// targets: see [`target_at`] and [`revoked_at`]).
pub fn pair<'a>(spec: &'a JobSpec, batch: &BatchRecord, index: u32) -> Option<Pair<'a>> {
    if batch.phase() == Phase::Revoke {
        return None;
    }
    let (asset, target) = batch.rect().pair_at(index);
    let asset = spec.assets.get(asset as usize)?;
    let targets = spec.targets(batch.phase());
    let target = match target {
        Ok(s) => Target::Serial(targets.serial_numbers.get(s as usize)?),
        Err(u) => Target::User(targets.client_user_ids.get(u as usize)?),
    };
    Some(Pair { asset, target })
}

/// The target at `offset` among a batch's targets (serials, then users).
pub fn target_at<'a>(spec: &'a JobSpec, batch: &BatchRecord, offset: u32) -> Option<Target<'a>> {
    let r = batch.rect();
    let targets = spec.targets(batch.phase());
    if offset < r.n_serials() {
        Some(Target::Serial(
            targets
                .serial_numbers
                .get((r.serials.start + offset) as usize)?,
        ))
    } else {
        Some(Target::User(
            targets
                .client_user_ids
                .get((r.users.start + offset - r.n_serials()) as usize)?,
        ))
    }
}

/// Revocation `index` of a revoke batch (its position in the batch's
/// revoked list): the asset Apple named and the job's target.
pub fn revoked_at<'a>(
    spec: &'a JobSpec,
    batch: &'a BatchRecord,
    index: u32,
) -> Option<(JobAsset, Target<'a>)> {
    let r = batch.revoked().get(index as usize)?;
    let target = target_at(spec, batch, r.target)?;
    Some((
        JobAsset {
            adam_id: r.adam_id.clone(),
            pricing_param: r.pricing_param.clone(),
        },
        target,
    ))
}

/// Maps Apple's (adamId, pricingParam, target) back to a pair index of a batch.
pub struct BatchIndex {
    /// adamId → (pricingParam, asset offset): looked up by the borrowed
    /// strings of a stored notification, without building a key.
    assets: FastMap<String, Vec<(String, u32)>>,
    serials: FastMap<String, u32>,
    /// The batch's serial numbers by offset, each only at the offset the
    /// map gives it (a serial the job names twice is `None` elsewhere), so
    /// that a guess checked here always agrees with the map.
    serial_at: Vec<Option<Box<str>>>,
    users: FastMap<String, u32>,
    n_serials: u32,
    n_targets: u32,
    phase: Phase,
}

impl BatchIndex {
    pub fn new(spec: &JobSpec, batch: &BatchRecord) -> BatchIndex {
        let r = batch.rect();
        let targets = spec.targets(batch.phase());
        let mut assets: FastMap<String, Vec<(String, u32)>> = FastMap::new();
        for i in r.assets.start..r.assets.end {
            if let Some(a) = spec.assets.get(i as usize) {
                let pricings = assets.entry(a.adam_id.clone()).or_default();
                // As a map would: the last of a repeated asset wins.
                pricings.retain(|(p, _)| *p != a.pricing_param);
                pricings.push((a.pricing_param.clone(), i - r.assets.start));
            }
        }
        let serials: FastMap<String, u32> = (r.serials.start..r.serials.end)
            .filter_map(|i| {
                targets
                    .serial_numbers
                    .get(i as usize)
                    .map(|s| (s.clone(), i - r.serials.start))
            })
            .collect();
        let mut serial_at: Vec<Option<Box<str>>> = vec![None; r.n_serials() as usize];
        for (s, &i) in &serials {
            if let Some(slot) = serial_at.get_mut(i as usize) {
                *slot = Some(s.as_str().into());
            }
        }
        let users = (r.users.start..r.users.end)
            .filter_map(|i| {
                targets
                    .client_user_ids
                    .get(i as usize)
                    .map(|u| (u.clone(), i - r.users.start))
            })
            .collect();
        BatchIndex {
            assets,
            serials,
            serial_at,
            users,
            n_serials: r.n_serials(),
            n_targets: r.n_targets(),
            phase: batch.phase(),
        }
    }

    /// The phase of the batch it indexes.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// A revoke batch: the revocation Apple's assignment names, when its
    /// target is one of the batch's (Apple names the asset itself).
    pub fn revoked_of(&self, a: AssignmentRef<'_>) -> Option<Revoked> {
        Some(Revoked {
            adam_id: a.adam_id.to_string(),
            pricing_param: a.pricing_param.to_string(),
            target: self.target_of(a.target)?,
        })
    }

    /// The pair of this batch Apple's assignment names, if any.
    pub fn pair_of(&self, a: &Assignment) -> Option<u32> {
        self.pair_named(AssignmentRef {
            adam_id: &a.adam_id,
            pricing_param: &a.pricing_param,
            target: a.assignee.as_target(),
        })
    }

    /// [`BatchIndex::pair_of`] for borrowed strings: nothing is allocated.
    pub fn pair_named(&self, a: AssignmentRef<'_>) -> Option<u32> {
        let asset = self.asset_of(a.adam_id, a.pricing_param)?;
        Some(asset * self.n_targets + self.target_of(a.target)?)
    }

    /// The asset's offset among the batch's assets.
    fn asset_of(&self, adam_id: &str, pricing_param: &str) -> Option<u32> {
        self.assets
            .get(adam_id)?
            .iter()
            .find(|(p, _)| p == pricing_param)
            .map(|(_, o)| *o)
    }

    /// The pairs of this batch `assignments` name, in their order (those
    /// that name none left out): [`BatchIndex::pair_named`] of each.
    ///
    /// Apple lists a notification's assignments as the request listed them,
    /// so each is first tried as the serial after the one found last, and
    /// the asset as the one found last: string compares instead of a hash
    /// and a walk to a cold map entry per assignment.
    pub fn pairs_named(&self, assignments: &[AssignmentRef<'_>]) -> Vec<u32> {
        let mut out = Vec::with_capacity(assignments.len());
        let mut asset: Option<(&str, &str, u32)> = None;
        let mut last_serial: Option<u32> = None;
        for a in assignments {
            let offset = match asset {
                Some((id, p, o)) if id == a.adam_id && p == a.pricing_param => Some(o),
                _ => {
                    let o = self.asset_of(a.adam_id, a.pricing_param);
                    if let Some(o) = o {
                        asset = Some((a.adam_id, a.pricing_param, o));
                    }
                    o
                }
            };
            let Some(offset) = offset else { continue };
            let target = match a.target {
                Target::Serial(s) => {
                    let next = last_serial.map_or(0, |t| t + 1);
                    let guessed = self
                        .serial_at
                        .get(next as usize)
                        .and_then(|g| g.as_deref())
                        .is_some_and(|g| g == s);
                    let t = if guessed {
                        Some(next)
                    } else {
                        self.target_of(a.target)
                    };
                    if t.is_some() {
                        last_serial = t;
                    }
                    t
                }
                Target::User(_) => self.target_of(a.target),
            };
            if let Some(t) = target {
                out.push(offset * self.n_targets + t);
            }
        }
        out
    }

    /// The target's offset among the batch's targets (serials, then users).
    fn target_of(&self, t: Target<'_>) -> Option<u32> {
        match t {
            Target::Serial(s) => self.serials.get(s).copied(),
            Target::User(u) => Some(self.n_serials + *self.users.get(u)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn targets(serials: &[&str], users: &[&str]) -> Targets {
        Targets {
            serial_numbers: serials.iter().map(|s| s.to_string()).collect(),
            client_user_ids: users.iter().map(|u| u.to_string()).collect(),
        }
    }

    #[test]
    fn a_target_set_tells_serials_from_users() {
        let t = targets(&["A", "B"], &["A", "C"]);
        let set = TargetSet::new(&t);
        assert_eq!(set.index(Target::Serial("A")), Some(0));
        assert_eq!(set.index(Target::User("A")), Some(2));
        assert_eq!(set.index(Target::User("C")), Some(3));
        assert!(!set.contains(Target::Serial("C")));
        assert!(!set.contains(Target::User("B")));
        assert_eq!(set.get(1), Some(Target::Serial("B")));
        assert_eq!(set.get(3), Some(Target::User("C")));
        assert_eq!(set.get(4), None);
    }

    #[test]
    fn a_target_named_twice_is_found_at_its_first_place() {
        let t = targets(&["A", "B", "A"], &[]);
        assert_eq!(TargetSet::new(&t).index(Target::Serial("A")), Some(0));
    }

    proptest! {
        /// Guessing the next serial and the last asset finds exactly what
        /// looking each assignment up finds, whatever the order, repeats,
        /// serials the job names twice, and names outside the batch.
        #[test]
        fn pairs_named_finds_what_pair_named_finds(
            serials in prop::collection::vec("[a-e]", 1..12),
            in_order in any::<bool>(),
            picks in prop::collection::vec((0usize..5, 0usize..14, any::<bool>()), 0..60),
        ) {
            let mut spec = crate::domain::lifecycle::tests::spec(4, 0, true);
            spec.associate = Targets { serial_numbers: serials.clone(), client_user_ids: vec!["a".into(), "u".into()] };
            let shape = crate::domain::plan::Shape {
                max_assets: 3,
                max_serials: 9,
                max_users: 2,
                max_revoke_serials: 3,
                max_revoke_users: 3,
            };
            let mut job = crate::domain::lifecycle::JobRecord::new(&spec, "h".into(), shape, 1);
            prop_assert!(job.apply(&crate::domain::lifecycle::JobChange::Start, 2));
            let batch = job.start_batch(shape, 3).unwrap();
            let index = BatchIndex::new(&spec, &batch);
            let adams: Vec<String> = (0..5).map(|i| (1000 + i).to_string()).collect();
            let names: Vec<String> = (0..14).map(|i| serials.get(i).cloned().unwrap_or_else(|| format!("x{i}"))).collect();
            let list: Vec<AssignmentRef<'_>> = if in_order {
                // Apple's usual shape: each asset's serials in the job's order.
                adams.iter().take(3).flat_map(|adam| names.iter().map(move |n| AssignmentRef {
                    adam_id: adam,
                    pricing_param: "STDQ",
                    target: Target::Serial(n),
                })).collect()
            } else {
                picks.iter().map(|(a, t, user)| AssignmentRef {
                    adam_id: &adams[*a],
                    pricing_param: "STDQ",
                    target: if *user { Target::User(&names[*t]) } else { Target::Serial(&names[*t]) },
                }).collect()
            };
            let want: Vec<u32> = list.iter().filter_map(|a| index.pair_named(*a)).collect();
            prop_assert_eq!(index.pairs_named(&list), want);
        }

        #[test]
        fn a_target_set_holds_what_a_hash_set_of_its_targets_holds(
            serials in prop::collection::vec("[a-d]{1,2}", 0..40),
            users in prop::collection::vec("[a-d]{1,2}", 0..40),
            probes in prop::collection::vec((any::<bool>(), "[a-d]{1,2}"), 0..40),
        ) {
            let t = Targets { serial_numbers: serials, client_user_ids: users };
            let set = TargetSet::new(&t);
            let want: HashSet<Target<'_>> = t
                .serial_numbers
                .iter()
                .map(|s| Target::Serial(s))
                .chain(t.client_user_ids.iter().map(|u| Target::User(u)))
                .collect();
            for (serial, name) in &probes {
                let target = if *serial { Target::Serial(name) } else { Target::User(name) };
                prop_assert_eq!(set.contains(target), want.contains(&target));
                if let Some(i) = set.index(target) {
                    prop_assert_eq!(set.get(i), Some(target));
                }
            }
            for i in 0..t.len() as u32 {
                let target = set.get(i).unwrap();
                prop_assert!(set.index(target).is_some_and(|j| j <= i));
            }
            // In the list's order, backwards, and each twice: the runs
            // Apple lists assignments in, looked up near the last one found.
            let order: Vec<u32> = (0..t.len() as u32)
                .chain((0..t.len() as u32).rev())
                .flat_map(|i| [i, i])
                .collect();
            for i in order {
                prop_assert!(set.contains(set.get(i).unwrap()));
            }
            for (serial, name) in &probes {
                let target = if *serial { Target::Serial(name) } else { Target::User(name) };
                prop_assert_eq!(set.contains(target), want.contains(&target));
            }
        }
    }
}
