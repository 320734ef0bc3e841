//! Which of a token's jobs sends the next batch.
//!
//! Apple works a token's requests strictly in arrival order, so whatever
//! vppd has already sent sits ahead of new work. The submitter therefore
//! keeps at most `[apple] max_events_in_flight` of a token's events
//! unfinished at Apple, and each time a slot frees it asks [`next_job`]
//! whose batch goes next: a high-priority job's first, then the others
//! round robin by job in creation order. A job that shares an (asset,
//! target) pair with an earlier job still unfinished at Apple waits
//! ([`Footprint::shares_pair`]), so Apple sees each pair's changes in
//! creation order. A job's own batches keep their plan order because a job
//! only ever offers its next one.
//!
//! Architecture invariant: this module does no I/O. The submitter reads
//! the jobs and open batches from the store (so after a restart the
//! accounting is rebuilt from what the store says is still at Apple),
//! describes them as [`Candidate`]s, and sends what [`next_job`] picks.

use std::hash::Hash;
use std::sync::Arc;

use crate::domain::fastmap::FastSet;
use crate::domain::job::{JobSpec, Priority, Targets};

/// The (asset, target) pairs a job touches: the pairs of its
/// disassociations and associations are its assets x its targets; a revoke
/// touches every asset of its targets. It holds the spec the store shares
/// and no copy of it: a million-device job's targets are read when another
/// job is compared with it, and only the smaller side of a comparison is
/// hashed, for that comparison only.
#[derive(Debug, Clone, Default)]
pub struct Footprint {
    spec: Option<Arc<JobSpec>>,
}

fn keys(t: &Targets) -> impl Iterator<Item = (bool, &str)> {
    t.serial_numbers
        .iter()
        .map(|s| (true, s.as_str()))
        .chain(t.client_user_ids.iter().map(|u| (false, u.as_str())))
}

/// Whether the target lists `a` and `b` name a target in common.
fn targets_meet(a: &[&Targets], b: &[&Targets]) -> bool {
    meet(
        a.iter().map(|t| t.len()).sum(),
        a.iter().flat_map(|t| keys(t)),
        b.iter().map(|t| t.len()).sum(),
        b.iter().flat_map(|t| keys(t)),
    )
}

/// Whether two sequences of `na` and `nb` items share one: the shorter is
/// hashed and the longer probed.
fn meet<T: Eq + Hash>(
    na: usize,
    a: impl Iterator<Item = T>,
    nb: usize,
    b: impl Iterator<Item = T>,
) -> bool {
    if na == 0 || nb == 0 {
        return false;
    }
    if na <= nb {
        let small: FastSet<T> = a.collect();
        b.into_iter().any(|x| small.contains(&x))
    } else {
        let small: FastSet<T> = b.collect();
        a.into_iter().any(|x| small.contains(&x))
    }
}

impl Footprint {
    pub fn of(spec: Arc<JobSpec>) -> Footprint {
        Footprint { spec: Some(spec) }
    }

    /// Whether some (asset, target) pair is touched by both jobs.
    pub fn shares_pair(&self, other: &Footprint) -> bool {
        let (Some(a), Some(b)) = (&self.spec, &other.spec) else {
            return false;
        };
        let a_changed = [&a.disassociate, &a.associate];
        let b_changed = [&b.disassociate, &b.associate];
        let assets_meet = meet(
            a.assets.len(),
            a.assets.iter(),
            b.assets.len(),
            b.assets.iter(),
        );
        (assets_meet && targets_meet(&a_changed, &b_changed))
            || targets_meet(&[&a.revoke], &b_changed)
            || targets_meet(&[&a.revoke], &[&b.revoke])
            || targets_meet(&[&b.revoke], &a_changed)
    }
}

/// One running job of the token as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Creation order.
    pub seq: u64,
    pub priority: Priority,
    /// It has a batch ready to send now.
    pub ready: bool,
    /// An earlier job it shares a pair with is still unfinished at Apple.
    pub blocked: bool,
}

/// Where the round robin of each priority stopped: the creation order of
/// the job served last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundRobin {
    high: Option<u64>,
    normal: Option<u64>,
}

