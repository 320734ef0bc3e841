//! The admin listener: the job API, the token API, `/metrics`, `/healthz`,
//! `/readyz`.
//!
//! A job is validated completely before anything is stored, then stored (its
//! record and spec) in one transaction and flushed before the 202: a
//! rejected job leaves nothing behind, an accepted one survives a crash.

use std::collections::HashMap;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use sha2::Digest;

use crate::apple::token::SToken;
use crate::domain::job::{
    Failure, JobLimits, JobRequest, JobSpec, JobState, JobStatus, Phase, Target,
};
use crate::domain::lifecycle::{BatchRecord, JobChange, JobRecord, now_ms};
use crate::domain::plan::Shape;
use crate::runtime::context::Context;
use crate::runtime::http::{self, Body};
use crate::runtime::tokens::Source;
use crate::store::{Created, JobId, Store, StoreError, TokenRecord};

mod users;

/// Failures listed inline in a status document; the rest are at `/failures`.
const INLINE_FAILURES: usize = 100;

pub struct Admin {
    ctx: Arc<Context>,
    token: Option<String>,
    max_body: usize,
    limits: JobLimits,
}

impl Admin {
    pub fn new(
        ctx: Arc<Context>,
        token: Option<String>,
        max_body: usize,
        limits: JobLimits,
    ) -> Admin {
        Admin {
            ctx,
            token,
            max_body,
            limits,
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let method = req.method().clone();
        match (method.clone(), path.as_str()) {
            (Method::GET, "/healthz") => return http::text(StatusCode::OK, "ok\n"),
            (Method::GET, "/readyz") => {
                return if self.ctx.is_ready()
                    && !self.ctx.draining.load(std::sync::atomic::Ordering::SeqCst)
                {
                    http::text(StatusCode::OK, "ready\n")
                } else {
                    http::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                };
            }
            (Method::GET, "/metrics") => return self.metrics().await,
            _ => {}
        }
        if let Some(expected) = &self.token
            && (path.starts_with("/v1/jobs") || path.starts_with("/v1/tokens"))
            && !http::secret_matches(http::bearer(&req), expected)
        {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin bearer token".into(),
            );
        }
        if let Some(name) = path
            .strip_prefix("/v1/tokens/")
            .and_then(|r| r.strip_suffix("/assets"))
            .filter(|n| !n.is_empty() && !n.contains('/'))
        {
            return match method {
                Method::GET => self.assets(&http::percent_decode(name)).await,
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into()),
            };
        }
        if let Some(name) = path
            .strip_prefix("/v1/tokens/")
            .and_then(|r| r.strip_suffix("/users"))
            .filter(|n| !n.is_empty() && !n.contains('/'))
        {
            let query = http::query_pairs(req.uri().query());
            return match method {
                Method::GET => {
                    users::document(&self.ctx, &http::percent_decode(name), &query).await
                }
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into()),
            };
        }
        if let Some(name) = path
            .strip_prefix("/v1/tokens/")
            .and_then(|r| r.strip_suffix("/rotate-secret"))
            .filter(|n| !n.is_empty() && !n.contains('/'))
        {
            return match method {
                Method::POST => self.rotate_secret(&http::percent_decode(name)).await,
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "use POST".into()),
            };
        }
        if let Some(name) = path
            .strip_prefix("/v1/tokens/")
            .and_then(|r| r.strip_suffix("/drift"))
            .filter(|n| !n.is_empty() && !n.contains('/'))
        {
            return match method {
                Method::GET => self.drift(&http::percent_decode(name)).await,
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into()),
            };
        }
        let (jobs, rest) = if let Some(rest) = path.strip_prefix("/v1/jobs") {
            (true, rest)
        } else if let Some(rest) = path.strip_prefix("/v1/tokens") {
            (false, rest)
        } else {
            return error(StatusCode::NOT_FOUND, "not found".into());
        };
        if !rest.is_empty() && !rest.starts_with('/') {
            return error(StatusCode::NOT_FOUND, "not found".into());
        }
        if !jobs {
            let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
            return match (method, segments.as_slice()) {
                (Method::GET, []) => self.list_tokens().await,
                (Method::GET, [name]) => self.show_token(&http::percent_decode(name)).await,
                (Method::PUT, [name]) => self.put_token(&http::percent_decode(name), req).await,
                (Method::DELETE, [name]) => self.delete_token(&http::percent_decode(name)).await,
                (_, [] | [_]) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into()),
                _ => error(StatusCode::NOT_FOUND, "not found".into()),
            };
        }
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        match (method, segments.as_slice()) {
            (Method::POST, []) => self.create(req).await,
            (Method::GET, []) => self.list().await,
            (Method::GET, [id]) => self.show(&job_id(id)).await,
            (Method::GET, [id, "failures"]) => self.failures(&job_id(id)).await,
            (Method::DELETE, [id]) => self.cancel(&job_id(id)).await,
            (_, [] | [_] | [_, "failures"]) => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
            }
            _ => error(StatusCode::NOT_FOUND, "not found".into()),
        }
    }

    /// `GET /v1/tokens/{name}/drift`: what changed at Apple outside vppd.
    async fn drift(&self, token: &str) -> Response<Body> {
        if !self.ctx.tokens.contains(token)
            && let Err(e) = crate::runtime::token_sync::sync(&self.ctx).await
        {
            return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
        if !self.ctx.tokens.contains(token) {
            return error(StatusCode::NOT_FOUND, format!("no token `{token}`"));
        }
        match self.ctx.store.drift(token).await {
            Ok(record) => http::json(
                StatusCode::OK,
                &crate::domain::lifecycle::drift_document(record.as_ref()),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    /// `GET /v1/tokens/{name}/assets`: license counts as vppd last learned
    /// them (Get Assets, ASSET_COUNT deltas, its own confirmed changes).
    async fn assets(&self, token: &str) -> Response<Body> {
        if !self.ctx.tokens.contains(token)
            && let Err(e) = crate::runtime::token_sync::sync(&self.ctx).await
        {
            return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
        if !self.ctx.tokens.contains(token) {
            return error(StatusCode::NOT_FOUND, format!("no token `{token}`"));
        }
        let records = match self.ctx.store.licenses(token).await {
            Ok(r) => r,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        let assets: Vec<serde_json::Value> = records
            .into_iter()
            .map(|(adam_id, pricing_param, r)| {
                serde_json::json!({
                    "adamId": adam_id,
                    "pricingParam": pricing_param,
                    "productType": r.product_type,
                    "totalCount": r.total_count,
                    "assignedCount": r.assigned_count,
                    "availableCount": r.available_count,
                    "updatedAt": crate::domain::lifecycle::format_ms(r.updated_ms.max(r.read_ms)),
                })
            })
            .collect();
        http::json(StatusCode::OK, &serde_json::json!({ "assets": assets }))
    }

    async fn metrics(&self) -> Response<Body> {
        if let Ok(jobs) = self.ctx.store.jobs().await {
            for state in JobState::ALL {
                let n = jobs.iter().filter(|j| j.state() == state).count();
                self.ctx
                    .metrics
                    .jobs
                    .with_label_values(&[state.as_str()])
                    .set(n as i64);
            }
            let pending: u64 = jobs.iter().map(|j| j.installs().pending).sum();
            self.ctx.metrics.installs_pending.set(pending as i64);
        }
        // Counts move with every confirmed change: computed when scraped,
        // for the tokens this replica works (one series per token).
        for token in self.ctx.tokens.all().iter().filter(|t| t.is_worked()) {
            let token = token.name();
            if let Err(e) = crate::runtime::licenses::update_low_metric(&self.ctx, token).await {
                tracing::warn!(token = %token, error = %e, "cannot read license counts for the metric");
            }
        }
        self.ctx.metrics.ready.set(self.ctx.is_ready() as i64);
        http::bytes_response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            self.ctx.metrics.render().into(),
        )
    }

    async fn create(&self, req: Request<Incoming>) -> Response<Body> {
        if self.ctx.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "vppd is shutting down; not taking jobs".into(),
            );
        }
        if !http::is_json(&req) {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json".into(),
            );
        }
        if http::content_length(&req).is_some_and(|n| n > self.max_body as u64) {
            http::drain(req.into_body(), http::DRAIN_LIMIT).await;
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over admin.max_body_bytes ({} bytes)", self.max_body),
            );
        }
        let body = match http::read_body(req.into_body(), self.max_body).await {
            Ok(b) => b,
            Err(http::BodyError::TooLarge { limit }) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body over admin.max_body_bytes ({limit} bytes)"),
                );
            }
            Err(e) => return error(e.status(), e.to_string()),
        };
        let request: JobRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid job: {e}")),
        };
        // A million-device body is tens of MB: not kept beside its spec.
        drop(body);
        // A token added through another replica moments ago.
        if !self.ctx.tokens.contains(&request.token)
            && let Err(e) = crate::runtime::token_sync::sync(&self.ctx).await
        {
            tracing::warn!(error = %e, "cannot read the stored tokens");
        }
        let spec = match request.validate(|t| self.ctx.tokens.contains(t), self.limits) {
            Ok(s) => s,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
        };
        let shape = self
            .ctx
            .tokens
            .get(&spec.token)
            .map(|t| Shape::from(&t.client().limits()))
            .unwrap_or_else(|| Shape::from(&Default::default()));
        let record = new_record(&spec, shape);
        let spec = Arc::new(spec);
        let created = match self.ctx.store.create_job(&spec, record).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot store a job");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot store the job".into(),
                );
            }
        };
        match created {
            Created::New(job) => {
                for phase in [Phase::Disassociate, Phase::Associate] {
                    self.ctx
                        .metrics
                        .assignments
                        .with_label_values(&[phase.as_str(), "planned"])
                        .inc_by(spec.pair_count(phase));
                }
                tracing::info!(job = %job.id(), token = %job.token(), assignments = job.tally(Phase::Associate).total(), disassociations = job.tally(Phase::Disassociate).total(), requests = job.requests().planned, "job accepted");
                self.ctx.wake_submitter(job.token());
                http::json(
                    StatusCode::ACCEPTED,
                    &self.waiting(job.status(Some(Vec::new()), false)).await,
                )
            }
            Created::Existing(job) => self.status_response(StatusCode::OK, &job).await,
            Created::Conflict => error(
                StatusCode::CONFLICT,
                format!("id: job `{}` exists with a different body", spec.id),
            ),
        }
    }

    async fn status_response(&self, code: StatusCode, job: &JobRecord) -> Response<Body> {
        match failures(self.ctx.store.as_ref(), job.id(), INLINE_FAILURES).await {
            Ok((failures, truncated)) => http::json(
                code,
                &self.waiting(job.status(Some(failures), truncated)).await,
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot read failures");
                http::json(code, &self.waiting(job.status(None, false)).await)
            }
        }
    }

    async fn list(&self) -> Response<Body> {
        match self.ctx.store.jobs().await {
            Ok(jobs) => {
                let waits: HashMap<String, Option<String>> =
                    match crate::runtime::token_sync::docs(&self.ctx).await {
                        Ok(docs) => docs
                            .into_iter()
                            .map(|d| (d.name.clone(), d.waiting_for()))
                            .collect(),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the tokens' states");
                            HashMap::new()
                        }
                    };
                let docs: Vec<_> = jobs
                    .iter()
                    .map(|j| {
                        let mut doc = j.status(None, false);
                        if !doc.state.is_final()
                            && let Some(Some(why)) = waits.get(&doc.token)
                        {
                            doc.waiting_for = Some(why.clone());
                        }
                        doc
                    })
                    .collect();
                http::json(StatusCode::OK, &serde_json::json!({ "jobs": docs }))
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn show(&self, id: &JobId) -> Response<Body> {
        match self.ctx.store.job(id).await {
            Ok(Some(job)) => self.status_response(StatusCode::OK, &job).await,
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn failures(&self, id: &JobId) -> Response<Body> {
        match self.ctx.store.job(id).await {
            Ok(Some(_)) => match failures(self.ctx.store.as_ref(), id, usize::MAX).await {
                Ok((failures, _)) => {
                    http::json(StatusCode::OK, &serde_json::json!({ "failures": failures }))
                }
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            },
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    /// Cancels what is not yet submitted; what Apple already has goes on
    /// being tracked (its licenses exist) and confirmed installs are still
    /// released. A batch being sent is reconciled by its submitter, which
    /// is woken for it, and never sent again.
    async fn cancel(&self, id: &JobId) -> Response<Body> {
        match self.ctx.store.update_job(id, JobChange::Cancel).await {
            Ok(Some(job)) => {
                tracing::info!(job = %id, state = job.state().as_str(), "job cancel requested");
                if job.sending().is_some() {
                    self.ctx.wake_submitter(job.token());
                }
                self.status_response(StatusCode::OK, &job).await
            }
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}

/// The body of `PUT /v1/tokens/{name}`. `Debug` never shows the sToken.
#[derive(serde::Deserialize)]
struct PutToken {
    stoken: String,
    #[serde(default)]
    takeover: bool,
    /// Replace a token whose location vppd knows even with an sToken
    /// Apple refuses.
    #[serde(default)]
    force: bool,
}

impl Admin {
    /// Says why an unfinished job does not move when its token is not
    /// ready (ahead of any wait for licenses: nothing is asked of Apple
    /// before the token is ready).
    async fn waiting(&self, mut doc: JobStatus) -> JobStatus {
        if doc.state.is_final() {
            return doc;
        }
        match crate::runtime::token_sync::doc(&self.ctx, &doc.token).await {
            Ok(Some(token)) => {
                if let Some(why) = token.waiting_for() {
                    doc.waiting_for = Some(why);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the token's state"),
        }
        doc
    }

    async fn list_tokens(&self) -> Response<Body> {
        match crate::runtime::token_sync::docs(&self.ctx).await {
            Ok(docs) => http::json(StatusCode::OK, &serde_json::json!({ "tokens": docs })),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn show_token(&self, name: &str) -> Response<Body> {
        match crate::runtime::token_sync::doc(&self.ctx, name).await {
            Ok(Some(doc)) => http::json(StatusCode::OK, &doc),
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no token `{name}`")),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    /// Adds a token, or renews / takes over one: the same location (uId)
    /// keeps its client, rate gate and jobs, with the new sToken swapped in.
    async fn put_token(&self, name: &str, req: Request<Incoming>) -> Response<Body> {
        let (put, stoken, factory) = match self.read_put(name, req).await {
            Ok(read) => read,
            Err(response) => return response,
        };
        if let Err(e) = crate::runtime::token_sync::sync(&self.ctx).await {
            return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
        let (_writing, existing) = match self.lock_for_put(name, &factory, &stoken, put.force).await
        {
            Ok(locked) => locked,
            Err(response) => return response,
        };
        let record = TokenRecord {
            name: name.to_string(),
            stoken: put.stoken.trim().to_string(),
            takeover: put.takeover,
            updated_ms: now_ms(),
        };
        if let Err(e) = self.ctx.store.put_token(&record).await {
            tracing::error!(token = %name, error = %e, "cannot store a token");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot store the token".into(),
            );
        }
        let Some(existing) = existing else {
            let client = factory.client(name, stoken);
            // Nothing registers a name while the token lock is held.
            let Some(token) = self
                .ctx
                .tokens
                .insert(name, Source::Api, client, None, put.takeover)
            else {
                return error(
                    StatusCode::CONFLICT,
                    format!("token `{name}` is being added by another request"),
                );
            };
            token.set_record_ms(record.updated_ms);
            tracing::info!(token = %name, "token added");
            crate::runtime::token_sync::mark_changed(&self.ctx).await;
            self.ctx.wake_leases.notify_one();
            return http::json(StatusCode::CREATED, &token.doc());
        };
        existing.set_record_ms(record.updated_ms);
        crate::runtime::token_sync::renew(&self.ctx, &existing, stoken, put.takeover);
        tracing::info!(token = %name, takeover = put.takeover, "token replaced");
        crate::runtime::token_sync::mark_changed(&self.ctx).await;
        http::json(StatusCode::OK, &existing.doc())
    }

    /// Checks a token PUT and reads its body: the document, its sToken,
    /// and what builds the token's client; or the response refusing it.
    async fn read_put(
        &self,
        name: &str,
        req: Request<Incoming>,
    ) -> Result<(PutToken, SToken, crate::runtime::tokens::ClientFactory), Response<Body>> {
        if self.ctx.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "vppd is shutting down; not taking token changes".into(),
            ));
        }
        if !valid_token_name(name) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "name: `{name}` is not a token name (1 to 64 letters, digits, '.', '_' or '-')"
                ),
            ));
        }
        if !http::is_json(&req) {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json".into(),
            ));
        }
        let body = match http::read_body(req.into_body(), TOKEN_BODY_MAX).await {
            Ok(b) => b,
            Err(http::BodyError::TooLarge { limit }) => {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body over {limit} bytes: a token document is a few KiB"),
                ));
            }
            Err(e) => return Err(error(StatusCode::BAD_REQUEST, e.to_string())),
        };
        // serde's messages could quote the sToken: say only what is wrong.
        let put: PutToken = serde_json::from_slice(&body).map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid token body: expected {\"stoken\": \"<the token file's content>\", \"takeover\": false}".into(),
            )
        })?;
        let stoken = SToken::parse(&put.stoken)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("stoken: {e}")))?;
        let Some(factory) = self.ctx.clients.clone() else {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this vppd cannot add tokens".into(),
            ));
        };
        Ok((put, stoken, factory))
    }

    /// Takes the token lock for a PUT of `name`, with the token of that
    /// name as it is under the lock.
    ///
    /// Another location under this name would mix two customers' jobs and
    /// notifications: refused, unless vppd never learned which location
    /// the name served. Apple is asked before the token lock is taken (the
    /// lease keeper's sync waits on that lock), so the token is looked at
    /// again under the lock: if another request changed it meanwhile, it
    /// is checked again.
    async fn lock_for_put(
        &self,
        name: &str,
        factory: &crate::runtime::tokens::ClientFactory,
        stoken: &SToken,
        force: bool,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'_, ()>,
            Option<Arc<crate::runtime::tokens::Token>>,
        ),
        Response<Body>,
    > {
        let mut attempts = 0;
        loop {
            let checked = self.ctx.tokens.get(name);
            if let Some(existing) = &checked
                && let Some(uid) = existing.uid()
            {
                same_location(name, existing, &uid, factory, stoken, force).await?;
            }
            // From here to the last write no other change to the tokens,
            // and no sync reading them back, runs in this process: the
            // store and the registry end up holding the same sToken.
            let writing = self.ctx.token_writes.lock().await;
            let existing = self.ctx.tokens.get(name);
            let still = match (&checked, &existing) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                // Added meanwhile: no location to check against yet.
                (_, Some(b)) => b.uid().is_none(),
                (_, None) => true,
            };
            if still {
                return Ok((writing, existing));
            }
            attempts += 1;
            if attempts == 3 {
                return Err(error(
                    StatusCode::CONFLICT,
                    format!("token `{name}` keeps being changed by other requests; try again"),
                ));
            }
        }
    }

    /// A new notification secret for the token; the old one is accepted
    /// for [`crate::runtime::secrets::GRACE`] more. The token's worker
    /// registers the new one: at once here, at its next look at the client
    /// config (`apple.refresh_every`) on another replica.
    async fn rotate_secret(&self, name: &str) -> Response<Body> {
        let Some(token) = self.ctx.tokens.get(name) else {
            return error(StatusCode::NOT_FOUND, format!("no token `{name}`"));
        };
        if let Err(e) = self.ctx.secrets.rotate(&*self.ctx.store, name).await {
            tracing::error!(token = %name, error = %e, "cannot rotate a notification secret");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot store the new notification secret".into(),
            );
        }
        tracing::info!(token = %name, "notification secret rotated; the old one is accepted for 10 more minutes");
        token.wake_register.notify_one();
        http::json(StatusCode::OK, &token.doc())
    }

    async fn delete_token(&self, name: &str) -> Response<Body> {
        let _writing = self.ctx.token_writes.lock().await;
        if let Err(e) = crate::runtime::token_sync::sync_holding(&self.ctx).await {
            return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
        let Some(token) = self.ctx.tokens.get(name) else {
            return error(StatusCode::NOT_FOUND, format!("no token `{name}`"));
        };
        if token.source() == Source::Config {
            return error(
                StatusCode::CONFLICT,
                format!("token `{name}` is in the config file: remove it there and restart vppd"),
            );
        }
        // The token's jobs only (an index on either store): the token lock
        // is held meanwhile, and every sync waits for it.
        let unfinished = match self.ctx.store.jobs_of(name).await {
            Ok(jobs) => jobs.iter().filter(|j| !j.state().is_final()).count(),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
        if unfinished > 0 {
            return error(
                StatusCode::CONFLICT,
                format!(
                    "token `{name}` has {unfinished} unfinished jobs: cancel them or let them finish first"
                ),
            );
        }
        if let Err(e) = self.ctx.store.delete_token(name).await {
            tracing::error!(token = %name, error = %e, "cannot delete a token");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot delete the token".into(),
            );
        }
        // Its secret is answered and ignored for a grace, then refused.
        if let Err(e) = self.ctx.secrets.deleted(&*self.ctx.store, name).await {
            tracing::warn!(token = %name, error = %e, "cannot retire the token's notification secret");
        }
        // Its location's notifications are foreign from now on, whichever
        // replica receives them.
        let uid = match token.uid() {
            Some(uid) => Some(uid),
            None => crate::runtime::token_sync::stored_uid(&self.ctx, name)
                .await
                .ok()
                .flatten(),
        };
        let mut forgotten = self
            .ctx
            .store
            .put_meta(&format!("token/{name}/uid"), "")
            .await;
        if let Some(uid) = &uid
            && forgotten.is_ok()
        {
            forgotten = self.ctx.store.put_meta(&format!("uid/{uid}"), "").await;
        }
        if let Err(e) = forgotten {
            tracing::warn!(token = %name, error = %e, "cannot forget the token's location");
        }
        let doc = crate::runtime::token_sync::doc(&self.ctx, name)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| token.doc());
        self.ctx.tokens.remove(name);
        tracing::info!(token = %name, "token removed");
        crate::runtime::token_sync::mark_changed(&self.ctx).await;
        self.ctx.wake_leases.notify_one();
        http::json(StatusCode::OK, &doc)
    }
}

