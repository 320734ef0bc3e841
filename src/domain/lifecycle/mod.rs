//! The job and batch state machine: the only code that changes a job's state
//! or counters, or a batch's state and pair decisions.
//!
//! ```text
//! job:    accepted ──► running ──► completed
//!             │           │
//!             └───────────┴──────► failed | canceled
//!
//! batch:  (plan) ──► sending ──► sent ──► decided
//!                      │  │                  ▲
//!                      │  └──────────────────┘   refused outright, or reconciled whole
//!                      ├──► (back to plan)        refused for size, or the token refused
//!                      └──► withdrawn             its job was canceled before Apple took it
//! ```
//!
//! Architecture invariant: this module does no I/O. A store backend loads the
//! records a change touches, calls one transition here inside its own
//! read-modify-write transaction, and writes back what the transition
//! changed and returned (failure records, outbox entries), so every backend
//! keeps the same invariants with the same code:
//!
//! - A pair is decided once: a pair already confirmed or failed keeps its
//!   first decision, so duplicated, reordered and late reports change nothing.
//! - An install command exists only for a confirmed association of an
//!   install job, and it is created by the transition that confirms it.
//! - A job has at most one batch `Sending`, and a `Sending` batch is never
//!   sent again before it is reconciled; once its job is canceled it is
//!   reconciled and withdrawn, never resent.
//! - Counters move only with the change they count: `open_batches` with a
//!   batch leaving `(plan)` or reaching `decided`/`withdrawn`, the pair
//!   tallies with decisions, installs with outbox entries and their
//!   acknowledgements. A job completes once nothing is left to send, decide
//!   or release.

mod batch;
mod drift;
mod users;
pub(crate) mod varint;

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use batch::{BatchRecord, BatchState, Bitmap, Revoked};
pub use drift::{
    DRIFT_ITEMS_MAX, DriftChange, DriftCounted, DriftItem, DriftList, DriftRecord, drift_document,
    pair_key,
};
pub use users::UserProgress;

use crate::domain::fastmap::FastMap;
use crate::domain::ids::{EventId, JobId};
use crate::domain::job::{
    Failure, InstallCounts, JobSpec, JobState, JobStatus, PairCounts, Phase, RequestCounts,
    RequestType,
};
use crate::domain::plan::{Batch, Plan, Shape};

/// Milliseconds since the Unix epoch: the clock of every record.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 for a status document; empty for a time that cannot be shown.
pub fn format_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Pair counts of one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    total: u64,
    confirmed: u64,
    failed: u64,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    pub fn failed(&self) -> u64 {
        self.failed
    }

    pub fn decided(&self) -> bool {
        self.confirmed + self.failed >= self.total
    }

    pub fn counts(&self) -> PairCounts {
        PairCounts {
            total: self.total,
            confirmed: self.confirmed,
            failed: self.failed,
            pending: self.total.saturating_sub(self.confirmed + self.failed),
        }
    }
}

/// Why a pair failed, as Apple (or vppd, for a pair Apple's records never
/// showed) said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub error_number: i32,
    pub error_message: String,
    pub event_id: Option<String>,
}

/// What is known about one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The eventId is shared by every pair of a notification: one
    /// allocation per notification, not per pair.
    Confirmed {
        event_id: Option<Arc<str>>,
    },
    Failed(FailureRecord),
}

/// Pairs grouped by the event that decided them, in the order the events
/// first came: a fold's pairs arrive a notification (one event) at a time,
/// so the last group is almost always the one, and no pair is hashed.
#[derive(Default)]
struct ByEvent(Vec<(Option<Arc<str>>, Vec<u32>)>);

impl ByEvent {
    fn push(&mut self, event_id: &Option<Arc<str>>, pair: u32) {
        let at = match self.0.iter().rposition(|(e, _)| e == event_id) {
            Some(at) => at,
            None => {
                self.0.push((event_id.clone(), Vec::new()));
                self.0.len() - 1
            }
        };
        self.0[at].1.push(pair);
    }
}

/// Which batch an Apple eventId belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRef {
    pub job_id: JobId,
    pub batch: u32,
}

