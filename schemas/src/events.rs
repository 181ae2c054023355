//! The wire form of events: type names, schema versions and upcasters.

use crate::Payload;
use domain::cart::{Cart, CartEvent};
use domain::customer::{Customer, CustomerEvent, Session, SessionEvent};
use domain::inventory::{InventoryEvent, InventoryItem};
use domain::order::{Order, OrderEvent};
use domain::payment::{Payment, PaymentEvent};
use domain::product::{Product, ProductEvent};
use domain::shipment::{Shipment, ShipmentEvent};
use domain::{Aggregate, EventName};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("unknown event type {aggregate_type}/{event_type}")]
    UnknownType {
        aggregate_type: String,
        event_type: String,
    },
    #[error("{event_type} has no schema version {version} (current is {current})")]
    UnknownVersion {
        event_type: String,
        version: u32,
        current: u32,
    },
    #[error("{event_type} v{version} does not fit its schema: {message}")]
    Payload {
        event_type: String,
        version: u32,
        message: String,
    },
    #[error("cannot encode event: {0}")]
    Encode(String),
}

use crate::topics::AggregateType;

/// Every event type with its aggregate and current schema version. A change to an
/// event's wire shape needs a new version here, a schema file, and an upcaster.
pub const EVENT_TYPES: &[(AggregateType, &str, u32)] = &[
    (AggregateType::Order, "OrderPlaced", 2),
    (AggregateType::Order, "OrderConfirmed", 1),
    (AggregateType::Order, "OrderCancelled", 1),
    (AggregateType::Order, "OrderShipped", 1),
    (AggregateType::Order, "OrderDelivered", 1),
    (AggregateType::Inventory, "StockRestocked", 1),
    (AggregateType::Inventory, "StockReserved", 1),
    (AggregateType::Inventory, "StockReservationRejected", 1),
    (AggregateType::Inventory, "StockReleased", 1),
    (AggregateType::Inventory, "StockCommitted", 1),
    (AggregateType::Payment, "PaymentRequested", 1),
    (AggregateType::Payment, "PaymentAuthorized", 1),
    (AggregateType::Payment, "PaymentDeclined", 1),
    (AggregateType::Payment, "PaymentCaptured", 1),
    (AggregateType::Payment, "PaymentVoided", 1),
    (AggregateType::Shipment, "ShipmentCreated", 1),
    (AggregateType::Shipment, "ShipmentDispatched", 1),
    (AggregateType::Shipment, "ShipmentDelivered", 1),
    (AggregateType::Shipment, "ShipmentCancelled", 1),
    (AggregateType::Customer, "CustomerRegistered", 1),
    (AggregateType::Customer, "CustomerRenamed", 1),
    (AggregateType::Session, "SessionStarted", 1),
    (AggregateType::Session, "SessionRefreshed", 1),
    (AggregateType::Session, "SessionEnded", 1),
    (AggregateType::Product, "ProductCreated", 1),
    (AggregateType::Product, "ProductChanged", 1),
    (AggregateType::Cart, "CartLineSet", 1),
    (AggregateType::Cart, "CartLineRemoved", 1),
    (AggregateType::Cart, "CartCheckedOut", 1),
];

/// The current schema version of an event type.
pub fn current_version(event_type: &str) -> Option<u32> {
    EVENT_TYPES
        .iter()
        .find(|(_, name, _)| *name == event_type)
        .map(|(_, _, version)| *version)
}

/// A domain event as (event type, schema version, payload).
pub fn encode<E: Serialize + EventName>(event: &E) -> Result<(String, u32, Value), SchemaError> {
    let event_type = event.name();
    let version = current_version(event_type).ok_or_else(|| SchemaError::UnknownType {
        aggregate_type: String::new(),
        event_type: event_type.to_owned(),
    })?;
    let mut tagged = serde_json::to_value(event).map_err(|e| SchemaError::Encode(e.to_string()))?;
    let payload = tagged
        .get_mut("payload")
        .map(Value::take)
        .unwrap_or_else(|| json!({}));
    Ok((event_type.to_owned(), version, payload))
}

