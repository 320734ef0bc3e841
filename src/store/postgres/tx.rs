//! The PostgreSQL backend's transactions: one pooled connection inside
//! `BEGIN` .. `COMMIT` at READ COMMITTED, every record a change rewrites
//! locked (`SELECT ... FOR UPDATE`) as it is read, so two commits of the
//! same record, from any process, are serialized and none overwrites the
//! other.

use deadpool_postgres::{Object, Pool};
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{backend, first_record, pool_error};
use crate::domain::job::JobSpec;
use crate::domain::lifecycle::{
    BatchRecord, DriftRecord, EventRef, FailureRecord, JobRecord, OutboxEntry,
};
use crate::store::ops::{LicenseKey, Tx};
use crate::store::{
    InboxId, LicenseRecord, OutboxId, StoreError, TokenRecord, UserRecord, decode, encode,
};

type R<T> = Result<T, StoreError>;
type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

/// A transaction on one connection. Dropped before its commit, it is
/// rolled back before the connection goes back to the pool. A reader
/// ([`PgTx::reader`]) is no transaction: each read is a statement of its
/// own, locking nothing.
pub struct PgTx {
    conn: Option<Object>,
    /// Inside `BEGIN`: reads lock what they read.
    locking: bool,
}

impl PgTx {
    pub(super) async fn begin(pool: &Pool) -> R<PgTx> {
        let conn = pool.get().await.map_err(pool_error)?;
        let tx = PgTx {
            conn: Some(conn),
            locking: true,
        };
        tx.client()?.batch_execute("BEGIN").await.map_err(backend)?;
        Ok(tx)
    }

    pub(super) async fn reader(pool: &Pool) -> R<PgTx> {
        let conn = pool.get().await.map_err(pool_error)?;
        Ok(PgTx {
            conn: Some(conn),
            locking: false,
        })
    }

    /// `sql`, which ends in `FOR UPDATE`, without it in a reader.
    fn lock<'s>(&self, sql: &'s str) -> &'s str {
        match self.locking {
            true => sql,
            false => sql.strip_suffix("FOR UPDATE").unwrap_or(sql),
        }
    }

    fn client(&self) -> R<&Object> {
        self.conn
            .as_ref()
            .ok_or_else(|| StoreError::Backend("the transaction has ended".into()))
    }

    pub(super) async fn commit(mut self) -> R<()> {
        if !self.locking {
            return Ok(());
        }
        let result = self
            .client()?
            .batch_execute("COMMIT")
            .await
            .map_err(backend);
        if result.is_ok() {
            // Ended: nothing to roll back.
            self.conn.take();
        }
        result
    }

    pub(super) async fn rows(&self, sql: &str, params: Params<'_>) -> R<Vec<Row>> {
        let client = self.client()?;
        let st = client.prepare_cached(sql).await.map_err(backend)?;
        client.query(&st, params).await.map_err(backend)
    }

    pub(super) async fn exec(&self, sql: &str, params: Params<'_>) -> R<u64> {
        let client = self.client()?;
        let st = client.prepare_cached(sql).await.map_err(backend)?;
        client.execute(&st, params).await.map_err(backend)
    }

    async fn record<V: DeserializeOwned>(
        &self,
        what: &str,
        sql: &str,
        params: Params<'_>,
    ) -> R<Option<V>> {
        first_record(what, &self.rows(sql, params).await?)
    }

    /// Serializes parking a notification for `event_id` with recording that
    /// event: whichever commits second sees the other's rows, so no
    /// notification is parked for an event recorded meanwhile.
    pub(super) async fn lock_event_id(&self, event_id: &str) -> R<()> {
        self.exec(
            "SELECT pg_advisory_xact_lock(7370001, hashtext($1))",
            &[&event_id],
        )
        .await?;
        Ok(())
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if !self.locking {
            return; // no transaction to roll back
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if conn.batch_execute("ROLLBACK").await.is_err() {
                        // Not back into the pool in an unknown state.
                        drop(Object::take(conn));
                    }
                });
            }
            Err(_) => drop(Object::take(conn)),
        }
    }
}

fn int(n: u64) -> i64 {
    n.min(i64::MAX as u64) as i64
}

impl Tx for PgTx {
    const SHARED: bool = true;

    async fn job(&mut self, id: &str) -> R<Option<JobRecord>> {
        let sql = "SELECT record FROM jobs WHERE id = $1 FOR UPDATE";
        self.record(&format!("jobs/{id}"), self.lock(sql), &[&id])
            .await
    }

