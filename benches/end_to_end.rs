//! The `end-to-end` benchmark: orders per second from placement to `confirmed`
//! through the whole saga, over HTTP, on the embedded default (SQLite files,
//! `synchronous=FULL`), against the rate at which the door answers 202 in the same
//! run (the baseline).
//!
//! For orders spread over 1,000 SKUs and for every order on one SKU: first at
//! saturation (64 clients posting as fast as answered), then at a fixed open-loop
//! offered rate. Each variant runs on a fresh server. Reported: accepted/s (the 202
//! rate), confirmed/s from the first placement to the last confirmation, their
//! ratio, p50/p99 of the 202 and of placement-to-confirmed, orders refused with 503
//! (admission control) and orders cancelled for `payment_timeout`.
//!
//! `cargo bench --bench end_to_end -- --quick` runs 5 s per variant; without
//! `--quick`, 20 s. Rows go to `target/bench/summary.json` (merged with other
//! scenarios' rows) and to standard output.

mod support;

use orderline::{serve, System};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{report, Row};

const CLIENTS: usize = 64;
const SKUS: usize = 1_000;
/// The open-loop offered rate, orders per second.
const OFFERED: f64 = 500.0;

#[derive(Clone, Copy)]
enum Load {
    Saturation,
    OpenLoop(f64),
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let seconds = if quick { 5 } else { 20 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = vec![];
    for (name, skus) in [("spread", SKUS), ("hot-sku", 1)] {
        for load in [Load::Saturation, Load::OpenLoop(OFFERED)] {
            let label = match load {
                Load::Saturation => format!("{name} saturated"),
                Load::OpenLoop(rate) => format!("{name} offered={rate:.0}/s"),
            };
            eprintln!("end-to-end: {label}, {seconds} s of load ...");
            rows.extend(runtime.block_on(variant(&label, skus, load, seconds))?);
        }
    }
    report("end-to-end", &rows)
}

/// A fresh embedded server with its stock on the shelf.
struct Server {
    base: String,
    client: reqwest::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(skus: usize) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let mut config = infra::Config::with_data_dir(dir.path());
        config.listen = "127.0.0.1:0".parse()?;
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let system = System::start(config).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, system, async {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(CLIENTS)
            .build()?;
        for i in 0..skus {
            let response = client
                .post(format!("{base}/v1/inventory/{}/restock", sku(i, skus)))
                .json(&json!({ "quantity": 1_000_000 }))
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == 202,
                "restock answered {}",
                response.status()
            );
        }
        Ok(Server {
            base,
            client,
            stop,
            task,
            _dir: dir,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

fn sku(n: usize, skus: usize) -> String {
    format!("B-{}", n % skus)
}

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
            let body = json!({
                "customer_id": customer,
                "lines": [{"sku": sku(n * 7919, skus), "quantity": 1, "unit_price_cents": 100}],
                "payment_token": "tok_ok",
            });
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

/// One variant on a fresh embedded server.
async fn variant(label: &str, skus: usize, load: Load, seconds: u64) -> anyhow::Result<Vec<Row>> {
    let server = Server::start(skus).await?;
    let customer = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let start = Instant::now();
    let (mut answers, load_time) = drive(&server, &customer, skus, load, seconds).await;
    let settled_at = wait_settled(&server.client, &server.base, &customer).await?;
    let (confirmed, timed_out, to_confirmed) =
        outcomes(&server.client, &server.base, &customer).await?;
    server.stop().await?;

    answers.accepted.sort();
    let door = answers.accepted.len() as f64 / load_time.as_secs_f64();
    let end_to_end = confirmed as f64 / settled_at.duration_since(start).as_secs_f64();
    let ms = |sorted: &[Duration], q| percentile(sorted, q).as_secs_f64() * 1000.0;
    let row = |metric: &str, ours: f64, baseline: Option<f64>, unit| Row {
        scenario: "end-to-end",
        metric: format!("{label} {metric}"),
        ours,
        baseline,
        unit,
    };
    Ok(vec![
        row("confirmed/s vs 202/s", end_to_end, Some(door), "orders/s"),
        row("202 p50", ms(&answers.accepted, 0.50), None, "ms"),
        row("202 p99", ms(&answers.accepted, 0.99), None, "ms"),
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
    ])
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Wait until none of the customer's orders is pending; when that was.
async fn wait_settled(
    client: &reqwest::Client,
    base: &str,
    customer: &str,
) -> anyhow::Result<Instant> {
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        let page: Value = client
            .get(format!(
                "{base}/v1/orders?customer_id={customer}&status=pending&limit=1"
            ))
            .send()
            .await?
            .json()
            .await?;
        if page["items"].as_array().is_some_and(Vec::is_empty) {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < give_up,
            "orders still pending after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (confirmed, cancelled for payment_timeout, placement-to-confirmation of each
/// confirmed order) from the orders read model.
async fn outcomes(
    client: &reqwest::Client,
    base: &str,
    customer: &str,
) -> anyhow::Result<(usize, usize, Vec<Duration>)> {
    let mut cursor: Option<String> = None;
    let (mut confirmed, mut timed_out, mut durations) = (0, 0, vec![]);
    loop {
        let mut url = format!("{base}/v1/orders?customer_id={customer}&limit=100");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let page: Value = client.get(url).send().await?.json().await?;
        for order in page["items"].as_array().into_iter().flatten() {
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
                _ => {}
            }
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    durations.sort();
    Ok((confirmed, timed_out, durations))
}
