//! The order fulfilment saga, as a pure transition function.
//!
//! One saga instance per order. It hears the events of the order, the inventory items
//! the order touches, its payment and its shipment, and answers with commands for
//! those aggregates and at most one deadline (the payment timeout). Compensation lives
//! in one place: whatever the reason an order is cancelled, `OrderCancelled` releases
//! the stock it holds, voids its payment and cancels its shipment, and anything that
//! arrives late for a cancelled order is undone as it arrives.

use crate::inventory::{InventoryCommand, InventoryEvent};
use crate::order::{OrderCommand, OrderEvent};
use crate::payment::{PaymentCommand, PaymentEvent};
use crate::shipment::{ShipmentCommand, ShipmentEvent};
use crate::{CancelReason, Money, PaymentToken, Sku};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    #[default]
    NotStarted,
    Reserving,
    AwaitingPayment,
    AwaitingShipment,
    AwaitingConfirmation,
    Confirmed,
    Shipped,
    Delivered,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentProgress {
    #[default]
    None,
    Requested,
    Authorized,
    Declined,
    Captured,
    Voided,
}

/// The saga's state; stored as JSON between inputs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fulfilment {
    pub stage: Stage,
    /// Units per sku (lines of the same sku summed).
    pub items: BTreeMap<Sku, u64>,
    pub reserved: BTreeSet<Sku>,
    pub rejected: BTreeSet<Sku>,
    pub amount: Money,
    pub payment_token: Option<PaymentToken>,
    pub payment: PaymentProgress,
    pub shipment_created: bool,
    pub payment_deadline: Option<DateTime<Utc>>,
    pub cancel_reason: Option<CancelReason>,
    /// The skus whose reservation was answered (reserved or refused). Absent from
    /// states stored before it was kept: such a saga is never taken as settled.
    #[serde(default)]
    pub answered: BTreeSet<Sku>,
    /// Whether the shipment was asked for, and whether that was answered.
    #[serde(default)]
    pub shipment_requested: bool,
    #[serde(default)]
    pub shipment_answered: bool,
}

/// What the saga hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Order(OrderEvent),
    Inventory { sku: Sku, event: InventoryEvent },
    Payment(PaymentEvent),
    Shipment(ShipmentEvent),
    PaymentDeadlinePassed,
}

/// What the saga asks of the participants, for its order: exactly the commands a
/// saga sends, so one it may not send cannot be written. This is also their stored
/// and wire form (with the order id beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    ReserveStock {
        sku: Sku,
        quantity: u64,
    },
    ReleaseStock {
        sku: Sku,
    },
    CommitStock {
        sku: Sku,
    },
    RequestPayment {
        #[serde(rename = "amount_cents")]
        amount: Money,
        #[serde(rename = "payment_token")]
        token: PaymentToken,
    },
    CapturePayment,
    VoidPayment,
    CreateShipment,
    DispatchShipment,
    DeliverShipment,
    CancelShipment,
    ConfirmOrder,
    CancelOrder {
        reason: CancelReason,
    },
}

/// A saga's command as the participant that carries it out reads it: which
/// aggregate, and its own command. The order, its payment and its shipment are keyed
/// by the order id; an inventory item by its sku.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Participant {
    Order(OrderCommand),
    Inventory(Sku, InventoryCommand),
    Payment(PaymentCommand),
    Shipment(ShipmentCommand),
}

