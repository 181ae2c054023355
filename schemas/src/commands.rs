//! The commands a saga sends to the services that own the target aggregates, in the
//! form they are stored in the saga's outbox (and travel on a command topic).

use domain::inventory::InventoryCommand;
use domain::order::OrderCommand;
use domain::payment::PaymentCommand;
use domain::saga::Command;
use domain::shipment::ShipmentCommand;
use domain::{CancelReason, Money, PaymentToken, Sku};
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum SagaCommand {
    ReserveStock {
        sku: Sku,
        order_id: Uuid,
        quantity: u64,
    },
    ReleaseStock {
        sku: Sku,
        order_id: Uuid,
    },
    CommitStock {
        sku: Sku,
        order_id: Uuid,
    },
    RequestPayment {
        order_id: Uuid,
        amount_cents: Money,
        payment_token: PaymentToken,
    },
    AuthorizePayment {
        order_id: Uuid,
    },
    DeclinePayment {
        order_id: Uuid,
        reason: String,
    },
    CapturePayment {
        order_id: Uuid,
    },
    VoidPayment {
        order_id: Uuid,
    },
    CreateShipment {
        order_id: Uuid,
    },
    DispatchShipment {
        order_id: Uuid,
    },
    DeliverShipment {
        order_id: Uuid,
    },
    CancelShipment {
        order_id: Uuid,
    },
    ConfirmOrder {
        order_id: Uuid,
    },
    CancelOrder {
        order_id: Uuid,
        reason: CancelReason,
    },
}

impl SagaCommand {
    /// The wire form of a saga's command for the order `order_id`; `None` for the
    /// commands a saga never sends (restock, place, ship, deliver).
    pub fn from_domain(order_id: Uuid, command: &Command) -> Option<SagaCommand> {
        Some(match command {
            Command::Inventory { sku, command } => {
                let sku = sku.clone();
                match command {
                    InventoryCommand::Reserve { order_id, quantity } => SagaCommand::ReserveStock {
                        sku,
                        order_id: *order_id,
                        quantity: *quantity,
                    },
                    InventoryCommand::Release { order_id } => SagaCommand::ReleaseStock {
                        sku,
                        order_id: *order_id,
                    },
                    InventoryCommand::Commit { order_id } => SagaCommand::CommitStock {
                        sku,
                        order_id: *order_id,
                    },
                    InventoryCommand::Restock { .. } => return None,
                }
            }
            Command::Payment(command) => match command {
                PaymentCommand::Request { amount, token } => SagaCommand::RequestPayment {
                    order_id,
                    amount_cents: *amount,
                    payment_token: token.clone(),
                },
                PaymentCommand::Authorize => SagaCommand::AuthorizePayment { order_id },
                PaymentCommand::Decline { reason } => SagaCommand::DeclinePayment {
                    order_id,
                    reason: reason.clone(),
                },
                PaymentCommand::Capture => SagaCommand::CapturePayment { order_id },
                PaymentCommand::Void => SagaCommand::VoidPayment { order_id },
            },
            Command::Shipment(command) => match command {
                ShipmentCommand::Create => SagaCommand::CreateShipment { order_id },
                ShipmentCommand::Dispatch => SagaCommand::DispatchShipment { order_id },
                ShipmentCommand::Deliver => SagaCommand::DeliverShipment { order_id },
                ShipmentCommand::Cancel => SagaCommand::CancelShipment { order_id },
            },
            Command::Order(command) => match command {
                OrderCommand::Confirm => SagaCommand::ConfirmOrder { order_id },
                OrderCommand::Cancel { reason, .. } => SagaCommand::CancelOrder {
                    order_id,
                    reason: *reason,
                },
                OrderCommand::Place { .. } | OrderCommand::Ship | OrderCommand::Deliver => {
                    return None
                }
            },
        })
    }

    /// The (aggregate type, aggregate id) the command is for.
    pub fn target(&self) -> (&'static str, String) {
        use SagaCommand::*;
        match self {
            ReserveStock { sku, .. } | ReleaseStock { sku, .. } | CommitStock { sku, .. } => {
                ("inventory", sku.to_string())
            }
            RequestPayment { order_id, .. }
            | AuthorizePayment { order_id }
            | DeclinePayment { order_id, .. }
            | CapturePayment { order_id }
            | VoidPayment { order_id } => ("payment", order_id.to_string()),
            CreateShipment { order_id }
            | DispatchShipment { order_id }
            | DeliverShipment { order_id }
            | CancelShipment { order_id } => ("shipment", order_id.to_string()),
            ConfirmOrder { order_id } | CancelOrder { order_id, .. } => {
                ("order", order_id.to_string())
            }
        }
    }
}