/// Install commands waiting for the MDM's acknowledgement: confirmed
/// associations of one batch, named by their pair index in the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub job_id: JobId,
    pub batch: u32,
    /// Installs for associations; removals for disassociations and (by
    /// position in the batch's revoked list) revocations.
    #[serde(default)]
    pub request_type: RequestType,
    pub event_id: Option<EventId>,
    /// Pair indexes inside the batch's rect; for invitations, indexes
    /// into `invitations`. Each at most once. Stored as runs
    /// ([`pair_list`]).
    #[serde(with = "pair_list")]
    pub pairs: Vec<u32>,
    pub confirmed_ms: u64,
    /// `InviteToProgram` commands: (clientUserId, invitationUrl). Such an
    /// entry belongs to no batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invitations: Vec<(String, String)>,
}

impl OutboxEntry {
    /// The invitations of a job's users step, all in one entry.
    pub fn invitations(job_id: &str, invitations: Vec<(String, String)>, now: u64) -> OutboxEntry {
        OutboxEntry {
            job_id: JobId::from(job_id),
            batch: u32::MAX,
            request_type: RequestType::InviteToProgram,
            event_id: None,
            pairs: (0..invitations.len() as u32).collect(),
            confirmed_ms: now,
            invitations,
        }
    }
}

/// The most commands one entry gathers from a fold's run of notifications
/// ([`push_outbox`]): a few deliveries' worth, so that the release does
/// not decode a whole batch's commands to send a thousand of them.
pub const OUTBOX_ENTRY_MAX: usize = 4096;

/// Adds `entry` to the entries a fold will write, into the last of them
/// when it continues it (same job, batch, command and event, confirmed in
/// the same fold, no invitations, and room left). A fold of a run of
/// notifications of one event then writes, and the release later
/// acknowledges, one outbox entry instead of one per notification: each
/// entry is a record written and removed, and a key taken from the id
/// generator. The commands keep their order exactly, since only the last
/// entry is ever extended.
pub fn push_outbox(entries: &mut Vec<OutboxEntry>, entry: OutboxEntry) {
    if let Some(last) = entries.last_mut()
        && last.invitations.is_empty()
        && entry.invitations.is_empty()
        && last.batch == entry.batch
        && last.request_type == entry.request_type
        && last.confirmed_ms == entry.confirmed_ms
        && last.event_id == entry.event_id
        && last.job_id == entry.job_id
        && last.pairs.len() + entry.pairs.len() <= OUTBOX_ENTRY_MAX
    {
        last.pairs.extend_from_slice(&entry.pairs);
        return;
    }
    entries.push(entry);
}

impl OutboxEntry {
    /// Removes the named commands (by pair, never by position) and returns
    /// how many were still here: a command another releaser already
    /// acknowledged is neither removed twice nor counted twice.
    pub fn take(&mut self, pairs: &[u32]) -> u64 {
        // The release acknowledges an entry's commands as it built them,
        // from the front of the entry in its order, so a prefix (often the
        // whole entry) is the common case: no set to build for it.
        if self.pairs.starts_with(pairs) {
            self.pairs.drain(..pairs.len());
            return pairs.len() as u64;
        }
        let named: HashSet<u32> = pairs.iter().copied().collect();
        let before = self.pairs.len();
        self.pairs.retain(|p| !named.contains(p));
        (before - self.pairs.len()) as u64
    }
}

/// An outbox entry's pair indexes as stored: a string of runs of
/// consecutive indexes (`~` then Base64 of varints: the run's start as a
/// zigzag step from the previous run's end, then its length), in their
/// order. A notification names a stretch of a batch's pairs, so 100
/// commands take a few bytes instead of a JSON list of 100 numbers. A JSON
/// list of numbers (what earlier versions stored) still reads.
pub mod pair_list {
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    use super::varint::{put_varint, put_zigzag, take_varint};

    const MARK: char = '~';
    /// More than any batch holds: a damaged entry is refused, not allocated.
    const MAX_PAIRS: u64 = 1 << 26;

