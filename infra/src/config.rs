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
    /// A PostgreSQL server (`postgres://user@host:port`) to keep the log and each
    /// service's database on, instead of SQLite files (`ORDERLINE_POSTGRES_URL`).
    pub postgres: Option<String>,
    /// The first part of every PostgreSQL database name (`ORDERLINE_DATABASE_PREFIX`,
    /// `orderline`): `<prefix>_events`, `<prefix>_order`, ...
    pub database_prefix: String,
    /// The brokers and topics of the distributed deployment.
    pub kafka: Option<crate::kafka::KafkaConfig>,
    /// The most orders in progress (accepted, not yet confirmed or cancelled) before
    /// new ones are refused with 503 (`ORDERLINE_MAX_BACKLOG`, 1000; 0: no bound).
    pub max_backlog: u64,
    /// How long a refusal for overload is held before it is answered
    /// (`ORDERLINE_REFUSAL_DELAY_MS`, 100 ms).
    pub refusal_delay: Duration,
    /// The HTTP edge's connection, concurrency and time limits.
    pub limits: crate::serve::Limits,
    /// How long bookkeeping (idempotency records, finished sagas) is kept.
    pub retention: crate::retention::Retention,
    /// Who may call what (`--auth`, on unless turned off), the keys, the rate limit.
    pub auth: crate::auth::AuthSettings,
    /// How the notification service sends its messages (`--notifier`).
    pub notifier: Notifier,
    /// Take commands and answer queries, but run none of the pipeline (projections,
    /// the saga, the relay, the inboxes, the notifier, retention): the door alone,
    /// as the benchmarks measure it beside the whole. Off by default, and no flag:
    /// a held process moves no order past `pending`.
    pub hold_pipeline: bool,
}

/// How notifications leave.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Notifier {
    /// JSON lines in `<data-dir>/notifications.jsonl`.
    #[default]
    File,
    /// Lines in the server's log.
    Log,
    /// Mail through the SMTP server at `url` (`smtp://host:port`), from `from`.
    Smtp { url: String, from: String },
}

impl Config {
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: data_dir.into(),
            payment_timeout: Duration::from_millis(30_000),
            postgres: None,
            database_prefix: "orderline".into(),
            kafka: None,
            max_backlog: 1_000,
            refusal_delay: Duration::from_millis(100),
            limits: crate::serve::Limits::default(),
            retention: crate::retention::Retention::default(),
            auth: crate::auth::AuthSettings::default(),
            notifier: Notifier::default(),
            hold_pipeline: false,
        }
    }

    /// The URL of one database: `events` (the log) or a service's.
    pub fn database_url(&self, name: &str) -> String {
        match &self.postgres {
            Some(server) => format!(
                "{}/{}_{name}",
                server.trim_end_matches('/'),
                self.database_prefix
            ),
            None => crate::db::sqlite_url(&self.data_dir.join(format!("{name}.db"))),
        }
    }
}
