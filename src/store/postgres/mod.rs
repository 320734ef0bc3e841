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
//! Every change of [`crate::store::Store`] is one transaction ([`tx`]) at
//! READ COMMITTED that locks the rows it rewrites (`SELECT ... FOR UPDATE`)
//! as it reads them, so two commits of the same job or batch, from any
//! process, are serialized and none overwrites the other. The operations
//! take their locks in one order (`crate::store::ops`); a deadlock or
//! serialization failure the server reports anyway is retried. A commit
//! that returns is durable (the server's `synchronous_commit`, on by
//! default, is what makes it so). The listener's notifications are
//! committed in groups ([`ingest`]).
//!
//! The URL is a secret (it holds the password): it is parsed here and never
//! stored, printed or put into an error.

mod ingest;
mod open;
mod tx;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use self::ingest::Ingest;
use self::tx::PgTx;
use super::stored::{Backend, Durability, Stored};
use super::{
    InboxId, InboxItem, Lease, LicenseRecord, OutboxId, OutboxItem, PairFailure, Recorded,
    StoreError, StoreStats, TokenRecord, UserRecord, decode,
};
use crate::domain::job::JobSpec;
use crate::domain::lifecycle::{BatchRecord, DriftRecord, EventRef, JobRecord, now_ms};

type R<T> = Result<T, StoreError>;
type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

/// The PostgreSQL store: [`Stored`] over [`Postgres`].
pub type PostgresStore = Stored<Postgres>;

/// How often a change that hit a deadlock or serialization failure is
/// tried again before the error is returned.
pub(super) const CONFLICT_RETRIES: usize = 8;

/// Outbox entries read per round trip while filling a delivery.
const OUTBOX_PAGE: i64 = 128;

pub(super) fn backend(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(Box::new(e))
}

pub(super) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Backend(Box::new(e))
}

