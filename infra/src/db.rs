//! Databases: SQLite files for the embedded deployment, PostgreSQL for the
//! distributed one, behind one handle ([`Db`]) so every adapter is written once.
//!
//! SQL is written with `$1`-style parameters, which both engines read. The few
//! differences go through [`Dialect`]: auto-increment keys in DDL (`{serial}`), a
//! JSON list bound as one parameter, and how a writing transaction begins. SQLite
//! runs in WAL mode with `synchronous=FULL`: a commit is on disk when it returns.

use sqlx::any::{install_default_drivers, AnyPoolOptions};
use sqlx::migrate::{MigrateDatabase, Migration, Migrator};
use sqlx::{Any, AnyConnection, AnyPool, ConnectOptions, Connection, Executor, Transaction};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every SQLite connection's settings. Each commit is made durable (`synchronous =
/// FULL`: the write-ahead log is synced before the commit returns).
///
/// The write-ahead log is copied back into the database file (a checkpoint, run by
/// the connection whose commit takes the log past the bound) every 16,000 pages
/// (64 MiB of 4 KiB pages) rather than SQLite's 1,000. A checkpoint writes each page
/// once, however many of the log's frames hold it, and the pages every commit
/// changes (the leaves of the stream index that a group's streams fall in, the
/// tables' last pages) are most of a commit's frames: at 1,000 pages the log's
/// writer spent about a seventh of its time in checkpoints, copying those same pages
/// again every few groups (`append` c=256: 0.62-0.67 of raw batched at 1,000 pages,
/// 0.73-0.83 at 16,000; docs/benchmarks.md). The price: a file's log grows to 64 MiB
/// on disk (and keeps that size), and the one commit in so many that takes it past
/// the bound waits for a longer checkpoint.
pub(crate) const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA cache_size = -16000; \
     PRAGMA wal_autocheckpoint = 16000;";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub fn of_url(url: &str) -> Result<Dialect, sqlx::Error> {
        if url.starts_with("sqlite:") {
            Ok(Dialect::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Dialect::Postgres)
        } else {
            Err(sqlx::Error::Configuration(
                format!("unsupported database URL {url:?}: use sqlite:// or postgres://").into(),
            ))
        }
    }

    /// DDL for this engine: `{serial}` becomes an auto-increment primary key, and
    /// `{without_rowid}` (after a table's closing parenthesis) a table stored in its
    /// primary key's B-tree on SQLite (nothing on PostgreSQL).
    pub fn ddl(self, script: &str) -> String {
        match self {
            Dialect::Sqlite => script
                .replace("{serial}", "INTEGER PRIMARY KEY AUTOINCREMENT")
                .replace("{without_rowid}", " WITHOUT ROWID"),
            Dialect::Postgres => script
                .replace("{serial}", "BIGSERIAL PRIMARY KEY")
                .replace("{without_rowid}", ""),
        }
    }

    /// A sub-select of the elements of the JSON array of strings bound as `param`.
    pub fn text_list(self, param: &str) -> String {
        match self {
            Dialect::Sqlite => format!("SELECT value FROM json_each({param})"),
            Dialect::Postgres => {
                format!("SELECT jsonb_array_elements_text(CAST({param} AS jsonb))")
            }
        }
    }

    /// `column` is one of the strings of the JSON array bound as `param`. On
    /// PostgreSQL as `= ANY(ARRAY(...))`, which it answers with an index scan even
    /// without statistics of the table; `IN (sub-select)` it may answer with a hash
    /// join over a scan of the whole table.
    pub fn in_text_list(self, column: &str, param: &str) -> String {
        match self {
            Dialect::Sqlite => format!("{column} IN ({})", self.text_list(param)),
            Dialect::Postgres => format!("{column} = ANY(ARRAY({}))", self.text_list(param)),
        }
    }

    /// A sub-select of the elements of the JSON array of integers bound as `param`.
    pub fn integer_list(self, param: &str) -> String {
        match self {
            Dialect::Sqlite => format!("SELECT value FROM json_each({param})"),
            Dialect::Postgres => {
                format!("SELECT CAST(jsonb_array_elements_text(CAST({param} AS jsonb)) AS BIGINT)")
            }
        }
    }

    /// A source of rows for multi-row statements: the elements of the JSON array of
    /// arrays bound as `param`, as `k`, in order (`ORDER BY k.key`). Column i of a row
    /// is `k.value ->> i` (text; cast it for other types). One parameter whatever the
    /// number of rows, so the statement is prepared once and binding stays cheap.
    pub fn json_rows(self, param: &str) -> String {
        match self {
            Dialect::Sqlite => format!("json_each({param}) AS k"),
            Dialect::Postgres => format!(
                "jsonb_array_elements(CAST({param} AS jsonb)) WITH ORDINALITY AS k(value, key)"
            ),
        }
    }

    /// The base migrations (one set, written with `{serial}`) in this dialect.
    pub fn migrator(self) -> Migrator {
        static TEMPLATE: Migrator = sqlx::migrate!("./migrations");
        let migrations = TEMPLATE
            .migrations
            .iter()
            .map(|m| {
                Migration::new(
                    m.version,
                    m.description.clone(),
                    m.migration_type,
                    Cow::Owned(self.ddl(&m.sql)),
                    m.no_tx,
                )
            })
            .collect::<Vec<_>>();
        Migrator {
            migrations: Cow::Owned(migrations),
            ignore_missing: TEMPLATE.ignore_missing,
            locking: TEMPLATE.locking,
            no_tx: TEMPLATE.no_tx,
        }
    }

    /// How a transaction that will write begins: SQLite takes the write lock at once,
    /// so two writers never deadlock upgrading a read lock.
    pub fn begin_write(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }
}

