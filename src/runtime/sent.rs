//! The events this vppd sent, in memory: which batch each eventId belongs
//! to, and each such batch's index (Apple's names to pair numbers).
//!
//! The listener stores a notification for a known event as pair numbers
//! (`inbox` format 2), which is a few bytes instead of Apple's strings; the
//! applier reads the index here for everything else. Nothing here needs to
//! survive a restart: a notification for an event not known here (sent
//! before a restart, by another replica, or beating its eventId) is stored
//! as Apple named it and folded as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::domain::inbox::{self, Stored, StoredBody, StoredNotification, StoredPairs};
use crate::domain::job::Phase;
use crate::domain::pairs::BatchIndex;
use crate::store::{EventId, JobId, Store, StoreError};

/// A batch: (job id, batch number).
pub type BatchKey = (JobId, u32);

/// Bounds on what is kept. Entries go when their batch is decided; a
/// batch withdrawn or a job canceled leaves them, so past these bounds
/// everything is dropped and rebuilt as needed.
const MAX_EVENTS: usize = 1 << 16;
const MAX_INDEXES: usize = 1024;

#[derive(Default)]
pub struct Sent {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Keyed by eventId, read with the `&str` of a notification as read.
    events: HashMap<EventId, BatchKey>,
    indexes: HashMap<BatchKey, Arc<BatchIndex>>,
}

impl Sent {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apple answered a batch's request with `event_id`, and that is
    /// recorded in the store.
    pub fn sent(&self, event_id: &EventId, job_id: &JobId, batch: u32) {
        let mut inner = self.lock();
        if inner.events.len() >= MAX_EVENTS {
            inner.events.clear();
        }
        inner
            .events
            .insert(event_id.clone(), (job_id.clone(), batch));
    }

    /// The batch of an event this vppd sent, if it is known here.
    pub fn batch_of(&self, event_id: &str) -> Option<BatchKey> {
        self.lock().events.get(event_id).cloned()
    }

    fn cached(&self, key: &BatchKey) -> Option<Arc<BatchIndex>> {
        self.lock().indexes.get(key).cloned()
    }

    /// A batch is decided: nothing more will be reported for it.
    pub fn decided(&self, key: &BatchKey) {
        let mut inner = self.lock();
        inner.indexes.remove(key);
        inner.events.retain(|_, k| k != key);
    }

    /// The batch's index, built from the store the first time it is asked
    /// for. `None` when the job or the batch is gone.
    pub async fn index(
        &self,
        store: &dyn Store,
        key: &BatchKey,
    ) -> Result<Option<Arc<BatchIndex>>, StoreError> {
        if let Some(index) = self.cached(key) {
            return Ok(Some(index));
        }
        let (Some(spec), Some(batch)) =
            (store.spec(&key.0).await?, store.batch(&key.0, key.1).await?)
        else {
            return Ok(None);
        };
        let index = Arc::new(BatchIndex::new(&spec, &batch));
        let mut inner = self.lock();
        if inner.indexes.len() >= MAX_INDEXES {
            inner.indexes.clear();
        }
        inner.indexes.insert(key.clone(), index.clone());
        Ok(Some(index))
    }

    /// The stored form of a notification as pair numbers, when it is an
    /// ASSET_MANAGEMENT one for an event known here of a batch that is not
    /// a revoke; `None` keeps it as Apple named it. A store that cannot be
    /// read now leaves it as it is too: the applier resolves it later.
    pub async fn as_pairs(&self, store: &dyn Store, stored: &[u8]) -> Option<Vec<u8>> {
        let Ok(Stored::Named(n)) = inbox::decode_item(stored) else {
            return None;
        };
        self.pairs_of(store, &n).await
    }

    /// [`Sent::as_pairs`] of a notification already read.
    pub async fn pairs_of(&self, store: &dyn Store, n: &StoredNotification<'_>) -> Option<Vec<u8>> {
        let StoredBody::Assets { event_id, .. } = &n.body else {
            return None;
        };
        let key = self.batch_of(event_id)?;
        let index = self.index(store, &key).await.ok()??;
        to_pairs(n, &key, &index).map(|p| inbox::encode_pairs(&p))
    }
}

