//! A shipment: one per order (its id is the order id), created once the payment is
//! authorised, then dispatched and delivered, or cancelled before it leaves.

use crate::{Aggregate, DomainError, EventName};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipmentCommand {
    Create,
    Dispatch,
    Deliver,
    /// Harmless when already cancelled or never created.
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum ShipmentEvent {
    ShipmentCreated {},
    ShipmentDispatched {},
    ShipmentDelivered {},
    ShipmentCancelled {},
}

impl EventName for ShipmentEvent {
    fn name(&self) -> &'static str {
        match self {
            ShipmentEvent::ShipmentCreated {} => "ShipmentCreated",
            ShipmentEvent::ShipmentDispatched {} => "ShipmentDispatched",
            ShipmentEvent::ShipmentDelivered {} => "ShipmentDelivered",
            ShipmentEvent::ShipmentCancelled {} => "ShipmentCancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShipmentStatus {
    Created,
    Dispatched,
    Delivered,
    Cancelled,
}

impl ShipmentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ShipmentStatus::Created => "created",
            ShipmentStatus::Dispatched => "dispatched",
            ShipmentStatus::Delivered => "delivered",
            ShipmentStatus::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    pub status: Option<ShipmentStatus>,
}

impl Aggregate for Shipment {
    const TYPE: &'static str = "shipment";
    type Command = ShipmentCommand;
    type Event = ShipmentEvent;

    fn decide(&self, command: &ShipmentCommand) -> Result<Vec<ShipmentEvent>, DomainError> {
        use ShipmentStatus::*;
        match (command, self.status) {
            (ShipmentCommand::Create, None) => Ok(vec![ShipmentEvent::ShipmentCreated {}]),
            (ShipmentCommand::Create, Some(_)) => Ok(vec![]),
            (ShipmentCommand::Dispatch, Some(Created)) => {
                Ok(vec![ShipmentEvent::ShipmentDispatched {}])
            }
            (ShipmentCommand::Dispatch, Some(Dispatched | Delivered)) => Ok(vec![]),
            (ShipmentCommand::Deliver, Some(Dispatched)) => {
                Ok(vec![ShipmentEvent::ShipmentDelivered {}])
            }
            (ShipmentCommand::Deliver, Some(Delivered)) => Ok(vec![]),
            (ShipmentCommand::Cancel, Some(Created)) => {
                Ok(vec![ShipmentEvent::ShipmentCancelled {}])
            }
            (ShipmentCommand::Cancel, None | Some(Cancelled)) => Ok(vec![]),
            (_, None) => Err(DomainError::NotFound("shipment")),
            (command, Some(status)) => Err(DomainError::conflict(format!(
                "a shipment that is {} cannot take {command:?}",
                status.as_str()
            ))),
        }
    }

    fn apply(&mut self, event: &ShipmentEvent) {
        self.status = Some(match event {
            ShipmentEvent::ShipmentCreated {} => ShipmentStatus::Created,
            ShipmentEvent::ShipmentDispatched {} => ShipmentStatus::Dispatched,
            ShipmentEvent::ShipmentDelivered {} => ShipmentStatus::Delivered,
            ShipmentEvent::ShipmentCancelled {} => ShipmentStatus::Cancelled,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;

    #[test]
    fn a_shipment_is_created_dispatched_and_delivered() {
        assert_eq!(
            given::<Shipment>(vec![]).when(ShipmentCommand::Create),
            Ok(vec![ShipmentEvent::ShipmentCreated {}])
        );
        assert_eq!(
            given::<Shipment>(vec![ShipmentEvent::ShipmentCreated {}])
                .when(ShipmentCommand::Dispatch),
            Ok(vec![ShipmentEvent::ShipmentDispatched {}])
        );
        assert_eq!(
            given::<Shipment>(vec![
                ShipmentEvent::ShipmentCreated {},
                ShipmentEvent::ShipmentDispatched {}
            ])
            .when(ShipmentCommand::Deliver),
            Ok(vec![ShipmentEvent::ShipmentDelivered {}])
        );
    }

    #[test]
    fn a_dispatched_shipment_cannot_be_cancelled() {
        assert!(matches!(
            given::<Shipment>(vec![
                ShipmentEvent::ShipmentCreated {},
                ShipmentEvent::ShipmentDispatched {}
            ])
            .when(ShipmentCommand::Cancel),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn a_cancelled_shipment_cannot_be_dispatched() {
        assert!(matches!(
            given::<Shipment>(vec![
                ShipmentEvent::ShipmentCreated {},
                ShipmentEvent::ShipmentCancelled {}
            ])
            .when(ShipmentCommand::Dispatch),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn an_undispatched_shipment_cannot_be_delivered() {
        assert!(matches!(
            given::<Shipment>(vec![ShipmentEvent::ShipmentCreated {}])
                .when(ShipmentCommand::Deliver),
            Err(DomainError::Conflict(_))
        ));
        assert_eq!(
            given::<Shipment>(vec![]).when(ShipmentCommand::Deliver),
            Err(DomainError::NotFound("shipment"))
        );
    }

    #[test]
    fn cancelling_is_harmless_when_nothing_was_created() {
        assert_eq!(
            given::<Shipment>(vec![]).when(ShipmentCommand::Cancel),
            Ok(vec![])
        );
    }
}
