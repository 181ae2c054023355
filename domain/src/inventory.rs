//! An inventory item: the stock of one sku, on hand and reserved per order.
//!
//! Every event carries the levels after it, so a projection sets them instead of
//! recomputing them.

use crate::{Aggregate, DomainError, EventName, Quantity};
use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The most units of one sku the system keeps count of.
pub const MAX_ON_HAND: u64 = 1_000_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InventoryCommand {
    Restock {
        quantity: Quantity,
    },
    /// Hold `quantity` units for an order. Not enough available stock is an answer,
    /// not an error: it is recorded as `StockReservationRejected` so the saga hears it.
    Reserve {
        order_id: Uuid,
        quantity: u64,
    },
    /// Give an order's reservation back; nothing to release is not an error.
    Release {
        order_id: Uuid,
    },
    /// The reserved units leave the warehouse.
    Commit {
        order_id: Uuid,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum InventoryEvent {
    StockRestocked {
        quantity: u64,
        on_hand: u64,
        reserved: u64,
    },
    StockReserved {
        order_id: Uuid,
        quantity: u64,
        on_hand: u64,
        reserved: u64,
    },
    StockReservationRejected {
        order_id: Uuid,
        requested: u64,
        available: u64,
    },
    StockReleased {
        order_id: Uuid,
        quantity: u64,
        on_hand: u64,
        reserved: u64,
    },
    StockCommitted {
        order_id: Uuid,
        quantity: u64,
        on_hand: u64,
        reserved: u64,
    },
}

impl EventName for InventoryEvent {
    fn name(&self) -> &'static str {
        match self {
            InventoryEvent::StockRestocked { .. } => "StockRestocked",
            InventoryEvent::StockReserved { .. } => "StockReserved",
            InventoryEvent::StockReservationRejected { .. } => "StockReservationRejected",
            InventoryEvent::StockReleased { .. } => "StockReleased",
            InventoryEvent::StockCommitted { .. } => "StockCommitted",
        }
    }
}

impl InventoryEvent {
    /// The order an event concerns, if any.
    pub fn order_id(&self) -> Option<Uuid> {
        match self {
            InventoryEvent::StockRestocked { .. } => None,
            InventoryEvent::StockReserved { order_id, .. }
            | InventoryEvent::StockReservationRejected { order_id, .. }
            | InventoryEvent::StockReleased { order_id, .. }
            | InventoryEvent::StockCommitted { order_id, .. } => Some(*order_id),
        }
    }
}

/// A SKU's stock. Every command on it copies the state (to decide on, and to keep in
/// memory), and a busy SKU holds a reservation for each order in flight, so the
/// reservations are a persistent map (a copy shares it) and their total is kept as
/// they change rather than summed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredItem", into = "StoredItem")]
pub struct InventoryItem {
    pub exists: bool,
    pub on_hand: u64,
    reservations: OrdMap<Uuid, u64>,
    /// The sum of `reservations`.
    reserved: u64,
}

/// How an item is stored in a snapshot: without its derived total.
#[derive(Serialize, Deserialize)]
struct StoredItem {
    exists: bool,
    on_hand: u64,
    reservations: OrdMap<Uuid, u64>,
}

impl From<StoredItem> for InventoryItem {
    fn from(stored: StoredItem) -> InventoryItem {
        InventoryItem {
            exists: stored.exists,
            on_hand: stored.on_hand,
            reserved: stored.reservations.values().sum(),
            reservations: stored.reservations,
        }
    }
}

impl From<InventoryItem> for StoredItem {
    fn from(item: InventoryItem) -> StoredItem {
        StoredItem {
            exists: item.exists,
            on_hand: item.on_hand,
            reservations: item.reservations,
        }
    }
}

impl InventoryItem {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    pub fn available(&self) -> u64 {
        self.on_hand.saturating_sub(self.reserved())
    }
}

impl Aggregate for InventoryItem {
    const TYPE: &'static str = "inventory";
    type Command = InventoryCommand;
    type Event = InventoryEvent;

    fn decide(&self, command: &InventoryCommand) -> Result<Vec<InventoryEvent>, DomainError> {
        let reserved = self.reserved();
        match command {
            InventoryCommand::Restock { quantity } => {
                let on_hand = self.on_hand + quantity.get();
                if on_hand > MAX_ON_HAND {
                    return Err(DomainError::Invalid(format!(
                        "restocking would hold more than {MAX_ON_HAND} units"
                    )));
                }
                Ok(vec![InventoryEvent::StockRestocked {
                    quantity: quantity.get(),
                    on_hand,
                    reserved,
                }])
            }
            InventoryCommand::Reserve { order_id, quantity } => {
                if self.reservations.contains_key(order_id) {
                    return Ok(vec![]);
                }
                if *quantity == 0 {
                    return Err(DomainError::Invalid(
                        "a reservation needs at least one unit".into(),
                    ));
                }
                let available = self.available();
                if *quantity > available {
                    return Ok(vec![InventoryEvent::StockReservationRejected {
                        order_id: *order_id,
                        requested: *quantity,
                        available,
                    }]);
                }
                Ok(vec![InventoryEvent::StockReserved {
                    order_id: *order_id,
                    quantity: *quantity,
                    on_hand: self.on_hand,
                    reserved: reserved + quantity,
                }])
            }
            InventoryCommand::Release { order_id } => match self.reservations.get(order_id) {
                None => Ok(vec![]),
                Some(quantity) => Ok(vec![InventoryEvent::StockReleased {
                    order_id: *order_id,
                    quantity: *quantity,
                    on_hand: self.on_hand,
                    reserved: reserved - quantity,
                }]),
            },
            InventoryCommand::Commit { order_id } => match self.reservations.get(order_id) {
                None => Err(DomainError::conflict(
                    "there is no reservation for this order to commit",
                )),
                Some(quantity) => Ok(vec![InventoryEvent::StockCommitted {
                    order_id: *order_id,
                    quantity: *quantity,
                    on_hand: self.on_hand - quantity,
                    reserved: reserved - quantity,
                }]),
            },
        }
    }

    fn apply(&mut self, event: &InventoryEvent) {
        self.exists = true;
        match event {
            InventoryEvent::StockRestocked { on_hand, .. } => self.on_hand = *on_hand,
            InventoryEvent::StockReserved {
                order_id, quantity, ..
            } => {
                let before = self.reservations.insert(*order_id, *quantity);
                self.reserved = self.reserved - before.unwrap_or(0) + quantity;
            }
            InventoryEvent::StockReservationRejected { .. } => {}
            InventoryEvent::StockReleased { order_id, .. } => {
                self.reserved -= self.reservations.remove(order_id).unwrap_or(0);
            }
            InventoryEvent::StockCommitted {
                order_id, on_hand, ..
            } => {
                self.reserved -= self.reservations.remove(order_id).unwrap_or(0);
                self.on_hand = *on_hand;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use proptest::prelude::*;

    fn order(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn restocked(quantity: u64) -> InventoryEvent {
        InventoryEvent::StockRestocked {
            quantity,
            on_hand: quantity,
            reserved: 0,
        }
    }

    /// Order 1 holds 2 of 5 units.
    fn held_two_of_five() -> InventoryEvent {
        InventoryEvent::StockReserved {
            order_id: order(1),
            quantity: 2,
            on_hand: 5,
            reserved: 2,
        }
    }

    fn reserve(n: u128, quantity: u64) -> InventoryCommand {
        InventoryCommand::Reserve {
            order_id: order(n),
            quantity,
        }
    }

    #[test]
    fn a_snapshot_keeps_the_shape_it_had_and_the_total_is_read_back() {
        let stored = serde_json::json!({
            "exists": true,
            "on_hand": 5,
            "reservations": { order(1).to_string(): 2, order(2).to_string(): 1 },
        });
        let item: InventoryItem = serde_json::from_value(stored.clone()).expect("read");
        assert_eq!((item.on_hand, item.reserved(), item.available()), (5, 3, 2));
        assert_eq!(serde_json::to_value(&item).expect("write"), stored);
    }

    #[test]
    fn restocking_adds_to_what_is_on_hand() {
        assert_eq!(
            given::<InventoryItem>(vec![restocked(5)]).when(InventoryCommand::Restock {
                quantity: Quantity::new(3).expect("valid")
            }),
            Ok(vec![InventoryEvent::StockRestocked {
                quantity: 3,
                on_hand: 8,
                reserved: 0
            }])
        );
    }

    #[test]
    fn a_reservation_within_available_stock_is_held() {
        assert_eq!(
            given::<InventoryItem>(vec![restocked(5)]).when(reserve(1, 5)),
            Ok(vec![InventoryEvent::StockReserved {
                order_id: order(1),
                quantity: 5,
                on_hand: 5,
                reserved: 5
            }])
        );
    }

    #[test]
    fn a_reservation_beyond_available_stock_is_rejected_as_an_event() {
        let held = InventoryEvent::StockReserved {
            order_id: order(1),
            quantity: 4,
            on_hand: 5,
            reserved: 4,
        };
        assert_eq!(
            given::<InventoryItem>(vec![restocked(5), held]).when(reserve(2, 2)),
            Ok(vec![InventoryEvent::StockReservationRejected {
                order_id: order(2),
                requested: 2,
                available: 1
            }])
        );
    }

    #[test]
    fn an_unknown_sku_has_nothing_to_reserve() {
        assert_eq!(
            given::<InventoryItem>(vec![]).when(reserve(1, 1)),
            Ok(vec![InventoryEvent::StockReservationRejected {
                order_id: order(1),
                requested: 1,
                available: 0
            }])
        );
    }

    #[test]
    fn reserving_twice_for_one_order_holds_once() {
        let held = held_two_of_five();
        assert_eq!(
            given::<InventoryItem>(vec![restocked(5), held]).when(reserve(1, 2)),
            Ok(vec![])
        );
    }

    #[test]
    fn releasing_gives_the_reservation_back_and_is_harmless_twice() {
        let held = held_two_of_five();
        let released = InventoryEvent::StockReleased {
            order_id: order(1),
            quantity: 2,
            on_hand: 5,
            reserved: 0,
        };
        assert_eq!(
            given::<InventoryItem>(vec![restocked(5), held.clone()])
                .when(InventoryCommand::Release { order_id: order(1) }),
            Ok(vec![released.clone()])
        );
        assert_eq!(
            given::<InventoryItem>(vec![restocked(5), held, released])
                .when(InventoryCommand::Release { order_id: order(1) }),
            Ok(vec![])
        );
    }

    #[test]
    fn committing_takes_the_reserved_units_off_hand() {
        let held = held_two_of_five();
        assert_eq!(
            given::<InventoryItem>(vec![restocked(5), held])
                .when(InventoryCommand::Commit { order_id: order(1) }),
            Ok(vec![InventoryEvent::StockCommitted {
                order_id: order(1),
                quantity: 2,
                on_hand: 3,
                reserved: 0
            }])
        );
    }

    #[test]
    fn committing_without_a_reservation_is_a_conflict() {
        assert!(matches!(
            given::<InventoryItem>(vec![restocked(5)])
                .when(InventoryCommand::Commit { order_id: order(1) }),
            Err(DomainError::Conflict(_))
        ));
    }

    fn any_command() -> impl Strategy<Value = InventoryCommand> {
        prop_oneof![
            (1i64..50).prop_map(|q| InventoryCommand::Restock {
                quantity: Quantity::new(q).expect("in range")
            }),
            (0u128..6, 1u64..40).prop_map(|(n, q)| reserve(n, q)),
            (0u128..6).prop_map(|n| InventoryCommand::Release { order_id: order(n) }),
            (0u128..6).prop_map(|n| InventoryCommand::Commit { order_id: order(n) }),
        ]
    }

    proptest! {
        #[test]
        fn stock_is_never_negative_and_reserved_never_exceeds_on_hand(
            commands in proptest::collection::vec(any_command(), 0..60)
        ) {
            let mut item = InventoryItem::default();
            let mut restocked = 0u64;
            let mut committed = 0u64;
            for command in &commands {
                if let Ok(events) = item.decide(command) {
                    for event in &events {
                        match event {
                            InventoryEvent::StockRestocked { quantity, .. } => restocked += quantity,
                            InventoryEvent::StockCommitted { quantity, .. } => committed += quantity,
                            _ => {}
                        }
                        item.apply(event);
                        // The levels an event carries are the levels the state has after it.
                        if let InventoryEvent::StockReserved { on_hand, reserved, .. }
                        | InventoryEvent::StockReleased { on_hand, reserved, .. }
                        | InventoryEvent::StockCommitted { on_hand, reserved, .. }
                        | InventoryEvent::StockRestocked { on_hand, reserved, .. } = event {
                            prop_assert_eq!(*on_hand, item.on_hand);
                            prop_assert_eq!(*reserved, item.reserved());
                        }
                    }
                }
                prop_assert!(item.reserved() <= item.on_hand);
                prop_assert_eq!(item.on_hand, restocked - committed);
                // A snapshot reads back as the same state (its total summed again).
                let snapshot = serde_json::to_value(&item).expect("snapshot");
                let read: InventoryItem = serde_json::from_value(snapshot).expect("read");
                prop_assert_eq!(&read, &item);
            }
        }
    }
}
