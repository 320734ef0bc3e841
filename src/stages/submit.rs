//! Sends each job's batches to Apple, one token at a time, each job's
//! batches strictly in plan order: Apple processes a token's requests in
//! arrival order, and the "disassociate, then associate" guarantee of a job
//! depends on it. Which job's batch goes next, and when, is the scheduler's
//! choice (`schedule.rs`): at most `max_events_in_flight` events unfinished
//! at Apple, high priority first, then round robin by job.
//!
//! Invariants kept here:
//! - A batch is recorded (state `Sending`) and flushed before its POST, and
//!   its eventId is recorded and flushed right after. A batch found in
//!   `Sending` (crash, or no answer from Apple) is reconciled against Get
//!   Assignments before only its unconfirmed remainder is sent again.
//! - At most one batch per token is in `Sending` at any time, and a new
//!   batch leaves only while fewer than `max_events_in_flight` of the
//!   token's events are unfinished at Apple.
//! - A batch Apple refuses for size (9700/9701/9702) goes back to the front of
//!   the plan and is split with the tighter shape, so nothing is skipped.
//! - Every management request of a token leaves from here: its batches,
//!   the users step of its jobs (`users`), and the resubmission of an event
//!   the tracker found PENDING too long (`resubmit`), which keeps its
//!   batch's place within `max_events_in_flight`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

pub use crate::apple::requests::{request_for, revoke_request_for};
use crate::apple::types::{Limits, UNLIMITED_COUNT};
use crate::apple::{AppleError, Client};
use crate::domain::job::{JobSpec, JobState, Phase, Priority};
use crate::domain::lifecycle::{
    BatchRecord, BatchState, Decision, FailureRecord, JobChange, JobRecord, now_ms,
};
use crate::domain::pairs::FastMap;
use crate::domain::plan::{Shape, shape_after_refusal};
use crate::domain::retry::Backoff;
use crate::domain::schedule::{Candidate, Footprint, RoundRobin, next_job};
use crate::runtime::context::{Context, Resubmission};
use crate::runtime::tokens::{Failure, Token};
use crate::runtime::user_records::UsersError;
use crate::store::{Decide, JobId, StoreError};

mod resubmit;
mod users;

/// Shapes learned from refusals, valid while Apple publishes the same limits.
struct Learned {
    published: Limits,
    shape: Shape,
}

