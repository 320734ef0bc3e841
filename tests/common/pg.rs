//! The PostgreSQL server of the tests: `scripts/with-postgres.sh` starts a
//! throwaway one and exports its URL as `VPPD_TEST_POSTGRES_URL`. Each test
//! works in its own schema, so tests run in parallel on one server.

/// The server's URL. In CI (`CI=true`) a missing server fails the test;
/// elsewhere the test is skipped with a note.
pub fn server_url(test: &str) -> Option<String> {
    match std::env::var("VPPD_TEST_POSTGRES_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url.trim().to_string()),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "{test}: VPPD_TEST_POSTGRES_URL is not set; CI runs the tests under scripts/with-postgres.sh"
                );
            }
            eprintln!(
                "note: {test} skipped: no PostgreSQL (run it under scripts/with-postgres.sh)"
            );
            None
        }
    }
}

/// A schema name nobody used: `name` (letters, digits, `_`) and a random part.
pub fn fresh_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("t_{clean}_{:08x}", rand::random::<u32>())
}

/// Creates `schema` (if missing) and returns a URL whose connections use it.
pub async fn schema_url(base: &str, schema: &str) -> String {
    let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls)
        .await
        .expect("connect to the test server");
    let task = tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .await
        .expect("create a schema");
    drop(client);
    let _ = task.await;
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}
