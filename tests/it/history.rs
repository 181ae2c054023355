//! A history checker, in the manner of Jepsen's queue checkers: concurrent clients
//! drive the real processes over HTTP and record every operation as invoked and then
//! ok, failed or unknown (a timeout, a reset, a refused connection, a 5xx other than a
//! refusal at the door); a scenario injects faults and heals them; the checker then
//! compares the history with what the system holds and reports what was acknowledged
//! and lost, what took effect twice, and every broken invariant (stock oversold, an
//! order both shipped and cancelled, a payment captured without a shipment or voided
//! twice, a saga step applied twice, a stream with a gap, a 500).
//!
//! Profiles: the short one runs with the suite; `ORDERLINE_HISTORY=long` runs longer,
//! with more clients and more faults, and prints the same figures.
//! `ORDERLINE_HISTORY_SEED` repeats a run's random choices (each run prints its seed).

use crate::support::Api;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// A small deterministic generator (splitmix64), so a run can be repeated from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut rng = Rng(seed);
        rng.next();
        rng
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(self.below(span + 1))
    }
}

/// The size of a run: the short profile (the suite) or the long one, on demand.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub long: bool,
    /// Concurrent clients.
    pub clients: usize,
    /// How many times a fault is injected where a scenario repeats one.
    pub faults: usize,
    /// How long a dependency stays down.
    pub outage: Duration,
    pub seed: u64,
}

impl Profile {
    pub fn from_env() -> Profile {
        let long = std::env::var("ORDERLINE_HISTORY").is_ok_and(|p| p == "long");
        let seed = std::env::var("ORDERLINE_HISTORY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        Profile {
            long,
            clients: if long { 16 } else { 6 },
            faults: if long { 50 } else { 20 },
            outage: Duration::from_secs(30),
            seed,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Kind {
    Place {
        sku: String,
        quantity: i64,
        token: &'static str,
    },
    Cancel {
        order: String,
    },
    Dispatch {
        order: String,
    },
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// A 2xx answer: acknowledged.
    Ok(Value),
    /// A definite refusal: a 4xx, or a 503 from admission control (nothing written).
    Failed(StatusCode, Value),
    /// No answer that says either way: a timeout, a reset, a refused connection, a
    /// 5xx; the operation may or may not have taken effect.
    Unknown(String),
}

#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    /// Unique per place operation: the customer it orders for.
    pub customer: String,
    pub key: String,
    pub kind: Kind,
    pub outcome: Outcome,
    pub attempts: u32,
    /// Answers with status 500 seen along the way (never allowed).
    pub internal_errors: Vec<String>,
    /// A 503 without `Retry-After` seen along the way (never allowed).
    pub unavailable_without_retry_after: u32,
    pub invoked: Instant,
    pub completed: Instant,
}

impl Op {
    pub fn order_id(&self) -> Option<String> {
        match (&self.kind, &self.outcome) {
            (Kind::Place { .. }, Outcome::Ok(body)) => body["order_id"].as_str().map(str::to_owned),
            _ => None,
        }
    }
}

/// How the clients behave.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Unique to the run: every customer and key starts with it.
    pub run: String,
    pub skus: Vec<String>,
    /// Each client pauses this long between operations.
    pub pace: Duration,
    /// How long an operation with no definite answer is retried.
    pub retry_for: Duration,
    /// Retries carry the operation's `Idempotency-Key`. Without it (the broken
    /// client of a negative control) a retry is a new request.
    pub keys: bool,
    /// The timeout of one request.
    pub request_timeout: Duration,
}

impl Workload {
    pub fn new(skus: usize) -> Workload {
        let run = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
        Workload {
            skus: (0..skus).map(|i| format!("H{run}-{i}")).collect(),
            run,
            pace: Duration::from_millis(15),
            retry_for: Duration::from_secs(45),
            keys: true,
            request_timeout: Duration::from_secs(10),
        }
    }

    /// Stock every SKU with `quantity` (acknowledged before any load starts).
    pub async fn restock(&self, api: &Api, quantity: i64) -> BTreeMap<String, i64> {
        let mut stock = BTreeMap::new();
        for sku in &self.skus {
            api.restock(sku, quantity).await;
            stock.insert(sku.clone(), quantity);
        }
        stock
    }
}

/// Clients placing, cancelling and dispatching orders until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Op>>>,
    tasks: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Load {
    pub fn start(base: &str, workload: &Workload, clients: usize, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Mutex::new(vec![]));
        let tasks = (0..clients)
            .map(|client| {
                let base = base.to_owned();
                let workload = workload.clone();
                let stop = stop.clone();
                let history = history.clone();
                tokio::spawn(async move {
                    run_client(client, &base, &workload, seed, &stop, &history).await
                })
            })
            .collect();
        Load {
            stop,
            history,
            tasks,
            started: Instant::now(),
        }
    }

