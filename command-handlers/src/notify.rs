//! The notification service: a message to the customer when an order is confirmed,
//! cancelled, shipped or delivered.
//!
//! [`Notifier`] follows the order and customer events (a consumer under the one
//! driver). For each order event worth a message it records a notification whose id
//! is derived from the event's (UUIDv5), in the same transaction as its position
//! and its per-stream guards: an event read twice records nothing more. A
//! dispatcher ([`Notifier::dispatch_until`]) then sends what is recorded and not yet
//! sent, through a [`Sender`], and marks each sent; that table is also the read model
//! of what was sent (`GET /v1/notifications`).
//!
//! Between sending and marking a crash can fall: the file sender skips a notification
//! its file already holds (exactly once); the log and SMTP senders send it again with
//! the same id (SMTP: the same `Message-ID`, by which mail systems drop duplicates).

use crate::app::Handlers;
use chrono::Utc;
use domain::customer::CustomerEvent;
use domain::order::OrderEvent;
use infra::consume::{Backoff, Consumer, Failures, Handler, Source, Transport};
use infra::db::Db;
use infra::guard;
use infra::shutdown::Shutdown;
use infra::{timestamp, InfraError};
use schemas::topics::AggregateType;
use schemas::{AnyEvent, RecordedEvent};
use serde::Serialize;
use sqlx::{AnyConnection, Row};
use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use uuid::Uuid;

/// The consumer name of the notifier: its position and dead letters go under it.
pub const NAME: &str = "notifier";

/// Namespace of notification ids (UUIDv5 of the causing event's id).
const NOTIFICATION_NAMESPACE: Uuid = Uuid::from_u128(0x6e6f_7469_6669_6361_7469_6f6e_735f_6964);

/// The notifier's tables: the customer of each order, each customer's address, and
/// the notifications (recorded, then sent).
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS notify_orders (order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS notify_customers (
    customer_id TEXT PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS notifications (
    notification_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, order_id TEXT NOT NULL,
    kind TEXT NOT NULL, created_at TEXT NOT NULL, sent_at TEXT, channel TEXT);
CREATE INDEX IF NOT EXISTS notifications_by_customer
    ON notifications (customer_id, created_at, notification_id);
CREATE INDEX IF NOT EXISTS notifications_unsent ON notifications (sent_at, created_at);
CREATE TABLE IF NOT EXISTS notifier_since (at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS notifier_applied (
    aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, version BIGINT NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id));
";

/// How notifications leave (`--notifier`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// JSON lines appended to a file (`<data-dir>/notifications.jsonl`).
    File(PathBuf),
    /// One line each in the server's log.
    Log,
    /// Mail through an SMTP server (`smtp://host:port`), from `from`.
    Smtp { url: String, from: String },
}

impl Channel {
    pub fn name(&self) -> &'static str {
        match self {
            Channel::File(_) => "file",
            Channel::Log => "log",
            Channel::Smtp { .. } => "smtp",
        }
    }
}

/// A message to a customer about one of its orders.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub notification_id: Uuid,
    pub customer_id: String,
    /// The customer's address, when the customer is known (not for orders placed
    /// with auth off for a made-up customer).
    pub email: Option<String>,
    pub name: Option<String>,
    pub order_id: String,
    pub kind: String,
    pub subject: String,
    pub text: String,
}

/// Where messages go.
#[async_trait::async_trait]
pub trait Sender: Send + Sync {
    /// Send one message; `Err` leaves it to be sent again later.
    async fn send(&self, message: &Message) -> Result<(), String>;

    /// Send messages in order: how many of the first were sent (the rest are sent
    /// again later), or why none was.
    async fn send_all(&self, messages: &[Message]) -> Result<usize, String> {
        for (sent, message) in messages.iter().enumerate() {
            if let Err(error) = self.send(message).await {
                return if sent == 0 { Err(error) } else { Ok(sent) };
            }
        }
        Ok(messages.len())
    }
}

/// JSON lines appended to a file, each written out (fsync) before it counts as sent.
/// A notification the file already holds is not written again.
pub struct FileSender {
    path: PathBuf,
    written: Mutex<Option<HashSet<Uuid>>>,
}

