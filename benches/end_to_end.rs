//! The `end-to-end` benchmark: orders per second from placement to `confirmed`
//! through the whole saga, over HTTP, on the embedded default (SQLite files,
//! `synchronous=FULL`), against the rate at which the door answers 202 in the same
//! run (the baseline), and with the 202's latency against the door alone (the same
//! server with its pipeline held, at the same load, in the same run).
//!
//! For orders spread over 1,000 SKUs and for every order on one SKU: first at
//! saturation (64 clients posting as fast as answered), then at a fixed open-loop
//! offered rate. Each variant runs on a fresh server, on a runtime of its own apart
//! from the clients' (as a server in another process would be). Reported: accepted/s (the 202
//! rate), confirmed/s from the first placement to the last confirmation, their
//! ratio, p50/p99 of the 202 and of placement-to-confirmed, orders refused with 503
//! (admission control) and orders cancelled for `payment_timeout`.
//!
//! The same on the distributed deployment (one process per service and the
//! gateway, PostgreSQL databases, the benchmarks' own broker; `distributed spread`
//! variants): what it reaches, measured the same way.
//!
//! `cargo bench --bench end_to_end -- --quick` runs 5 s per variant; without
//! `--quick`, 20 s. Rows go to `target/bench/summary.json` (merged with other
//! scenarios' rows) and to standard output.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::plot::{self, Series};
use support::server::{sku, Server};
use support::{lock, percentile, progress, report, Row};

const CLIENTS: usize = 64;
const SKUS: usize = 1_000;
/// The open-loop offered rate, orders per second.
const OFFERED: f64 = 500.0;

#[derive(Clone, Copy)]
enum Load {
    Saturation,
    OpenLoop(f64),
}

/// Each variant runs at both.
const LOADS: [Load; 2] = [Load::Saturation, Load::OpenLoop(OFFERED)];

impl Load {
    fn name(self) -> String {
        match self {
            Load::Saturation => "saturated".to_owned(),
            Load::OpenLoop(rate) => format!("offered={rate:.0}/s"),
        }
    }
}

/// What the door alone answered at one load: 202/s, and the 202's p50 and p99 (ms).
struct Door {
    rate: f64,
    p50: f64,
    p99: f64,
}

/// The `q` quantile of sorted durations, in milliseconds.
fn ms(sorted: &[Duration], q: f64) -> f64 {
    percentile(sorted, q).as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let quick = support::quick();
    let seconds = if quick { 5 } else { 20 };
    let runtime = support::runtime()?;
    let mut rows = vec![];
    let mut curves = vec![];
    // The baseline of the 202's latency, at each load: the door alone (the pipeline
    // held), in this run.
    let mut doors = vec![];
    for load in LOADS {
        let label = format!("door alone {}", load.name());
        eprintln!("end-to-end: {label}, {seconds} s of load ...");
        let door = runtime.block_on(async {
            let server = Server::door_alone(CLIENTS).await?;
            let placing = progress::timed(seconds, "placing orders");
            let (mut answers, load_time) = drive(&server, "bench-door", SKUS, load, seconds).await;
            placing.finish_and_clear();
            server.stop().await?;
            answers.accepted.sort();
            anyhow::Ok(Door {
                rate: answers.accepted.len() as f64 / load_time.as_secs_f64(),
                p50: ms(&answers.accepted, 0.50),
                p99: ms(&answers.accepted, 0.99),
            })
        })?;
        rows.push(Row {
            scenario: "end-to-end",
            metric: format!("{label} 202/s"),
            ours: door.rate,
            baseline: None,
            unit: "orders/s",
        });
        doors.push(door);
    }
    let broker = support::services::Broker::start()?;
    let variants = [
        ("spread", SKUS, None),
        ("hot-sku", 1, None),
        ("distributed spread", SKUS, Some(&broker)),
    ];
    for (name, skus, distributed) in variants {
        for (load, door) in LOADS.into_iter().zip(&doors) {
            let label = format!("{name} {}", load.name());
            // The door alone is the embedded one's.
            let door = distributed.is_none().then_some(door);
            eprintln!("end-to-end: {label}, {seconds} s of load ...");
            let (variant_rows, curve) = runtime.block_on(async {
                let server = match distributed {
                    Some(broker) => Server::distributed(broker, skus, CLIENTS).await?,
                    None => Server::start(skus, CLIENTS).await?,
                };
                let measured = variant(&server, &label, (skus, load, seconds), door).await;
                server.stop().await?;
                measured
            })?;
            rows.extend(variant_rows);
            curves.push(Series {
                label,
                points: curve,
            });
        }
    }
    drop(broker);
    // The distributed deployment's times are of another order: a plot of its own.
    let (distributed, embedded): (Vec<Series>, Vec<Series>) = curves
        .into_iter()
        .partition(|s| s.label.starts_with("distributed"));
    plot::lines(
        "end_to_end_latency.png",
        "end-to-end (embedded): placement to confirmed, by percentile",
        "percentile",
        "ms",
        &embedded,
    );
    plot::lines(
        "end_to_end_latency_distributed.png",
        "end-to-end (distributed): placement to confirmed, by percentile",
        "percentile",
        "ms",
        &distributed,
    );
    report("end-to-end", &rows)
}

/// The percentiles drawn.
const QUANTILES: [f64; 7] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999];

/// How long the orders of a variant may take to settle once the load stops.
const PATIENCE: Duration = Duration::from_secs(180);