    /// The operations recorded so far.
    pub fn so_far(&self) -> Vec<Op> {
        self.history.lock().expect("history").clone()
    }

    /// Wait until at least `n` more place operations have been acknowledged (the
    /// load is flowing), at most [`crate::support::SETTLE`].
    pub async fn until_acknowledged(&self, n: usize) {
        let count = |ops: &[Op]| ops.iter().filter(|op| op.order_id().is_some()).count();
        let target = count(&self.so_far()) + n;
        let start = Instant::now();
        while count(&self.so_far()) < target {
            assert!(
                start.elapsed() < crate::support::SETTLE,
                "the load made no progress"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the clients (each finishes, or gives up on, the operation in hand) and
    /// return the history.
    pub async fn stop(self) -> (Vec<Op>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("client");
        }
        let took = self.started.elapsed();
        let history = self.history.lock().expect("history").clone();
        (history, took)
    }
}

async fn run_client(
    client: usize,
    base: &str,
    workload: &Workload,
    seed: u64,
    stop: &AtomicBool,
    history: &Mutex<Vec<Op>>,
) {
    let mut rng = Rng::new(seed ^ (client as u64).wrapping_mul(0x1000_0000_01B3));
    // One connection per request: a dropped response or a killed server costs one
    // request, and a proxy sees each request on a connection of its own.
    let http = reqwest::Client::builder()
        .timeout(workload.request_timeout)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut placed: Vec<String> = vec![];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let customer = format!("{}-c{client}-{n}", workload.run);
        let key = format!("{}-k{client}-{n}", workload.run);
        let roll = rng.below(100);
        let kind = if roll < 6 && !placed.is_empty() {
            Kind::Cancel {
                order: placed[rng.below(placed.len() as u64) as usize].clone(),
            }
        } else if roll < 14 && !placed.is_empty() {
            Kind::Dispatch {
                order: placed[rng.below(placed.len() as u64) as usize].clone(),
            }
        } else {
            Kind::Place {
                sku: workload.skus[rng.below(workload.skus.len() as u64) as usize].clone(),
                quantity: 1 + rng.below(2) as i64,
                token: if rng.below(10) == 0 {
                    "tok_decline"
                } else {
                    "tok_ok"
                },
            }
        };
        let (path, body) = match &kind {
            Kind::Place {
                sku,
                quantity,
                token,
            } => (
                "/v1/orders".to_owned(),
                json!({ "customer_id": customer, "lines": [{ "sku": sku, "quantity": quantity, "unit_price_cents": 250 }], "payment_token": token }),
            ),
            Kind::Cancel { order } => (
                format!("/v1/orders/{order}/cancel"),
                json!({ "reason": "changed my mind" }),
            ),
            Kind::Dispatch { order } => (format!("/v1/shipments/{order}/dispatch"), json!({})),
        };
        let op = perform(
            &http, base, &path, &body, workload, client, customer, key, kind,
        )
        .await;
        if let Some(id) = op.order_id() {
            placed.push(id);
        }
        history.lock().expect("history").push(op);
        tokio::time::sleep(workload.pace).await;
    }
}

/// Send one operation, retrying (with its key, unless the workload is the broken
/// client) while the answer is not definite.
#[allow(clippy::too_many_arguments)]
async fn perform(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: &Value,
    workload: &Workload,
    client: usize,
    customer: String,
    key: String,
    kind: Kind,
) -> Op {
    let invoked = Instant::now();
    let mut op = Op {
        client,
        customer,
        key,
        kind,
        outcome: Outcome::Unknown("never sent".into()),
        attempts: 0,
        internal_errors: vec![],
        unavailable_without_retry_after: 0,
        invoked,
        completed: invoked,
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        op.attempts += 1;
        let mut request = http.post(format!("{base}{path}")).json(body);
        if workload.keys {
            request = request.header("Idempotency-Key", &op.key);
        }
        let answer = match request.send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after = response.headers().contains_key("retry-after");
                match response.text().await {
                    Ok(text) => Ok((
                        status,
                        retry_after,
                        serde_json::from_str(&text).unwrap_or(Value::String(text)),
                    )),
                    Err(error) => Err(format!("reading the answer: {error}")),
                }
            }
            Err(error) => Err(format!("{error}")),
        };
        match answer {
            Ok((status, _, body)) if status.is_success() => {
                op.outcome = Outcome::Ok(body);
                break;
            }
            Ok((status, retry_after, body)) if status == StatusCode::SERVICE_UNAVAILABLE => {
                if !retry_after {
                    op.unavailable_without_retry_after += 1;
                }
                if body["type"] == "urn:orderline:problem:overloaded" {
                    op.outcome = Outcome::Failed(status, body);
                    break;
                }
                op.outcome = Outcome::Unknown(format!("{status}: {body}"));
            }
            Ok((status, _, body)) if status.is_client_error() => {
                op.outcome = Outcome::Failed(status, body);
                break;
            }
            Ok((status, _, body)) => {
                if status == StatusCode::INTERNAL_SERVER_ERROR {
                    op.internal_errors.push(body.to_string());
                }
                op.outcome = Outcome::Unknown(format!("{status}: {body}"));
            }
            Err(error) => op.outcome = Outcome::Unknown(error),
        }
        if invoked.elapsed() > workload.retry_for {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(800));
    }
    op.completed = Instant::now();
    op
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Report {
    pub invoked: usize,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    pub retried: usize,
    /// The longest an operation took from invocation to its last answer.
    pub longest: Duration,
    /// Why some operations ended unknown (the first few).
    pub unknown_because: Vec<String>,
    /// Orders that exist at the end.
    pub orders: usize,
    pub by_status: BTreeMap<String, usize>,
    /// Acknowledged operations whose effect is not in the system.
    pub lost: Vec<String>,
    /// Operations that took effect more than once.
    pub duplicated: Vec<String>,
    /// Everything else that must never be.
    pub violations: Vec<String>,
}