/// A database: its pool and its dialect. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub dialect: Dialect,
    pub url: String,
    /// An SQLite file's own write connection, for consumers that write a whole batch
    /// without a hop to the driver's thread per statement (`None` on PostgreSQL).
    pub local: Option<crate::local::LocalWriter>,
}

/// A value bound to a statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bind {
    Text(String),
    Integer(i64),
}

/// One statement with its values: `$1`, `$2`, ... are `binds` in order. It runs
/// through the driver ([`Statement::execute`]) or on an SQLite file's own connection
/// ([`crate::local::execute`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub binds: Vec<Bind>,
}

impl Statement {
    pub fn new(sql: impl Into<String>, binds: Vec<Bind>) -> Statement {
        Statement {
            sql: sql.into(),
            binds,
        }
    }

    /// Run through the driver, prepared once per connection.
    pub async fn execute(&self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        self.query().execute(conn).await.map(|_| ())
    }

    /// The driver's query with every value bound.
    pub fn query(&self) -> sqlx::query::Query<'_, Any, sqlx::any::AnyArguments<'_>> {
        let mut query = sqlx::query(&self.sql);
        for bind in &self.binds {
            query = match bind {
                Bind::Text(text) => query.bind(text.as_str()),
                Bind::Integer(n) => query.bind(*n),
            };
        }
        query
    }
}

/// `text` as a PostgreSQL string literal, `E'...'` with backslashes and quotes
/// escaped, so it reads back exactly whatever `standard_conforming_strings` says: for
/// scripts sent over the simple query protocol, which takes no parameters.
pub fn text_literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// The URL of an SQLite file, created when missing.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

