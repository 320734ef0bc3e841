//! What the long-running tasks share: the store, the token registry (each
//! token's Apple client, state and wake-ups), metrics, wake-up signals and
//! the one shutdown signal. Tasks own their own state and talk through the
//! store; a `Notify` only says "look again".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::runtime::config::{InstallConfig, TrackingConfig};
use crate::runtime::metrics::Metrics;
use crate::runtime::tokens::Registry;
use crate::store::{EventId, JobId, Store};

pub struct Context {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub tokens: Registry,
    pub tracking: TrackingConfig,
    pub install: InstallConfig,
    /// Notifications were recorded.
    pub wake_apply: Notify,
    /// Install commands entered the outbox.
    pub wake_release: Notify,
    /// Delivered commands are being acknowledged: the applier folds what
    /// the inbox holds now instead of lingering, and the store may carry
    /// the acknowledgement in that fold's commit ([`Store::ack_outbox`]).
    ///
    /// [`Store::ack_outbox`]: crate::store::Store::ack_outbox
    pub wake_fold: Notify,
    /// Both listeners are bound: with the store open, vppd is ready.
    pub listening: AtomicBool,
    /// The store's last probe wrote in time ([`crate::runtime::health`]).
    pub store_ok: AtomicBool,
    /// Users changed (a user notification applied, a users step done):
    /// held installs and waiting users steps look again.
    pub wake_users: Notify,
    pub draining: AtomicBool,
    /// Builds Apple clients for tokens added at run time.
    pub clients: Option<crate::runtime::tokens::ClientFactory>,
    /// Several replicas may share the store: token changes made through
    /// another replica are read back from it, and no wake-up crosses
    /// processes.
    pub shared_store: bool,
    /// A token was added, renewed or removed: the lease keeper looks again
    /// at once rather than at its next round.
    pub wake_leases: Notify,
    /// `[apple] max_events_in_flight`: a token's events unfinished at
    /// Apple at once, at most (the scheduler keeps it).
    pub max_events_in_flight: usize,
    /// Held by each token PUT and DELETE from its last look at the
    /// registry to its last write, and by each sync of the registry with
    /// the store, so that none of them interleave (the store and the
    /// registry would keep different sTokens, or a sync's earlier read
    /// would remove a token just added). A PUT asks Apple before taking
    /// it, so a holder waits only on the store.
    pub token_writes: tokio::sync::Mutex<()>,
    /// The events this process sent and their batches' indexes.
    pub sent: crate::runtime::sent::Sent,
    /// Every token's notification secret.
    pub secrets: crate::runtime::secrets::Secrets,
    /// Batches the tracker found PENDING past `tracking.resubmit_after`,
    /// waiting for their token's submitter to resubmit them.
    pub resubmissions: Resubmissions,
    shutdown: watch::Receiver<bool>,
}

impl Context {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        tracking: TrackingConfig,
        install: InstallConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Context {
        Context {
            tokens: Registry::new(metrics.clone()),
            max_events_in_flight: 2,
            wake_apply: Notify::new(),
            wake_release: Notify::new(),
            wake_fold: Notify::new(),
            listening: AtomicBool::new(false),
            store_ok: AtomicBool::new(true),
            wake_users: Notify::new(),
            draining: AtomicBool::new(false),
            clients: None,
            shared_store: false,
            wake_leases: Notify::new(),
            token_writes: tokio::sync::Mutex::new(()),
            sent: crate::runtime::sent::Sent::default(),
            secrets: crate::runtime::secrets::Secrets::new(None),
            resubmissions: Resubmissions::default(),
            store,
            metrics,
            tracking,
            install,
            shutdown,
        }
    }

    pub fn with_clients(mut self, factory: crate::runtime::tokens::ClientFactory) -> Context {
        self.clients = Some(factory);
        self
    }

    /// The older shared notification secret, accepted only as the
    /// upgrade path of [`crate::runtime::secrets`].
    pub fn with_legacy_secret(mut self, legacy: Option<&str>) -> Context {
        self.secrets = crate::runtime::secrets::Secrets::new(legacy);
        self
    }

    /// Replicas share the store (`[store] kind = "postgres"`).
    pub fn with_shared_store(mut self, shared: bool) -> Context {
        self.shared_store = shared;
        self.tokens.set_shared(shared);
        self
    }

