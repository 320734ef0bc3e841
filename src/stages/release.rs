//! Delivers install commands from the durable outbox to the MDM's webhook.
//!
//! A command enters the outbox in the store commit that confirms its
//! association (see [`crate::domain::lifecycle`]), so a failed or unconfirmed pair
//! never has one, and what is read from the outbox is already durable.
//! Delivery takes the oldest commands, up to `install.batch_size`, POSTs
//! them, and only on a 2xx releases them by identity (their pairs, never
//! "the first N") and counts them released, in one durable commit. Anything
//! else is retried with backoff, for as long as the MDM is down: nothing is
//! lost, and a command acknowledged once is never sent again. A retried
//! batch carries the same commandUuids; so does a crash between the MDM's
//! 2xx and our recording it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::domain::ids::{CommandUuid, EventId, JobId};
use crate::domain::job::{
    CommandUuids, JobAsset, JobSpec, Phase, RequestType, Target, invite_uuid,
};
use crate::domain::lifecycle::{BatchRecord, now_ms};
use crate::domain::pairs::{pair, revoked_at};
use crate::domain::retry::Backoff;
use crate::runtime::context::Context;
use crate::store::{OutboxAck, OutboxItem, StoreError};

/// One command, as the webhook contract gives it: an install, a removal
/// (uninstall) or, for user assignment, an invitation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallCommand {
    /// `InstallApplication`, `RemoveApplication` or `InviteToProgram`.
    #[serde(default)]
    pub request_type: RequestType,
    pub command_uuid: String,
    pub job_id: String,
    pub event_id: Option<String>,
    /// Empty (and left out) on `InviteToProgram`, which names no asset.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub adam_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pricing_param: String,
    pub serial_number: Option<String>,
    pub client_user_id: Option<String>,
    /// Only on `InviteToProgram`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitation_url: Option<String>,
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
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut batches: HashMap<(JobId, u32), Arc<BatchRecord>> = HashMap::new();
    loop {
        let size = ctx.install.batch_size;
        let items = match ctx.store.outbox(size).await {
            Ok(e) => e,
            Err(error) => {
                tracing::error!(%error, "cannot read the outbox");
                if !ctx.sleep(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if items.is_empty() {
            if !ctx.wait(&ctx.wake_release, Duration::from_secs(2)).await {
                return;
            }
            continue;
        }
        // No wait for a fuller outbox: once the applier lingers before a
        // fold, waiting here too measured no CPU saved and cost every
        // command about 3 ms.
        let built = match build(&ctx, &items, size, &mut batches).await {
            Ok(b) => b,
            Err(error) => {
                tracing::error!(%error, "cannot build install commands");
                if !ctx.sleep(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if built.commands == 0 {
            // Entries of jobs that no longer exist: nothing to deliver.
            if let Err(error) = ctx.store.ack_outbox(&built.acks).await {
                tracing::error!(%error, "cannot drop orphaned outbox entries");
            }
            continue;
        }
        let n = built.commands;
        let body = built.body;
        let mut req = http
            .post(&ctx.install.webhook_url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(h) = &ctx.install.auth_header {
            req = req.header(reqwest::header::AUTHORIZATION, h);
        }
        if let Some(secret) = &ctx.install.signing_secret {
            // Signed at each attempt: a retry carries a fresh timestamp.
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let (ts, signature) = secret.sign(unix, &body);
            req = req
                .header(crate::domain::signing::TIMESTAMP_HEADER, ts)
                .header(crate::domain::signing::SIGNATURE_HEADER, signature);
        }
        let req = req.body(body);
        let failure = match req.send().await {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(resp.status().as_u16().to_string()),
            Err(e) if e.is_timeout() => Some("timeout".to_string()),
            Err(_) => Some("unreachable".to_string()),
        };
        if let Some(reason) = failure {
            ctx.metrics
                .install_delivery_failures
                .with_label_values(&[&reason])
                .inc();
            let delay = backoff.next_delay();
            tracing::warn!(reason = %reason, commands = n, retry_in = ?delay, "MDM webhook did not accept install commands; will retry");
            if !ctx.sleep(delay).await {
                return;
            }
            continue;
        }
        backoff.reset();
        ctx.wake_fold.notify_one();
        let released = match ctx.store.ack_outbox(&built.acks).await {
            Ok(r) => r,
            Err(error) => {
                tracing::error!(%error, "cannot mark delivered commands released");
                continue;
            }
        };
        for r in &released {
            ctx.metrics
                .installs_released
                .with_label_values(&[&r.token])
                .inc_by(r.commands);
            if let Some(state) = r.finished {
                tracing::info!(job = %r.job_id, state = state.as_str(), "job finished");
            }
        }
        let now = now_ms();
        // Observed locally and published once: one command's observation
        // is then a bucket count, not a set of atomic updates.
        let latency = ctx.metrics.install_release_latency.local();
        for confirmed_ms in built.confirmed_ms {
            latency.observe(now.saturating_sub(confirmed_ms) as f64 / 1000.0);
        }
        latency.flush();
        tracing::debug!(commands = n, "install commands released");
    }
}

/// One delivery: the body of its commands, the acknowledgements they will
/// make, and when each command was confirmed.
struct Built {
    /// The JSON of a [`CommandBatch`], written command by command.
    body: Vec<u8>,
    commands: usize,
    acks: Vec<OutboxAck>,
    confirmed_ms: Vec<u64>,
}

/// A command as written into a delivery: [`InstallCommand`]'s JSON from
/// borrowed parts, so that a command costs no allocation of its own.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CommandOut<'a> {
    request_type: RequestType,
    command_uuid: CommandUuid,
    job_id: &'a str,
    event_id: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    adam_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pricing_param: &'a str,
    serial_number: Option<&'a str>,
    client_user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    invitation_url: Option<&'a str>,
}

impl CommandOut<'_> {
    /// The bytes serde_json writes for this struct (tested against it),
    /// written without serde's per-field machinery: a rollout writes
    /// millions of commands, and this was the release's largest cost.
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        out.extend_from_slice(b"{\"requestType\":\"");
        out.extend_from_slice(self.request_type.as_str().as_bytes());
        out.extend_from_slice(b"\",\"commandUuid\":\"");
        let mut uuid = [0u8; CommandUuid::LENGTH];
        out.extend_from_slice(self.command_uuid.encode(&mut uuid).as_bytes());
        out.extend_from_slice(b"\",\"jobId\":");
        json_str(out, self.job_id)?;
        out.extend_from_slice(b",\"eventId\":");
        json_opt(out, self.event_id)?;
        if !self.adam_id.is_empty() {
            out.extend_from_slice(b",\"adamId\":");
            json_str(out, self.adam_id)?;
        }
        if !self.pricing_param.is_empty() {
            out.extend_from_slice(b",\"pricingParam\":");
            json_str(out, self.pricing_param)?;
        }
        out.extend_from_slice(b",\"serialNumber\":");
        json_opt(out, self.serial_number)?;
        out.extend_from_slice(b",\"clientUserId\":");
        json_opt(out, self.client_user_id)?;
        if let Some(url) = self.invitation_url {
            out.extend_from_slice(b",\"invitationUrl\":");
            json_str(out, url)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// A JSON string; only one that needs escaping goes through serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) -> Result<(), serde_json::Error> {
    if crate::domain::json::plain_len(s.as_bytes()) == s.len() {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, s)
    }
}

fn json_opt(out: &mut Vec<u8>, s: Option<&str>) -> Result<(), serde_json::Error> {
    match s {
        Some(s) => json_str(out, s),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

impl Built {
    fn with_capacity(size: usize) -> Built {
        let mut body = Vec::with_capacity(64 + size * 256);
        body.extend_from_slice(b"{\"commands\":[");
        Built {
            body,
            commands: 0,
            acks: Vec::new(),
            confirmed_ms: Vec::with_capacity(size),
        }
    }

    fn push(&mut self, command: &CommandOut<'_>, confirmed_ms: u64) -> Result<(), StoreError> {
        if self.commands > 0 {
            self.body.push(b',');
        }
        command
            .write_json(&mut self.body)
            .map_err(|e| StoreError::Encode(e.to_string()))?;
        self.commands += 1;
        self.confirmed_ms.push(confirmed_ms);
        Ok(())
    }

    fn finish(&mut self) {
        self.body.extend_from_slice(b"]}");
    }
}

/// Expands outbox entries into at most `size` commands.
async fn build(
    ctx: &Context,
    items: &[OutboxItem],
    size: usize,
    batches: &mut HashMap<(JobId, u32), Arc<BatchRecord>>,
) -> Result<Built, StoreError> {
    let mut built = Built::with_capacity(size);
    let mut specs: HashMap<JobId, Arc<JobSpec>> = HashMap::new();
    for item in items {
        if built.commands >= size {
            break;
        }
        let entry = &item.entry;
        let gone = OutboxAck {
            entry: item.id,
            pairs: entry.pairs.clone(),
        };
        if entry.request_type == RequestType::InviteToProgram {
            // Invitations carry what they need; the job need not exist.
            let room = size - built.commands;
            let taken: Vec<u32> = entry.pairs.iter().take(room).copied().collect();
            for &p in &taken {
                let Some((user, url)) = entry.invitations.get(p as usize) else {
                    continue;
                };
                let command = CommandOut {
                    request_type: RequestType::InviteToProgram,
                    command_uuid: invite_uuid(&entry.job_id, user),
                    job_id: entry.job_id.as_str(),
                    event_id: None,
                    adam_id: "",
                    pricing_param: "",
                    serial_number: None,
                    client_user_id: Some(user),
                    invitation_url: Some(url),
                };
                built.push(&command, entry.confirmed_ms)?;
            }
            built.acks.push(OutboxAck {
                entry: item.id,
                pairs: taken,
            });
            continue;
        }
        let spec = match specs.get(&entry.job_id) {
            Some(s) => s.clone(),
            None => match ctx.store.spec(&entry.job_id).await? {
                Some(s) => {
                    specs.insert(entry.job_id.clone(), s.clone());
                    s
                }
                None => {
                    // The job is gone: nothing to release for it.
                    built.acks.push(gone);
                    continue;
                }
            },
        };
        let key = (entry.job_id.clone(), entry.batch);
        // A revoke batch's list of revocations grows as Apple names them:
        // a cached copy that does not reach this entry's is read again.
        let stale = batches.get(&key).is_some_and(|b| {
            b.phase() == Phase::Revoke
                && entry.pairs.iter().any(|p| *p as usize >= b.revoked().len())
        });
        if stale {
            batches.remove(&key);
        }
        let batch = match batches.get(&key) {
            Some(b) => b.clone(),
            None => match ctx.store.batch(&entry.job_id, entry.batch).await? {
                Some(b) => {
                    let b = Arc::new(b);
                    batches.insert(key, b.clone());
                    b
                }
                None => {
                    built.acks.push(gone);
                    continue;
                }
            },
        };
        let room = size - built.commands;
        let taken: Vec<u32> = entry.pairs.iter().take(room).copied().collect();
        let mut uuids = CommandUuids::new(entry.request_type, &spec.id);
        for &p in &taken {
            // A revoke batch's commands name its revocations by position.
            let found: Option<(Cow<'_, JobAsset>, Target<'_>)> = match batch.phase() {
                Phase::Revoke => revoked_at(&spec, &batch, p).map(|(a, t)| (Cow::Owned(a), t)),
                _ => pair(&spec, &batch, p).map(|pair| (Cow::Borrowed(pair.asset), pair.target)),
            };
            let Some((asset, target)) = found else {
                continue;
            };
            let (serial_number, client_user_id) = match target {
                Target::Serial(s) => (Some(s), None),
                Target::User(u) => (None, Some(u)),
            };
            let command = CommandOut {
                request_type: entry.request_type,
                command_uuid: uuids.of(&asset, target),
                job_id: spec.id.as_str(),
                event_id: entry.event_id.as_ref().map(EventId::as_str),
                adam_id: &asset.adam_id,
                pricing_param: &asset.pricing_param,
                serial_number,
                client_user_id,
                invitation_url: None,
            };
            built.push(&command, entry.confirmed_ms)?;
        }
        built.acks.push(OutboxAck {
            entry: item.id,
            pairs: taken,
        });
    }
    built.finish();
    // Only the shape of a batch is used here, which never changes, and a
    // revoke batch's revocations, which only grow; the cache is bounded.
    if batches.len() > 4096 {
        batches.clear();
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request_type() -> impl Strategy<Value = RequestType> {
        prop_oneof![
            Just(RequestType::InstallApplication),
            Just(RequestType::RemoveApplication),
            Just(RequestType::InviteToProgram),
        ]
    }

    proptest! {
        /// The hand-written command is byte for byte serde_json's, for any
        /// text (quotes, backslashes, control characters, non-ASCII) and
        /// any mix of absent fields.
        #[test]
        fn a_written_command_is_serde_jsons_bytes(
            request_type in request_type(),
            uuid in any::<u128>(),
            job_id in ".{0,12}",
            event_id in proptest::option::of("[a-z0-9\"\\\\\u{0}-\u{1f}\u{7f}é-]{0,10}"),
            adam_id in "[0-9\"\\\\]{0,6}",
            pricing_param in "(STDQ|PLUS|\n|)",
            serial_number in proptest::option::of(".{0,10}"),
            client_user_id in proptest::option::of(".{0,10}"),
            invitation_url in proptest::option::of(".{0,16}"),
        ) {
            let command = CommandOut {
                request_type,
                command_uuid: CommandUuid::from_uuid(uuid::Uuid::from_u128(uuid)),
                job_id: &job_id,
                event_id: event_id.as_deref(),
                adam_id: &adam_id,
                pricing_param: &pricing_param,
                serial_number: serial_number.as_deref(),
                client_user_id: client_user_id.as_deref(),
                invitation_url: invitation_url.as_deref(),
            };
            let mut written = Vec::new();
            command.write_json(&mut written).unwrap();
            prop_assert_eq!(
                String::from_utf8(written).unwrap(),
                serde_json::to_string(&command).unwrap()
            );
        }
    }

    /// A delivery written command by command reads back as the contract's
    /// batch, field for field.
    #[test]
    fn a_written_delivery_is_the_contracts_command_batch() {
        let uuid = uuid::Uuid::new_v4();
        let mut built = Built::with_capacity(2);
        let install = CommandOut {
            request_type: RequestType::InstallApplication,
            command_uuid: CommandUuid::from(uuid),
            job_id: "j\"1",
            event_id: Some("ev"),
            adam_id: "123",
            pricing_param: "STDQ",
            serial_number: Some("C02"),
            client_user_id: None,
            invitation_url: None,
        };
        let invite = CommandOut {
            request_type: RequestType::InviteToProgram,
            command_uuid: CommandUuid::from(uuid),
            job_id: "j\"1",
            event_id: None,
            adam_id: "",
            pricing_param: "",
            serial_number: None,
            client_user_id: Some("u1"),
            invitation_url: Some("https://x/i"),
        };
        built.push(&install, 1).unwrap();
        built.push(&invite, 2).unwrap();
        built.finish();
        let read: CommandBatch = serde_json::from_slice(&built.body).unwrap();
        let want = CommandBatch {
            commands: vec![
                InstallCommand {
                    request_type: RequestType::InstallApplication,
                    command_uuid: uuid.to_string(),
                    job_id: "j\"1".into(),
                    event_id: Some("ev".into()),
                    adam_id: "123".into(),
                    pricing_param: "STDQ".into(),
                    serial_number: Some("C02".into()),
                    client_user_id: None,
                    invitation_url: None,
                },
                InstallCommand {
                    request_type: RequestType::InviteToProgram,
                    command_uuid: uuid.to_string(),
                    job_id: "j\"1".into(),
                    event_id: None,
                    adam_id: String::new(),
                    pricing_param: String::new(),
                    serial_number: None,
                    client_user_id: Some("u1".into()),
                    invitation_url: Some("https://x/i".into()),
                },
            ],
        };
        assert_eq!(read.commands, want.commands);
        // The same bytes as the batch serialized whole.
        assert_eq!(built.body, serde_json::to_vec(&want).unwrap());
        assert_eq!((built.commands, built.confirmed_ms), (2, vec![1, 2]));
    }
}
