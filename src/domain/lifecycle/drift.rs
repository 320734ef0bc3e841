//! What vppd knows about a token's drift: assignments that appeared or
//! disappeared at Apple that no event of vppd's explains, and where it is
//! in Apple's versioned assignment data (`versionId`).
//!
//! Like the job and batch records, this changes only through
//! [`DriftRecord::apply`], called by a store backend inside its own atomic
//! read-modify-write: the applier (removals named by notifications of events
//! vppd did not send) and the token's drift follower (incremental reads,
//! re-reads) may change it at the same time.
//!
//! Invariants: a pair is counted as added once while it stays (the
//! `foreign` set holds every present pair no vppd job explains); a removal
//! of a pair vppd made is counted once until the pair is seen again, and
//! the item carries the job that made it as soon as it is known.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::domain::report::{Assignee, Assignment};

/// Items kept per list; the counts go on.
pub const DRIFT_ITEMS_MAX: usize = 1000;

/// One assignment that appeared or disappeared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftItem {
    pub adam_id: String,
    pub pricing_param: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_user_id: Option<String>,
    pub seen_ms: u64,
    /// A removed pair vppd itself made: the job that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

impl DriftItem {
    /// The item for an assignment Apple names.
    pub fn of(a: &Assignment, now: u64, job_id: Option<String>) -> DriftItem {
        let (serial_number, client_user_id) = match &a.assignee {
            Assignee::Serial(s) => (Some(s.clone()), None),
            Assignee::User(u) => (None, Some(u.clone())),
        };
        DriftItem {
            adam_id: a.adam_id.clone(),
            pricing_param: a.pricing_param.clone(),
            serial_number,
            client_user_id,
            seen_ms: now,
            job_id,
        }
    }

    /// As `GET /v1/tokens/{name}/drift` shows it.
    fn document(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "adamId": self.adam_id,
            "pricingParam": self.pricing_param,
            "seenAt": super::format_ms(self.seen_ms),
        });
        match (&self.serial_number, &self.client_user_id) {
            (Some(s), _) => v["serialNumber"] = s.clone().into(),
            (None, Some(u)) => v["clientUserId"] = u.clone().into(),
            (None, None) => {}
        }
        if let Some(job) = &self.job_id {
            v["jobId"] = job.clone().into();
        }
        v
    }

    /// A stable key of the pair (FNV-1a over its fields): the sets below
    /// hold keys, not strings, to stay small for large libraries.
    pub fn key(&self) -> u64 {
        pair_key(
            &self.adam_id,
            &self.pricing_param,
            self.serial_number.as_deref(),
            self.client_user_id.as_deref(),
        )
    }
}

/// The key of (asset, target), as [`DriftItem::key`].
pub fn pair_key(adam_id: &str, pricing: &str, serial: Option<&str>, user: Option<&str>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(adam_id.as_bytes());
    eat(pricing.as_bytes());
    match (serial, user) {
        (Some(s), _) => {
            eat(b"s");
            eat(s.as_bytes());
        }
        (None, Some(u)) => {
            eat(b"u");
            eat(u.as_bytes());
        }
        (None, None) => eat(b"-"),
    }
    h
}

/// A count and the latest items.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftList {
    pub count: u64,
    pub items: Vec<DriftItem>,
}

impl DriftList {
    fn push(&mut self, item: DriftItem) {
        self.count += 1;
        self.items.push(item);
        if self.items.len() > DRIFT_ITEMS_MAX {
            let extra = self.items.len() - DRIFT_ITEMS_MAX;
            self.items.drain(..extra);
        }
    }
}

/// A token's drift as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftRecord {
    /// The last `versionId` Apple gave: the next `sinceVersionId`.
    pub version_id: Option<String>,
    pub checked_ms: Option<u64>,
    pub added: DriftList,
    pub removed: DriftList,
    /// Keys of present pairs no job of vppd's explains.
    #[serde(default)]
    foreign: BTreeSet<u64>,
    /// Keys of vppd's own pairs counted as removed.
    #[serde(default)]
    removed_own: BTreeSet<u64>,
}

