//! What the long-running tasks share: the store, the Apple clients, metrics,
//! wake-up signals and the one shutdown signal. Tasks own their own state and
//! talk through the store; a `Notify` only says "look again".

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::apple::Client;
use crate::config::{InstallConfig, TrackingConfig};
use crate::metrics::Metrics;
use crate::store::Store;

pub struct Context {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub clients: HashMap<String, Client>,
    pub tracking: TrackingConfig,
    pub install: InstallConfig,
    /// Per token: new work for the submitter.
    pub wake_submit: HashMap<String, Arc<Notify>>,
    /// Per token: a batch was sent, the tracker should look.
    pub wake_track: HashMap<String, Arc<Notify>>,
    /// Notifications were recorded.
    pub wake_apply: Notify,
    /// Install commands entered the outbox.
    pub wake_release: Notify,
    /// Per token: Apple reported license changes (ASSET_COUNT, or a fresh
    /// Get Assets): jobs waiting for licenses are checked again.
    pub licenses_changed: HashMap<String, AtomicBool>,
    /// Tokens whose client config registration is done.
    pub registered: HashMap<String, AtomicBool>,
    pub draining: AtomicBool,
    /// Several replicas may share the store: readiness no longer waits for
    /// tokens this replica may never work.
    pub shared_store: bool,
    /// `[apple] max_events_in_flight`: a token's events unfinished at
    /// Apple at once, at most (the scheduler keeps it).
    pub max_events_in_flight: usize,
    /// Per token: a notification for an event vppd did not send arrived;
    /// drift is read again soon.
    pub wake_drift: HashMap<String, Arc<Notify>>,
    shutdown: watch::Receiver<bool>,
}

impl Context {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        clients: HashMap<String, Client>,
        tracking: TrackingConfig,
        install: InstallConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Context {
        let names: Vec<String> = clients.keys().cloned().collect();
        Context {
            wake_submit: names
                .iter()
                .map(|n| (n.clone(), Arc::new(Notify::new())))
                .collect(),
            wake_track: names
                .iter()
                .map(|n| (n.clone(), Arc::new(Notify::new())))
                .collect(),
            licenses_changed: names
                .iter()
                .map(|n| (n.clone(), AtomicBool::new(false)))
                .collect(),
            registered: names
                .iter()
                .map(|n| (n.clone(), AtomicBool::new(false)))
                .collect(),
            wake_drift: names
                .iter()
                .map(|n| (n.clone(), Arc::new(Notify::new())))
                .collect(),
            max_events_in_flight: 2,
            wake_apply: Notify::new(),
            wake_release: Notify::new(),
            draining: AtomicBool::new(false),
            shared_store: false,
            store,
            metrics,
            clients,
            tracking,
            install,
            shutdown,
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

    pub fn is_ready(&self) -> bool {
        // The store is open by construction: a Context is built around it.
        if self.shared_store {
            return true;
        }
        !self.registered.is_empty() && self.registered.values().all(|r| r.load(Ordering::SeqCst))
    }

    pub fn wake_submitter(&self, token: &str) {
        if let Some(n) = self.wake_submit.get(token) {
            n.notify_one();
        }
    }

    /// License counts of `token` changed: waiting jobs are checked again.
    pub fn licenses_changed(&self, token: &str) {
        if let Some(flag) = self.licenses_changed.get(token) {
            flag.store(true, Ordering::SeqCst);
        }
        self.wake_submitter(token);
    }

    /// Something the token's drift follower should look at soon.
    pub fn wake_drift(&self, token: &str) {
        if let Some(n) = self.wake_drift.get(token) {
            n.notify_one();
        }
    }

    pub fn wake_tracker(&self, token: &str) {
        if let Some(n) = self.wake_track.get(token) {
            n.notify_one();
        }
    }
}
