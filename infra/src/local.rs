//! Reads of SQLite files without a hop per statement. sqlx runs each SQLite
//! connection on a thread of its own: every statement, and every row it returns, is a
//! message over a channel and a thread switch, which is most of the cost of short
//! reads and of reading a batch of events (the `query` and `rebuild` benchmarks'
//! profiles). [`with_reader`] runs a read on the calling thread through a read-only
//! connection of that thread's own (rusqlite, over the same SQLite library), opened
//! on first use, its statements prepared once. In WAL mode a reader never waits for
//! the writer and sees what was committed before its statement began; a schema
//! change (a rebuild's swap) makes SQLite prepare a statement again by itself.
//!
//! [`Columns`] reads a row by column name from either driver, so a row is mapped by
//! one function whichever read it.

use crate::InfraError;
use rusqlite::{Connection, OpenFlags};
use sqlx::any::AnyRow;
use sqlx::Row;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

thread_local! {
    static READERS: RefCell<HashMap<PathBuf, Connection>> = RefCell::new(HashMap::new());
}

/// The columns of a row, read by name.
pub trait Columns {
    fn text(&self, name: &str) -> Result<String, InfraError>;
    /// A text column borrowed from the row, for one that is parsed, not kept.
    fn str(&self, name: &str) -> Result<&str, InfraError>;
    fn maybe_text(&self, name: &str) -> Result<Option<String>, InfraError>;
    fn int(&self, name: &str) -> Result<i64, InfraError>;
}

impl Columns for AnyRow {
    fn text(&self, name: &str) -> Result<String, InfraError> {
        Ok(self.try_get(name)?)
    }
    fn str(&self, name: &str) -> Result<&str, InfraError> {
        Ok(self.try_get(name)?)
    }
    fn maybe_text(&self, name: &str) -> Result<Option<String>, InfraError> {
        Ok(self.try_get(name)?)
    }
    fn int(&self, name: &str) -> Result<i64, InfraError> {
        Ok(self.try_get(name)?)
    }
}

fn open(file: &Path) -> Result<Connection, InfraError> {
    let connection = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(Duration::from_secs(5))?;
    Ok(connection)
}

/// Run `read` on this thread's read-only connection to the SQLite `file`. A
/// connection whose read failed is closed (the next read opens another).
pub fn with_reader<T>(
    file: &Path,
    read: impl FnOnce(&Connection) -> Result<T, InfraError>,
) -> Result<T, InfraError> {
    READERS.with(|cell| {
        let mut readers = cell.borrow_mut();
        if !readers.contains_key(file) {
            let connection = open(file)?;
            readers.insert(file.to_path_buf(), connection);
        }
        let outcome = match readers.get(file) {
            Some(connection) => read(connection),
            None => Err(InfraError::Unavailable(format!(
                "no reader of {}",
                file.display()
            ))),
        };
        if outcome.is_err() {
            readers.remove(file);
        }
        outcome
    })
}

/// The rows `sql` finds with `params`, each as `map` makes it, read on this thread.
pub fn read_rows<T>(
    file: &Path,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&NamedRow<'_, '_>) -> Result<T, InfraError>,
) -> Result<Vec<T>, InfraError> {
    with_reader(file, |connection| rows(connection, sql, params, map))
}

/// The rows `sql` finds with `params` on `connection`, each as `map` makes it (the
/// statement prepared once per connection).
pub fn rows<T>(
    connection: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&NamedRow<'_, '_>) -> Result<T, InfraError>,
) -> Result<Vec<T>, InfraError> {
    rows_for_each(connection, sql, [params], map)
}

/// [`rows`] for each of `all_params` in turn, all rows in one list: the statement is
/// looked up and its column names read once, not once per run.
pub fn rows_for_each<T, P: rusqlite::Params>(
    connection: &Connection,
    sql: &str,
    all_params: impl IntoIterator<Item = P>,
    mut map: impl FnMut(&NamedRow<'_, '_>) -> Result<T, InfraError>,
) -> Result<Vec<T>, InfraError> {
    let mut statement = connection.prepare_cached(sql)?;
    let names: Vec<String> = statement
        .column_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    // With a name twice, the first of them is the one found: no guessing then.
    let distinct = names
        .iter()
        .enumerate()
        .all(|(i, name)| !names[..i].iter().any(|n| n.eq_ignore_ascii_case(name)));
    let mut out = vec![];
    for params in all_params {
        let mut rows = statement.query(params)?;
        while let Some(row) = rows.next()? {
            out.push(map(&NamedRow {
                row,
                names: &names,
                next: Cell::new(distinct.then_some(0)),
            })?);
        }
    }
    Ok(out)
}

