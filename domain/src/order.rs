//! The order: what a customer asked for and where it stands in its lifecycle.
//!
//! The order stream is the one place that decides between dispatch and cancellation,
//! so an order is never both shipped and cancelled.

use crate::{
    Aggregate, CancelReason, CustomerId, DomainError, EventName, Money, PaymentToken, Quantity, Sku,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price_cents: Money,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Shipped,
    Delivered,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<OrderStatus> {
        [
            OrderStatus::Pending,
            OrderStatus::Confirmed,
            OrderStatus::Shipped,
            OrderStatus::Delivered,
            OrderStatus::Cancelled,
        ]
        .into_iter()
        .find(|status| status.as_str() == raw)
    }
}

/// The most lines one order may hold.
pub const MAX_LINES: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    Place {
        customer_id: CustomerId,
        lines: Vec<OrderLine>,
        payment_token: PaymentToken,
    },
    /// The saga: stock reserved, payment authorised, shipment created.
    Confirm,
    Cancel {
        reason: CancelReason,
        note: Option<String>,
    },
    /// The warehouse hands the parcel over (`POST /v1/shipments/{id}/dispatch`).
    Ship,
    /// The parcel arrived (`POST /v1/shipments/{id}/deliver`).
    Deliver,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum OrderEvent {
    OrderPlaced {
        customer_id: CustomerId,
        #[serde(deserialize_with = "placed_lines")]
        lines: Vec<OrderLine>,
        total_cents: Money,
        payment_token: PaymentToken,
    },
    OrderConfirmed {},
    OrderCancelled {
        reason: CancelReason,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    OrderShipped {},
    OrderDelivered {},
}

/// The lines of a placed order as read back: 1 to [`MAX_LINES`], as `decide` allows,
/// so a damaged event is refused where it is read rather than folded into an order
/// of no lines.
fn placed_lines<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<OrderLine>, D::Error> {
    let lines = Vec::<OrderLine>::deserialize(deserializer)?;
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(serde::de::Error::custom(format!(
            "an order holds 1 to {MAX_LINES} lines, not {}",
            lines.len()
        )));
    }
    Ok(lines)
}

impl EventName for OrderEvent {
    fn name(&self) -> &'static str {
        match self {
            OrderEvent::OrderPlaced { .. } => "OrderPlaced",
            OrderEvent::OrderConfirmed {} => "OrderConfirmed",
            OrderEvent::OrderCancelled { .. } => "OrderCancelled",
            OrderEvent::OrderShipped {} => "OrderShipped",
            OrderEvent::OrderDelivered {} => "OrderDelivered",
        }
    }
}