struct Submitter {
    ctx: Arc<Context>,
    token: String,
    entry: Arc<Token>,
    client: Client,
    learned: Option<Learned>,
    rr: RoundRobin,
    /// By creation order, unique where a job id may come back after its
    /// job was pruned.
    footprints: FastMap<u64, (Arc<Footprint>, Priority)>,
    /// Whether two jobs (earlier, later) share a pair: specs never change.
    /// Looked up for every earlier unfinished job of every waiting job at
    /// each step, so a token with a thousand small jobs asks it hundreds
    /// of thousands of times a step: foldhash, and the answer read before
    /// the footprints are.
    shared: FastMap<(u64, u64), bool>,
    /// Some job of the token has work the scheduler could not start yet.
    busy: bool,
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Apple(#[from] AppleError),
    #[error("shutting down")]
    Shutdown,
    /// The token failed (or is registering again): its jobs wait.
    #[error("token not ready")]
    TokenNotReady,
}

/// Why a job cannot start (yet).
struct Blocked {
    message: String,
    /// Licenses fall short: a job with `waitForLicenses` waits for them.
    /// Otherwise (a refused token, an asset not device assignable) waiting
    /// would not help.
    licenses: bool,
    /// The assets short, for the metric.
    short_assets: usize,
}

/// How often jobs waiting for licenses are checked again without news
/// from Apple: with the limits, as the daemon reads Get Assets.
const WAITING_RECHECK: Duration = Duration::from_secs(300);

/// Runs the submitter of one token until shutdown or its removal. Idle, it
/// sleeps on the token's `Notify` (new job, cancel, state change).
pub async fn run(ctx: Arc<Context>, entry: Arc<Token>) {
    let token = entry.name().to_string();
    let mut s = Submitter {
        ctx: ctx.clone(),
        token: token.clone(),
        client: entry.client().clone(),
        entry: entry.clone(),
        learned: None,
        rr: RoundRobin::default(),
        footprints: FastMap::default(),
        shared: FastMap::default(),
        busy: false,
    };
    let mut last_recheck = tokio::time::Instant::now();
    loop {
        if ctx.is_shutting_down() || entry.is_removed() {
            return;
        }
        // Nothing is sent unless the token is ready: registered with Apple
        // (which must know where to send the notifications of what we
        // submit), not expired, revoked or taken over.
        if !entry.is_ready() {
            if !ctx.wait(&entry.wake_submit, ctx.idle(IDLE)).await {
                return;
            }
            continue;
        }
        let changed = entry
            .licenses_changed
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if changed || last_recheck.elapsed() >= WAITING_RECHECK {
            last_recheck = tokio::time::Instant::now();
            match s.recheck_waiting().await {
                Ok(()) => {}
                Err(StepError::Shutdown) => return,
                Err(error) => {
                    tracing::warn!(token = %token, %error, "cannot check jobs waiting for licenses")
                }
            }
        }
        let step = match s.next_step().await {
            Ok(step) => step,
            Err(error) => {
                tracing::error!(token = %token, %error, "cannot read jobs");
                if !ctx.sleep(Duration::from_secs(5)).await {
                    return;
                }
                continue;
            }
        };
        let Some(step) = step else {
            // Work waiting for a slot at Apple is woken by the event that
            // frees it; the shorter wait is a safety net. An idle token
            // sleeps until something wakes it.
            let wait = if s.busy { BUSY_RECHECK } else { ctx.idle(IDLE) };
            if !ctx.wait(&entry.wake_submit, wait).await {
                return;
            }
            continue;
        };
        let result = match step {
            Step::Reconcile(job) => s.reconcile_sending(job).await,
            Step::Resubmit(r) => s.resubmit(r).await,
            Step::Start(job) => s.start_job(job).await,
            Step::Send(job, candidate) => {
                s.rr.served(&candidate);
                s.send_next(job).await
            }
        };
        match result {
            Ok(()) | Err(StepError::TokenNotReady) => {}
            Err(StepError::Shutdown) => return,
            Err(error) => {
                tracing::error!(token = %token, %error, "error while submitting");
                if !ctx.sleep(Duration::from_secs(5)).await {
                    return;
                }
            }
        }
    }
}

/// How long an idle submitter sleeps without a wake-up: every change that
/// gives it work notifies it, so this is only a safety net.
const IDLE: Duration = Duration::from_secs(60);

/// How often a submitter whose jobs wait for a slot at Apple looks again
/// without a wake-up.
const BUSY_RECHECK: Duration = Duration::from_secs(5);

/// What the submitter does next for its token.
enum Step {
    /// A batch recorded as being sent when vppd stopped (or whose job was
    /// canceled): reconciled before anything else leaves.
    Reconcile(JobRecord),
    /// A batch the tracker found PENDING past `tracking.resubmit_after`:
    /// its undecided pairs leave again before any new batch.
    Resubmit(Resubmission),
    /// An accepted job: its license check, then `running`. Sends nothing.
    Start(JobRecord),
    /// The job's next batch, as the scheduler chose it.
    Send(JobRecord, Candidate),
}

/// Unfinished at Apple: the job still has batches to send, or events Apple
/// has not finished. A job sharing a pair with such an earlier one waits.
fn unfinished_at_apple(job: &JobRecord, unfinished_events: &HashSet<&JobId>) -> bool {
    !job.state().is_final() && (!job.plan_done() || unfinished_events.contains(job.id()))
}

impl Submitter {
    /// Reads the token's jobs and open batches from the store (so after a
    /// restart the accounting starts from what is still at Apple) and asks
    /// the scheduler what comes next.
    async fn next_step(&mut self) -> Result<Option<Step>, StoreError> {
        let store = self.ctx.store.clone();
        let jobs: Vec<JobRecord> = store.jobs_of(&self.token).await?;
        if let Some(job) = jobs.iter().find(|j| j.sending().is_some()) {
            return Ok(Some(Step::Reconcile(job.clone())));
        }
        let batches = store.open_batches(&self.token).await?;
        // An event is finished once every pair is decided (the batch is
        // then no longer open) or Apple's event status said so.
        let unfinished: Vec<&BatchRecord> = batches
            .iter()
            .filter(|b| b.token() == self.token && b.terminal_ms().is_none())
            .collect();
        let in_flight = unfinished.len();
        let (resubmission, resubmission_waits) = self.due_resubmission(&unfinished);
        if let Some(r) = resubmission {
            return Ok(Some(Step::Resubmit(r)));
        }
        let unfinished_events: HashSet<&JobId> = unfinished.iter().map(|b| b.job_id()).collect();
        let mut earlier: Vec<&JobRecord> = Vec::new();
        let mut candidates = Vec::new();
        for job in &jobs {
            if job.wants_submitter() {
                let (footprint, priority) = self.footprint(job).await?;
                let mut blocked = false;
                for e in &earlier {
                    if self.shares_pair(e, job.seq(), &footprint).await? {
                        blocked = true;
                        break;
                    }
                }
                if !blocked && job.state() == JobState::Accepted {
                    return Ok(Some(Step::Start(job.clone())));
                }
                candidates.push(Candidate {
                    seq: job.seq(),
                    priority,
                    ready: job.state() == JobState::Running,
                    blocked,
                });
            }
            if unfinished_at_apple(job, &unfinished_events) {
                earlier.push(job);
            }
        }
        self.busy = !candidates.is_empty() || resubmission_waits;
        let chosen = next_job(
            &candidates,
            in_flight,
            self.ctx.max_events_in_flight,
            &self.rr,
        );
        if self.footprints.len() > 4 * jobs.len() + 64 {
            self.footprints.clear();
            self.shared.clear();
        }
        Ok(chosen.and_then(|seq| {
            let job = jobs.iter().find(|j| j.seq() == seq)?;
            let candidate = candidates.iter().find(|c| c.seq == seq)?;
            Some(Step::Send(job.clone(), *candidate))
        }))
    }

