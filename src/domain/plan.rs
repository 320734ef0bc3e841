//! Turns a job and Apple's live limits into the fewest ordered batches.
//!
//! Architecture invariant: this module does no I/O and keeps no state beyond
//! its arguments; everything in it is tested exhaustively with properties.
//!
//! A job's work is the cross product assets x targets of each phase. Because
//! Apple limits assets, serial numbers and client user ids separately per
//! request, the fewest requests for `A` assets, `S` serials and `U` users is
//! `ceil(A / maxAssets) * max(ceil(S / maxSerialNumbers), ceil(U /
//! maxClientUserIds))`: each request carries one chunk of assets and one chunk
//! of serials together with one chunk of users. (10,000 devices x 25 apps with
//! Apple's defaults: 1 x 10 = 10.)
//!
//! Work not yet sent is kept as a short queue of [`Rect`]s, index ranges into
//! the job's asset and target lists; a batch is carved off the front when it
//! is about to be sent, with the limits of that moment. Memory therefore never
//! grows with assets x targets, and limits that shrink mid-job apply to
//! everything not yet sent.

use std::collections::VecDeque;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::domain::job::{JobSpec, Phase};

/// The limits that shape associate/disassociate requests (the planner's
/// own type: the Apple client converts its published limits into it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub max_assets: u32,
    pub max_serials: u32,
    pub max_users: u32,
    /// `maxRevokeSerialNumbers` / `maxRevokeClientUserIds`: a revoke's own limits.
    pub max_revoke_serials: u32,
    pub max_revoke_users: u32,
}

/// Which limit Apple said a request was over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Assets,
    ClientUserIds,
    SerialNumbers,
}

impl Shape {
    /// The tighter of two shapes, per dimension.
    pub fn min(self, other: Shape) -> Shape {
        Shape {
            max_assets: self.max_assets.min(other.max_assets).max(1),
            max_serials: self.max_serials.min(other.max_serials).max(1),
            max_users: self.max_users.min(other.max_users).max(1),
            max_revoke_serials: self.max_revoke_serials.min(other.max_revoke_serials).max(1),
            max_revoke_users: self.max_revoke_users.min(other.max_revoke_users).max(1),
        }
    }

    /// Associate/disassociate limits, with the revoke limits the same.
    pub fn uniform(max_assets: u32, max_serials: u32, max_users: u32) -> Shape {
        Shape {
            max_assets,
            max_serials,
            max_users,
            max_revoke_serials: max_serials,
            max_revoke_users: max_users,
        }
    }

    /// The limits that shape a batch of `phase`: a revoke batch's targets
    /// count against the revoke limits (and it has one placeholder asset).
    pub fn for_phase(self, phase: Phase) -> Shape {
        match phase {
            Phase::Revoke => Shape {
                max_assets: self.max_assets.max(1),
                max_serials: self.max_revoke_serials.max(1),
                max_users: self.max_revoke_users.max(1),
                ..self
            },
            _ => self,
        }
    }

    /// `self` with the limits of `phase` replaced by `narrowed` (a shape
    /// from [`Shape::for_phase`] after a refusal).
    pub fn with_phase(self, phase: Phase, narrowed: Shape) -> Shape {
        match phase {
            Phase::Revoke => Shape {
                max_revoke_serials: narrowed.max_serials,
                max_revoke_users: narrowed.max_users,
                ..self
            },
            _ => Shape {
                max_revoke_serials: self.max_revoke_serials,
                max_revoke_users: self.max_revoke_users,
                ..narrowed
            },
        }
    }
}

/// Index ranges into a job's assets and into one phase's serials and users:
/// the pairs `assets x (serials + users)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rect {
    pub assets: Range<u32>,
    pub serials: Range<u32>,
    pub users: Range<u32>,
}

impl Rect {
    pub fn n_assets(&self) -> u32 {
        self.assets.end - self.assets.start
    }

    pub fn n_serials(&self) -> u32 {
        self.serials.end - self.serials.start
    }

    pub fn n_users(&self) -> u32 {
        self.users.end - self.users.start
    }

    pub fn n_targets(&self) -> u32 {
        self.n_serials() + self.n_users()
    }

    pub fn pairs(&self) -> u64 {
        self.n_assets() as u64 * self.n_targets() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.pairs() == 0
    }

    pub fn fits(&self, shape: Shape) -> bool {
        self.n_assets() <= shape.max_assets
            && self.n_serials() <= shape.max_serials
            && self.n_users() <= shape.max_users
    }

    /// Index of a pair inside this rect: asset-major over (serials, then users).
    /// `asset` is an index into the job's assets, `target` an offset into this
    /// rect's targets (serials first).
    pub fn pair_index(&self, asset_offset: u32, target_offset: u32) -> u32 {
        asset_offset * self.n_targets() + target_offset
    }

