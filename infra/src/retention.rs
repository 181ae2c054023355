//! Retention: what is kept only for a while. Events are never removed; what goes is
//! bookkeeping that has served its purpose:
//!
//! - idempotency records of clients' keys (`Idempotency-Key`) older than
//!   [`Retention::idempotency`]: a retry later than that is a new request;
//! - idempotency records of the saga's commands older than [`Retention::sagas`]
//!   (a command is redelivered within moments of being sent, or not at all);
//! - snapshots that no longer read as their aggregate's state (its shape changed):
//!   every load passes over them; the stream's next multiple of the snapshot interval
//!   writes a new one;
//! - the state of finished sagas (`command-handlers::saga`), by the saga's own
//!   runner, which is their only writer.
//!
//! Each kind goes in small batches, each its own transaction, so a pass never holds
//! the database's writers up for long; `orderline_pruned_total{kind}` counts the rows.

use crate::event_store::EventStore;
use crate::metrics::PRUNED;
use crate::{timestamp, InfraError};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// How long each kind of bookkeeping is kept; `None` keeps it for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Clients' idempotency records (`ORDERLINE_IDEMPOTENCY_RETENTION_SECS`, 24 h).
    pub idempotency: Option<Duration>,
    /// Finished sagas' state and the idempotency records of the saga's commands
    /// (`ORDERLINE_SAGA_RETENTION_SECS`, 7 days).
    pub sagas: Option<Duration>,
    /// How often a pass runs (`ORDERLINE_RETENTION_INTERVAL_SECS`, 10 min).
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            idempotency: Some(Duration::from_secs(24 * 3600)),
            sagas: Some(Duration::from_secs(7 * 24 * 3600)),
            interval: Duration::from_secs(600),
        }
    }
}

/// Rows removed per transaction.
pub const BATCH: i64 = 500;

/// `now - age` (`None` for a retention longer than time itself).
pub fn cutoff(now: DateTime<Utc>, age: Duration) -> Option<DateTime<Utc>> {
    now.checked_sub_signed(chrono::Duration::from_std(age).ok()?)
}

/// One pass over the event store's database: idempotency records past their
/// retention, and snapshots `readable` refuses (given the aggregate type and the
/// state). Returns the rows removed.
pub async fn prune_store(
    store: &EventStore,
    retention: &Retention,
    now: DateTime<Utc>,
    readable: &(dyn Fn(&str, &serde_json::Value) -> bool + Sync),
) -> Result<u64, InfraError> {
    let mut removed = 0;
    for (prefix, age, kind) in [
        ("http", retention.idempotency, "idempotency"),
        ("cmd:", retention.sagas, "command"),
    ] {
        let Some(before) = age.and_then(|age| cutoff(now, age)) else {
            continue;
        };
        let n = prune_idempotency(store, prefix, &timestamp(before)).await?;
        store.metrics().add(&PRUNED, &[("kind", kind)], n);
        removed += n;
    }
    let n = prune_snapshots(store, readable).await?;
    store.metrics().add(&PRUNED, &[("kind", "snapshot")], n);
    Ok(removed + n)
}

async fn prune_idempotency(
    store: &EventStore,
    prefix: &str,
    before: &str,
) -> Result<u64, InfraError> {
    let mut removed = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM idempotency WHERE key IN (
                SELECT key FROM idempotency
                WHERE substr(key, 1, 4) = $1 AND created_at < $2
                LIMIT $3)",
        )
        .bind(prefix)
        .bind(before)
        .bind(BATCH)
        .execute(&store.db().pool)
        .await?
        .rows_affected();
        removed += n;
        if n < BATCH as u64 {
            return Ok(removed);
        }
    }
}

async fn prune_snapshots(
    store: &EventStore,
    readable: &(dyn Fn(&str, &serde_json::Value) -> bool + Sync),
) -> Result<u64, InfraError> {
    let pool = &store.db().pool;
    let mut removed = 0;
    let mut after = (String::new(), String::new());
    loop {
        let page: Vec<(String, String, i64, String)> = sqlx::query_as(
            "SELECT aggregate_type, aggregate_id, version, state FROM snapshots
             WHERE aggregate_type > $1 OR (aggregate_type = $1 AND aggregate_id > $2)
             ORDER BY aggregate_type, aggregate_id LIMIT $3",
        )
        .bind(&after.0)
        .bind(&after.1)
        .bind(BATCH)
        .fetch_all(pool)
        .await?;
        let Some((last_type, last_id, _, _)) = page.last() else {
            return Ok(removed);
        };
        after = (last_type.clone(), last_id.clone());
        let full = page.len() as i64 == BATCH;
        for (aggregate_type, aggregate_id, version, state) in page {
            let reads =
                serde_json::from_str(&state).is_ok_and(|state| readable(&aggregate_type, &state));
            if reads {
                continue;
            }
            // Only the snapshot seen: one written since (readable) stays.
            removed += sqlx::query(
                "DELETE FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2 AND version = $3",
            )
            .bind(&aggregate_type)
            .bind(&aggregate_id)
            .bind(version)
            .execute(pool)
            .await?
            .rows_affected();
        }
        if !full {
            return Ok(removed);
        }
    }
}
