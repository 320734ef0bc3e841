//! The shared backend: one PostgreSQL database for several replicas.
//!
//! Tables (see `migrations/`): `jobs`, `batches` (with an `open` flag and
//! the token, so the trackers read only open batches), `events`,
//! `failures`, `seen` (notification dedupe), `inbox`, `outbox`, `meta`,
//! `licenses`, `users`, `held` (installs waiting for their user), `leases`,
//! `parked` (notifications waiting for their event, by eventId and by park
//! time), and `schema_version`. Records are the
//! same serialized bytes the sled backend keeps; the key columns are typed.
//!
//! Every change is one transaction at READ COMMITTED that locks the rows it
//! rewrites (`SELECT ... FOR UPDATE`) before reading them, so two commits of
//! the same job or batch, from any process, are serialized and none
//! overwrites the other. Locks are taken in one order (outbox entries, then
//! jobs by id, then batches) so that changes of several records do not
//! deadlock; a deadlock or serialization failure the server reports anyway
//! is retried. A commit that returns is durable (the server's
//! `synchronous_commit`, on by default, is what makes it so).
//!
//! The URL is a secret (it holds the password): it is parsed here and never
//! stored, printed or put into an error.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::{Serialize, de::DeserializeOwned};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::{
    Created, Fold, InboxId, InboxItem, Lease, LicenseRecord, OutboxAck, OutboxId, OutboxItem,
    PairFailure, Recorded, Released, Settled, Store, StoreError, StoreFuture, TokenRecord,
    UserRecord,
};
use crate::job::{JobSpec, RequestType};
use crate::lifecycle::{
    Applied, AssetRef, BatchRecord, DriftChange, DriftCounted, DriftRecord, EventRef,
    FailureRecord, JobChange, JobRecord, OutboxEntry, now_ms, push_outbox,
};
use crate::plan::Shape;

/// The migrations, in order; version N is `migrations/000N_*.sql`. A
/// released migration is never edited: a change is a new file.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/0001_init.sql")),
    (2, include_str!("../../migrations/0002_tokens.sql")),
    (3, include_str!("../../migrations/0003_held.sql")),
    (4, include_str!("../../migrations/0004_parked.sql")),
    (5, include_str!("../../migrations/0005_drift.sql")),
    (6, include_str!("../../migrations/0006_jobs_by_token.sql")),
];

/// Connections per replica: the stages, the listeners' commits and the
/// lease keeper share them; a commit waits for a free one.
const POOL_SIZE: usize = 12;

/// How often a change that hit a deadlock or serialization failure is
/// tried again before the error is returned.
const CONFLICT_RETRIES: usize = 8;

/// Outbox entries read per round trip while filling a delivery.
const OUTBOX_PAGE: i64 = 128;

fn backend(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Backend(Box::new(e))
}

/// Whether a failed change may simply be run again.
fn is_conflict(e: &StoreError) -> bool {
    let StoreError::Backend(source) = e else {
        return false;
    };
    source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|c| {
            *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
        })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode(e.to_string()))
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    crate::json::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Runs `$body` (an expression using `$t`, a transaction) and commits it,
/// again from the start when the server reports a deadlock or a
/// serialization failure.
macro_rules! transaction {
    ($store:expr, |$t:ident| $body:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result: Result<_, StoreError> = async {
                let mut conn = $store.pool.get().await.map_err(pool_error)?;
                let $t = conn.transaction().await.map_err(backend)?;
                let out = $body;
                $t.commit().await.map_err(backend)?;
                Ok(out)
            }
            .await;
            match result {
                Err(e) if attempt < CONFLICT_RETRIES && is_conflict(&e) => {
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                other => break other,
            }
        }
    }};
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

async fn lock_job(t: &Tx<'_>, id: &str) -> Result<Option<JobRecord>, StoreError> {
    let st = t
        .prepare_cached("SELECT record FROM jobs WHERE id = $1 FOR UPDATE")
        .await
        .map_err(backend)?;
    match t.query_opt(&st, &[&id]).await.map_err(backend)? {
        Some(row) => Ok(Some(decode(&format!("jobs/{id}"), row.get::<_, &[u8]>(0))?)),
        None => Ok(None),
    }
}

async fn put_job(t: &Tx<'_>, job: &JobRecord) -> Result<(), StoreError> {
    let st = t
        .prepare_cached("UPDATE jobs SET record = $2 WHERE id = $1")
        .await
        .map_err(backend)?;
    t.execute(&st, &[&job.id(), &encode(job)?])
        .await
        .map_err(backend)?;
    Ok(())
}

async fn lock_batch(t: &Tx<'_>, job_id: &str, no: u32) -> Result<Option<BatchRecord>, StoreError> {
    let st = t
        .prepare_cached("SELECT record FROM batches WHERE job_id = $1 AND no = $2 FOR UPDATE")
        .await
        .map_err(backend)?;
    match t
        .query_opt(&st, &[&job_id, &(no as i64)])
        .await
        .map_err(backend)?
    {
        Some(row) => Ok(Some(decode(
            &format!("batches/{job_id}/{no}"),
            row.get::<_, &[u8]>(0),
        )?)),
        None => Ok(None),
    }
}

/// Writes a batch with its open flag in step with its state.
async fn put_batch(t: &Tx<'_>, batch: &BatchRecord) -> Result<(), StoreError> {
    let st = t
        .prepare_cached(
            "INSERT INTO batches (job_id, no, token, open, record) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (job_id, no) DO UPDATE
             SET token = EXCLUDED.token, open = EXCLUDED.open, record = EXCLUDED.record",
        )
        .await
        .map_err(backend)?;
    t.execute(
        &st,
        &[
            &batch.job_id(),
            &(batch.no() as i64),
            &batch.token(),
            &batch.state().is_open(),
            &encode(batch)?,
        ],
    )
    .await
    .map_err(backend)?;
    Ok(())
}

async fn add_outbox(t: &Tx<'_>, entry: &OutboxEntry) -> Result<(), StoreError> {
    let st = t
        .prepare_cached("INSERT INTO outbox (job_id, commands, entry) VALUES ($1, $2, $3)")
        .await
        .map_err(backend)?;
    t.execute(
        &st,
        &[&entry.job_id, &(entry.pairs.len() as i64), &encode(entry)?],
    )
    .await
    .map_err(backend)?;
    Ok(())
}

async fn add_held(t: &Tx<'_>, token: &str, entry: &OutboxEntry) -> Result<(), StoreError> {
    let st = t
        .prepare_cached("INSERT INTO held (token, job_id, entry) VALUES ($1, $2, $3)")
        .await
        .map_err(backend)?;
    t.execute(&st, &[&token, &entry.job_id, &encode(entry)?])
        .await
        .map_err(backend)?;
    Ok(())
}

async fn put_failure(
    t: &Tx<'_>,
    job_id: &str,
    batch: u32,
    pair: u32,
    failure: &FailureRecord,
) -> Result<(), StoreError> {
    let st = t
        .prepare_cached(
            "INSERT INTO failures (job_id, batch, pair, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (job_id, batch, pair) DO UPDATE SET record = EXCLUDED.record",
        )
        .await
        .map_err(backend)?;
    t.execute(
        &st,
        &[&job_id, &(batch as i64), &(pair as i64), &encode(failure)?],
    )
    .await
    .map_err(backend)?;
    Ok(())
}

