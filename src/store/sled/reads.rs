//! The sled backend's scans: reads outside any transaction, each of the
//! trees as they are.

use std::collections::{HashMap, HashSet};

use super::keys::{id_of, job_prefix};
use super::{R, Sled, decode};
use crate::domain::lifecycle::{BatchRecord, FailureRecord, JobRecord, OutboxEntry};
use crate::store::{
    LicenseRecord, OutboxId, OutboxItem, PairFailure, StoreError, StoreStats, TokenRecord,
};

impl Sled {
    /// The jobs (of `token`, or all), in creation order. Every record is
    /// read, so what this returns is the tree as it is; only the decoding
    /// is saved, for records whose bytes are those last decoded. Two scans
    /// at once are both right: the second starts without the cache, and
    /// the cache left is either one's.
    pub(super) fn scan_jobs(&self, token: Option<&str>) -> R<Vec<JobRecord>> {
        let mut known = std::mem::take(&mut *self.job_records());
        let mut seen = HashMap::with_capacity(known.len());
        let mut jobs = Vec::new();
        for item in self.jobs.iter() {
            let (k, v) = item?;
            let job = match known.remove(&k) {
                Some((bytes, job)) if bytes == v => job,
                _ => decode::<JobRecord>(&k, &v)?,
            };
            if token.is_none_or(|t| job.token() == t) {
                jobs.push(job.clone());
            }
            seen.insert(k, (v, job));
        }
        *self.job_records() = seen;
        jobs.sort_by_key(|j| j.seq());
        Ok(jobs)
    }

    fn job_records(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<::sled::IVec, (::sled::IVec, JobRecord)>> {
        self.job_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn read_open_batches(&self, token: &str) -> R<Vec<BatchRecord>> {
        let mut out = Vec::new();
        for item in self.open.iter() {
            let (k, t) = item?;
            if t.as_ref() != token.as_bytes() {
                continue;
            }
            if let Some(b) = Self::read::<BatchRecord>(&self.batches, &k)?
                && b.state().is_open()
            {
                out.push(b);
            }
        }
        Ok(out)
    }

    pub(super) fn read_failures(&self, job_id: &str, limit: usize) -> R<(Vec<PairFailure>, bool)> {
        let prefix = job_prefix(job_id);
        let mut out = Vec::new();
        for item in self.failures.scan_prefix(&prefix) {
            let (k, v) = item?;
            let Some(rest) = k.get(prefix.len()..) else {
                continue;
            };
            let (Some(no), Some(pair)) = (rest.get(..4), rest.get(4..)) else {
                continue;
            };
            let (Ok(no), Ok(pair)) = (<[u8; 4]>::try_from(no), <[u8; 4]>::try_from(pair)) else {
                continue;
            };
            if out.len() >= limit {
                return Ok((out, true));
            }
            out.push(PairFailure {
                batch: u32::from_be_bytes(no),
                pair: u32::from_be_bytes(pair),
                record: decode::<FailureRecord>(&k, &v)?,
            });
        }
        Ok((out, false))
    }

    pub(super) fn read_outbox(&self, max_commands: usize) -> R<Vec<OutboxItem>> {
        let mut out = Vec::new();
        let mut commands = 0;
        for item in self.outbox.iter() {
            if commands >= max_commands {
                break;
            }
            let (k, v) = item?;
            let entry: OutboxEntry = decode(&k, &v)?;
            commands += entry.pairs.len();
            out.push(OutboxItem {
                id: OutboxId(id_of(&k)),
                entry,
            });
        }
        Ok(out)
    }

    pub(super) fn read_held(&self, token: &str) -> R<Vec<OutboxItem>> {
        let prefix = job_prefix(token);
        let mut out = Vec::new();
        for item in self.held.scan_prefix(&prefix) {
            let (k, v) = item?;
            let id = k.get(prefix.len()..).map(id_of).unwrap_or(0);
            out.push(OutboxItem {
                id: OutboxId(id),
                entry: decode(&k, &v)?,
            });
        }
        Ok(out)
    }

    pub(super) fn read_licenses(&self, token: &str) -> R<Vec<(String, String, LicenseRecord)>> {
        let prefix = format!("{token}\0");
        let mut out = Vec::new();
        for item in self.licenses.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item?;
            let record: LicenseRecord = decode(&k, &v)?;
            let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let (adam_id, pricing) = key.split_once('\0').unwrap_or((key.as_str(), ""));
            out.push((adam_id.to_string(), pricing.to_string(), record));
        }
        Ok(out)
    }

    pub(super) fn read_tokens(&self) -> R<Vec<TokenRecord>> {
        let mut out = Vec::new();
        for item in self.tokens.iter() {
            let (key, value) = item?;
            // serde's message could quote the record, sToken included.
            let record = serde_json::from_slice(&value).map_err(|_| StoreError::Corrupt {
                key: format!("tokens/{}", String::from_utf8_lossy(&key)),
                message: "not a token record; PUT the token again".into(),
            })?;
            out.push(record);
        }
        Ok(out)
    }

    /// Expired jobs with no command left in the outbox.
    pub(super) fn read_prunable(&self, cutoff_ms: u64) -> R<Vec<String>> {
        let mut in_outbox = HashSet::new();
        for item in self.outbox.iter() {
            let (k, v) = item?;
            in_outbox.insert(decode::<OutboxEntry>(&k, &v)?.job_id);
        }
        Ok(self
            .scan_jobs(None)?
            .into_iter()
            .filter(|job| job.expired(cutoff_ms) && !in_outbox.contains(job.id()))
            .map(|job| job.id().to_string())
            .collect())
    }

    pub(super) fn read_stats(&self) -> R<StoreStats> {
        let trees = [
            &self.jobs,
            &self.batches,
            &self.events,
            &self.failures,
            &self.inbox,
            &self.outbox,
            &self.seen,
            &self.licenses,
            &self.users,
        ];
        let records = StoreStats::KINDS
            .into_iter()
            .zip(trees)
            .map(|(kind, tree)| (kind, tree.len() as u64))
            .collect();
        Ok(StoreStats {
            bytes: crate::store::files::dir_bytes(&self.path),
            records,
        })
    }
}