/// A change of a token's drift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftChange {
    /// vppd starts following the token: a full read, whose pairs no job of
    /// vppd's explains are the ones there before (not drift).
    Baseline {
        version_id: String,
        foreign: Vec<u64>,
        now: u64,
    },
    /// An incremental read (`sinceVersionId`): pairs changed since, that no
    /// job of vppd's explains.
    Read {
        version_id: String,
        unexplained: Vec<DriftItem>,
        now: u64,
    },
    /// A full re-read after Apple refused the version as too old: every
    /// present pair no job explains. New ones are added; foreign ones gone
    /// are removed.
    Reread {
        version_id: String,
        unexplained: Vec<DriftItem>,
        now: u64,
    },
    /// Pairs that disappeared: named by notifications of events vppd did not
    /// send (`job_id` unknown there), or vppd's own pairs missing from a
    /// filtered re-read (`job_id` set). A pair already counted only gains
    /// its job.
    Removed { items: Vec<DriftItem> },
    /// vppd's own pairs seen present again: a later removal counts anew.
    Present { keys: Vec<u64> },
}

/// What a change counted, for the metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriftCounted {
    pub added: u64,
    pub removed: u64,
}

/// `GET /v1/tokens/{name}/drift`, as the contract shows it (`record` is
/// `None` before vppd follows the token).
pub fn drift_document(record: Option<&DriftRecord>) -> serde_json::Value {
    let list = |l: Option<&DriftList>| {
        let items: Vec<serde_json::Value> = l
            .map(|l| l.items.iter().map(DriftItem::document).collect())
            .unwrap_or_default();
        serde_json::json!({"count": l.map(|l| l.count).unwrap_or(0), "items": items})
    };
    serde_json::json!({
        "versionId": record.and_then(|r| r.version_id.clone()),
        "checkedAt": record.and_then(|r| r.checked_ms).map(super::format_ms),
        "added": list(record.map(|r| &r.added)),
        "removed": list(record.map(|r| &r.removed)),
    })
}

impl DriftRecord {
    /// Whether vppd follows the token already (a baseline was read).
    pub fn following(&self) -> bool {
        self.version_id.is_some()
    }

