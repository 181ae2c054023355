//! Topic names: one event topic per aggregate type, keyed by aggregate id.

/// The aggregate types, each with its own topic.
pub const AGGREGATE_TYPES: [&str; 4] = ["order", "inventory", "payment", "shipment"];

/// Each projection with the aggregate types (topics) it reads.
pub const PROJECTION_TOPICS: [(&str, &[&str]); 4] = [
    ("orders", &["order", "payment", "shipment"]),
    ("inventory", &["inventory"]),
    ("payments", &["payment"]),
    ("shipments", &["shipment"]),
];

/// The aggregate types a projection reads (none for an unknown name).
pub fn projection_topics(projection: &str) -> &'static [&'static str] {
    PROJECTION_TOPICS
        .iter()
        .find(|(name, _)| *name == projection)
        .map_or(&[], |(_, topics)| *topics)
}

/// The table where a projection keeps the last version it applied of each stream.
pub fn applied_table(projection: &str, suffix: &str) -> String {
    format!("{projection}_applied{suffix}")
}

/// The service that owns an aggregate type (and serves its commands and stream).
pub fn owning_service(aggregate_type: &str) -> Option<&'static str> {
    match aggregate_type {
        "order" => Some("order"),
        "inventory" => Some("inventory"),
        "payment" => Some("payment"),
        "shipment" => Some("shipping"),
        _ => None,
    }
}

/// `orderline.<aggregate>.events`
pub fn events_topic(aggregate_type: &str) -> String {
    format!("orderline.{aggregate_type}.events")
}

/// `orderline.<service>.commands`: commands a saga sends to the owning service.
pub fn commands_topic(service: &str) -> String {
    format!("orderline.{service}.commands")
}

#[cfg(test)]
mod tests {
    #[test]
    fn topics_are_named_by_aggregate_type() {
        assert_eq!(super::events_topic("order"), "orderline.order.events");
        assert_eq!(
            super::commands_topic("payment"),
            "orderline.payment.commands"
        );
    }
}