/// A token body holds one sToken (a few KiB) and a flag.
const TOKEN_BODY_MAX: usize = 64 * 1024;

/// Token names appear in URLs, metric labels and logs.
fn valid_token_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl http::Handler for Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        self.route(req).await
    }
}

/// The job a URL names. Not checked like a new job's id: an id no job can
/// have is simply not found.
fn job_id(segment: &str) -> JobId {
    JobId::from(http::percent_decode(segment))
}

fn error(status: StatusCode, message: String) -> Response<Body> {
    http::unavailable_retry(http::json(status, &serde_json::json!({ "error": message })))
}

/// Asks Apple which location `stoken` is for: refused (409) when it is not
/// `uid`, the location the token `name` serves; a 503 when Apple cannot
/// tell now. An sToken Apple refuses (expired, revoked, invalid) never
/// replaces the working one of a known location (409 naming why), unless
/// `force`: the customer's jobs would wait on it.
async fn same_location(
    name: &str,
    existing: &crate::runtime::tokens::Token,
    uid: &str,
    factory: &crate::runtime::tokens::ClientFactory,
    stoken: &SToken,
    force: bool,
) -> Result<(), Response<Body>> {
    let probe = factory.probe(name, stoken.clone());
    let answer = probe.client_config().await;
    existing.client().republish_expiry();
    match answer {
        Ok(cc) if !cc.uid.is_empty() && cc.uid != uid => Err(error(
            StatusCode::CONFLICT,
            format!(
                "token `{name}` serves location {uid}; this sToken is for location {} ({}): add it under another name",
                cc.uid,
                cc.location_name.as_deref().unwrap_or("unnamed")
            ),
        )),
        Ok(_) => Ok(()),
        Err(e) if e.is_token_refused() && force => {
            tracing::warn!(token = %name, "replacing a token with an sToken Apple refuses (force)");
            Ok(())
        }
        Err(e) if e.is_token_refused() => Err(error(
            StatusCode::CONFLICT,
            format!(
                "Apple refuses this sToken ({e}); token `{name}` keeps the one it has (send \"force\": true to replace it anyway)"
            ),
        )),
        Err(e) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot ask Apple which location this sToken is for ({e}); try again"),
        )),
    }
}

