//! Each token's standing with Apple: registration (service config's limits,
//! then client config: notification URL, secret and types, and our
//! `mdmInfo`), then a re-read of both every 5 minutes. What Apple says moves
//! the token between `registering`, `ready` and `failed` in the registry
//! ([`crate::runtime::tokens`]); a renewal or takeover (`PUT /v1/tokens/{name}`)
//! wakes it to register again at once.
//!
//! One task per token, asleep between refreshes: an idle token costs a
//! timer, nothing that spins.

use std::sync::Arc;
use std::time::Duration;

use crate::apple::types::{ClientConfigRequest, ClientConfigResponse, MdmInfo};
use crate::apple::types::{error_number, notification_type};
use crate::apple::{AppleError, Client};
use crate::domain::retry::Backoff;
use crate::runtime::context::Context;
use crate::runtime::tokens::{Failure, Token};

/// What every token registers with Apple, and how often it is re-read.
#[derive(Clone)]
pub struct Registrar {
    pub public_url: String,
    pub mdm_id: String,
    /// `[apple] refresh_every`, default 5 minutes.
    pub refresh_every: Duration,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("public_url", &self.public_url)
            .field("mdm_id", &self.mdm_id)
            .field("refresh_every", &self.refresh_every)
            .finish()
    }
}

/// How one attempt went.
enum Outcome {
    Ready,
    Failed(Failure),
    /// Apple unreachable or busy: try again after a backoff.
    Retry(String),
}

enum Woken {
    /// Renewed or told to take over.
    Register,
    Timeout,
    Shutdown,
}

async fn wait_for(ctx: &Context, token: &Token, d: Duration) -> Woken {
    tokio::select! {
        _ = token.wake_register.notified() => {
            if ctx.is_shutting_down() || token.is_removed() { Woken::Shutdown } else { Woken::Register }
        }
        _ = tokio::time::sleep(d) => {
            if ctx.is_shutting_down() || token.is_removed() { Woken::Shutdown } else { Woken::Timeout }
        }
        _ = ctx.shutdown_signal() => Woken::Shutdown,
    }
}

/// Keeps one token registered until it is removed or vppd shuts down.
pub async fn run(ctx: Arc<Context>, token: Arc<Token>, registrar: Arc<Registrar>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        if ctx.is_shutting_down() || token.is_removed() {
            return;
        }
        match register(&ctx, &token, &registrar).await {
            Outcome::Ready => {
                backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
                if !token.is_ready() {
                    tracing::info!(token = %token.name(), "registered with Apple; token ready");
                }
                ctx.tokens.set_ready(&token);
                read_assets(&ctx, &token).await;
                // Ready: re-read limits, client config and license counts
                // every 5 minutes.
                loop {
                    match wait_for(&ctx, &token, registrar.refresh_every).await {
                        Woken::Shutdown => return,
                        Woken::Register => break,
                        Woken::Timeout => {}
                    }
                    match refresh(&ctx, &token, &registrar).await {
                        Outcome::Ready => read_assets(&ctx, &token).await,
                        Outcome::Retry(message) => {
                            tracing::warn!(token = %token.name(), error = %message, "cannot re-read Apple's config; keeping the last limits")
                        }
                        Outcome::Failed(failure) => {
                            ctx.tokens.set_failed(&token, failure);
                            if let Woken::Shutdown =
                                wait_for(&ctx, &token, registrar.refresh_every).await
                            {
                                return;
                            }
                            break;
                        }
                    }
                }
            }
            Outcome::Failed(failure) => {
                ctx.tokens.set_failed(&token, failure);
                if let Woken::Shutdown = wait_for(&ctx, &token, registrar.refresh_every).await {
                    return;
                }
            }
            Outcome::Retry(message) => {
                let delay = backoff.next_delay();
                tracing::error!(token = %token.name(), error = %message, retry_in = ?delay, "registration with Apple failed");
                if let Woken::Shutdown = wait_for(&ctx, &token, delay).await {
                    return;
                }
            }
        }
    }
}

/// Get Assets with the limits: the counts `GET /v1/tokens/{name}/assets`
/// shows, and a new look for jobs waiting for licenses.
async fn read_assets(ctx: &Context, token: &Token) {
    match crate::runtime::licenses::refresh(ctx, token.name(), token.client()).await {
        Ok(n) => {
            tracing::debug!(token = %token.name(), assets = n, "license counts read");
            ctx.licenses_changed(token.name());
        }
        Err(e) => tracing::warn!(token = %token.name(), error = %e, "cannot read license counts"),
    }
}

fn failed_or_retry(client: &Client, what: &str, error: AppleError) -> Outcome {
    match Failure::from_apple(&error, client.expires_at()) {
        Some(f) => Outcome::Failed(f),
        None => Outcome::Retry(format!("{what}: {error}")),
    }
}