/// Notifications recorded per transaction at most.
const INGEST_GROUP: usize = 512;

/// A notification waiting for the next group commit, and who to tell.
struct PendingNotification {
    id: String,
    envelope: Vec<u8>,
    done: tokio::sync::oneshot::Sender<Result<Recorded, String>>,
}

/// Group commit for the notification listener: Apple's senders arrive
/// concurrently, and one transaction (one WAL flush) for each would bound
/// ingest by the disk's flush rate. Whoever takes `commit` records
/// everything queued so far in one transaction; the others wait for their
/// answer. sled's backend does the same with its commit thread.
struct Ingest {
    pool: Pool,
    queue: Mutex<Vec<PendingNotification>>,
    commit: Arc<tokio::sync::Mutex<()>>,
}

impl Ingest {
    async fn record(self: &Arc<Self>, id: &str, envelope: &[u8]) -> Result<Recorded, StoreError> {
        let (done, mut answer) = tokio::sync::oneshot::channel();
        self.lock_queue().push(PendingNotification {
            id: id.to_string(),
            envelope: envelope.to_vec(),
            done,
        });
        let settle = |r: Result<Result<Recorded, String>, _>| match r {
            Ok(Ok(recorded)) => Ok(recorded),
            Ok(Err(e)) => Err(StoreError::Backend(e.into())),
            Err(tokio::sync::oneshot::error::RecvError { .. }) => Err(StoreError::Backend(
                "the notification's commit was abandoned".into(),
            )),
        };
        loop {
            tokio::select! {
                biased;
                r = &mut answer => return settle(r),
                guard = self.commit.clone().lock_owned() => {
                    let group: Vec<PendingNotification> = {
                        let mut queue = self.lock_queue();
                        let n = queue.len().min(INGEST_GROUP);
                        queue.drain(..n).collect()
                    };
                    if group.is_empty() {
                        // An earlier group took ours; its answer is on the way.
                        drop(guard);
                        return settle(answer.await);
                    }
                    // Its own task, so that a sender hanging up on its
                    // leader does not abandon the others' commit.
                    let this = self.clone();
                    let _ = tokio::spawn(async move {
                        let result = this.commit_group(&group).await;
                        for (p, r) in group.into_iter().zip(result) {
                            let _ = p.done.send(r);
                        }
                        drop(guard);
                    })
                    .await;
                }
            }
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<PendingNotification>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One transaction for the group: the ids not seen before claim their
    /// place in the inbox, in arrival order; a repeat (also within the
    /// group) is a duplicate. Answers in the group's order.
    async fn commit_group(&self, group: &[PendingNotification]) -> Vec<Result<Recorded, String>> {
        let ids: Vec<&str> = group.iter().map(|p| p.id.as_str()).collect();
        let result = transaction!(self, |t| {
            let st = t
                .prepare_cached(
                    "INSERT INTO seen (notification_id, at_ms)
                     SELECT id, $2 FROM unnest($1::text[]) AS u(id)
                     ON CONFLICT (notification_id) DO NOTHING
                     RETURNING notification_id",
                )
                .await
                .map_err(backend)?;
            let rows = t
                .query(&st, &[&ids, &(now_ms() as i64)])
                .await
                .map_err(backend)?;
            let mut fresh: std::collections::HashSet<String> =
                rows.iter().map(|r| r.get::<_, String>(0)).collect();
            let answers: Vec<Recorded> = group
                .iter()
                .map(|p| {
                    if fresh.remove(&p.id) {
                        Recorded::New
                    } else {
                        Recorded::Duplicate
                    }
                })
                .collect();
            let envelopes: Vec<&[u8]> = group
                .iter()
                .zip(&answers)
                .filter(|(_, a)| matches!(a, Recorded::New))
                .map(|(p, _)| p.envelope.as_slice())
                .collect();
            if !envelopes.is_empty() {
                let st = t
                    .prepare_cached(
                        "INSERT INTO inbox (envelope)
                         SELECT e FROM unnest($1::bytea[]) WITH ORDINALITY AS u(e, n) ORDER BY n",
                    )
                    .await
                    .map_err(backend)?;
                t.execute(&st, &[&envelopes]).await.map_err(backend)?;
            }
            answers
        });
        match result {
            Ok(answers) => answers.into_iter().map(Ok).collect(),
            // A failed commit leaves nothing: every sender's retry is
            // recorded anew.
            Err(e) => group.iter().map(|_| Err(e.to_string())).collect(),
        }
    }
}

/// The PostgreSQL backend of [`Store`].
pub struct PostgresStore {
    pool: Pool,
    spec_cache: Mutex<HashMap<String, Arc<JobSpec>>>,
    ingest: Arc<Ingest>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it holds the password.
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to `url` (read from `origin`, which errors name instead of
    /// the URL) and creates or migrates the schema. The schema is the first
    /// of the role's `search_path` (`?options=-c%20search_path%3Dvppd` in the
    /// URL picks another); it must exist.
    pub async fn open(url: &str, origin: &str) -> Result<PostgresStore, StoreError> {
        let connect = |source: super::BackendError| StoreError::Connect {
            url_file: origin.to_string(),
            source,
        };
        // The parser's error never repeats the URL.
        let config = tokio_postgres::Config::from_str(url).map_err(|e| connect(Box::new(e)))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| connect(Box::new(e)))?;
        let store = PostgresStore {
            ingest: Arc::new(Ingest {
                pool: pool.clone(),
                queue: Mutex::new(Vec::new()),
                commit: Arc::new(tokio::sync::Mutex::new(())),
            }),
            pool,
            spec_cache: Mutex::new(HashMap::new()),
        };
        store.migrate().await.map_err(|e| match e {
            StoreError::Backend(source) => connect(source),
            other => other,
        })?;
        Ok(store)
    }

    /// Applies the migrations this schema lacks, in order, in one
    /// transaction under an advisory lock: replicas starting together wait
    /// for the first, then find nothing left to do.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let t = conn.transaction().await.map_err(backend)?;
        let schema: Option<String> = t
            .query_one("SELECT current_schema()", &[])
            .await
            .map_err(backend)?
            .get(0);
        let Some(schema) = schema else {
            return Err(StoreError::Backend(
                "no schema of the role's search_path exists; create one (CREATE SCHEMA) or name one in the URL's options".into(),
            ));
        };
        t.execute(
            "SELECT pg_advisory_xact_lock(7370000, hashtext($1))",
            &[&schema],
        )
        .await
        .map_err(backend)?;
        t.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 version     bigint PRIMARY KEY,
                 applied_at  timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(backend)?;
        let found: i64 = t
            .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
            .await
            .map_err(backend)?
            .get(0);
        let known = MIGRATIONS.last().map(|(v, _)| *v).unwrap_or(0);
        if found > known {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
            t.batch_execute(sql).await.map_err(backend)?;
            t.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(backend)?;
            tracing::info!(version, schema = %schema, "store schema migrated");
        }
        t.commit().await.map_err(backend)?;
        Ok(())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<JobSpec>>> {
        self.spec_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One read, outside any transaction.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let st = conn.prepare_cached(sql).await.map_err(backend)?;
        conn.query(&st, params).await.map_err(backend)
    }

    async fn read_record<T: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        match self.query(sql, params).await?.first() {
            Some(row) => Ok(Some(decode(what, row.get::<_, &[u8]>(0))?)),
            None => Ok(None),
        }
    }

    async fn read_records<T: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<T>, StoreError> {
        self.query(sql, params)
            .await?
            .iter()
            .map(|row| decode(what, row.get::<_, &[u8]>(0)))
            .collect()
    }

    async fn apply_fold(&self, fold: &Fold) -> Result<Vec<Applied>, StoreError> {
        transaction!(self, |t| {
            let now = now_ms();
            // Consumed items first: when another applier took some of them
            // (a lease handover), nothing of this run is applied twice; the
            // caller reads the inbox again.
            if !fold.consumed.is_empty() {
                let ids: Vec<i64> = fold.consumed.iter().map(|i| i.0 as i64).collect();
                let st = t
                    .prepare_cached("DELETE FROM inbox WHERE id = ANY($1)")
                    .await
                    .map_err(backend)?;
                let deleted = t.execute(&st, &[&ids]).await.map_err(backend)?;
                if deleted as usize != ids.len() {
                    return Err(StoreError::Backend(
                        "notifications of this run were applied by another replica; reading the inbox again".into(),
                    ));
                }
            }
            // Jobs in id order, then their batches: one lock order for all.
            let mut jobs: BTreeMap<String, Option<JobRecord>> = BTreeMap::new();
            for d in &fold.decide {
                jobs.entry(d.job_id.clone()).or_insert(None);
            }
            for (id, slot) in jobs.iter_mut() {
                *slot = lock_job(&t, id).await?;
            }
            let mut batches: BTreeMap<(String, u32), Option<BatchRecord>> = BTreeMap::new();
            for d in &fold.decide {
                batches.entry((d.job_id.clone(), d.batch)).or_insert(None);
            }
            for ((job_id, no), slot) in batches.iter_mut() {
                *slot = lock_batch(&t, job_id, *no).await?;
            }
            // License counts too: the run's confirmations of one asset are
            // one write, not one per notification.
            let mut licenses: BTreeMap<(String, String, String), Option<LicenseRecord>> =
                BTreeMap::new();
            let mut applied = Vec::with_capacity(fold.decide.len());
            // Commands of consecutive notifications of one event share an
            // entry (`push_outbox`).
            let mut outbox: Vec<OutboxEntry> = Vec::new();
            for d in &fold.decide {
                let bkey = (d.job_id.clone(), d.batch);
                let (Some(Some(job)), Some(Some(batch))) =
                    (jobs.get_mut(&d.job_id), batches.get_mut(&bkey))
                else {
                    applied.push(Applied::default());
                    continue;
                };
                let decided =
                    job.decide(batch, &d.decisions, &d.revoked, d.activity, d.finished, now);
                job.note_reconciliation(batch, &d.checked, d.reconciled);
                if !decided.licenses.is_empty() {
                    // Read through the transaction's own connection: with
                    // every pooled connection inside a commit like this one,
                    // asking the pool for another would wait forever.
                    let cached = self.cache().get(&d.job_id).cloned();
                    let spec = match cached {
                        Some(spec) => Some(spec),
                        None => {
                            let st = t
                                .prepare_cached("SELECT spec FROM jobs WHERE id = $1")
                                .await
                                .map_err(backend)?;
                            match t.query_opt(&st, &[&d.job_id]).await.map_err(backend)? {
                                Some(row) => Some(Arc::new(decode::<JobSpec>(
                                    &format!("specs/{}", d.job_id),
                                    row.get::<_, &[u8]>(0),
                                )?)),
                                None => None,
                            }
                        }
                    };
                    for (asset, assigned) in &decided.licenses {
                        let (adam_id, pricing) = match asset {
                            AssetRef::Named {
                                adam_id,
                                pricing_param,
                            } => (adam_id.clone(), pricing_param.clone()),
                            AssetRef::Index(i) => {
                                match spec.as_ref().and_then(|s| s.assets.get(*i as usize)) {
                                    Some(a) => (a.adam_id.clone(), a.pricing_param.clone()),
                                    None => continue,
                                }
                            }
                        };
                        let key = (job.token().to_string(), adam_id, pricing);
                        if !licenses.contains_key(&key) {
                            let record = lock_license(&t, &key.0, &key.1, &key.2).await?;
                            licenses.insert(key.clone(), record);
                        }
                        // Only assets whose counts were read: a delta alone
                        // says nothing about the total.
                        if let Some(Some(record)) = licenses.get_mut(&key) {
                            record.apply_assigned(*assigned, now);
                        }
                    }
                }
                for (pair, failure) in &decided.failures {
                    put_failure(&t, &d.job_id, d.batch, *pair, failure).await?;
                }
                for entry in decided.outbox {
                    push_outbox(&mut outbox, entry);
                }
                for entry in &decided.held {
                    add_held(&t, job.token(), entry).await?;
                }
                applied.push(decided.applied);
            }
            for entry in &outbox {
                add_outbox(&t, entry).await?;
            }
            for batch in batches.values().flatten() {
                put_batch(&t, batch).await?;
            }
            for job in jobs.values().flatten() {
                put_job(&t, job).await?;
            }
            for delta in &fold.license_deltas {
                let key = (
                    delta.token.clone(),
                    delta.adam_id.clone(),
                    delta.pricing_param.clone(),
                );
                if !licenses.contains_key(&key) {
                    let record = lock_license(&t, &key.0, &key.1, &key.2).await?;
                    licenses.insert(key.clone(), record);
                }
                if let Some(slot) = licenses.get_mut(&key) {
                    slot.get_or_insert_with(LicenseRecord::default)
                        .apply_delta(delta.delta, now);
                }
            }
            for ((token, adam_id, pricing), record) in &licenses {
                if let Some(record) = record {
                    put_license(&t, token, adam_id, pricing, record).await?;
                }
            }
            for (token, user) in &fold.users {
                put_user(&t, token, user).await?;
            }
            applied
        })
    }

    async fn apply_settle(
        &self,
        token: &str,
        release: &[OutboxAck],
        drop: &[OutboxAck],
    ) -> Result<Settled, StoreError> {
        transaction!(self, |t| {
            let mut settled = Settled::default();
            let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
            // Held rows in id order, then jobs by id: one lock order.
            let mut order: Vec<(&OutboxAck, bool)> = release
                .iter()
                .map(|a| (a, true))
                .chain(drop.iter().map(|a| (a, false)))
                .collect();
            order.sort_by_key(|(a, _)| a.entry);
            for (ack, moving) in order {
                let id = ack.entry.0 as i64;
                let st = t
                    .prepare_cached(
                        "SELECT entry FROM held WHERE id = $1 AND token = $2 FOR UPDATE",
                    )
                    .await
                    .map_err(backend)?;
                let Some(row) = t.query_opt(&st, &[&id, &token]).await.map_err(backend)? else {
                    continue;
                };
                let mut entry: OutboxEntry = decode(&format!("held/{id}"), row.get::<_, &[u8]>(0))?;
                let before = entry.pairs.clone();
                let taken = entry.take(&ack.pairs);
                if taken == 0 {
                    continue;
                }
                if entry.pairs.is_empty() {
                    let st = t
                        .prepare_cached("DELETE FROM held WHERE id = $1")
                        .await
                        .map_err(backend)?;
                    t.execute(&st, &[&id]).await.map_err(backend)?;
                } else {
                    let st = t
                        .prepare_cached("UPDATE held SET entry = $2 WHERE id = $1")
                        .await
                        .map_err(backend)?;
                    t.execute(&st, &[&id, &encode(&entry)?])
                        .await
                        .map_err(backend)?;
                }
                if moving {
                    let pairs = before
                        .into_iter()
                        .filter(|p| !entry.pairs.contains(p))
                        .collect();
                    add_outbox(
                        &t,
                        &OutboxEntry {
                            pairs,
                            // Its release latency runs from the association
                            // of its user, not from the license.
                            confirmed_ms: now_ms(),
                            ..entry.clone()
                        },
                    )
                    .await?;
                    settled.released += taken;
                } else {
                    *dropped.entry(entry.job_id.clone()).or_default() += taken;
                    settled.dropped += taken;
                }
            }
            let now = now_ms();
            for (job_id, n) in dropped {
                let Some(mut job) = lock_job(&t, &job_id).await? else {
                    continue;
                };
                if let Some(state) = job.held_dropped(n, now) {
                    settled.finished.push((job_id, state));
                }
                put_job(&t, &job).await?;
            }
            settled
        })
    }

    async fn apply_acks(&self, acks: &[OutboxAck]) -> Result<Vec<Released>, StoreError> {
        transaction!(self, |t| {
            // The entries in one read, locked in id order (every commit
            // locks outbox entries first, in that order), and the emptied
            // ones deleted in one statement: a delivery of a thousand
            // commands is a handful of round trips, not two per entry.
            let mut ids: Vec<i64> = acks.iter().map(|a| a.entry.0 as i64).collect();
            ids.sort_unstable();
            ids.dedup();
            let st = t
                .prepare_cached(
                    "SELECT id, entry FROM outbox WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                )
                .await
                .map_err(backend)?;
            let rows = t.query(&st, &[&ids]).await.map_err(backend)?;
            let mut per_job: BTreeMap<(String, RequestType), u64> = BTreeMap::new();
            let mut emptied: Vec<i64> = Vec::new();
            for row in &rows {
                let id: i64 = row.get(0);
                let mut entry: OutboxEntry =
                    decode(&format!("outbox/{id}"), row.get::<_, &[u8]>(1))?;
                let mut taken = 0;
                for ack in acks.iter().filter(|a| a.entry.0 as i64 == id) {
                    taken += entry.take(&ack.pairs);
                }
                if entry.pairs.is_empty() {
                    emptied.push(id);
                } else if taken > 0 {
                    let st = t
                        .prepare_cached("UPDATE outbox SET entry = $2, commands = $3 WHERE id = $1")
                        .await
                        .map_err(backend)?;
                    t.execute(&st, &[&id, &encode(&entry)?, &(entry.pairs.len() as i64)])
                        .await
                        .map_err(backend)?;
                }
                if taken > 0 {
                    *per_job
                        .entry((entry.job_id.clone(), entry.request_type))
                        .or_default() += taken;
                }
            }
            if !emptied.is_empty() {
                let st = t
                    .prepare_cached("DELETE FROM outbox WHERE id = ANY($1)")
                    .await
                    .map_err(backend)?;
                t.execute(&st, &[&emptied]).await.map_err(backend)?;
            }
            let now = now_ms();
            let mut released = Vec::new();
            for ((job_id, request_type), n) in per_job {
                let Some(mut job) = lock_job(&t, &job_id).await? else {
                    continue;
                };
                released.push(Released::count(&mut job, n, request_type, now));
                put_job(&t, &job).await?;
            }
            released
        })
    }
}

async fn lock_license(
    t: &Tx<'_>,
    token: &str,
    adam_id: &str,
    pricing_param: &str,
) -> Result<Option<LicenseRecord>, StoreError> {
    let st = t
        .prepare_cached(
            "SELECT record FROM licenses WHERE token = $1 AND adam_id = $2 AND pricing_param = $3 FOR UPDATE",
        )
        .await
        .map_err(backend)?;
    match t
        .query_opt(&st, &[&token, &adam_id, &pricing_param])
        .await
        .map_err(backend)?
    {
        Some(row) => Ok(Some(decode(
            &format!("licenses/{token}/{adam_id}"),
            row.get::<_, &[u8]>(0),
        )?)),
        None => Ok(None),
    }
}

async fn put_license(
    t: &Tx<'_>,
    token: &str,
    adam_id: &str,
    pricing_param: &str,
    record: &LicenseRecord,
) -> Result<(), StoreError> {
    let st = t
        .prepare_cached(
            "INSERT INTO licenses (token, adam_id, pricing_param, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (token, adam_id, pricing_param) DO UPDATE SET record = EXCLUDED.record",
        )
        .await
        .map_err(backend)?;
    t.execute(&st, &[&token, &adam_id, &pricing_param, &encode(record)?])
        .await
        .map_err(backend)?;
    Ok(())
}

async fn put_user(t: &Tx<'_>, token: &str, user: &UserRecord) -> Result<(), StoreError> {
    let st = t
        .prepare_cached(
            "INSERT INTO users (token, client_user_id, record) VALUES ($1, $2, $3)
             ON CONFLICT (token, client_user_id) DO UPDATE SET record = EXCLUDED.record",
        )
        .await
        .map_err(backend)?;
    t.execute(&st, &[&token, &user.client_user_id, &encode(user)?])
        .await
        .map_err(backend)?;
    Ok(())
}

/// Serializes parking a notification for `event_id` with recording that
/// event: whichever commits second sees the other's rows, so no
/// notification is parked for an event recorded meanwhile.
async fn lock_event_id(t: &Tx<'_>, event_id: &str) -> Result<(), StoreError> {
    let st = t
        .prepare_cached("SELECT pg_advisory_xact_lock(7370001, hashtext($1))")
        .await
        .map_err(backend)?;
    t.execute(&st, &[&event_id]).await.map_err(backend)?;
    Ok(())
}

/// Moves the notifications parked under `event_id` back into the inbox,
/// under their old ids (so they keep their place in arrival order).
async fn unpark(t: &Tx<'_>, event_id: &str) -> Result<(), StoreError> {
    lock_event_id(t, event_id).await?;
    let st = t
        .prepare_cached(
            "WITH gone AS (DELETE FROM parked WHERE event_id = $1 RETURNING id, envelope)
             INSERT INTO inbox (id, envelope) SELECT id, envelope FROM gone
             ON CONFLICT (id) DO NOTHING",
        )
        .await
        .map_err(backend)?;
    t.execute(&st, &[&event_id]).await.map_err(backend)?;
    Ok(())
}

impl Store for PostgresStore {
    fn create_job<'a>(
        &'a self,
        spec: &'a Arc<JobSpec>,
        record: JobRecord,
    ) -> StoreFuture<'a, Created> {
        Box::pin(async move {
            let spec_bytes = encode(&**spec)?;
            let created = transaction!(self, |t| {
                let seq: i64 = t
                    .query_one("SELECT nextval('job_seq')", &[])
                    .await
                    .map_err(backend)?
                    .get(0);
                let mut record = record.clone();
                record.set_seq(seq as u64);
                let st = t
                    .prepare_cached(
                        "INSERT INTO jobs (id, seq, token, record, spec) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (id) DO NOTHING",
                    )
                    .await
                    .map_err(backend)?;
                let inserted = t
                    .execute(
                        &st,
                        &[
                            &spec.id,
                            &seq,
                            &record.token(),
                            &encode(&record)?,
                            &spec_bytes,
                        ],
                    )
                    .await
                    .map_err(backend)?;
                if inserted == 1 {
                    Created::New(Box::new(record))
                } else {
                    // Another commit made it first (now visible: a new
                    // statement sees what committed before it).
                    match lock_job(&t, &spec.id).await? {
                        Some(existing) if existing.spec_hash() == record.spec_hash() => {
                            Created::Existing(Box::new(existing))
                        }
                        _ => Created::Conflict,
                    }
                }
            })?;
            if matches!(created, Created::New(_)) {
                self.cache().insert(spec.id.clone(), spec.clone());
            }
            Ok(created)
        })
    }

