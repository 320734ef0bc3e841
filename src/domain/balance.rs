//! Which leases a replica asks for, gives up and stops each round.
//!
//! The lease keeper ([`crate::runtime::lease`]) reads the registry and the store,
//! describes what it saw as a [`View`], and applies the [`Round`] that
//! [`plan`] returns: it stops and releases what the round gives up, then
//! asks the store for the round's `wanted` leases. What the store granted
//! goes through [`settle`] (which work starts, which is renewed, which was
//! lost), and [`lapsed`] says which work must stop because its lease could
//! not be renewed in time.
//!
//! The shares: balanced work (one lease per token) is shared out evenly,
//! each replica holding at most `ceil(balanced / replicas)`; singleton work
//! (the applier, the outbox, retention) is asked for by every replica and
//! granted to one. A replica over its share (another one joined) gives up
//! the surplus, the names that sort last first, so every replica agrees on
//! which leases move. Free leases are taken in name order up to the share;
//! a lease another live replica holds is never asked for, or the room
//! would go to the same held names each round while the rest of the
//! tokens were taken by nobody.
//!
//! Architecture invariant: this module does no I/O and reads no clock;
//! times come in as arguments.

use std::collections::{BTreeMap, BTreeSet, HashSet};

/// What one replica knows at the start of a round.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// This replica's own lease (`replica/ID`), renewed every round.
    pub me: String,
    /// Every piece of work there is now, by lease name: `true` when it is
    /// balanced (a token's), `false` for a singleton.
    pub work: BTreeMap<String, bool>,
    /// The leases whose work runs here.
    pub running: BTreeSet<String>,
    /// Running leases whose token was removed and added again: another
    /// token under the same name, whose work starts afresh.
    pub replaced: BTreeSet<String>,
    /// Live replicas, this one included.
    pub replicas: usize,
    /// Leases another live replica holds.
    pub held_elsewhere: HashSet<String>,
}

/// What the keeper does this round, in this order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Running work whose token was removed or replaced: it stops here.
    pub stale: Vec<String>,
    /// Of `stale`, the leases of removed tokens: given up in the store (a
    /// replaced token's lease is kept and its work started again).
    pub removed: Vec<String>,
    /// Running balanced work over this replica's share: it stops and its
    /// leases are given up for another replica to take.
    pub surplus: Vec<String>,
    /// The leases to ask the store for: this replica's own, everything
    /// still running (renewed) and free work up to the share (taken).
    pub wanted: Vec<String>,
}

/// The most balanced leases one replica holds: `balanced` shared out among
/// `replicas` (at least one), rounded up.
pub fn share(balanced: usize, replicas: usize) -> usize {
    balanced.div_ceil(replicas.max(1))
}

/// This round's decision for the replica that sees `view`.
pub fn plan(view: &View) -> Round {
    let is_balanced = |name: &str| view.work.get(name).copied().unwrap_or(false);
    let (stale, kept): (BTreeSet<&String>, BTreeSet<&String>) = view
        .running
        .iter()
        .partition(|n| !view.work.contains_key(*n) || view.replaced.contains(*n));
    let removed = stale
        .iter()
        .filter(|n| !view.work.contains_key(**n))
        .map(|n| (*n).clone())
        .collect();
    let share = share(view.work.values().filter(|b| **b).count(), view.replicas);
    let held: Vec<&String> = kept.iter().copied().filter(|n| is_balanced(n)).collect();
    let over = held.len().saturating_sub(share);
    let surplus: BTreeSet<&String> = held.iter().rev().take(over).copied().collect();
    let mut wanted = vec![view.me.clone()];
    wanted.extend(
        kept.iter()
            .filter(|n| !surplus.contains(*n))
            .map(|n| (*n).clone()),
    );
    let mut room = share.saturating_sub(held.len() - over);
    let free = view.work.iter().filter(|(name, _)| {
        !kept.contains(name) && !surplus.contains(name) && !view.held_elsewhere.contains(*name)
    });
    for (name, balanced) in free {
        if !balanced {
            wanted.push(name.clone());
        } else if room > 0 {
            room -= 1;
            wanted.push(name.clone());
        }
    }
    Round {
        stale: stale.into_iter().cloned().collect(),
        removed,
        // Newest first: the names that sort last move.
        surplus: surplus.into_iter().rev().cloned().collect(),
        wanted,
    }
}

