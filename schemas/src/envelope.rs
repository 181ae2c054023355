//! The envelope every event travels in.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Envelope {
    /// UUIDv7: unique, and ordered by creation time.
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Sequence within the aggregate, from 1.
    pub version: i64,
    pub event_type: String,
    pub schema_version: u32,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

/// An envelope as read back from the log, with its place in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecordedEvent {
    /// The log position: ascending over the whole log.
    pub position: i64,
    #[serde(flatten)]
    pub envelope: Envelope,
}