    /// The pairs a job touches and its priority (its spec never changes).
    async fn footprint(
        &mut self,
        job: &JobRecord,
    ) -> Result<(Arc<Footprint>, Priority), StoreError> {
        if let Some(f) = self.footprints.get(&job.seq()) {
            return Ok(f.clone());
        }
        let f = match self.ctx.store.spec(job.id()).await? {
            Some(spec) => {
                let priority = spec.priority;
                (Arc::new(Footprint::of(spec)), priority)
            }
            None => (Arc::new(Footprint::default()), Priority::Normal),
        };
        self.footprints.insert(job.seq(), f.clone());
        Ok(f)
    }

    /// Whether the earlier job `a` shares a pair with the job of creation
    /// order `b` and footprint `fb`: from the memo, and `a`'s footprint is
    /// read only when the memo does not know.
    async fn shares_pair(
        &mut self,
        a: &JobRecord,
        b: u64,
        fb: &Footprint,
    ) -> Result<bool, StoreError> {
        let key = (a.seq(), b);
        if let Some(known) = self.shared.get(&key) {
            return Ok(*known);
        }
        let (fa, _) = self.footprint(a).await?;
        let shares = fa.shares_pair(fb);
        self.shared.insert(key, shares);
        Ok(shares)
    }

    fn shape(&mut self) -> Shape {
        let published = self.client.limits();
        let base = Shape::from(&published);
        match &self.learned {
            Some(l) if l.published == published => base.min(l.shape),
            _ => {
                self.learned = None;
                base
            }
        }
    }

    /// Licenses are checked before the job's first request of any kind:
    /// a job that would fail sends nothing.
    async fn start_job(&mut self, job: JobRecord) -> Result<(), StepError> {
        let store = self.ctx.store.clone();
        let Some(spec) = store.spec(job.id()).await? else {
            return Ok(());
        };
        if !self.entry.is_ready() {
            return Err(StepError::TokenNotReady);
        }
        if !self.entry.is_ready() {
            return Err(StepError::TokenNotReady);
        }
        if job.state() == JobState::Accepted {
            if !job.preflight_done() && !self.check_licenses(&spec).await? {
                return Ok(());
            }
            store.update_job(job.id(), JobChange::Start).await?;
            tracing::info!(job = %job.id(), token = %self.token, "job running");
        }
        Ok(())
    }