    /// Keys of the present pairs no job of vppd's explains.
    pub fn foreign_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.foreign.iter().copied()
    }

    pub fn apply(&mut self, change: DriftChange) -> DriftCounted {
        let mut counted = DriftCounted::default();
        match change {
            DriftChange::Baseline {
                version_id,
                foreign,
                now,
            } => {
                if self.following() {
                    return counted;
                }
                self.version_id = Some(version_id);
                self.checked_ms = Some(now);
                self.foreign = foreign.into_iter().collect();
            }
            DriftChange::Read {
                version_id,
                unexplained,
                now,
            } => {
                for item in unexplained {
                    if self.foreign.insert(item.key()) {
                        self.added.push(item);
                        counted.added += 1;
                    }
                }
                self.version_id = Some(version_id);
                self.checked_ms = Some(now);
            }
            DriftChange::Reread {
                version_id,
                unexplained,
                now,
            } => {
                let present: BTreeSet<u64> = unexplained.iter().map(DriftItem::key).collect();
                for item in unexplained {
                    if !self.foreign.contains(&item.key()) {
                        self.added.push(item);
                        counted.added += 1;
                    }
                }
                // Foreign pairs gone without a notification vppd saw: their
                // names are lost with the hashes, so they are counted only.
                let gone = self.foreign.difference(&present).count() as u64;
                self.removed.count += gone;
                counted.removed += gone;
                self.foreign = present;
                self.version_id = Some(version_id);
                self.checked_ms = Some(now);
            }
            DriftChange::Removed { items } => {
                for item in items {
                    let key = item.key();
                    if self.foreign.remove(&key) {
                        self.removed.push(item);
                        counted.removed += 1;
                        continue;
                    }
                    if self.removed_own.contains(&key) {
                        if let Some(job) = &item.job_id
                            && let Some(known) = self
                                .removed
                                .items
                                .iter_mut()
                                .rev()
                                .find(|i| i.key() == key && i.job_id.is_none())
                        {
                            known.job_id = Some(job.clone());
                        }
                        continue;
                    }
                    self.removed_own.insert(key);
                    self.removed.push(item);
                    counted.removed += 1;
                }
            }
            DriftChange::Present { keys } => {
                for key in keys {
                    self.removed_own.remove(&key);
                }
            }
        }
        counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(serial: &str, job: Option<&str>) -> DriftItem {
        DriftItem {
            adam_id: "1".into(),
            pricing_param: "STDQ".into(),
            serial_number: Some(serial.into()),
            client_user_id: None,
            seen_ms: 5,
            job_id: job.map(str::to_string),
        }
    }

    fn followed(foreign: &[&str]) -> DriftRecord {
        let mut d = DriftRecord::default();
        d.apply(DriftChange::Baseline {
            version_id: "v1".into(),
            foreign: foreign.iter().map(|s| item(s, None).key()).collect(),
            now: 1,
        });
        d
    }

    #[test]
    fn what_was_there_before_following_is_not_drift() {
        let mut d = followed(&["OLD"]);
        let c = d.apply(DriftChange::Read {
            version_id: "v2".into(),
            unexplained: vec![item("OLD", None), item("NEW", None), item("NEW", None)],
            now: 2,
        });
        assert_eq!(
            c,
            DriftCounted {
                added: 1,
                removed: 0
            }
        );
        assert_eq!(d.added.count, 1);
        assert_eq!(d.added.items[0].serial_number.as_deref(), Some("NEW"));
        assert_eq!(d.version_id.as_deref(), Some("v2"));
    }

    #[test]
    fn a_removal_is_counted_once_and_gains_its_job() {
        let mut d = followed(&[]);
        let c = d.apply(DriftChange::Removed {
            items: vec![item("MINE", None)],
        });
        assert_eq!(c.removed, 1);
        // The re-read finds it missing too, and knows whose it was.
        let c = d.apply(DriftChange::Removed {
            items: vec![item("MINE", Some("job-1"))],
        });
        assert_eq!(c.removed, 0);
        assert_eq!(d.removed.count, 1);
        assert_eq!(d.removed.items[0].job_id.as_deref(), Some("job-1"));
        // Seen again, then removed again: a new removal.
        d.apply(DriftChange::Present {
            keys: vec![item("MINE", None).key()],
        });
        let c = d.apply(DriftChange::Removed {
            items: vec![item("MINE", Some("job-2"))],
        });
        assert_eq!(c.removed, 1);
    }

    #[test]
    fn a_reread_adds_what_is_new_and_counts_what_is_gone() {
        let mut d = followed(&["A", "B"]);
        let c = d.apply(DriftChange::Reread {
            version_id: "v9".into(),
            unexplained: vec![item("A", None), item("C", None)],
            now: 3,
        });
        assert_eq!(
            c,
            DriftCounted {
                added: 1,
                removed: 1
            }
        );
        // A baseline never replaces what is followed already.
        d.apply(DriftChange::Baseline {
            version_id: "v0".into(),
            foreign: vec![],
            now: 4,
        });
        assert_eq!(d.version_id.as_deref(), Some("v9"));
    }

    #[test]
    fn items_are_capped_and_counts_go_on() {
        let mut d = followed(&[]);
        let many: Vec<DriftItem> = (0..DRIFT_ITEMS_MAX + 5)
            .map(|i| item(&format!("S{i}"), None))
            .collect();
        d.apply(DriftChange::Read {
            version_id: "v2".into(),
            unexplained: many,
            now: 2,
        });
        assert_eq!(d.added.count, DRIFT_ITEMS_MAX as u64 + 5);
        assert_eq!(d.added.items.len(), DRIFT_ITEMS_MAX);
        assert_eq!(
            d.added.items.last().unwrap().serial_number.as_deref(),
            Some(format!("S{}", DRIFT_ITEMS_MAX + 4).as_str())
        );
    }
}
