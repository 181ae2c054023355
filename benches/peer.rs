//! The `peer` benchmark: the same command workload on cqrs-es (0.5, with its
//! PostgreSQL store, postgres-es) and on ours, on the same PostgreSQL server, in
//! the same run. The workload: orders, each placed, then confirmed, then shipped
//! (three commands, each deciding on the aggregate's state and appending one
//! event), by 16 and by 128 concurrent tasks. Ours runs the command path in process
//! (`Handlers::execute`, the event store on PostgreSQL); cqrs-es runs
//! `CqrsFramework::execute` with an aggregate of the same shape.
//!
//! Where each spends its time, per command: the benchmark process's CPU, the
//! PostgreSQL server's CPU (every `postgres` process, from /proc), and the
//! database's transactions and rows read and written (`pg_stat_database`).
//!
//! `cargo bench --bench peer -- --quick` runs 2,000 orders each; without `--quick`,
//! 10,000. `-- --quick c=16` runs one concurrency alone.

mod support;

use command_handlers::app::Meta;
use command_handlers::Handlers;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use domain::order::{Order, OrderCommand, OrderLine};
use domain::{CustomerId, Money, PaymentToken, Quantity, Sku};
use infra::db::Db;
use infra::metrics::Metrics;
use infra::EventStore;
use serde::{Deserialize, Serialize};
use sqlx::{Connection, Executor, PgConnection};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use support::{report, Row};

/// Concurrent tasks: as many as a small service's pool, and many more.
const CONCURRENCY: [usize; 2] = [16, 128];
/// cqrs-es holds a connection per command in progress: its pool, at most (the
/// server's `max_connections` is 100, shared with the rest of the run).
const PEER_CONNECTIONS: usize = 48;
const COMMANDS_PER_ORDER: usize = 3;

fn main() -> anyhow::Result<()> {
    let quick = support::quick();
    let orders = if quick { 2_000 } else { 10_000 };
    let runtime = support::runtime()?;
    let server = support::services::postgres()?;
    let mut rows = vec![];
    for tasks in CONCURRENCY {
        if !support::selected(&format!("c={tasks}")) {
            continue;
        }
        eprintln!("peer: {orders} orders x {COMMANDS_PER_ORDER} commands, {tasks} tasks, ours then cqrs-es ...");
        let ours = runtime.block_on(measure(
            &server,
            "orderline_bench_peer",
            orders,
            tasks,
            run_ours,
        ))?;
        let peer = runtime.block_on(measure(
            &server,
            "orderline_bench_cqrs_es",
            orders,
            tasks,
            run_cqrs_es,
        ))?;
        let row = |metric: &str, ours: f64, baseline: f64, unit| Row {
            scenario: "peer",
            metric: format!("c={tasks} {metric}"),
            ours,
            baseline: Some(baseline),
            unit,
        };
        rows.extend([
            row(
                "commands vs cqrs-es",
                ours.per_second,
                peer.per_second,
                "commands/s",
            ),
            row(
                "our process CPU per command",
                ours.client_us,
                peer.client_us,
                "us",
            ),
            row(
                "PostgreSQL CPU per command",
                ours.server_us,
                peer.server_us,
                "us",
            ),
            row(
                "transactions per command",
                ours.transactions,
                peer.transactions,
                "transactions",
            ),
            row(
                "rows read per command",
                ours.rows_read,
                peer.rows_read,
                "rows",
            ),
            row(
                "rows written per command",
                ours.rows_written,
                peer.rows_written,
                "rows",
            ),
        ]);
    }
    report("peer", &rows)
}

/// What one side did, per command.
struct Measured {
    per_second: f64,
    client_us: f64,
    server_us: f64,
    transactions: f64,
    rows_read: f64,
    rows_written: f64,
}

