//! The `rebuild` benchmark: replay the log into the orders read model (shadow
//! tables, then the swap), on SQLite files (`sqlite`) and on PostgreSQL
//! (`postgres`), in events per second.
//!
//! The log holds orders, each placed, confirmed, shipped and delivered (four events
//! of the order stream), written straight into the event table before the clock
//! starts. The baseline, in the same run on the same database: a raw sequential scan
//! of the same events (every column read, nothing decoded) plus a raw bulk write of
//! the rows the rebuild produced (SQLite: one prepared `INSERT OR REPLACE`, 1,000
//! rows per transaction, as the rebuild commits; PostgreSQL: `COPY`). The rebuild
//! and the baseline take turns, three rounds of each, and each figure is the median
//! of its rounds. The first rebuild's progress over time is kept for the plot.
//!
//! `cargo bench --bench rebuild -- --quick` replays 200,000 events; without
//! `--quick`, 1,000,000. A variant's name after the flags runs that one alone
//! (`-- --quick sqlite`).

mod support;

use futures_util::TryStreamExt;
use infra::db::Dialect;
use orderline::Storage;
use projectors::projection::ReadModel;
use projectors::Projection;
use sqlx::{Connection, Executor, Row as _};
use std::time::{Duration, Instant};
use support::log::{self, EVENTS_PER_ORDER};
use support::plot::Series;
use support::progress;
use support::{report, Row};

const PREFIX: &str = "orderline_bench_rebuild";
/// Rounds of the rebuild and the baseline, one after the other: each figure is the
/// median of its rounds (a machine's noise moves one round more than three).
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    let quick = support::quick();
    let events = if quick { 200_000 } else { 1_000_000 };
    let runtime = support::runtime()?;
    let mut rows = vec![];
    let mut series = vec![];
    for backend in [Backend::Sqlite, Backend::Postgres] {
        if !support::selected(backend.name()) {
            continue;
        }
        eprintln!("rebuild: {} events on {} ...", events, backend.name());
        let outcome = runtime.block_on(variant(backend, events / EVENTS_PER_ORDER))?;
        rows.push(Row {
            scenario: "rebuild",
            metric: backend.name().to_owned(),
            ours: outcome.ours,
            baseline: Some(outcome.baseline),
            unit: "events/s",
        });
        rows.push(Row {
            scenario: "rebuild",
            metric: format!("{} baseline: scan alone", backend.name()),
            ours: outcome.scan,
            baseline: None,
            unit: "events/s",
        });
        series.push(Series {
            label: backend.name().to_owned(),
            points: outcome.over_time,
        });
    }
    support::plot::lines(
        "rebuild.png",
        "rebuild: events replayed over time",
        "seconds",
        "events",
        &series,
    );
    report("rebuild", &rows)
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

struct Outcome {
    /// Our events per second.
    ours: f64,
    /// Events per second of the scan plus the bulk write.
    baseline: f64,
    /// Events per second of the scan alone.
    scan: f64,
    /// (seconds, events applied) as the rebuild went.
    over_time: Vec<(f64, f64)>,
}

async fn variant(backend: Backend, orders: usize) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let mut config = infra::Config::with_data_dir(dir.path());
    config.auth = infra::auth::AuthSettings::off();
    if backend == Backend::Postgres {
        let server = support::services::postgres()?;
        drop_databases(&server).await?;
        config.postgres = Some(server);
        config.database_prefix = PREFIX.into();
    }
    // Open once to create the tables, fill the log, then open again (as a process
    // started on that log would).
    drop(Storage::open(&config).await?);
    let events = orders * EVENTS_PER_ORDER;
    let log = config.database_url("events");
    let fill = progress::bar(events as u64, "writing the log");
    match backend {
        Backend::Sqlite => log::fill_sqlite(&dir.path().join("events.db"), orders, &fill)?,
        Backend::Postgres => log::fill_postgres(&log, orders, &fill).await?,
    }
    fill.finish_and_clear();

    let mut rounds = vec![];
    let mut over_time = vec![];
    for round in 1..=ROUNDS {
        let (took, progress) = rebuild_once(&config, events, round).await?;
        if over_time.is_empty() {
            over_time = progress;
        }
        let (scan, write) = match backend {
            Backend::Sqlite => {
                let scan = scan_sqlite(&dir.path().join("events.db"))?;
                (scan, write_sqlite(&dir.path().join("order.db"))?)
            }
            Backend::Postgres => {
                let order_db = config.database_url("order");
                (scan_postgres(&log).await?, write_postgres(&order_db).await?)
            }
        };
        let per_second = |d: Duration| events as f64 / d.as_secs_f64();
        rounds.push((per_second(took), per_second(scan + write), per_second(scan)));
    }
    let median = |pick: fn(&(f64, f64, f64)) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Ok(Outcome {
        ours: median(|r| r.0),
        baseline: median(|r| r.1),
        scan: median(|r| r.2),
        over_time,
    })
}