    /// Inverse of [`Rect::pair_index`]: (job asset index, job target) where
    /// the target is `Ok(serial index)` or `Err(user index)`.
    pub fn pair_at(&self, index: u32) -> (u32, Result<u32, u32>) {
        let n_targets = self.n_targets().max(1);
        let asset = self.assets.start + index / n_targets;
        let t = index % n_targets;
        let target = if t < self.n_serials() {
            Ok(self.serials.start + t)
        } else {
            Err(self.users.start + (t - self.n_serials()))
        };
        (asset, target)
    }
}

/// Requests needed to send `rect` with `shape`: the minimum.
pub fn count(rect: &Rect, shape: Shape) -> u64 {
    if rect.is_empty() {
        return 0;
    }
    let asset_chunks = rect.n_assets().div_ceil(shape.max_assets) as u64;
    let target_chunks = rect
        .n_serials()
        .div_ceil(shape.max_serials)
        .max(rect.n_users().div_ceil(shape.max_users)) as u64;
    asset_chunks * target_chunks
}

/// Splits the first batch off `rect`: the batch, then what remains (up to two
/// rects, in the order they must be sent). The remainder still needs exactly
/// `count(rect) - 1` requests, so carving repeatedly stays minimal.
pub fn carve(rect: &Rect, shape: Shape) -> (Rect, Vec<Rect>) {
    let a_end = (rect.assets.start + shape.max_assets).min(rect.assets.end);
    let s_end = (rect.serials.start + shape.max_serials).min(rect.serials.end);
    let u_end = (rect.users.start + shape.max_users).min(rect.users.end);
    let batch = Rect {
        assets: rect.assets.start..a_end,
        serials: rect.serials.start..s_end,
        users: rect.users.start..u_end,
    };
    let mut rest = Vec::with_capacity(2);
    // The other assets for the same target chunk come next, so one target
    // chunk is finished (all its assets) before the next one starts.
    let same_targets = Rect {
        assets: a_end..rect.assets.end,
        serials: batch.serials.clone(),
        users: batch.users.clone(),
    };
    if !same_targets.is_empty() {
        rest.push(same_targets);
    }
    let later_targets = Rect {
        assets: rect.assets.clone(),
        serials: s_end..rect.serials.end,
        users: u_end..rect.users.end,
    };
    if !later_targets.is_empty() {
        rest.push(later_targets);
    }
    (batch, rest)
}

/// One piece of unsent work: a phase and its rect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    pub phase: Phase,
    pub rect: Rect,
}

/// A batch ready to be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub phase: Phase,
    pub rect: Rect,
}

/// The unsent work of one job, in send order: every disassociation, then
/// every revoke, before any association.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub queue: VecDeque<Work>,
}

impl Plan {
    /// The whole job: one rect per non-empty phase. A revoke names no
    /// asset: its rect has one placeholder asset, so its pairs are its targets.
    pub fn for_job(spec: &JobSpec) -> Plan {
        let mut queue = VecDeque::new();
        for phase in Phase::ALL {
            let t = spec.targets(phase);
            let n_assets = match phase {
                Phase::Revoke => 1,
                _ => spec.assets.len() as u32,
            };
            let rect = Rect {
                assets: 0..n_assets,
                serials: 0..t.serial_numbers.len() as u32,
                users: 0..t.client_user_ids.len() as u32,
            };
            if !rect.is_empty() {
                queue.push_back(Work { phase, rect });
            }
        }
        Plan { queue }
    }

    /// Requests still needed with `shape`.
    pub fn remaining(&self, shape: Shape) -> u64 {
        self.queue
            .iter()
            .map(|w| count(&w.rect, shape.for_phase(w.phase)))
            .sum()
    }

    pub fn is_done(&self) -> bool {
        self.queue.is_empty()
    }

    /// The next batch with the limits of this moment; `None` when all is sent.
    pub fn next_batch(&mut self, shape: Shape) -> Option<Batch> {
        let work = self.queue.pop_front()?;
        let (batch, rest) = carve(&work.rect, shape.for_phase(work.phase));
        for rect in rest.into_iter().rev() {
            self.queue.push_front(Work {
                phase: work.phase,
                rect,
            });
        }
        Some(Batch {
            phase: work.phase,
            rect: batch,
        })
    }

    /// Puts a refused batch back at the front, to be carved again with a
    /// tighter shape (a [`Refusal`]: split and resend).
    pub fn push_front(&mut self, batch: Batch) {
        self.queue.push_front(Work {
            phase: batch.phase,
            rect: batch.rect,
        });
    }

    /// The next phase to be sent, if any.
    pub fn next_phase(&self) -> Option<Phase> {
        self.queue.front().map(|w| w.phase)
    }
}

