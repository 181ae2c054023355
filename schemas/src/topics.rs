//! Topic names: one event topic per aggregate type, keyed by aggregate id.

/// The aggregate types, each with its own topic.
pub const AGGREGATE_TYPES: [&str; 4] = ["order", "inventory", "payment", "shipment"];

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
