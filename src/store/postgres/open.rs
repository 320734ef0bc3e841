//! Connecting to the database and bringing its schema up to date.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::ingest::Ingest;
use super::{Postgres, PostgresStore, backend, pool_error};
use crate::store::{StoreError, Stored};

/// The migrations, in order; version N is `migrations/000N_*.sql`. A
/// released migration is never edited: a change is a new file.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/0001_init.sql")),
    (2, include_str!("../../../migrations/0002_tokens.sql")),
    (3, include_str!("../../../migrations/0003_held.sql")),
    (4, include_str!("../../../migrations/0004_parked.sql")),
    (5, include_str!("../../../migrations/0005_drift.sql")),
    (
        6,
        include_str!("../../../migrations/0006_jobs_by_token.sql"),
    ),
];

/// Connections per replica: the stages, the listeners' commits and the
/// lease keeper share them; a commit waits for a free one.
const POOL_SIZE: usize = 12;

impl PostgresStore {
    /// Connects to `url` (read from `origin`, which errors name instead of
    /// the URL) and creates or migrates the schema. The schema is the first
    /// of the role's `search_path` (`?options=-c%20search_path%3Dvppd` in the
    /// URL picks another); it must exist.
    pub async fn open(url: &str, origin: &str) -> Result<PostgresStore, StoreError> {
        let connect = |source: crate::store::BackendError| StoreError::Connect {
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
        let backend = Postgres {
            ingest: Arc::new(Ingest {
                pool: pool.clone(),
                queue: Mutex::new(Vec::new()),
                commit: Arc::new(tokio::sync::Mutex::new(())),
            }),
            pool,
        };
        migrate(&backend.pool).await.map_err(|e| match e {
            StoreError::Backend(source) => connect(source),
            other => other,
        })?;
        Ok(Stored::new(backend))
    }
}

/// Applies the migrations this schema lacks, in order, in one
/// transaction under an advisory lock: replicas starting together wait
/// for the first, then find nothing left to do.
async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut conn = pool.get().await.map_err(pool_error)?;
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
    if found == 0 {
        tracing::warn!(schema = %schema, "no vppd store in the database: creating a new, empty one (if one was expected here, stop vppd and restore it)");
    }
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