/// Rebuild the orders projection once, on a process's storage opened for it: how
/// long it took, and (seconds, events applied) as it went.
async fn rebuild_once(
    config: &infra::Config,
    events: usize,
    round: usize,
) -> anyhow::Result<(Duration, Vec<(f64, f64)>)> {
    let storage = Storage::open(config).await?;
    let handle = storage
        .projections
        .get(Projection::Orders)
        .ok_or_else(|| anyhow::anyhow!("no orders projection"))?;
    let bar = progress::bar(
        events as u64,
        &format!("rebuilding orders ({round} of {ROUNDS})"),
    );
    let mut over_time = vec![(0.0, 0.0)];
    let start = Instant::now();
    let applied = projectors::rebuild::rebuild(&storage.projections, handle, |p| {
        bar.set_position(p.processed);
        over_time.push((start.elapsed().as_secs_f64(), p.processed as f64));
    })
    .await?;
    let took = start.elapsed();
    bar.finish_and_clear();
    anyhow::ensure!(
        applied as usize == events,
        "the rebuild applied {applied} of {events} events"
    );
    Ok((took, over_time))
}

async fn drop_databases(server: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(&format!("{server}/postgres")).await?;
    for name in ["events", "order", "inventory", "payment", "shipping"] {
        conn.execute(format!("DROP DATABASE IF EXISTS {PREFIX}_{name} WITH (FORCE)").as_str())
            .await?;
    }
    Ok(())
}

const SCAN: &str = "SELECT position, event_id, aggregate_type, aggregate_id, version, event_type, \
     schema_version, occurred_at, correlation_id, causation_id, payload \
     FROM events WHERE aggregate_type = 'order' ORDER BY position";

/// How long a raw scan of the events takes (every column read).
fn scan_sqlite(path: &std::path::Path) -> anyhow::Result<Duration> {
    let db = rusqlite::Connection::open(path)?;
    let start = Instant::now();
    let mut scan = db.prepare(SCAN)?;
    let mut rows = scan.query([])?;
    let mut bytes = 0usize;
    while let Some(row) = rows.next()? {
        for column in 0..11 {
            bytes += match row.get_ref(column)? {
                rusqlite::types::ValueRef::Text(t) => t.len(),
                _ => 8,
            };
        }
    }
    std::hint::black_box(bytes);
    Ok(start.elapsed())
}

async fn scan_postgres(url: &str) -> anyhow::Result<Duration> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let start = Instant::now();
    let mut rows = sqlx::query(SCAN).fetch(&mut conn);
    let mut bytes = 0usize;
    while let Some(row) = rows.try_next().await? {
        bytes += row.try_get::<i64, _>(0)? as usize;
        for column in [1, 2, 3, 5, 7, 8, 9, 10] {
            bytes += row.try_get::<&str, _>(column)?.len();
        }
        bytes += row.try_get::<i64, _>(4)? as usize + row.try_get::<i64, _>(6)? as usize;
    }
    std::hint::black_box(bytes);
    Ok(start.elapsed())
}

/// How long writing the rebuilt tables' rows again takes, into tables of the same
/// shape: prepared upserts, 1,000 rows per transaction.
fn write_sqlite(path: &std::path::Path) -> anyhow::Result<Duration> {
    let mut db = rusqlite::Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "wal")?;
    db.pragma_update(None, "synchronous", "full")?;
    for table in Projection::Orders.tables() {
        db.execute_batch(&format!("DROP TABLE IF EXISTS {table}_raw"))?;
    }
    db.execute_batch(&Dialect::Sqlite.ddl(&Projection::Orders.create_tables("_raw")))?;
    let mut took = Duration::ZERO;
    for table in Projection::Orders.tables() {
        let mut read = db.prepare(&format!("SELECT * FROM {table}"))?;
        let width = read.column_count();
        let rows: Vec<Vec<rusqlite::types::Value>> = read
            .query_map([], |row| (0..width).map(|i| row.get(i)).collect())?
            .collect::<Result<_, _>>()?;
        drop(read);
        let placeholders = vec!["?"; width].join(", ");
        let start = Instant::now();
        for chunk in rows.chunks(1_000) {
            let tx = db.transaction()?;
            {
                let mut insert = tx.prepare_cached(&format!(
                    "INSERT OR REPLACE INTO {table}_raw VALUES ({placeholders})"
                ))?;
                for row in chunk {
                    insert.execute(rusqlite::params_from_iter(row.iter()))?;
                }
            }
            tx.commit()?;
        }
        took += start.elapsed();
    }
    Ok(took)
}

/// The same on PostgreSQL with `COPY` (the fastest bulk write it has).
async fn write_postgres(url: &str) -> anyhow::Result<Duration> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    for table in Projection::Orders.tables() {
        conn.execute(format!("DROP TABLE IF EXISTS {table}_raw").as_str())
            .await?;
    }
    for statement in Dialect::Postgres
        .ddl(&Projection::Orders.create_tables("_raw"))
        .split(';')
        .filter(|s| !s.trim().is_empty())
    {
        conn.execute(statement).await?;
    }
    let mut took = Duration::ZERO;
    for table in Projection::Orders.tables() {
        let data: Vec<u8> = conn
            .copy_out_raw(&format!("COPY {table} TO STDOUT"))
            .await?
            .try_fold(vec![], |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            })
            .await?;
        let start = Instant::now();
        let mut copy = conn
            .copy_in_raw(&format!("COPY {table}_raw FROM STDIN"))
            .await?;
        copy.send(data).await?;
        copy.finish().await?;
        took += start.elapsed();
    }
    Ok(took)
}