    async fn put_job(&mut self, job: &JobRecord) -> R<()> {
        let sql = "UPDATE jobs SET record = $2 WHERE id = $1";
        self.exec(sql, &[&job.id().as_str(), &encode(job)?]).await?;
        Ok(())
    }

    async fn next_seq(&mut self) -> R<u64> {
        let rows = self.rows("SELECT nextval('job_seq')", &[]).await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(0).max(0) as u64)
    }

    async fn insert_job(&mut self, job: &JobRecord, spec: &[u8]) -> R<bool> {
        let sql = "INSERT INTO jobs (id, seq, token, record, spec) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (id) DO NOTHING";
        let seq = int(job.seq());
        let params: Params = &[&job.id().as_str(), &seq, &job.token(), &encode(job)?, &spec];
        Ok(self.exec(sql, params).await? == 1)
    }

    async fn spec(&mut self, id: &str) -> R<Option<JobSpec>> {
        let sql = "SELECT spec FROM jobs WHERE id = $1";
        self.record(&format!("specs/{id}"), sql, &[&id]).await
    }

    async fn batch(&mut self, job_id: &str, no: u32) -> R<Option<BatchRecord>> {
        let sql = "SELECT record FROM batches WHERE job_id = $1 AND no = $2 FOR UPDATE";
        let what = format!("batches/{job_id}/{no}");
        self.record(&what, self.lock(sql), &[&job_id, &(no as i64)])
            .await
    }

    async fn put_batch(&mut self, batch: &BatchRecord) -> R<()> {
        let sql =
            "INSERT INTO batches (job_id, no, token, open, record) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (job_id, no) DO UPDATE
                   SET token = EXCLUDED.token, open = EXCLUDED.open, record = EXCLUDED.record";
        let no = batch.no() as i64;
        let open = batch.state().is_open();
        let job_id = batch.job_id().as_str();
        let params: Params = &[&job_id, &no, &batch.token(), &open, &encode(batch)?];
        self.exec(sql, params).await?;
        Ok(())
    }

    async fn remove_batch(&mut self, job_id: &str, no: u32) -> R<()> {
        let sql = "DELETE FROM batches WHERE job_id = $1 AND no = $2";
        self.exec(sql, &[&job_id, &(no as i64)]).await?;
        Ok(())
    }

    async fn put_failure(&mut self, job_id: &str, no: u32, pair: u32, f: &FailureRecord) -> R<()> {
        let sql = "INSERT INTO failures (job_id, batch, pair, record) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (job_id, batch, pair) DO UPDATE SET record = EXCLUDED.record";
        let params: Params = &[&job_id, &(no as i64), &(pair as i64), &encode(f)?];
        self.exec(sql, params).await?;
        Ok(())
    }

    async fn put_event(&mut self, event_id: &str, event: &EventRef) -> R<()> {
        let sql = "INSERT INTO events (event_id, job_id, batch) VALUES ($1, $2, $3)
                   ON CONFLICT (event_id) DO UPDATE
                   SET job_id = EXCLUDED.job_id, batch = EXCLUDED.batch";
        let params: Params = &[&event_id, &event.job_id.as_str(), &(event.batch as i64)];
        self.exec(sql, params).await?;
        Ok(())
    }

    async fn unpark(&mut self, event_id: &str) -> R<()> {
        self.lock_event_id(event_id).await?;
        let sql = "WITH gone AS (DELETE FROM parked WHERE event_id = $1 RETURNING id, envelope)
                   INSERT INTO inbox (id, envelope) SELECT id, envelope FROM gone
                   ON CONFLICT (id) DO NOTHING";
        self.exec(sql, &[&event_id]).await?;
        Ok(())
    }

    async fn remove_inbox(&mut self, ids: &[InboxId]) -> R<usize> {
        let ids: Vec<i64> = ids.iter().map(|i| int(i.0)).collect();
        let sql = "DELETE FROM inbox WHERE id = ANY($1)";
        Ok(self.exec(sql, &[&ids]).await? as usize)
    }

    async fn outbox_entries(&mut self, ids: &[OutboxId]) -> R<Vec<(OutboxId, OutboxEntry)>> {
        // One read, locked in id order, however many entries.
        let ids: Vec<i64> = ids.iter().map(|i| int(i.0)).collect();
        let sql = "SELECT id, entry FROM outbox WHERE id = ANY($1) ORDER BY id FOR UPDATE";
        let mut out = Vec::new();
        for row in self.rows(self.lock(sql), &[&ids]).await? {
            let id: i64 = row.get(0);
            let entry = decode(&format!("outbox/{id}"), row.get::<_, &[u8]>(1))?;
            out.push((OutboxId(id as u64), entry));
        }
        Ok(out)
    }

    async fn put_outbox(&mut self, id: OutboxId, entry: &OutboxEntry) -> R<()> {
        let sql = "UPDATE outbox SET entry = $2, commands = $3 WHERE id = $1";
        let params: Params = &[&int(id.0), &encode(entry)?, &(entry.pairs.len() as i64)];
        self.exec(sql, params).await?;
        Ok(())
    }

    async fn remove_outbox(&mut self, ids: &[OutboxId]) -> R<()> {
        let ids: Vec<i64> = ids.iter().map(|i| int(i.0)).collect();
        self.exec("DELETE FROM outbox WHERE id = ANY($1)", &[&ids])
            .await?;
        Ok(())
    }

    async fn add_outbox(&mut self, entry: &OutboxEntry) -> R<()> {
        let sql = "INSERT INTO outbox (job_id, commands, entry) VALUES ($1, $2, $3)";
        let job_id = entry.job_id.as_str();
        let params: Params = &[&job_id, &(entry.pairs.len() as i64), &encode(entry)?];
        self.exec(sql, params).await?;
        Ok(())
    }

    async fn held(&mut self, token: &str, id: OutboxId) -> R<Option<OutboxEntry>> {
        let sql = "SELECT entry FROM held WHERE id = $1 AND token = $2 FOR UPDATE";
        let what = format!("held/{}", id.0);
        self.record(&what, self.lock(sql), &[&int(id.0), &token])
            .await
    }

    async fn put_held(&mut self, _token: &str, id: OutboxId, entry: &OutboxEntry) -> R<()> {
        let sql = "UPDATE held SET entry = $2 WHERE id = $1";
        self.exec(sql, &[&int(id.0), &encode(entry)?]).await?;
        Ok(())
    }

    async fn remove_held(&mut self, _token: &str, id: OutboxId) -> R<()> {
        self.exec("DELETE FROM held WHERE id = $1", &[&int(id.0)])
            .await?;
        Ok(())
    }

    async fn add_held(&mut self, token: &str, entry: &OutboxEntry) -> R<()> {
        let sql = "INSERT INTO held (token, job_id, entry) VALUES ($1, $2, $3)";
        self.exec(sql, &[&token, &entry.job_id.as_str(), &encode(entry)?])
            .await?;
        Ok(())
    }

    async fn license(
        &mut self,
        (token, adam_id, pricing): &LicenseKey,
    ) -> R<Option<LicenseRecord>> {
        let sql = "SELECT record FROM licenses
                   WHERE token = $1 AND adam_id = $2 AND pricing_param = $3 FOR UPDATE";
        let what = format!("licenses/{token}/{adam_id}");
        self.record(&what, self.lock(sql), &[token, adam_id, pricing])
            .await
    }

    async fn put_license(&mut self, key: &LicenseKey, record: &LicenseRecord) -> R<()> {
        let (token, adam_id, pricing) = key;
        let sql = "INSERT INTO licenses (token, adam_id, pricing_param, record) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (token, adam_id, pricing_param) DO UPDATE SET record = EXCLUDED.record";
        self.exec(sql, &[token, adam_id, pricing, &encode(record)?])
            .await?;
        Ok(())
    }

    async fn put_user(&mut self, token: &str, user: &UserRecord) -> R<()> {
        let sql = "INSERT INTO users (token, client_user_id, record) VALUES ($1, $2, $3)
                   ON CONFLICT (token, client_user_id) DO UPDATE SET record = EXCLUDED.record";
        self.exec(sql, &[&token, &user.client_user_id, &encode(user)?])
            .await?;
        Ok(())
    }

    async fn drift(&mut self, token: &str) -> R<Option<DriftRecord>> {
        // The row exists before it is locked, so that two first changes of
        // a token serialize on it too.
        if self.locking {
            let sql =
                "INSERT INTO drift (token, record) VALUES ($1, $2) ON CONFLICT (token) DO NOTHING";
            self.exec(sql, &[&token, &encode(&DriftRecord::default())?])
                .await?;
        }
        let sql = "SELECT record FROM drift WHERE token = $1 FOR UPDATE";
        self.record(&format!("drift/{token}"), self.lock(sql), &[&token])
            .await
    }

    async fn put_drift(&mut self, token: &str, record: &DriftRecord) -> R<()> {
        let sql = "UPDATE drift SET record = $2 WHERE token = $1";
        self.exec(sql, &[&token, &encode(record)?]).await?;
        Ok(())
    }

    async fn in_outbox(&mut self, job_id: &str) -> R<bool> {
        let sql = "SELECT 1 FROM outbox WHERE job_id = $1 LIMIT 1";
        Ok(!self.rows(sql, &[&job_id]).await?.is_empty())
    }

    async fn forget_job(&mut self, job_id: &str, events: &[String]) -> R<()> {
        self.exec("DELETE FROM events WHERE event_id = ANY($1)", &[&events])
            .await?;
        for sql in [
            "DELETE FROM failures WHERE job_id = $1",
            "DELETE FROM batches WHERE job_id = $1",
            "DELETE FROM jobs WHERE id = $1",
        ] {
            self.exec(sql, &[&job_id]).await?;
        }
        let sql = "INSERT INTO meta (key, value) VALUES ('pruned_jobs', '1')
                   ON CONFLICT (key) DO UPDATE SET value = (meta.value::bigint + 1)::text";
        self.exec(sql, &[]).await?;
        Ok(())
    }

    async fn batches_of(&mut self, job_id: &str) -> R<Vec<BatchRecord>> {
        let sql = "SELECT record FROM batches WHERE job_id = $1 ORDER BY no";
        self.rows(sql, &[&job_id])
            .await?
            .iter()
            .map(|row| decode(&format!("batches/{job_id}"), row.get::<_, &[u8]>(0)))
            .collect()
    }
    async fn event(&mut self, event_id: &str) -> R<Option<EventRef>> {
        let sql = "SELECT job_id, batch FROM events WHERE event_id = $1";
        let rows = self.rows(sql, &[&event_id]).await?;
        Ok(rows.first().map(|row| EventRef {
            job_id: row.get::<_, String>(0).into(),
            batch: row.get::<_, i64>(1) as u32,
        }))
    }

    async fn user(&mut self, token: &str, id: &str) -> R<Option<UserRecord>> {
        let sql = "SELECT record FROM users WHERE token = $1 AND client_user_id = $2";
        self.record(&format!("users/{token}/{id}"), sql, &[&token, &id])
            .await
    }

    async fn park(&mut self, id: InboxId, event_id: &str, at_ms: u64) -> R<bool> {
        self.lock_event_id(event_id).await?;
        let known = "SELECT 1 FROM events WHERE event_id = $1";
        if !self.rows(known, &[&event_id]).await?.is_empty() {
            return Ok(false);
        }
        let park = "WITH gone AS (DELETE FROM inbox WHERE id = $1 RETURNING id, envelope)
                    INSERT INTO parked (id, event_id, at_ms, envelope)
                    SELECT id, $2, $3, envelope FROM gone";
        let params: Params = &[&int(id.0), &event_id, &int(at_ms)];
        Ok(self.exec(park, params).await? > 0)
    }

    async fn meta(&mut self, key: &str) -> R<Option<String>> {
        let rows = self
            .rows("SELECT value FROM meta WHERE key = $1", &[&key])
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn put_meta(&mut self, key: &str, value: &str) -> R<()> {
        let sql = "INSERT INTO meta (key, value) VALUES ($1, $2)
                   ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";
        self.exec(sql, &[&key, &value]).await?;
        Ok(())
    }

    async fn insert_meta(&mut self, key: &str, value: &str) -> R<bool> {
        let sql = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";
        Ok(self.exec(sql, &[&key, &value]).await? > 0)
    }

    async fn put_token(&mut self, record: &TokenRecord) -> R<()> {
        let sql = "INSERT INTO tokens (name, stoken, takeover, updated_ms) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (name) DO UPDATE SET stoken = EXCLUDED.stoken,
                       takeover = EXCLUDED.takeover, updated_ms = EXCLUDED.updated_ms";
        let updated = int(record.updated_ms);
        let params: Params = &[&record.name, &record.stoken, &record.takeover, &updated];
        self.exec(sql, params).await?;
        Ok(())
    }

    async fn remove_token(&mut self, name: &str) -> R<bool> {
        self.exec("DELETE FROM token_states WHERE name = $1", &[&name])
            .await?;
        let sql = "DELETE FROM tokens WHERE name = $1";
        Ok(self.exec(sql, &[&name]).await? > 0)
    }

    async fn put_token_state(&mut self, name: &str, state: &str) -> R<()> {
        let sql = "INSERT INTO token_states (name, state) VALUES ($1, $2)
                   ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state";
        self.exec(sql, &[&name, &state]).await?;
        Ok(())
    }
}