/// Whether a failed change may simply be run again.
pub(super) fn is_conflict(e: &StoreError) -> bool {
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

/// The record in the first column of the first row, if any.
fn first_record<V: DeserializeOwned>(what: &str, rows: &[Row]) -> R<Option<V>> {
    match rows.first() {
        Some(row) => Ok(Some(decode(what, row.get::<_, &[u8]>(0))?)),
        None => Ok(None),
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn int(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

/// The PostgreSQL backend of [`Stored`]. Its `Debug` (that of the store)
/// never shows the URL: it holds the password.
pub struct Postgres {
    pool: Pool,
    ingest: Arc<Ingest>,
}

impl Postgres {
    /// One read, outside any transaction.
    async fn query(&self, sql: &str, params: Params<'_>) -> R<Vec<Row>> {
        let conn = self.pool.get().await.map_err(pool_error)?;
        let st = conn.prepare_cached(sql).await.map_err(backend)?;
        conn.query(&st, params).await.map_err(backend)
    }

    /// One statement in a transaction of its own, run again on a conflict.
    async fn execute(&self, sql: &str, params: Params<'_>) -> R<u64> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = async {
                let conn = self.pool.get().await.map_err(pool_error)?;
                let st = conn.prepare_cached(sql).await.map_err(backend)?;
                conn.execute(&st, params).await.map_err(backend)
            }
            .await;
            match result {
                Err(e) if attempt < CONFLICT_RETRIES && is_conflict(&e) => {
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                other => return other,
            }
        }
    }

    async fn record<V: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: Params<'_>,
    ) -> R<Option<V>> {
        first_record(what, &self.query(sql, params).await?)
    }

    async fn records<V: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: Params<'_>,
    ) -> R<Vec<V>> {
        self.query(sql, params)
            .await?
            .iter()
            .map(|row| decode(what, row.get::<_, &[u8]>(0)))
            .collect()
    }

    /// Parks inbox items in one transaction.
    async fn park_items(&self, items: &[(InboxId, String)]) -> R<usize> {
        // Advisory locks in one order, so two parking commits never wait
        // on each other in a cycle.
        let mut events: Vec<&str> = items.iter().map(|(_, e)| e.as_str()).collect();
        events.sort_unstable();
        events.dedup();
        let at_ms = now_ms() as i64;
        let t = PgTx::begin(&self.pool).await?;
        for event_id in &events {
            t.lock_event_id(event_id).await?;
        }
        let mut parked = 0;
        for (id, event_id) in items {
            // Recorded meanwhile: leave it for the applier's next read, or
            // it would wait for an unpark that has passed.
            let known = "SELECT 1 FROM events WHERE event_id = $1";
            if !t.rows(known, &[&event_id]).await?.is_empty() {
                continue;
            }
            let park = "WITH gone AS (DELETE FROM inbox WHERE id = $1 RETURNING id, envelope)
                        INSERT INTO parked (id, event_id, at_ms, envelope)
                        SELECT id, $2, $3, envelope FROM gone";
            parked += t.exec(park, &[&int(id.0), &event_id, &at_ms]).await? as usize;
        }
        t.commit().await?;
        Ok(parked)
    }
}

impl Backend for Postgres {
    type Tx<'a> = PgTx;

    async fn begin(&self) -> R<PgTx> {
        PgTx::begin(&self.pool).await
    }

    async fn commit(&self, tx: PgTx, _durability: Durability) -> R<()> {
        // Every commit is durable: the server flushes its log first.
        tx.commit().await
    }

    fn retry(&self, error: &StoreError) -> bool {
        is_conflict(error)
    }

    async fn sync(&self) -> R<()> {
        Ok(())
    }

    fn ride_acks(&self) -> bool {
        // A commit costs a round trip and a log flush, but replicas fold
        // and release apart: an acknowledgement commits on its own.
        false
    }

    async fn job(&self, id: &str) -> R<Option<JobRecord>> {
        let sql = "SELECT record FROM jobs WHERE id = $1";
        self.record(&format!("jobs/{id}"), sql, &[&id]).await
    }

    async fn jobs(&self, token: Option<&str>) -> R<Vec<JobRecord>> {
        match token {
            None => {
                self.records("jobs", "SELECT record FROM jobs ORDER BY seq", &[])
                    .await
            }
            Some(token) => {
                let sql = "SELECT record FROM jobs WHERE token = $1 ORDER BY seq";
                self.records("jobs", sql, &[&token]).await
            }
        }
    }

    async fn spec(&self, id: &str) -> R<Option<JobSpec>> {
        let sql = "SELECT spec FROM jobs WHERE id = $1";
        self.record(&format!("specs/{id}"), sql, &[&id]).await
    }

    async fn failures(&self, id: &str, limit: usize) -> R<(Vec<PairFailure>, bool)> {
        let sql = "SELECT batch, pair, record FROM failures WHERE job_id = $1
                   ORDER BY batch, pair LIMIT $2";
        let rows = self
            .query(sql, &[&id, &(limit.min(i64::MAX as usize - 1) as i64 + 1)])
            .await?;
        let more = rows.len() > limit;
        let mut out = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            let batch = row.get::<_, i64>(0) as u32;
            let pair = row.get::<_, i64>(1) as u32;
            let what = format!("failures/{id}/{batch}/{pair}");
            let record = decode(&what, row.get::<_, &[u8]>(2))?;
            out.push(PairFailure {
                batch,
                pair,
                record,
            });
        }
        Ok((out, more))
    }

    async fn batch(&self, id: &str, no: u32) -> R<Option<BatchRecord>> {
        let sql = "SELECT record FROM batches WHERE job_id = $1 AND no = $2";
        self.record(&format!("batches/{id}/{no}"), sql, &[&id, &(no as i64)])
            .await
    }

    async fn batches_of(&self, id: &str) -> R<Vec<BatchRecord>> {
        let sql = "SELECT record FROM batches WHERE job_id = $1 ORDER BY no";
        self.records(&format!("batches/{id}"), sql, &[&id]).await
    }

    async fn open_batches(&self, token: &str) -> R<Vec<BatchRecord>> {
        let sql = "SELECT record FROM batches WHERE open AND token = $1
                   ORDER BY job_id COLLATE \"C\", no";
        self.records("batches (open)", sql, &[&token]).await
    }

    async fn event(&self, event_id: &str) -> R<Option<EventRef>> {
        let sql = "SELECT job_id, batch FROM events WHERE event_id = $1";
        let rows = self.query(sql, &[&event_id]).await?;
        Ok(rows.first().map(|row| EventRef {
            job_id: row.get::<_, String>(0).into(),
            batch: row.get::<_, i64>(1) as u32,
        }))
    }

    async fn prunable(&self, cutoff_ms: u64) -> R<Vec<String>> {
        let sql = "SELECT record FROM jobs j
                   WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = j.id)
                   ORDER BY seq";
        let jobs: Vec<JobRecord> = self.records("jobs", sql, &[]).await?;
        Ok(jobs
            .into_iter()
            .filter(|j| j.expired(cutoff_ms))
            .map(|j| j.id().to_string())
            .collect())
    }

    async fn stats(&self) -> R<StoreStats> {
        // In the order of StoreStats::KINDS; the size is that of the tables
        // in vppd's schema (the first of its search_path).
        let sql = "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM batches),
                          (SELECT count(*) FROM events), (SELECT count(*) FROM failures),
                          (SELECT count(*) FROM inbox), (SELECT count(*) FROM outbox),
                          (SELECT count(*) FROM seen), (SELECT count(*) FROM licenses),
                          (SELECT count(*) FROM users),
                          (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
                             FROM pg_class c
                            WHERE c.relkind = 'r'
                              AND c.relnamespace = current_schema()::regnamespace)";
        let rows = self.query(sql, &[]).await?;
        let Some(row) = rows.first() else {
            return Ok(StoreStats::default());
        };
        let records = StoreStats::KINDS
            .into_iter()
            .enumerate()
            .map(|(i, kind)| (kind, row.get::<_, i64>(i).max(0) as u64))
            .collect();
        Ok(StoreStats {
            bytes: row.get::<_, i64>(StoreStats::KINDS.len()).max(0) as u64,
            records,
        })
    }

    async fn generation(&self) -> R<u64> {
        let rows = self
            .query("SELECT nextval('store_generation')", &[])
            .await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0).max(0) as u64)
    }

    async fn pruned(&self) -> R<u64> {
        let sql = "SELECT value FROM meta WHERE key = 'pruned_jobs'";
        Ok(self
            .query(sql, &[])
            .await?
            .first()
            .and_then(|r| r.get::<_, String>(0).parse().ok())
            .unwrap_or(0))
    }

    async fn record_notification(&self, id: &str, envelope: &[u8]) -> R<Recorded> {
        self.ingest.record(id, envelope).await
    }

    async fn inbox(&self, max: usize) -> R<Vec<InboxItem>> {
        let sql = "SELECT id, envelope FROM inbox ORDER BY id LIMIT $1";
        let rows = self
            .query(sql, &[&(max.min(i64::MAX as usize) as i64)])
            .await?;
        Ok(rows
            .iter()
            .map(|row| InboxItem {
                id: InboxId(row.get::<_, i64>(0) as u64),
                envelope: row.get::<_, Vec<u8>>(1),
            })
            .collect())
    }

    async fn inbox_len(&self) -> R<usize> {
        let rows = self.query("SELECT count(*) FROM inbox", &[]).await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0) as usize)
    }

    async fn prune_seen(&self, cutoff_ms: u64) -> R<usize> {
        let sql = "DELETE FROM seen WHERE at_ms < $1";
        Ok(self.execute(sql, &[&int(cutoff_ms)]).await? as usize)
    }

    async fn park(&self, items: &[(InboxId, String)]) -> R<usize> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.park_items(items).await {
                Err(e) if attempt < CONFLICT_RETRIES && is_conflict(&e) => {
                    tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
                }
                other => return other,
            }
        }
    }

    async fn expire_parked(&self, cutoff_ms: u64, max: usize) -> R<Vec<InboxItem>> {
        // SKIP LOCKED: rows a recording commit is moving back into the
        // inbox are not expired under it.
        let sql = "DELETE FROM parked WHERE id IN (
                       SELECT id FROM parked WHERE at_ms < $1
                       ORDER BY at_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED)
                   RETURNING id, at_ms, envelope";
        let max = max.min(i64::MAX as usize) as i64;
        let rows = self.query(sql, &[&int(cutoff_ms), &max]).await?;
        let mut expired: Vec<(i64, i64, Vec<u8>)> = rows
            .iter()
            .map(|row| (row.get(1), row.get(0), row.get(2)))
            .collect();
        expired.sort_unstable_by_key(|(at, id, _)| (*at, *id));
        Ok(expired
            .into_iter()
            .map(|(_, id, envelope)| InboxItem {
                id: InboxId(id as u64),
                envelope,
            })
            .collect())
    }

    async fn outbox(&self, max_commands: usize) -> R<Vec<OutboxItem>> {
        let mut out = Vec::new();
        let mut commands = 0;
        let mut after = 0i64;
        let sql = "SELECT id, entry FROM outbox WHERE id > $1 ORDER BY id LIMIT $2";
        while commands < max_commands {
            let rows = self.query(sql, &[&after, &OUTBOX_PAGE]).await?;
            for row in &rows {
                if commands >= max_commands {
                    break;
                }
                let id: i64 = row.get(0);
                let entry: crate::domain::lifecycle::OutboxEntry =
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
    }

    async fn held(&self, token: &str) -> R<Vec<OutboxItem>> {
        let sql = "SELECT id, entry FROM held WHERE token = $1 ORDER BY id";
        self.query(sql, &[&token])
            .await?
            .iter()
            .map(|row| {
                let id: i64 = row.get(0);
                Ok(OutboxItem {
                    id: OutboxId(id as u64),
                    entry: decode(&format!("held/{id}"), row.get::<_, &[u8]>(1))?,
                })
            })
            .collect()
    }

    async fn meta(&self, key: &str) -> R<Option<String>> {
        let rows = self
            .query("SELECT value FROM meta WHERE key = $1", &[&key])
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn put_meta(&self, key: &str, value: &str) -> R<()> {
        let sql = "INSERT INTO meta (key, value) VALUES ($1, $2)
                   ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";
        self.execute(sql, &[&key, &value]).await?;
        Ok(())
    }

    async fn meta_or_insert(&self, key: &str, value: &str) -> R<String> {
        let sql = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";
        self.execute(sql, &[&key, &value]).await?;
        match self.meta(key).await? {
            Some(kept) => Ok(kept),
            None => Err(StoreError::Corrupt {
                key: key.to_string(),
                message: "vanished right after it was written".into(),
            }),
        }
    }

    async fn license(
        &self,
        (token, adam_id, pricing): &super::ops::LicenseKey,
    ) -> R<Option<LicenseRecord>> {
        let sql =
            "SELECT record FROM licenses WHERE token = $1 AND adam_id = $2 AND pricing_param = $3";
        let what = format!("licenses/{token}/{adam_id}");
        self.record(&what, sql, &[token, adam_id, pricing]).await
    }

    async fn licenses(&self, token: &str) -> R<Vec<(String, String, LicenseRecord)>> {
        let sql = "SELECT adam_id, pricing_param, record FROM licenses WHERE token = $1
                   ORDER BY adam_id, pricing_param";
        self.query(sql, &[&token])
            .await?
            .iter()
            .map(|row| {
                let adam_id: String = row.get(0);
                let pricing: String = row.get(1);
                let what = format!("licenses/{token}/{adam_id}");
                let record = decode(&what, row.get::<_, &[u8]>(2))?;
                Ok((adam_id, pricing, record))
            })
            .collect()
    }

    async fn user(&self, token: &str, id: &str) -> R<Option<UserRecord>> {
        let sql = "SELECT record FROM users WHERE token = $1 AND client_user_id = $2";
        self.record(&format!("users/{token}/{id}"), sql, &[&token, &id])
            .await
    }

    async fn users(&self, token: &str) -> R<Vec<UserRecord>> {
        let sql = "SELECT record FROM users WHERE token = $1 ORDER BY client_user_id";
        self.records(&format!("users/{token}"), sql, &[&token])
            .await
    }

    async fn drift(&self, token: &str) -> R<Option<DriftRecord>> {
        let sql = "SELECT record FROM drift WHERE token = $1";
        self.record(&format!("drift/{token}"), sql, &[&token]).await
    }

    async fn put_token(&self, record: &TokenRecord) -> R<()> {
        let sql = "INSERT INTO tokens (name, stoken, takeover, updated_ms) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (name) DO UPDATE SET stoken = EXCLUDED.stoken,
                       takeover = EXCLUDED.takeover, updated_ms = EXCLUDED.updated_ms";
        let updated = int(record.updated_ms);
        let params: Params = &[&record.name, &record.stoken, &record.takeover, &updated];
        self.execute(sql, params).await?;
        Ok(())
    }

    async fn tokens(&self) -> R<Vec<TokenRecord>> {
        let sql = "SELECT name, stoken, takeover, updated_ms FROM tokens ORDER BY name";
        Ok(self
            .query(sql, &[])
            .await?
            .iter()
            .map(|row| TokenRecord {
                name: row.get(0),
                stoken: row.get(1),
                takeover: row.get(2),
                updated_ms: row.get::<_, i64>(3).max(0) as u64,
            })
            .collect())
    }

    async fn delete_token(&self, name: &str) -> R<bool> {
        let t = PgTx::begin(&self.pool).await?;
        t.exec("DELETE FROM token_states WHERE name = $1", &[&name])
            .await?;
        let deleted = t
            .exec("DELETE FROM tokens WHERE name = $1", &[&name])
            .await?;
        t.commit().await?;
        Ok(deleted > 0)
    }

    async fn put_token_state(&self, name: &str, state: &str) -> R<()> {
        let sql = "INSERT INTO token_states (name, state) VALUES ($1, $2)
                   ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state";
        self.execute(sql, &[&name, &state]).await?;
        Ok(())
    }

    async fn token_states(&self) -> R<Vec<(String, String)>> {
        let sql = "SELECT name, state FROM token_states ORDER BY name";
        let rows = self.query(sql, &[]).await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    async fn take_leases(&self, names: &[String], holder: &str, ttl: Duration) -> R<Vec<String>> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        // The database's clock for every holder: replicas' clocks need not
        // agree. Rows in one order, so two takers never deadlock.
        let sql = "INSERT INTO leases (name, holder, expires_at)
                   SELECT n, $2, now() + $3::bigint * interval '1 millisecond' FROM unnest($1::text[]) AS n
                   ON CONFLICT (name) DO UPDATE
                   SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                   WHERE leases.holder = EXCLUDED.holder OR leases.expires_at <= now()
                   RETURNING name";
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        sorted.dedup();
        let rows = self.query(sql, &[&sorted, &holder, &ms(ttl)]).await?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    async fn release_leases(&self, names: &[String], holder: &str, linger: Duration) -> R<()> {
        let sql = "UPDATE leases SET expires_at = least(expires_at, now() + $3::bigint * interval '1 millisecond')
                   WHERE holder = $2 AND name = ANY($1)";
        self.execute(sql, &[&names, &holder, &ms(linger)]).await?;
        Ok(())
    }

    async fn leases(&self) -> R<Vec<Lease>> {
        let sql = "SELECT name, holder, (extract(epoch FROM (expires_at - now())) * 1000)::bigint
                   FROM leases ORDER BY name";
        Ok(self
            .query(sql, &[])
            .await?
            .iter()
            .map(|r| Lease {
                name: r.get(0),
                holder: r.get(1),
                remaining_ms: r.get(2),
            })
            .collect())
    }
}
