//! The `query` benchmark: `GET /v1/orders/{id}` over HTTP on the embedded default,
//! requests per second at saturation and latency at half of that rate, against an
//! axum handler in the same process returning a static body of the same size (the
//! baseline, measured in the same run with the same load generator). Each server runs
//! on a runtime of its own, apart from the load generator's.
//!
//! 1,000 orders are placed and carried through the saga first; the reads go round
//! them. Saturation: 64 clients, each sending its next request when the last is
//! answered. Half of saturation: an open loop at half the rate ours reached, offered
//! to both; p50 and p99 of every answer.
//!
//! `cargo bench --bench query -- --quick` runs 3 s per phase; without `--quick`, 10 s.

mod support;

use axum::routing::get;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::server::{sku, Server};
use support::{percentile, progress, report, Row};

const CLIENTS: usize = 64;
const ORDERS: usize = 1_000;

fn main() -> anyhow::Result<()> {
    let quick = support::quick();
    let seconds = if quick { 3 } else { 10 };
    let runtime = support::runtime()?;
    let rows = runtime.block_on(run(seconds))?;
    report("query", &rows)
}

async fn run(seconds: u64) -> anyhow::Result<Vec<Row>> {
    eprintln!("query: placing {ORDERS} orders ...");
    let server = Server::start(100, CLIENTS).await?;
    let customer = format!("query-{}", uuid::Uuid::now_v7().simple());
    for n in 0..ORDERS {
        let answer = server
            .client
            .post(format!("{}/v1/orders", server.base))
            .json(&Server::order(&customer, &sku(n, 100)))
            .send()
            .await?;
        anyhow::ensure!(
            answer.status() == 202,
            "an order answered {}",
            answer.status()
        );
    }
    server
        .wait_settled(&customer, ORDERS, Duration::from_secs(120))
        .await?
        .ok_or_else(|| anyhow::anyhow!("orders still pending after 2 minutes"))?;
    let ids: Vec<String> = server
        .orders_of(&customer)
        .await?
        .iter()
        .filter_map(|o| o["order_id"].as_str().map(str::to_owned))
        .collect();
    anyhow::ensure!(ids.len() == ORDERS, "{} orders listed", ids.len());
    let ours: Arc<Vec<String>> = Arc::new(
        ids.iter()
            .map(|id| format!("{}/v1/orders/{id}", server.base))
            .collect(),
    );
    let body = server.client.get(&ours[0]).send().await?.bytes().await?;

    // The baseline: the same route in plain axum, answering the same bytes, on a
    // runtime of its own like the server's.
    let static_body = body.clone();
    let router = axum::Router::new().route(
        "/v1/orders/{order_id}",
        get(move || {
            let body = static_body.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    let apart = support::apart()?;
    let (static_base, baseline_task) = apart
        .spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let base = format!("http://{}", listener.local_addr()?);
            let task = tokio::spawn(async move { axum::serve(listener, router).await });
            anyhow::Ok((base, task))
        })
        .await??;
    let baseline: Arc<Vec<String>> = Arc::new(
        ids.iter()
            .map(|id| format!("{static_base}/v1/orders/{id}"))
            .collect(),
    );

    // Every connection opened is kept for reuse: the open loop opens more than
    // `CLIENTS` when answers bunch up, and closing the extra ones left tens of
    // thousands in TIME_WAIT, out of local ports, and p99s of seconds (SYN retries) on
    // both sides.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .build()?;
    eprintln!(
        "query: {}-byte body; saturation, then half of it, {seconds} s each, ours and the baseline ...",
        body.len()
    );
    let phase = progress::timed(seconds, "ours, saturated");
    let ours_saturated = saturate(&client, &ours, seconds).await;
    phase.finish_and_clear();
    let phase = progress::timed(seconds, "baseline, saturated");
    let baseline_saturated = saturate(&client, &baseline, seconds).await;
    phase.finish_and_clear();
    // Both at half of our saturation: the same offered load (at half of the static
    // handler's rate the load generator itself would be the bottleneck).
    let half = ours_saturated / 2.0;
    let phase = progress::timed(seconds, "ours, half of saturation");
    let mut ours_half = open_loop(&client, &ours, half, seconds).await;
    phase.finish_and_clear();
    let phase = progress::timed(seconds, "baseline, half of saturation");
    let mut baseline_half = open_loop(&client, &baseline, half, seconds).await;
    phase.finish_and_clear();
    baseline_task.abort();
    server.stop().await?;

    ours_half.sort();
    baseline_half.sort();
    let ms = |sorted: &[Duration], q| percentile(sorted, q).as_secs_f64() * 1000.0;
    let row = |metric: &str, ours, baseline, unit| Row {
        scenario: "query",
        metric: metric.to_owned(),
        ours,
        baseline: Some(baseline),
        unit,
    };
    Ok(vec![
        row(
            "saturation",
            ours_saturated,
            baseline_saturated,
            "requests/s",
        ),
        row(
            "p50 at half saturation",
            ms(&ours_half, 0.50),
            ms(&baseline_half, 0.50),
            "ms",
        ),
        row(
            "p99 at half saturation",
            ms(&ours_half, 0.99),
            ms(&baseline_half, 0.99),
            "ms",
        ),
    ])
}

/// One GET; its latency when it answered 200.
async fn fetch(client: &reqwest::Client, url: &str) -> Option<Duration> {
    let started = Instant::now();
    let response = client.get(url).send().await.ok()?;
    let ok = response.status() == 200;
    response.bytes().await.ok()?;
    ok.then(|| started.elapsed())
}

/// `CLIENTS` closed loops for `seconds`: answered requests per second.
async fn saturate(client: &reqwest::Client, urls: &Arc<Vec<String>>, seconds: u64) -> f64 {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for first in 0..CLIENTS {
        let (client, urls) = (client.clone(), urls.clone());
        tasks.spawn(async move {
            let (mut n, mut answered) = (first, 0u64);
            while Instant::now() < deadline {
                if fetch(&client, &urls[n % urls.len()]).await.is_some() {
                    answered += 1;
                }
                n += CLIENTS;
            }
            answered
        });
    }
    let mut answered = 0;
    while let Some(done) = tasks.join_next().await {
        answered += done.unwrap_or(0);
    }
    answered as f64 / start.elapsed().as_secs_f64()
}

/// An open loop offering `rate` requests per second for `seconds`: every latency.
async fn open_loop(
    client: &reqwest::Client,
    urls: &Arc<Vec<String>>,
    rate: f64,
    seconds: u64,
) -> Vec<Duration> {
    let latencies = Arc::new(Mutex::new(vec![]));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0;
    while Instant::now() < deadline {
        tick.tick().await;
        let (client, url, latencies) = (
            client.clone(),
            urls[n % urls.len()].clone(),
            latencies.clone(),
        );
        tasks.spawn(async move {
            if let Some(latency) = fetch(&client, &url).await {
                support::lock(&latencies).push(latency);
            }
        });
        n += 1;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let latencies = std::mem::take(&mut *support::lock(&latencies));
    latencies
}
