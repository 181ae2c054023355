//! The projections. Each owns a few tables in its service's database; the same SQL
//! builds the live tables and their shadow copies (a suffix on every table name).

use chrono::{DateTime, Utc};
use domain::inventory::InventoryEvent;
use domain::order::OrderEvent;
use domain::payment::PaymentEvent;
use domain::shipment::ShipmentEvent;
use infra::timestamp;
use schemas::{AnyEvent, Envelope};
use sqlx::AnyConnection;

pub use schemas::topics::ProjectionName as Projection;

/// Every projection.
pub const ALL: &[Projection] = Projection::ALL;

/// A projection's tables and how an event changes them.
pub trait ReadModel {
    /// Base names of its tables; the version guard is always the last.
    fn tables(self) -> Vec<String>;
    fn create_tables(self, suffix: &str) -> String;
    /// Indexes of the live tables (built after a swap, not while filling a shadow).
    fn create_indexes(self) -> &'static str;
    /// Apply one event to the tables with `suffix`, in one statement (so an event
    /// that fails has changed nothing, and the caller dead-letters it).
    fn apply(
        self,
        conn: &mut AnyConnection,
        suffix: &str,
        envelope: &Envelope,
        event: &AnyEvent,
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send;
}

impl ReadModel for Projection {
    fn tables(self) -> Vec<String> {
        let main: &[&str] = match self {
            Projection::Orders => &["orders", "order_progress"],
            Projection::Inventory => &["inventory_levels"],
            Projection::Payments => &["payments"],
            Projection::Shipments => &["shipments"],
        };
        let mut tables: Vec<String> = main.iter().map(|t| (*t).to_owned()).collect();
        tables.push(self.applied_table(""));
        tables
    }

    fn create_tables(self, suffix: &str) -> String {
        let guard = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, version BIGINT NOT NULL,
                PRIMARY KEY (aggregate_type, aggregate_id));",
            self.applied_table(suffix)
        );
        let main = match self {
            // The order's own stream and its payment's and shipment's go to separate
            // tables, joined when read: streams of different aggregates may be read in
            // any order (from Kafka, or in a replay), and each table depends on one.
            Projection::Orders => format!(
                "CREATE TABLE IF NOT EXISTS orders{suffix} (
                    order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, status TEXT NOT NULL,
                    lines TEXT NOT NULL, total_cents BIGINT NOT NULL, cancel_reason TEXT,
                    placed_at TEXT NOT NULL, updated_at TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS order_progress{suffix} (
                    order_id TEXT PRIMARY KEY, payment_status TEXT, shipment_status TEXT,
                    updated_at TEXT NOT NULL);"
            ),
            Projection::Inventory => format!(
                "CREATE TABLE IF NOT EXISTS inventory_levels{suffix} (
                    sku TEXT PRIMARY KEY, on_hand BIGINT NOT NULL, reserved BIGINT NOT NULL,
                    updated_at TEXT NOT NULL);"
            ),
            Projection::Payments => format!(
                "CREATE TABLE IF NOT EXISTS payments{suffix} (
                    order_id TEXT PRIMARY KEY, status TEXT NOT NULL, amount_cents BIGINT NOT NULL,
                    authorized_cents BIGINT NOT NULL DEFAULT 0, captured_cents BIGINT NOT NULL DEFAULT 0,
                    voided_cents BIGINT NOT NULL DEFAULT 0, decline_reason TEXT, updated_at TEXT NOT NULL);"
            ),
            Projection::Shipments => format!(
                "CREATE TABLE IF NOT EXISTS shipments{suffix} (
                    order_id TEXT PRIMARY KEY, status TEXT NOT NULL, updated_at TEXT NOT NULL);"
            ),
        };
        format!("{main}\n{guard}")
    }

    fn create_indexes(self) -> &'static str {
        match self {
            Projection::Orders => {
                "CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id, order_id);
                 CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status, order_id);"
            }
            _ => "",
        }
    }

    async fn apply(
        self,
        conn: &mut AnyConnection,
        suffix: &str,
        envelope: &Envelope,
        event: &AnyEvent,
    ) -> Result<(), sqlx::Error> {
        let id = envelope.aggregate_id.as_str();
        let at = timestamp(envelope.occurred_at);
        match (self, event) {
            (Projection::Orders, AnyEvent::Order(event)) => apply_order(conn, suffix, id, &at, envelope.occurred_at, event).await,
            (Projection::Orders, AnyEvent::Payment(event)) => {
                set_progress(conn, suffix, id, &at, "payment_status", payment_status(event)).await
            }
            (Projection::Orders, AnyEvent::Shipment(event)) => {
                set_progress(conn, suffix, id, &at, "shipment_status", shipment_status(event)).await
            }
            (Projection::Inventory, AnyEvent::Inventory(event)) => apply_inventory(conn, suffix, id, &at, event).await,
            (Projection::Payments, AnyEvent::Payment(event)) => apply_payment(conn, suffix, id, &at, event).await,
            (Projection::Shipments, AnyEvent::Shipment(event)) => {
                sqlx::query(&format!(
                    "INSERT INTO shipments{suffix} (order_id, status, updated_at) VALUES ($1, $2, $3)
                     ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at"
                ))
                .bind(id)
                .bind(shipment_status(event))
                .bind(&at)
                .execute(conn)
                .await
                .map(|_| ())
            }
            _ => Ok(()),
        }
    }
}

fn payment_status(event: &PaymentEvent) -> &'static str {
    match event {
        PaymentEvent::PaymentRequested { .. } => "requested",
        PaymentEvent::PaymentAuthorized { .. } => "authorized",
        PaymentEvent::PaymentDeclined { .. } => "declined",
        PaymentEvent::PaymentCaptured { .. } => "captured",
        PaymentEvent::PaymentVoided { .. } => "voided",
    }
}

