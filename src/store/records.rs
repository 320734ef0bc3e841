//! What the store takes and gives besides the job and batch records of
//! [`crate::domain::lifecycle`]: typed ids, inbox and outbox items, the applier's
//! commit, license and user records. Backend-neutral; no key layout here.

use serde::{Deserialize, Serialize};

use crate::domain::ids::JobId;
use crate::domain::lifecycle::{Decision, FailureRecord, JobRecord, OutboxEntry, Revoked};

/// A recorded notification's place in the inbox: increasing in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboxId(pub u64);

/// An outbox entry's place: increasing in the order the commands were confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutboxId(pub u64);

/// A recorded notification not yet applied: the bytes the listener stored
/// (the form of [`crate::domain::inbox`], or the JSON envelope an older vppd kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxItem {
    pub id: InboxId,
    pub envelope: Vec<u8>,
}

/// Result of recording a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    New,
    /// Its notificationId was recorded before: nothing changed.
    Duplicate,
}

/// Result of creating a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New(Box<JobRecord>),
    /// The same id with the same spec: the job as it is now.
    Existing(Box<JobRecord>),
    /// The same id with another spec.
    Conflict,
}

/// Install commands waiting for delivery, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: OutboxId,
    pub entry: OutboxEntry,
}

/// Commands the MDM acknowledged, named by identity: the entry they were
/// read from and their pair indexes in its batch (with the job and batch of
/// the entry, that is the command uuid), never "the first N".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxAck {
    pub entry: OutboxId,
    pub pairs: Vec<u32>,
}

/// What acknowledging commands did to one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub job_id: JobId,
    pub token: String,
    /// Commands that were still in the outbox and are now released.
    pub commands: u64,
    /// What the commands were (installs and removals are counted apart).
    pub request_type: crate::domain::job::RequestType,
    /// The job's new final state, when this finished it.
    pub finished: Option<crate::domain::job::JobState>,
}

impl Released {
    /// Counts `commands` of `request_type` released on `job` (which may
    /// finish it) and says so.
    pub fn count(
        job: &mut crate::domain::lifecycle::JobRecord,
        commands: u64,
        request_type: crate::domain::job::RequestType,
        now_ms: u64,
    ) -> Released {
        let finished = job.released(commands, request_type, now_ms);
        Released {
            job_id: job.id().clone(),
            token: job.token().to_string(),
            commands,
            request_type,
            finished,
        }
    }
}

/// What settling held installs did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Installs moved to the outbox: their user is `Associated`.
    pub released: u64,
    /// Installs dropped: their user is retired.
    pub dropped: u64,
    /// Jobs the drop finished, with their new state.
    pub finished: Vec<(JobId, crate::domain::job::JobState)>,
}

/// Decisions for pairs of one batch (see [`crate::domain::lifecycle::JobRecord::decide`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decide {
    pub job_id: JobId,
    pub batch: u32,
    pub decisions: Vec<(u32, Decision)>,
    /// A revoke batch: pairs Apple named as revoked.
    pub revoked: Vec<(Revoked, Decision)>,
    /// A notification: a sign of life that postpones the status poll.
    pub activity: bool,
    /// Apple's event status says the event is finished.
    pub finished: bool,
    /// A `Sending` batch's reconciliation asked Apple about these pairs
    /// ([`crate::domain::lifecycle::JobRecord::note_reconciliation`]).
    pub checked: Vec<u32>,
    /// That reconciliation is over.
    pub reconciled: bool,
}

/// A change of license counts Apple reported for one asset of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LicenseDelta {
    pub token: String,
    pub adam_id: String,
    pub pricing_param: String,
    pub delta: i64,
    /// The ASSET_COUNT notification's id: a delta is applied once per
    /// notification, however often it is folded.
    pub notification_id: String,
}