    pub fn serialize<S: Serializer>(pairs: &[u32], s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        let mut bytes = Vec::new();
        let mut end = 0i64;
        let mut i = 0;
        while i < pairs.len() {
            let start = pairs[i];
            let mut len = 1;
            while i + len < pairs.len() && pairs[i + len] == start.wrapping_add(len as u32) {
                len += 1;
            }
            let step = i64::from(start) - end;
            put_zigzag(&mut bytes, step);
            put_varint(&mut bytes, len as u64);
            end = i64::from(start) + len as i64;
            i += len;
        }
        let mut out = String::with_capacity(1 + bytes.len().div_ceil(3) * 4);
        out.push(MARK);
        base64::engine::general_purpose::STANDARD_NO_PAD.encode_string(bytes, &mut out);
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        d.deserialize_any(PairsVisitor)
    }

    struct PairsVisitor;

    impl<'de> Visitor<'de> for PairsVisitor {
        type Value = Vec<u32>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("runs of pair indexes or a list of pair indexes")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u32>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(p) = seq.next_element()? {
                out.push(p);
            }
            Ok(out)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u32>, E> {
            use base64::Engine;
            let runs = v
                .strip_prefix(MARK)
                .ok_or_else(|| E::custom("pair runs must start with ~"))?;
            let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(runs)
                .map_err(E::custom)?;
            let mut rest = bytes.as_slice();
            let mut out = Vec::new();
            let mut end = 0i64;
            while !rest.is_empty() {
                let z = take_varint(&mut rest).map_err(E::custom)?;
                let step = ((z >> 1) as i64) ^ -((z & 1) as i64);
                let len = take_varint(&mut rest).map_err(E::custom)?;
                let start = end + step;
                let last = start + len as i64;
                if start < 0
                    || last > i64::from(u32::MAX) + 1
                    || len == 0
                    || out.len() as u64 + len > MAX_PAIRS
                {
                    return Err(E::custom("pair runs out of range"));
                }
                out.extend((start..last).map(|p| p as u32));
                end = last;
            }
            Ok(out)
        }
    }
}

/// What a decision changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub confirmed: u32,
    pub failed: u32,
    pub outboxed: u32,
    /// Installs for user targets held until their user is `Associated`.
    pub held: u32,
    pub batch_decided: bool,
    /// The job's new final state, when this change finished it.
    pub job_state: Option<JobState>,
}

/// An asset whose licenses a decision moved: an index into the job's
/// assets, or one Apple named (a revocation).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AssetRef {
    Index(u32),
    Named {
        adam_id: String,
        pricing_param: String,
    },
}

/// What [`JobRecord::decide`] asks the backend to write besides the two records.
#[derive(Debug, Default)]
pub struct Decided {
    pub applied: Applied,
    /// Failure records by pair index.
    pub failures: Vec<(u32, FailureRecord)>,
    /// New install and removal commands, written in the same transaction.
    pub outbox: Vec<OutboxEntry>,
    /// New installs for user targets, written to the held commands of the
    /// job's token in the same transaction; they reach the outbox once
    /// their user is `Associated`.
    pub held: Vec<OutboxEntry>,
    /// Licenses the confirmed changes moved: per asset, the change of its
    /// assigned count (+1 an association, -1 a removal), so the counts vppd
    /// shows follow its own changes between two reads of Get Assets.
    pub licenses: Vec<(AssetRef, i64)>,
}

/// A change of a job that touches no batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobChange {
    /// accepted → running: the submitter took it.
    Start,
    /// The license check before the job's first request passed (it also
    /// ends waiting for licenses).
    PreflightPassed,
    /// Licenses fall short and the job waits for them: it stays `accepted`,
    /// its status saying what it waits for.
    Wait(String),
    /// The job as a whole cannot go on (a license shortfall, a refused token).
    Fail(String),
    /// Nothing more is sent; what Apple already has is still tracked and
    /// its installs released. A batch being sent is reconciled and withdrawn.
    Cancel,
    /// These user targets (positions in [`JobSpec::job_users`]) are now
    /// `Associated` at Apple.
    UsersAssociated(Vec<u32>),
}

