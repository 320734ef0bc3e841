//! Keeps the store from growing without end: finished jobs are forgotten
//! `[store] retain_finished` after they finished (their batches, events and
//! failures with them), and the store's size is reported as metrics.
//!
//! Runs in one replica at a time (its own lease); pruning is idempotent, so
//! a handover half way through only leaves the rest to the next holder.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::lifecycle::now_ms;
use crate::runtime::context::Context;

/// Sweeps at least this often, so the size metrics stay fresh (and at most
/// this often when the retention is short: a sweep reads every job).
const MAX_EVERY: Duration = Duration::from_secs(300);
const MIN_EVERY: Duration = Duration::from_secs(1);

/// How often to sweep: a quarter of the retention, so a job goes at most a
/// quarter later than due, between one second and five minutes.
pub fn sweep_every(retain: Option<Duration>) -> Duration {
    retain.map_or(MAX_EVERY, |r| (r / 4).clamp(MIN_EVERY, MAX_EVERY))
}

/// Prunes and measures until shutdown.
pub async fn run(ctx: Arc<Context>, retain: Option<Duration>) {
    let every = sweep_every(retain);
    loop {
        if let Some(retain) = retain {
            let cutoff = now_ms().saturating_sub(retain.as_millis().min(u64::MAX as u128) as u64);
            match ctx.store.prune_finished(cutoff).await {
                Ok(ids) if ids.is_empty() => {}
                Ok(ids) => {
                    ctx.metrics.jobs_pruned.inc_by(ids.len() as u64);
                    tracing::info!(
                        count = ids.len(),
                        jobs = %crate::domain::job::capped_list(&ids, ", "),
                        "forgot finished jobs older than store.retain_finished"
                    );
                }
                Err(error) => tracing::warn!(%error, "cannot prune finished jobs"),
            }
        }
        match ctx.store.stats().await {
            Ok(stats) => {
                ctx.metrics
                    .store_bytes
                    .set(stats.bytes.min(i64::MAX as u64) as i64);
                for (kind, n) in &stats.records {
                    ctx.metrics
                        .store_records
                        .with_label_values(&[kind])
                        .set((*n).min(i64::MAX as u64) as i64);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot measure the store"),
        }
        if !ctx.sleep(every).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_follow_the_retention_within_bounds() {
        assert_eq!(sweep_every(None), MAX_EVERY);
        assert_eq!(
            sweep_every(Some(Duration::from_secs(30 * 86400))),
            MAX_EVERY
        );
        assert_eq!(
            sweep_every(Some(Duration::from_secs(60))),
            Duration::from_secs(15)
        );
        assert_eq!(sweep_every(Some(Duration::from_millis(100))), MIN_EVERY);
    }
}
