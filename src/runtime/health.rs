//! Whether the store answers: a small durable write every
//! [`PROBE_EVERY`], bounded by a deadline. A store that cannot be reached
//! (a database gone away, a partition) or cannot write (a full disk) makes
//! vppd unready within seconds, so a load balancer sends its work
//! elsewhere; the probe that succeeds again makes it ready again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::domain::lifecycle::now_ms;
use crate::runtime::context::Context;

/// How often the store is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long a probe may take before the store counts as unreachable.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);
/// The meta key every replica writes (one row, whatever the replicas).
const KEY: &str = "health/probe";

/// Probes the store until shutdown, keeping `Context::store_ok`.
pub async fn run(ctx: Arc<Context>) {
    let mut was_ok = true;
    while !ctx.is_shutting_down() {
        let at = now_ms().to_string();
        let written = ctx.store.put_meta(KEY, &at);
        let ok = match tokio::time::timeout(PROBE_DEADLINE, written).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                if was_ok {
                    tracing::error!(%error, "the store cannot write: not ready until it can");
                }
                false
            }
            Err(_) => {
                if was_ok {
                    tracing::error!(
                        deadline_s = PROBE_DEADLINE.as_secs(),
                        "the store did not answer a write in time: not ready until it does"
                    );
                }
                false
            }
        };
        if ok && !was_ok {
            tracing::info!("the store answers again: ready");
        }
        ctx.store_ok.store(ok, Ordering::SeqCst);
        if ctx.listening.load(Ordering::SeqCst) {
            ctx.metrics.ready.set(i64::from(ctx.is_ready()));
        }
        was_ok = ok;
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = ctx.shutdown_signal() => {}
        }
    }
}
