//! A customer's cart: one per customer (its id is the customer's), open for good.
//! Lines are a SKU and a quantity; prices are the catalog's, added when the cart is
//! checked out. Checking out turns the lines into an order (its id and priced lines
//! travel in `CartCheckedOut`, from which the order service places it) and empties
//! the cart.

use crate::order::{OrderLine, MAX_LINES};
use crate::values::{Money, PaymentToken, Quantity, Sku};
use crate::{Aggregate, DomainError, EventName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CartCommand {
    /// Put `quantity` of `sku` in the cart (replacing what was there).
    SetLine { sku: Sku, quantity: Quantity },
    /// Take `sku` out (nothing to do if it is not in).
    RemoveLine { sku: Sku },
    /// Turn the cart into order `order_id`, its lines priced as `lines` (which must
    /// be the cart's lines as they are).
    CheckOut {
        order_id: Uuid,
        lines: Vec<OrderLine>,
        payment_token: PaymentToken,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum CartEvent {
    CartLineSet {
        sku: Sku,
        quantity: Quantity,
    },
    CartLineRemoved {
        sku: Sku,
    },
    CartCheckedOut {
        order_id: Uuid,
        lines: Vec<OrderLine>,
        total_cents: Money,
        payment_token: PaymentToken,
    },
}

impl EventName for CartEvent {
    fn name(&self) -> &'static str {
        match self {
            CartEvent::CartLineSet { .. } => "CartLineSet",
            CartEvent::CartLineRemoved { .. } => "CartLineRemoved",
            CartEvent::CartCheckedOut { .. } => "CartCheckedOut",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    pub lines: BTreeMap<Sku, Quantity>,
}

impl Aggregate for Cart {
    const TYPE: &'static str = "cart";
    type Command = CartCommand;
    type Event = CartEvent;

    fn decide(&self, command: &CartCommand) -> Result<Vec<CartEvent>, DomainError> {
        match command {
            CartCommand::SetLine { sku, quantity } => {
                if self.lines.get(sku) == Some(quantity) {
                    return Ok(vec![]);
                }
                if !self.lines.contains_key(sku) && self.lines.len() >= MAX_LINES {
                    return Err(DomainError::Invalid(format!(
                        "a cart holds at most {MAX_LINES} lines"
                    )));
                }
                Ok(vec![CartEvent::CartLineSet {
                    sku: sku.clone(),
                    quantity: *quantity,
                }])
            }
            CartCommand::RemoveLine { sku } => Ok(if self.lines.contains_key(sku) {
                vec![CartEvent::CartLineRemoved { sku: sku.clone() }]
            } else {
                vec![]
            }),
            CartCommand::CheckOut {
                order_id,
                lines,
                payment_token,
            } => {
                if self.lines.is_empty() {
                    return Err(DomainError::conflict("the cart is empty"));
                }
                let priced: BTreeMap<&Sku, Quantity> =
                    lines.iter().map(|l| (&l.sku, l.quantity)).collect();
                let held: BTreeMap<&Sku, Quantity> =
                    self.lines.iter().map(|(s, q)| (s, *q)).collect();
                if priced != held || priced.len() != lines.len() {
                    return Err(DomainError::conflict(
                        "the cart changed while it was checked out; check out again",
                    ));
                }
                let total = lines.iter().fold(Money::ZERO, |sum, l| {
                    sum.plus(l.unit_price_cents.times(l.quantity))
                });
                Ok(vec![CartEvent::CartCheckedOut {
                    order_id: *order_id,
                    lines: lines.clone(),
                    total_cents: total,
                    payment_token: payment_token.clone(),
                }])
            }
        }
    }

    fn apply(&mut self, event: &CartEvent) {
        match event {
            CartEvent::CartLineSet { sku, quantity } => {
                self.lines.insert(sku.clone(), *quantity);
            }
            CartEvent::CartLineRemoved { sku } => {
                self.lines.remove(sku);
            }
            CartEvent::CartCheckedOut { .. } => self.lines.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;

    fn sku(s: &str) -> Sku {
        Sku::parse(s).expect("sku")
    }

    fn quantity(n: i64) -> Quantity {
        Quantity::new(n).expect("quantity")
    }

    fn set(s: &str, n: i64) -> CartEvent {
        CartEvent::CartLineSet {
            sku: sku(s),
            quantity: quantity(n),
        }
    }

    fn line(s: &str, n: i64, price: u64) -> OrderLine {
        OrderLine {
            sku: sku(s),
            quantity: quantity(n),
            unit_price_cents: Money::from_cents(price),
        }
    }

    fn token() -> PaymentToken {
        PaymentToken::parse("tok_ok").expect("token")
    }

    #[test]
    fn lines_are_set_replaced_and_removed() {
        let cart = || given::<Cart>(vec![set("A", 2)]);
        assert_eq!(
            cart().when(CartCommand::SetLine {
                sku: sku("A"),
                quantity: quantity(3)
            }),
            Ok(vec![set("A", 3)])
        );
        assert_eq!(
            cart().when(CartCommand::SetLine {
                sku: sku("A"),
                quantity: quantity(2)
            }),
            Ok(vec![])
        );
        assert_eq!(
            cart().when(CartCommand::RemoveLine { sku: sku("B") }),
            Ok(vec![])
        );
        assert_eq!(
            cart().when(CartCommand::RemoveLine { sku: sku("A") }),
            Ok(vec![CartEvent::CartLineRemoved { sku: sku("A") }])
        );
    }

    #[test]
    fn checking_out_prices_the_lines_as_they_are_and_empties_the_cart() {
        let order_id = Uuid::from_u128(7);
        let checkout = |lines| CartCommand::CheckOut {
            order_id,
            lines,
            payment_token: token(),
        };
        let events = given::<Cart>(vec![set("A", 2), set("B", 1)])
            .when(checkout(vec![line("A", 2, 100), line("B", 1, 50)]))
            .expect("checked out");
        assert_eq!(
            events,
            vec![CartEvent::CartCheckedOut {
                order_id,
                lines: vec![line("A", 2, 100), line("B", 1, 50)],
                total_cents: Money::from_cents(250),
                payment_token: token(),
            }]
        );
        let after = Cart::from_events([set("A", 2), set("B", 1)].iter().chain(events.iter()));
        assert!(after.lines.is_empty());
        assert!(matches!(
            given::<Cart>(vec![set("A", 2)]).when(checkout(vec![line("A", 1, 100)])),
            Err(DomainError::Conflict(_))
        ));
        assert!(matches!(
            given::<Cart>(vec![]).when(checkout(vec![])),
            Err(DomainError::Conflict(_))
        ));
    }
}