/// A row of a local read, its columns found by name among the statement's names,
/// read once per statement (rusqlite asks SQLite for every column's name at every
/// lookup by name: a tenth of a batch read's time).
pub struct NamedRow<'r, 's> {
    row: &'r rusqlite::Row<'s>,
    names: &'r [String],
    /// The column after the one last found: looked at first, as a row is mostly read
    /// in the order of its columns (`None`: none, in a statement with a name twice).
    next: Cell<Option<usize>>,
}

impl NamedRow<'_, '_> {
    fn index(&self, name: &str) -> Result<usize, InfraError> {
        let next = self.next.get();
        // The names as written first (SQLite keeps a column's case), then any case.
        let index = next
            .filter(|&i| self.names.get(i).is_some_and(|n| n == name))
            .or_else(|| self.names.iter().position(|n| n == name))
            .or_else(|| self.names.iter().position(|n| n.eq_ignore_ascii_case(name)))
            .ok_or_else(|| {
                InfraError::Sqlite(rusqlite::Error::InvalidColumnName(name.to_owned()))
            })?;
        if next.is_some() {
            self.next.set(Some(index + 1));
        }
        Ok(index)
    }
}

impl Columns for NamedRow<'_, '_> {
    fn text(&self, name: &str) -> Result<String, InfraError> {
        Ok(self.row.get(self.index(name)?)?)
    }
    fn str(&self, name: &str) -> Result<&str, InfraError> {
        self.row
            .get_ref(self.index(name)?)?
            .as_str()
            .map_err(|e| InfraError::Corrupt(format!("column {name}: {e}")))
    }
    fn maybe_text(&self, name: &str) -> Result<Option<String>, InfraError> {
        Ok(self.row.get(self.index(name)?)?)
    }
    fn int(&self, name: &str) -> Result<i64, InfraError> {
        Ok(self.row.get(self.index(name)?)?)
    }
}

/// An SQLite file's own write connection (rusqlite), used on a blocking thread: a
/// consumer's whole batch (its version guards, its changes, its dead letters and its
/// position) runs there in one transaction, each statement prepared once per
/// connection, instead of a message to the driver's thread per statement. Writers of
/// the driver's pool and this one take SQLite's write lock in turn (`BEGIN
/// IMMEDIATE`, with the same busy timeout). Opened on first use; a connection whose
/// transaction failed and cannot be rolled back is closed, and the next opens another.
#[derive(Clone, Debug)]
pub struct LocalWriter {
    file: PathBuf,
    conn: std::sync::Arc<std::sync::Mutex<Option<Connection>>>,
}

impl LocalWriter {
    pub fn new(file: &Path) -> LocalWriter {
        LocalWriter {
            file: file.to_path_buf(),
            conn: Default::default(),
        }
    }

    /// Run `work` in one write transaction on a blocking thread: committed when it
    /// returns `Ok`, rolled back otherwise.
    pub async fn transaction<T, F>(&self, work: F) -> Result<T, InfraError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, InfraError> + Send + 'static,
    {
        let writer = self.clone();
        tokio::task::spawn_blocking(move || writer.transaction_here(work)).await?
    }

    fn transaction_here<T>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, InfraError>,
    ) -> Result<T, InfraError> {
        let mut slot = self
            .conn
            .lock()
            .map_err(|_| InfraError::Unavailable("an SQLite writer panicked".into()))?;
        let conn = match slot.take() {
            Some(conn) => conn,
            None => open_writer(&self.file)?,
        };
        let outcome = conn
            .execute_batch(crate::db::Dialect::Sqlite.begin_write())
            .map_err(InfraError::from)
            .and_then(|()| work(&conn))
            .and_then(|out| {
                conn.execute_batch("COMMIT")?;
                Ok(out)
            });
        let sound =
            outcome.is_ok() || conn.is_autocommit() || conn.execute_batch("ROLLBACK").is_ok();
        if sound {
            *slot = Some(conn);
        }
        outcome
    }
}

/// Open an SQLite file's own write connection, with the settings of every other.
pub(crate) fn open_writer(file: &Path) -> Result<Connection, InfraError> {
    let conn = Connection::open(file)?;
    conn.execute_batch(crate::db::SQLITE_PRAGMAS)?;
    // Every statement of the projections, guards and positions that share the file.
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// Run `statement` on `conn`, prepared once per connection (`$n` is its `n`th value).
pub fn execute(conn: &Connection, statement: &crate::db::Statement) -> rusqlite::Result<usize> {
    execute_with(conn, &statement.sql, &statement.binds)
}

/// [`execute`] of `sql` with `binds`.
pub fn execute_with(
    conn: &Connection,
    sql: &str,
    binds: &[crate::db::Bind],
) -> rusqlite::Result<usize> {
    use crate::db::Bind;
    let mut prepared = conn.prepare_cached(sql)?;
    for index in 1..=prepared.parameter_count() {
        let value = prepared
            .parameter_name(index)
            .and_then(|name| name.trim_start_matches(['$', '?']).parse::<usize>().ok())
            .and_then(|n| binds.get(n.checked_sub(1)?));
        match value {
            Some(Bind::Text(text)) => prepared.raw_bind_parameter(index, text.as_str())?,
            Some(Bind::Integer(n)) => prepared.raw_bind_parameter(index, *n)?,
            None => {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "{sql} (parameter {index} has no value)"
                )))
            }
        }
    }
    prepared.raw_execute()
}