/// Hash of the normalized spec: what makes two posts "the same job".
pub fn spec_hash(spec: &JobSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The record of a job that has not started.
pub fn new_record(spec: &JobSpec, shape: Shape) -> JobRecord {
    JobRecord::new(spec, spec_hash(spec), shape, now_ms())
}

/// Failed pairs of a job in the job API's terms, at most `limit`, and
/// whether more exist.
pub async fn failures(
    store: &dyn Store,
    job_id: &JobId,
    limit: usize,
) -> Result<(Vec<Failure>, bool), StoreError> {
    let Some(spec) = store.spec(job_id).await? else {
        return Ok((Vec::new(), false));
    };
    let (stored, more) = store.failures(job_id, limit).await?;
    let mut batches: std::collections::HashMap<u32, Option<BatchRecord>> = Default::default();
    let mut out = Vec::with_capacity(stored.len());
    for f in stored {
        let batch = match batches.entry(f.batch) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(store.batch(job_id, f.batch).await?)
            }
        };
        let Some(batch) = batch else {
            continue;
        };
        // A revoke batch fails whole targets: Apple names no asset then.
        let found = match batch.phase() {
            Phase::Revoke => {
                crate::domain::pairs::target_at(&spec, batch, f.pair).map(|t| (None, t))
            }
            _ => {
                crate::domain::pairs::pair(&spec, batch, f.pair).map(|p| (Some(p.asset), p.target))
            }
        };
        let Some((asset, target)) = found else {
            continue;
        };
        let (serial_number, client_user_id) = match target {
            Target::Serial(s) => (Some(s.to_string()), None),
            Target::User(u) => (None, Some(u.to_string())),
        };
        out.push(Failure {
            adam_id: asset.map(|a| a.adam_id.clone()).unwrap_or_default(),
            pricing_param: asset.map(|a| a.pricing_param.clone()).unwrap_or_default(),
            serial_number,
            client_user_id,
            error_number: f.record.error_number,
            error_message: f.record.error_message,
            event_id: f.record.event_id,
            phase: (batch.phase() != Phase::Associate).then_some(batch.phase()),
        });
    }
    Ok((out, more))
}