impl Command {
    /// The participant's command for the saga of `order_id`.
    pub fn for_participant(&self, order_id: Uuid) -> Participant {
        match self.clone() {
            Command::ReserveStock { sku, quantity } => {
                Participant::Inventory(sku, InventoryCommand::Reserve { order_id, quantity })
            }
            Command::ReleaseStock { sku } => {
                Participant::Inventory(sku, InventoryCommand::Release { order_id })
            }
            Command::CommitStock { sku } => {
                Participant::Inventory(sku, InventoryCommand::Commit { order_id })
            }
            Command::RequestPayment { amount, token } => {
                Participant::Payment(PaymentCommand::Request { amount, token })
            }
            Command::CapturePayment => Participant::Payment(PaymentCommand::Capture),
            Command::VoidPayment => Participant::Payment(PaymentCommand::Void),
            Command::CreateShipment => Participant::Shipment(ShipmentCommand::Create),
            Command::DispatchShipment => Participant::Shipment(ShipmentCommand::Dispatch),
            Command::DeliverShipment => Participant::Shipment(ShipmentCommand::Deliver),
            Command::CancelShipment => Participant::Shipment(ShipmentCommand::Cancel),
            Command::ConfirmOrder => Participant::Order(OrderCommand::Confirm),
            Command::CancelOrder { reason } => {
                Participant::Order(OrderCommand::Cancel { reason, note: None })
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    Keep,
    Set(DateTime<Utc>),
    Clear,
}

/// How a saga ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Confirmed,
    Delivered,
    Cancelled(CancelReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub commands: Vec<Command>,
    pub deadline: Deadline,
    pub outcome: Option<Outcome>,
}

impl Transition {
    fn none() -> Self {
        Transition {
            commands: vec![],
            deadline: Deadline::Keep,
            outcome: None,
        }
    }

    fn commands(commands: Vec<Command>) -> Self {
        Transition {
            commands,
            ..Transition::none()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub payment_timeout: Duration,
}

impl Fulfilment {
    pub fn is_finished(&self) -> bool {
        matches!(self.stage, Stage::Delivered | Stage::Cancelled)
    }

    /// Finished, with nothing left that could still arrive and need an answer:
    /// delivered; or cancelled with every reservation answered and none still held,
    /// no payment authorized and not voided, and no shipment asked for and not
    /// answered or left open. Only such a saga's state may be forgotten (retention):
    /// whatever else its order's streams may still bring, it would not act on.
    pub fn is_settled(&self) -> bool {
        match self.stage {
            Stage::Delivered => true,
            Stage::Cancelled => {
                self.reserved.is_empty()
                    && self.items.keys().all(|sku| self.answered.contains(sku))
                    && matches!(
                        self.payment,
                        PaymentProgress::None | PaymentProgress::Declined | PaymentProgress::Voided
                    )
                    && !self.shipment_created
                    && (!self.shipment_requested || self.shipment_answered)
            }
            _ => false,
        }
    }

    /// The pure transition: fold `input` into the state and say what to do.
    /// `now` is when the input is handled.
    pub fn handle(&mut self, input: &Input, now: DateTime<Utc>, config: &Config) -> Transition {
        match input {
            Input::Order(event) => self.on_order(event),
            Input::Inventory { sku, event } => self.on_inventory(sku, event),
            Input::Payment(event) => self.on_payment(event, now, config),
            Input::Shipment(event) => self.on_shipment(event),
            Input::PaymentDeadlinePassed => {
                if self.stage == Stage::AwaitingPayment {
                    Transition {
                        commands: vec![Command::CancelOrder {
                            reason: CancelReason::PaymentTimeout,
                        }],
                        deadline: Deadline::Clear,
                        outcome: None,
                    }
                } else {
                    Transition {
                        deadline: Deadline::Clear,
                        ..Transition::none()
                    }
                }
            }
        }
    }

    fn on_order(&mut self, event: &OrderEvent) -> Transition {
        match event {
            OrderEvent::OrderPlaced {
                lines,
                total_cents,
                payment_token,
                ..
            } => {
                if self.stage != Stage::NotStarted {
                    return Transition::none();
                }
                for line in lines {
                    *self.items.entry(line.sku.clone()).or_insert(0) += line.quantity.get();
                }
                self.amount = *total_cents;
                self.payment_token = Some(payment_token.clone());
                self.stage = Stage::Reserving;
                Transition::commands(
                    self.items
                        .iter()
                        .map(|(sku, quantity)| Command::ReserveStock {
                            sku: sku.clone(),
                            quantity: *quantity,
                        })
                        .collect(),
                )
            }
            OrderEvent::OrderConfirmed {} => {
                if self.stage == Stage::AwaitingConfirmation {
                    self.stage = Stage::Confirmed;
                    return Transition {
                        outcome: Some(Outcome::Confirmed),
                        ..Transition::none()
                    };
                }
                Transition::none()
            }
            OrderEvent::OrderShipped {} => self.on_shipped(),
            OrderEvent::OrderDelivered {} => {
                if self.stage != Stage::Shipped {
                    return Transition::none();
                }
                self.stage = Stage::Delivered;
                Transition {
                    commands: vec![Command::DeliverShipment],
                    deadline: Deadline::Keep,
                    outcome: Some(Outcome::Delivered),
                }
            }
            OrderEvent::OrderCancelled { reason, .. } => self.on_cancelled(*reason),
        }
    }

    /// Handed over: commit the stock, capture the payment, dispatch the parcel.
    fn on_shipped(&mut self) -> Transition {
        if self.stage != Stage::Confirmed {
            return Transition::none();
        }
        self.stage = Stage::Shipped;
        self.payment = PaymentProgress::Captured;
        let mut commands: Vec<Command> = self
            .reserved
            .iter()
            .map(|sku| Command::CommitStock { sku: sku.clone() })
            .collect();
        commands.push(Command::CapturePayment);
        commands.push(Command::DispatchShipment);
        Transition::commands(commands)
    }

    /// Compensation, whatever the reason: release the stock held, void the payment,
    /// cancel the shipment.
    fn on_cancelled(&mut self, reason: CancelReason) -> Transition {
        if self.stage == Stage::Cancelled {
            return Transition::none();
        }
        self.stage = Stage::Cancelled;
        self.cancel_reason = Some(reason);
        let mut commands: Vec<Command> = self.reserved.iter().map(release).collect();
        if matches!(
            self.payment,
            PaymentProgress::Requested | PaymentProgress::Authorized
        ) {
            commands.push(Command::VoidPayment);
        }
        if self.shipment_created {
            commands.push(Command::CancelShipment);
        }
        Transition {
            commands,
            deadline: Deadline::Clear,
            outcome: Some(Outcome::Cancelled(reason)),
        }
    }

    fn on_inventory(&mut self, sku: &Sku, event: &InventoryEvent) -> Transition {
        match event {
            InventoryEvent::StockReserved { .. } => {
                if self.items.contains_key(sku) {
                    self.answered.insert(sku.clone());
                }
                if !self.items.contains_key(sku) || !self.reserved.insert(sku.clone()) {
                    return Transition::none();
                }
                if self.stage == Stage::Cancelled {
                    // A reservation that arrives after the order was cancelled is undone.
                    self.reserved.remove(sku);
                    return Transition::commands(vec![release(sku)]);
                }
                self.after_reservation_answer()
            }
            InventoryEvent::StockReservationRejected { .. } => {
                if self.items.contains_key(sku) {
                    self.answered.insert(sku.clone());
                }
                if !self.items.contains_key(sku) || !self.rejected.insert(sku.clone()) {
                    return Transition::none();
                }
                self.after_reservation_answer()
            }
            InventoryEvent::StockReleased { .. } => {
                self.reserved.remove(sku);
                Transition::none()
            }
            InventoryEvent::StockCommitted { .. } | InventoryEvent::StockRestocked { .. } => {
                Transition::none()
            }
        }
    }

    fn after_reservation_answer(&mut self) -> Transition {
        if self.stage != Stage::Reserving
            || self.reserved.len() + self.rejected.len() < self.items.len()
        {
            return Transition::none();
        }
        if !self.rejected.is_empty() {
            // The stock already held is released when the cancellation is recorded.
            return Transition::commands(vec![Command::CancelOrder {
                reason: CancelReason::OutOfStock,
            }]);
        }
        let Some(token) = self.payment_token.clone() else {
            return Transition::none();
        };
        self.stage = Stage::AwaitingPayment;
        self.payment = PaymentProgress::Requested;
        // The payment deadline starts when the payment service has the request
        // (`PaymentRequested`), not now: time the request spends queued on our side
        // is not the payment service's silence.
        Transition::commands(vec![Command::RequestPayment {
            amount: self.amount,
            token,
        }])
    }

    fn on_payment(
        &mut self,
        event: &PaymentEvent,
        now: DateTime<Utc>,
        config: &Config,
    ) -> Transition {
        match event {
            PaymentEvent::PaymentAuthorized { .. } => {
                if self.stage == Stage::Cancelled {
                    self.payment = PaymentProgress::Authorized;
                    return Transition::commands(vec![Command::VoidPayment]);
                }
                if self.stage != Stage::AwaitingPayment {
                    return Transition::none();
                }
                self.payment = PaymentProgress::Authorized;
                self.stage = Stage::AwaitingShipment;
                self.payment_deadline = None;
                self.shipment_requested = true;
                Transition {
                    commands: vec![Command::CreateShipment],
                    deadline: Deadline::Clear,
                    outcome: None,
                }
            }
            PaymentEvent::PaymentDeclined { .. } => {
                self.payment = PaymentProgress::Declined;
                if self.stage != Stage::AwaitingPayment {
                    return Transition::none();
                }
                self.payment_deadline = None;
                Transition {
                    commands: vec![Command::CancelOrder {
                        reason: CancelReason::PaymentDeclined,
                    }],
                    deadline: Deadline::Clear,
                    outcome: None,
                }
            }
            PaymentEvent::PaymentVoided { .. } => {
                self.payment = PaymentProgress::Voided;
                Transition::none()
            }
            PaymentEvent::PaymentCaptured { .. } => {
                self.payment = PaymentProgress::Captured;
                Transition::none()
            }
            PaymentEvent::PaymentRequested { .. } => {
                if self.stage != Stage::AwaitingPayment || self.payment_deadline.is_some() {
                    return Transition::none();
                }
                let due = now + config.payment_timeout;
                self.payment_deadline = Some(due);
                Transition {
                    deadline: Deadline::Set(due),
                    ..Transition::none()
                }
            }
        }
    }

    fn on_shipment(&mut self, event: &ShipmentEvent) -> Transition {
        match event {
            ShipmentEvent::ShipmentCreated {} => {
                self.shipment_created = true;
                self.shipment_answered = true;
                if self.stage == Stage::Cancelled {
                    return Transition::commands(vec![Command::CancelShipment]);
                }
                if self.stage != Stage::AwaitingShipment {
                    return Transition::none();
                }
                self.stage = Stage::AwaitingConfirmation;
                Transition::commands(vec![Command::ConfirmOrder])
            }
            ShipmentEvent::ShipmentCancelled {} => {
                self.shipment_created = false;
                Transition::none()
            }
            ShipmentEvent::ShipmentDispatched {} | ShipmentEvent::ShipmentDelivered {} => {
                Transition::none()
            }
        }
    }
}

fn release(sku: &Sku) -> Command {
    Command::ReleaseStock { sku: sku.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::OrderLine;
    use crate::{CustomerId, Quantity};
    use proptest::prelude::*;

    const ORDER: Uuid = Uuid::from_u128(7);

    fn config() -> Config {
        Config {
            payment_timeout: Duration::seconds(30),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    fn sku(raw: &str) -> Sku {
        Sku::parse(raw).expect("valid sku")
    }

    fn placed(token: &str) -> Input {
        let line = |s: &str, q: i64| OrderLine {
            sku: sku(s),
            quantity: Quantity::new(q).expect("valid"),
            unit_price_cents: Money::from_cents(100),
        };
        Input::Order(OrderEvent::OrderPlaced {
            customer_id: CustomerId::parse("c-1").expect("valid"),
            lines: vec![line("A", 2), line("B", 1), line("A", 1)],
            total_cents: Money::from_cents(400),
            payment_token: PaymentToken::parse(token).expect("valid"),
        })
    }

    fn reserved(s: &str, quantity: u64) -> Input {
        Input::Inventory {
            sku: sku(s),
            event: InventoryEvent::StockReserved {
                order_id: ORDER,
                quantity,
                on_hand: 10,
                reserved: quantity,
            },
        }
    }

    fn rejected(s: &str) -> Input {
        Input::Inventory {
            sku: sku(s),
            event: InventoryEvent::StockReservationRejected {
                order_id: ORDER,
                requested: 1,
                available: 0,
            },
        }
    }

    fn requested() -> Input {
        Input::Payment(PaymentEvent::PaymentRequested {
            amount_cents: Money::from_cents(400),
            payment_token: PaymentToken::parse("tok_ok").expect("valid"),
        })
    }

    fn authorized() -> Input {
        Input::Payment(PaymentEvent::PaymentAuthorized {
            amount_cents: Money::from_cents(400),
        })
    }

    fn cancelled(reason: CancelReason) -> Input {
        Input::Order(OrderEvent::OrderCancelled { reason, note: None })
    }

    fn release_cmd(s: &str) -> Command {
        release(&sku(s))
    }

    /// given(inputs).when(input) -> the transition of the last input.
    fn given(inputs: Vec<Input>) -> Fulfilment {
        let mut saga = Fulfilment::default();
        for input in &inputs {
            saga.handle(input, now(), &config());
        }
        saga
    }

    fn when(saga: &mut Fulfilment, input: Input) -> Transition {
        saga.handle(&input, now(), &config())
    }

    fn reserved_both() -> Vec<Input> {
        vec![placed("tok_ok"), reserved("A", 3), reserved("B", 1)]
    }

    fn up_to_confirmed() -> Vec<Input> {
        let mut inputs = reserved_both();
        inputs.push(authorized());
        inputs.push(Input::Shipment(ShipmentEvent::ShipmentCreated {}));
        inputs.push(Input::Order(OrderEvent::OrderConfirmed {}));
        inputs
    }

    #[test]
    fn a_placed_order_reserves_each_sku_once_with_lines_summed() {
        let mut saga = given(vec![]);
        let t = when(&mut saga, placed("tok_ok"));
        assert_eq!(
            t.commands,
            vec![
                Command::ReserveStock {
                    sku: sku("A"),
                    quantity: 3
                },
                Command::ReserveStock {
                    sku: sku("B"),
                    quantity: 1
                },
            ]
        );
        assert_eq!(saga.stage, Stage::Reserving);
    }

    #[test]
    fn all_stock_reserved_requests_payment_and_the_deadline_starts_when_the_payment_service_has_it()
    {
        let mut saga = given(vec![placed("tok_ok"), reserved("A", 3)]);
        let t = when(&mut saga, reserved("B", 1));
        assert_eq!(
            t.commands,
            vec![Command::RequestPayment {
                amount: Money::from_cents(400),
                token: PaymentToken::parse("tok_ok").expect("valid")
            }]
        );
        assert_eq!(t.deadline, Deadline::Keep);
        assert_eq!(saga.stage, Stage::AwaitingPayment);
        let later = now() + Duration::seconds(600);
        let t = saga.handle(&requested(), later, &config());
        assert_eq!(t.deadline, Deadline::Set(later + Duration::seconds(30)));
        assert!(t.commands.is_empty());
        // Heard again (a redelivery): the deadline stays where it was.
        let t = saga.handle(&requested(), later + Duration::seconds(5), &config());
        assert_eq!(t.deadline, Deadline::Keep);
    }

    #[test]
    fn a_rejected_reservation_cancels_the_order_as_out_of_stock() {
        let mut saga = given(vec![placed("tok_ok"), reserved("A", 3)]);
        let t = when(&mut saga, rejected("B"));
        assert_eq!(
            t.commands,
            vec![Command::CancelOrder {
                reason: CancelReason::OutOfStock
            }]
        );
        // The cancellation releases what was held: nothing stays reserved.
        let t = when(&mut saga, cancelled(CancelReason::OutOfStock));
        assert_eq!(t.commands, vec![release_cmd("A")]);
        assert_eq!(
            t.outcome,
            Some(Outcome::Cancelled(CancelReason::OutOfStock))
        );
    }

    #[test]
    fn an_authorised_payment_creates_the_shipment_and_clears_the_deadline() {
        let mut saga = given(reserved_both());
        let t = when(&mut saga, authorized());
        assert_eq!(t.commands, vec![Command::CreateShipment]);
        assert_eq!(t.deadline, Deadline::Clear);
    }

    #[test]
    fn a_created_shipment_confirms_the_order() {
        let mut saga = given({
            let mut inputs = reserved_both();
            inputs.push(authorized());
            inputs
        });
        let t = when(
            &mut saga,
            Input::Shipment(ShipmentEvent::ShipmentCreated {}),
        );
        assert_eq!(t.commands, vec![Command::ConfirmOrder]);
        let t = when(&mut saga, Input::Order(OrderEvent::OrderConfirmed {}));
        assert_eq!(t.outcome, Some(Outcome::Confirmed));
        assert_eq!(saga.stage, Stage::Confirmed);
    }

    #[test]
    fn a_declined_payment_cancels_the_order_and_releases_the_stock() {
        let mut saga = given(reserved_both());
        let t = when(
            &mut saga,
            Input::Payment(PaymentEvent::PaymentDeclined {
                reason: "declined".into(),
            }),
        );
        assert_eq!(
            t.commands,
            vec![Command::CancelOrder {
                reason: CancelReason::PaymentDeclined
            }]
        );
        assert_eq!(t.deadline, Deadline::Clear);
        let t = when(&mut saga, cancelled(CancelReason::PaymentDeclined));
        // Declined needs no void.
        assert_eq!(t.commands, vec![release_cmd("A"), release_cmd("B")]);
    }

    #[test]
    fn an_unanswered_payment_times_out_releases_the_stock_and_voids_the_request() {
        let mut saga = given(reserved_both());
        let t = when(&mut saga, Input::PaymentDeadlinePassed);
        assert_eq!(
            t.commands,
            vec![Command::CancelOrder {
                reason: CancelReason::PaymentTimeout
            }]
        );
        let t = when(&mut saga, cancelled(CancelReason::PaymentTimeout));
        assert_eq!(
            t.commands,
            vec![release_cmd("A"), release_cmd("B"), Command::VoidPayment]
        );
    }

    #[test]
    fn a_deadline_after_the_payment_answered_does_nothing() {
        let mut saga = given({
            let mut inputs = reserved_both();
            inputs.push(authorized());
            inputs
        });
        let t = when(&mut saga, Input::PaymentDeadlinePassed);
        assert!(t.commands.is_empty());
    }

    #[test]
    fn a_customer_cancel_after_confirmation_releases_voids_and_cancels_the_shipment() {
        let mut saga = given(up_to_confirmed());
        let t = when(&mut saga, cancelled(CancelReason::CustomerRequest));
        assert_eq!(
            t.commands,
            vec![
                release_cmd("A"),
                release_cmd("B"),
                Command::VoidPayment,
                Command::CancelShipment
            ]
        );
        assert_eq!(
            t.outcome,
            Some(Outcome::Cancelled(CancelReason::CustomerRequest))
        );
    }

    #[test]
    fn dispatch_commits_the_stock_captures_the_payment_and_dispatches() {
        let mut saga = given(up_to_confirmed());
        let t = when(&mut saga, Input::Order(OrderEvent::OrderShipped {}));
        assert_eq!(
            t.commands,
            vec![
                Command::CommitStock { sku: sku("A") },
                Command::CommitStock { sku: sku("B") },
                Command::CapturePayment,
                Command::DispatchShipment,
            ]
        );
        let t = when(&mut saga, Input::Order(OrderEvent::OrderDelivered {}));
        assert_eq!(t.commands, vec![Command::DeliverShipment]);
        assert_eq!(t.outcome, Some(Outcome::Delivered));
        assert!(saga.is_finished());
    }

    #[test]
    fn late_answers_for_a_cancelled_order_are_undone() {
        let mut saga = given(vec![
            placed("tok_ok"),
            cancelled(CancelReason::CustomerRequest),
        ]);
        assert_eq!(
            when(&mut saga, reserved("A", 3)).commands,
            vec![release_cmd("A")]
        );
        assert_eq!(
            when(&mut saga, authorized()).commands,
            vec![Command::VoidPayment]
        );
        assert_eq!(
            when(
                &mut saga,
                Input::Shipment(ShipmentEvent::ShipmentCreated {})
            )
            .commands,
            vec![Command::CancelShipment]
        );
    }

    #[test]
    fn a_redelivered_event_changes_nothing() {
        let mut saga = given(reserved_both());
        let before = saga.clone();
        let t = when(&mut saga, reserved("B", 1));
        assert!(t.commands.is_empty());
        assert_eq!(saga, before);
    }

    fn released(s: &str) -> Input {
        Input::Inventory {
            sku: sku(s),
            event: InventoryEvent::StockReleased {
                order_id: ORDER,
                quantity: 1,
                on_hand: 10,
                reserved: 0,
            },
        }
    }

    #[test]
    fn a_delivered_saga_is_settled_and_one_in_progress_is_not() {
        let mut inputs = up_to_confirmed();
        assert!(!given(inputs.clone()).is_settled());
        inputs.push(Input::Order(OrderEvent::OrderShipped {}));
        assert!(!given(inputs.clone()).is_settled());
        inputs.push(Input::Order(OrderEvent::OrderDelivered {}));
        assert!(given(inputs).is_settled());
    }

    #[test]
    fn a_cancelled_saga_is_settled_only_once_every_reservation_is_answered_and_released() {
        // Cancelled while B's reservation is still on its way.
        let mut saga = given(vec![
            placed("tok_ok"),
            reserved("A", 3),
            cancelled(CancelReason::CustomerRequest),
        ]);
        assert!(!saga.is_settled(), "A is held, B unanswered");
        when(&mut saga, released("A"));
        assert!(
            !saga.is_settled(),
            "B unanswered: its late reservation must be undone"
        );
        // The late reservation is answered with its release; nothing more to wait for
        // (the release's own answer asks nothing of the saga).
        let late = when(&mut saga, reserved("B", 1));
        assert_eq!(late.commands, vec![release_cmd("B")]);
        assert!(saga.is_settled());
        when(&mut saga, released("B"));
        assert!(saga.is_settled());
        // Refused stock is an answer too.
        let refused = given(vec![placed("tok_ok"), reserved("A", 3), rejected("B")]);
        let mut saga = refused;
        when(&mut saga, cancelled(CancelReason::OutOfStock));
        when(&mut saga, released("A"));
        assert!(saga.is_settled());
    }

    #[test]
    fn a_cancelled_saga_with_a_payment_or_shipment_outstanding_is_not_settled() {
        // Cancelled while the payment was asked for: its answer is still to come.
        let mut saga = given(vec![
            placed("tok_ok"),
            reserved("A", 3),
            reserved("B", 1),
            requested(),
            cancelled(CancelReason::PaymentTimeout),
            released("A"),
            released("B"),
        ]);
        assert!(!saga.is_settled());
        when(&mut saga, authorized());
        assert!(!saga.is_settled(), "authorized, the void still to come");
        when(
            &mut saga,
            Input::Payment(PaymentEvent::PaymentVoided {
                amount_cents: Money::from_cents(400),
            }),
        );
        assert!(saga.is_settled());

        // Cancelled after the shipment was asked for, before it was created.
        let mut saga = given(vec![
            placed("tok_ok"),
            reserved("A", 3),
            reserved("B", 1),
            authorized(),
            cancelled(CancelReason::CustomerRequest),
            released("A"),
            released("B"),
            Input::Payment(PaymentEvent::PaymentVoided {
                amount_cents: Money::from_cents(400),
            }),
        ]);
        assert!(!saga.is_settled(), "the shipment may still be created");
        let late = when(
            &mut saga,
            Input::Shipment(ShipmentEvent::ShipmentCreated {}),
        );
        assert_eq!(late.commands, vec![Command::CancelShipment]);
        assert!(!saga.is_settled());
        when(
            &mut saga,
            Input::Shipment(ShipmentEvent::ShipmentCancelled {}),
        );
        assert!(saga.is_settled());
    }

    #[test]
    fn a_state_stored_before_answers_were_kept_reads_and_is_never_settled() {
        let mut saga = given(vec![
            placed("tok_ok"),
            reserved("A", 3),
            rejected("B"),
            cancelled(CancelReason::OutOfStock),
            released("A"),
        ]);
        assert!(saga.is_settled());
        let mut stored = serde_json::to_value(&saga).expect("state");
        if let Some(fields) = stored.as_object_mut() {
            for field in ["answered", "shipment_requested", "shipment_answered"] {
                fields.remove(field);
            }
        }
        saga = serde_json::from_value(stored).expect("an older state reads");
        assert!(!saga.is_settled());
    }

    fn any_input() -> impl Strategy<Value = Input> {
        prop_oneof![
            Just(reserved("A", 3)),
            Just(reserved("B", 1)),
            Just(rejected("A")),
            Just(rejected("B")),
            Just(authorized()),
            Just(Input::Payment(PaymentEvent::PaymentDeclined {
                reason: "no".into()
            })),
            Just(Input::Shipment(ShipmentEvent::ShipmentCreated {})),
            Just(Input::Order(OrderEvent::OrderConfirmed {})),
            Just(Input::Order(OrderEvent::OrderShipped {})),
            Just(cancelled(CancelReason::CustomerRequest)),
            Just(Input::PaymentDeadlinePassed),
        ]
    }

    proptest! {
        /// Whatever order the answers come in, a cancelled saga has asked to release
        /// every reservation it heard of, and never commits stock or captures payment.
        #[test]
        fn a_cancelled_saga_leaves_no_stock_held_and_no_money_taken(
            inputs in proptest::collection::vec(any_input(), 0..30)
        ) {
            let mut saga = given(vec![placed("tok_ok")]);
            let mut held: BTreeSet<Sku> = BTreeSet::new();
            let mut seen: BTreeSet<Sku> = BTreeSet::new();
            let mut cancelled_at: Option<usize> = None;
            let mut all = inputs.clone();
            all.push(cancelled(CancelReason::CustomerRequest));
            for (i, input) in all.iter().enumerate() {
                let was_cancelled = saga.stage == Stage::Cancelled;
                let t = when(&mut saga, input.clone());
                // A second StockReserved for the same sku is a redelivery of the first.
                if let Input::Inventory { sku, event: InventoryEvent::StockReserved { .. } } = input {
                    if seen.insert(sku.clone()) {
                        held.insert(sku.clone());
                    }
                }
                for command in &t.commands {
                    if let Command::ReleaseStock { sku } = command {
                        held.remove(sku);
                    }
                    if was_cancelled || saga.stage == Stage::Cancelled {
                        let takes = matches!(command, Command::CapturePayment)
                            || matches!(command, Command::CommitStock { .. });
                        prop_assert!(!takes, "a cancelled saga took stock or money: {:?}", command);
                    }
                }
                if saga.stage == Stage::Cancelled && cancelled_at.is_none() {
                    cancelled_at = Some(i);
                }
            }
            if saga.stage == Stage::Cancelled {
                prop_assert!(held.is_empty(), "still held: {:?}", held);
            }
        }
    }
}