/// Run `side` on a fresh database `name` and measure it.
async fn measure<F, Fut>(
    server: &str,
    name: &str,
    orders: usize,
    tasks: usize,
    side: F,
) -> anyhow::Result<Measured>
where
    F: FnOnce(String, usize, usize) -> Fut,
    Fut: Future<Output = anyhow::Result<f64>>,
{
    let mut admin = PgConnection::connect(&format!("{server}/postgres")).await?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let url = format!("{server}/{name}");
    let stats_before = database_stats(&mut admin, name).await?;
    let (client_before, server_before) =
        (cpu_ticks(|pid| pid == std::process::id()), postgres_ticks());
    // `side` times its own load (set-up excluded) and closes its connections, so
    // the server has flushed the statistics of every session before they are read.
    let seconds = side(url, orders, tasks).await?;
    let (client_after, server_after) =
        (cpu_ticks(|pid| pid == std::process::id()), postgres_ticks());
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let stats_after = database_stats(&mut admin, name).await?;
    let commands = (orders * COMMANDS_PER_ORDER) as f64;
    let tick_us = 1e6 / ticks_per_second();
    let per_command = |before: i64, after: i64| (after - before) as f64 / commands;
    Ok(Measured {
        per_second: commands / seconds,
        client_us: (client_after - client_before) as f64 * tick_us / commands,
        server_us: (server_after - server_before) as f64 * tick_us / commands,
        transactions: per_command(stats_before[0], stats_after[0]),
        rows_read: per_command(stats_before[1], stats_after[1]),
        rows_written: per_command(stats_before[2], stats_after[2]),
    })
}

/// (transactions, rows read, rows written) of database `name` so far.
async fn database_stats(admin: &mut PgConnection, name: &str) -> anyhow::Result<[i64; 3]> {
    admin.execute("SELECT pg_stat_clear_snapshot()").await?;
    let (transactions, read, written): (i64, i64, i64) = sqlx::query_as(
        "SELECT xact_commit + xact_rollback, tup_returned + tup_fetched,
                tup_inserted + tup_updated + tup_deleted
           FROM pg_stat_database WHERE datname = $1",
    )
    .bind(name)
    .fetch_one(&mut *admin)
    .await?;
    Ok([transactions, read, written])
}

/// CPU time (user and system, in clock ticks) of the processes `pick` chooses.
fn cpu_ticks(pick: impl Fn(u32) -> bool) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| pick(*pid))
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces): utime is the
            // 14th field of the line, stime the 15th.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// CPU time of every PostgreSQL server process.
fn postgres_ticks() -> u64 {
    cpu_ticks(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() == "postgres")
    })
}

fn ticks_per_second() -> f64 {
    // USER_HZ is 100 on every Linux configuration this runs on.
    100.0
}