/// Read an event of any version as the current domain event, upcasting on the way.
/// A payload of the current version is read straight from its text; an older one
/// is lifted as a [`Value`] first.
pub fn decode<E: DeserializeOwned>(
    event_type: &str,
    version: u32,
    payload: &Payload,
) -> Result<E, SchemaError> {
    let current = current_version(event_type).ok_or_else(|| SchemaError::UnknownType {
        aggregate_type: String::new(),
        event_type: event_type.to_owned(),
    })?;
    if version == 0 || version > current {
        return Err(SchemaError::UnknownVersion {
            event_type: event_type.to_owned(),
            version,
            current,
        });
    }
    let failed = |e: serde_json::Error| SchemaError::Payload {
        event_type: event_type.to_owned(),
        version,
        message: e.to_string(),
    };
    if version < current {
        let mut lifted = payload.to_value();
        for from in version..current {
            lifted = upcast(event_type, from, lifted)?;
        }
        return tagged::<E>(event_type, &Payload::from_value(&lifted)).map_err(failed);
    }
    tagged::<E>(event_type, payload).map_err(failed)
}

/// The event of `event_type` whose payload is `payload`: the events are tagged
/// enums (`event_type` beside `payload`), read here as that map without copying the
/// payload into one.
fn tagged<E: DeserializeOwned>(
    event_type: &str,
    payload: &Payload,
) -> Result<E, serde_json::Error> {
    let tag = serde_json::value::to_raw_value(event_type)?;
    let map = serde::de::value::MapDeserializer::<_, serde_json::Error>::new(
        [("event_type", &*tag), ("payload", payload.raw())].into_iter(),
    );
    E::deserialize(map)
}

/// Lift a payload from version `from` to `from + 1`.
fn upcast(event_type: &str, from: u32, payload: Value) -> Result<Value, SchemaError> {
    match (event_type, from) {
        // v1 of OrderPlaced had no total; v2 carries it so that no reader sums lines.
        ("OrderPlaced", 1) => upcast_order_placed_v1(payload).ok_or_else(|| SchemaError::Payload {
            event_type: event_type.to_owned(),
            version: from,
            message: "lines must be a list of {quantity, unit_price_cents}".into(),
        }),
        _ => Err(SchemaError::UnknownVersion {
            event_type: event_type.to_owned(),
            version: from,
            current: current_version(event_type).unwrap_or(0),
        }),
    }
}

fn upcast_order_placed_v1(mut payload: Value) -> Option<Value> {
    let mut total: u64 = 0;
    for line in payload.get("lines")?.as_array()? {
        let quantity = line.get("quantity")?.as_u64()?;
        let price = line.get("unit_price_cents")?.as_u64()?;
        total = total.checked_add(quantity.checked_mul(price)?)?;
    }
    payload
        .as_object_mut()?
        .insert("total_cents".into(), json!(total));
    Some(payload)
}

/// An event of any aggregate, decoded from its envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyEvent {
    Order(OrderEvent),
    Inventory(InventoryEvent),
    Payment(PaymentEvent),
    Shipment(ShipmentEvent),
    Customer(CustomerEvent),
    Session(SessionEvent),
    Product(ProductEvent),
    Cart(CartEvent),
}

impl AnyEvent {
    pub fn from_envelope(envelope: &crate::Envelope) -> Result<AnyEvent, SchemaError> {
        let t = envelope.event_type.as_str();
        let v = envelope.schema_version;
        let p = &envelope.payload;
        match envelope.aggregate_type.as_str() {
            Order::TYPE => decode(t, v, p).map(AnyEvent::Order),
            InventoryItem::TYPE => decode(t, v, p).map(AnyEvent::Inventory),
            Payment::TYPE => decode(t, v, p).map(AnyEvent::Payment),
            Shipment::TYPE => decode(t, v, p).map(AnyEvent::Shipment),
            Customer::TYPE => decode(t, v, p).map(AnyEvent::Customer),
            Session::TYPE => decode(t, v, p).map(AnyEvent::Session),
            Product::TYPE => decode(t, v, p).map(AnyEvent::Product),
            Cart::TYPE => decode(t, v, p).map(AnyEvent::Cart),
            other => Err(SchemaError::UnknownType {
                aggregate_type: other.to_owned(),
                event_type: t.to_owned(),
            }),
        }
    }

    /// The event's wire form again: (event type, schema version, payload).
    pub fn encode(&self) -> Result<(String, u32, Value), SchemaError> {
        match self {
            AnyEvent::Order(e) => encode(e),
            AnyEvent::Inventory(e) => encode(e),
            AnyEvent::Payment(e) => encode(e),
            AnyEvent::Shipment(e) => encode(e),
            AnyEvent::Customer(e) => encode(e),
            AnyEvent::Session(e) => encode(e),
            AnyEvent::Product(e) => encode(e),
            AnyEvent::Cart(e) => encode(e),
        }
    }
}

#[cfg(test)]
mod tests;
