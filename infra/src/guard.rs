//! Per-stream version guards: the last version a consumer applied of each stream, in
//! a table of the consumer's database. An event at or below it was applied already (a
//! redelivery) and is skipped, so effects are exactly-once. One batch costs two
//! statements, whatever its size: read the guards of its streams, then move them.

use crate::db::Dialect;
use schemas::RecordedEvent;
use sqlx::{AnyConnection, Row};
use std::collections::HashMap;

/// How many streams one statement names at most.
const CHUNK: usize = 300;

/// Which of `events` (in log order) are delivered for the first time, moving the
/// guards in `table` past them, in the caller's transaction. A guard moves past an
/// event that then fails to apply too: a later event of its stream still applies.
pub async fn first_deliveries(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    events: &[RecordedEvent],
) -> Result<Vec<bool>, sqlx::Error> {
    let deliveries = deliveries(events);
    let keys = streams_of(&deliveries);
    let mut found: HashMap<(String, String), i64> = HashMap::new();
    for chunk in keys.chunks(CHUNK) {
        found.extend(stored(conn, dialect, table, chunk).await?);
    }
    let (fresh, moved) = decide(&deliveries, &keys, &found);
    for chunk in moved.chunks(CHUNK) {
        advance(conn, dialect, table, chunk).await?;
    }
    Ok(fresh)
}

/// The same on an SQLite file's own connection ([`crate::local::LocalWriter`]), for
/// the [`deliveries`] of a batch. Each guard is read and moved by a statement of its
/// own, prepared once: on the calling thread that costs less than taking a batch's
/// keys apart from JSON.
pub fn first_deliveries_local(
    conn: &rusqlite::Connection,
    table: &str,
    deliveries: &[Delivery],
) -> Result<Vec<bool>, rusqlite::Error> {
    let keys = streams_of(deliveries);
    let mut found: HashMap<(String, String), i64> = HashMap::new();
    let mut read = conn.prepare_cached(&format!(
        "SELECT version FROM {table} WHERE aggregate_type = ?1 AND aggregate_id = ?2"
    ))?;
    for (aggregate_type, aggregate_id) in &keys {
        let mut rows = read.query((aggregate_type, aggregate_id))?;
        if let Some(row) = rows.next()? {
            let version: i64 = row.get(0)?;
            found.insert(
                ((*aggregate_type).to_owned(), (*aggregate_id).to_owned()),
                version,
            );
        }
    }
    let (fresh, moved) = decide(deliveries, &keys, &found);
    let mut write = conn.prepare_cached(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, version) VALUES (?1, ?2, ?3)
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version
         WHERE {table}.version < excluded.version"
    ))?;
    for ((aggregate_type, aggregate_id), version) in moved {
        write.execute((aggregate_type, aggregate_id, version))?;
    }
    Ok(fresh)
}

/// An event as its guard sees it: its stream (aggregate type and id) and version.
pub type Delivery = (String, String, i64);

/// The deliveries of `events`, in log order.
pub fn deliveries(events: &[RecordedEvent]) -> Vec<Delivery> {
    events
        .iter()
        .map(|event| {
            let envelope = &event.envelope;
            (
                envelope.aggregate_type.clone(),
                envelope.aggregate_id.clone(),
                envelope.version,
            )
        })
        .collect()
}

/// A stream's guard: (aggregate type, aggregate id) and the last version applied.
type Guard<'a> = ((&'a str, &'a str), i64);

/// The distinct streams of `deliveries`.
fn streams_of(deliveries: &[Delivery]) -> Vec<(&str, &str)> {
    let mut keys: Vec<(&str, &str)> = deliveries
        .iter()
        .map(|(aggregate_type, aggregate_id, _)| (aggregate_type.as_str(), aggregate_id.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Which deliveries (in log order) are first ones given the `found` guards of
/// `keys`, and the guards that move.
fn decide<'a>(
    deliveries: &'a [Delivery],
    keys: &[(&'a str, &'a str)],
    found: &HashMap<(String, String), i64>,
) -> (Vec<bool>, Vec<Guard<'a>>) {
    let mut streams: HashMap<(&str, &str), i64> = keys
        .iter()
        .map(|key| {
            let stored = found
                .get(&(key.0.to_owned(), key.1.to_owned()))
                .copied()
                .unwrap_or(0);
            (*key, stored)
        })
        .collect();
    let before = streams.clone();
    let fresh = deliveries
        .iter()
        .map(|(aggregate_type, aggregate_id, version)| {
            match streams.get_mut(&(aggregate_type.as_str(), aggregate_id.as_str())) {
                Some(applied) if *applied < *version => {
                    *applied = *version;
                    true
                }
                _ => false,
            }
        })
        .collect();
    let moved = streams
        .into_iter()
        .filter(|(key, version)| before.get(key) != Some(version))
        .collect();
    (fresh, moved)
}

/// The stored guards of `keys` (those that have one).
async fn stored(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    keys: &[(&str, &str)],
) -> Result<Vec<((String, String), i64)>, sqlx::Error> {
    let mut types: Vec<&str> = keys.iter().map(|(t, _)| *t).collect();
    types.sort_unstable();
    types.dedup();
    let ids: Vec<&str> = keys.iter().map(|(_, id)| *id).collect();
    let list = |values: &[&str]| serde_json::to_string(values).unwrap_or_else(|_| "[]".into());
    let rows = sqlx::query(&format!(
        "SELECT aggregate_type, aggregate_id, version FROM {table}
          WHERE {} AND {}",
        dialect.in_text_list("aggregate_type", "$1"),
        dialect.in_text_list("aggregate_id", "$2"),
    ))
    // Planned anew each time on PostgreSQL (once per batch): a plan prepared while
    // the table was small could scan it whole for good (see `stream_heads`).
    .persistent(dialect == Dialect::Sqlite)
    .bind(list(&types))
    .bind(list(&ids))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                (row.try_get("aggregate_type")?, row.try_get("aggregate_id")?),
                row.try_get("version")?,
            ))
        })
        .collect()
}

/// Move the guard of `event`'s stream up to its version (never back), in the
/// caller's transaction: a retried dead letter counts as applied.
pub async fn advance_to(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    event: &RecordedEvent,
) -> Result<(), sqlx::Error> {
    let envelope = &event.envelope;
    let stream = (
        envelope.aggregate_type.as_str(),
        envelope.aggregate_id.as_str(),
    );
    advance(conn, dialect, table, &[(stream, envelope.version)]).await
}

/// Move the guards of distinct streams forward (never back), in one statement.
async fn advance(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    moved: &[Guard<'_>],
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, version)
         SELECT k.value ->> 0, k.value ->> 1, CAST(k.value ->> 2 AS BIGINT)
           FROM {} WHERE true ORDER BY k.key
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version
         WHERE {table}.version < excluded.version",
        dialect.json_rows("$1")
    );
    let rows: Vec<serde_json::Value> = moved
        .iter()
        .map(|((aggregate_type, aggregate_id), version)| {
            serde_json::json!([aggregate_type, aggregate_id, version])
        })
        .collect();
    sqlx::query(&sql)
        .bind(serde_json::Value::Array(rows).to_string())
        .execute(conn)
        .await
        .map(|_| ())
}
