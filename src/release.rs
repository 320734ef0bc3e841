//! Delivers install commands from the durable outbox to the MDM's webhook.
//!
//! A command enters the outbox in the transaction that confirms its
//! association (see [`crate::store::Tx::decide`]), so a failed or unconfirmed
//! pair never has one. Delivery takes the oldest commands, up to
//! `install.batch_size`, flushes the store (what leaves must be durable),
//! POSTs them, and only on a 2xx removes them from the outbox and counts them
//! released, in one transaction. Anything else is retried with backoff, for
//! as long as the MDM is down: nothing is lost, and a command acknowledged
//! once is never sent again. A retried batch carries the same commandUuids.
//!
//! One fsync per delivery: the flush before a POST also makes the previous
//! acknowledgement durable (and the outbox is flushed once more when it
//! empties). A crash in the few milliseconds between an acknowledgement
//! and that flush re-sends those commands with the same uuids, just as a
//! crash between the MDM's 2xx and our recording it would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use serde::Serialize;

use crate::context::Context;
use crate::job::{JobSpec, Phase, Target, command_uuid};
use crate::plan::Rect;
use crate::store::{OutboxEntry, StoreError, now_ms};

/// One install command, as the webhook contract gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallCommand {
    pub command_uuid: String,
    pub job_id: String,
    pub event_id: Option<String>,
    pub adam_id: String,
    pub pricing_param: String,
    pub serial_number: Option<String>,
    pub client_user_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CommandBatch {
    pub commands: Vec<InstallCommand>,
}

