//! The `append` benchmark: durable appends through the command path in process (no
//! HTTP): each command a restock of a new SKU, decided and appended through the
//! event store's group commit on a SQLite file with `synchronous=FULL`, by 1, 16 and
//! 256 concurrent callers. Reported: events per second and events per commit.
//!
//! The baseline, in the same run: raw SQLite (rusqlite, no async runtime, no
//! channel) inserting rows of the same size, with the same stream ids, into a table
//! of the same shape with the same durability: one transaction per row at
//! concurrency 1, one per batch of as many rows as there are callers otherwise. A
//! row sets concurrency 256 against one commit per row (the goal: ten times that),
//! one sets the raw batches against the same (what the disk allows that goal), and
//! one sets ours against the baseline of earlier runs, whose stream ids came in order.
//!
//! `cargo bench --bench append -- --quick` runs 3 s per variant; without `--quick`,
//! 10 s. `-- --quick c=256` runs one concurrency alone.

mod support;

use command_handlers::app::Meta;
use command_handlers::Handlers;
use domain::inventory::{InventoryCommand, InventoryItem};
use domain::Quantity;
use infra::metrics::Metrics;
use infra::EventStore;
use std::time::{Duration, Instant};
use support::{report, Row};

const CONCURRENCY: [usize; 3] = [1, 16, 256];

fn main() -> anyhow::Result<()> {
    let quick = support::quick();
    let seconds = Duration::from_secs(if quick { 3 } else { 10 });
    let runtime = support::runtime()?;
    let mut rows = vec![];
    let mut one_commit_per_row = None;
    let (mut ours_curve, mut raw_curve) = (vec![], vec![]);
    for callers in CONCURRENCY {
        if !support::selected(&format!("c={callers}")) {
            continue;
        }
        eprintln!(
            "append: {callers} callers, {} s each for ours and the baseline ...",
            seconds.as_secs()
        );
        let (events, per_commit) = runtime.block_on(ours(callers, seconds))?;
        let raw = raw_sqlite(callers, seconds, Keys::Callers)?;
        if callers == 1 {
            one_commit_per_row = Some(raw);
        }
        ours_curve.push((callers as f64, events));
        raw_curve.push((callers as f64, raw));
        rows.push(Row {
            scenario: "append",
            metric: format!("c={callers}"),
            ours: events,
            baseline: Some(raw),
            unit: "events/s",
        });
        rows.push(Row {
            scenario: "append",
            metric: format!("c={callers} events per commit"),
            ours: per_commit,
            baseline: None,
            unit: "events",
        });
        if callers == 256 {
            if one_commit_per_row.is_none() {
                // Run without concurrency 1: its baseline is measured for these rows.
                one_commit_per_row = Some(raw_sqlite(1, seconds, Keys::Callers)?);
            }
            rows.push(Row {
                scenario: "append",
                metric: "c=256 vs one commit per row".into(),
                ours: events,
                baseline: one_commit_per_row,
                unit: "events/s",
            });
            // What the goal above asks of the disk: raw SQLite's own batches against
            // its one commit per row (ours cannot beat its own baseline's batches).
            rows.push(Row {
                scenario: "append",
                metric: "c=256 raw batched vs one commit per row (the ceiling)".into(),
                ours: raw,
                baseline: one_commit_per_row,
                unit: "events/s",
            });
            // The baseline of earlier runs, for comparison: the same rows with their
            // stream ids in the order written, which the stream index takes at one end.
            rows.push(Row {
                scenario: "append",
                metric: "c=256 vs raw with sequential stream ids".into(),
                ours: events,
                baseline: Some(raw_sqlite(callers, seconds, Keys::Sequential)?),
                unit: "events/s",
            });
        }
    }
    support::plot::lines_log_x(
        "append_throughput.png",
        "append: durable appends by concurrency (synchronous=FULL)",
        "concurrent callers",
        "events/s",
        &[
            support::plot::Series {
                label: "ours (command path, group commit)".into(),
                points: ours_curve,
            },
            support::plot::Series {
                label: "raw SQLite (one transaction per batch)".into(),
                points: raw_curve,
            },
        ],
    );
    report("append", &rows)
}

/// Restocks of new SKUs by `callers` tasks for `time`: (events/s, events per commit).
async fn ours(callers: usize, time: Duration) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let store = EventStore::open(&dir.path().join("events.db")).await?;
    let handlers = Handlers::new(store.clone(), Metrics::default());
    let restock = InventoryCommand::Restock {
        quantity: Quantity::new(5)?,
    };
    let commits_before = store.commits();
    let start = Instant::now();
    let deadline = start + time;
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let (handlers, restock) = (handlers.clone(), restock.clone());
        tasks.spawn(async move {
            let mut events = 0u64;
            while Instant::now() < deadline {
                let sku = format!("A-{caller}-{events}");
                handlers
                    .execute::<InventoryItem>(&sku, &restock, &Meta::fresh())
                    .await?;
                events += 1;
            }
            anyhow::Ok(events)
        });
    }
    let mut events = 0;
    while let Some(done) = tasks.join_next().await {
        events += done??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let commits = (store.commits() - commits_before).max(1);
    Ok((events as f64 / elapsed, events as f64 / commits as f64))
}

/// The stream ids the raw baseline writes.
#[derive(Clone, Copy)]
enum Keys {
    /// The ones ours writes: row `i` of a batch is caller `i`'s next SKU
    /// (`A-{caller}-{n}`), so each batch inserts into as many places of the stream
    /// index as there are callers.
    Callers,
    /// `A-{row}`, in the order written: each batch inserts into one end of the index.
    Sequential,
}

/// Raw SQLite: rows of the same shape and size, `batch` per transaction, with the
/// event store's durability settings: rows/s.
fn raw_sqlite(batch: usize, time: Duration, keys: Keys) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut conn = rusqlite::Connection::open(dir.path().join("raw.db"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE events (
            position INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE,
            aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, version BIGINT NOT NULL,
            event_type TEXT NOT NULL, schema_version BIGINT NOT NULL, occurred_at TEXT NOT NULL,
            correlation_id TEXT NOT NULL, causation_id TEXT NOT NULL, payload TEXT NOT NULL,
            UNIQUE (aggregate_type, aggregate_id, version));
         CREATE INDEX events_by_type ON events (aggregate_type, position);",
    )?;
    let payload = r#"{"quantity":5,"on_hand":5,"reserved":0}"#;
    let start = Instant::now();
    let (mut rows, mut round) = (0u64, 0u64);
    while start.elapsed() < time {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type,
                    schema_version, occurred_at, correlation_id, causation_id, payload)
                 VALUES (?1, 'inventory', ?2, 1, 'StockRestocked', 1, ?3, ?4, ?4, ?5)",
            )?;
            for caller in 0..batch {
                let id = uuid::Uuid::now_v7().to_string();
                let sku = match keys {
                    Keys::Callers => format!("A-{caller}-{round}"),
                    Keys::Sequential => format!("A-{rows}"),
                };
                insert.execute(rusqlite::params![
                    id,
                    sku,
                    infra::timestamp(chrono::Utc::now()),
                    id,
                    payload
                ])?;
                rows += 1;
            }
        }
        tx.commit()?;
        round += 1;
    }
    Ok(rows as f64 / start.elapsed().as_secs_f64())
}