/// The shape to retry with after Apple refused `batch` for being over a
/// limit: the refreshed limits where they are already tighter than the
/// batch, else half the batch on the dimension Apple named, so that each
/// refusal shrinks it.
pub fn shape_after_refusal(batch: &Rect, current: Shape, refusal: Refusal) -> Shape {
    let halve = |n: u32| (n / 2).max(1);
    let mut shape = current;
    match refusal {
        Refusal::Assets if batch.n_assets() <= current.max_assets => {
            shape.max_assets = halve(batch.n_assets())
        }
        Refusal::ClientUserIds if batch.n_users() <= current.max_users => {
            shape.max_users = halve(batch.n_users())
        }
        Refusal::SerialNumbers if batch.n_serials() <= current.max_serials => {
            shape.max_serials = halve(batch.n_serials())
        }
        _ => {}
    }
    shape
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn shape(a: u32, s: u32, u: u32) -> Shape {
        Shape::uniform(a, s, u)
    }

    fn spec(assets: usize, dis: (usize, usize), assoc: (usize, usize)) -> JobSpec {
        let names = |p: &str, n: usize| (0..n).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
        JobSpec {
            id: "j".into(),
            token: "t".into(),
            assets: (0..assets)
                .map(|i| crate::domain::job::JobAsset {
                    adam_id: (1000 + i).to_string(),
                    pricing_param: "STDQ".into(),
                })
                .collect(),
            disassociate: crate::domain::job::Targets {
                serial_numbers: names("DS", dis.0),
                client_user_ids: names("DU", dis.1),
            },
            associate: crate::domain::job::Targets {
                serial_numbers: names("AS", assoc.0),
                client_user_ids: names("AU", assoc.1),
            },
            install: true,
            allow_partial: false,
            revoke: Default::default(),
            uninstall: false,
            wait_for_licenses: false,
            users: Vec::new(),
            retire_users: Vec::new(),
            priority: Default::default(),
        }
    }

    /// Drains a plan, optionally switching shape after `switch_after` batches.
    fn drain(
        plan: &mut Plan,
        first: Shape,
        second: Shape,
        switch_after: usize,
    ) -> Vec<(Batch, Shape)> {
        let mut out = Vec::new();
        loop {
            let shape = if out.len() < switch_after {
                first
            } else {
                second
            };
            match plan.next_batch(shape) {
                Some(b) => out.push((b, shape)),
                None => return out,
            }
        }
    }

    fn pairs_of(batches: &[(Batch, Shape)]) -> Vec<(Phase, u32, Result<u32, u32>)> {
        let mut pairs = Vec::new();
        for (b, _) in batches {
            for i in 0..b.rect.pairs() as u32 {
                let (a, t) = b.rect.pair_at(i);
                pairs.push((b.phase, a, t));
            }
        }
        pairs
    }

    #[test]
    fn back_to_school_is_ten_requests() {
        let s = spec(25, (0, 0), (10_000, 0));
        let mut plan = Plan::for_job(&s);
        let d = shape(25, 1000, 1000);
        assert_eq!(plan.remaining(d), 10);
        let batches = drain(&mut plan, d, d, usize::MAX);
        assert_eq!(batches.len(), 10);
        assert!(batches.iter().all(|(b, _)| b.rect.pairs() == 25_000));
    }

    #[test]
    fn users_and_serials_share_requests() {
        let s = spec(3, (0, 0), (2500, 1200));
        let plan = Plan::for_job(&s);
        assert_eq!(plan.remaining(shape(25, 1000, 1000)), 3);
        assert_eq!(plan.remaining(shape(2, 1000, 500)), 2 * 3);
    }

    #[test]
    fn refusal_halves_the_named_dimension() {
        let r = Rect {
            assets: 0..25,
            serials: 0..1000,
            users: 0..0,
        };
        let d = shape(25, 1000, 1000);
        assert_eq!(
            shape_after_refusal(&r, d, Refusal::SerialNumbers).max_serials,
            500
        );
        assert_eq!(shape_after_refusal(&r, d, Refusal::Assets).max_assets, 12);
        // Already tighter limits (refreshed from service config) win.
        assert_eq!(
            shape_after_refusal(&r, shape(10, 1000, 1000), Refusal::Assets).max_assets,
            10
        );
        assert_eq!(
            shape_after_refusal(&r, shape(25, 300, 1000), Refusal::SerialNumbers),
            shape(25, 300, 1000)
        );
    }

    #[test]
    fn pair_index_round_trips() {
        let r = Rect {
            assets: 3..6,
            serials: 10..14,
            users: 7..9,
        };
        for i in 0..r.pairs() as u32 {
            let (a, t) = r.pair_at(i);
            let offset = match t {
                Ok(s) => s - r.serials.start,
                Err(u) => r.n_serials() + (u - r.users.start),
            };
            assert_eq!(r.pair_index(a - r.assets.start, offset), i);
        }
    }

    fn arb_shape() -> impl Strategy<Value = Shape> {
        (1u32..8, 1u32..12, 1u32..12).prop_map(|(a, s, u)| shape(a, s, u))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn every_pair_once_within_limits_minimal_and_ordered(
            assets in 1usize..20,
            dis in (0usize..30, 0usize..30),
            assoc in (0usize..30, 0usize..30),
            sh in arb_shape(),
        ) {
            let s = spec(assets, dis, assoc);
            let mut plan = Plan::for_job(&s);
            let expected = plan.remaining(sh);
            let batches = drain(&mut plan, sh, sh, usize::MAX);
            // Minimal: exactly ceil(A/ma) * max(ceil(S/ms), ceil(U/mu)) per phase.
            let minimum: u64 = [dis, assoc].iter().map(|(ns, nu)| {
                if ns + nu == 0 { 0 } else {
                    (assets as u64).div_ceil(sh.max_assets as u64)
                        * (*ns as u64).div_ceil(sh.max_serials as u64).max((*nu as u64).div_ceil(sh.max_users as u64))
                }
            }).sum();
            prop_assert_eq!(expected, minimum);
            prop_assert_eq!(batches.len() as u64, minimum);
            for (b, used) in &batches {
                prop_assert!(b.rect.fits(*used));
                prop_assert!(!b.rect.is_empty());
            }
            // Order: no disassociation after the first association.
            let first_assoc = batches.iter().position(|(b, _)| b.phase == Phase::Associate).unwrap_or(batches.len());
            prop_assert!(batches[first_assoc..].iter().all(|(b, _)| b.phase == Phase::Associate));
            // Every pair exactly once.
            let pairs = pairs_of(&batches);
            let unique: HashSet<_> = pairs.iter().cloned().collect();
            prop_assert_eq!(unique.len(), pairs.len());
            prop_assert_eq!(pairs.len() as u64, s.pair_count(Phase::Associate) + s.pair_count(Phase::Disassociate));
        }

        #[test]
        fn limits_shrinking_mid_job_replan_the_rest(
            assets in 1usize..20,
            dis in (0usize..30, 0usize..30),
            assoc in (1usize..30, 0usize..30),
            first in arb_shape(),
            second in arb_shape(),
            switch_after in 0usize..6,
        ) {
            let s = spec(assets, dis, assoc);
            let mut plan = Plan::for_job(&s);
            let batches = drain(&mut plan, first, second, switch_after);
            for (b, used) in &batches {
                prop_assert!(b.rect.fits(*used), "batch {:?} over {:?}", b, used);
            }
            let pairs = pairs_of(&batches);
            let unique: HashSet<_> = pairs.iter().cloned().collect();
            prop_assert_eq!(unique.len(), pairs.len());
            prop_assert_eq!(pairs.len() as u64, s.pair_count(Phase::Associate) + s.pair_count(Phase::Disassociate));
            let first_assoc = batches.iter().position(|(b, _)| b.phase == Phase::Associate).unwrap_or(batches.len());
            prop_assert!(batches[first_assoc..].iter().all(|(b, _)| b.phase == Phase::Associate));
        }

        #[test]
        fn refused_batches_split_and_resend_everything_once(
            assets in 1usize..20,
            assoc in (1usize..40, 0usize..40),
            published in arb_shape(),
            // Apple's real limit, lower than what it publishes.
            real in arb_shape(),
        ) {
            let s = spec(assets, (0, 0), assoc);
            let mut plan = Plan::for_job(&s);
            let mut sh = published;
            let mut sent = Vec::new();
            let mut refusals = 0;
            while let Some(b) = plan.next_batch(sh) {
                let code = if b.rect.n_assets() > real.max_assets { Some(Refusal::Assets) }
                    else if b.rect.n_users() > real.max_users { Some(Refusal::ClientUserIds) }
                    else if b.rect.n_serials() > real.max_serials { Some(Refusal::SerialNumbers) }
                    else { None };
                match code {
                    Some(code) => {
                        refusals += 1;
                        prop_assert!(refusals < 200, "no progress");
                        sh = shape_after_refusal(&b.rect, sh, code);
                        plan.push_front(b);
                    }
                    None => sent.push((b, sh)),
                }
            }
            let pairs = pairs_of(&sent);
            let unique: HashSet<_> = pairs.iter().cloned().collect();
            prop_assert_eq!(unique.len(), pairs.len());
            prop_assert_eq!(pairs.len() as u64, s.pair_count(Phase::Associate));
        }
    }
}
