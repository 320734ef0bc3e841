//! Prometheus metrics, all named `vppd_*`, units in the names, labels of
//! bounded cardinality only (token names, endpoints, states, error numbers;
//! never serial numbers, user ids or adamIds).

use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric vppd exports. One instance per process (or per test).
pub struct Metrics {
    registry: Registry,
    pub apple_requests: IntCounterVec,
    pub apple_request_duration: HistogramVec,
    pub apple_errors: IntCounterVec,
    pub apple_rate_limit_waits: IntCounterVec,
    pub apple_rate_limit_wait_seconds: GaugeVec,
    pub apple_retry_after: IntCounterVec,
    pub apple_retry_after_seconds: GaugeVec,
    pub apple_limit: IntGaugeVec,
    pub token_expiry: GaugeVec,
    pub token_ready: IntGaugeVec,
    pub token_state: IntGaugeVec,
    pub notifications: IntCounterVec,
    pub notifications_total: IntCounterVec,
    pub notification_ack_duration: HistogramVec,
    pub assignments: IntCounterVec,
    pub events_in_flight: IntGaugeVec,
    pub events_resubmitted: IntCounterVec,
    pub drift_assignments: IntCounterVec,
    pub license_assets_low: IntGaugeVec,
    pub license_assets_short: IntGaugeVec,
    pub oldest_event_age: GaugeVec,
    pub status_polls: IntCounterVec,
    pub syncs: IntCounterVec,
    pub installs_released: IntCounterVec,
    pub installs_pending: IntGauge,
    pub install_delivery_failures: IntCounterVec,
    pub install_release_latency: Histogram,
    pub jobs: IntGaugeVec,
    pub ready: IntGauge,
    pub lease_held: IntGaugeVec,
    pub replicas: IntGauge,
    pub store_bytes: IntGauge,
    pub store_records: IntGaugeVec,
    pub jobs_pruned: prometheus::IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                // Names are static and distinct, so registration cannot collide.
                let _ = registry.register(Box::new(m.clone()));
                m
            }};
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let metrics = (|| -> prometheus::Result<Metrics> {
            Ok(Metrics {
                apple_requests: reg!(counter(
                    "vppd_apple_requests_total",
                    "Requests sent to Apple, by token, endpoint and HTTP status (\"error\" when no answer came).",
                    &["token", "endpoint", "status"]
                )?),
                apple_request_duration: reg!(HistogramVec::new(
                    HistogramOpts::new(
                        "vppd_apple_request_duration_seconds",
                        "Latency of requests to Apple, including the wait for the answer but not for the rate limiter."
                    )
                    .buckets(latency_buckets.clone()),
                    &["endpoint"]
                )?),
                apple_errors: reg!(counter(
                    "vppd_apple_errors_total",
                    "Error answers from Apple by token and Apple errorNumber.",
                    &["token", "error_number"]
                )?),
                apple_rate_limit_waits: reg!(counter(
                    "vppd_apple_rate_limit_waits_total",
                    "Requests that had to wait for the client-side rate limit.",
                    &["token"]
                )?),
                apple_rate_limit_wait_seconds: reg!(GaugeVec::new(
                    Opts::new(
                        "vppd_apple_rate_limit_wait_seconds_total",
                        "Total time requests waited for the client-side rate limit."
                    ),
                    &["token"]
                )?),
                apple_retry_after: reg!(counter(
                    "vppd_apple_retry_after_total",
                    "Retry-After answers from Apple (429, 503, 9646) that paused the token.",
                    &["token"]
                )?),
                apple_retry_after_seconds: reg!(GaugeVec::new(
                    Opts::new(
                        "vppd_apple_retry_after_seconds_total",
                        "Total pause imposed by Retry-After answers."
                    ),
                    &["token"]
                )?),
                apple_limit: reg!(IntGaugeVec::new(
                    Opts::new(
                        "vppd_apple_limit",
                        "Apple's live limits from service config, per token."
                    ),
                    &["token", "limit"]
                )?),
                token_expiry: reg!(GaugeVec::new(
                    Opts::new(
                        "vppd_token_expiry_timestamp_seconds",
                        "Expiry of each sToken, as a Unix timestamp."
                    ),
                    &["token"]
                )?),
                token_ready: reg!(IntGaugeVec::new(
                    Opts::new(
                        "vppd_token_ready",
                        "1 while the token is registered with Apple and its jobs go; 0 while registering or failed."
                    ),
                    &["token"]
                )?),
                token_state: reg!(IntGaugeVec::new(
                    Opts::new(
                        "vppd_token_state",
                        "1 for the token's current state: registering, ready, or why it failed (expired, revoked, other_mdm, refused)."
                    ),
                    &["token", "state"]
                )?),
                notifications_total: reg!(counter(
                    "vppd_notifications_total",
                    "Notifications received, by type and outcome (accepted, duplicate, foreign, unauthorized, malformed, too_large, error).",
                    &["type", "outcome"]
                )?),
                notifications: reg!(counter(
                    "vppd_notifications_received_total",
                    "Notifications received, by type and outcome; the older name of vppd_notifications_total, kept for existing dashboards.",
                    &["type", "outcome"]
                )?),
                notification_ack_duration: reg!(HistogramVec::new(
                    HistogramOpts::new(
                        "vppd_notification_ack_duration_seconds",
                        "Time from receiving a notification to answering it (durably recorded)."
                    )
                    .buckets(latency_buckets.clone()),
                    &["outcome"]
                )?),
                assignments: reg!(counter(
                    "vppd_assignments_total",
                    "Assignment pairs (asset x target) by phase and state: planned, submitted, confirmed, failed.",
                    &["phase", "state"]
                )?),
                events_resubmitted: reg!(counter(
                    "vppd_events_resubmitted_total",
                    "Events still PENDING tracking.resubmit_after after they were sent, resubmitted for their undecided pairs, by token.",
                    &["token"]
                )?),
                license_assets_low: reg!(IntGaugeVec::new(
                    Opts::new(
                        "vppd_license_assets_low",
                        "Assets of a token with less than 10% of their licenses free (none free included), as vppd last learned the counts."
                    ),
                    &["token"]
                )?),
                license_assets_short: reg!(IntGaugeVec::new(
                    Opts::new(
                        "vppd_license_assets_short",
                        "Assets of a token that a job waiting for licenses (or failed for want of them at its last check) is short of."
                    ),
                    &["token"]
                )?),
                drift_assignments: reg!(counter(
                    "vppd_drift_assignments_total",
                    "Assignments that appeared (added) or disappeared (removed) at Apple that no event of vppd's explains: changes made outside vppd.",
                    &["token", "kind"]
                )?),
                events_in_flight: reg!(IntGaugeVec::new(
                    Opts::new(
                        "vppd_events_in_flight",
                        "Apple events submitted and not yet fully decided."
                    ),
                    &["token"]
                )?),
                oldest_event_age: reg!(GaugeVec::new(
                    Opts::new(
                        "vppd_oldest_event_age_seconds",
                        "Age of the oldest event still in flight."
                    ),
                    &["token"]
                )?),
                status_polls: reg!(counter(
                    "vppd_event_status_polls_total",
                    "Event status polls (the fallback for missed notifications), by result.",
                    &["token", "result"]
                )?),
                syncs: reg!(counter(
                    "vppd_assignment_syncs_total",
                    "Narrow assignment syncs, by reason.",
                    &["token", "reason"]
                )?),
                installs_released: reg!(counter(
                    "vppd_installs_released_total",
                    "Install commands acknowledged by the MDM webhook.",
                    &["token"]
                )?),
                installs_pending: reg!(IntGauge::new(
                    "vppd_installs_pending",
                    "Install commands waiting in the outbox."
                )?),
                install_delivery_failures: reg!(counter(
                    "vppd_install_delivery_failures_total",
                    "Failed deliveries to the MDM webhook, by reason (status code or error).",
                    &["reason"]
                )?),
                install_release_latency: reg!(Histogram::with_opts(
                    HistogramOpts::new(
                        "vppd_install_release_latency_seconds",
                        "Time from Apple's confirmation being recorded to the MDM acknowledging the install command."
                    )
                    .buckets(latency_buckets.clone())
                )?),
                jobs: reg!(IntGaugeVec::new(
                    Opts::new("vppd_jobs", "Jobs by state."),
                    &["state"]
                )?),
                lease_held: reg!(IntGaugeVec::new(
                    Opts::new(
                        "vppd_lease_held",
                        "1 for each lease this replica holds (\"token/NAME\": it works that token; \"applier\", \"outbox\"), 0 once lost or given up."
                    ),
                    &["lease"]
                )?),
                store_bytes: reg!(IntGauge::new(
                    "vppd_store_bytes",
                    "Size of the store: sled's files in data_dir, or vppd's tables in PostgreSQL (refreshed every few minutes by the replica that prunes)."
                )?),
                store_records: reg!(IntGaugeVec::new(
                    Opts::new(
                        "vppd_store_records",
                        "Records in the store by kind (jobs, batches, events, failures, inbox, outbox, notification_ids, licenses, users)."
                    ),
                    &["kind"]
                )?),
                jobs_pruned: reg!(prometheus::IntCounter::new(
                    "vppd_jobs_pruned_total",
                    "Finished jobs forgotten after [store] retain_finished, with their batches, events and failures."
                )?),
                replicas: reg!(IntGauge::new(
                    "vppd_replicas",
                    "Replicas sharing the store, as this one last saw them (1 with sled)."
                )?),
                ready: reg!(IntGauge::new(
                    "vppd_ready",
                    "1 once the store is open and the listeners are bound (a token's state never changes it)."
                )?),
                registry: registry.clone(),
            })
        })();
        let metrics = match metrics {
            Ok(m) => m,
            // The definitions above are constants: an error here is a
            // programming mistake caught by the first test that runs.
            Err(e) => panic!("metric definitions are invalid: {e}"),
        };
        metrics.start_known_series();
        metrics
    }

    /// Creates, at zero, the series whose labels are known up front. A
    /// counter that never moved otherwise has no series at all: its panel
    /// shows "No data" instead of 0, and `increase()` in an alert misses its
    /// first step from nothing to 1.
    fn start_known_series(&self) {
        for phase in ["associate", "disassociate"] {
            for state in ["planned", "submitted", "confirmed", "failed"] {
                self.assignments.with_label_values(&[phase, state]);
            }
        }
        for kind in [
            "ASSET_MANAGEMENT",
            "ASSET_COUNT",
            "USER_MANAGEMENT",
            "USER_ASSOCIATED",
            "TEST_NOTIFICATION",
        ] {
            for outcome in ["accepted", "duplicate"] {
                self.notifications.with_label_values(&[kind, outcome]);
            }
            for outcome in ["accepted", "duplicate", "foreign"] {
                self.notifications_total.with_label_values(&[kind, outcome]);
            }
        }
        for outcome in ["unauthorized", "too_large", "malformed"] {
            self.notifications.with_label_values(&["unknown", outcome]);
            self.notifications_total
                .with_label_values(&["unknown", outcome]);
        }
        self.notification_ack_duration
            .with_label_values(&["accepted"]);
        for state in ["accepted", "running", "completed", "failed", "canceled"] {
            self.jobs.with_label_values(&[state]);
        }
    }

    /// Creates, at zero, the per-token series, so a token's panels exist
    /// from the start (before its first wait, retry, poll or release).
    pub fn start_token_series(&self, token: &str) {
        self.apple_rate_limit_waits.with_label_values(&[token]);
        self.apple_rate_limit_wait_seconds
            .with_label_values(&[token]);
        self.apple_retry_after.with_label_values(&[token]);
        self.apple_retry_after_seconds.with_label_values(&[token]);
        self.events_in_flight.with_label_values(&[token]);
        self.oldest_event_age.with_label_values(&[token]);
        self.installs_released.with_label_values(&[token]);
        for result in ["pending", "complete", "failed", "unknown_event", "error"] {
            self.status_polls.with_label_values(&[token, result]);
        }
        for reason in ["event_failures", "no_status", "unknown_outcome"] {
            self.syncs.with_label_values(&[token, reason]);
        }
        for kind in ["added", "removed"] {
            self.drift_assignments.with_label_values(&[token, kind]);
        }
    }

    /// Counts what a drift change counted.
    pub fn count_drift(&self, token: &str, counted: crate::domain::lifecycle::DriftCounted) {
        if counted.added > 0 {
            self.drift_assignments
                .with_label_values(&[token, "added"])
                .inc_by(counted.added);
        }
        if counted.removed > 0 {
            self.drift_assignments
                .with_label_values(&[token, "removed"])
                .inc_by(counted.removed);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The Apple client's reports, as the `vppd_apple_*` and token expiry series.
impl crate::apple::Observer for Metrics {
    fn token_expiry(&self, token: &str, unix_secs: i64) {
        self.token_expiry
            .with_label_values(&[token])
            .set(unix_secs as f64);
    }

    fn limit(&self, token: &str, key: &str, value: i64) {
        self.apple_limit.with_label_values(&[token, key]).set(value);
    }

    fn rate_limit_wait(&self, token: &str, waited: Duration) {
        self.apple_rate_limit_waits
            .with_label_values(&[token])
            .inc();
        self.apple_rate_limit_wait_seconds
            .with_label_values(&[token])
            .add(waited.as_secs_f64());
    }

    fn request_unanswered(&self, token: &str, endpoint: &'static str) {
        self.apple_requests
            .with_label_values(&[token, endpoint, "error"])
            .inc();
    }

    fn request_answered(&self, token: &str, endpoint: &'static str, status: u16, took: Duration) {
        self.apple_request_duration
            .with_label_values(&[endpoint])
            .observe(took.as_secs_f64());
        self.apple_requests
            .with_label_values(&[token, endpoint, &status.to_string()])
            .inc();
    }

    fn retry_after(&self, token: &str, wait: Duration) {
        self.apple_retry_after.with_label_values(&[token]).inc();
        self.apple_retry_after_seconds
            .with_label_values(&[token])
            .add(wait.as_secs_f64());
    }

    fn api_error(&self, token: &str, number: i32) {
        self.apple_errors
            .with_label_values(&[token, &number.to_string()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_prefix() {
        let m = Metrics::new();
        m.apple_requests
            .with_label_values(&["main", "associate", "200"])
            .inc();
        m.installs_pending.set(3);
        let text = m.render();
        assert!(text.contains(
            "vppd_apple_requests_total{endpoint=\"associate\",status=\"200\",token=\"main\"} 1"
        ));
        assert!(text.contains("vppd_installs_pending 3"));
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("vppd_"), "{line}");
        }
    }

    #[test]
    fn known_series_start_at_zero() {
        let m = Metrics::new();
        m.start_token_series("main");
        let text = m.render();
        for line in [
            "vppd_assignments_total{phase=\"associate\",state=\"failed\"} 0",
            "vppd_notifications_received_total{outcome=\"unauthorized\",type=\"unknown\"} 0",
            "vppd_jobs{state=\"failed\"} 0",
            "vppd_apple_retry_after_total{token=\"main\"} 0",
            "vppd_event_status_polls_total{result=\"pending\",token=\"main\"} 0",
            "vppd_assignment_syncs_total{reason=\"no_status\",token=\"main\"} 0",
            "vppd_installs_released_total{token=\"main\"} 0",
        ] {
            assert!(text.contains(line), "missing {line}");
        }
    }

    #[test]
    fn the_apple_clients_reports_land_in_their_series() {
        use crate::apple::Observer;
        let m = Metrics::new();
        m.token_expiry("main", 1_900_000_000);
        m.limit("main", "maxAssets", 25);
        m.rate_limit_wait("main", Duration::from_millis(1500));
        m.request_unanswered("main", "status");
        m.request_answered("main", "associate", 429, Duration::from_millis(2));
        m.retry_after("main", Duration::from_secs(3));
        m.api_error("main", 9646);
        let text = m.render();
        for line in [
            "vppd_token_expiry_timestamp_seconds{token=\"main\"} 1900000000",
            "vppd_apple_limit{limit=\"maxAssets\",token=\"main\"} 25",
            "vppd_apple_rate_limit_waits_total{token=\"main\"} 1",
            "vppd_apple_rate_limit_wait_seconds_total{token=\"main\"} 1.5",
            "vppd_apple_requests_total{endpoint=\"status\",status=\"error\",token=\"main\"} 1",
            "vppd_apple_requests_total{endpoint=\"associate\",status=\"429\",token=\"main\"} 1",
            "vppd_apple_request_duration_seconds_count{endpoint=\"associate\"} 1",
            "vppd_apple_retry_after_total{token=\"main\"} 1",
            "vppd_apple_retry_after_seconds_total{token=\"main\"} 3",
            "vppd_apple_errors_total{error_number=\"9646\",token=\"main\"} 1",
        ] {
            assert!(text.contains(line), "missing {line}");
        }
    }
}