/// A job's durable state: its phase in the state machine, its counters and
/// its unsent plan. Fields are private; they change only through the
/// transitions below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    id: JobId,
    token: String,
    /// Creation order: jobs of a token are sent in this order.
    seq: u64,
    state: JobState,
    error: Option<String>,
    created_ms: u64,
    finished_ms: Option<u64>,
    /// Hash of the normalized spec: the same id with another body is a conflict.
    spec_hash: String,
    install: bool,
    /// Work not yet sent.
    plan: Plan,
    next_batch: u32,
    /// License check before the first association done.
    preflight_done: bool,
    requests: RequestCounts,
    assoc: Tally,
    disassoc: Tally,
    installs: InstallCounts,
    /// Batches taken off the plan and not yet decided or withdrawn.
    open_batches: u32,
    #[serde(default)]
    uninstall: bool,
    /// Pairs Apple named as revoked.
    #[serde(default)]
    revoc: Tally,
    #[serde(default)]
    removals: InstallCounts,
    /// What an `accepted` job waits for before its first request.
    #[serde(default)]
    waiting_for: Option<String>,
    /// The batch recorded as about to be sent and not yet given an eventId.
    #[serde(default)]
    sending: Option<u32>,
    /// User targets: installs for them are held until the user is
    /// `Associated`. `None` for a job without users (and for jobs stored
    /// before user assignment, which keep releasing at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    users: Option<UserProgress>,
}

impl JobRecord {
    /// The record of a job that has not started. `seq` is given by the store
    /// when it is created.
    pub fn new(spec: &JobSpec, spec_hash: String, shape: Shape, now: u64) -> JobRecord {
        let plan = Plan::for_job(spec);
        JobRecord {
            id: spec.id.clone(),
            token: spec.token.clone(),
            seq: 0,
            state: JobState::Accepted,
            error: None,
            created_ms: now,
            finished_ms: None,
            spec_hash,
            install: spec.install,
            requests: RequestCounts {
                planned: plan.remaining(shape),
                submitted: 0,
                completed: 0,
            },
            plan,
            next_batch: 0,
            preflight_done: false,
            assoc: Tally {
                total: spec.pair_count(Phase::Associate),
                ..Default::default()
            },
            disassoc: Tally {
                total: spec.pair_count(Phase::Disassociate),
                ..Default::default()
            },
            installs: InstallCounts::default(),
            open_batches: 0,
            sending: None,
            uninstall: spec.uninstall,
            revoc: Tally::default(),
            removals: InstallCounts::default(),
            waiting_for: None,
            users: spec
                .has_user_step()
                .then(|| UserProgress::new(spec.job_users().len())),
        }
    }