/// What the store's answer to a round means for the work here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Running work whose lease was not granted: another replica holds it.
    pub lost: Vec<String>,
    /// Running work whose lease was renewed.
    pub renewed: Vec<String>,
    /// Work whose lease was granted and that does not run here yet.
    pub started: Vec<String>,
}

/// Sorts the leases the store `granted` against the work `running` here
/// (after the round's stops) and the `work` there is.
pub fn settle(
    running: &BTreeSet<String>,
    granted: &BTreeSet<String>,
    work: &BTreeMap<String, bool>,
) -> Settled {
    Settled {
        lost: running.difference(granted).cloned().collect(),
        renewed: running.intersection(granted).cloned().collect(),
        started: granted
            .iter()
            .filter(|n| !running.contains(*n) && work.contains_key(*n))
            .cloned()
            .collect(),
    }
}

/// The work whose lease may lapse by `now` (its deadline has passed): it
/// stops before another replica can take the lease over.
pub fn lapsed<'a, T: Ord + 'a>(
    deadlines: impl IntoIterator<Item = (&'a String, &'a T)>,
    now: &T,
) -> Vec<String> {
    deadlines
        .into_iter()
        .filter(|(_, until)| *until <= now)
        .map(|(n, _)| n.clone())
        .collect()
}

/// When the next round starts: at `next`, or sooner when a deadline
/// comes first.
pub fn wake<T: Ord + Copy>(next: T, deadlines: impl IntoIterator<Item = T>) -> T {
    deadlines.into_iter().min().map_or(next, |d| d.min(next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(work: &[(&str, bool)], running: &[&str], replicas: usize, elsewhere: &[&str]) -> View {
        View {
            me: "replica/me".into(),
            work: work.iter().map(|(n, b)| (n.to_string(), *b)).collect(),
            running: running.iter().map(|n| n.to_string()).collect(),
            replaced: BTreeSet::new(),
            replicas,
            held_elsewhere: elsewhere.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn a_lone_replica_takes_everything() {
        let v = view(
            &[("applier", false), ("token/a", true), ("token/b", true)],
            &[],
            1,
            &[],
        );
        let round = plan(&v);
        assert_eq!(
            round.wanted,
            ["replica/me", "applier", "token/a", "token/b"]
        );
        assert!(round.surplus.is_empty() && round.stale.is_empty());
    }

    #[test]
    fn a_joined_replica_makes_the_names_that_sort_last_move() {
        let v = view(
            &[("token/a", true), ("token/b", true), ("token/c", true)],
            &["token/a", "token/b", "token/c"],
            2,
            &[],
        );
        let round = plan(&v);
        assert_eq!(round.surplus, ["token/c"]);
        assert_eq!(round.wanted, ["replica/me", "token/a", "token/b"]);
    }

    #[test]
    fn a_removed_token_is_released_and_a_replaced_one_started_again() {
        let mut v = view(
            &[("token/a", true), ("token/b", true)],
            &["token/a", "token/b", "token/gone"],
            1,
            &[],
        );
        v.replaced.insert("token/b".into());
        let round = plan(&v);
        assert_eq!(round.stale, ["token/b", "token/gone"]);
        assert_eq!(round.removed, ["token/gone"]);
        assert_eq!(round.wanted, ["replica/me", "token/a", "token/b"]);
    }

    #[test]
    fn settling_sorts_the_grant() {
        let running: BTreeSet<String> = ["a", "b"].map(String::from).into();
        let granted: BTreeSet<String> = ["b", "c", "replica/me"].map(String::from).into();
        let work: BTreeMap<String, bool> = [("a", true), ("b", true), ("c", true)]
            .map(|(n, b)| (n.to_string(), b))
            .into();
        let s = settle(&running, &granted, &work);
        assert_eq!(s.lost, ["a"]);
        assert_eq!(s.renewed, ["b"]);
        assert_eq!(s.started, ["c"]);
    }

    fn names(prefix: &'static str, n: usize) -> impl Iterator<Item = String> {
        (0..n).map(move |i| format!("{prefix}{i:02}"))
    }

    /// A random view: up to 12 tokens and 3 singletons, some running here,
    /// some held elsewhere (never both), some of the running ones replaced
    /// and some removed from the registry.
    fn arb_view() -> impl Strategy<Value = View> {
        (
            0usize..12,
            0usize..4,
            1usize..5,
            proptest::collection::vec(0u8..4, 16),
            proptest::collection::vec(0u8..4, 16),
        )
            .prop_map(|(tokens, singles, replicas, fate, extra)| {
                let mut v = View {
                    me: "replica/me".into(),
                    replicas,
                    ..View::default()
                };
                let work = names("token/", tokens)
                    .map(|n| (n, true))
                    .chain(names("single/", singles).map(|n| (n, false)));
                for (i, (name, balanced)) in work.enumerate() {
                    match fate[i] {
                        1 => {
                            v.running.insert(name.clone());
                        }
                        2 => {
                            v.held_elsewhere.insert(name.clone());
                        }
                        3 => {
                            v.running.insert(name.clone());
                            v.replaced.insert(name.clone());
                        }
                        _ => {}
                    }
                    v.work.insert(name, balanced);
                }
                for (i, e) in extra.iter().enumerate().take(3) {
                    if *e == 1 {
                        v.running.insert(format!("token/removed{i}"));
                    }
                }
                v
            })
    }

    fn balanced_count(v: &View, names: &[String]) -> usize {
        names
            .iter()
            .filter(|n| v.work.get(*n).copied().unwrap_or(false))
            .count()
    }

    /// One round of `holders` replicas against a store that grants a lease
    /// to whoever asks when nobody else holds it, as both backends do.
    fn simulate(
        store: &mut BTreeMap<String, usize>,
        running: &mut [BTreeSet<String>],
        work: &BTreeMap<String, bool>,
    ) {
        let replicas = running.len();
        for (me, here) in running.iter_mut().enumerate() {
            let v = View {
                me: format!("replica/{me}"),
                work: work.clone(),
                running: here.clone(),
                replaced: BTreeSet::new(),
                replicas,
                held_elsewhere: store
                    .iter()
                    .filter(|(_, h)| **h != me)
                    .map(|(n, _)| n.clone())
                    .collect(),
            };
            let round = plan(&v);
            for name in round.stale.iter().chain(&round.surplus) {
                here.remove(name);
            }
            for name in round.removed.iter().chain(&round.surplus) {
                store.remove(name);
            }
            let mut granted = BTreeSet::new();
            for name in round.wanted {
                let holder = store.entry(name.clone()).or_insert(me);
                if *holder == me {
                    granted.insert(name);
                }
            }
            let s = settle(here, &granted, work);
            for name in s.lost {
                here.remove(&name);
            }
            here.extend(s.started);
        }
    }

    proptest! {
        /// Never more balanced leases than the share: what is kept and
        /// what is taken together.
        #[test]
        fn a_replica_never_asks_for_more_than_its_share(v in arb_view()) {
            let round = plan(&v);
            let share = share(v.work.values().filter(|b| **b).count(), v.replicas);
            prop_assert!(balanced_count(&v, &round.wanted) <= share);
        }

        /// A lease another live replica holds is never taken; one held
        /// here is never asked for twice.
        #[test]
        fn a_lease_held_elsewhere_is_never_taken(v in arb_view()) {
            let round = plan(&v);
            for name in &round.wanted {
                prop_assert!(
                    v.running.contains(name) || !v.held_elsewhere.contains(name),
                    "{name} is held elsewhere"
                );
            }
            let unique: BTreeSet<&String> = round.wanted.iter().collect();
            prop_assert_eq!(unique.len(), round.wanted.len());
        }

        /// Everything running and still wanted is renewed; what stops is
        /// exactly the removed, the replaced and the surplus; the surplus
        /// is exactly what is over the share.
        #[test]
        fn held_work_is_renewed_or_given_up_for_a_reason(v in arb_view()) {
            let round = plan(&v);
            prop_assert_eq!(&round.wanted[0], &v.me);
            let share = share(v.work.values().filter(|b| **b).count(), v.replicas);
            let mut current = 0usize;
            for name in &v.running {
                let gone = !v.work.contains_key(name);
                let stale = gone || v.replaced.contains(name);
                prop_assert_eq!(round.stale.contains(name), stale, "{}", name);
                prop_assert_eq!(round.removed.contains(name), gone, "{}", name);
                if !stale && v.work[name] {
                    current += 1;
                }
                if !stale && !round.surplus.contains(name) {
                    prop_assert!(round.wanted.contains(name), "{} not renewed", name);
                }
            }
            prop_assert_eq!(round.surplus.len(), current.saturating_sub(share));
            for name in &round.surplus {
                prop_assert!(v.work[name] && !round.wanted.contains(name));
            }
        }

        /// Free work is taken: every singleton, and balanced work in name
        /// order until the share is full.
        #[test]
        fn free_work_is_taken_up_to_the_share(v in arb_view()) {
            let round = plan(&v);
            let share = share(v.work.values().filter(|b| **b).count(), v.replicas);
            let full = balanced_count(&v, &round.wanted) == share;
            let mut skipped = false;
            for (name, balanced) in &v.work {
                let free = !v.held_elsewhere.contains(name) && !v.running.contains(name);
                if !free {
                    continue;
                }
                let taken = round.wanted.contains(name);
                if !balanced {
                    prop_assert!(taken, "singleton {} not taken", name);
                } else if !taken {
                    prop_assert!(full, "{} left while there was room", name);
                    skipped = true;
                } else {
                    prop_assert!(!skipped, "{} taken out of name order", name);
                }
            }
        }

        /// Replicas that stay up, starting from any split of the leases,
        /// end with every piece of work held by exactly one of them and
        /// none over its share.
        #[test]
        fn stable_replicas_hold_everything_once(
            tokens in 0usize..20,
            singles in 0usize..4,
            replicas in 1usize..6,
            start in proptest::collection::vec(0usize..7, 24),
        ) {
            let work: BTreeMap<String, bool> = names("token/", tokens)
                .map(|n| (n, true))
                .chain(names("single/", singles).map(|n| (n, false)))
                .collect();
            let mut store = BTreeMap::new();
            let mut running = vec![BTreeSet::new(); replicas];
            for (i, name) in work.keys().enumerate() {
                if start[i] < replicas {
                    store.insert(name.clone(), start[i]);
                    running[start[i]].insert(name.clone());
                }
            }
            for _ in 0..3 {
                simulate(&mut store, &mut running, &work);
            }
            let share = share(tokens, replicas);
            for name in work.keys() {
                let holders = running.iter().filter(|r| r.contains(name)).count();
                prop_assert_eq!(holders, 1, "{} held by {} replicas", name, holders);
            }
            for held in &running {
                let balanced = held.iter().filter(|n| work[*n]).count();
                prop_assert!(balanced <= share);
            }
        }

        /// Settling splits the running work into lost and renewed, and
        /// starts only granted work that exists and is not running yet.
        #[test]
        fn settling_accounts_for_everything(
            running in proptest::collection::btree_set("[a-f]", 0..6),
            granted in proptest::collection::btree_set("[a-f]", 0..6),
            work in proptest::collection::btree_map("[a-f]", any::<bool>(), 0..6),
        ) {
            let s = settle(&running, &granted, &work);
            let mut back: BTreeSet<String> = s.lost.iter().cloned().collect();
            back.extend(s.renewed.iter().cloned());
            prop_assert_eq!(&back, &running);
            for name in &s.renewed {
                prop_assert!(granted.contains(name));
            }
            for name in &s.lost {
                prop_assert!(!granted.contains(name));
            }
            for name in &s.started {
                prop_assert!(granted.contains(name) && work.contains_key(name) && !running.contains(name));
            }
            let missed = granted
                .iter()
                .filter(|n| !running.contains(*n) && work.contains_key(*n))
                .count();
            prop_assert_eq!(s.started.len(), missed);
        }

        /// Work stops exactly when its deadline has passed, and the next
        /// round comes no later than the first deadline.
        #[test]
        fn work_stops_at_its_deadline(
            deadlines in proptest::collection::btree_map("[a-f]", 0u64..100, 0..6),
            now in 0u64..100,
            next in 0u64..100,
        ) {
            let stopped = lapsed(&deadlines, &now);
            for (name, until) in &deadlines {
                prop_assert_eq!(stopped.contains(name), *until <= now);
            }
            let w = wake(next, deadlines.values().copied());
            prop_assert!(w <= next);
            prop_assert!(deadlines.values().all(|d| w <= *d));
            prop_assert!(w == next || deadlines.values().any(|d| *d == w));
        }
    }
}
