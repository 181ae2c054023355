//! Point reads of SQLite read models without a thread hop. sqlx runs each SQLite
//! connection on a thread of its own, so every statement is a channel round trip and
//! two thread switches; for a read of one row by its key that was most of a request's
//! cost (the `query` benchmark's profile). These reads use a read-only connection of
//! the calling worker thread's own (rusqlite, over the same SQLite library), opened on
//! first use, with its statements prepared once: the read runs on the task, for the
//! few microseconds it takes. In WAL mode a reader never waits for the writer, and a
//! rebuild's swap (a schema change) makes SQLite prepare a statement again by itself.

use infra::http::ApiError;
use rusqlite::{Connection, OpenFlags};
use sqlx::any::AnyRow;
use sqlx::Row;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

thread_local! {
    static CONNECTIONS: RefCell<HashMap<PathBuf, Connection>> = RefCell::new(HashMap::new());
}

/// The columns of a row, read by name, from either driver.
pub trait Columns {
    fn text(&self, name: &str) -> Result<String, ApiError>;
    fn maybe_text(&self, name: &str) -> Result<Option<String>, ApiError>;
    fn int(&self, name: &str) -> Result<i64, ApiError>;
}

impl Columns for AnyRow {
    fn text(&self, name: &str) -> Result<String, ApiError> {
        Ok(self.try_get(name)?)
    }
    fn maybe_text(&self, name: &str) -> Result<Option<String>, ApiError> {
        Ok(self.try_get(name)?)
    }
    fn int(&self, name: &str) -> Result<i64, ApiError> {
        Ok(self.try_get(name)?)
    }
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, name: &str) -> Result<String, ApiError> {
        self.get(name).map_err(refused)
    }
    fn maybe_text(&self, name: &str) -> Result<Option<String>, ApiError> {
        self.get(name).map_err(refused)
    }
    fn int(&self, name: &str) -> Result<i64, ApiError> {
        self.get(name).map_err(refused)
    }
}

/// A database that cannot be read now (busy, locked, gone) is a 503; anything else is
/// a fault of ours.
fn refused(error: rusqlite::Error) -> ApiError {
    match error.sqlite_error_code() {
        Some(
            rusqlite::ErrorCode::DatabaseBusy
            | rusqlite::ErrorCode::DatabaseLocked
            | rusqlite::ErrorCode::CannotOpen
            | rusqlite::ErrorCode::SystemIoFailure,
        ) => ApiError::unavailable(error),
        _ => ApiError::internal(error),
    }
}

fn open(file: &Path) -> Result<Connection, ApiError> {
    let connection = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(refused)?;
    connection
        .busy_timeout(Duration::from_secs(5))
        .map_err(refused)?;
    Ok(connection)
}

/// The row `sql` finds for `key` in `file` (SQLite), read on this thread, as `map`
/// makes it; `None` when there is none.
pub fn read_one<T>(
    file: &Path,
    sql: &str,
    key: &str,
    map: impl FnOnce(&rusqlite::Row<'_>) -> Result<T, ApiError>,
) -> Result<Option<T>, ApiError> {
    CONNECTIONS.with(|cell| {
        let mut connections = cell.borrow_mut();
        if !connections.contains_key(file) {
            let connection = open(file)?;
            connections.insert(file.to_path_buf(), connection);
        }
        let connection = connections
            .get(file)
            .ok_or_else(|| ApiError::internal("a connection just opened is missing"))?;
        let read = (|| {
            let mut statement = connection.prepare_cached(sql).map_err(refused)?;
            let mut rows = statement.query([key]).map_err(refused)?;
            match rows.next().map_err(refused)? {
                Some(row) => map(row).map(Some),
                None => Ok(None),
            }
        })();
        if read.is_err() {
            // Open afresh next time rather than keep a connection that failed.
            connections.remove(file);
        }
        read
    })
}