    async fn reconcile_sending(&mut self, job: JobRecord) -> Result<(), StepError> {
        let store = self.ctx.store.clone();
        let Some(spec) = store.spec(job.id()).await? else {
            return Ok(());
        };
        if !self.entry.is_ready() {
            return Err(StepError::TokenNotReady);
        }
        if let Some(no) = job.sending()
            && let Some(batch) = store.batch(job.id(), no).await?
            && batch.state() == BatchState::Sending
        {
            tracing::warn!(job = %job.id(), batch = no, "batch was being sent when vppd stopped, or its job was canceled; reconciling before anything is sent");
            self.reconcile(&spec, &batch).await?;
            // Reconciled just now: nothing of it has left since.
            self.send(&spec, no, false).await?;
        }
        Ok(())
    }

    /// Sends the job's next batch in its plan order; the job's users step
    /// goes right before its associations (after its disassociations and
    /// revokes).
    async fn send_next(&mut self, job: JobRecord) -> Result<(), StepError> {
        let store = self.ctx.store.clone();
        let Some(spec) = store.spec(job.id()).await? else {
            return Ok(());
        };
        if job.state().is_final() {
            return Ok(());
        }
        if !self.entry.is_ready() {
            return Err(StepError::TokenNotReady);
        }
        if job.users_step_due()
            && !matches!(job.next_phase(), Some(Phase::Disassociate | Phase::Revoke))
        {
            return self.users_step(&spec).await;
        }
        if job.plan_done() {
            return Ok(());
        }
        // A job stored before licenses were checked up front.
        if job.next_phase() == Some(Phase::Associate)
            && !job.preflight_done()
            && !self.check_licenses(&spec).await?
        {
            return Ok(());
        }
        let shape = self.shape();
        let Some(batch) = store.start_batch(job.id(), shape).await? else {
            return Ok(());
        };
        self.send(&spec, batch.no(), false).await
    }

    /// The users step of a job ([`users::ensure`]); a token Apple
    /// refuses fails the job, as for a batch.
    async fn users_step(&self, spec: &JobSpec) -> Result<(), StepError> {
        match users::ensure(&self.ctx, &self.client, spec).await {
            Ok(()) => Ok(()),
            Err(UsersError::Shutdown) => Err(StepError::Shutdown),
            Err(UsersError::Store(e)) => Err(e.into()),
            Err(UsersError::Apple(e)) if e.is_token_refused() => {
                tracing::error!(job = %spec.id, token = %self.token, error = %e, "Apple refuses the token");
                self.fail_job(
                    &spec.id,
                    format!("Apple refuses token `{}`: {e}", self.token),
                )
                .await?;
                Ok(())
            }
            Err(UsersError::Apple(e)) => Err(e.into()),
        }
    }