/// What the clients saw: the 202 latencies, and how many were refused.
#[derive(Default)]
struct Answers {
    accepted: Vec<Duration>,
    refused: u64,
}

/// Place orders for `seconds` under `load`; the answers, and how long it took.
async fn drive(
    server: &Server,
    customer: &str,
    skus: usize,
    load: Load,
    seconds: u64,
) -> (Answers, Duration) {
    let answers = Arc::new(Mutex::new(Answers::default()));
    let order = {
        let (client, base, answers) = (server.client.clone(), server.base.clone(), answers.clone());
        let customer = customer.to_owned();
        move |n: usize| {
            let (client, base, answers) = (client.clone(), base.clone(), answers.clone());
            let body = Server::order(&customer, &sku(n * 7919, skus));
            async move {
                let started = Instant::now();
                let answer = client
                    .post(format!("{base}/v1/orders"))
                    .json(&body)
                    .send()
                    .await;
                let mut answers = lock(&answers);
                match answer.map(|r| r.status().as_u16()) {
                    Ok(202) => answers.accepted.push(started.elapsed()),
                    Ok(503) => answers.refused += 1,
                    Ok(other) => eprintln!("an order answered {other}"),
                    Err(error) => eprintln!("an order failed: {error}"),
                }
            }
        }
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Saturation => {
            for first in 0..CLIENTS {
                let order = order.clone();
                tasks.spawn(async move {
                    let mut n = first;
                    while Instant::now() < deadline {
                        order(n).await;
                        n += CLIENTS;
                    }
                });
            }
        }
        Load::OpenLoop(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut n = 0;
            while Instant::now() < deadline {
                tick.tick().await;
                tasks.spawn(order(n));
                n += 1;
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let answers = std::mem::take(&mut *lock(&answers));
    (answers, elapsed)
}

/// One variant on a fresh server: its rows, and its placement-to-confirmed curve
/// (percentile, ms).
async fn variant(
    server: &Server,
    label: &str,
    (skus, load, seconds): (usize, Load, u64),
    door: Option<&Door>,
) -> anyhow::Result<(Vec<Row>, Vec<(f64, f64)>)> {
    let customer = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let start = Instant::now();
    let placing = progress::timed(seconds, "placing orders");
    let (mut answers, load_time) = drive(server, &customer, skus, load, seconds).await;
    placing.finish_and_clear();
    let settling = progress::timed(PATIENCE.as_secs(), "waiting until settled");
    let settled = server
        .wait_settled(&customer, answers.accepted.len(), PATIENCE)
        .await?;
    settling.finish_and_clear();
    // Orders still pending after the patience ran out count as not confirmed.
    let settled_at = settled.unwrap_or_else(Instant::now);
    let (confirmed, timed_out, pending, to_confirmed) = outcomes(server, &customer).await?;

    answers.accepted.sort();
    let accepted_rate = answers.accepted.len() as f64 / load_time.as_secs_f64();
    let end_to_end = confirmed as f64 / settled_at.duration_since(start).as_secs_f64();
    let row = |metric: &str, ours: f64, baseline: Option<f64>, unit| Row {
        scenario: "end-to-end",
        metric: format!("{label} {metric}"),
        ours,
        baseline,
        unit,
    };
    let curve = QUANTILES
        .iter()
        .map(|q| (q * 100.0, ms(&to_confirmed, *q)))
        .collect();
    let mut rows = vec![
        row(
            "confirmed/s vs 202/s",
            end_to_end,
            Some(accepted_rate),
            "orders/s",
        ),
        row(
            "202 p50 vs door alone",
            ms(&answers.accepted, 0.50),
            door.map(|d| d.p50),
            "ms",
        ),
        row(
            "202 p99 vs door alone",
            ms(&answers.accepted, 0.99),
            door.map(|d| d.p99),
            "ms",
        ),
        row(
            "placed-to-confirmed p50",
            ms(&to_confirmed, 0.50),
            None,
            "ms",
        ),
        row(
            "placed-to-confirmed p99",
            ms(&to_confirmed, 0.99),
            None,
            "ms",
        ),
        row("refused (503)", answers.refused as f64, None, "orders"),
        row(
            "cancelled payment_timeout",
            timed_out as f64,
            None,
            "orders",
        ),
    ];
    if settled.is_none() {
        eprintln!("end-to-end: {label}: {pending} orders still pending after {PATIENCE:?}");
        rows.push(row("still pending", pending as f64, None, "orders"));
    }
    Ok((rows, curve))
}

/// (confirmed, cancelled for payment_timeout, pending, placement-to-confirmation
/// of each confirmed order) from the orders read model.
async fn outcomes(
    server: &Server,
    customer: &str,
) -> anyhow::Result<(usize, usize, usize, Vec<Duration>)> {
    let (mut confirmed, mut timed_out, mut pending, mut durations) = (0, 0, 0, vec![]);
    for order in server.orders_of(customer).await? {
        match order["status"].as_str() {
            Some("confirmed") => {
                confirmed += 1;
                let at = |field: &str| {
                    order[field]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                };
                if let (Some(placed), Some(updated)) = (at("placed_at"), at("updated_at")) {
                    durations.push((updated - placed).to_std().unwrap_or_default());
                }
            }
            Some("cancelled") if order["cancel_reason"] == "payment_timeout" => timed_out += 1,
            Some("pending") => pending += 1,
            _ => {}
        }
    }
    durations.sort();
    Ok((confirmed, timed_out, pending, durations))
}