/// Learns the location from client config: its uId (so its notifications
/// are recognised) and name, kept across restarts.
async fn learn(ctx: &Context, token: &Token, current: &ClientConfigResponse) {
    if current.uid.is_empty() {
        return;
    }
    ctx.tokens
        .learned(token, &current.uid, current.location_name.as_deref());
    let store = &ctx.store;
    if let Err(e) = store
        .put_meta(&format!("uid/{}", current.uid), token.name())
        .await
        .and(
            store
                .put_meta(&format!("token/{}/uid", token.name()), &current.uid)
                .await,
        )
    {
        tracing::warn!(token = %token.name(), error = %e, "cannot store the token's uId");
    }
}

async fn register(ctx: &Context, token: &Token, registrar: &Registrar) -> Outcome {
    let client = token.client();
    let expires_at = client.expires_at();
    if expires_at <= time::OffsetDateTime::now_utc() {
        return Outcome::Failed(Failure::Expired { on: expires_at });
    }
    let days_left = (expires_at - time::OffsetDateTime::now_utc()).whole_days();
    if days_left < 15 {
        tracing::warn!(token = %token.name(), days_left, "sToken expires soon; renew it with PUT /v1/tokens/NAME");
    }
    if let Err(e) = client.refresh_limits().await {
        return failed_or_retry(client, "reading service config", e);
    }
    let current = match client.client_config().await {
        Ok(c) => c,
        Err(e) => return failed_or_retry(client, "reading client config", e),
    };
    learn(ctx, token, &current).await;
    let takeover = token.takeover();
    if let Some(info) = &current.mdm_info
        && info.id != registrar.mdm_id
    {
        if !takeover {
            return Outcome::Failed(Failure::OtherMdm {
                name: info.name.clone(),
                id: info.id.clone(),
            });
        }
        tracing::warn!(token = %token.name(), other = %info.name, "taking the location over from another MDM (takeover)");
    }
    // The token's own secret: another customer's never opens its door.
    let secret = match ctx.secrets.ensure(&*ctx.store, token.name()).await {
        Ok(secret) => secret,
        Err(e) => return Outcome::Retry(format!("cannot keep the notification secret: {e}")),
    };
    let request = ClientConfigRequest {
        mdm_info: Some(MdmInfo {
            id: registrar.mdm_id.clone(),
            name: "vppd".into(),
            metadata: env!("CARGO_PKG_VERSION").into(),
        }),
        notification_url: Some(registrar.public_url.clone()),
        notification_auth_token: Some(secret),
        notification_types: Some(vec![
            notification_type::ASSET_MANAGEMENT.into(),
            notification_type::ASSET_COUNT.into(),
            notification_type::USER_MANAGEMENT.into(),
            notification_type::USER_ASSOCIATED.into(),
        ]),
    };
    match client.set_client_config(&request).await {
        Ok(answer) => {
            learn(ctx, token, &answer).await;
            if let Err(e) = ctx.secrets.registered(&*ctx.store, token.name()).await {
                tracing::warn!(token = %token.name(), error = %e, "cannot note the notification secret registered");
            }
        }
        Err(e) if e.error_number() == Some(error_number::NOTIFICATION_URL_UNREACHABLE) => {
            return Outcome::Retry(format!(
                "Apple could not deliver its test notification to {} ({}): check the reverse proxy, firewall and that it reaches notifications.listen",
                registrar.public_url,
                error_number::NOTIFICATION_URL_UNREACHABLE
            ));
        }
        Err(e) => return failed_or_retry(client, "setting client config", e),
    }
    if takeover {
        // Taken over once: if another MDM takes it back, that is news for
        // the operator, not something to fight over.
        ctx.tokens.set_takeover(token, false);
        if let Ok(Some(mut record)) = ctx
            .store
            .tokens()
            .await
            .map(|all| all.into_iter().find(|r| r.name == token.name()))
            && record.takeover
        {
            record.takeover = false;
            let _ = ctx.store.put_token(&record).await;
        }
    }
    Outcome::Ready
}

/// The 5-minute re-read: limits, and whether the location is still ours.
async fn refresh(ctx: &Context, token: &Token, registrar: &Registrar) -> Outcome {
    let client = token.client();
    match client.refresh_limits().await {
        Ok(limits) => tracing::debug!(token = %token.name(), ?limits, "limits refreshed"),
        Err(e) => return failed_or_retry(client, "reading service config", e),
    }
    let current = match client.client_config().await {
        Ok(c) => c,
        Err(e) => return failed_or_retry(client, "reading client config", e),
    };
    learn(ctx, token, &current).await;
    if let Some(info) = &current.mdm_info
        && info.id != registrar.mdm_id
    {
        return Outcome::Failed(Failure::OtherMdm {
            name: info.name.clone(),
            id: info.id.clone(),
        });
    }
    if let Err(e) = ctx.secrets.load(&*ctx.store, token.name()).await {
        tracing::warn!(token = %token.name(), error = %e, "cannot read the notification secret");
    }
    // A secret rotated through any replica, or a notification URL or
    // secret the token's holder changed at Apple: registered again.
    let wanted = ctx.secrets.current(token.name());
    let stale = current.notification_url.as_deref() != Some(registrar.public_url.as_str())
        || (wanted.is_some() && current.notification_auth_token != wanted);
    if stale {
        tracing::info!(token = %token.name(), "the registered notification URL or secret is not vppd's; registering again");
        return register(ctx, token, registrar).await;
    }
    Outcome::Ready
}