/// Ours: `orders` orders placed, confirmed and shipped through the command path;
/// seconds taken.
async fn run_ours(url: String, orders: usize, tasks: usize) -> anyhow::Result<f64> {
    let db = Db::open(&url, 16).await?;
    let store = EventStore::with_db(db.clone()).await?;
    let handlers = Handlers::new(store, Metrics::default());
    let place = OrderCommand::Place {
        customer_id: CustomerId::parse("c-1")?,
        lines: vec![OrderLine {
            sku: Sku::parse("S-1")?,
            quantity: Quantity::new(2)?,
            unit_price_cents: Money::from_cents(1299),
        }],
        payment_token: PaymentToken::parse("tok_ok")?,
    };
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (handlers, place, next) = (handlers.clone(), place.clone(), next.clone());
        running.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < orders {
                let id = uuid::Uuid::now_v7().to_string();
                for command in [&place, &OrderCommand::Confirm, &OrderCommand::Ship] {
                    handlers
                        .execute::<Order>(&id, command, &Meta::fresh())
                        .await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = running.join_next().await {
        done??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(&db.pool)
        .await?;
    anyhow::ensure!(
        events as usize == orders * COMMANDS_PER_ORDER,
        "ours: {events} events stored"
    );
    drop(handlers);
    db.pool.close().await;
    Ok(seconds)
}

/// The same order, as a cqrs-es aggregate: the same decisions (a new order is
/// placed; a placed one confirmed; a confirmed one shipped), one event each.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PeerOrder {
    status: Option<PeerStatus>,
    customer_id: String,
    lines: Vec<(String, u64, u64)>,
    total_cents: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum PeerStatus {
    Placed,
    Confirmed,
    Shipped,
}

#[derive(Debug, Clone)]
enum PeerCommand {
    Place {
        customer_id: String,
        lines: Vec<(String, u64, u64)>,
        payment_token: String,
    },
    Confirm,
    Ship,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(clippy::enum_variant_names)] // the names of our own events
enum PeerEvent {
    OrderPlaced {
        customer_id: String,
        lines: Vec<(String, u64, u64)>,
        total_cents: u64,
        payment_token: String,
    },
    OrderConfirmed,
    OrderShipped,
}

impl DomainEvent for PeerEvent {
    fn event_type(&self) -> String {
        match self {
            PeerEvent::OrderPlaced { .. } => "OrderPlaced",
            PeerEvent::OrderConfirmed => "OrderConfirmed",
            PeerEvent::OrderShipped => "OrderShipped",
        }
        .into()
    }

    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Refused {}

impl Aggregate for PeerOrder {
    const TYPE: &'static str = "order";
    type Command = PeerCommand;
    type Event = PeerEvent;
    type Error = Refused;
    type Services = ();

    async fn handle(
        &mut self,
        command: PeerCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), Refused> {
        let event = match (command, self.status) {
            (
                PeerCommand::Place {
                    customer_id,
                    lines,
                    payment_token,
                },
                None,
            ) => {
                let total_cents = lines.iter().map(|(_, q, p)| q * p).sum();
                PeerEvent::OrderPlaced {
                    customer_id,
                    lines,
                    total_cents,
                    payment_token,
                }
            }
            (PeerCommand::Confirm, Some(PeerStatus::Placed)) => PeerEvent::OrderConfirmed,
            (PeerCommand::Ship, Some(PeerStatus::Confirmed)) => PeerEvent::OrderShipped,
            _ => return Err(Refused("not allowed in this state")),
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::OrderPlaced {
                customer_id,
                lines,
                total_cents,
                ..
            } => {
                self.status = Some(PeerStatus::Placed);
                self.customer_id = customer_id;
                self.lines = lines;
                self.total_cents = total_cents;
            }
            PeerEvent::OrderConfirmed => self.status = Some(PeerStatus::Confirmed),
            PeerEvent::OrderShipped => self.status = Some(PeerStatus::Shipped),
        }
    }
}

/// postgres-es's tables (its `db/init.sql`).
const PEER_SCHEMA: &[&str] = &[
    "CREATE TABLE events (
        aggregate_type text NOT NULL, aggregate_id text NOT NULL,
        sequence bigint CHECK (sequence >= 0) NOT NULL,
        event_type text NOT NULL, event_version text NOT NULL,
        payload json NOT NULL, metadata json NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    "CREATE TABLE snapshots (
        aggregate_type text NOT NULL, aggregate_id text NOT NULL,
        last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
        current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
        payload json NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id, last_sequence))",
];

/// cqrs-es: the same orders through `CqrsFramework::execute`; seconds taken.
async fn run_cqrs_es(url: String, orders: usize, tasks: usize) -> anyhow::Result<f64> {
    let connections = tasks.min(PEER_CONNECTIONS) as u32;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .min_connections(connections)
        .connect(&url)
        .await?;
    for statement in PEER_SCHEMA {
        pool.execute(*statement).await?;
    }
    let cqrs = Arc::new(postgres_es::postgres_cqrs::<PeerOrder>(
        pool.clone(),
        vec![],
        (),
    ));
    let place = PeerCommand::Place {
        customer_id: "c-1".into(),
        lines: vec![("S-1".into(), 2, 1299)],
        payment_token: "tok_ok".into(),
    };
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (cqrs, place, next) = (cqrs.clone(), place.clone(), next.clone());
        running.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < orders {
                let id = uuid::Uuid::now_v7().to_string();
                for command in [place.clone(), PeerCommand::Confirm, PeerCommand::Ship] {
                    cqrs.execute(&id, command).await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = running.join_next().await {
        done??;
    }
    let seconds = start.elapsed().as_secs_f64();
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(
        events as usize == orders * COMMANDS_PER_ORDER,
        "cqrs-es: {events} events stored"
    );
    drop(cqrs);
    pool.close().await;
    Ok(seconds)
}
