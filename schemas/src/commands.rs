//! The commands a saga sends to the services that own the target aggregates, in the
//! form they are stored in the saga's outbox (and travel on a command topic): the
//! saga's [`Command`] with the order it is for.

use crate::topics::AggregateType;
use domain::saga::{Command, Participant};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A saga's command as it travels on a command topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandMessage {
    /// Deterministic (UUIDv5 of what caused it): the participant's dedupe key.
    pub command_id: Uuid,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub command: SagaCommand,
}

/// One saga command for one order: `{"command": "reserve_stock", "order_id": ...,
/// "sku": ..., "quantity": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaCommand {
    pub order_id: Uuid,
    #[serde(flatten)]
    pub command: Command,
}

impl SagaCommand {
    pub fn new(order_id: Uuid, command: Command) -> SagaCommand {
        SagaCommand { order_id, command }
    }

    /// The participant's command.
    pub fn participant(&self) -> Participant {
        self.command.for_participant(self.order_id)
    }

    /// The (aggregate type, aggregate id) the command is for.
    pub fn target(&self) -> (AggregateType, String) {
        match self.participant() {
            Participant::Inventory(sku, _) => (AggregateType::Inventory, sku.to_string()),
            Participant::Payment(_) => (AggregateType::Payment, self.order_id.to_string()),
            Participant::Shipment(_) => (AggregateType::Shipment, self.order_id.to_string()),
            Participant::Order(_) => (AggregateType::Order, self.order_id.to_string()),
        }
    }

    /// The commands that must be carried out in the order they were emitted: one
    /// order's commands to one aggregate. Different chains may run side by side.
    pub fn chain(&self) -> (AggregateType, String, Uuid) {
        let (aggregate_type, target) = self.target();
        (aggregate_type, target, self.order_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{CancelReason, Sku};
    use serde_json::json;

    fn order() -> Uuid {
        Uuid::from_u128(7)
    }

    #[test]
    fn the_wire_form_names_the_command_beside_the_order() {
        let sku = Sku::parse("S-1").expect("sku");
        let command = SagaCommand::new(order(), Command::ReserveStock { sku, quantity: 2 });
        assert_eq!(
            serde_json::to_value(&command).expect("encodes"),
            json!({"command": "reserve_stock", "order_id": order(), "sku": "S-1", "quantity": 2})
        );
        let cancel =
            json!({"command": "cancel_order", "order_id": order(), "reason": "payment_timeout"});
        assert_eq!(
            serde_json::from_value::<SagaCommand>(cancel).expect("decodes"),
            SagaCommand::new(
                order(),
                Command::CancelOrder {
                    reason: CancelReason::PaymentTimeout
                }
            )
        );
        let confirm = json!({"command": "confirm_order", "order_id": order()});
        let confirm: SagaCommand = serde_json::from_value(confirm).expect("decodes");
        assert_eq!(
            confirm.target(),
            (AggregateType::Order, order().to_string())
        );
    }

    #[test]
    fn a_command_no_saga_sends_does_not_decode() {
        let authorize = json!({"command": "authorize_payment", "order_id": order()});
        assert!(serde_json::from_value::<SagaCommand>(authorize).is_err());
    }
}
