//! What travels between the parts of Orderline and its clients: the event envelope,
//! the versioned wire form of every event (with upcasters for old versions), topic
//! names, and the HTTP request and response bodies.
//!
//! `events` turns domain events into (event type, schema version, JSON payload) and
//! back; one JSON Schema per event type and version is checked in under
//! `schemas/events/`, and the tests hold the code to them.

pub mod commands;
pub mod envelope;
pub mod events;
pub mod http;
pub mod topics;

pub use envelope::{Envelope, RecordedEvent};
pub use events::{decode, encode, AnyEvent, SchemaError};
