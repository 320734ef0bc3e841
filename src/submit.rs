//! Sends each job's batches to Apple, one token at a time, strictly in plan
//! order: Apple processes a token's requests in arrival order, and the
//! "disassociate, then associate" guarantee of a job depends on it.
//!
//! Invariants kept here:
//! - A batch is recorded (state `Sending`) and flushed before its POST, and
//!   its eventId is recorded and flushed right after. A batch found in
//!   `Sending` (crash, or no answer from Apple) is reconciled against Get
//!   Assignments before only its unconfirmed remainder is sent again.
//! - At most one batch per token is in `Sending` at any time.
//! - A batch Apple refuses for size (9700/9701/9702) goes back to the front of
//!   the plan and is split with the tighter shape, so nothing is skipped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::apple::types::{Asset, Limits, ManageAssetsRequest, UNLIMITED_COUNT};
use crate::apple::{AppleError, Client};
use crate::context::Context;
use crate::job::{JobSpec, JobState, Phase};
use crate::plan::{Batch, Shape, shape_after_refusal};
use crate::store::{
    BatchRecord, BatchState, Decision, FailureRecord, JobRecord, StoreError, now_ms,
};
use crate::track::{BatchIndex, sync_pairs};

/// Shapes learned from refusals, valid while Apple publishes the same limits.
struct Learned {
    published: Limits,
    shape: Shape,
}

struct Submitter {
    ctx: Arc<Context>,
    token: String,
    client: Client,
    learned: Option<Learned>,
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("shutting down")]
    Shutdown,
}

/// Runs the submitter of one token until shutdown.
pub async fn run(ctx: Arc<Context>, token: String) {
    let Some(client) = ctx.clients.get(&token).cloned() else {
        return;
    };
    let Some(wake) = ctx.wake_submit.get(&token).cloned() else {
        return;
    };
    let mut s = Submitter {
        ctx: ctx.clone(),
        token: token.clone(),
        client,
        learned: None,
    };
    // Nothing is sent before the token is registered with Apple: Apple must
    // know where to send the notifications of what we submit.
    while !ctx
        .registered
        .get(&token)
        .is_some_and(|r| r.load(std::sync::atomic::Ordering::SeqCst))
    {
        if !ctx.sleep(Duration::from_millis(200)).await {
            return;
        }
    }
    loop {
        if ctx.is_shutting_down() {
            return;
        }
        let next = match s.next_job() {
            Ok(j) => j,
            Err(error) => {
                tracing::error!(token = %token, %error, "cannot read jobs");
                if !ctx.sleep(Duration::from_secs(5)).await {
                    return;
                }
                continue;
            }
        };
        let Some(job) = next else {
            if !ctx.wait(&wake, Duration::from_secs(5)).await {
                return;
            }
            continue;
        };
        match s.run_job(job).await {
            Ok(()) => {}
            Err(StepError::Shutdown) => return,
            Err(StepError::Store(error)) => {
                tracing::error!(token = %token, %error, "store error while submitting");
                if !ctx.sleep(Duration::from_secs(5)).await {
                    return;
                }
            }
        }
    }
}

