//! The assignments of one organization, kept compact: the demo's million
//! devices x 25 apps are 25 million pairs, and the simulator must not be
//! what limits a run.
//!
//! Every assignment made is appended to a log of `(asset, target)` entries
//! (8 bytes each) in the order it was made; a bitset says which entries are
//! still live, so removing is clearing a bit. Around the log:
//!
//! - `marks`: the first entry written at each `versionId`, so Get
//!   Assignments `sinceVersionId` starts at one binary search, and its pages
//!   (additions only, section 9 item 17) are found by counting bits.
//! - `by_target`: per target, the entries of its live pairs (a device
//!   holds a few assets: lookups scan a handful of entries).
//! - `by_asset`: per asset, its entries in log order, dead ones skipped
//!   until the next compaction.
//!
//! When dead entries outnumber live ones the log is rewritten without them
//! (amortised: each removal pays for at most one move).
//!
//! Architecture invariant: an entry is live iff its index is in
//! `by_target[target]`; `live` counts the set bits; every live pair appears
//! in exactly one live entry.

use super::state::{AssetIdx, TargetId};

/// Entries are addressed by `u32`: the log is compacted long before that
/// many pairs, and an organization holds far fewer.
type Entry = u32;

#[derive(Default)]
pub(crate) struct PairLog {
    entries: Vec<(AssetIdx, TargetId)>,
    bits: Vec<u64>,
    live: usize,
    /// `(version, first entry written at it)`, both increasing.
    marks: Vec<(u64, Entry)>,
    by_target: Vec<Vec<Entry>>,
    by_asset: Vec<Vec<Entry>>,
}

impl PairLog {
    pub fn add_asset(&mut self) {
        self.by_asset.push(Vec::new());
    }

    pub fn add_target(&mut self) {
        self.by_target.push(Vec::new());
    }

    /// Live pairs.
    pub fn len(&self) -> usize {
        self.live
    }

    fn is_live(&self, entry: Entry) -> bool {
        self.bits[(entry / 64) as usize] & (1 << (entry % 64)) != 0
    }

    fn find(&self, asset: AssetIdx, target: TargetId) -> Option<usize> {
        self.by_target[target as usize]
            .iter()
            .position(|e| self.entries[*e as usize].0 == asset)
    }

    pub fn contains(&self, asset: AssetIdx, target: TargetId) -> bool {
        self.find(asset, target).is_some()
    }

    /// Adds the pair at `version` (the organization's counter after the
    /// write); a pair already there moves to that version. Returns whether
    /// the pair is new.
    pub fn insert(&mut self, asset: AssetIdx, target: TargetId, version: u64) -> bool {
        let existed = self.remove(asset, target);
        let entry = self.entries.len() as Entry;
        self.entries.push((asset, target));
        if self.bits.len() * 64 <= entry as usize {
            self.bits.push(0);
        }
        self.bits[(entry / 64) as usize] |= 1 << (entry % 64);
        self.live += 1;
        if self.marks.last().is_none_or(|(v, _)| *v != version) {
            self.marks.push((version, entry));
        }
        self.by_target[target as usize].push(entry);
        self.by_asset[asset as usize].push(entry);
        !existed
    }

    /// `false` if the pair did not exist.
    pub fn remove(&mut self, asset: AssetIdx, target: TargetId) -> bool {
        let Some(position) = self.find(asset, target) else {
            return false;
        };
        let entry = self.by_target[target as usize].swap_remove(position);
        self.bits[(entry / 64) as usize] &= !(1 << (entry % 64));
        self.live -= 1;
        if self.entries.len() > 1024 && self.entries.len() > 2 * self.live {
            self.compact();
        }
        true
    }

    /// The assets the target holds, in asset order.
    pub fn assets_of(&self, target: TargetId) -> Vec<AssetIdx> {
        let mut held: Vec<AssetIdx> = self.by_target[target as usize]
            .iter()
            .map(|e| self.entries[*e as usize].0)
            .collect();
        held.sort_unstable();
        held
    }

