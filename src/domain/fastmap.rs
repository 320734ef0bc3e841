//! The hash maps and sets of the hot paths, below every module that keys
//! by pair, asset or target (pairs, lifecycle, schedule and the stages).

use std::collections::{HashMap, HashSet};

/// The maps looked up once per pair of every notification: foldhash, seeded
/// per process as std's hasher is, but several times faster on short keys.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// A [`FastMap`]'s set.
pub type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;