    /// How long a task with nothing to do sleeps before looking again.
    /// Alone, every change that gives it work wakes it, so `alone` is only
    /// a safety net; with replicas, work submitted through another replica
    /// wakes nothing here, so it looks every few seconds.
    pub fn idle(&self, alone: Duration) -> Duration {
        if self.shared_store {
            alone.min(Duration::from_secs(5))
        } else {
            alone
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once shutdown is signalled.
    pub async fn shutdown_signal(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Sleeps, cut short by shutdown; false when shutting down.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.is_shutting_down(),
            _ = self.shutdown_signal() => false,
        }
    }

    /// Waits for `notify` or `timeout`, cut short by shutdown; false when shutting down.
    pub async fn wait(&self, notify: &Notify, timeout: Duration) -> bool {
        tokio::select! {
            _ = notify.notified() => !self.is_shutting_down(),
            _ = tokio::time::sleep(timeout) => !self.is_shutting_down(),
            _ = self.shutdown_signal() => false,
        }
    }

    /// The store is open (a Context is built around it) and the listeners
    /// are bound. No token's state counts: one broken customer token must
    /// not get the whole daemon restarted.
    /// Listening, and the store answers.
    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::SeqCst) && self.store_ok.load(Ordering::SeqCst)
    }

    pub fn wake_submitter(&self, token: &str) {
        if let Some(t) = self.tokens.get(token) {
            t.wake_submit.notify_one();
        }
    }

    /// License counts of `token` changed: waiting jobs are checked again.
    pub fn licenses_changed(&self, token: &str) {
        if let Some(t) = self.tokens.get(token) {
            t.licenses_changed.store(true, Ordering::SeqCst);
            t.wake_submit.notify_one();
        }
    }

    /// Something the token's drift follower should look at soon.
    pub fn wake_drift(&self, token: &str) {
        if let Some(t) = self.tokens.get(token) {
            t.wake_drift.notify_one();
        }
    }

    /// Asks the submitter of `token` to resubmit a batch whose event Apple
    /// left PENDING, and wakes it.
    pub fn resubmit(&self, token: &str, resubmission: Resubmission) {
        if self.resubmissions.ask(token, resubmission) {
            self.wake_submitter(token);
        }
    }

    pub fn wake_tracker(&self, token: &str) {
        if let Some(t) = self.tokens.get(token) {
            t.wake_track.notify_one();
        }
    }
}

/// A batch whose last event Apple left PENDING past
/// `tracking.resubmit_after`: its undecided pairs are to be sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resubmission {
    pub job_id: JobId,
    pub batch: u32,
    /// The event found PENDING. The batch is resubmitted only while this
    /// is still its last event: a resubmission made meanwhile answers the
    /// request.
    pub old_event: EventId,
}

/// The resubmissions the trackers ask for, per token, until its submitter
/// takes them: only the submitter sends management requests, so that a
/// resubmission leaves in the token's order and within its
/// `max_events_in_flight`.
///
/// Kept in memory only, on purpose: the tracker decides a resubmission
/// from durable state alone (the batch's last event, when it was sent,
/// and Apple's event status), so one lost to a crash or a lease moving
/// between the decision and the send is decided again by the next
/// tracker's poll of the same event.
#[derive(Debug, Default)]
pub struct Resubmissions {
    inner: Mutex<HashMap<String, Vec<Resubmission>>>,
}

impl Resubmissions {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Resubmission>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the request; false when the batch is already waiting.
    pub fn ask(&self, token: &str, resubmission: Resubmission) -> bool {
        let mut inner = self.lock();
        let waiting = inner.entry(token.to_string()).or_default();
        if waiting
            .iter()
            .any(|r| r.job_id == resubmission.job_id && r.batch == resubmission.batch)
        {
            return false;
        }
        waiting.push(resubmission);
        true
    }

    /// The requests waiting for `token`, oldest first.
    pub fn waiting(&self, token: &str) -> Vec<Resubmission> {
        self.lock().get(token).cloned().unwrap_or_default()
    }

    /// Takes a request off the list: it is being sent, or is moot.
    pub fn take(&self, token: &str, resubmission: &Resubmission) {
        let mut inner = self.lock();
        if let Some(waiting) = inner.get_mut(token) {
            waiting.retain(|r| r != resubmission);
            if waiting.is_empty() {
                inner.remove(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Resubmission, Resubmissions};

    fn asked(job: &str, batch: u32, old: &str) -> Resubmission {
        Resubmission {
            job_id: job.into(),
            batch,
            old_event: old.into(),
        }
    }

    #[test]
    fn a_batch_waits_once_per_token_until_taken() {
        let r = Resubmissions::default();
        assert!(r.ask("t", asked("j", 1, "e1")));
        assert!(
            !r.ask("t", asked("j", 1, "e1")),
            "asked again while waiting"
        );
        assert!(r.ask("t", asked("j", 2, "e2")));
        assert!(r.ask("u", asked("j", 1, "e1")), "another token's list");
        assert_eq!(
            r.waiting("t"),
            vec![asked("j", 1, "e1"), asked("j", 2, "e2")]
        );
        r.take("t", &asked("j", 1, "e1"));
        assert_eq!(r.waiting("t"), vec![asked("j", 2, "e2")]);
        assert!(
            r.ask("t", asked("j", 1, "e3")),
            "taken, it may be asked again"
        );
        r.take("t", &asked("j", 2, "e2"));
        r.take("t", &asked("j", 1, "e3"));
        assert!(r.waiting("t").is_empty());
        assert_eq!(r.waiting("u").len(), 1);
    }
}
