//! The sled backend's transactions. A transaction holds the store's one
//! writer lock from its first read to its commit, reads the trees through
//! its own pending writes, and buffers those; its commit applies them in
//! one sled transaction that only writes, so it never conflicts and holds
//! sled's own lock (which every plain write, the listener's included,
//! waits for) only as long as the writing takes.

use std::collections::BTreeMap;

use ::sled::IVec;
use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use serde::{Serialize, de::DeserializeOwned};

use super::keys::{
    PRUNED_KEY, Parked, batch_key, decode_parked, drift_key, encode_parked, failure_key, held_key,
    job_prefix, license_key, parked_at_key, pruned_count, user_key,
};
use super::{Sled, decode};
use crate::domain::job::JobSpec;
use crate::domain::lifecycle::{
    BatchRecord, DriftRecord, EventRef, FailureRecord, JobRecord, OutboxEntry,
};
use crate::store::ops::{LicenseKey, Tx};
use crate::store::{InboxId, LicenseRecord, OutboxId, StoreError, TokenRecord, UserRecord, encode};

type R<T> = Result<T, StoreError>;

/// The trees a transaction may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum T {
    Jobs,
    Specs,
    Batches,
    Open,
    Events,
    Inbox,
    Outbox,
    Failures,
    Ids,
    Licenses,
    Users,
    Held,
    Parked,
    ParkedAt,
    Meta,
    Tokens,
    TokenStates,
}

/// A transaction of the sled backend (see the module).
pub struct SledTx<'a> {
    pub(super) db: &'a Sled,
    /// `None` in a reader, which only reads.
    pub(super) _writer: Option<tokio::sync::MutexGuard<'a, ()>>,
    /// Pending writes, the last of each key: `None` removes it.
    pub(super) writes: BTreeMap<(T, Vec<u8>), Option<IVec>>,
}

impl SledTx<'_> {
    pub(super) fn raw(&self, tree: T, key: &[u8]) -> R<Option<IVec>> {
        match self.writes.get(&(tree, key.to_vec())) {
            Some(pending) => Ok(pending.clone()),
            None => Ok(self.db.tree(tree).get(key)?),
        }
    }

    pub(super) fn set(&mut self, tree: T, key: &[u8], value: impl Into<IVec>) {
        self.writes.insert((tree, key.to_vec()), Some(value.into()));
    }

    pub(super) fn remove(&mut self, tree: T, key: &[u8]) {
        self.writes.insert((tree, key.to_vec()), None);
    }

    fn get<V: DeserializeOwned>(&self, tree: T, key: &[u8]) -> R<Option<V>> {
        match self.raw(tree, key)? {
            Some(bytes) => Ok(Some(decode(key, &bytes)?)),
            None => Ok(None),
        }
    }

    fn put<V: Serialize>(&mut self, tree: T, key: &[u8], value: &V) -> R<()> {
        self.set(tree, key, encode(value)?);
        Ok(())
    }

    /// The keys under `prefix` as this transaction sees them.
    fn keys_under(&self, tree: T, prefix: &[u8]) -> R<Vec<Vec<u8>>> {
        let mut keys = std::collections::BTreeSet::new();
        for key in self.db.tree(tree).scan_prefix(prefix).keys() {
            keys.insert(key?.to_vec());
        }
        for ((t, key), value) in &self.writes {
            if *t == tree && key.starts_with(prefix) {
                match value {
                    Some(_) => keys.insert(key.clone()),
                    None => keys.remove(key),
                };
            }
        }
        Ok(keys.into_iter().collect())
    }

    fn new_id(&self) -> R<u64> {
        // sled hands these out without a shared key: unique and increasing
        // across restarts.
        Ok(self.db.db.generate_id()?)
    }

    /// Applies the pending writes at once, in one sled transaction.
    pub(super) fn apply(self) -> R<()> {
        let SledTx {
            db,
            writes,
            _writer,
        } = self;
        if writes.is_empty() {
            return Ok(());
        }
        if _writer.is_none() {
            return Err(StoreError::Backend("a reader cannot write".into()));
        }
        let mut trees: Vec<T> = writes.keys().map(|(t, _)| *t).collect();
        trees.dedup();
        let handles: Vec<&::sled::Tree> = trees.iter().map(|t| db.tree(*t)).collect();
        let result: Result<(), TransactionError<StoreError>> =
            ::sled::Transactional::transaction(handles.as_slice(), |views| {
                for ((tree, key), value) in &writes {
                    let Some(at) = trees.iter().position(|t| t == tree) else {
                        return Err(ConflictableTransactionError::Abort(StoreError::Backend(
                            "a write to a tree outside its transaction".into(),
                        )));
                    };
                    match value {
                        Some(v) => views[at].insert(key.as_slice(), v.clone())?,
                        None => views[at].remove(key.as_slice())?,
                    };
                }
                Ok(())
            });
        result.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Backend(Box::new(e)),
        })
    }
}