    /// The targets holding the asset, in the order they got it.
    pub fn holders(&self, asset: AssetIdx) -> impl Iterator<Item = TargetId> + '_ {
        self.by_asset[asset as usize]
            .iter()
            .filter(|e| self.is_live(**e))
            .map(|e| self.entries[*e as usize].1)
    }

    /// Every live pair, asset by asset.
    pub fn all(&self) -> Vec<(AssetIdx, TargetId)> {
        let mut out = Vec::with_capacity(self.live);
        for asset in 0..self.by_asset.len() as AssetIdx {
            out.extend(self.holders(asset).map(|t| (asset, t)));
        }
        out
    }

    /// The first entry written after `version`.
    fn first_after(&self, version: u64) -> Entry {
        let i = self.marks.partition_point(|(v, _)| *v <= version);
        self.marks
            .get(i)
            .map_or(self.entries.len() as Entry, |(_, e)| *e)
    }

    /// Live pairs written after `version`, in the order they were written.
    pub fn since(&self, version: u64) -> impl Iterator<Item = (AssetIdx, TargetId)> + '_ {
        (self.first_after(version)..self.entries.len() as Entry)
            .filter(|e| self.is_live(*e))
            .map(|e| self.entries[e as usize])
    }

    /// How many live pairs were written after `version`, and a page of them:
    /// counted and skipped by bit counts, so a walk of millions of additions
    /// costs a pass over the bitset per page, not over the pairs.
    pub fn since_page(
        &self,
        version: u64,
        start: usize,
        len: usize,
    ) -> (usize, Vec<(AssetIdx, TargetId)>) {
        let from = self.first_after(version);
        let total = self.count_live_from(from);
        let mut page = Vec::new();
        if start < total {
            let mut entry = self.skip_live(from, start);
            while page.len() < len && (entry as usize) < self.entries.len() {
                if self.is_live(entry) {
                    page.push(self.entries[entry as usize]);
                }
                entry += 1;
            }
        }
        (total, page)
    }

    fn count_live_from(&self, from: Entry) -> usize {
        let word = (from / 64) as usize;
        let Some(first) = self.bits.get(word) else {
            return 0;
        };
        let head = (first >> (from % 64)).count_ones() as usize;
        head + self.bits[word + 1..]
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>()
    }

    /// The entry of the `skip`-th live pair at or after `from` (0-based).
    fn skip_live(&self, from: Entry, mut skip: usize) -> Entry {
        let mut entry = from;
        // Bit by bit to the word boundary, then whole words, then bits.
        while !entry.is_multiple_of(64) && (entry as usize) < self.entries.len() {
            if self.is_live(entry) {
                if skip == 0 {
                    return entry;
                }
                skip -= 1;
            }
            entry += 1;
        }
        let mut word = (entry / 64) as usize;
        while let Some(w) = self.bits.get(word) {
            let ones = w.count_ones() as usize;
            if ones > skip {
                break;
            }
            skip -= ones;
            word += 1;
        }
        entry = (word * 64) as Entry;
        while (entry as usize) < self.entries.len() {
            if self.is_live(entry) {
                if skip == 0 {
                    return entry;
                }
                skip -= 1;
            }
            entry += 1;
        }
        entry
    }

    /// Rewrites the log without its dead entries, keeping order and versions.
    fn compact(&mut self) {
        let mut entries = Vec::with_capacity(self.live);
        let mut marks = Vec::new();
        let mut next_mark = 0;
        let mut version_of_old = 0u64;
        for old in 0..self.entries.len() as Entry {
            while next_mark < self.marks.len() && self.marks[next_mark].1 <= old {
                version_of_old = self.marks[next_mark].0;
                next_mark += 1;
            }
            if !self.is_live(old) {
                continue;
            }
            let new = entries.len() as Entry;
            if marks
                .last()
                .is_none_or(|(v, _): &(u64, Entry)| *v != version_of_old)
            {
                marks.push((version_of_old, new));
            }
            entries.push(self.entries[old as usize]);
        }
        self.bits = vec![u64::MAX; entries.len() / 64];
        if entries.len() % 64 != 0 {
            self.bits.push((1u64 << (entries.len() % 64)) - 1);
        }
        for list in self.by_target.iter_mut().chain(self.by_asset.iter_mut()) {
            list.clear();
        }
        for (new, (asset, target)) in entries.iter().enumerate() {
            self.by_target[*target as usize].push(new as Entry);
            self.by_asset[*asset as usize].push(new as Entry);
        }
        self.entries = entries;
        self.marks = marks;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(assets: usize, targets: usize) -> PairLog {
        let mut log = PairLog::default();
        (0..assets).for_each(|_| log.add_asset());
        (0..targets).for_each(|_| log.add_target());
        log
    }

    #[test]
    fn insert_remove_and_lookups() {
        let mut l = log(2, 3);
        assert!(l.insert(0, 1, 2));
        assert!(l.insert(1, 1, 2));
        assert!(l.insert(0, 2, 3));
        assert!(!l.insert(0, 1, 4), "already there: moved, not added");
        assert_eq!(l.len(), 3);
        assert_eq!(l.assets_of(1), vec![0, 1]);
        assert_eq!(l.holders(0).collect::<Vec<_>>(), vec![2, 1]);
        assert!(l.remove(1, 1));
        assert!(!l.remove(1, 1));
        assert!(!l.contains(1, 1));
        assert_eq!(l.all(), vec![(0, 2), (0, 1)]);
        assert_eq!(l.since(2).collect::<Vec<_>>(), vec![(0, 2), (0, 1)]);
        assert_eq!(l.since(3).collect::<Vec<_>>(), vec![(0, 1)]);
        assert_eq!(l.since(4).count(), 0);
    }

    /// The bit-counting pages agree with a plain filtered walk, across
    /// word boundaries, removals and compactions.
    #[test]
    fn since_pages_match_the_plain_walk_through_compactions() {
        let mut l = log(3, 3000);
        let mut version = 1;
        for t in 0..3000u32 {
            if t % 100 == 0 {
                version += 1;
            }
            l.insert(t % 3, t, version);
        }
        for t in (0..3000u32).filter(|t| t % 7 != 0) {
            l.remove(t % 3, t);
        }
        for t in (0..3000u32).step_by(5) {
            version += 1;
            l.insert((t + 1) % 3, t, version);
        }
        for since in [0, 1, 5, 17, 30, version - 3, version] {
            let plain: Vec<_> = l.since(since).collect();
            for size in [1, 7, 64, 1000] {
                let mut walked = Vec::new();
                let mut start = 0;
                loop {
                    let (total, page) = l.since_page(since, start, size);
                    assert_eq!(total, plain.len());
                    if page.is_empty() {
                        break;
                    }
                    start += page.len();
                    walked.extend(page);
                }
                assert_eq!(walked, plain, "since {since}, pages of {size}");
            }
        }
        let all = l.all();
        assert_eq!(all.len(), l.len());
        for (a, t) in all {
            assert!(l.contains(a, t));
        }
    }
}
