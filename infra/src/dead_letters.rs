//! Events a consumer could not apply, with the error, for an operator to inspect and
//! retry. The consumer records one and goes on.

use crate::{parse_timestamp, timestamp, InfraError};
use schemas::http::DeadLetterView;
use schemas::RecordedEvent;
use sqlx::{AnyConnection, AnyPool, Row};

pub async fn record(
    conn: &mut AnyConnection,
    consumer: &str,
    event: &RecordedEvent,
    error: &str,
) -> Result<(), sqlx::Error> {
    let json =
        serde_json::to_string(event).unwrap_or_else(|e| format!("{{\"unserializable\":\"{e}\"}}"));
    sqlx::query(
        "INSERT INTO dead_letters (consumer, position, event, error, failed_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(consumer)
    .bind(event.position)
    .bind(json)
    .bind(error)
    .bind(timestamp(chrono::Utc::now()))
    .execute(conn)
    .await
    .map(|_| ())
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
    sqlx::query(
        "INSERT INTO dead_letters (consumer, position, event, error, failed_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(consumer)
    .bind(position)
    .bind(raw.to_string())
    .bind(error)
    .bind(timestamp(chrono::Utc::now()))
    .execute(conn)
    .await
    .map(|_| ())
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
    Ok(DeadLetterView {
        id: format!("{service}:{id}"),
        consumer: row.try_get("consumer")?,
        position: row.try_get("position")?,
        event,
        error: row.try_get("error")?,
        failed_at: parse_timestamp(row.try_get("failed_at")?)?,
    })
}

/// Every dead letter in one service's database, oldest first.
pub async fn list(pool: &AnyPool, service: &str) -> Result<Vec<DeadLetterView>, InfraError> {
    let rows = sqlx::query("SELECT * FROM dead_letters ORDER BY id")
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
    let row = sqlx::query("SELECT consumer, event FROM dead_letters WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
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