impl FileSender {
    pub fn new(path: PathBuf) -> FileSender {
        FileSender {
            path,
            written: Mutex::new(None),
        }
    }

    /// The ids in the file (read once, then kept up to date).
    fn load(&self) -> Result<HashSet<Uuid>, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(format!("cannot read {}: {error}", self.path.display())),
        };
        Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|value| value["notification_id"].as_str()?.parse().ok())
            .collect())
    }
}

impl FileSender {
    /// Append the messages the file does not hold yet, written out once (fsync).
    fn append(&self, messages: &[Message]) -> Result<(), String> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if written.is_none() {
            *written = Some(self.load()?);
        }
        let ids = written.get_or_insert_with(HashSet::new);
        let mut lines = String::new();
        let mut new = vec![];
        for message in messages {
            if ids.contains(&message.notification_id) || new.contains(&message.notification_id) {
                continue;
            }
            lines.push_str(&serde_json::to_string(message).map_err(|e| e.to_string())?);
            lines.push('\n');
            new.push(message.notification_id);
        }
        if new.is_empty() {
            return Ok(());
        }
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
        file.write_all(lines.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        ids.extend(new);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sender for Arc<FileSender> {
    async fn send(&self, message: &Message) -> Result<(), String> {
        self.send_all(std::slice::from_ref(message))
            .await
            .map(|_| ())
    }

    /// One write and one fsync for the whole batch, on a blocking thread.
    async fn send_all(&self, messages: &[Message]) -> Result<usize, String> {
        let sender = self.clone();
        let batch = messages.to_vec();
        tokio::task::spawn_blocking(move || sender.append(&batch))
            .await
            .map_err(|e| e.to_string())??;
        Ok(messages.len())
    }
}

/// A line in the server's log.
pub struct LogSender;

#[async_trait::async_trait]
impl Sender for LogSender {
    async fn send(&self, message: &Message) -> Result<(), String> {
        tracing::info!(
            notification_id = %message.notification_id,
            customer_id = %message.customer_id,
            order_id = %message.order_id,
            kind = %message.kind,
            "notification: {}", message.subject
        );
        Ok(())
    }
}

/// Mail through an SMTP server (lettre). Plain SMTP: a relay on the host or in the
/// deployment's own network.
pub struct SmtpSender {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl SmtpSender {
    /// A sender to `smtp://host[:port]` (port 25 unless given).
    pub fn new(url: &str, from: &str) -> Result<SmtpSender, String> {
        let rest = url
            .strip_prefix("smtp://")
            .ok_or_else(|| format!("--smtp-url {url:?}: expected smtp://host[:port]"))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>()
                    .map_err(|_| format!("--smtp-url {url:?}: the port is not a number"))?,
            ),
            None => (rest, 25),
        };
        if host.is_empty() {
            return Err(format!("--smtp-url {url:?}: no host"));
        }
        let transport =
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(host)
                .port(port)
                .timeout(Some(Duration::from_secs(10)))
                .build();
        let from = from
            .parse()
            .map_err(|e| format!("--smtp-from {from:?}: {e}"))?;
        Ok(SmtpSender { transport, from })
    }
}

#[async_trait::async_trait]
impl Sender for SmtpSender {
    async fn send(&self, message: &Message) -> Result<(), String> {
        use lettre::AsyncTransport;
        let Some(email) = &message.email else {
            return Err(format!(
                "no address known for customer {} yet",
                message.customer_id
            ));
        };
        let to: lettre::message::Mailbox = email.parse().map_err(|e| format!("{email}: {e}"))?;
        let mail = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .message_id(Some(format!("<{}@orderline>", message.notification_id)))
            .subject(message.subject.clone())
            .body(message.text.clone())
            .map_err(|e| e.to_string())?;
        self.transport
            .send(mail)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The sender of a channel.
pub fn sender(channel: &Channel) -> Result<Arc<dyn Sender>, String> {
    Ok(match channel {
        Channel::File(path) => Arc::new(Arc::new(FileSender::new(path.clone()))),
        Channel::Log => Arc::new(LogSender),
        Channel::Smtp { url, from } => Arc::new(SmtpSender::new(url, from)?),
    })
}

/// What an order event tells its customer, if anything.
fn kind(event: &OrderEvent) -> Option<(&'static str, &'static str)> {
    Some(match event {
        OrderEvent::OrderConfirmed {} => ("order_confirmed", "is confirmed"),
        OrderEvent::OrderCancelled { .. } => ("order_cancelled", "was cancelled"),
        OrderEvent::OrderShipped {} => ("order_shipped", "is on its way"),
        OrderEvent::OrderDelivered {} => ("order_delivered", "was delivered"),
        OrderEvent::OrderPlaced { .. } => return None,
    })
}

pub struct Notifier {
    db: Db,
    /// When the notifier first started: what happened before is not news to send.
    since: chrono::DateTime<Utc>,
    consumer: Consumer,
    sender: Arc<dyn Sender>,
    channel: &'static str,
    recorded: Notify,
}

impl Notifier {
    /// The notifier of the notification service's database `db` (its tables made).
    pub async fn new(
        handlers: &Handlers,
        db: &Db,
        channel: &Channel,
    ) -> Result<Notifier, InfraError> {
        db.migrate(TABLES).await?;
        let since = match sqlx::query_scalar::<_, String>("SELECT at FROM notifier_since")
            .fetch_optional(&db.pool)
            .await?
        {
            Some(at) => infra::parse_timestamp(&at)?,
            None => {
                let now = Utc::now();
                sqlx::query("INSERT INTO notifier_since (at) VALUES ($1)")
                    .bind(timestamp(now))
                    .execute(&db.pool)
                    .await?;
                now
            }
        };
        Ok(Notifier {
            db: db.clone(),
            since,
            consumer: Consumer::new(NAME, db, &handlers.metrics),
            sender: sender(channel).map_err(InfraError::Config)?,
            channel: channel.name(),
            recorded: Notify::new(),
        })
    }

    /// The order and customer events, from the log or their topics.
    pub async fn source(transport: &Transport, db: &Db) -> Result<Arc<dyn Source>, InfraError> {
        transport
            .events(NAME, &[AggregateType::Order, AggregateType::Customer], db)
            .await
    }

    /// Send what is recorded and not yet sent, until `shutdown`.
    pub async fn dispatch_until(&self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::default();
        while !shutdown.is_set() {
            let pause = match self.dispatch().await {
                Ok(true) => {
                    backoff.reset();
                    continue;
                }
                Ok(false) => {
                    backoff.reset();
                    Duration::from_secs(1)
                }
                Err(error) => {
                    tracing::warn!(error = %error, "notifications not sent; trying again");
                    backoff.fail()
                }
            };
            tokio::select! {
                _ = self.recorded.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait() => {}
            }
        }
    }

    /// Send a batch of what is not yet sent, oldest first; whether a whole batch was
    /// sent (more may wait).
    async fn dispatch(&self) -> Result<bool, String> {
        const BATCH: i64 = 100;
        let rows = sqlx::query(
            "SELECT n.notification_id, n.customer_id, n.order_id, n.kind, c.email, c.name
               FROM notifications n LEFT JOIN notify_customers c ON c.customer_id = n.customer_id
              WHERE n.sent_at IS NULL ORDER BY n.created_at, n.notification_id LIMIT $1",
        )
        .bind(BATCH)
        .fetch_all(&self.db.pool)
        .await
        .map_err(|e| e.to_string())?;
        let count = rows.len();
        let messages = rows
            .iter()
            .map(message)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let sent = self.sender.send_all(&messages).await?;
        if sent > 0 {
            // What was sent is marked in one statement.
            let ids: Vec<String> = messages[..sent]
                .iter()
                .map(|m| m.notification_id.to_string())
                .collect();
            let ids = serde_json::to_string(&ids).map_err(|e| e.to_string())?;
            sqlx::query(&format!(
                "UPDATE notifications SET sent_at = $1, channel = $2
                  WHERE notification_id IN ({})",
                self.db.dialect.text_list("$3")
            ))
            .bind(timestamp(Utc::now()))
            .bind(self.channel)
            .bind(ids)
            .execute(&self.db.pool)
            .await
            .map_err(|e| e.to_string())?;
        }
        Ok(count as i64 == BATCH && sent == count)
    }
}

/// The message of a recorded notification.
fn message(row: &sqlx::any::AnyRow) -> Result<Message, sqlx::Error> {
    let id: String = row.try_get("notification_id")?;
    let order_id: String = row.try_get("order_id")?;
    let kind: String = row.try_get("kind")?;
    let name: Option<String> = row.try_get("name")?;
    let what = match kind.as_str() {
        "order_confirmed" => "is confirmed",
        "order_cancelled" => "was cancelled",
        "order_shipped" => "is on its way",
        _ => "was delivered",
    };
    let subject = format!("Your order {order_id} {what}");
    let greeting = name.as_deref().unwrap_or("there");
    Ok(Message {
        notification_id: id.parse().unwrap_or_default(),
        customer_id: row.try_get("customer_id")?,
        email: row.try_get("email")?,
        text: format!("Hello {greeting},\n\nyour order {order_id} {what}.\n"),
        name,
        order_id,
        kind,
        subject,
    })
}

impl Handler for Notifier {
    type Item = RecordedEvent;
    type Done = usize;

    fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    /// Record the notifications of the batch's fresh events (and what they need:
    /// whose each order is, each customer's address), in the consumer's transaction.
    async fn apply(
        &self,
        tx: &mut AnyConnection,
        events: &[RecordedEvent],
        failures: &mut Failures,
    ) -> Result<usize, InfraError> {
        let fresh =
            guard::first_deliveries(tx, self.db.dialect, "notifier_applied", events, None).await?;
        let mut recorded = 0;
        for (index, (recorded_event, fresh)) in events.iter().zip(fresh).enumerate() {
            if !fresh {
                continue;
            }
            let envelope = &recorded_event.envelope;
            let event = match AnyEvent::from_envelope(envelope) {
                Ok(event) => event,
                Err(error) => {
                    failures.push(index, error.to_string());
                    continue;
                }
            };
            let id = envelope.aggregate_id.as_str();
            let statement = match &event {
                AnyEvent::Order(OrderEvent::OrderPlaced { customer_id, .. }) => sqlx::query(
                    "INSERT INTO notify_orders (order_id, customer_id) VALUES ($1, $2)
                     ON CONFLICT (order_id) DO NOTHING",
                )
                .bind(id)
                .bind(customer_id.as_str()),
                AnyEvent::Order(order_event) => {
                    let Some((kind, _)) = kind(order_event) else {
                        continue;
                    };
                    // History from before the service first started is not sent.
                    if envelope.occurred_at < self.since {
                        continue;
                    }
                    recorded += 1;
                    let notification = Uuid::new_v5(&NOTIFICATION_NAMESPACE, envelope.event_id.as_bytes());
                    sqlx::query(
                        "INSERT INTO notifications (notification_id, customer_id, order_id, kind, created_at)
                         SELECT $1, o.customer_id, $2, $3, $4 FROM notify_orders o WHERE o.order_id = $2
                         ON CONFLICT (notification_id) DO NOTHING",
                    )
                    .bind(notification.to_string())
                    .bind(id)
                    .bind(kind)
                    .bind(timestamp(envelope.occurred_at))
                }
                AnyEvent::Customer(CustomerEvent::CustomerRegistered { email, name, .. }) => {
                    sqlx::query(
                        "INSERT INTO notify_customers (customer_id, email, name) VALUES ($1, $2, $3)
                         ON CONFLICT (customer_id) DO UPDATE SET email = excluded.email",
                    )
                    .bind(id)
                    .bind(email.as_str())
                    .bind(name.as_str())
                }
                AnyEvent::Customer(CustomerEvent::CustomerRenamed { name }) => sqlx::query(
                    "UPDATE notify_customers SET name = $2 WHERE customer_id = $1",
                )
                .bind(id)
                .bind(name.as_str()),
                _ => continue,
            };
            statement.execute(&mut *tx).await?;
        }
        Ok(recorded)
    }

    fn after(&self, recorded: usize, _checkpoint: i64) {
        if recorded > 0 {
            self.recorded.notify_one();
        }
    }
}
