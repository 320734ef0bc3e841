//! The admin listener: the job API, `/metrics`, `/healthz`, `/readyz`.
//!
//! A job is validated completely before anything is stored, then stored (its
//! record and spec) in one transaction and flushed before the 202: a
//! rejected job leaves nothing behind, an accepted one survives a crash.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use sha2::Digest;

use crate::context::Context;
use crate::http::{self, Body};
use crate::job::{Failure, JobRequest, JobSpec, JobState, Phase, Target};
use crate::lifecycle::{BatchRecord, JobChange, JobRecord, now_ms};
use crate::plan::Shape;
use crate::store::{Created, Store, StoreError};

/// Failures listed inline in a status document; the rest are at `/failures`.
const INLINE_FAILURES: usize = 100;

pub struct Admin {
    ctx: Arc<Context>,
    token: Option<String>,
    max_body: usize,
    max_targets: usize,
}

impl Admin {
    pub fn new(
        ctx: Arc<Context>,
        token: Option<String>,
        max_body: usize,
        max_targets: usize,
    ) -> Admin {
        Admin {
            ctx,
            token,
            max_body,
            max_targets,
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
            && (path.starts_with("/v1/jobs") || path.starts_with("/v1/tokens/"))
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
            .and_then(|r| r.strip_suffix("/drift"))
            .filter(|n| !n.is_empty() && !n.contains('/'))
        {
            return match method {
                Method::GET => self.drift(&http::percent_decode(name)).await,
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into()),
            };
        }
        let Some(rest) = path.strip_prefix("/v1/jobs") else {
            return error(StatusCode::NOT_FOUND, "not found".into());
        };
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        match (method, segments.as_slice()) {
            (Method::POST, []) => self.create(req).await,
            (Method::GET, []) => self.list().await,
            (Method::GET, [id]) => self.show(&http::percent_decode(id)).await,
            (Method::GET, [id, "failures"]) => self.failures(&http::percent_decode(id)).await,
            (Method::DELETE, [id]) => self.cancel(&http::percent_decode(id)).await,
            (_, [] | [_] | [_, "failures"]) => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into())
            }
            _ => error(StatusCode::NOT_FOUND, "not found".into()),
        }
    }

    /// `GET /v1/tokens/{name}/drift`: what changed at Apple outside vppd.
    async fn drift(&self, token: &str) -> Response<Body> {
        if !self.ctx.clients.contains_key(token) {
            return error(
                StatusCode::NOT_FOUND,
                format!("token `{token}` is not a configured token"),
            );
        }
        match self.ctx.store.drift(token).await {
            Ok(record) => http::json(
                StatusCode::OK,
                &crate::lifecycle::drift_document(record.as_ref()),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    /// `GET /v1/tokens/{name}/assets`: license counts as vppd last learned
    /// them (Get Assets, ASSET_COUNT deltas, its own confirmed changes).
    async fn assets(&self, token: &str) -> Response<Body> {
        if !self.ctx.clients.contains_key(token) {
            return error(
                StatusCode::NOT_FOUND,
                format!("token `{token}` is not a configured token"),
            );
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
                    "updatedAt": crate::lifecycle::format_ms(r.updated_ms.max(r.read_ms)),
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
        // Counts move with every confirmed change: computed when scraped.
        for token in self.ctx.clients.keys() {
            if let Err(e) = crate::licenses::update_low_metric(&self.ctx, token).await {
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
        let spec = match request.validate(|t| self.ctx.clients.contains_key(t), self.max_targets) {
            Ok(s) => s,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
        };
        let shape = self
            .ctx
            .clients
            .get(&spec.token)
            .map(|c| Shape::from(&c.limits()))
            .unwrap_or_else(|| Shape::from(&Default::default()));
        let record = new_record(&spec, shape);
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
                http::json(StatusCode::ACCEPTED, &job.status(Some(Vec::new()), false))
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
            Ok((failures, truncated)) => http::json(code, &job.status(Some(failures), truncated)),
            Err(e) => {
                tracing::error!(error = %e, "cannot read failures");
                http::json(code, &job.status(None, false))
            }
        }
    }

    async fn list(&self) -> Response<Body> {
        match self.ctx.store.jobs().await {
            Ok(jobs) => {
                let docs: Vec<_> = jobs.iter().map(|j| j.status(None, false)).collect();
                http::json(StatusCode::OK, &serde_json::json!({ "jobs": docs }))
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn show(&self, id: &str) -> Response<Body> {
        match self.ctx.store.job(id).await {
            Ok(Some(job)) => self.status_response(StatusCode::OK, &job).await,
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn failures(&self, id: &str) -> Response<Body> {
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
    async fn cancel(&self, id: &str) -> Response<Body> {
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

impl http::Handler for Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        self.route(req).await
    }
}

fn error(status: StatusCode, message: String) -> Response<Body> {
    http::json(status, &serde_json::json!({ "error": message }))
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
    job_id: &str,
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
            Phase::Revoke => crate::pairs::target_at(&spec, batch, f.pair).map(|t| (None, t)),
            _ => crate::pairs::pair(&spec, batch, f.pair).map(|p| (Some(p.asset), p.target)),
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
