//! HTTP bodies of the public API (see API.md). Requests are parsed strictly (unknown
//! fields are refused) into these raw shapes, then into domain values at the edge.

use serde::{Deserialize, Serialize};
use utoipa::{IntoResponses, ToSchema};
use uuid::Uuid;

/// Header carrying the consistency token of a write, and sent back on a read.
pub const CONSISTENCY_TOKEN: &str = "x-consistency-token";
/// How long a read may wait for its token, in milliseconds (default 2000).
pub const CONSISTENCY_WAIT_MS: &str = "x-consistency-wait-ms";
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestockRequest {
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub quantity: i64,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub sku: String,
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub quantity: i64,
    #[schema(minimum = 0)]
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderRequest {
    /// Whose order it is. With auth on, a customer's own orders take it from the
    /// token (naming someone else is 403); an operator names the customer.
    #[serde(default)]
    pub customer_id: Option<String>,
    #[schema(min_items = 1, max_items = 100)]
    pub lines: Vec<LineRequest>,
    /// The payment method's token (a secret: never shown by a read).
    pub payment_token: String,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelOrderRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// The body of every `202 Accepted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sku: Option<String>,
    pub consistency_token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InventoryView {
    pub sku: String,
    pub on_hand: u64,
    pub reserved: u64,
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrderLineView {
    pub sku: String,
    pub quantity: u64,
    pub unit_price_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrderPage {
    pub items: Vec<OrderView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StreamView {
    pub events: Vec<crate::RecordedEvent>,
    /// Where the next page starts (`from_version`), when more events follow.
    pub next_from_version: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RebuildProgress {
    pub processed: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProjectionList {
    pub projections: Vec<ProjectionView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterView {
    /// `<service>:<number>`, e.g. `order:3`.
    pub id: String,
    /// The projection (or saga) that could not apply the event.
    pub consumer: String,
    /// The log position (embedded) or the Kafka offset (distributed) of the event.
    pub position: i64,
    /// The event's envelope, or the record as read when it was not an event.
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
    /// Why it failed: the decoder's message, or a summary when the database refused
    /// the change (its own message, which names tables and values, is in the
    /// server's log).
    pub error: String,
    pub failed_at: chrono::DateTime<chrono::Utc>,
}

/// A page of dead letters, in order of service then number; `next_cursor` is the
/// `after` of the next page when more follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterList {
    pub dead_letters: Vec<DeadLetterView>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}

/// A payment's progress (`GET /v1/payments/{order_id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PaymentView {
    pub order_id: Uuid,
    /// `requested`, `authorized`, `declined`, `captured` or `voided`.
    pub status: String,
    pub amount_cents: i64,
    pub authorized_cents: i64,
    pub captured_cents: i64,
    pub voided_cents: i64,
    pub decline_reason: Option<String>,
}

/// A shipment's progress (`GET /v1/shipments/{order_id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ShipmentView {
    pub order_id: Uuid,
    /// `created`, `dispatched`, `delivered` or `cancelled`.
    pub status: String,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// `GET /health`: `ok`, or `starting` (503) while consumers are not yet reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// `POST /v1/projections/{name}/rebuild`: the rebuild has started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RebuildStarted {
    pub name: String,
    /// `rebuilding`.
    pub status: String,
}

const PROBLEM: &str = "application/problem+json";

/// The refusals of a command (problem+json; nothing is written).
#[derive(IntoResponses)]
pub enum CommandRefusals {
    /// A malformed body, an unknown field, a path or header that does not decode.
    #[response(status = 400, content_type = PROBLEM)]
    Malformed(Problem),
    /// No such aggregate (or resource).
    #[response(status = 404, content_type = PROBLEM)]
    NotFound(Problem),
    /// The body stopped arriving, or the request took longer than the server allows.
    #[response(status = 408, content_type = PROBLEM)]
    Timeout(Problem),
    /// Not allowed in the aggregate's current state.
    #[response(status = 409, content_type = PROBLEM)]
    Conflict(Problem),
    /// The body is over 64 KiB.
    #[response(status = 413, content_type = PROBLEM)]
    TooLarge(Problem),
    /// A value out of range, or an `Idempotency-Key` used before with another body.
    #[response(status = 422, content_type = PROBLEM)]
    Invalid(Problem),
    /// The server is at its limits, or a dependency is away: retry after `Retry-After`.
    #[response(
        status = 503,
        content_type = PROBLEM,
        headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))
    )]
    Unavailable(Problem),
}

/// The refusals of a read (problem+json).
#[derive(IntoResponses)]
pub enum ReadRefusals {
    /// A malformed query string or header, or a path that does not decode.
    #[response(status = 400, content_type = PROBLEM)]
    Malformed(Problem),
    /// Nothing there.
    #[response(status = 404, content_type = PROBLEM)]
    NotFound(Problem),
    /// The request took longer than the server allows.
    #[response(status = 408, content_type = PROBLEM)]
    Timeout(Problem),
    /// A parameter out of range.
    #[response(status = 422, content_type = PROBLEM)]
    Invalid(Problem),
    /// Not yet consistent with the token sent, or the server is at its limits: retry
    /// after `Retry-After`.
    #[response(
        status = 503,
        content_type = PROBLEM,
        headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))
    )]
    Unavailable(Problem),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub email: String,
    /// At least 12 characters.
    #[schema(min_length = 12, max_length = 1024)]
    pub password: String,
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    pub customer_id: String,
    pub consistency_token: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// A login's tokens: a short-lived access token (a signed JWT) and a refresh token
/// that works once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds the access token is good for.
    pub expires_in: u64,
    pub refresh_token: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
}

/// A customer's profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CustomerView {
    pub customer_id: String,
    pub email: String,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProductRequest {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub sku: String,
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[schema(max_length = 2000)]
    pub description: String,
    #[schema(minimum = 0)]
    pub price_cents: i64,
}

/// What to change of a product; what is left out stays.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeProductRequest {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub price_cents: Option<i64>,
    #[serde(default)]
    pub active: Option<bool>,
}

/// A product as the catalog shows it, with what of it is in stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProductView {
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price_cents: u64,
    pub active: bool,
    /// Units on hand and not reserved.
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProductPage {
    pub items: Vec<ProductView>,
    /// The `cursor` of the next page; null on the last.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CartLineRequest {
    /// 0 takes the product out of the cart.
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub quantity: i64,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    /// The payment method's token (a secret: never shown by a read).
    pub payment_token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CartLineView {
    pub sku: String,
    pub quantity: u64,
    /// The catalog's price now.
    pub unit_price_cents: u64,
}

/// A customer's cart, priced as the catalog prices its products now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CartView {
    pub lines: Vec<CartLineView>,
    pub total_cents: u64,
}

/// A message sent to a customer about one of its orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NotificationView {
    pub notification_id: Uuid,
    pub order_id: String,
    /// `order_confirmed`, `order_cancelled`, `order_shipped` or `order_delivered`.
    pub kind: String,
    /// `file`, `log` or `smtp`.
    pub channel: String,
    pub sent_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NotificationPage {
    pub items: Vec<NotificationView>,
    pub next_cursor: Option<String>,
}
