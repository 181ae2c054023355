//! Events a consumer could not apply, with the error, for an operator to inspect and
//! retry. The consumer records one and goes on.

use crate::db::{Bind, Statement};
use crate::{parse_timestamp, timestamp, InfraError};
use schemas::http::DeadLetterView;
use schemas::topics::Service;
use schemas::RecordedEvent;
use sqlx::{AnyConnection, AnyPool, Row};

/// How the stored text of an error the database gave starts.
pub const DATABASE_ERROR: &str = "database: ";

/// What the API shows of a stored error: the decoder's message as it is; for an
/// error of the database (whose message names tables, constraints and values) a
/// summary. The whole text is in the server's log (logged when the event was
/// dead-lettered) and in the store.
pub fn public_error(stored: &str) -> String {
    if stored.starts_with(DATABASE_ERROR) {
        "the read model's database refused the change (the server's log has the details)".into()
    } else {
        stored.to_owned()
    }
}

pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1_000;

/// The query of `GET /v1/dead-letters`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    pub limit: Option<String>,
    pub after: Option<String>,
}

/// A page asked for: at most `limit` dead letters after `after`, in order of service
/// (as in `Service::ALL`) then number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: usize,
    pub after: Option<(usize, i64)>,
}

impl PageParams {
    pub fn page(&self) -> Result<Page, String> {
        let limit = match self.limit.as_deref() {
            None => DEFAULT_PAGE,
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=MAX_PAGE).contains(l))
                .ok_or_else(|| format!("limit must be a whole number from 1 to {MAX_PAGE}"))?,
        };
        let after = match self.after.as_deref() {
            None => None,
            Some(raw) => Some(order_of(raw).ok_or_else(|| {
                format!("after must be the id of a dead letter (<service>:<number>), not {raw:?}")
            })?),
        };
        Ok(Page { limit, after })
    }
}

/// Where a dead letter's id (`<service>:<number>`) sorts: (the service's rank, the
/// number).
pub fn order_of(id: &str) -> Option<(usize, i64)> {
    let (service, number) = parse_id(id)?;
    Some((rank(service), number))
}

/// A dead letter's id as (service, number).
pub fn parse_id(id: &str) -> Option<(Service, i64)> {
    let (service, number) = id.split_once(':')?;
    let number = number.parse().ok().filter(|n: &i64| *n > 0)?;
    Some((service.parse().ok()?, number))
}

/// A service's place in the order of pages.
pub fn rank(service: Service) -> usize {
    Service::ALL
        .iter()
        .position(|s| *s == service)
        .unwrap_or(usize::MAX)
}

pub async fn record(
    conn: &mut AnyConnection,
    consumer: &str,
    event: &RecordedEvent,
    error: &str,
) -> Result<(), sqlx::Error> {
    record_statement(consumer, event, error).execute(conn).await
}

/// [`record`] as a statement, to run on any connection.
pub fn record_statement(consumer: &str, event: &RecordedEvent, error: &str) -> Statement {
    let json =
        serde_json::to_string(event).unwrap_or_else(|e| format!("{{\"unserializable\":\"{e}\"}}"));
    insert(consumer, event.position, json, error)
}

/// Record a record that could not even be read as an event (`raw` says where it
/// was and what it held).
pub async fn record_unreadable(
    conn: &mut AnyConnection,
    consumer: &str,
    position: i64,
    raw: &serde_json::Value,
    error: &str,
) -> Result<(), sqlx::Error> {
    record_unreadable_statement(consumer, position, raw, error)
        .execute(conn)
        .await
}

/// [`record_unreadable`] as a statement, to run on any connection.
pub fn record_unreadable_statement(
    consumer: &str,
    position: i64,
    raw: &serde_json::Value,
    error: &str,
) -> Statement {
    insert(consumer, position, raw.to_string(), error)
}

fn insert(consumer: &str, position: i64, event: String, error: &str) -> Statement {
    Statement::new(
        "INSERT INTO dead_letters (consumer, position, event, error, failed_at) VALUES ($1, $2, $3, $4, $5)",
        vec![
            Bind::Text(consumer.to_owned()),
            Bind::Integer(position),
            Bind::Text(event),
            Bind::Text(error.to_owned()),
            Bind::Text(timestamp(chrono::Utc::now())),
        ],
    )
}

pub async fn count(pool: &AnyPool, consumer: &str) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters WHERE consumer = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await?;
    Ok(n.max(0) as u64)
}

fn view(service: &str, row: &sqlx::any::AnyRow) -> Result<DeadLetterView, InfraError> {
    let id: i64 = row.try_get("id")?;
    let event: String = row.try_get("event")?;
    let mut event: serde_json::Value = serde_json::from_str(&event)
        .map_err(|e| InfraError::Corrupt(format!("dead letter: {e}")))?;
    if let Some(object) = event.as_object_mut() {
        object.remove("position");
    }
    schemas::redact_secrets(&mut event);
    Ok(DeadLetterView {
        id: format!("{service}:{id}"),
        consumer: row.try_get("consumer")?,
        position: row.try_get("position")?,
        event,
        error: public_error(&row.try_get::<String, _>("error")?),
        failed_at: parse_timestamp(row.try_get("failed_at")?)?,
    })
}

/// Every dead letter in one service's database, oldest first.
pub async fn list(pool: &AnyPool, service: &str) -> Result<Vec<DeadLetterView>, InfraError> {
    list_after(pool, service, 0, i64::MAX).await
}

/// At most `limit` dead letters of one service's database numbered after `after`,
/// oldest first.
pub async fn list_after(
    pool: &AnyPool,
    service: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<DeadLetterView>, InfraError> {
    let rows = sqlx::query("SELECT * FROM dead_letters WHERE id > $1 ORDER BY id LIMIT $2")
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|row| view(service, row)).collect()
}

pub async fn set_error(pool: &AnyPool, id: i64, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE dead_letters SET error = $2, failed_at = $3 WHERE id = $1")
        .bind(id)
        .bind(error)
        .bind(timestamp(chrono::Utc::now()))
        .execute(pool)
        .await
        .map(|_| ())
}

/// One dead letter: its consumer, and the event as it was read (position included),
/// or why it is not one.
pub async fn get(
    pool: &AnyPool,
    id: i64,
) -> Result<Option<(String, Result<RecordedEvent, String>)>, InfraError> {
    let mut conn = pool.acquire().await?;
    get_in(&mut conn, id).await
}

/// [`get`], in the caller's transaction.
pub async fn get_in(
    conn: &mut AnyConnection,
    id: i64,
) -> Result<Option<(String, Result<RecordedEvent, String>)>, InfraError> {
    let row = sqlx::query("SELECT consumer, event FROM dead_letters WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let event: String = row.try_get("event")?;
            let event = serde_json::from_str::<RecordedEvent>(&event).map_err(|e| e.to_string());
            Ok(Some((row.try_get("consumer")?, event)))
        }
    }
}

pub async fn delete(conn: &mut AnyConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM dead_letters WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await
        .map(|_| ())
}