    /// Sends batch `no` (its undecided pairs) until Apple accepts it, it is
    /// split, or it is decided. `attempted`: a POST of it may already have
    /// reached Apple (it is then reconciled before being withdrawn).
    async fn send(&mut self, spec: &JobSpec, no: u32, attempted: bool) -> Result<(), StepError> {
        let store = self.ctx.store.clone();
        let mut retry = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
        let mut attempted = attempted;
        loop {
            if self.ctx.is_shutting_down() {
                return Err(StepError::Shutdown);
            }
            let Some(batch) = store.batch(&spec.id, no).await? else {
                return Ok(());
            };
            if batch.state() != BatchState::Sending {
                return Ok(());
            }
            // A job canceled while this batch was on its way: what Apple did
            // of it is reconciled, the rest is never sent.
            if store
                .job(&spec.id)
                .await?
                .is_none_or(|j| j.state().is_final())
            {
                if attempted {
                    self.reconcile(spec, &batch).await?;
                }
                if store.withdraw_batch(&spec.id, no).await? {
                    tracing::info!(job = %spec.id, batch = no, "job canceled while its batch was being sent; batch withdrawn, not resent");
                }
                return Ok(());
            }
            // A reconciliation cut short (a crash, Apple unreachable) is
            // finished first: its answers predate the POST below.
            if batch.reconciling() {
                self.reconcile(spec, &batch).await?;
                continue;
            }
            let pairs = batch.undecided() as u64;
            attempted = true;
            let result = match batch.phase() {
                Phase::Associate => self.client.associate(&request_for(spec, &batch)).await,
                Phase::Disassociate => self.client.disassociate(&request_for(spec, &batch)).await,
                Phase::Revoke => self.client.revoke(&revoke_request_for(spec, &batch)).await,
            };
            let error = match result {
                Ok(event) => {
                    store.batch_sent(&spec.id, no, &event.event_id).await?;
                    self.ctx.sent.sent(&event.event_id, &spec.id, no);
                    self.ctx
                        .metrics
                        .assignments
                        .with_label_values(&[batch.phase().as_str(), "submitted"])
                        .inc_by(pairs);
                    tracing::info!(job = %spec.id, batch = no, phase = batch.phase().as_str(), event_id = %event.event_id, pairs, "batch accepted by Apple");
                    self.ctx.wake_tracker(&self.token);
                    return Ok(());
                }
                Err(error) => error,
            };
            if let Some(refusal) = error.refusal() {
                tracing::warn!(job = %spec.id, batch = no, %error, "batch over Apple's limit; re-reading limits and splitting");
                if let Err(e) = self.client.refresh_limits().await {
                    tracing::warn!(error = %e, "cannot re-read service config");
                }
                let published = self.client.limits();
                let current = self.shape();
                let phase = batch.phase();
                let tighter = current.with_phase(
                    phase,
                    shape_after_refusal(batch.rect(), current.for_phase(phase), refusal),
                );
                self.learned = Some(Learned {
                    published,
                    shape: tighter,
                });
                store.return_batch(&spec.id, no, tighter).await?;
                return Ok(());
            }
            if let Some(failure) = Failure::from_apple(&error, self.client.expires_at()) {
                // Nothing of the batch was processed: it goes back to the
                // plan, and the job waits for the token to be renewed.
                tracing::error!(job = %spec.id, token = %self.token, %error, "Apple refuses the token; the job waits for it");
                let shape = self.shape();
                store.return_batch(&spec.id, no, shape).await?;
                self.ctx.tokens.set_failed(&self.entry, failure);
                return Err(StepError::TokenNotReady);
            }
            match &error {
                AppleError::UnknownOutcome { .. } | AppleError::Decode { .. } => {
                    tracing::warn!(job = %spec.id, batch = no, %error, "outcome unknown; reconciling before resending");
                    // Until Apple answers: nothing of the batch is sent
                    // again before it is reconciled.
                    self.reconcile(spec, &batch).await?;
                }
                AppleError::Transport { .. } | AppleError::Api { .. } if error.is_retryable() => {
                    let delay = retry.next_delay();
                    tracing::warn!(job = %spec.id, batch = no, %error, retry_in = ?delay, "Apple unreachable or busy; retrying the batch");
                    if !self.ctx.sleep(delay).await {
                        return Err(StepError::Shutdown);
                    }
                }
                _ => {
                    // A synchronous refusal of this request: nothing was
                    // processed and resending would fail the same way. Its
                    // pairs fail with Apple's error.
                    tracing::warn!(job = %spec.id, batch = no, %error, "Apple refused the batch; its pairs fail");
                    let reported = error.reported();
                    let failure = FailureRecord {
                        error_number: reported.as_ref().map(|e| e.number).unwrap_or(0),
                        error_message: reported
                            .map(|e| e.message)
                            .unwrap_or_else(|| error.to_string()),
                        event_id: None,
                    };
                    let decisions = batch
                        .undecided_pairs()
                        .map(|p| (p, Decision::Failed(failure.clone())))
                        .collect();
                    let applied = store
                        .decide(Decide {
                            job_id: spec.id.clone(),
                            batch: no,
                            decisions,
                            activity: false,
                            finished: false,
                            revoked: Vec::new(),
                            ..Default::default()
                        })
                        .await?;
                    self.ctx
                        .metrics
                        .assignments
                        .with_label_values(&[batch.phase().as_str(), "failed"])
                        .inc_by(applied.failed as u64);
                    return Ok(());
                }
            }
        }
    }