impl Submitter {
    /// The oldest job of this token with something left to send.
    fn next_job(&self) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.ctx.store.jobs()?.into_iter().find(|j| {
            j.token == self.token
                && matches!(j.state, JobState::Accepted | JobState::Running)
                && (!j.plan.is_done() || j.sending.is_some())
        }))
    }

    fn shape(&mut self) -> Shape {
        let published = self.client.limits();
        let base = Shape::from_limits(&published);
        match &self.learned {
            Some(l) if l.published == published => base.min(l.shape),
            _ => {
                self.learned = None;
                base
            }
        }
    }

    async fn run_job(&mut self, job: JobRecord) -> Result<(), StepError> {
        let store = self.ctx.store.clone();
        let Some(spec) = store.spec(&job.id)? else {
            return Ok(());
        };
        if job.state == JobState::Accepted {
            store.update_job(&job.id, |j| {
                if j.state == JobState::Accepted {
                    j.state = JobState::Running;
                }
            })?;
            tracing::info!(job = %job.id, token = %self.token, "job running");
        }
        if let Some(no) = job.sending
            && let Some(batch) = store.batch(&job.id, no)?
            && batch.state == BatchState::Sending
        {
            tracing::warn!(job = %job.id, batch = no, "batch was being sent when vppd stopped; reconciling before resending");
            self.reconcile(&spec, &batch).await?;
            self.send(&spec, no).await?;
        }
        loop {
            if self.ctx.is_shutting_down() {
                return Err(StepError::Shutdown);
            }
            let Some(job) = store.job(&job.id)? else {
                return Ok(());
            };
            if job.state.is_final() || job.plan.is_done() {
                return Ok(());
            }
            if job.plan.next_phase() == Some(Phase::Associate) && !job.preflight_done {
                match self.preflight(&spec).await? {
                    Ok(()) => {
                        store.update_job(&job.id, |j| j.preflight_done = true)?;
                    }
                    Err(message) => {
                        self.fail_job(&job.id, message)?;
                        return Ok(());
                    }
                }
            }
            let shape = self.shape();
            let Some(no) = self.carve(&job.id, shape)? else {
                return Ok(());
            };
            self.send(&spec, no).await?;
        }
    }

    /// Takes the next batch off the job's plan and records it as `Sending`.
    fn carve(&self, job_id: &str, shape: Shape) -> Result<Option<u32>, StepError> {
        let store = &self.ctx.store;
        let created = store.tx(|tx| {
            let Some(mut job) = tx.job(job_id)? else {
                return Ok(None);
            };
            if job.state.is_final() {
                return Ok(None);
            }
            let Some(batch) = job.plan.next_batch(shape) else {
                return Ok(None);
            };
            let no = job.next_batch;
            job.next_batch += 1;
            job.sending = Some(no);
            job.open_batches += 1;
            job.requests.planned = job.next_batch as u64 + job.plan.remaining(shape);
            let record = BatchRecord::new(&job, no, batch.phase, batch.rect);
            tx.put_batch(&record)?;
            tx.put_job(&job)?;
            Ok(Some(no))
        })?;
        Ok(created)
    }

    /// Sends batch `no` (its undecided pairs) until Apple accepts it, it is
    /// split, or it is decided.
    async fn send(&mut self, spec: &JobSpec, no: u32) -> Result<(), StepError> {
        let store = self.ctx.store.clone();
        let mut retry_delay = Duration::from_secs(2);
        loop {
            if self.ctx.is_shutting_down() {
                return Err(StepError::Shutdown);
            }
            let Some(batch) = store.batch(&spec.id, no)? else {
                return Ok(());
            };
            if batch.undecided() == 0 || batch.state == BatchState::Decided {
                self.clear_sending(&spec.id, no)?;
                return Ok(());
            }
            // Durable before it leaves: after a crash we must know it may have.
            store.flush().await?;
            let request = request_for(spec, &batch);
            let pairs = batch.undecided() as u64;
            let result = match batch.phase {
                Phase::Associate => self.client.associate(&request).await,
                Phase::Disassociate => self.client.disassociate(&request).await,
            };
            match result {
                Ok(event) => {
                    let event_id = event.event_id.clone();
                    store.tx(|tx| {
                        let Some(mut b) = tx.batch(&spec.id, no)? else {
                            return Ok(());
                        };
                        let Some(mut job) = tx.job(&spec.id)? else {
                            return Ok(());
                        };
                        let now = now_ms();
                        if b.state == BatchState::Sending {
                            b.state = BatchState::Sent;
                        }
                        b.events.push(event_id.clone());
                        b.sent_ms = now;
                        b.last_activity_ms = now;
                        b.terminal_ms = None;
                        b.next_poll_ms = 0;
                        job.sending = None;
                        job.requests.submitted += 1;
                        tx.put_event(
                            &event_id,
                            &crate::store::EventRef {
                                job_id: spec.id.clone(),
                                batch: no,
                            },
                        )?;
                        tx.put_batch(&b)?;
                        tx.put_job(&job)?;
                        Ok(())
                    })?;
                    store.flush().await?;
                    self.ctx
                        .metrics
                        .assignments
                        .with_label_values(&[batch.phase.as_str(), "submitted"])
                        .inc_by(pairs);
                    tracing::info!(job = %spec.id, batch = no, phase = batch.phase.as_str(), event_id = %event.event_id, pairs, "batch accepted by Apple");
                    self.ctx.wake_tracker(&self.token);
                    return Ok(());
                }
                Err(error) => {
                    let code = error.error_number();
                    if matches!(code, Some(9700..=9702)) && error.status() != Some(200) {
                        tracing::warn!(job = %spec.id, batch = no, %error, "batch over Apple's limit; re-reading limits and splitting");
                        if let Err(e) = self.client.refresh_limits().await {
                            tracing::warn!(error = %e, "cannot re-read service config");
                        }
                        let published = self.client.limits();
                        let current = self.shape();
                        let tighter = shape_after_refusal(&batch.rect, current, code.unwrap_or(0));
                        self.learned = Some(Learned {
                            published,
                            shape: tighter,
                        });
                        self.return_to_plan(&spec.id, &batch, tighter)?;
                        return Ok(());
                    }
                    if error.is_token_refused() {
                        tracing::error!(job = %spec.id, token = %self.token, %error, "Apple refuses the token");
                        let shape = self.shape();
                        self.return_to_plan(&spec.id, &batch, shape)?;
                        self.fail_job(
                            &spec.id,
                            format!("Apple refuses token `{}`: {error}", self.token),
                        )?;
                        return Ok(());
                    }
                    match &error {
                        AppleError::UnknownOutcome { .. } | AppleError::Decode { .. } => {
                            tracing::warn!(job = %spec.id, batch = no, %error, "outcome unknown; reconciling before resending");
                            if let Err(e) = self.reconcile(spec, &batch).await {
                                tracing::warn!(error = %e, "reconcile failed; will retry");
                                if !self.ctx.sleep(retry_delay).await {
                                    return Err(StepError::Shutdown);
                                }
                                retry_delay = (retry_delay * 2).min(Duration::from_secs(60));
                            }
                        }
                        AppleError::Transport { .. } => {
                            tracing::warn!(job = %spec.id, batch = no, %error, retry_in = ?retry_delay, "Apple unreachable; retrying the batch");
                            if !self.ctx.sleep(retry_delay).await {
                                return Err(StepError::Shutdown);
                            }
                            retry_delay = (retry_delay * 2).min(Duration::from_secs(60));
                        }
                        AppleError::Api { .. } if error.is_retryable() => {
                            tracing::warn!(job = %spec.id, batch = no, %error, retry_in = ?retry_delay, "Apple busy; retrying the batch");
                            if !self.ctx.sleep(retry_delay).await {
                                return Err(StepError::Shutdown);
                            }
                            retry_delay = (retry_delay * 2).min(Duration::from_secs(60));
                        }
                        AppleError::Api { error: body, .. } => {
                            // A synchronous refusal of this request: nothing
                            // was processed and resending would fail the same
                            // way. Its pairs fail with Apple's error.
                            tracing::warn!(job = %spec.id, batch = no, %error, "Apple refused the batch; its pairs fail");
                            let failure = FailureRecord {
                                error_number: body.error_number,
                                error_message: body.error_message.clone(),
                                event_id: None,
                            };
                            let decisions: Vec<(u32, Decision)> = (0..batch.pairs())
                                .filter(|p| !batch.is_decided_pair(*p))
                                .map(|p| (p, Decision::Failed(failure.clone())))
                                .collect();
                            let applied = store.tx(|tx| {
                                let a = tx.decide(&spec.id, no, &decisions, false)?;
                                if let Some(mut job) = tx.job(&spec.id)? {
                                    job.sending = None;
                                    tx.put_job(&job)?;
                                }
                                Ok(a)
                            })?;
                            self.ctx
                                .metrics
                                .assignments
                                .with_label_values(&[batch.phase.as_str(), "failed"])
                                .inc_by(applied.failed as u64);
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    fn clear_sending(&self, job_id: &str, no: u32) -> Result<(), StoreError> {
        self.ctx.store.update_job(job_id, |j| {
            if j.sending == Some(no) {
                j.sending = None;
            }
        })?;
        Ok(())
    }

    /// Puts a batch that was not accepted back at the front of the plan
    /// (to be split with a tighter shape, or left there when the job fails).
    fn return_to_plan(
        &self,
        job_id: &str,
        batch: &BatchRecord,
        shape: Shape,
    ) -> Result<(), StoreError> {
        let key = batch.key();
        self.ctx.store.tx(|tx| {
            let Some(mut job) = tx.job(job_id)? else {
                return Ok(());
            };
            job.plan.push_front(Batch {
                phase: batch.phase,
                rect: batch.rect.clone(),
            });
            if job.next_batch == batch.no + 1 {
                job.next_batch = batch.no;
            }
            job.sending = None;
            job.open_batches = job.open_batches.saturating_sub(1);
            job.requests.planned = job.next_batch as u64 + job.plan.remaining(shape);
            tx.remove_batch(&key)?;
            tx.put_job(&job)?;
            Ok(())
        })
    }

    fn fail_job(&self, job_id: &str, message: String) -> Result<(), StoreError> {
        tracing::error!(job = %job_id, error = %message, "job failed");
        self.ctx.store.update_job(job_id, |j| {
            if !j.state.is_final() {
                j.state = JobState::Failed;
                j.error = Some(message.clone());
                j.finished_ms = Some(now_ms());
            }
        })?;
        Ok(())
    }

    /// Confirms, from Get Assignments, what a batch of unknown outcome
    /// already achieved, so that only the remainder is sent again.
    async fn reconcile(&self, spec: &JobSpec, batch: &BatchRecord) -> Result<(), StepError> {
        let pairs: Vec<u32> = (0..batch.pairs())
            .filter(|p| !batch.is_decided_pair(*p))
            .collect();
        let index = BatchIndex::new(spec, batch);
        let present = loop {
            match sync_pairs(&self.client, spec, batch, &index, &pairs).await {
                Ok(p) => break p,
                Err(error) => {
                    tracing::warn!(job = %spec.id, batch = batch.no, %error, "assignment sync failed; retrying");
                    if !self.ctx.sleep(Duration::from_secs(5)).await {
                        return Err(StepError::Shutdown);
                    }
                }
            }
        };
        let decisions: Vec<(u32, Decision)> = pairs
            .iter()
            .filter(|p| match batch.phase {
                Phase::Associate => present.contains(p),
                Phase::Disassociate => !present.contains(p),
            })
            .map(|p| (*p, Decision::Confirmed { event_id: None }))
            .collect();
        let applied = self
            .ctx
            .store
            .tx(|tx| tx.decide(&spec.id, batch.no, &decisions, false))?;
        self.ctx
            .metrics
            .syncs
            .with_label_values(&[&self.token, "unknown_outcome"])
            .inc();
        self.ctx
            .metrics
            .assignments
            .with_label_values(&[batch.phase.as_str(), "confirmed"])
            .inc_by(applied.confirmed as u64);
        if applied.outboxed > 0 {
            self.ctx.wake_release.notify_one();
        }
        tracing::info!(job = %spec.id, batch = batch.no, confirmed = applied.confirmed, "reconciled batch of unknown outcome");
        Ok(())
    }

    /// Checks licenses before the first association of a job. Returns
    /// `Ok(Err(message))` when the job cannot go on.
    async fn preflight(&self, spec: &JobSpec) -> Result<Result<(), String>, StepError> {
        let needed = spec.associate.len() as i64;
        if needed == 0 {
            return Ok(Ok(()));
        }
        // Licenses the job's own disassociations will still free.
        let mut freed: HashMap<u32, i64> = HashMap::new();
        for b in self.ctx.store.batches_of(&spec.id)? {
            if b.phase != Phase::Disassociate {
                continue;
            }
            for p in 0..b.pairs() {
                if !b.is_decided_pair(p) {
                    let (asset, _) = b.rect.pair_at(p);
                    *freed.entry(asset).or_default() += 1;
                }
            }
        }
        // One walk of the whole asset list costs a page per ~1000 assets; a
        // filtered read per asset costs a request each. Take the cheaper.
        let catalog = if spec.assets.len() > 2 {
            match self
                .read_assets(spec, &crate::apple::client::AssetsQuery::default())
                .await?
            {
                Ok(items) => Some(items),
                Err(message) => return Ok(Err(message)),
            }
        } else {
            None
        };
        let mut shortfalls = Vec::new();
        for (i, asset) in spec.assets.iter().enumerate() {
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
                        Err(message) => return Ok(Err(message)),
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
                    "asset {} ({}): not owned by this location, {} licenses needed",
                    asset.adam_id, asset.pricing_param, needed
                ));
                continue;
            };
            let _ = self.ctx.store.put_license(
                &self.token,
                &asset.adam_id,
                &asset.pricing_param,
                &serde_json::json!({
                    "assignedCount": found.assigned_count,
                    "availableCount": found.available_count,
                    "totalCount": found.total_count,
                    "readMs": now_ms(),
                }),
            );
            if !spec.associate.serial_numbers.is_empty() && !found.device_assignable {
                shortfalls.push(format!(
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
            let available =
                found.available_count.max(0) as i64 + freed.get(&(i as u32)).copied().unwrap_or(0);
            if needed <= available {
                continue;
            }
            // Pairs that already hold a license need none: count them before
            // calling it a shortfall (a job re-run must not fail).
            let held = match self
                .held_licenses(spec, &asset.adam_id, &asset.pricing_param)
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(job = %spec.id, error = %e, "cannot read existing assignments; counting none");
                    0
                }
            };
            let short = needed - held - available;
            if short > 0 {
                shortfalls.push(format!(
                    "asset {} ({}): {} licenses needed, {} available: short by {}",
                    asset.adam_id,
                    asset.pricing_param,
                    needed - held,
                    available,
                    short
                ));
            }
        }
        if shortfalls.is_empty() {
            return Ok(Ok(()));
        }
        if spec.allow_partial {
            tracing::warn!(job = %spec.id, shortfall = %shortfalls.join("; "), "licenses fall short; going on because the job allows partial assignment");
            return Ok(Ok(()));
        }
        Ok(Err(format!("license shortfall: {}", shortfalls.join("; "))))
    }

    /// Get Assets, retried until it answers; `Ok(Err(..))` when Apple
    /// refuses the token.
    async fn read_assets(
        &self,
        spec: &JobSpec,
        query: &crate::apple::client::AssetsQuery,
    ) -> Result<Result<Vec<crate::apple::types::ResponseAsset>, String>, StepError> {
        loop {
            match self.client.get_assets(query).await {
                Ok(walk) => return Ok(Ok(walk.items)),
                Err(e) if e.is_token_refused() => {
                    return Ok(Err(format!("Apple refuses token `{}`: {e}", self.token)));
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

    async fn held_licenses(
        &self,
        spec: &JobSpec,
        adam_id: &str,
        pricing: &str,
    ) -> Result<i64, AppleError> {
        let walk = self
            .client
            .get_assignments(&crate::apple::client::AssignmentsQuery {
                adam_id: Some(adam_id.to_string()),
                pricing_param: Some(pricing.to_string()),
                ..Default::default()
            })
            .await?;
        let serials: HashSet<&str> = spec
            .associate
            .serial_numbers
            .iter()
            .map(String::as_str)
            .collect();
        let users: HashSet<&str> = spec
            .associate
            .client_user_ids
            .iter()
            .map(String::as_str)
            .collect();
        Ok(walk
            .items
            .iter()
            .filter(|a| {
                a.serial_number
                    .as_deref()
                    .is_some_and(|s| serials.contains(s))
                    || a.client_user_id
                        .as_deref()
                        .is_some_and(|u| users.contains(u))
            })
            .count() as i64)
    }
}

/// The request for a batch: the assets and targets that still have an
/// undecided pair (the whole rect for a fresh batch).
pub fn request_for(spec: &JobSpec, batch: &BatchRecord) -> ManageAssetsRequest {
    let rect = &batch.rect;
    let n_targets = rect.n_targets();
    let mut asset_open = vec![false; rect.n_assets() as usize];
    let mut target_open = vec![false; n_targets as usize];
    for p in 0..batch.pairs() {
        if !batch.is_decided_pair(p) {
            asset_open[(p / n_targets.max(1)) as usize] = true;
            target_open[(p % n_targets.max(1)) as usize] = true;
        }
    }
    let targets = spec.targets(batch.phase);
    let assets = asset_open
        .iter()
        .enumerate()
        .filter(|(_, open)| **open)
        .filter_map(|(i, _)| spec.assets.get(rect.assets.start as usize + i))
        .map(|a| Asset::new(a.adam_id.clone(), a.pricing_param.clone()))
        .collect();
    let mut serials = Vec::new();
    let mut users = Vec::new();
    for (t, open) in target_open.iter().enumerate() {
        if !open {
            continue;
        }
        let t = t as u32;
        if t < rect.n_serials() {
            if let Some(s) = targets
                .serial_numbers
                .get((rect.serials.start + t) as usize)
            {
                serials.push(s.clone());
            }
        } else if let Some(u) = targets
            .client_user_ids
            .get((rect.users.start + t - rect.n_serials()) as usize)
        {
            users.push(u.clone());
        }
    }
    ManageAssetsRequest {
        assets,
        serial_numbers: (!serials.is_empty()).then_some(serials),
        client_user_ids: (!users.is_empty()).then_some(users),
    }
}