    fn job<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<JobRecord>> {
        Box::pin(async move {
            self.read_record(
                &format!("jobs/{id}"),
                "SELECT record FROM jobs WHERE id = $1",
                &[&id],
            )
            .await
        })
    }

    fn jobs(&self) -> StoreFuture<'_, Vec<JobRecord>> {
        Box::pin(async move {
            self.read_records("jobs", "SELECT record FROM jobs ORDER BY seq", &[])
                .await
        })
    }

    fn jobs_of<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<JobRecord>> {
        Box::pin(async move {
            self.read_records(
                "jobs",
                "SELECT record FROM jobs WHERE token = $1 ORDER BY seq",
                &[&token],
            )
            .await
        })
    }

    fn spec<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<Arc<JobSpec>>> {
        Box::pin(async move {
            if let Some(s) = self.cache().get(id) {
                return Ok(Some(s.clone()));
            }
            let Some(spec) = self
                .read_record::<JobSpec>(
                    &format!("specs/{id}"),
                    "SELECT spec FROM jobs WHERE id = $1",
                    &[&id],
                )
                .await?
            else {
                return Ok(None);
            };
            // Two readers may have decoded it at once: all share the first copy.
            let spec = self
                .cache()
                .entry(id.to_string())
                .or_insert_with(|| Arc::new(spec))
                .clone();
            Ok(Some(spec))
        })
    }

    fn update_job<'a>(
        &'a self,
        id: &'a str,
        change: JobChange,
    ) -> StoreFuture<'a, Option<JobRecord>> {
        Box::pin(async move {
            transaction!(self, |t| {
                match lock_job(&t, id).await? {
                    Some(mut job) => {
                        if job.apply(&change, now_ms()) {
                            put_job(&t, &job).await?;
                        }
                        Some(job)
                    }
                    None => None,
                }
            })
        })
    }

    fn failures<'a>(
        &'a self,
        job_id: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, (Vec<PairFailure>, bool)> {
        Box::pin(async move {
            let rows = self
                .query(
                    "SELECT batch, pair, record FROM failures WHERE job_id = $1
                     ORDER BY batch, pair LIMIT $2",
                    &[&job_id, &(limit.min(i64::MAX as usize - 1) as i64 + 1)],
                )
                .await?;
            let more = rows.len() > limit;
            let mut out = Vec::with_capacity(rows.len().min(limit));
            for row in rows.iter().take(limit) {
                let batch = row.get::<_, i64>(0) as u32;
                let pair = row.get::<_, i64>(1) as u32;
                out.push(PairFailure {
                    batch,
                    pair,
                    record: decode(
                        &format!("failures/{job_id}/{batch}/{pair}"),
                        row.get::<_, &[u8]>(2),
                    )?,
                });
            }
            Ok((out, more))
        })
    }

    fn start_batch<'a>(
        &'a self,
        job_id: &'a str,
        shape: Shape,
    ) -> StoreFuture<'a, Option<BatchRecord>> {
        Box::pin(async move {
            transaction!(self, |t| {
                match lock_job(&t, job_id).await? {
                    Some(mut job) => match job.start_batch(shape, now_ms()) {
                        Some(batch) => {
                            put_batch(&t, &batch).await?;
                            put_job(&t, &job).await?;
                            Some(batch)
                        }
                        None => None,
                    },
                    None => None,
                }
            })
        })
    }

    fn batch_sent<'a>(
        &'a self,
        job_id: &'a str,
        no: u32,
        event_id: &'a str,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            transaction!(self, |t| {
                let job = lock_job(&t, job_id).await?;
                let batch = lock_batch(&t, job_id, no).await?;
                match (job, batch) {
                    (Some(mut job), Some(mut batch)) => {
                        let sent = job.batch_sent(&mut batch, event_id, now_ms());
                        if sent {
                            put_batch(&t, &batch).await?;
                            put_job(&t, &job).await?;
                            let st = t
                                .prepare_cached(
                                    "INSERT INTO events (event_id, job_id, batch) VALUES ($1, $2, $3)
                                     ON CONFLICT (event_id) DO UPDATE
                                     SET job_id = EXCLUDED.job_id, batch = EXCLUDED.batch",
                                )
                                .await
                                .map_err(backend)?;
                            t.execute(&st, &[&event_id, &job_id, &(no as i64)])
                                .await
                                .map_err(backend)?;
                            unpark(&t, event_id).await?;
                        }
                        sent
                    }
                    _ => false,
                }
            })
        })
    }

    fn return_batch<'a>(&'a self, job_id: &'a str, no: u32, shape: Shape) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            transaction!(self, |t| {
                let job = lock_job(&t, job_id).await?;
                let batch = lock_batch(&t, job_id, no).await?;
                match (job, batch) {
                    (Some(mut job), Some(batch)) => {
                        if !job.return_batch(&batch, shape) {
                            return Ok(false);
                        }
                        let st = t
                            .prepare_cached("DELETE FROM batches WHERE job_id = $1 AND no = $2")
                            .await
                            .map_err(backend)?;
                        t.execute(&st, &[&job_id, &(no as i64)])
                            .await
                            .map_err(backend)?;
                        put_job(&t, &job).await?;
                        true
                    }
                    _ => false,
                }
            })
        })
    }

    fn withdraw_batch<'a>(&'a self, job_id: &'a str, no: u32) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            transaction!(self, |t| {
                let job = lock_job(&t, job_id).await?;
                let batch = lock_batch(&t, job_id, no).await?;
                match (job, batch) {
                    (Some(mut job), Some(mut batch)) => {
                        let withdrawn = job.withdraw_batch(&mut batch, now_ms());
                        if withdrawn {
                            put_batch(&t, &batch).await?;
                            put_job(&t, &job).await?;
                        }
                        withdrawn
                    }
                    _ => false,
                }
            })
        })
    }

    fn schedule_poll<'a>(&'a self, job_id: &'a str, no: u32, at_ms: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            transaction!(self, |t| {
                if let Some(mut batch) = lock_batch(&t, job_id, no).await? {
                    batch.schedule_poll(at_ms);
                    put_batch(&t, &batch).await?;
                }
            })
        })
    }

    fn batch<'a>(&'a self, job_id: &'a str, no: u32) -> StoreFuture<'a, Option<BatchRecord>> {
        Box::pin(async move {
            self.read_record(
                &format!("batches/{job_id}/{no}"),
                "SELECT record FROM batches WHERE job_id = $1 AND no = $2",
                &[&job_id, &(no as i64)],
            )
            .await
        })
    }

    fn batches_of<'a>(&'a self, job_id: &'a str) -> StoreFuture<'a, Vec<BatchRecord>> {
        Box::pin(async move {
            self.read_records(
                &format!("batches/{job_id}"),
                "SELECT record FROM batches WHERE job_id = $1 ORDER BY no",
                &[&job_id],
            )
            .await
        })
    }

    fn open_batches<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<BatchRecord>> {
        Box::pin(async move {
            self.read_records(
                "batches (open)",
                "SELECT record FROM batches WHERE open AND token = $1
                 ORDER BY job_id COLLATE \"C\", no",
                &[&token],
            )
            .await
        })
    }

    fn event<'a>(&'a self, event_id: &'a str) -> StoreFuture<'a, Option<EventRef>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "SELECT job_id, batch FROM events WHERE event_id = $1",
                    &[&event_id],
                )
                .await?;
            Ok(rows.first().map(|row| EventRef {
                job_id: row.get(0),
                batch: row.get::<_, i64>(1) as u32,
            }))
        })
    }

    fn fold(&self, fold: Fold) -> StoreFuture<'_, Vec<Applied>> {
        Box::pin(async move { self.apply_fold(&fold).await })
    }

    fn record_notification<'a>(
        &'a self,
        notification_id: &'a str,
        envelope: &'a [u8],
    ) -> StoreFuture<'a, Recorded> {
        Box::pin(async move { self.ingest.record(notification_id, envelope).await })
    }

    fn inbox(&self, max: usize) -> StoreFuture<'_, Vec<InboxItem>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "SELECT id, envelope FROM inbox ORDER BY id LIMIT $1",
                    &[&(max.min(i64::MAX as usize) as i64)],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|row| InboxItem {
                    id: InboxId(row.get::<_, i64>(0) as u64),
                    envelope: row.get::<_, Vec<u8>>(1),
                })
                .collect())
        })
    }

    fn inbox_len(&self) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            let rows = self.query("SELECT count(*) FROM inbox", &[]).await?;
            Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as usize)
        })
    }

    fn prune_seen(&self, cutoff_ms: u64) -> StoreFuture<'_, usize> {
        Box::pin(async move {
            transaction!(self, |t| {
                t.execute(
                    "DELETE FROM seen WHERE at_ms < $1",
                    &[&(cutoff_ms.min(i64::MAX as u64) as i64)],
                )
                .await
                .map_err(backend)? as usize
            })
        })
    }

    fn prune_finished(&self, cutoff_ms: u64) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let candidates: Vec<JobRecord> = self
                .read_records(
                    "jobs",
                    "SELECT record FROM jobs j
                     WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)
                     ORDER BY seq",
                    &[],
                )
                .await?;
            let mut pruned = Vec::new();
            for job in candidates.iter().filter(|j| j.expired(cutoff_ms)) {
                let id = job.id();
                // One transaction: the job locked and checked again (another
                // replica's commit may have come between), then all of it.
                let forgotten = transaction!(self, |t| {
                    let still = lock_job(&t, id)
                        .await?
                        .is_some_and(|j| j.expired(cutoff_ms));
                    let queued = t
                        .query_opt("SELECT 1 FROM outbox WHERE job_id = $1 LIMIT 1", &[&id])
                        .await
                        .map_err(backend)?
                        .is_some();
                    if still && !queued {
                        let mut events = Vec::new();
                        for row in t
                            .query("SELECT record FROM batches WHERE job_id = $1", &[&id])
                            .await
                            .map_err(backend)?
                        {
                            let batch: BatchRecord =
                                decode(&format!("batches/{id}"), row.get::<_, &[u8]>(0))?;
                            events.extend(batch.events().iter().cloned());
                        }
                        t.execute("DELETE FROM events WHERE event_id = ANY($1)", &[&events])
                            .await
                            .map_err(backend)?;
                        for sql in [
                            "DELETE FROM failures WHERE job_id = $1",
                            "DELETE FROM batches WHERE job_id = $1",
                            "DELETE FROM jobs WHERE id = $1",
                        ] {
                            t.execute(sql, &[&id]).await.map_err(backend)?;
                        }
                        // Counted, so that the watermark (jobs ever held)
                        // does not go down with a pruned job.
                        t.execute(
                            "INSERT INTO meta (key, value) VALUES ('pruned_jobs', '1')
                             ON CONFLICT (key) DO UPDATE
                             SET value = (meta.value::bigint + 1)::text",
                            &[],
                        )
                        .await
                        .map_err(backend)?;
                    }
                    still && !queued
                })?;
                if forgotten {
                    self.cache().remove(id);
                    pruned.push(id.to_string());
                }
            }
            Ok(pruned)
        })
    }

    fn stats(&self) -> StoreFuture<'_, super::StoreStats> {
        Box::pin(async move {
            // In the order of StoreStats::KINDS; the size is that of the
            // tables in vppd's schema (the first of its search_path).
            let rows = self
                .query(
                    "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM batches),
                            (SELECT count(*) FROM events), (SELECT count(*) FROM failures),
                            (SELECT count(*) FROM inbox), (SELECT count(*) FROM outbox),
                            (SELECT count(*) FROM seen), (SELECT count(*) FROM licenses),
                            (SELECT count(*) FROM users),
                            (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
                               FROM pg_class c
                              WHERE c.relkind = 'r'
                                AND c.relnamespace = current_schema()::regnamespace)",
                    &[],
                )
                .await?;
            let Some(row) = rows.first() else {
                return Ok(super::StoreStats::default());
            };
            let records = super::StoreStats::KINDS
                .into_iter()
                .enumerate()
                .map(|(i, kind)| (kind, row.get::<_, i64>(i).max(0) as u64))
                .collect();
            Ok(super::StoreStats {
                bytes: row.get::<_, i64>(super::StoreStats::KINDS.len()).max(0) as u64,
                records,
            })
        })
    }

    fn park_notifications<'a>(&'a self, items: &'a [(InboxId, String)]) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            if items.is_empty() {
                return Ok(0);
            }
            // Advisory locks in one order, so two parking commits never
            // wait on each other in a cycle.
            let mut events: Vec<&str> = items.iter().map(|(_, e)| e.as_str()).collect();
            events.sort_unstable();
            events.dedup();
            let at_ms = now_ms() as i64;
            transaction!(self, |t| {
                for event_id in &events {
                    lock_event_id(&t, event_id).await?;
                }
                let known = t
                    .prepare_cached("SELECT 1 FROM events WHERE event_id = $1")
                    .await
                    .map_err(backend)?;
                let park = t
                    .prepare_cached(
                        "WITH gone AS (DELETE FROM inbox WHERE id = $1 RETURNING id, envelope)
                         INSERT INTO parked (id, event_id, at_ms, envelope)
                         SELECT id, $2, $3, envelope FROM gone",
                    )
                    .await
                    .map_err(backend)?;
                let mut parked = 0;
                for (id, event_id) in items {
                    // Recorded meanwhile: leave it for the applier's next
                    // read, or it would wait for an unpark that has passed.
                    if !t
                        .query(&known, &[&event_id])
                        .await
                        .map_err(backend)?
                        .is_empty()
                    {
                        continue;
                    }
                    let id = id.0.min(i64::MAX as u64) as i64;
                    parked += t
                        .execute(&park, &[&id, &event_id, &at_ms])
                        .await
                        .map_err(backend)? as usize;
                }
                parked
            })
        })
    }

    fn expire_parked(&self, cutoff_ms: u64, max: usize) -> StoreFuture<'_, Vec<InboxItem>> {
        Box::pin(async move {
            let cutoff = cutoff_ms.min(i64::MAX as u64) as i64;
            let max = max.min(i64::MAX as usize) as i64;
            transaction!(self, |t| {
                // SKIP LOCKED: rows a recording commit is moving back into
                // the inbox are not expired under it.
                let rows = t
                    .query(
                        "DELETE FROM parked WHERE id IN (
                             SELECT id FROM parked WHERE at_ms < $1
                             ORDER BY at_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED)
                         RETURNING id, at_ms, envelope",
                        &[&cutoff, &max],
                    )
                    .await
                    .map_err(backend)?;
                let mut expired: Vec<(i64, i64, Vec<u8>)> = rows
                    .iter()
                    .map(|row| (row.get(1), row.get(0), row.get(2)))
                    .collect();
                expired.sort_unstable_by_key(|(at, id, _)| (*at, *id));
                expired
                    .into_iter()
                    .map(|(_, id, envelope)| InboxItem {
                        id: InboxId(id as u64),
                        envelope,
                    })
                    .collect::<Vec<_>>()
            })
        })
    }

    fn outbox(&self, max_commands: usize) -> StoreFuture<'_, Vec<OutboxItem>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut commands = 0;
            let mut after = 0i64;
            while commands < max_commands {
                let rows = self
                    .query(
                        "SELECT id, entry FROM outbox WHERE id > $1 ORDER BY id LIMIT $2",
                        &[&after, &OUTBOX_PAGE],
                    )
                    .await?;
                for row in &rows {
                    if commands >= max_commands {
                        break;
                    }
                    let id: i64 = row.get(0);
                    let entry: OutboxEntry =
                        decode(&format!("outbox/{id}"), row.get::<_, &[u8]>(1))?;
                    commands += entry.pairs.len();
                    after = id;
                    out.push(OutboxItem {
                        id: OutboxId(id as u64),
                        entry,
                    });
                }
                if (rows.len() as i64) < OUTBOX_PAGE {
                    break;
                }
            }
            Ok(out)
        })
    }

    fn ack_outbox<'a>(&'a self, acks: &'a [OutboxAck]) -> StoreFuture<'a, Vec<Released>> {
        Box::pin(async move { self.apply_acks(acks).await })
    }

    fn watermark(&self) -> StoreFuture<'_, super::marker::Watermark> {
        Box::pin(async move {
            let generation: i64 = self
                .query("SELECT nextval('store_generation')", &[])
                .await?
                .first()
                .map(|r| r.get(0))
                .unwrap_or(0);
            let jobs = self.jobs().await?;
            // Pruned jobs were finished ones: they still count.
            let pruned: u64 = self
                .query("SELECT value FROM meta WHERE key = 'pruned_jobs'", &[])
                .await?
                .first()
                .and_then(|r| r.get::<_, String>(0).parse().ok())
                .unwrap_or(0);
            Ok(super::marker::Watermark {
                generation: generation.max(0) as u64,
                jobs: jobs.len() as u64 + pruned,
                finished: jobs.iter().filter(|j| j.state().is_final()).count() as u64 + pruned,
            })
        })
    }

    fn meta<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let rows = self
                .query("SELECT value FROM meta WHERE key = $1", &[&key])
                .await?;
            Ok(rows.first().map(|r| r.get(0)))
        })
    }

    fn put_meta<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            transaction!(self, |t| {
                t.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&key, &value],
                )
                .await
                .map_err(backend)?;
            })
        })
    }

    fn license<'a>(
        &'a self,
        token: &'a str,
        adam_id: &'a str,
        pricing_param: &'a str,
    ) -> StoreFuture<'a, Option<LicenseRecord>> {
        Box::pin(async move {
            self.read_record(
                &format!("licenses/{token}/{adam_id}"),
                "SELECT record FROM licenses WHERE token = $1 AND adam_id = $2 AND pricing_param = $3",
                &[&token, &adam_id, &pricing_param],
            )
            .await
        })
    }

    fn licenses<'a>(
        &'a self,
        token: &'a str,
    ) -> StoreFuture<'a, Vec<(String, String, LicenseRecord)>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "SELECT adam_id, pricing_param, record FROM licenses WHERE token = $1 ORDER BY adam_id, pricing_param",
                    &[&token],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let adam_id: String = row.get(0);
                    let pricing: String = row.get(1);
                    let record = decode(
                        &format!("licenses/{token}/{adam_id}"),
                        row.get::<_, &[u8]>(2),
                    )?;
                    Ok((adam_id, pricing, record))
                })
                .collect()
        })
    }

    fn put_license<'a>(
        &'a self,
        token: &'a str,
        adam_id: &'a str,
        pricing_param: &'a str,
        record: &'a LicenseRecord,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            transaction!(self, |t| {
                put_license(&t, token, adam_id, pricing_param, record).await?;
            })
        })
    }

    fn user<'a>(
        &'a self,
        token: &'a str,
        client_user_id: &'a str,
    ) -> StoreFuture<'a, Option<UserRecord>> {
        Box::pin(async move {
            self.read_record(
                &format!("users/{token}/{client_user_id}"),
                "SELECT record FROM users WHERE token = $1 AND client_user_id = $2",
                &[&token, &client_user_id],
            )
            .await
        })
    }

    fn put_token<'a>(&'a self, record: &'a TokenRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let updated = record.updated_ms.min(i64::MAX as u64) as i64;
            transaction!(self, |t| {
                t.execute(
                    "INSERT INTO tokens (name, stoken, takeover, updated_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (name) DO UPDATE SET stoken = EXCLUDED.stoken,
                         takeover = EXCLUDED.takeover, updated_ms = EXCLUDED.updated_ms",
                    &[&record.name, &record.stoken, &record.takeover, &updated],
                )
                .await
                .map_err(backend)?;
            })
        })
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "SELECT name, stoken, takeover, updated_ms FROM tokens ORDER BY name",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|row| TokenRecord {
                    name: row.get(0),
                    stoken: row.get(1),
                    takeover: row.get(2),
                    updated_ms: row.get::<_, i64>(3).max(0) as u64,
                })
                .collect())
        })
    }

    fn delete_token<'a>(&'a self, name: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            transaction!(self, |t| {
                t.execute("DELETE FROM token_states WHERE name = $1", &[&name])
                    .await
                    .map_err(backend)?;
                t.execute("DELETE FROM tokens WHERE name = $1", &[&name])
                    .await
                    .map_err(backend)?
                    > 0
            })
        })
    }

    fn users<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<UserRecord>> {
        Box::pin(async move {
            self.read_records(
                &format!("users/{token}"),
                "SELECT record FROM users WHERE token = $1 ORDER BY client_user_id",
                &[&token],
            )
            .await
        })
    }

    fn held<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Vec<OutboxItem>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "SELECT id, entry FROM held WHERE token = $1 ORDER BY id",
                    &[&token],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    let id: i64 = row.get(0);
                    Ok(OutboxItem {
                        id: OutboxId(id as u64),
                        entry: decode(&format!("held/{id}"), row.get::<_, &[u8]>(1))?,
                    })
                })
                .collect()
        })
    }

    fn settle_held<'a>(
        &'a self,
        token: &'a str,
        release: &'a [OutboxAck],
        drop: &'a [OutboxAck],
    ) -> StoreFuture<'a, Settled> {
        Box::pin(async move { self.apply_settle(token, release, drop).await })
    }

    fn users_ready<'a>(
        &'a self,
        job_id: &'a str,
        invitations: &'a [(String, String)],
        associated: &'a [u32],
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            transaction!(self, |t| {
                let Some(mut job) = lock_job(&t, job_id).await? else {
                    return Ok(false);
                };
                if !job.users_ready(invitations.len() as u64, associated, now_ms()) {
                    return Ok(false);
                }
                if !invitations.is_empty() {
                    add_outbox(
                        &t,
                        &OutboxEntry::invitations(job_id, invitations.to_vec(), now_ms()),
                    )
                    .await?;
                }
                put_job(&t, &job).await?;
                true
            })
        })
    }

    fn put_token_state<'a>(&'a self, name: &'a str, state: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            transaction!(self, |t| {
                t.execute(
                    "INSERT INTO token_states (name, state) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state",
                    &[&name, &state],
                )
                .await
                .map_err(backend)?;
            })
        })
    }

    fn token_states(&self) -> StoreFuture<'_, Vec<(String, String)>> {
        Box::pin(async move {
            let rows = self
                .query("SELECT name, state FROM token_states ORDER BY name", &[])
                .await?;
            Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
        })
    }

    fn take_leases<'a>(
        &'a self,
        names: &'a [String],
        holder: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            if names.is_empty() {
                return Ok(Vec::new());
            }
            // The database's clock for every holder: replicas' clocks need
            // not agree.
            transaction!(self, |t| {
                let st = t
                    .prepare_cached(
                        "INSERT INTO leases (name, holder, expires_at)
                         SELECT n, $2, now() + $3::bigint * interval '1 millisecond' FROM unnest($1::text[]) AS n
                         ON CONFLICT (name) DO UPDATE
                         SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                         WHERE leases.holder = EXCLUDED.holder OR leases.expires_at <= now()
                         RETURNING name",
                    )
                    .await
                    .map_err(backend)?;
                let mut sorted: Vec<&String> = names.iter().collect();
                sorted.sort();
                sorted.dedup();
                let rows = t
                    .query(&st, &[&sorted, &holder, &ms(ttl)])
                    .await
                    .map_err(backend)?;
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            })
        })
    }

    fn release_leases<'a>(
        &'a self,
        names: &'a [String],
        holder: &'a str,
        linger: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            transaction!(self, |t| {
                t.execute(
                    "UPDATE leases SET expires_at = least(expires_at, now() + $3::bigint * interval '1 millisecond')
                     WHERE holder = $2 AND name = ANY($1)",
                    &[&names, &holder, &ms(linger)],
                )
                .await
                .map_err(backend)?;
            })
        })
    }

    fn leases(&self) -> StoreFuture<'_, Vec<Lease>> {
        Box::pin(async move {
            let rows = self
                .query(
                    "SELECT name, holder,
                            (extract(epoch FROM (expires_at - now())) * 1000)::bigint
                     FROM leases ORDER BY name",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Lease {
                    name: r.get(0),
                    holder: r.get(1),
                    remaining_ms: r.get(2),
                })
                .collect())
        })
    }

    fn drift<'a>(&'a self, token: &'a str) -> StoreFuture<'a, Option<DriftRecord>> {
        Box::pin(async move {
            self.read_record(
                &format!("drift/{token}"),
                "SELECT record FROM drift WHERE token = $1",
                &[&token],
            )
            .await
        })
    }

    fn update_drift<'a>(
        &'a self,
        token: &'a str,
        change: DriftChange,
    ) -> StoreFuture<'a, DriftCounted> {
        Box::pin(async move {
            transaction!(self, |t| {
                // The row exists before it is locked, so that two first
                // changes of a token serialize on it too.
                t.execute(
                    "INSERT INTO drift (token, record) VALUES ($1, $2) ON CONFLICT (token) DO NOTHING",
                    &[&token, &encode(&DriftRecord::default())?],
                )
                .await
                .map_err(backend)?;
                let row = t
                    .query_one(
                        "SELECT record FROM drift WHERE token = $1 FOR UPDATE",
                        &[&token],
                    )
                    .await
                    .map_err(backend)?;
                let mut record: DriftRecord =
                    decode(&format!("drift/{token}"), row.get::<_, &[u8]>(0))?;
                let counted = record.apply(change.clone());
                t.execute(
                    "UPDATE drift SET record = $2 WHERE token = $1",
                    &[&token, &encode(&record)?],
                )
                .await
                .map_err(backend)?;
                counted
            })
        })
    }

    fn meta_or_insert<'a>(&'a self, key: &'a str, value: &'a str) -> StoreFuture<'a, String> {
        Box::pin(async move {
            transaction!(self, |t| {
                t.execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    &[&key, &value],
                )
                .await
                .map_err(backend)?;
                t.query_one("SELECT value FROM meta WHERE key = $1", &[&key])
                    .await
                    .map_err(backend)?
                    .get::<_, String>(0)
            })
        })
    }
}