impl Tx for SledTx<'_> {
    const SHARED: bool = false;

    async fn job(&mut self, id: &str) -> R<Option<JobRecord>> {
        self.get(T::Jobs, id.as_bytes())
    }

    async fn put_job(&mut self, job: &JobRecord) -> R<()> {
        self.put(T::Jobs, job.id().as_str().as_bytes(), job)
    }

    async fn next_seq(&mut self) -> R<u64> {
        self.new_id()
    }

    async fn insert_job(&mut self, job: &JobRecord, spec: &[u8]) -> R<bool> {
        if self.raw(T::Jobs, job.id().as_str().as_bytes())?.is_some() {
            return Ok(false);
        }
        self.put(T::Jobs, job.id().as_str().as_bytes(), job)?;
        self.set(T::Specs, job.id().as_str().as_bytes(), spec);
        Ok(true)
    }

    async fn spec(&mut self, id: &str) -> R<Option<JobSpec>> {
        self.get(T::Specs, id.as_bytes())
    }

    async fn batch(&mut self, job_id: &str, no: u32) -> R<Option<BatchRecord>> {
        self.get(T::Batches, &batch_key(job_id, no))
    }

    async fn put_batch(&mut self, batch: &BatchRecord) -> R<()> {
        let key = batch_key(batch.job_id().as_str(), batch.no());
        if batch.state().is_open() {
            self.set(T::Open, &key, batch.token().as_bytes());
        } else {
            self.remove(T::Open, &key);
        }
        self.put(T::Batches, &key, batch)
    }

    async fn remove_batch(&mut self, job_id: &str, no: u32) -> R<()> {
        let key = batch_key(job_id, no);
        self.remove(T::Batches, &key);
        self.remove(T::Open, &key);
        Ok(())
    }

    async fn put_failure(&mut self, job_id: &str, no: u32, pair: u32, f: &FailureRecord) -> R<()> {
        self.put(T::Failures, &failure_key(job_id, no, pair), f)
    }

    async fn put_event(&mut self, event_id: &str, event: &EventRef) -> R<()> {
        self.put(T::Events, event_id.as_bytes(), event)
    }

    async fn unpark(&mut self, event_id: &str) -> R<()> {
        let Some(bytes) = self.raw(T::Parked, event_id.as_bytes())? else {
            return Ok(());
        };
        self.remove(T::Parked, event_id.as_bytes());
        for p in decode_parked(event_id.as_bytes(), &bytes)? {
            self.remove(T::ParkedAt, &parked_at_key(p.at_ms, p.id));
            self.set(T::Inbox, &p.id.to_be_bytes(), p.envelope);
        }
        Ok(())
    }

    async fn remove_inbox(&mut self, ids: &[InboxId]) -> R<usize> {
        let mut removed = 0;
        for id in ids {
            let key = id.0.to_be_bytes();
            if self.raw(T::Inbox, &key)?.is_some() {
                removed += 1;
            }
            self.remove(T::Inbox, &key);
        }
        Ok(removed)
    }

    async fn outbox_entries(&mut self, ids: &[OutboxId]) -> R<Vec<(OutboxId, OutboxEntry)>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(entry) = self.get(T::Outbox, &id.0.to_be_bytes())? {
                out.push((*id, entry));
            }
        }
        Ok(out)
    }

    async fn put_outbox(&mut self, id: OutboxId, entry: &OutboxEntry) -> R<()> {
        self.put(T::Outbox, &id.0.to_be_bytes(), entry)
    }

    async fn remove_outbox(&mut self, ids: &[OutboxId]) -> R<()> {
        for id in ids {
            self.remove(T::Outbox, &id.0.to_be_bytes());
        }
        Ok(())
    }

    async fn add_outbox(&mut self, entry: &OutboxEntry) -> R<()> {
        let id = self.new_id()?;
        self.put(T::Outbox, &id.to_be_bytes(), entry)
    }

    async fn held(&mut self, token: &str, id: OutboxId) -> R<Option<OutboxEntry>> {
        self.get(T::Held, &held_key(token, id.0))
    }

    async fn put_held(&mut self, token: &str, id: OutboxId, entry: &OutboxEntry) -> R<()> {
        self.put(T::Held, &held_key(token, id.0), entry)
    }

    async fn remove_held(&mut self, token: &str, id: OutboxId) -> R<()> {
        self.remove(T::Held, &held_key(token, id.0));
        Ok(())
    }

    async fn add_held(&mut self, token: &str, entry: &OutboxEntry) -> R<()> {
        let id = self.new_id()?;
        self.put(T::Held, &held_key(token, id), entry)
    }

    async fn license(
        &mut self,
        (token, adam_id, pricing): &LicenseKey,
    ) -> R<Option<LicenseRecord>> {
        self.get(T::Licenses, license_key(token, adam_id, pricing).as_bytes())
    }

    async fn put_license(&mut self, key: &LicenseKey, record: &LicenseRecord) -> R<()> {
        let (token, adam_id, pricing) = key;
        self.put(
            T::Licenses,
            license_key(token, adam_id, pricing).as_bytes(),
            record,
        )
    }

    async fn put_user(&mut self, token: &str, user: &UserRecord) -> R<()> {
        self.put(
            T::Users,
            user_key(token, &user.client_user_id).as_bytes(),
            user,
        )
    }

    async fn drift(&mut self, token: &str) -> R<Option<DriftRecord>> {
        self.get(T::Meta, &drift_key(token))
    }

    async fn put_drift(&mut self, token: &str, record: &DriftRecord) -> R<()> {
        self.put(T::Meta, &drift_key(token), record)
    }

    async fn in_outbox(&mut self, _job_id: &str) -> R<bool> {
        // Checked when retention read its candidates ([`Sled::prunable`]):
        // one process writes this store, and nothing adds commands for a
        // job that has expired.
        Ok(false)
    }

    async fn forget_job(&mut self, job_id: &str, events: &[String]) -> R<()> {
        for event in events {
            self.remove(T::Events, event.as_bytes());
        }
        let prefix = job_prefix(job_id);
        for key in self.keys_under(T::Batches, &prefix)? {
            self.remove(T::Open, &key);
            self.remove(T::Batches, &key);
        }
        for key in self.keys_under(T::Failures, &prefix)? {
            self.remove(T::Failures, &key);
        }
        self.remove(T::Jobs, job_id.as_bytes());
        self.remove(T::Specs, job_id.as_bytes());
        let pruned = pruned_count(self.raw(T::Ids, PRUNED_KEY)?.as_deref());
        self.set(T::Ids, PRUNED_KEY, &(pruned + 1).to_be_bytes()[..]);
        Ok(())
    }

    async fn batches_of(&mut self, job_id: &str) -> R<Vec<BatchRecord>> {
        let mut out = Vec::new();
        for key in self.keys_under(T::Batches, &job_prefix(job_id))? {
            if let Some(batch) = self.get(T::Batches, &key)? {
                out.push(batch);
            }
        }
        Ok(out)
    }
    async fn event(&mut self, event_id: &str) -> R<Option<EventRef>> {
        self.get(T::Events, event_id.as_bytes())
    }

    async fn user(&mut self, token: &str, id: &str) -> R<Option<UserRecord>> {
        self.get(T::Users, user_key(token, id).as_bytes())
    }

    async fn park(&mut self, id: InboxId, event_id: &str, at_ms: u64) -> R<bool> {
        let key = id.0.to_be_bytes();
        let event = event_id.as_bytes();
        if self.raw(T::Events, event)?.is_some() {
            return Ok(false);
        }
        let Some(envelope) = self.raw(T::Inbox, &key)? else {
            return Ok(false);
        };
        self.remove(T::Inbox, &key);
        let mut bytes = self.raw(T::Parked, event)?.map(|b| b.to_vec());
        let bytes = bytes.get_or_insert_with(Vec::new);
        bytes.extend_from_slice(&encode_parked(&[Parked {
            id: id.0,
            at_ms,
            envelope: envelope.to_vec(),
        }]));
        self.set(T::Parked, event, bytes.as_slice());
        self.set(T::ParkedAt, &parked_at_key(at_ms, id.0), event);
        Ok(true)
    }

    async fn meta(&mut self, key: &str) -> R<Option<String>> {
        self.get(T::Meta, key.as_bytes())
    }

    async fn put_meta(&mut self, key: &str, value: &str) -> R<()> {
        self.put(T::Meta, key.as_bytes(), &value)
    }

    async fn insert_meta(&mut self, key: &str, value: &str) -> R<bool> {
        if self.raw(T::Meta, key.as_bytes())?.is_some() {
            return Ok(false);
        }
        self.put(T::Meta, key.as_bytes(), &value).map(|()| true)
    }

    async fn put_token(&mut self, record: &TokenRecord) -> R<()> {
        self.put(T::Tokens, record.name.as_bytes(), record)
    }

    async fn remove_token(&mut self, name: &str) -> R<bool> {
        self.remove(T::TokenStates, name.as_bytes());
        let existed = self.raw(T::Tokens, name.as_bytes())?.is_some();
        self.remove(T::Tokens, name.as_bytes());
        Ok(existed)
    }

    async fn put_token_state(&mut self, name: &str, state: &str) -> R<()> {
        self.set(T::TokenStates, name.as_bytes(), state.as_bytes());
        Ok(())
    }
}