fn shipment_status(event: &ShipmentEvent) -> &'static str {
    match event {
        ShipmentEvent::ShipmentCreated {} => "created",
        ShipmentEvent::ShipmentDispatched {} => "dispatched",
        ShipmentEvent::ShipmentDelivered {} => "delivered",
        ShipmentEvent::ShipmentCancelled {} => "cancelled",
    }
}

/// The payment or shipment status of an order, kept apart from the order's row.
async fn set_progress(
    conn: &mut AnyConnection,
    suffix: &str,
    id: &str,
    at: &str,
    field: &str,
    value: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO order_progress{suffix} (order_id, {field}, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (order_id) DO UPDATE SET {field} = excluded.{field},
            updated_at = CASE WHEN excluded.updated_at > order_progress{suffix}.updated_at
                              THEN excluded.updated_at ELSE order_progress{suffix}.updated_at END"
    ))
    .bind(id)
    .bind(value)
    .bind(at)
    .execute(conn)
    .await
    .map(|_| ())
}

async fn apply_order(
    conn: &mut AnyConnection,
    suffix: &str,
    id: &str,
    at: &str,
    occurred_at: DateTime<Utc>,
    event: &OrderEvent,
) -> Result<(), sqlx::Error> {
    let status = match event {
        OrderEvent::OrderPlaced {
            customer_id,
            lines,
            total_cents,
            ..
        } => {
            let lines =
                serde_json::to_string(lines).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            return sqlx::query(&format!(
                "INSERT INTO orders{suffix} (order_id, customer_id, status, lines, total_cents, placed_at, updated_at)
                 VALUES ($1, $2, 'pending', $3, $4, $5, $5)"
            ))
            .bind(id)
            .bind(customer_id.as_str())
            .bind(lines)
            .bind(total_cents.cents() as i64)
            .bind(timestamp(occurred_at))
            .execute(conn)
            .await
            .map(|_| ());
        }
        OrderEvent::OrderConfirmed {} => "confirmed",
        OrderEvent::OrderShipped {} => "shipped",
        OrderEvent::OrderDelivered {} => "delivered",
        OrderEvent::OrderCancelled { reason, .. } => {
            return sqlx::query(&format!(
                "UPDATE orders{suffix} SET status = 'cancelled', cancel_reason = $2, updated_at = $3 WHERE order_id = $1"
            ))
            .bind(id)
            .bind(reason.as_str())
            .bind(at)
            .execute(conn)
            .await
            .map(|_| ());
        }
    };
    sqlx::query(&format!(
        "UPDATE orders{suffix} SET status = $2, updated_at = $3 WHERE order_id = $1"
    ))
    .bind(id)
    .bind(status)
    .bind(at)
    .execute(conn)
    .await
    .map(|_| ())
}

async fn apply_inventory(
    conn: &mut AnyConnection,
    suffix: &str,
    sku: &str,
    at: &str,
    event: &InventoryEvent,
) -> Result<(), sqlx::Error> {
    let (on_hand, reserved) = match event {
        InventoryEvent::StockRestocked {
            on_hand, reserved, ..
        }
        | InventoryEvent::StockReserved {
            on_hand, reserved, ..
        }
        | InventoryEvent::StockReleased {
            on_hand, reserved, ..
        }
        | InventoryEvent::StockCommitted {
            on_hand, reserved, ..
        } => (*on_hand, *reserved),
        InventoryEvent::StockReservationRejected { .. } => return Ok(()),
    };
    sqlx::query(&format!(
        "INSERT INTO inventory_levels{suffix} (sku, on_hand, reserved, updated_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand, reserved = excluded.reserved, updated_at = excluded.updated_at"
    ))
    .bind(sku)
    .bind(on_hand as i64)
    .bind(reserved as i64)
    .bind(at)
    .execute(conn)
    .await
    .map(|_| ())
}

async fn apply_payment(
    conn: &mut AnyConnection,
    suffix: &str,
    id: &str,
    at: &str,
    event: &PaymentEvent,
) -> Result<(), sqlx::Error> {
    let status = payment_status(event);
    let sql = match event {
        PaymentEvent::PaymentRequested { amount_cents, .. } => {
            return sqlx::query(&format!(
                "INSERT INTO payments{suffix} (order_id, status, amount_cents, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (order_id) DO NOTHING"
            ))
            .bind(id)
            .bind(status)
            .bind(amount_cents.cents() as i64)
            .bind(at)
            .execute(conn)
            .await
            .map(|_| ());
        }
        PaymentEvent::PaymentAuthorized { amount_cents } => {
            ("authorized_cents", amount_cents.cents())
        }
        PaymentEvent::PaymentCaptured { amount_cents } => ("captured_cents", amount_cents.cents()),
        PaymentEvent::PaymentVoided { amount_cents } => ("voided_cents", amount_cents.cents()),
        PaymentEvent::PaymentDeclined { reason } => {
            return sqlx::query(&format!(
                "UPDATE payments{suffix} SET status = $2, decline_reason = $3, updated_at = $4 WHERE order_id = $1"
            ))
            .bind(id)
            .bind(status)
            .bind(reason)
            .bind(at)
            .execute(conn)
            .await
            .map(|_| ());
        }
    };
    let (column, cents) = sql;
    sqlx::query(&format!(
        "UPDATE payments{suffix} SET status = $2, {column} = $3, updated_at = $4 WHERE order_id = $1"
    ))
    .bind(id)
    .bind(status)
    .bind(cents as i64)
    .bind(at)
    .execute(conn)
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests;