    pub fn id(&self) -> &JobId {
        &self.id
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn state(&self) -> JobState {
        self.state
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn spec_hash(&self) -> &str {
        &self.spec_hash
    }

    pub fn install(&self) -> bool {
        self.install
    }

    pub fn requests(&self) -> &RequestCounts {
        &self.requests
    }

    pub fn tally(&self, phase: Phase) -> &Tally {
        match phase {
            Phase::Associate => &self.assoc,
            Phase::Revoke => &self.revoc,
            Phase::Disassociate => &self.disassoc,
        }
    }

    pub fn installs(&self) -> &InstallCounts {
        &self.installs
    }

    pub fn removals(&self) -> &InstallCounts {
        &self.removals
    }

    pub fn uninstall(&self) -> bool {
        self.uninstall
    }

    /// What the job waits for before its first request, if it waits.
    pub fn waiting_for(&self) -> Option<&str> {
        self.waiting_for.as_deref()
    }

    pub fn open_batches(&self) -> u32 {
        self.open_batches
    }

    /// The batch recorded as being sent, if any.
    pub fn sending(&self) -> Option<u32> {
        self.sending
    }

    /// The job's user targets, when it has any.
    pub fn users(&self) -> Option<&UserProgress> {
        self.users.as_ref()
    }

    /// The users step (ensure, retire, invite) is still to be done.
    pub fn users_step_due(&self) -> bool {
        self.users.as_ref().is_some_and(|u| !u.ready())
    }

    /// Whether `[store] retain_finished` may forget this job: final since
    /// `cutoff_ms` or earlier, and nothing of it still moving. A canceled
    /// (or failed) job is final at once while Apple may still be deciding
    /// its sent batches and their commands may still wait in the outbox;
    /// such a job is kept until those are done, however old.
    pub fn expired(&self, cutoff_ms: u64) -> bool {
        self.state.is_final()
            && self.finished_ms.is_some_and(|at| at <= cutoff_ms)
            && self.open_batches == 0
            && self.sending.is_none()
            && self.installs.pending == 0
            && self.removals.pending == 0
    }

    pub fn preflight_done(&self) -> bool {
        self.preflight_done
    }

    /// The phase of the next batch the plan would give.
    pub fn next_phase(&self) -> Option<Phase> {
        self.plan.next_phase()
    }

    pub fn plan_done(&self) -> bool {
        self.plan.is_done()
    }

    /// Whether the submitter has work here: something to send, or a batch
    /// to reconcile (also after the job was canceled).
    /// A job waiting for licenses is not: the submitter checks those again
    /// when Apple reports license changes.
    pub fn wants_submitter(&self) -> bool {
        self.sending.is_some()
            || (matches!(self.state, JobState::Accepted | JobState::Running)
                && (!self.plan.is_done() || self.users_step_due())
                && self.waiting_for.is_none())
    }

    /// Gives a new record its place in creation order; done once, by the
    /// store that creates it.
    pub fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }

    pub fn status(&self, failures: Option<Vec<Failure>>, truncated: bool) -> JobStatus {
        JobStatus {
            id: self.id.clone(),
            token: self.token.clone(),
            state: self.state,
            error: self.error.clone(),
            requests: self.requests.clone(),
            assignments: self.assoc.counts(),
            disassociations: self.disassoc.counts(),
            installs: self.installs.clone(),
            revocations: self.revoc.counts(),
            removals: self.removals.clone(),
            users: self
                .users
                .as_ref()
                .map(UserProgress::counts)
                .unwrap_or_default(),
            waiting_for: self
                .waiting_for
                .clone()
                .filter(|_| self.state == JobState::Accepted),
            failures_truncated: failures.as_ref().map(|_| truncated).filter(|t| *t),
            failures,
            created_at: format_ms(self.created_ms),
            finished_at: self.finished_ms.map(format_ms),
        }
    }

    /// Applies a change that touches no batch; false when it changed nothing
    /// (a final job stays final).
    pub fn apply(&mut self, change: &JobChange, now: u64) -> bool {
        let changed = match change {
            JobChange::Start => {
                let start = self.state == JobState::Accepted;
                if start {
                    self.state = JobState::Running;
                }
                start
            }
            JobChange::PreflightPassed => {
                let first = !self.preflight_done || self.waiting_for.is_some();
                self.preflight_done = true;
                self.waiting_for = None;
                first
            }
            JobChange::Wait(message) => {
                let wait = self.state == JobState::Accepted
                    && self.waiting_for.as_deref() != Some(message.as_str());
                if wait {
                    self.waiting_for = Some(message.clone());
                }
                wait
            }
            JobChange::Fail(message) => self.finish(JobState::Failed, Some(message.clone()), now),
            JobChange::Cancel => {
                let canceled = self.finish(JobState::Canceled, None, now);
                if canceled {
                    // What is not yet submitted is never sent; the batch being
                    // sent (if any) is still counted until it is withdrawn.
                    self.plan = Plan::default();
                    self.requests.planned = self.next_batch as u64;
                }
                canceled
            }
            JobChange::UsersAssociated(users) => {
                self.users.as_mut().is_some_and(|u| u.associate(users) > 0)
            }
        };
        self.maybe_complete(now);
        changed
    }

    fn finish(&mut self, state: JobState, error: Option<String>, now: u64) -> bool {
        if self.state.is_final() {
            return false;
        }
        self.state = state;
        self.error = error;
        self.finished_ms = Some(now);
        true
    }

    /// Takes the next batch off the plan with the limits of this moment and
    /// records it as `Sending`. `None` when the job is final, has nothing
    /// left to send, or already has a batch being sent.
    pub fn start_batch(&mut self, shape: Shape, now: u64) -> Option<BatchRecord> {
        if self.state.is_final() || self.sending.is_some() {
            return None;
        }
        let batch = self.plan.next_batch(shape)?;
        let no = self.next_batch;
        self.next_batch += 1;
        self.sending = Some(no);
        self.open_batches += 1;
        self.requests.planned = self.next_batch as u64 + self.plan.remaining(shape);
        Some(BatchRecord::new(
            &self.id,
            &self.token,
            no,
            batch.phase,
            batch.rect,
            now,
        ))
    }

    /// Apple accepted the batch and gave `event_id`: `sending` → `sent` (a
    /// resent remainder adds its event to a batch already sent). False when
    /// the batch is decided or withdrawn, or not this job's.
    pub fn batch_sent(&mut self, batch: &mut BatchRecord, event_id: &str, now: u64) -> bool {
        if *batch.job_id() != self.id || !batch.mark_sent(event_id, now) {
            return false;
        }
        if self.sending == Some(batch.no()) {
            self.sending = None;
        }
        self.requests.submitted += 1;
        true
    }

    /// Apple refused the batch before taking it (over a limit, or the token
    /// refused): it goes back to the front of the plan, to be carved again
    /// with `shape`. True when the backend must now delete the batch record.
    pub fn return_batch(&mut self, batch: &BatchRecord, shape: Shape) -> bool {
        if *batch.job_id() != self.id
            || batch.state() != BatchState::Sending
            || !batch.events().is_empty()
            || self.sending != Some(batch.no())
        {
            return false;
        }
        self.plan.push_front(Batch {
            phase: batch.phase(),
            rect: batch.rect().clone(),
        });
        if self.next_batch == batch.no() + 1 {
            self.next_batch = batch.no();
        }
        self.sending = None;
        self.open_batches = self.open_batches.saturating_sub(1);
        self.requests.planned = self.next_batch as u64 + self.plan.remaining(shape);
        true
    }

    /// The job ended (canceled) while this batch was being sent, and what
    /// Apple did of it has been reconciled: the rest is never sent.
    /// `sending` → `withdrawn`. False unless the job is final and the batch
    /// is its `Sending` one.
    pub fn withdraw_batch(&mut self, batch: &mut BatchRecord, now: u64) -> bool {
        if *batch.job_id() != self.id
            || !self.state.is_final()
            || self.sending != Some(batch.no())
            || !batch.withdraw()
        {
            return false;
        }
        self.sending = None;
        self.open_batches = self.open_batches.saturating_sub(1);
        self.maybe_complete(now);
        true
    }

    /// Records decisions for pairs of one batch, once per pair (see the
    /// module invariants). `activity`: a sign of life from Apple (a
    /// notification), which postpones the status poll; `finished`: Apple's
    /// event status says the event is over.
    /// `revoked`: pairs Apple named as revoked by a revoke batch (its
    /// `decisions` are per target: the target's revoke is over).
    pub fn decide(
        &mut self,
        batch: &mut BatchRecord,
        decisions: &[(u32, Decision)],
        revoked: &[(Revoked, Decision)],
        activity: bool,
        finished: bool,
        now: u64,
    ) -> Decided {
        let mut out = Decided::default();
        if *batch.job_id() != self.id {
            return out;
        }
        let mut licenses: FastMap<AssetRef, i64> = FastMap::default();
        let (commands, held) = self.decide_pairs(batch, decisions, &mut out, &mut licenses);
        let revoked_commands = self.decide_revoked(batch, revoked, &mut licenses);
        out.licenses = licenses.into_iter().filter(|(_, d)| *d != 0).collect();
        if activity {
            batch.touch(now);
        }
        if finished {
            batch.mark_terminal(now);
        }
        let phase = batch.phase();
        let request_type = match phase {
            Phase::Associate => RequestType::InstallApplication,
            _ => RequestType::RemoveApplication,
        };
        let groups = commands.0.into_iter().chain(revoked_commands.0);
        let outboxed = self.entries(batch.no(), request_type, groups, now, &mut out.outbox);
        out.applied.outboxed = outboxed as u32;
        let installs = RequestType::InstallApplication;
        let n_held = self.entries(batch.no(), installs, held.0, now, &mut out.held);
        out.applied.held = n_held as u32;
        self.installs.pending += n_held;
        // A revoke batch's decisions are per target; its pairs were
        // counted as Apple named them.
        let tally = match phase {
            Phase::Associate => Some(&mut self.assoc),
            Phase::Disassociate => Some(&mut self.disassoc),
            Phase::Revoke => None,
        };
        if let Some(tally) = tally {
            tally.confirmed += out.applied.confirmed as u64;
            tally.failed += out.applied.failed as u64;
        }
        match request_type {
            RequestType::InstallApplication => self.installs.pending += outboxed,
            _ => self.removals.pending += outboxed,
        }
        if batch.close_if_decided() {
            self.open_batches = self.open_batches.saturating_sub(1);
            self.requests.completed += 1;
            // A batch every pair of which is decided has nothing left to send.
            if self.sending == Some(batch.no()) {
                self.sending = None;
            }
            out.applied.batch_decided = true;
        }
        let before = self.state;
        self.maybe_complete(now);
        if self.state != before {
            out.applied.job_state = Some(self.state);
        }
        out
    }

    /// [`JobRecord::decide`]'s pair decisions, each applied once: the
    /// counts and failures go to `out`, the licenses moved to `licenses`.
    /// Returns the commands the confirmations make, and the installs held
    /// for their users.
    fn decide_pairs(
        &self,
        batch: &mut BatchRecord,
        decisions: &[(u32, Decision)],
        out: &mut Decided,
        licenses: &mut FastMap<AssetRef, i64>,
    ) -> (ByEvent, ByEvent) {
        let mut commands = ByEvent::default();
        let mut held = ByEvent::default();
        let hold_users = self.users.is_some();
        let phase = batch.phase();
        for (pair, decision) in decisions {
            match decision {
                Decision::Confirmed { event_id } => {
                    if !batch.confirm(*pair) {
                        continue;
                    }
                    out.applied.confirmed += 1;
                    let (asset, target) = batch.rect().pair_at(*pair);
                    let asset = AssetRef::Index(asset);
                    match phase {
                        Phase::Associate => {
                            *licenses.entry(asset).or_default() += 1;
                            // A user's install waits until the user is
                            // `Associated`: the license is assigned, the
                            // app could not reach them yet.
                            let user = target.is_err();
                            if self.install && hold_users && user {
                                held.push(event_id, *pair);
                            } else if self.install {
                                commands.push(event_id, *pair);
                            }
                        }
                        Phase::Disassociate => {
                            *licenses.entry(asset).or_default() -= 1;
                            if self.uninstall {
                                commands.push(event_id, *pair);
                            }
                        }
                        // A target's revoke is over; its pairs come below.
                        Phase::Revoke => {}
                    }
                }
                Decision::Failed(f) => {
                    if !batch.fail(*pair) {
                        continue;
                    }
                    out.applied.failed += 1;
                    out.failures.push((*pair, f.clone()));
                }
            }
        }
        (commands, held)
    }

    /// [`JobRecord::decide`]'s revocations, each recorded once and counted;
    /// the licenses they freed go to `licenses`. Returns the removal
    /// commands they make.
    fn decide_revoked(
        &mut self,
        batch: &mut BatchRecord,
        revoked: &[(Revoked, Decision)],
        licenses: &mut FastMap<AssetRef, i64>,
    ) -> ByEvent {
        let mut commands = ByEvent::default();
        let (mut confirmed, mut failed) = (0u64, 0u64);
        for (r, decision) in revoked {
            let Some(at) = batch.add_revoked(r) else {
                continue;
            };
            match decision {
                Decision::Confirmed { event_id } => {
                    confirmed += 1;
                    *licenses
                        .entry(AssetRef::Named {
                            adam_id: r.adam_id.clone(),
                            pricing_param: r.pricing_param.clone(),
                        })
                        .or_default() -= 1;
                    if self.uninstall {
                        commands.push(event_id, at);
                    }
                }
                Decision::Failed(_) => failed += 1,
            }
        }
        self.revoc.total += confirmed + failed;
        self.revoc.confirmed += confirmed;
        self.revoc.failed += failed;
        commands
    }

    /// One outbox entry per event's commands, pushed to `entries`; returns
    /// how many commands they hold.
    fn entries(
        &self,
        batch: u32,
        request_type: RequestType,
        groups: impl IntoIterator<Item = (Option<Arc<str>>, Vec<u32>)>,
        now: u64,
        entries: &mut Vec<OutboxEntry>,
    ) -> u64 {
        let mut commands = 0u64;
        for (event_id, pairs) in groups {
            commands += pairs.len() as u64;
            entries.push(OutboxEntry {
                job_id: self.id.clone(),
                batch,
                request_type,
                event_id: event_id.map(|e| EventId::from(&*e)),
                pairs,
                confirmed_ms: now,
                invitations: Vec::new(),
            });
        }
        commands
    }

    /// Progress of the reconciliation of this job's `Sending` batch:
    /// `checked` pairs Apple was asked about, `done` when it is over (the
    /// checked set is then forgotten and the batch may be sent again).
    /// Committed with the decisions the same answers gave, so a crash never
    /// leaves a pair checked but its confirmation lost.
    pub fn note_reconciliation(&self, batch: &mut BatchRecord, checked: &[u32], done: bool) {
        if *batch.job_id() != self.id {
            return;
        }
        batch.note_checked(checked);
        if done {
            batch.end_reconciliation();
        }
    }

    /// The MDM acknowledged `n` commands of this job of one request type.
    /// Returns the job's new final state when that finished it.
    pub fn released(&mut self, n: u64, request_type: RequestType, now: u64) -> Option<JobState> {
        let counts = match request_type {
            RequestType::InstallApplication => &mut self.installs,
            RequestType::RemoveApplication => &mut self.removals,
            RequestType::InviteToProgram => {
                if let Some(u) = self.users.as_mut() {
                    u.invited(n);
                }
                let before = self.state;
                self.maybe_complete(now);
                return (self.state != before).then_some(self.state);
            }
        };
        counts.released += n;
        counts.pending = counts.pending.saturating_sub(n);
        let before = self.state;
        self.maybe_complete(now);
        (self.state != before).then_some(self.state)
    }

    /// The users step is over: `invitations` `InviteToProgram` commands are
    /// written to the outbox in the same commit, and `associated` (positions
    /// in [`JobSpec::job_users`]) are already `Associated`. False when the
    /// step was over already: the caller then writes nothing.
    pub fn users_ready(&mut self, invitations: u64, associated: &[u32], now: u64) -> bool {
        let Some(users) = self.users.as_mut() else {
            return false;
        };
        if self.state.is_final() || !users.make_ready(invitations) {
            return false;
        }
        users.associate(associated);
        self.maybe_complete(now);
        true
    }

    /// Held installs dropped because their user was retired: no longer
    /// pending. Returns the job's new final state when that finished it.
    pub fn held_dropped(&mut self, n: u64, now: u64) -> Option<JobState> {
        self.installs.pending = self.installs.pending.saturating_sub(n);
        let before = self.state;
        self.maybe_complete(now);
        (self.state != before).then_some(self.state)
    }

    /// Completed once nothing is left to send, decide or release.
    fn maybe_complete(&mut self, now: u64) {
        if matches!(self.state, JobState::Running | JobState::Accepted)
            && self.plan.is_done()
            && self.open_batches == 0
            && self.sending.is_none()
            && self.assoc.decided()
            && self.disassoc.decided()
            && self.installs.pending == 0
            && self.removals.pending == 0
            && self.users.as_ref().is_none_or(UserProgress::settled)
        {
            self.state = JobState::Completed;
            self.finished_ms = Some(now);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