    /// The license check of a job not yet checked: passes it (true), or
    /// fails it, or (with `waitForLicenses`) leaves it waiting.
    async fn check_licenses(&self, spec: &JobSpec) -> Result<bool, StepError> {
        let store = &self.ctx.store;
        match self.preflight(spec).await? {
            Ok(()) => {
                store
                    .update_job(&spec.id, JobChange::PreflightPassed)
                    .await?;
                Ok(true)
            }
            Err(blocked) if blocked.licenses && spec.wait_for_licenses => {
                tracing::warn!(job = %spec.id, waiting_for = %blocked.message, "licenses fall short; the job waits for them");
                self.ctx
                    .metrics
                    .license_assets_short
                    .with_label_values(&[&self.token])
                    .set(blocked.short_assets as i64);
                store
                    .update_job(&spec.id, JobChange::Wait(blocked.message))
                    .await?;
                Ok(false)
            }
            Err(blocked) => {
                if blocked.licenses {
                    self.ctx
                        .metrics
                        .license_assets_short
                        .with_label_values(&[&self.token])
                        .set(blocked.short_assets as i64);
                }
                self.fail_job(&spec.id, blocked.message).await?;
                Ok(false)
            }
        }
    }

    /// Checks every job of this token waiting for licenses again, oldest
    /// first; those Apple now has enough for start.
    async fn recheck_waiting(&self) -> Result<(), StepError> {
        let waiting: Vec<JobRecord> = self
            .ctx
            .store
            .jobs()
            .await?
            .into_iter()
            .filter(|j| {
                j.token() == self.token
                    && j.state() == JobState::Accepted
                    && j.waiting_for().is_some()
            })
            .collect();
        if waiting.is_empty() {
            self.ctx
                .metrics
                .license_assets_short
                .with_label_values(&[&self.token])
                .set(0);
        }
        for job in waiting {
            let Some(spec) = self.ctx.store.spec(job.id()).await? else {
                continue;
            };
            if self.check_licenses(&spec).await? {
                tracing::info!(job = %job.id(), "licenses are there now; the job starts");
                self.ctx.wake_submitter(&self.token);
            }
        }
        Ok(())
    }

    async fn fail_job(&self, job_id: &JobId, message: String) -> Result<(), StoreError> {
        tracing::error!(job = %job_id, error = %message, "job failed");
        self.ctx
            .store
            .update_job(job_id, JobChange::Fail(message))
            .await?;
        Ok(())
    }