impl Db {
    /// The file of an SQLite database (`None` on PostgreSQL, or in memory).
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        match self.dialect {
            Dialect::Sqlite => sqlite_path(&self.url).map(Path::to_path_buf),
            Dialect::Postgres => None,
        }
    }

    /// Open (creating when missing: the file, or the PostgreSQL database) `url`, with
    /// its base tables migrated: every part of Orderline can rely on them.
    pub async fn open(url: &str, max_connections: u32) -> Result<Db, sqlx::Error> {
        install_default_drivers();
        let dialect = Dialect::of_url(url)?;
        match dialect {
            Dialect::Sqlite => {
                if let Some(parent) = sqlite_path(url).and_then(|p| p.parent().map(Path::to_owned))
                {
                    std::fs::create_dir_all(parent).map_err(sqlx::Error::Io)?;
                }
            }
            Dialect::Postgres => {
                if !Any::database_exists(url).await? {
                    if let Err(error) = Any::create_database(url).await {
                        // Another process may have created it meanwhile.
                        if !Any::database_exists(url).await? {
                            return Err(error);
                        }
                    }
                }
            }
        }
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(1)
            // A database that is down answers within this (503), not after a long hang.
            .acquire_timeout(Duration::from_secs(10))
            // A transaction dropped without a commit leaves its rollback queued on
            // the connection. When the database has already ended the transaction
            // itself (SQLite does on a full disk or an i/o error), that rollback fails
            // and sqlx goes on counting the transaction as open, so every later
            // `begin` on the connection would fail: such a connection is closed.
            .after_release(|conn, _| {
                Box::pin(async move {
                    if conn.is_in_transaction() {
                        conn.ping().await?;
                        return Ok(!conn.is_in_transaction());
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        conn.execute(SQLITE_PRAGMAS).await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let local = match dialect {
            Dialect::Sqlite => sqlite_path(url).map(crate::local::LocalWriter::new),
            Dialect::Postgres => None,
        };
        let db = Db {
            pool,
            dialect,
            url: url.to_owned(),
            local,
        };
        db.migrate_base()
            .await
            .map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        Ok(db)
    }

    /// An SQLite file's database.
    pub async fn open_sqlite(path: &Path, max_connections: u32) -> Result<Db, sqlx::Error> {
        Db::open(&sqlite_url(path), max_connections).await
    }

    /// One connection of its own, for a task that owns its writes.
    pub async fn connection(&self) -> Result<AnyConnection, sqlx::Error> {
        let options: sqlx::any::AnyConnectOptions = self.url.parse()?;
        let mut conn = options.disable_statement_logging().connect().await?;
        if self.dialect == Dialect::Sqlite {
            conn.execute(SQLITE_PRAGMAS).await?;
        }
        conn.ping().await?;
        Ok(conn)
    }

    /// A transaction that will write.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        self.pool.begin_with(self.dialect.begin_write()).await
    }

    /// Bring the database's own tables up to date (`infra/migrations`, embedded in
    /// the binary, with this dialect's DDL; a migration applied once is not applied
    /// again).
    async fn migrate_base(&self) -> Result<(), sqlx::migrate::MigrateError> {
        self.dialect.migrator().run(&self.pool).await
    }

    /// Run a script of `CREATE ... IF NOT EXISTS` statements (with `{serial}`): for
    /// tables made at run time (read models and their shadows).
    pub async fn migrate(&self, script: &str) -> Result<(), sqlx::Error> {
        let script = self.dialect.ddl(script);
        for statement in statements(&script) {
            sqlx::query(&statement).execute(&self.pool).await?;
        }
        Ok(())
    }
}

/// The statements of a script, one by one: split at each `;`, but a trigger's body
/// (`CREATE TRIGGER ... BEGIN ...; ...; END;`) stays one statement.
pub fn statements(script: &str) -> Vec<String> {
    let mut out = vec![];
    let mut current = String::new();
    for piece in script.split_inclusive(';') {
        current.push_str(piece);
        let statement = current.trim().trim_end_matches(';').trim_end();
        let upper = statement.to_ascii_uppercase();
        if upper.starts_with("CREATE TRIGGER") && !upper.ends_with("END") {
            continue;
        }
        if !statement.is_empty() {
            out.push(statement.to_owned());
        }
        current.clear();
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_owned());
    }
    out
}

fn sqlite_path(url: &str) -> Option<&Path> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| Path::new(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_splits_into_statements_and_a_trigger_stays_whole() {
        let script = "CREATE TABLE t (a TEXT); CREATE TRIGGER x AFTER INSERT ON t BEGIN
            INSERT INTO u VALUES (1); INSERT INTO u VALUES (2);
        END;
        INSERT INTO t VALUES ('a');";
        let split = statements(script);
        assert_eq!(split.len(), 3, "{split:?}");
        assert!(split[1].ends_with("END"), "{split:?}");
    }

    /// SHA-384 of the base migration as earlier versions shipped it, one file per
    /// dialect: databases they made must still open.
    const SHIPPED: [(Dialect, &str); 2] = [
        (
            Dialect::Sqlite,
            "5659b2e325236d22dfcebc5559cc5b91b8a67614b78e69a6da0ffc8e27666b18af14592e0f2d6fe6e74bc26d540107c3",
        ),
        (
            Dialect::Postgres,
            "2098f3a506849d9ddc44c8b19da0260dddf0225b7b76de67e5c67f425be72c588fc678181cf838fd4c469ee6dfd08e83",
        ),
    ];

    #[test]
    fn one_set_of_migrations_reads_as_each_dialect_shipped_it() {
        for (dialect, checksum) in SHIPPED {
            let migrator = dialect.migrator();
            let first = migrator.migrations.first().expect("a migration");
            let hex: String = first.checksum.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, checksum, "{dialect:?}");
            assert!(!first.sql.contains("{serial}"));
        }
    }

    #[tokio::test]
    async fn a_database_is_migrated_once_and_opens_again() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("service.db");
        let db = Db::open_sqlite(&path, 1).await.expect("created");
        db.pool.close().await;
        let db = Db::open_sqlite(&path, 1).await.expect("reopened");
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&db.pool)
            .await
            .expect("migrations");
        // Each migration once, though the database was opened twice.
        let shipped = Dialect::Sqlite.migrator().migrations.len();
        assert_eq!(applied as usize, shipped);
        assert!(shipped >= 3);
    }
}
