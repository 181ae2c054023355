//! Process configuration: flags and environment, with the documented defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the HTTP server listens (`ORDERLINE_LISTEN`, default 127.0.0.1:8080).
    pub listen: SocketAddr,
    /// Where the event log and the service databases live (`ORDERLINE_DATA_DIR`, `./data`).
    pub data_dir: PathBuf,
    /// How long the saga waits for the payment gateway (`ORDERLINE_PAYMENT_TIMEOUT_MS`, 30 s).
    pub payment_timeout: Duration,
}

impl Config {
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: data_dir.into(),
            payment_timeout: Duration::from_millis(30_000),
        }
    }

    pub fn events_db(&self) -> PathBuf {
        self.data_dir.join("events.db")
    }

    pub fn service_db(&self, service: &str) -> PathBuf {
        self.data_dir.join(format!("{service}.db"))
    }
}
