//! The write side: application services that load an aggregate, let the domain decide,
//! and append the result ([`app::Handlers`]); the command router (axum) over them
//! ([`routes`]); the simulated payment gateway ([`gateway`]); and the runner of the
//! order fulfilment saga ([`saga`]), which stores its state, the commands it emits
//! and its checkpoint in one transaction and then dispatches those commands; the
//! customer service's registration, logins and profile ([`customers`]).

pub mod app;
pub mod cart;
pub mod customers;
pub mod gateway;
pub mod inbox;
pub mod notify;
pub mod routes;
pub mod saga;

pub use app::{CommandError, Handlers, Meta};

#[cfg(test)]
mod tests;
