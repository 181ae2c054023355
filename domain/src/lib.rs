//! The pure core of Orderline: value types, the aggregates (order, inventory item,
//! payment, shipment; customer and session; product; cart) and the order fulfilment
//! saga.
//!
//! Nothing here does I/O, reads a clock or draws randomness: times and ids arrive as
//! inputs. Every aggregate follows the same shape ([`Aggregate`]): `decide` holds every
//! rule and turns a command into events or a [`DomainError`]; `apply` folds an event
//! into state and cannot fail. The saga ([`saga::Fulfilment`]) is a transition function
//! from (state, input) to (new state, commands, deadline change).

pub mod cart;
pub mod customer;
pub mod inventory;
pub mod order;
pub mod payment;
pub mod product;
pub mod saga;
pub mod shipment;
pub mod values;

pub use values::{CancelReason, CustomerId, Email, Money, PaymentToken, Quantity, Sku, ValueError};

/// A rule of the domain refused a command. Each variant maps to one HTTP status at the
/// edge: `NotFound` 404, `Conflict` 409, `Invalid` 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

impl DomainError {
    pub fn conflict(message: impl Into<String>) -> Self {
        DomainError::Conflict(message.into())
    }
}

/// An event-sourced aggregate: state rebuilt by folding its events.
pub trait Aggregate: Default {
    /// The aggregate type; also the topic's middle name (`orderline.<TYPE>.events`).
    const TYPE: &'static str;
    type Command;
    type Event;

    /// Every rule: the events a command causes in the current state, or why not.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, DomainError>;

    /// Fold one event into the state. Holds no rules and cannot fail.
    fn apply(&mut self, event: &Self::Event);

    /// Rebuild state from a stream of events.
    fn from_events<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        let mut state = Self::default();
        for event in events {
            state.apply(event);
        }
        state
    }
}

/// The name an event travels under (`OrderPlaced`, ...).
pub trait EventName {
    fn name(&self) -> &'static str;
}

#[cfg(test)]
pub(crate) mod testing {
    use super::{Aggregate, DomainError};
    use std::fmt::Debug;

    /// given(events).when(command).then(expected)
    pub struct Given<A: Aggregate>(A);

    pub fn given<A: Aggregate>(events: Vec<A::Event>) -> Given<A> {
        Given(A::from_events(events.iter()))
    }

    impl<A: Aggregate> Given<A>
    where
        A::Event: Debug + PartialEq,
    {
        pub fn when(self, command: A::Command) -> Result<Vec<A::Event>, DomainError> {
            self.0.decide(&command)
        }
    }
}
