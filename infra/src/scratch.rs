//! A throwaway log and service database in a temporary folder, for tests of the
//! crates built on these adapters (feature `testing`).

use crate::db::Db;
use crate::event_store::{AppendOutcome, AppendRequest, NewEvent};
use crate::{EventStore, InfraError};
use serde_json::Value;
use uuid::Uuid;

/// An event store (`events.db`) and a service database (`service.db`) on SQLite
/// files that are deleted with it.
pub struct Scratch {
    pub store: EventStore,
    pub db: Db,
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub async fn new() -> Result<Scratch, InfraError> {
        let dir = tempfile::tempdir()?;
        let store = EventStore::open(&dir.path().join("events.db")).await?;
        let db = Db::open_sqlite(&dir.path().join("service.db"), 2).await?;
        Ok(Scratch { store, db, dir })
    }

    /// Append events given as (event type, schema version, payload) to one stream,
    /// after the events it holds; the position of the last.
    pub async fn append(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        events: Vec<(String, u32, Value)>,
    ) -> Result<i64, InfraError> {
        let version = self
            .store
            .load_stream(aggregate_type, aggregate_id)
            .await?
            .len() as i64;
        let events = events
            .into_iter()
            .map(|(event_type, schema_version, payload)| {
                let event_id = Uuid::now_v7();
                NewEvent {
                    event_id,
                    event_type,
                    schema_version,
                    payload,
                    occurred_at: chrono::Utc::now(),
                    correlation_id: event_id,
                    causation_id: event_id,
                }
            })
            .collect();
        let outcome = self
            .store
            .append(AppendRequest {
                aggregate_type: aggregate_type.into(),
                aggregate_id: aggregate_id.into(),
                expected_version: version,
                expected_last_event: None,
                events,
                idempotency: None,
                snapshot: None,
            })
            .await
            .map_err(|e| InfraError::Unavailable(e.to_string()))?;
        match outcome {
            AppendOutcome::Appended { position, .. } => Ok(position),
            AppendOutcome::Duplicate { position, .. } => Ok(position),
        }
    }
}