pub async fn run(ctx: Arc<Context>) {
    let http = match reqwest::Client::builder()
        .timeout(ctx.install.timeout)
        .user_agent(concat!("vppd/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "cannot build the webhook client");
            return;
        }
    };
    let mut backoff = new_backoff();
    let mut shapes: HashMap<(String, u32), (Rect, Phase)> = HashMap::new();
    loop {
        let size = ctx.install.batch_size;
        let entries = match ctx.store.outbox(size) {
            Ok(e) => e,
            Err(error) => {
                tracing::error!(%error, "cannot read the outbox");
                if !ctx.sleep(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if entries.is_empty() {
            // The last acknowledgements become durable before we idle.
            if let Err(error) = ctx.store.flush().await {
                tracing::error!(%error, "cannot flush released commands");
            }
            if !ctx.wait(&ctx.wake_release, Duration::from_secs(2)).await {
                return;
            }
            continue;
        }
        let (commands, consumed, oldest_ms) = match build(&ctx, &entries, size, &mut shapes) {
            Ok(b) => b,
            Err(error) => {
                tracing::error!(%error, "cannot build install commands");
                if !ctx.sleep(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if commands.is_empty() {
            // Entries of jobs that no longer exist: nothing to deliver.
            if let Err(error) = ctx.store.ack_outbox(&consumed) {
                tracing::error!(%error, "cannot drop orphaned outbox entries");
            }
            continue;
        }
        // What leaves the process must survive a crash: otherwise a command
        // could be acknowledged by the MDM and then confirmed (and sent) again.
        // The same flush makes the previous delivery's acknowledgement
        // durable: one fsync per delivery.
        if let Err(error) = ctx.store.flush().await {
            tracing::error!(%error, "cannot flush before delivery");
            if !ctx.sleep(Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        let n = commands.len();
        let mut req = http
            .post(&ctx.install.webhook_url)
            .json(&CommandBatch { commands });
        if let Some(h) = &ctx.install.auth_header {
            req = req.header(reqwest::header::AUTHORIZATION, h);
        }
        let outcome = req.send().await;
        let failure = match outcome {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(resp.status().as_u16().to_string()),
            Err(e) if e.is_timeout() => Some("timeout".to_string()),
            Err(_) => Some("unreachable".to_string()),
        };
        match failure {
            None => {
                backoff.reset();
                match ctx.store.ack_outbox(&consumed) {
                    Ok(finished) => {
                        for (job, state) in finished {
                            tracing::info!(job = %job, state = state.as_str(), "job finished");
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot mark delivered commands released");
                        continue;
                    }
                }
                let now = now_ms();
                for (key, taken) in &consumed {
                    if let Some((_, e)) = entries.iter().find(|(k, _)| k == key) {
                        let token = ctx
                            .store
                            .job(&e.job_id)
                            .ok()
                            .flatten()
                            .map(|j| j.token)
                            .unwrap_or_default();
                        ctx.metrics
                            .installs_released
                            .with_label_values(&[&token])
                            .inc_by(*taken as u64);
                        let latency = now.saturating_sub(e.confirmed_ms) as f64 / 1000.0;
                        for _ in 0..*taken {
                            ctx.metrics.install_release_latency.observe(latency);
                        }
                    }
                }
                tracing::debug!(commands = n, oldest_ms, "install commands released");
            }
            Some(reason) => {
                ctx.metrics
                    .install_delivery_failures
                    .with_label_values(&[&reason])
                    .inc();
                let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
                tracing::warn!(reason = %reason, commands = n, retry_in = ?delay, "MDM webhook did not accept install commands; will retry");
                if !ctx.sleep(delay).await {
                    return;
                }
            }
        }
    }
}

fn new_backoff() -> backoff::ExponentialBackoff {
    backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(250),
        current_interval: Duration::from_millis(250),
        max_interval: Duration::from_secs(30),
        randomization_factor: 0.3,
        multiplier: 2.0,
        max_elapsed_time: None,
        ..Default::default()
    }
}

type Built = (Vec<InstallCommand>, Vec<(Vec<u8>, usize)>, u64);

/// Expands outbox entries into at most `size` commands; returns which
/// entries were taken and how many of each one's pairs.
fn build(
    ctx: &Context,
    entries: &[(Vec<u8>, OutboxEntry)],
    size: usize,
    shapes: &mut HashMap<(String, u32), (Rect, Phase)>,
) -> Result<Built, StoreError> {
    let mut commands = Vec::with_capacity(size);
    let mut consumed = Vec::new();
    let mut oldest = u64::MAX;
    let mut specs: HashMap<String, Arc<JobSpec>> = HashMap::new();
    for (key, entry) in entries {
        if commands.len() >= size {
            break;
        }
        let spec = match specs.get(&entry.job_id) {
            Some(s) => s.clone(),
            None => match ctx.store.spec(&entry.job_id)? {
                Some(s) => {
                    specs.insert(entry.job_id.clone(), s.clone());
                    s
                }
                None => {
                    // The job is gone: nothing to release for it.
                    consumed.push((key.clone(), entry.pairs.len()));
                    continue;
                }
            },
        };
        let bkey = (entry.job_id.clone(), entry.batch);
        if !shapes.contains_key(&bkey) {
            match ctx.store.batch(&entry.job_id, entry.batch)? {
                Some(b) => {
                    shapes.insert(bkey.clone(), (b.rect, b.phase));
                }
                None => {
                    consumed.push((key.clone(), entry.pairs.len()));
                    continue;
                }
            }
        }
        let Some((rect, phase)) = shapes.get(&bkey) else {
            continue;
        };
        let targets = spec.targets(*phase);
        let room = size - commands.len();
        let take = entry.pairs.len().min(room);
        for &pair in &entry.pairs[..take] {
            let (a, t) = rect.pair_at(pair);
            let Some(asset) = spec.assets.get(a as usize) else {
                continue;
            };
            let (serial, user) = match t {
                Ok(s) => (targets.serial_numbers.get(s as usize).cloned(), None),
                Err(u) => (None, targets.client_user_ids.get(u as usize).cloned()),
            };
            let target = match (&serial, &user) {
                (Some(s), _) => Target::Serial(s),
                (None, Some(u)) => Target::User(u),
                (None, None) => continue,
            };
            commands.push(InstallCommand {
                command_uuid: command_uuid(&spec.id, asset, target).to_string(),
                job_id: spec.id.clone(),
                event_id: entry.event_id.clone(),
                adam_id: asset.adam_id.clone(),
                pricing_param: asset.pricing_param.clone(),
                serial_number: serial,
                client_user_id: user,
            });
        }
        oldest = oldest.min(entry.confirmed_ms);
        consumed.push((key.clone(), take));
    }
    if shapes.len() > 4096 {
        shapes.clear();
    }
    Ok((commands, consumed, oldest))
}