impl Report {
    pub fn print(&self, scenario: &str, took: Duration) {
        println!(
            "history {scenario}: {} operations in {:.1} s ({} ok, {} failed, {} unknown {:?}, {} retried, longest {:.1} s); {} orders {:?}; lost {}, duplicated {}, violations {}",
            self.invoked,
            took.as_secs_f64(),
            self.ok,
            self.failed,
            self.unknown,
            self.unknown_because,
            self.retried,
            self.longest.as_secs_f64(),
            self.orders,
            self.by_status,
            self.lost.len(),
            self.duplicated.len(),
            self.violations.len(),
        );
    }

    /// Panics with every finding unless there is none.
    pub fn assert_clean(&self, scenario: &str) {
        let show = |what: &[String]| {
            what.iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        };
        assert!(
            self.lost.is_empty() && self.duplicated.is_empty() && self.violations.is_empty(),
            "{scenario}: lost {}:\n  {}\nduplicated {}:\n  {}\nviolations {}:\n  {}",
            self.lost.len(),
            show(&self.lost),
            self.duplicated.len(),
            show(&self.duplicated),
            self.violations.len(),
            show(&self.violations),
        );
        assert!(self.ok > 0, "{scenario}: nothing was acknowledged");
    }
}

/// GET `path`, retrying while the server is busy or briefly away.
async fn read(api: &Api, path: &str) -> (StatusCode, Value) {
    let start = Instant::now();
    loop {
        let answer = api.client.get(api.url(path)).send().await;
        if let Ok(response) = answer {
            let status = response.status();
            if status != StatusCode::SERVICE_UNAVAILABLE {
                return crate::support::body(response).await;
            }
        }
        assert!(
            start.elapsed() < crate::support::SETTLE,
            "GET {path} never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event of a stream, read page by page; empty when it does not exist.
pub async fn stream(api: &Api, aggregate: &str, id: &str) -> Vec<Value> {
    let mut events = vec![];
    let mut from = 1;
    loop {
        let (status, body) = read(
            api,
            &format!("/v1/streams/{aggregate}/{id}?from_version={from}&limit=1000"),
        )
        .await;
        if status == StatusCode::NOT_FOUND {
            return events;
        }
        assert_eq!(status, StatusCode::OK, "stream {aggregate}/{id}: {body}");
        events.extend(body["events"].as_array().cloned().unwrap_or_default());
        match body["next_from_version"].as_i64() {
            Some(next) => from = next,
            None => return events,
        }
    }
}

fn count(events: &[Value], event_type: &str) -> usize {
    events
        .iter()
        .filter(|e| e["event_type"] == event_type)
        .count()
}

/// Every order acknowledged in `ops` has a stream that starts with its placement and
/// has no gap (checked right after a crash, before the system is healed).
pub async fn acknowledged_orders_exist(api: &Api, ops: &[Op]) -> Vec<String> {
    let mut lost = vec![];
    for op in ops {
        if let Some(id) = op.order_id() {
            let events = stream(api, "order", &id).await;
            if events.first().map(|e| e["event_type"].clone()) != Some(json!("OrderPlaced")) {
                lost.push(format!(
                    "order {id} of {} acknowledged, stream {events:?}",
                    op.key
                ));
            } else if let Some(gap) = gap(&events) {
                lost.push(format!("order {id}: {gap}"));
            }
        }
    }
    lost
}

/// A stream's versions are 1, 2, 3, ... with no gap and no repeat.
fn gap(events: &[Value]) -> Option<String> {
    let versions: Vec<i64> = events
        .iter()
        .filter_map(|e| e["version"].as_i64())
        .collect();
    let expected: Vec<i64> = (1..=events.len() as i64).collect();
    (versions != expected).then(|| format!("versions {versions:?}"))
}

/// Check a whole history against what the system holds, once it has settled.
/// `stock` is what each SKU was restocked with.
pub async fn check(api: &Api, history: &[Op], stock: &BTreeMap<String, i64>) -> Report {
    let mut report = Report {
        invoked: history.len(),
        ..Report::default()
    };
    // What a customer's orders are, per place operation (each has a customer of its own).
    let mut orders: Vec<Value> = vec![];
    let mut acked_cancel: HashMap<String, usize> = HashMap::new();
    let mut acked_dispatch: HashMap<String, usize> = HashMap::new();
    for op in history {
        match &op.outcome {
            Outcome::Ok(_) => report.ok += 1,
            Outcome::Failed(..) => report.failed += 1,
            Outcome::Unknown(why) => {
                report.unknown += 1;
                if report.unknown_because.len() < 3 {
                    report.unknown_because.push(why.clone());
                }
            }
        }
        report.longest = report.longest.max(op.completed - op.invoked);
        if op.attempts > 1 {
            report.retried += 1;
        }
        for error in &op.internal_errors {
            report
                .violations
                .push(format!("{}: a 500: {error}", op.key));
        }
        if op.unavailable_without_retry_after > 0 {
            report
                .violations
                .push(format!("{}: a 503 without Retry-After", op.key));
        }
        match (&op.kind, &op.outcome) {
            (Kind::Cancel { order }, Outcome::Ok(_)) => {
                *acked_cancel.entry(order.clone()).or_default() += 1
            }
            (Kind::Dispatch { order }, Outcome::Ok(_)) => {
                *acked_dispatch.entry(order.clone()).or_default() += 1
            }
            _ => {}
        }
        let Kind::Place { .. } = &op.kind else {
            continue;
        };
        let (status, list) = read(
            api,
            &format!("/v1/orders?customer_id={}&limit=100", op.customer),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "orders of {}: {list}", op.customer);
        let items = list["items"].as_array().cloned().unwrap_or_default();
        match &op.outcome {
            Outcome::Ok(body) => {
                let id = &body["order_id"];
                let listed = items.iter().any(|o| &o["order_id"] == id);
                let stored = || async {
                    !stream(api, "order", id.as_str().unwrap_or_default())
                        .await
                        .is_empty()
                };
                if !listed && stored().await {
                    report.violations.push(format!(
                        "{} (client {}): order {id} is in the log but not in the orders view",
                        op.key, op.client
                    ));
                } else if !listed {
                    report.lost.push(format!(
                        "{} (client {}): order {id} acknowledged, the customer's orders are {items:?}",
                        op.key, op.client
                    ));
                }
            }
            Outcome::Failed(status, body) => {
                if !items.is_empty() {
                    report.violations.push(format!(
                        "{}: refused ({status} {body}) yet written: {items:?}",
                        op.key
                    ));
                }
            }
            Outcome::Unknown(_) => {}
        }
        if items.len() > 1 {
            report.duplicated.push(format!(
                "{}: placed once, {} orders: {:?}",
                op.key,
                items.len(),
                items
                    .iter()
                    .map(|o| o["order_id"].clone())
                    .collect::<Vec<_>>()
            ));
        }
        orders.extend(items);
    }

    // Each order: its stream, its payment, its shipment.
    let mut holding: BTreeMap<String, i64> = BTreeMap::new();
    let mut shipped: BTreeMap<String, i64> = BTreeMap::new();
    for view in &orders {
        let id = view["order_id"].as_str().unwrap_or_default().to_owned();
        let status = view["status"].as_str().unwrap_or_default().to_owned();
        report.orders += 1;
        *report.by_status.entry(status.clone()).or_default() += 1;
        let events = stream(api, "order", &id).await;
        let mut broken = |what: String| report.violations.push(format!("order {id}: {what}"));
        if let Some(gap) = gap(&events) {
            broken(gap);
        }
        for (event, most) in [
            ("OrderPlaced", 1),
            ("OrderConfirmed", 1),
            ("OrderCancelled", 1),
            ("OrderShipped", 1),
        ] {
            if count(&events, event) > most {
                broken(format!("{event} {} times", count(&events, event)));
            }
        }
        if count(&events, "OrderPlaced") != 1 {
            broken("no OrderPlaced".into());
        }
        if count(&events, "OrderShipped") > 0 && count(&events, "OrderCancelled") > 0 {
            broken("both shipped and cancelled".into());
        }
        let from_stream = events
            .iter()
            .rev()
            .find_map(|e| match e["event_type"].as_str() {
                Some("OrderConfirmed") => Some("confirmed"),
                Some("OrderCancelled") => Some("cancelled"),
                Some("OrderShipped") => Some("shipped"),
                Some("OrderDelivered") => Some("delivered"),
                _ => None,
            })
            .unwrap_or("pending");
        if from_stream != status {
            broken(format!("the view says {status}, the stream {from_stream}"));
        }
        if status == "pending" {
            broken("never settled".into());
        }
        if acked_cancel.contains_key(&id) && status != "cancelled" {
            report.lost.push(format!(
                "order {id}: cancel acknowledged, the order is {status}"
            ));
        }
        if acked_dispatch.contains_key(&id) && !matches!(status.as_str(), "shipped" | "delivered") {
            report.lost.push(format!(
                "order {id}: dispatch acknowledged, the order is {status}"
            ));
        }
        let payment = stream(api, "payment", &id).await;
        let mut broken = |what: String| report.violations.push(format!("payment {id}: {what}"));
        if let Some(gap) = gap(&payment) {
            broken(gap);
        }
        let (captured, voided) = (
            count(&payment, "PaymentCaptured"),
            count(&payment, "PaymentVoided"),
        );
        if captured > 1 || voided > 1 || captured + voided > 1 {
            broken(format!("captured {captured} times, voided {voided} times"));
        }
        if captured > 0 && !matches!(status.as_str(), "shipped" | "delivered") {
            broken(format!("captured while the order is {status}"));
        }
        if status == "cancelled" && count(&payment, "PaymentAuthorized") > 0 && voided == 0 {
            broken("authorized for a cancelled order and never voided".into());
        }
        if matches!(status.as_str(), "shipped" | "delivered") {
            let shipment = stream(api, "shipment", &id).await;
            if count(&shipment, "ShipmentDispatched") != 1 || captured != 1 {
                report.violations.push(format!(
                    "order {id} shipped: {} dispatches, payment captured {captured} times",
                    count(&shipment, "ShipmentDispatched")
                ));
            }
        }
        for line in view["lines"].as_array().cloned().unwrap_or_default() {
            let sku = line["sku"].as_str().unwrap_or_default().to_owned();
            let quantity = line["quantity"].as_i64().unwrap_or_default();
            match status.as_str() {
                "confirmed" => *holding.entry(sku).or_default() += quantity,
                "shipped" | "delivered" => *shipped.entry(sku).or_default() += quantity,
                _ => {}
            }
        }
    }

    // Each SKU: nothing oversold, the view adds up, each saga step once per order.
    for (sku, restocked) in stock {
        let held = holding.get(sku).copied().unwrap_or_default();
        let gone = shipped.get(sku).copied().unwrap_or_default();
        let expected = json!({ "sku": sku, "on_hand": restocked - gone, "reserved": held, "available": restocked - gone - held });
        let (_, view) = read(api, &format!("/v1/inventory/{sku}")).await;
        if view != expected {
            report
                .violations
                .push(format!("stock {sku}: {view}, the orders say {expected}"));
        }
        if held + gone > *restocked {
            report.violations.push(format!(
                "stock {sku} oversold: {restocked} restocked, {held} reserved and {gone} shipped"
            ));
        }
        let events = stream(api, "inventory", sku).await;
        if let Some(gap) = gap(&events) {
            report.violations.push(format!("stock {sku}: {gap}"));
        }
        let mut steps: HashMap<(String, String), usize> = HashMap::new();
        for event in &events {
            if let Some(order) = event["payload"]["order_id"].as_str() {
                let step = event["event_type"].as_str().unwrap_or_default().to_owned();
                *steps.entry((order.to_owned(), step)).or_default() += 1;
            }
        }
        for ((order, step), times) in steps {
            if times > 1 {
                report.duplicated.push(format!(
                    "stock {sku}: {step} for order {order} {times} times"
                ));
            }
        }
    }
    report
}
