//! The read side's writers: projections (pure mappings from an event to row changes
//! in a service's database), the runner that applies them with their checkpoint in
//! one transaction, rebuilds (online into shadow tables then an atomic swap, or
//! offline from the command line), dead letters, and the operator routes over them.
//!
//! - [`projection`]: the four projections and their tables.
//! - [`runner`]: follow the log; skip redelivered events by a per-aggregate version
//!   guard; dead-letter what cannot be applied and go on.
//! - [`rebuild`]: replay a projection's topics from the start into shadow tables,
//!   then swap them in while the live runner is paused for the last few events.
//! - [`admin`]: `/v1/projections`, rebuild, and `/v1/dead-letters`.

pub mod admin;
pub mod projection;
pub mod rebuild;
pub mod runner;

pub use projection::Projection;
pub use runner::{ProjectionHandle, Projections};