/// Whether an SQLite error says the database cannot take writes now (busy, locked,
/// full, read-only, i/o), not that the statement is wrong: the same batch may work later.
pub fn unavailable(error: &rusqlite::Error) -> bool {
    error
        .sqlite_error()
        .is_some_and(|e| crate::sqlite_unavailable(&e.extended_code.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file's own write connection has every connection's settings: WAL, each
    /// commit synced, a checkpoint every 16,000 pages of the write-ahead log.
    #[test]
    fn a_files_own_writer_is_durable_and_checkpoints_every_16000_pages() {
        let dir = tempfile::tempdir().expect("dir");
        let conn = open_writer(&dir.path().join("x.db")).expect("open");
        let number = |name| {
            conn.pragma_query_value(None, name, |row| row.get::<_, i64>(0))
                .expect("pragma")
        };
        let mode = conn.pragma_query_value(None, "journal_mode", |row| row.get::<_, String>(0));
        assert_eq!(mode.expect("pragma"), "wal");
        assert_eq!(number("synchronous"), 2, "synchronous=FULL");
        assert_eq!(number("wal_autocheckpoint"), 16_000);
    }

    /// Columns are found by name whatever the order they are read in, in any case,
    /// and where a statement has a name twice, the first of them.
    #[test]
    fn a_rows_columns_are_found_by_name_in_any_order_and_a_name_twice_is_the_first() {
        let conn = Connection::open_in_memory().expect("open");
        let read = |sql: &str, names: &[&str]| -> Vec<String> {
            let mut found = rows(&conn, sql, [], |row| {
                names
                    .iter()
                    .map(|name| row.text(name))
                    .collect::<Result<Vec<_>, _>>()
            })
            .expect("rows");
            found.pop().expect("a row")
        };
        let distinct = "SELECT 'a' AS a, 'b' AS b, 'c' AS c";
        assert_eq!(read(distinct, &["a", "b", "c"]), ["a", "b", "c"]);
        assert_eq!(
            read(distinct, &["c", "a", "b", "b", "C"]),
            ["c", "a", "b", "b", "c"]
        );
        let twice = "SELECT 'first' AS x, 'y' AS y, 'second' AS x";
        assert_eq!(
            read(twice, &["x", "y", "x", "X"]),
            ["first", "y", "first", "first"]
        );
        let unknown = rows(&conn, distinct, [], |row| row.text("d"));
        assert!(unknown.is_err(), "{unknown:?}");
    }

    #[test]
    fn a_database_that_cannot_take_writes_is_unavailable_a_refused_statement_is_not() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY); INSERT INTO t VALUES ('a');")
            .expect("table");
        let duplicate = conn
            .execute("INSERT INTO t VALUES ('a')", [])
            .expect_err("a duplicate key");
        assert!(!unavailable(&duplicate), "{duplicate}");
        let missing = conn
            .execute("INSERT INTO nowhere VALUES ('a')", [])
            .expect_err("no such table");
        assert!(!unavailable(&missing), "{missing}");

        conn.execute_batch("PRAGMA query_only = ON")
            .expect("read-only");
        let read_only = conn
            .execute("INSERT INTO t VALUES ('b')", [])
            .expect_err("read-only");
        assert!(unavailable(&read_only), "{read_only}");
        conn.execute_batch("PRAGMA query_only = OFF")
            .expect("writable");

        // No page left to grow into: full.
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |row| row.get(0))
            .expect("pages");
        conn.execute_batch(&format!("PRAGMA max_page_count = {pages}"))
            .expect("limit");
        let full = conn
            .execute("INSERT INTO t VALUES (?1)", [&"x".repeat(100_000)])
            .expect_err("full");
        assert!(unavailable(&full), "{full}");
    }

    #[test]
    fn a_statement_runs_with_its_numbered_values_in_any_order() {
        use crate::db::{Bind, Statement};
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch("CREATE TABLE t (a TEXT, b INTEGER)")
            .expect("table");
        let statement = Statement::new(
            "INSERT INTO t (b, a) VALUES ($2, $1)",
            vec![Bind::Text("one".into()), Bind::Integer(1)],
        );
        assert_eq!(execute(&conn, &statement).expect("inserted"), 1);
        let row: (String, i64) = conn
            .query_row("SELECT a, b FROM t", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .expect("row");
        assert_eq!(row, ("one".to_owned(), 1));
        let missing = Statement::new("INSERT INTO t (a) VALUES ($1)", vec![]);
        assert!(
            execute(&conn, &missing).is_err(),
            "a parameter without a value"
        );
    }
}