/// A notification of the batch `key` (whose index is `index`) as pair
/// numbers, in Apple's order; `None` for anything but ASSET_MANAGEMENT
/// and for a revoke batch, whose notifications are decided by the assets
/// Apple names. Assignments that name no pair of the batch are left out,
/// as the applier leaves them out of a notification stored as named.
pub fn to_pairs<'a>(
    n: &StoredNotification<'a>,
    key: &'a BatchKey,
    index: &BatchIndex,
) -> Option<StoredPairs<'a>> {
    let StoredBody::Assets {
        event_id,
        error,
        assignments,
        removal,
    } = &n.body
    else {
        return None;
    };
    let phase = index.phase();
    if phase == Phase::Revoke {
        return None;
    }
    Some(StoredPairs {
        id: n.id,
        uid: n.uid,
        event_id,
        error: *error,
        removal: *removal,
        job_id: key.0.as_str(),
        batch: key.1,
        phase,
        pairs: index.pairs_named(assignments),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::inbox::{AssignmentRef, Encoder};
    use crate::domain::job::{JobSpec, Target, Targets};
    use crate::domain::lifecycle::tests::{SHAPE, spec};
    use crate::domain::lifecycle::{BatchRecord, JobChange, JobRecord};

    /// The job's first batch: assets 0-1 x serials S0-S2 (SHAPE).
    fn first_batch(spec: &JobSpec) -> BatchRecord {
        let mut job = JobRecord::new(spec, "h".into(), SHAPE, 1);
        assert!(job.apply(&JobChange::Start, 2));
        job.start_batch(SHAPE, 3).unwrap()
    }

    fn stored(
        event_id: &str,
        error: Option<(i32, &str)>,
        removal: bool,
        items: &[(String, Target<'_>)],
    ) -> Vec<u8> {
        Encoder::new("ASSET_MANAGEMENT", "n-1", "uid-7", 64).assets(
            event_id,
            removal,
            error,
            items.iter().map(|(adam_id, target)| AssignmentRef {
                adam_id,
                pricing_param: "STDQ",
                target: *target,
            }),
        )
    }

    proptest! {
        /// Stored as pair numbers, a notification decides exactly the
        /// pairs the applier finds in it stored as Apple named it, in the
        /// same order, with the same event, error and flags.
        #[test]
        fn as_pairs_names_the_pairs_the_named_form_names(
            items in prop::collection::vec((0usize..4, any::<bool>(), 0usize..6), 0..120),
            error in proptest::option::of((any::<i32>(), "[a-z ]{0,12}")),
            removal in any::<bool>(),
        ) {
            // 3 assets x 5 serials, of which the batch holds 2 x 3; the
            // items also name an asset and serials outside it, and users.
            let spec = spec(3, 5, true);
            let batch = first_batch(&spec);
            let index = BatchIndex::new(&spec, &batch);
            let names: Vec<(String, String)> = items
                .iter()
                .map(|(a, _, t)| ((1000 + a).to_string(), format!("S{t}")))
                .collect();
            let targets: Vec<(String, Target<'_>)> = items
                .iter()
                .zip(&names)
                .map(|((_, user, _), (adam, t))| {
                    (adam.clone(), if *user { Target::User(t) } else { Target::Serial(t) })
                })
                .collect();
            let bytes = stored("ev-1", error.as_ref().map(|(n, m)| (*n, m.as_str())), removal, &targets);
            let Ok(Stored::Named(named)) = inbox::decode_item(&bytes) else {
                return Err(TestCaseError::fail("the named form is not read back"));
            };
            let StoredBody::Assets { assignments, .. } = &named.body else {
                return Err(TestCaseError::fail("not an ASSET_MANAGEMENT body"));
            };
            let want: Vec<u32> = assignments.iter().filter_map(|a| index.pair_named(*a)).collect();
            let key = (JobId::from("j"), batch.no());
            let pairs = to_pairs(&named, &key, &index).unwrap();
            let encoded = inbox::encode_pairs(&pairs);
            prop_assert!(inbox::is_binary(&encoded));
            let Ok(Stored::Pairs(read)) = inbox::decode_item(&encoded) else {
                return Err(TestCaseError::fail("the pair form is not read back"));
            };
            prop_assert_eq!(&read.pairs, &want);
            prop_assert_eq!(read.event_id, "ev-1");
            prop_assert_eq!(read.id, "n-1");
            prop_assert_eq!(read.uid, "uid-7");
            prop_assert_eq!(read.error, error.as_ref().map(|(n, m)| (*n, m.as_str())));
            prop_assert_eq!(read.removal, removal);
            prop_assert_eq!(read.job_id, "j");
            prop_assert_eq!(read.batch, batch.no());
            prop_assert_eq!(read.phase, Phase::Associate);
        }
    }

    #[test]
    fn a_hundred_devices_of_one_asset_take_a_few_bytes_not_a_kilobyte() {
        let mut spec = spec(1, 100, true);
        spec.associate.serial_numbers = (0..100).map(|i| format!("C02Y402H{i:04}")).collect();
        let shape = crate::domain::plan::Shape {
            max_serials: 100,
            ..SHAPE
        };
        let mut job = JobRecord::new(&spec, "h".into(), shape, 1);
        assert!(job.apply(&JobChange::Start, 2));
        let batch = job.start_batch(shape, 3).unwrap();
        let index = BatchIndex::new(&spec, &batch);
        let targets: Vec<(String, Target<'_>)> = spec
            .associate
            .serial_numbers
            .iter()
            .map(|s| ("1000".to_string(), Target::Serial(s)))
            .collect();
        let named = stored(
            "87cbc650-16cc-4f9e-a833-e622f377a9f7",
            None,
            false,
            &targets,
        );
        let Ok(Stored::Named(n)) = inbox::decode_item(&named) else {
            panic!("not read back")
        };
        let key = (JobId::from("j"), batch.no());
        let pairs = inbox::encode_pairs(&to_pairs(&n, &key, &index).unwrap());
        assert!(named.len() > 1300, "{}", named.len());
        // The header (ids, eventId, job, batch, phase) and one run.
        assert_eq!(pairs.len(), 1 + 4 + 6 + 1 + 37 + 2 + 1 + 1 + 1 + 1 + 1);
    }

    #[test]
    fn a_revoke_batch_keeps_apples_names() {
        let mut spec = spec(1, 0, false);
        spec.revoke = Targets {
            serial_numbers: vec!["S0".into(), "S1".into()],
            client_user_ids: Vec::new(),
        };
        let batch = first_batch(&spec);
        assert_eq!(batch.phase(), Phase::Revoke);
        let index = BatchIndex::new(&spec, &batch);
        let bytes = stored("e", None, true, &[("1000".into(), Target::Serial("S0"))]);
        let Ok(Stored::Named(n)) = inbox::decode_item(&bytes) else {
            panic!("not read back")
        };
        assert!(to_pairs(&n, &("j".into(), batch.no()), &index).is_none());
    }

    #[test]
    fn a_decided_batch_is_forgotten_and_others_are_kept() {
        let sent = Sent::default();
        let j = JobId::from("j");
        sent.sent(&"e1".into(), &j, 0);
        sent.sent(&"e2".into(), &j, 0);
        sent.sent(&"e3".into(), &j, 1);
        assert_eq!(sent.batch_of("e2"), Some(("j".into(), 0)));
        sent.decided(&("j".into(), 0));
        assert_eq!(sent.batch_of("e1"), None);
        assert_eq!(sent.batch_of("e2"), None);
        assert_eq!(sent.batch_of("e3"), Some(("j".into(), 1)));
        assert_eq!(sent.batch_of("unknown"), None);
    }
}
