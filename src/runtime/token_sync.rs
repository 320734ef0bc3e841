//! Tokens across replicas: the store is the truth about which tokens exist
//! (added, renewed and removed through any replica), and about each
//! token's state (stored by the replica working it).
//!
//! Alone (sled) the registry in memory is the whole truth and nothing here
//! reads the store back. With replicas, every replica's registry follows
//! the store: at once where an answer depends on it (the token API, a job
//! naming a token this replica has not seen yet, a notification of a
//! location it does not know), and at each round of the lease keeper,
//! which then starts or stops the token's work here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::apple::token::SToken;
use crate::runtime::context::Context;
use crate::runtime::tokens::{Source, Token, TokenDoc};
use crate::store::StoreError;

/// Meta key changed on every token put or delete, so a replica re-reads
/// the token list only when it changed.
pub const CHANGED_KEY: &str = "tokens/changed";

/// Says that the stored tokens changed (after a put or delete).
pub async fn mark_changed(ctx: &Context) {
    if !ctx.shared_store {
        return;
    }
    let marker = uuid::Uuid::new_v4().to_string();
    if let Err(error) = ctx.store.put_meta(CHANGED_KEY, &marker).await {
        tracing::warn!(%error, "cannot mark the token list changed; other replicas see it within a minute");
    }
}

/// The marker as stored now.
pub async fn marker(ctx: &Context) -> Result<Option<String>, StoreError> {
    ctx.store.meta(CHANGED_KEY).await
}

/// Brings the registry in line with the stored tokens: adds those put
/// through another replica, swaps in renewed sTokens, forgets deleted ones
/// (config-file tokens stay: the file names them). A no-op alone.
pub async fn sync(ctx: &Context) -> Result<(), StoreError> {
    if !ctx.shared_store {
        return Ok(());
    }
    // A read of the store taken before a token PUT's write would remove
    // the token that PUT registers just after: syncs wait for token writes.
    let _writing = ctx.token_writes.lock().await;
    sync_holding(ctx).await
}

/// `sync` for a caller already holding `Context::token_writes`.
pub async fn sync_holding(ctx: &Context) -> Result<(), StoreError> {
    if !ctx.shared_store {
        return Ok(());
    }
    let Some(factory) = ctx.clients.clone() else {
        return Ok(());
    };
    let records = ctx.store.tokens().await?;
    let stored: HashSet<String> = records.iter().map(|r| r.name.clone()).collect();
    let mut changed = false;
    for record in records {
        let stoken = match SToken::parse(&record.stoken) {
            Ok(t) => t,
            Err(error) => {
                tracing::error!(token = %record.name, %error, "a stored token cannot be read; PUT it again");
                continue;
            }
        };
        match ctx.tokens.get(&record.name) {
            None => {
                let uid = stored_uid(ctx, &record.name).await?;
                let client = factory.client(&record.name, stoken);
                if let Some(token) =
                    ctx.tokens
                        .insert(&record.name, Source::Api, client, uid, record.takeover)
                {
                    token.set_record_ms(record.updated_ms);
                    tracing::info!(token = %record.name, "token added through another replica");
                    changed = true;
                }
            }
            Some(token) if token.record_ms() != record.updated_ms => {
                token.set_record_ms(record.updated_ms);
                renew(ctx, &token, stoken, record.takeover);
                tracing::info!(token = %record.name, "token renewed through another replica");
                changed = true;
            }
            Some(_) => {}
        }
    }
    for token in ctx.tokens.all() {
        if token.source() == Source::Api && !stored.contains(token.name()) {
            ctx.tokens.remove(token.name());
            tracing::info!(token = %token.name(), "token removed through another replica");
            changed = true;
        }
    }
    if changed {
        ctx.wake_leases.notify_one();
    }
    Ok(())
}

/// Swaps a renewed sToken into a token's client (its rate gate, pause and
/// tasks carry on) and has it register again.
pub fn renew(ctx: &Context, token: &Token, stoken: SToken, takeover: bool) {
    token.client().set_token(stoken);
    ctx.tokens.set_takeover(token, takeover);
    if !token.is_ready() {
        ctx.tokens.set_registering(token);
    }
    token.wake_register.notify_one();
}

/// The uId vppd learned for a token (kept across restarts); `None` when
/// unknown or forgotten.
pub async fn stored_uid(ctx: &Context, name: &str) -> Result<Option<String>, StoreError> {
    Ok(ctx
        .store
        .meta(&format!("token/{name}/uid"))
        .await?
        .filter(|u| !u.is_empty()))
}