    /// Confirms, from Get Assignments, what a batch of unknown outcome
    /// already achieved, so that only the remainder is sent again (or, for a
    /// canceled job, withdrawn). Retried until Apple answers.
    async fn reconcile(&self, spec: &JobSpec, batch: &BatchRecord) -> Result<(), StepError> {
        loop {
            match self.reconcile_once(spec, batch).await {
                Ok(()) => return Ok(()),
                Err(StepError::Apple(error))
                    if let Some(failure) =
                        Failure::from_apple(&error, self.client.expires_at()) =>
                {
                    // Stays Sending: reconciled once the token is renewed.
                    self.ctx.tokens.set_failed(&self.entry, failure);
                    return Err(StepError::TokenNotReady);
                }
                Err(StepError::Apple(error)) => {
                    tracing::warn!(job = %spec.id, batch = batch.no(), %error, "assignment sync failed; retrying");
                    if !self.ctx.sleep(Duration::from_secs(5)).await {
                        return Err(StepError::Shutdown);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads Get Assignments for the batch's pairs not checked yet, one
    /// query at a time, and commits what each read settles (the pairs it
    /// confirms and the pairs it asked about) before the next: a crash
    /// loses at most one read, so a restart goes on where this one stopped
    /// instead of reading the whole batch again. The last commit ends the
    /// reconciliation, after which the batch may be sent again.
    async fn reconcile_once(&self, spec: &JobSpec, batch: &BatchRecord) -> Result<(), StepError> {
        let store = self.ctx.store.clone();
        // The stored batch, not the caller's copy: it knows what an earlier
        // run of this reconciliation already checked.
        let batch = store
            .batch(&spec.id, batch.no())
            .await?
            .unwrap_or_else(|| batch.clone());
        let pairs: Vec<u32> = batch.to_check().collect();
        let resumed = batch.reconciling();
        let (mut confirmed, mut checked) = (0u64, 0usize);
        for q in crate::runtime::sync::sync_queries(spec, &batch, &pairs) {
            if self.ctx.is_shutting_down() {
                return Err(StepError::Shutdown);
            }
            let present = crate::runtime::sync::read_query(&self.client, spec, &batch, &q).await?;
            let decisions = q
                .pairs
                .iter()
                .filter(|p| match batch.phase() {
                    Phase::Associate => present.contains(p),
                    Phase::Disassociate | Phase::Revoke => !present.contains(p),
                })
                .map(|p| (*p, Decision::Confirmed { event_id: None }))
                .collect();
            let applied = store
                .decide(Decide {
                    job_id: spec.id.clone(),
                    batch: batch.no(),
                    decisions,
                    checked: q.pairs.clone(),
                    ..Default::default()
                })
                .await?;
            checked += q.pairs.len();
            confirmed += applied.confirmed as u64;
            self.ctx
                .metrics
                .assignments
                .with_label_values(&[batch.phase().as_str(), "confirmed"])
                .inc_by(applied.confirmed as u64);
            if applied.outboxed > 0 {
                self.ctx.wake_release.notify_one();
            }
        }
        store
            .decide(Decide {
                job_id: spec.id.clone(),
                batch: batch.no(),
                reconciled: true,
                ..Default::default()
            })
            .await?;
        self.ctx
            .metrics
            .syncs
            .with_label_values(&[&self.token, "unknown_outcome"])
            .inc();
        tracing::info!(job = %spec.id, batch = batch.no(), checked, confirmed, resumed, "reconciled batch of unknown outcome");
        Ok(())
    }

    /// Checks licenses before the job's first request. Counted per asset:
    /// the associations that need a license (targets already holding one
    /// need none) against what is available plus what the job's own
    /// disassociations and revokes free (targets that hold one now).
    /// Returns `Ok(Err(..))` when the job cannot start.
    async fn preflight(&self, spec: &JobSpec) -> Result<Result<(), Blocked>, StepError> {
        let needed = spec.associate.len() as i64;
        if needed == 0 || spec.assets.is_empty() {
            return Ok(Ok(()));
        }
        let refused = |message: String| Blocked {
            message,
            licenses: false,
            short_assets: 0,
        };
        // One walk of the whole asset list costs a page per ~1000 assets; a
        // filtered read per asset costs a request each. Take the cheaper.
        let catalog = if spec.assets.len() > 2 {
            match self
                .read_assets(spec, &crate::apple::client::AssetsQuery::default())
                .await?
            {
                Ok(items) => Some(items),
                Err(message) => return Ok(Err(refused(message))),
            }
        } else {
            None
        };
        let mut shortfalls = Vec::new();
        let mut other = Vec::new();
        for asset in &spec.assets {
            let fetched;
            let items: &[crate::apple::types::ResponseAsset] = match &catalog {
                Some(items) => items,
                None => {
                    let query = crate::apple::client::AssetsQuery {
                        adam_id: Some(asset.adam_id.clone()),
                        pricing_param: Some(asset.pricing_param.clone()),
                    };
                    fetched = match self.read_assets(spec, &query).await? {
                        Ok(items) => items,
                        Err(message) => return Ok(Err(refused(message))),
                    };
                    &fetched
                }
            };
            let found = items
                .iter()
                .find(|a| a.adam_id == asset.adam_id && a.pricing_param == asset.pricing_param)
                .cloned();
            let Some(found) = found else {
                shortfalls.push(format!(
                    "asset {} ({}): {} licenses needed, 0 available (not owned by this location)",
                    asset.adam_id, asset.pricing_param, needed
                ));
                continue;
            };
            let record = crate::runtime::licenses::record_of(&found, now_ms());
            if let Err(e) = self
                .ctx
                .store
                .put_license(&self.token, &asset.adam_id, &asset.pricing_param, &record)
                .await
            {
                tracing::warn!(%e, "cannot store license counts");
            }
            if !spec.associate.serial_numbers.is_empty() && !found.device_assignable {
                other.push(format!(
                    "asset {} ({}): not device assignable, but the job assigns it to {} serial numbers",
                    asset.adam_id,
                    asset.pricing_param,
                    spec.associate.serial_numbers.len()
                ));
                continue;
            }
            if found.available_count == UNLIMITED_COUNT || found.total_count == UNLIMITED_COUNT {
                continue;
            }
            let available = found.available_count.max(0) as i64;
            if needed <= available {
                continue;
            }
            // Pairs that already hold a license need none, and the job's
            // own removals free some: count both before calling it a
            // shortfall (a job re-run, or a reassignment, must not fail).
            let held = match self.held_licenses(spec, asset, found.revocable).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(job = %spec.id, error = %e, "cannot read existing assignments; counting none");
                    Held::default()
                }
            };
            let need = needed - held.by_associate;
            let can = available + held.freed;
            if need > can {
                shortfalls.push(format!(
                    "asset {} ({}): {} licenses needed, {} available",
                    asset.adam_id, asset.pricing_param, need, can
                ));
            }
        }
        if let Err(e) = crate::runtime::licenses::update_low_metric(&self.ctx, &self.token).await {
            tracing::warn!(%e, "cannot update the license metric");
        }
        if !other.is_empty() {
            other.extend(shortfalls);
            return Ok(Err(refused(format!(
                "license check: {}",
                crate::domain::job::capped_list(&other, "; ")
            ))));
        }
        if shortfalls.is_empty() {
            return Ok(Ok(()));
        }
        if spec.allow_partial {
            tracing::warn!(job = %spec.id, shortfall = %crate::domain::job::capped_list(&shortfalls, "; "), "licenses fall short; going on because the job allows partial assignment");
            return Ok(Ok(()));
        }
        Ok(Err(Blocked {
            short_assets: shortfalls.len(),
            message: format!(
                "license shortfall: {}",
                crate::domain::job::capped_list(&shortfalls, "; ")
            ),
            licenses: true,
        }))
    }

    /// Get Assets, retried until it answers; when Apple refuses the token,
    /// the token fails and the job waits (`TokenNotReady`).
    async fn read_assets(
        &self,
        spec: &JobSpec,
        query: &crate::apple::client::AssetsQuery,
    ) -> Result<Result<Vec<crate::apple::types::ResponseAsset>, String>, StepError> {
        loop {
            match self.client.get_assets(query).await {
                Ok(walk) => return Ok(Ok(walk.items)),
                Err(e) if e.is_token_refused() => {
                    if let Some(failure) = Failure::from_apple(&e, self.client.expires_at()) {
                        self.ctx.tokens.set_failed(&self.entry, failure);
                    }
                    return Err(StepError::TokenNotReady);
                }
                Err(e) => {
                    tracing::warn!(job = %spec.id, error = %e, "cannot read assets for the license check; retrying");
                    if !self.ctx.sleep(Duration::from_secs(5)).await {
                        return Err(StepError::Shutdown);
                    }
                }
            }
        }
    }

    /// Who holds a license of `asset` among the job's targets.
    async fn held_licenses(
        &self,
        spec: &JobSpec,
        asset: &crate::domain::job::JobAsset,
        revocable: bool,
    ) -> Result<Held, AppleError> {
        let walk = self
            .client
            .get_assignments(&crate::apple::client::AssignmentsQuery {
                adam_id: Some(asset.adam_id.clone()),
                pricing_param: Some(asset.pricing_param.clone()),
                ..Default::default()
            })
            .await?;
        fn set(v: &[String]) -> HashSet<&str> {
            v.iter().map(String::as_str).collect()
        }
        let (assoc_s, assoc_u) = (
            set(&spec.associate.serial_numbers),
            set(&spec.associate.client_user_ids),
        );
        let (dis_s, dis_u) = (
            set(&spec.disassociate.serial_numbers),
            set(&spec.disassociate.client_user_ids),
        );
        let (rev_s, rev_u) = (
            set(&spec.revoke.serial_numbers),
            set(&spec.revoke.client_user_ids),
        );
        let mut held = Held::default();
        for a in &walk.items {
            let s = a.serial_number.as_deref();
            let u = a.client_user_id.as_deref();
            let is = |ss: &HashSet<&str>, us: &HashSet<&str>| {
                s.is_some_and(|s| ss.contains(s)) || u.is_some_and(|u| us.contains(u))
            };
            let revoked = revocable && is(&rev_s, &rev_u);
            if is(&assoc_s, &assoc_u) && !revoked {
                held.by_associate += 1;
            } else if is(&dis_s, &dis_u) || revoked {
                held.freed += 1;
            }
        }
        Ok(held)
    }
}

/// Licenses of one asset the job's targets hold now.
#[derive(Default)]
struct Held {
    /// By targets the job associates: they need no new license.
    by_associate: i64,
    /// By targets the job disassociates or revokes: freed before its
    /// associations (Apple processes a token's requests in order).
    freed: i64,
}
