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
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

thread_local! {
    static READERS: RefCell<HashMap<PathBuf, Connection>> = RefCell::new(HashMap::new());
}

/// The columns of a row, read by name.
pub trait Columns {
    fn text(&self, name: &str) -> Result<String, InfraError>;
    fn maybe_text(&self, name: &str) -> Result<Option<String>, InfraError>;
    fn int(&self, name: &str) -> Result<i64, InfraError>;
}

impl Columns for AnyRow {
    fn text(&self, name: &str) -> Result<String, InfraError> {
        Ok(self.try_get(name)?)
    }
    fn maybe_text(&self, name: &str) -> Result<Option<String>, InfraError> {
        Ok(self.try_get(name)?)
    }
    fn int(&self, name: &str) -> Result<i64, InfraError> {
        Ok(self.try_get(name)?)
    }
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, name: &str) -> Result<String, InfraError> {
        Ok(self.get(name)?)
    }
    fn maybe_text(&self, name: &str) -> Result<Option<String>, InfraError> {
        Ok(self.get(name)?)
    }
    fn int(&self, name: &str) -> Result<i64, InfraError> {
        Ok(self.get(name)?)
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
    map: impl FnMut(&rusqlite::Row<'_>) -> Result<T, InfraError>,
) -> Result<Vec<T>, InfraError> {
    with_reader(file, |connection| rows(connection, sql, params, map))
}

/// The rows `sql` finds with `params` on `connection`, each as `map` makes it (the
/// statement prepared once per connection).
pub fn rows<T>(
    connection: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    mut map: impl FnMut(&rusqlite::Row<'_>) -> Result<T, InfraError>,
) -> Result<Vec<T>, InfraError> {
    let mut statement = connection.prepare_cached(sql)?;
    let mut rows = statement.query(params)?;
    let mut out = vec![];
    while let Some(row) = rows.next()? {
        out.push(map(row)?);
    }
    Ok(out)
}
