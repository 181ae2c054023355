//! Ports and adapters: the event store and log, each service's database, checkpoints,
//! dead letters, consistency tracking, metrics, configuration and the HTTP plumbing
//! shared by the command and query APIs.
//!
//! - [`event_store`]: per-aggregate streams with expected-version appends, idempotency
//!   records in the same transaction, a global position, group commit, and a wake-up
//!   signal for subscribers. In the embedded deployment its table *is* the log.
//! - [`db`]: opening a service database (SQLite, WAL, `synchronous=FULL`).
//! - [`checkpoints`] and [`dead_letters`]: tables every consumer keeps in its own
//!   database, written in the same transaction as its effects.
//! - [`progress`]: where each projection stands, so queries can wait for a token.
//! - [`http`]: problem+json errors, strict JSON bodies, consistency tokens.
//! - [`auth`]: the operator token and access tokens (JWT), the table of who may call
//!   which route, per-client rate limits, and the middleware that applies them.

pub mod auth;
pub mod checkpoints;
pub mod clock;
pub mod config;
pub mod consume;
pub mod db;
pub mod dead_letters;
pub mod event_store;
pub mod guard;
pub mod http;
pub mod kafka;
pub mod local;
pub mod metrics;
pub mod progress;
pub mod retention;
#[cfg(any(test, feature = "testing"))]
pub mod scratch;
pub mod serve;
pub mod shutdown;

pub use config::Config;
pub use event_store::{AppendOutcome, AppendRequest, EventStore, NewEvent, StoreError};

/// Errors of the adapters, by what happened: a dependency that is down or slow (the
/// caller may retry; HTTP answers 503), data we stored that no longer reads, a value
/// we could not encode (a bug), or a setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A read of an SQLite file on the calling thread ([`local`]).
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("broker: {0}")]
    Broker(#[from] rdkafka::error::KafkaError),
    #[error("cannot create topic {topic}: {code}")]
    Topic {
        topic: String,
        code: rdkafka::error::RDKafkaErrorCode,
    },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot encode: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("a worker task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// One failure answered to several callers (the appends of a failed group commit).
    #[error(transparent)]
    Shared(std::sync::Arc<InfraError>),
}

impl InfraError {
    /// Whether a dependency (database, broker) is down, busy or unreachable: the same
    /// request may succeed later, so it is answered 503 rather than 500.
    pub fn is_unavailable(&self) -> bool {
        match self {
            InfraError::Database(error) => database_unavailable(error),
            InfraError::Sqlite(error) => error
                .sqlite_error()
                .is_some_and(|e| sqlite_unavailable(&e.extended_code.to_string())),
            InfraError::Broker(_) | InfraError::Unavailable(_) | InfraError::Io(_) => true,
            InfraError::Shared(error) => error.is_unavailable(),
            InfraError::Topic { .. }
            | InfraError::Corrupt(_)
            | InfraError::Encode(_)
            | InfraError::Config(_)
            | InfraError::Task(_) => false,
        }
    }

    /// The error's kind as a label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            InfraError::Database(_) | InfraError::Sqlite(_) => "database",
            InfraError::Broker(_) | InfraError::Topic { .. } => "broker",
            InfraError::Unavailable(_) => "unavailable",
            InfraError::Corrupt(_) => "corrupt",
            InfraError::Encode(_) => "encode",
            InfraError::Config(_) => "config",
            InfraError::Task(_) => "task",
            InfraError::Io(_) => "io",
            InfraError::Shared(error) => error.kind(),
        }
    }
}

/// Whether a database error says the database cannot serve now (down, busy, full,
/// read-only) rather than that the statement is wrong: the same statement may work
/// later, so a consumer retries its batch instead of dead-lettering the event.
pub fn database_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    ) || error.as_database_error().is_some_and(|e| {
        let code = e.code().unwrap_or_default();
        if e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            sqlite_unavailable(&code)
        } else {
            server_unavailable(&code)
        }
    })
}

/// Whether `error` says the connection itself is gone (closed by the peer, reset, or
/// ended by the server: PostgreSQL's connection exceptions, class 08, and its
/// administrator or crash shutdown, 57P01 and 57P02), not that a statement failed:
/// the same statement on a new connection may work at once.
pub fn connection_gone(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|code| code.starts_with("08") || code == "57P01" || code == "57P02"),
        _ => false,
    }
}

/// PostgreSQL error codes of a server that cannot serve now: connection exceptions
/// (class 08), a full disk, no memory, too many connections (53100, 53200, 53300),
/// an i/o error (58030), a read-only transaction (25006), shutting down or starting
/// up (57P01-57P03).
fn server_unavailable(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "53100" | "53200" | "53300" | "58030" | "25006" | "57P01" | "57P02" | "57P03"
        )
}