/// The token serving a notification's uId. Another replica may have
/// learned it (the token is worked there): the store knows it then.
pub async fn token_of_uid(ctx: &Context, uid: &str) -> Option<String> {
    if let Some(name) = ctx.tokens.token_for_uid(uid) {
        return Some(name);
    }
    if !ctx.shared_store || uid.is_empty() {
        return None;
    }
    let name = match ctx.store.meta(&format!("uid/{uid}")).await {
        Ok(Some(name)) if !name.is_empty() => name,
        Ok(_) => return None,
        Err(error) => {
            // The store just failed, so the listener's commit would too.
            tracing::warn!(%error, "cannot look a notification's uId up");
            return None;
        }
    };
    if !ctx.tokens.contains(&name)
        && let Err(error) = sync(ctx).await
    {
        tracing::warn!(%error, "cannot read the stored tokens");
    }
    let token = ctx.tokens.get(&name)?;
    ctx.tokens.learned(&token, uid, None);
    Some(name)
}

/// Whether a notification's uId belongs to a token vppd serves.
pub async fn knows_uid(ctx: &Context, uid: &str) -> bool {
    token_of_uid(ctx, uid).await.is_some()
}

/// The uId of the token `name`, as this replica or the store knows it.
pub async fn uid_of(ctx: &Context, name: &str) -> Option<String> {
    if let Some(uid) = ctx.tokens.get(name).and_then(|t| t.uid()) {
        return Some(uid);
    }
    match ctx.store.meta(&format!("token/{name}/uid")).await {
        Ok(uid) => uid.filter(|u| !u.is_empty()),
        Err(error) => {
            tracing::warn!(%error, "cannot read a token's uId");
            None
        }
    }
}

/// The token of the job that sent `event_id`, if vppd sent it.
pub async fn token_of_event(ctx: &Context, event_id: &str) -> Option<String> {
    let job_id = match ctx.sent.batch_of(event_id) {
        Some((job_id, _)) => job_id,
        None => match ctx
            .store
            .event(&crate::store::EventId::from(event_id))
            .await
        {
            Ok(Some(event)) => event.job_id,
            Ok(None) => return None,
            Err(error) => {
                tracing::warn!(%error, "cannot look a notification's event up");
                return None;
            }
        },
    };
    match ctx.store.job(&job_id).await {
        Ok(job) => job.map(|j| j.token().to_string()),
        Err(error) => {
            tracing::warn!(%error, "cannot read the job of a notification's event");
            None
        }
    }
}

/// Every token's document: this replica's view of the tokens it works,
/// the stored view (from the replica working it) of the others.
pub async fn docs(ctx: &Context) -> Result<Vec<TokenDoc>, StoreError> {
    sync(ctx).await?;
    let tokens = ctx.tokens.all();
    if !ctx.shared_store {
        return Ok(tokens.iter().map(|t| t.doc()).collect());
    }
    let stored: HashMap<String, String> = ctx.store.token_states().await?.into_iter().collect();
    Ok(tokens
        .iter()
        .map(|t| view(t, stored.get(t.name()).map(String::as_str)))
        .collect())
}

/// One token's document (see [`docs`]); `None` when there is no such token.
pub async fn doc(ctx: &Context, name: &str) -> Result<Option<TokenDoc>, StoreError> {
    if !ctx.tokens.contains(name) {
        sync(ctx).await?;
    }
    let Some(token) = ctx.tokens.get(name) else {
        return Ok(None);
    };
    if !ctx.shared_store || token.is_worked() {
        return Ok(Some(token.doc()));
    }
    let stored = ctx
        .store
        .token_states()
        .await?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s);
    Ok(Some(view(&token, stored.as_deref())))
}

fn view(token: &Arc<Token>, stored: Option<&str>) -> TokenDoc {
    let local = token.doc();
    if token.is_worked() {
        return local;
    }
    match stored.and_then(|s| serde_json::from_str::<TokenDoc>(s).ok()) {
        Some(mut doc) => {
            doc.name = local.name;
            doc.source = local.source;
            doc
        }
        None => local,
    }
}

/// Stores the state of the tokens this replica works whenever it changes,
/// for the other replicas to show. Runs only with replicas.
pub async fn publish_states(ctx: Arc<Context>) {
    loop {
        tokio::select! {
            _ = ctx.tokens.wake_publish.notified() => {}
            _ = ctx.shutdown_signal() => return,
        }
        for name in ctx.tokens.take_dirty() {
            let Some(token) = ctx.tokens.get(&name) else {
                continue;
            };
            if !token.is_worked() {
                continue;
            }
            let doc = token.doc();
            let Ok(json) = serde_json::to_string(&doc) else {
                continue;
            };
            if let Err(error) = ctx.store.put_token_state(&name, &json).await {
                tracing::warn!(token = %name, %error, "cannot store the token's state; other replicas show an older one");
            }
        }
    }
}
