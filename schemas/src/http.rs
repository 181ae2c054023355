//! HTTP bodies of the public API (see API.md). Requests are parsed strictly (unknown
//! fields are refused) into these raw shapes, then into domain values at the edge.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Header carrying the consistency token of a write, and sent back on a read.
pub const CONSISTENCY_TOKEN: &str = "x-consistency-token";
/// How long a read may wait for its token, in milliseconds (default 2000).
pub const CONSISTENCY_WAIT_MS: &str = "x-consistency-wait-ms";
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestockRequest {
    pub quantity: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    pub customer_id: String,
    pub lines: Vec<LineRequest>,
    pub payment_token: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelOrderRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// The body of every `202 Accepted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    pub consistency_token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InventoryView {
    pub sku: String,
    pub on_hand: u64,
    pub reserved: u64,
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderLineView {
    pub sku: String,
    pub quantity: u64,
    pub unit_price_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderView {
    pub order_id: Uuid,
    pub customer_id: String,
    pub status: String,
    pub lines: Vec<OrderLineView>,
    pub total_cents: u64,
    pub payment_status: Option<String>,
    pub shipment_status: Option<String>,
    pub cancel_reason: Option<String>,
    pub placed_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPage {
    pub items: Vec<OrderView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamView {
    pub events: Vec<crate::RecordedEvent>,
    /// Where the next page starts (`from_version`), when more events follow.
    pub next_from_version: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildProgress {
    pub processed: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionView {
    pub name: String,
    /// The last log position the projection has passed.
    pub checkpoint: i64,
    /// Events in the log beyond the checkpoint.
    pub lag: i64,
    /// `running` or `rebuilding`.
    pub status: String,
    pub dead_letters: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildProgress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionList {
    pub projections: Vec<ProjectionView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterView {
    /// `<service>:<number>`, e.g. `order:3`.
    pub id: String,
    /// The projection (or saga) that could not apply the event.
    pub consumer: String,
    /// The log position (embedded) or the Kafka offset (distributed) of the event.
    pub position: i64,
    /// The event's envelope, or the record as read when it was not an event.
    pub event: serde_json::Value,
    /// Why it failed: the decoder's message, or a summary when the database refused
    /// the change (its own message, which names tables and values, is in the
    /// server's log).
    pub error: String,
    pub failed_at: chrono::DateTime<chrono::Utc>,
}

/// A page of dead letters, in order of service then number; `next_cursor` is the
/// `after` of the next page when more follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterList {
    pub dead_letters: Vec<DeadLetterView>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}