/// SQLite result codes (extended; the primary code is the low byte) of storage that
/// cannot take the write now: busy or locked (5, 6), read-only (8), an i/o error
/// (10), a full disk (13), a file that cannot be opened (14).
pub(crate) fn sqlite_unavailable(code: &str) -> bool {
    code.parse::<i32>()
        .is_ok_and(|code| matches!(code & 0xff, 5 | 6 | 8 | 10 | 13 | 14))
}

pub type Result<T, E = InfraError> = std::result::Result<T, E>;

/// `at` as stored: RFC 3339 in UTC to the microsecond (`2026-01-02T03:04:05.123456Z`:
/// sorts as it reads), as chrono's `to_rfc3339_opts(Micros, true)` writes it. Written digit by digit for
/// the years 0 to 9999 outside a leap second (chrono's writer took a sixth of a
/// rebuild's making of changes); chrono writes the rest.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let (date, time) = (at.date_naive(), at.time());
    let (year, nanos) = (date.year(), time.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    }
    let seconds = time.num_seconds_from_midnight();
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u32| {
        for place in (at..at + width).rev() {
            text[place] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, date.month());
    put(8, 2, date.day());
    put(11, 2, seconds / 3600);
    put(14, 2, seconds / 60 % 60);
    put(17, 2, seconds % 60);
    put(20, 6, nanos / 1_000);
    // Digits and ASCII punctuation only.
    String::from_utf8_lossy(&text).into_owned()
}

pub fn parse_timestamp(raw: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| InfraError::Corrupt(format!("timestamp {raw:?}: {e}")))
}

pub fn parse_uuid(raw: &str) -> Result<uuid::Uuid> {
    uuid::Uuid::parse_str(raw).map_err(|e| InfraError::Corrupt(format!("uuid {raw:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::ApiError;
    use axum::http::StatusCode;

    #[test]
    fn a_dependency_that_is_down_is_a_503_and_a_bug_a_500() {
        let down = InfraError::Database(sqlx::Error::PoolTimedOut);
        assert!(down.is_unavailable());
        let answer = ApiError::from(down);
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.retry_after, Some(1));
        let shared = InfraError::Shared(std::sync::Arc::new(InfraError::Unavailable("x".into())));
        assert!(shared.is_unavailable());
        assert_eq!(shared.kind(), "unavailable");

        let corrupt = InfraError::Corrupt("payload".into());
        assert!(!corrupt.is_unavailable());
        let answer = ApiError::from(corrupt);
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            !answer.detail.contains("payload"),
            "internals leak: {}",
            answer.detail
        );
    }

    #[test]
    fn stored_text_that_does_not_read_is_corrupt_data() {
        assert_eq!(parse_uuid("nope").map_err(|e| e.kind()), Err("corrupt"));
        assert_eq!(
            parse_timestamp("yesterday").map_err(|e| e.kind()),
            Err("corrupt")
        );
        let at = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_timestamp(&timestamp(at)).ok(), Some(at));
    }

    /// The timestamps written digit by digit are chrono's, over the years it writes
    /// that way and the edges of each field; a leap second and a year past 9999 are
    /// chrono's own.
    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let chrono = |at: chrono::DateTime<chrono::Utc>| {
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        };
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let lowest = chrono::NaiveDate::from_ymd_opt(0, 1, 1)
            .and_then(|day| day.and_hms_opt(0, 0, 0))
            .expect("year 0")
            .and_utc()
            .timestamp();
        let highest = chrono::NaiveDate::from_ymd_opt(10_001, 12, 31)
            .and_then(|day| day.and_hms_nano_opt(23, 59, 59, 999_999_999))
            .expect("year 10001")
            .and_utc()
            .timestamp();
        let span = (highest - lowest) as u64;
        let mut all = vec![];
        for _ in 0..20_000 {
            let seconds = lowest + (next() % span) as i64;
            let nanos = (next() % 1_000_000_000) as u32;
            all.extend(chrono::DateTime::from_timestamp(seconds, nanos));
        }
        all.extend(
            [
                (lowest, 0),
                (0, 0),
                (253_402_300_799, 999_999_999),
                (1_000_000_000, 999),
            ]
            .into_iter()
            .filter_map(|(seconds, nanos)| chrono::DateTime::from_timestamp(seconds, nanos)),
        );
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|day| day.and_hms_micro_opt(23, 59, 59, 1_500_000))
            .expect("a leap second")
            .and_utc();
        all.push(leap);
        assert!(all.len() > 20_000);
        for at in all {
            assert_eq!(timestamp(at), chrono(at), "{at:?}");
        }
    }
}
