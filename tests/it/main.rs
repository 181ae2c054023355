//! End-to-end and integration tests of Orderline on real SQLite files: the HTTP API
//! through a real server on a random port, the event store, concurrency, crashes
//! (SIGKILL of the real binary) and replays.

mod api;
mod auth;
mod cart;
mod catalog;
mod chaos;
mod cli;
mod concurrency;
mod decoders;
mod distributed;
mod durability;
mod edge;
mod event_store;
mod faults;
mod history;
mod journey;
mod kafka;
mod lifecycle;
mod notifications;
mod openapi;
mod replay;
mod retention;
mod support;
