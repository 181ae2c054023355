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

pub mod checkpoints;
pub mod config;
pub mod db;
pub mod dead_letters;
pub mod event_store;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod progress;
pub mod shutdown;

pub use config::Config;
pub use event_store::{AppendOutcome, AppendRequest, EventStore, NewEvent, StoreError};

/// Errors of the storage adapters.
#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = InfraError> = std::result::Result<T, E>;

/// Now, as RFC 3339 text with microseconds: sorts as it reads.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub fn parse_timestamp(raw: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| InfraError::Corrupt(format!("timestamp {raw:?}: {e}")))
}

pub fn parse_uuid(raw: &str) -> Result<uuid::Uuid> {
    uuid::Uuid::parse_str(raw).map_err(|e| InfraError::Corrupt(format!("uuid {raw:?}: {e}")))
}