/// What the applier folds from a run of inbox notifications, committed at
/// once: one durable commit for many notifications.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fold {
    /// Applied in order; each pair is still decided once.
    pub decide: Vec<Decide>,
    pub license_deltas: Vec<LicenseDelta>,
    /// (token, user) as Apple reported them.
    pub users: Vec<(String, crate::domain::report::UserRecord)>,
    /// Inbox items this fold consumes; they leave the inbox in the same commit.
    pub consumed: Vec<InboxId>,
}

/// One failed pair as stored: its batch and pair index, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairFailure {
    pub batch: u32,
    pub pair: u32,
    pub record: FailureRecord,
}

/// License counts of one asset of a token, as Apple last told them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LicenseRecord {
    #[serde(default)]
    pub assigned_count: i64,
    #[serde(default)]
    pub available_count: i64,
    #[serde(default)]
    pub total_count: i64,
    /// When Get Assets was read.
    #[serde(default)]
    pub read_ms: u64,
    /// When a count notification, or a change vppd made, last changed it.
    #[serde(default)]
    pub updated_ms: u64,
    /// `App` or `Book`, as Get Assets said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_type: Option<String>,
    /// The latest ASSET_COUNT notifications applied (at most
    /// [`LicenseRecord::APPLIED_KEPT`]): a notification folded again (its
    /// inbox copy left by a crash between two writes, or a duplicate
    /// flushed before its removal) changes nothing again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<String>,
}

impl LicenseRecord {
    /// How many applied notification ids a record keeps: far more than a
    /// fold could repeat.
    pub const APPLIED_KEPT: usize = 64;

    /// Apple's ASSET_COUNT: licenses added (or removed) change what is
    /// available and the total alike; once per notification. Whether it
    /// changed anything.
    pub fn apply_delta(&mut self, delta: i64, notification_id: &str, now: u64) -> bool {
        if self.applied.iter().any(|id| id == notification_id) {
            return false;
        }
        if self.applied.len() >= Self::APPLIED_KEPT {
            self.applied.remove(0);
        }
        self.applied.push(notification_id.to_string());
        self.available_count = self.available_count.saturating_add(delta);
        self.total_count = self.total_count.saturating_add(delta);
        self.updated_ms = now;
        true
    }

    /// A change vppd made and Apple confirmed: `assigned` more (or fewer)
    /// licenses in use. Unlimited assets keep their counts.
    pub fn apply_assigned(&mut self, assigned: i64, now: u64) {
        if self.total_count >= crate::apple::types::UNLIMITED_COUNT as i64 {
            return;
        }
        self.assigned_count = (self.assigned_count + assigned).max(0);
        self.available_count = (self.available_count - assigned).max(0);
        self.updated_ms = now;
    }
}

/// Who works what (a token, the applier, the outbox) among replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// Milliseconds until it expires; zero or less when it has.
    pub remaining_ms: i64,
}

/// A token added through the API (or a config-file token renewed through
/// it): what a restart needs to serve it again. `stoken` is the secret as
/// downloaded; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub name: String,
    pub stoken: String,
    /// Take the location over from another MDM on registration.
    #[serde(default)]
    pub takeover: bool,
    /// When it was last put.
    #[serde(default)]
    pub updated_ms: u64,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("name", &self.name)
            .field("stoken", &"<redacted>")
            .field("takeover", &self.takeover)
            .field("updated_ms", &self.updated_ms)
            .finish()
    }
}

/// How big a store is, for the `vppd_store_*` metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes the store takes: sled's files on disk; with PostgreSQL, the
    /// tables of vppd's schema with their indexes and TOAST.
    pub bytes: u64,
    /// Records by kind, one of [`StoreStats::KINDS`].
    pub records: Vec<(&'static str, u64)>,
}

impl StoreStats {
    /// The kinds of record counted, as `vppd_store_records{kind}` names them.
    pub const KINDS: [&'static str; 9] = [
        "jobs",
        "batches",
        "events",
        "failures",
        "inbox",
        "outbox",
        "notification_ids",
        "licenses",
        "users",
    ];

    /// The count of one kind (0 when not counted).
    pub fn count(&self, kind: &str) -> u64 {
        self.records
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }
}
