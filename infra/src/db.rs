//! Opening SQLite databases the way every part of Orderline needs them: WAL, fsync on
//! every commit (`synchronous=FULL`), a busy timeout instead of immediate failures.

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, SqliteConnection, SqlitePool};
use std::path::Path;
use std::time::Duration;

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        .pragma("cache_size", "-16000")
        .disable_statement_logging()
}

/// A pool on a database file, created when missing.
pub async fn open_pool(path: &Path, max_connections: u32) -> Result<SqlitePool, sqlx::Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
    }
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options(path))
        .await
}

/// One connection, for a task that owns its writes (the event store's writer).
pub async fn open_connection(path: &Path) -> Result<SqliteConnection, sqlx::Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
    }
    options(path).connect().await
}

/// Run a migration script of `CREATE ... IF NOT EXISTS` statements.
pub async fn migrate(pool: &SqlitePool, script: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(script).execute(pool).await.map(|_| ())
}