/// The sum of price times quantity over the lines.
pub fn total_of(lines: &[OrderLine]) -> Money {
    lines.iter().fold(Money::ZERO, |sum, line| {
        sum.plus(line.unit_price_cents.times(line.quantity))
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub status: Option<OrderStatus>,
    pub customer_id: Option<CustomerId>,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub cancel_reason: Option<CancelReason>,
}

impl Order {
    fn status(&self) -> Result<OrderStatus, DomainError> {
        self.status.ok_or(DomainError::NotFound("order"))
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
        use OrderStatus::*;
        match command {
            OrderCommand::Place {
                customer_id,
                lines,
                payment_token,
            } => {
                if self.status.is_some() {
                    return Err(DomainError::conflict("the order exists already"));
                }
                if lines.is_empty() || lines.len() > MAX_LINES {
                    return Err(DomainError::Invalid(format!(
                        "an order holds 1 to {MAX_LINES} lines"
                    )));
                }
                Ok(vec![OrderEvent::OrderPlaced {
                    customer_id: customer_id.clone(),
                    lines: lines.clone(),
                    total_cents: total_of(lines),
                    payment_token: payment_token.clone(),
                }])
            }
            OrderCommand::Confirm => match self.status()? {
                Pending => Ok(vec![OrderEvent::OrderConfirmed {}]),
                Confirmed => Ok(vec![]),
                other => Err(DomainError::conflict(format!(
                    "an order that is {} cannot be confirmed",
                    other.as_str()
                ))),
            },
            OrderCommand::Cancel { reason, note } => match self.status()? {
                Pending | Confirmed => Ok(vec![OrderEvent::OrderCancelled {
                    reason: *reason,
                    note: note.clone(),
                }]),
                other => Err(DomainError::conflict(format!(
                    "an order that is {} cannot be cancelled",
                    other.as_str()
                ))),
            },
            OrderCommand::Ship => match self.status()? {
                Confirmed => Ok(vec![OrderEvent::OrderShipped {}]),
                other => Err(DomainError::conflict(format!(
                    "only a confirmed order can be dispatched; this one is {}",
                    other.as_str()
                ))),
            },
            OrderCommand::Deliver => match self.status()? {
                Shipped => Ok(vec![OrderEvent::OrderDelivered {}]),
                other => Err(DomainError::conflict(format!(
                    "only a dispatched order can be delivered; this one is {}",
                    other.as_str()
                ))),
            },
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::OrderPlaced {
                customer_id,
                lines,
                total_cents,
                ..
            } => {
                self.status = Some(OrderStatus::Pending);
                self.customer_id = Some(customer_id.clone());
                self.lines = lines.clone();
                self.total = *total_cents;
            }
            OrderEvent::OrderConfirmed {} => self.status = Some(OrderStatus::Confirmed),
            OrderEvent::OrderCancelled { reason, .. } => {
                self.status = Some(OrderStatus::Cancelled);
                self.cancel_reason = Some(*reason);
            }
            OrderEvent::OrderShipped {} => self.status = Some(OrderStatus::Shipped),
            OrderEvent::OrderDelivered {} => self.status = Some(OrderStatus::Delivered),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use proptest::prelude::*;

    fn line(sku: &str, quantity: i64, price: i64) -> OrderLine {
        OrderLine {
            sku: Sku::parse(sku).expect("valid sku"),
            quantity: Quantity::new(quantity).expect("valid quantity"),
            unit_price_cents: Money::unit_price(price).expect("valid price"),
        }
    }

    fn place() -> OrderCommand {
        OrderCommand::Place {
            customer_id: CustomerId::parse("c-1").expect("valid id"),
            lines: vec![line("S-1", 2, 1299), line("S-2", 1, 500)],
            payment_token: PaymentToken::parse("tok_ok").expect("valid token"),
        }
    }

    fn placed() -> OrderEvent {
        match Order::default().decide(&place()) {
            Ok(mut events) => events.remove(0),
            Err(error) => panic!("placing failed: {error}"),
        }
    }

    fn cancel(reason: CancelReason) -> OrderCommand {
        OrderCommand::Cancel { reason, note: None }
    }

    #[test]
    fn placing_an_order_records_its_lines_and_total() {
        match given::<Order>(vec![]).when(place()) {
            Ok(events) => match &events[..] {
                [OrderEvent::OrderPlaced {
                    total_cents, lines, ..
                }] => {
                    assert_eq!(total_cents.cents(), 2 * 1299 + 500);
                    assert_eq!(lines.len(), 2);
                }
                other => panic!("unexpected events {other:?}"),
            },
            Err(error) => panic!("unexpected error {error}"),
        }
    }

    #[test]
    fn an_order_cannot_be_placed_twice() {
        assert!(matches!(
            given::<Order>(vec![placed()]).when(place()),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn an_order_needs_one_to_a_hundred_lines() {
        let empty = OrderCommand::Place {
            customer_id: CustomerId::parse("c-1").expect("valid id"),
            lines: vec![],
            payment_token: PaymentToken::parse("tok_ok").expect("valid token"),
        };
        assert!(matches!(
            given::<Order>(vec![]).when(empty),
            Err(DomainError::Invalid(_))
        ));
        let too_many = OrderCommand::Place {
            customer_id: CustomerId::parse("c-1").expect("valid id"),
            lines: (0..101).map(|i| line(&format!("S-{i}"), 1, 1)).collect(),
            payment_token: PaymentToken::parse("tok_ok").expect("valid token"),
        };
        assert!(matches!(
            given::<Order>(vec![]).when(too_many),
            Err(DomainError::Invalid(_))
        ));
    }

    #[test]
    fn commands_on_a_missing_order_are_not_found() {
        for command in [
            OrderCommand::Confirm,
            cancel(CancelReason::CustomerRequest),
            OrderCommand::Ship,
            OrderCommand::Deliver,
        ] {
            assert_eq!(
                given::<Order>(vec![]).when(command),
                Err(DomainError::NotFound("order"))
            );
        }
    }

    #[test]
    fn a_pending_order_is_confirmed_once() {
        assert_eq!(
            given::<Order>(vec![placed()]).when(OrderCommand::Confirm),
            Ok(vec![OrderEvent::OrderConfirmed {}])
        );
        assert_eq!(
            given::<Order>(vec![placed(), OrderEvent::OrderConfirmed {}])
                .when(OrderCommand::Confirm),
            Ok(vec![])
        );
    }

    #[test]
    fn a_cancelled_order_cannot_be_confirmed() {
        let cancelled = OrderEvent::OrderCancelled {
            reason: CancelReason::CustomerRequest,
            note: None,
        };
        assert!(matches!(
            given::<Order>(vec![placed(), cancelled]).when(OrderCommand::Confirm),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn pending_and_confirmed_orders_can_be_cancelled() {
        let expected = Ok(vec![OrderEvent::OrderCancelled {
            reason: CancelReason::CustomerRequest,
            note: None,
        }]);
        assert_eq!(
            given::<Order>(vec![placed()]).when(cancel(CancelReason::CustomerRequest)),
            expected
        );
        assert_eq!(
            given::<Order>(vec![placed(), OrderEvent::OrderConfirmed {}])
                .when(cancel(CancelReason::CustomerRequest)),
            expected
        );
    }

    #[test]
    fn a_shipped_order_cannot_be_cancelled() {
        let shipped = vec![
            placed(),
            OrderEvent::OrderConfirmed {},
            OrderEvent::OrderShipped {},
        ];
        assert!(matches!(
            given::<Order>(shipped).when(cancel(CancelReason::CustomerRequest)),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn a_cancelled_order_cannot_be_cancelled_again() {
        let cancelled = OrderEvent::OrderCancelled {
            reason: CancelReason::OutOfStock,
            note: None,
        };
        assert!(matches!(
            given::<Order>(vec![placed(), cancelled]).when(cancel(CancelReason::CustomerRequest)),
            Err(DomainError::Conflict(_))
        ));
    }

    #[test]
    fn only_a_confirmed_order_is_dispatched() {
        assert!(matches!(
            given::<Order>(vec![placed()]).when(OrderCommand::Ship),
            Err(DomainError::Conflict(_))
        ));
        assert_eq!(
            given::<Order>(vec![placed(), OrderEvent::OrderConfirmed {}]).when(OrderCommand::Ship),
            Ok(vec![OrderEvent::OrderShipped {}])
        );
    }

    #[test]
    fn only_a_dispatched_order_is_delivered() {
        assert!(matches!(
            given::<Order>(vec![placed(), OrderEvent::OrderConfirmed {}])
                .when(OrderCommand::Deliver),
            Err(DomainError::Conflict(_))
        ));
        assert_eq!(
            given::<Order>(vec![
                placed(),
                OrderEvent::OrderConfirmed {},
                OrderEvent::OrderShipped {}
            ])
            .when(OrderCommand::Deliver),
            Ok(vec![OrderEvent::OrderDelivered {}])
        );
    }

    fn any_command() -> impl Strategy<Value = OrderCommand> {
        prop_oneof![
            Just(OrderCommand::Confirm),
            Just(OrderCommand::Ship),
            Just(OrderCommand::Deliver),
            Just(cancel(CancelReason::CustomerRequest)),
            Just(cancel(CancelReason::PaymentTimeout)),
        ]
    }

    proptest! {
        #[test]
        fn an_order_is_never_both_shipped_and_cancelled(commands in proptest::collection::vec(any_command(), 0..20)) {
            let mut order = Order::default();
            let mut history = vec![placed()];
            order.apply(&history[0]);
            for command in commands {
                if let Ok(events) = order.decide(&command) {
                    for event in events {
                        order.apply(&event);
                        history.push(event);
                    }
                }
            }
            let shipped = history.iter().any(|e| matches!(e, OrderEvent::OrderShipped {}));
            let cancelled = history.iter().any(|e| matches!(e, OrderEvent::OrderCancelled { .. }));
            prop_assert!(!(shipped && cancelled));
            let cancels = history.iter().filter(|e| matches!(e, OrderEvent::OrderCancelled { .. })).count();
            prop_assert!(cancels <= 1);
        }
    }
}