impl RoundRobin {
    /// Records that `job` just sent a batch.
    pub fn served(&mut self, job: &Candidate) {
        match job.priority {
            Priority::High => self.high = Some(job.seq),
            Priority::Normal => self.normal = Some(job.seq),
        }
    }
}

/// The creation order of the job whose batch goes next, or `None` when
/// `in_flight` events already fill `max_in_flight` or no job may send.
/// High-priority jobs go first; within a priority, the first ready job
/// after the one served last, in creation order, wrapping around.
pub fn next_job(
    jobs: &[Candidate],
    in_flight: usize,
    max_in_flight: usize,
    rr: &RoundRobin,
) -> Option<u64> {
    if in_flight >= max_in_flight {
        return None;
    }
    for (priority, last) in [(Priority::High, rr.high), (Priority::Normal, rr.normal)] {
        let mut ready: Vec<u64> = jobs
            .iter()
            .filter(|j| j.priority == priority && j.ready && !j.blocked)
            .map(|j| j.seq)
            .collect();
        if ready.is_empty() {
            continue;
        }
        ready.sort_unstable();
        let after = last.and_then(|l| ready.iter().copied().find(|s| *s > l));
        return after.or_else(|| ready.first().copied());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::JobAsset;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn job(seq: u64, high: bool) -> Candidate {
        Candidate {
            seq,
            priority: if high {
                Priority::High
            } else {
                Priority::Normal
            },
            ready: true,
            blocked: false,
        }
    }

    fn spec(assets: &[&str], dis: &[&str], assoc: &[&str], revoke: &[&str]) -> JobSpec {
        let t = |v: &[&str]| Targets {
            serial_numbers: v.iter().map(|s| s.to_string()).collect(),
            client_user_ids: Vec::new(),
        };
        JobSpec {
            id: "j".into(),
            token: "t".into(),
            assets: assets
                .iter()
                .map(|a| JobAsset {
                    adam_id: a.to_string(),
                    pricing_param: "STDQ".into(),
                })
                .collect(),
            disassociate: t(dis),
            associate: t(assoc),
            install: true,
            allow_partial: false,
            revoke: t(revoke),
            uninstall: false,
            wait_for_licenses: false,
            users: Vec::new(),
            retire_users: Vec::new(),
            priority: Priority::Normal,
        }
    }

    #[test]
    fn nothing_is_chosen_while_the_slots_are_full() {
        let jobs = [job(1, true), job(2, false)];
        assert_eq!(next_job(&jobs, 2, 2, &RoundRobin::default()), None);
        assert_eq!(next_job(&jobs, 1, 2, &RoundRobin::default()), Some(1));
    }

    #[test]
    fn a_high_priority_job_goes_ahead_of_older_normal_ones() {
        let jobs = [job(1, false), job(2, false), job(3, true)];
        let mut rr = RoundRobin::default();
        rr.served(&jobs[0]);
        assert_eq!(next_job(&jobs, 0, 2, &rr), Some(3));
    }

    #[test]
    fn normal_jobs_take_turns_in_creation_order() {
        let jobs = [job(1, false), job(5, false), job(9, false)];
        let mut rr = RoundRobin::default();
        let mut order = Vec::new();
        for _ in 0..6 {
            let seq = next_job(&jobs, 0, 2, &rr).unwrap();
            order.push(seq);
            rr.served(jobs.iter().find(|j| j.seq == seq).unwrap());
        }
        assert_eq!(order, [1, 5, 9, 1, 5, 9]);
    }

    #[test]
    fn a_blocked_or_idle_job_is_skipped() {
        let mut jobs = [job(1, false), job(2, true), job(3, false)];
        jobs[1].blocked = true;
        jobs[0].ready = false;
        assert_eq!(next_job(&jobs, 0, 2, &RoundRobin::default()), Some(3));
    }

    fn fp(assets: &[&str], dis: &[&str], assoc: &[&str], revoke: &[&str]) -> Footprint {
        Footprint::of(Arc::new(spec(assets, dis, assoc, revoke)))
    }

    #[test]
    fn footprints_meet_on_a_shared_pair_only() {
        let bulk = fp(&["1", "2"], &[], &["A", "B", "C"], &[]);
        assert!(bulk.shares_pair(&fp(&["2"], &["C"], &[], &[])));
        // Same target, other asset: no pair in common.
        assert!(!bulk.shares_pair(&fp(&["3"], &[], &["C"], &[])));
        // Same asset, other target.
        assert!(!bulk.shares_pair(&fp(&["1"], &[], &["Z"], &[])));
        // A revoke touches every asset of its targets, both ways round.
        let revoke = fp(&[], &[], &[], &["B"]);
        assert!(bulk.shares_pair(&revoke));
        assert!(revoke.shares_pair(&bulk));
        assert!(!revoke.shares_pair(&fp(&["1"], &[], &["Z"], &[])));
        // A job whose spec is gone touches nothing.
        assert!(!bulk.shares_pair(&Footprint::default()));
    }

    #[test]
    fn a_serial_and_a_user_of_the_same_name_are_different_targets() {
        let mut users = spec(&["1"], &[], &[], &[]);
        users.associate.client_user_ids.push("A".into());
        let users = Footprint::of(Arc::new(users));
        assert!(!users.shares_pair(&fp(&["1"], &[], &["A"], &[])));
        assert!(!fp(&[], &[], &[], &["A"]).shares_pair(&users));
        let mut same = spec(&["1"], &["X"], &[], &[]);
        same.disassociate.client_user_ids.push("A".into());
        assert!(users.shares_pair(&Footprint::of(Arc::new(same))));
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec((any::<bool>(), any::<bool>(), any::<bool>()), 0..12).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (high, ready, blocked))| Candidate {
                    seq: i as u64 * 3 + 1,
                    priority: if high {
                        Priority::High
                    } else {
                        Priority::Normal
                    },
                    ready,
                    blocked,
                })
                .collect()
        })
    }

    proptest! {
        /// The choice is always a ready, unblocked job; a normal job only
        /// when no high-priority job could go; nothing beyond the limit.
        #[test]
        fn choice_respects_limit_priority_and_blocking(
            jobs in candidates(),
            in_flight in 0usize..4,
            max in 1usize..4,
            last in proptest::option::of(0u64..40),
        ) {
            let mut rr = RoundRobin::default();
            if let Some(l) = last {
                rr.served(&Candidate { seq: l, priority: Priority::Normal, ready: true, blocked: false });
                rr.served(&Candidate { seq: l, priority: Priority::High, ready: true, blocked: false });
            }
            let eligible: Vec<&Candidate> = jobs.iter().filter(|j| j.ready && !j.blocked).collect();
            match next_job(&jobs, in_flight, max, &rr) {
                None => prop_assert!(in_flight >= max || eligible.is_empty()),
                Some(seq) => {
                    prop_assert!(in_flight < max);
                    let chosen = jobs.iter().find(|j| j.seq == seq).unwrap();
                    prop_assert!(chosen.ready && !chosen.blocked);
                    if chosen.priority == Priority::Normal {
                        prop_assert!(eligible.iter().all(|j| j.priority == Priority::Normal));
                    }
                }
            }
        }

        /// Served in turn, every eligible job of a priority gets a batch
        /// within as many turns as there are such jobs: nobody starves.
        #[test]
        fn round_robin_serves_every_job_in_turn(jobs in candidates()) {
            let eligible: HashSet<u64> = jobs
                .iter()
                .filter(|j| j.ready && !j.blocked && j.priority == Priority::Normal)
                .map(|j| j.seq)
                .collect();
            let normal_only: Vec<Candidate> = jobs
                .iter()
                .filter(|j| j.priority == Priority::Normal)
                .copied()
                .collect();
            let mut rr = RoundRobin::default();
            let mut seen = HashSet::new();
            for _ in 0..eligible.len() {
                let seq = next_job(&normal_only, 0, 1, &rr).unwrap();
                seen.insert(seq);
                rr.served(normal_only.iter().find(|j| j.seq == seq).unwrap());
            }
            prop_assert_eq!(seen, eligible);
        }
    }
}
