//! command-handlers
