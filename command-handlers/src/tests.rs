//! The command routes without a socket, and the saga runner under a manual clock,
//! on real SQLite files.

use crate::app::Handlers;
use crate::saga::{Dispatch, SagaRunner, NAME};
use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use chrono::{TimeZone, Utc};
use infra::clock::ManualClock;
use infra::consume::{step, Handler, Idle, LogSource, Step};
use infra::db::Db;
use infra::metrics::Metrics;
use infra::scratch::Scratch;
use schemas::topics::AggregateType;
use serde_json::{json, Value};
use std::time::Duration;
use tower::ServiceExt;

struct Fixture {
    handlers: Handlers,
    order_db: Db,
    _scratch: Scratch,
}

async fn fixture() -> Fixture {
    let scratch = Scratch::new().await.expect("scratch");
    Fixture {
        handlers: Handlers::new(scratch.store.clone(), Metrics::default()),
        order_db: scratch.db.clone(),
        _scratch: scratch,
    }
}

/// POST `body` to `path`: the status and the body as JSON.
async fn post(handlers: &Handlers, path: &str, body: &str) -> (StatusCode, Value) {
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .expect("request");
    let response = crate::routes::router(handlers.clone())
        .oneshot(request)
        .await
        .expect("answer");
    let status = response.status();
    let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn order(token: &str) -> String {
    json!({
        "customer_id": "c-1",
        "lines": [{"sku": "S-1", "quantity": 2, "unit_price_cents": 500}],
        "payment_token": token,
    })
    .to_string()
}

#[tokio::test]
async fn bad_input_is_refused_with_a_problem_and_writes_nothing() {
    let f = fixture().await;
    let cases = [
        ("/v1/orders", "{", StatusCode::BAD_REQUEST),
        (
            "/v1/orders",
            r#"{"customer_id": "c", "lines": [], "payment_token": "t", "x": 1}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/orders",
            r#"{"customer_id": "c", "lines": [], "payment_token": "t"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/inventory/S-1/restock",
            r#"{"quantity": 0}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/inventory/S-1/restock",
            r#"{"quantity": "ten"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/orders/not-a-uuid/cancel",
            "{}",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (path, body, expected) in cases {
        let (status, problem) = post(&f.handlers, path, body).await;
        assert_eq!(status, expected, "{path} {body}: {problem}");
        assert_eq!(problem["status"], expected.as_u16(), "{problem}");
    }
    assert_eq!(f.handlers.store.head(), 0);
}

#[tokio::test]
async fn an_accepted_command_answers_202_with_the_token_of_its_events() {
    let f = fixture().await;
    let (status, body) = post(
        &f.handlers,
        "/v1/inventory/S-1/restock",
        r#"{"quantity": 5}"#,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, json!({"sku": "S-1", "consistency_token": "1"}));
    let (status, body) = post(&f.handlers, "/v1/orders", &order("tok_ok")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["consistency_token"], "2");
    assert!(body["order_id"].as_str().is_some());
}

/// Run the saga until it has nothing left to do now.
async fn settle(saga: &SagaRunner, source: &LogSource) -> Idle {
    loop {
        let step = step(source, saga).await.expect("step");
        let moved = step != Step::Idle;
        let idle = saga.between(step != Step::Moved).await.expect("between");
        let dispatched = saga.dispatch().await.expect("dispatch");
        if !moved && !dispatched && idle != Idle::Busy {
            return idle;
        }
    }
}

/// The saga over the log, on the order database, with a 30 s payment timeout.
async fn saga(f: &Fixture) -> (SagaRunner, LogSource) {
    let saga = SagaRunner::new(
        f.handlers.clone(),
        f.order_db.clone(),
        Duration::from_secs(30),
        Dispatch::InProcess,
    )
    .expect("saga");
    let source = LogSource::open(
        f.handlers.store.clone(),
        AggregateType::ALL,
        NAME,
        &f.order_db,
    )
    .await
    .expect("source");
    (saga, source)
}

/// [`saga`], reading the time from a clock that moves only when told.
async fn saga_on_a_manual_clock(f: &Fixture) -> (SagaRunner, LogSource, ManualClock) {
    let start = Utc
        .with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("time");
    let clock = ManualClock::at(start);
    let (saga, source) = saga(f).await;
    (saga.with_clock(clock.clone()), source, clock)
}

/// Put stock on the shelf and place an order paid with `token`: its id.
async fn place(f: &Fixture, token: &str) -> String {
    post(
        &f.handlers,
        "/v1/inventory/S-1/restock",
        r#"{"quantity": 5}"#,
    )
    .await;
    let (_, placed) = post(&f.handlers, "/v1/orders", &order(token)).await;
    placed["order_id"].as_str().expect("order id").to_owned()
}

async fn event_types(f: &Fixture, aggregate_type: &str, id: &str) -> Vec<String> {
    f.handlers
        .store
        .load_stream(aggregate_type, id)
        .await
        .expect("stream")
        .into_iter()
        .map(|e| e.envelope.event_type)
        .collect()
}

#[tokio::test]
async fn the_payment_deadline_fires_when_the_clock_passes_it_and_not_before() {
    let f = fixture().await;
    let (saga, source, clock) = saga_on_a_manual_clock(&f).await;
    let order_id = place(&f, "tok_no_answer").await;

    // Reserved and asked to pay; the gateway never answers.
    assert_eq!(
        settle(&saga, &source).await,
        Idle::For(Duration::from_secs(30))
    );
    clock.advance(chrono::Duration::seconds(29));
    settle(&saga, &source).await;
    assert_eq!(
        event_types(&f, "order", &order_id).await,
        vec!["OrderPlaced"]
    );

    clock.advance(chrono::Duration::seconds(2));
    settle(&saga, &source).await;
    assert_eq!(
        event_types(&f, "order", &order_id).await,
        vec!["OrderPlaced", "OrderCancelled"]
    );
    let stream = f
        .handlers
        .store
        .load_stream("order", &order_id)
        .await
        .expect("stream");
    assert_eq!(
        stream[1].envelope.payload.to_value()["reason"],
        "payment_timeout"
    );
    // The stock is back on the shelf.
    let item = event_types(&f, "inventory", "S-1").await;
    assert_eq!(item.last().map(String::as_str), Some("StockReleased"));
}

#[tokio::test]
async fn an_order_runs_through_the_saga_to_confirmed() {
    let f = fixture().await;
    let (saga, source) = saga(&f).await;
    let order_id = place(&f, "tok_ok").await;
    assert_eq!(
        settle(&saga, &source).await,
        Idle::For(Duration::from_secs(60))
    );
    assert_eq!(
        event_types(&f, "order", &order_id).await,
        vec!["OrderPlaced", "OrderConfirmed"]
    );
    let metrics = f.handlers.metrics.render(&[]);
    assert!(
        metrics.contains("orderline_order_placed_to_confirmed_seconds_count{} 1"),
        "{metrics}"
    );
    assert_eq!(f.handlers.backlog.in_flight(), 0);
}

#[tokio::test]
async fn a_stalled_pipeline_cancels_no_order_whose_payment_was_never_requested() {
    let f = fixture().await;
    let (saga, source, clock) = saga_on_a_manual_clock(&f).await;
    let order_id = place(&f, "tok_no_answer").await;
    // The reservation runs; the payment request is staged, and then nothing carries
    // it out for an hour.
    step(&source, &saga).await.expect("placed");
    assert!(saga.dispatch().await.expect("reserve"));
    step(&source, &saga).await.expect("reserved");
    clock.advance(chrono::Duration::hours(1));
    assert_eq!(step(&source, &saga).await.expect("idle"), Step::Idle);
    assert_eq!(
        saga.between(true).await.expect("between"),
        Idle::For(Duration::from_secs(60))
    );
    assert_eq!(
        event_types(&f, "order", &order_id).await,
        vec!["OrderPlaced"]
    );

    // The request reaches the payment service now: its 30 s start now.
    assert_eq!(
        settle(&saga, &source).await,
        Idle::For(Duration::from_secs(30))
    );
    clock.advance(chrono::Duration::seconds(31));
    // Due, but the saga has not heard everything yet: the answer may be unread.
    assert_eq!(
        saga.between(false).await.expect("between"),
        Idle::For(Duration::ZERO)
    );
    assert_eq!(
        event_types(&f, "order", &order_id).await,
        vec!["OrderPlaced"]
    );
    settle(&saga, &source).await;
    assert_eq!(
        event_types(&f, "order", &order_id).await,
        vec!["OrderPlaced", "OrderCancelled"]
    );
}

#[tokio::test]
async fn past_the_backlog_bound_new_orders_are_refused_and_retries_answered() {
    let mut f = fixture().await;
    f.handlers.backlog.bound = Some(2);
    f.handlers.backlog.refusal_delay = std::time::Duration::from_millis(200);
    let (saga, source) = saga(&f).await;
    post(
        &f.handlers,
        "/v1/inventory/S-1/restock",
        r#"{"quantity": 50}"#,
    )
    .await;
    for _ in 0..2 {
        let (status, _) = post(&f.handlers, "/v1/orders", &order("tok_ok")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let head = f.handlers.store.head();
    let request = Request::post("/v1/orders")
        .header("content-type", "application/json")
        .body(Body::from(order("tok_ok")))
        .expect("request");
    let asked = std::time::Instant::now();
    let refused = crate::routes::router(f.handlers.clone())
        .oneshot(request)
        .await
        .expect("answer");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The refusal is held for the refusal delay before it is answered.
    assert!(asked.elapsed() >= std::time::Duration::from_millis(200));
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(
        f.handlers.store.head(),
        head,
        "a refused order wrote nothing"
    );
    assert!(f
        .handlers
        .metrics
        .render(&[])
        .contains("orderline_commands_rejected_total{command=\"place_order\",status=\"503\"} 1"));

    // Once the saga has confirmed what was accepted, the door opens again.
    settle(&saga, &source).await;
    assert_eq!(f.handlers.backlog.in_flight(), 0);
    let (status, _) = post(&f.handlers, "/v1/orders", &order("tok_ok")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(saga.count_backlog().await.expect("counted"), 0);
}

/// Reserve one unit of `sku` for a new order, with an optional idempotency record.
async fn reserve(
    handlers: Handlers,
    sku: &'static str,
    key: Option<(&'static str, &'static str)>,
) -> Result<crate::app::Executed, crate::app::CommandError> {
    let mut meta = crate::app::Meta::fresh();
    meta.idempotency = key.map(|(key, hash)| infra::event_store::IdempotencyRecord {
        key: key.into(),
        request_hash: hash.into(),
        response: Value::Null,
    });
    let command = domain::inventory::InventoryCommand::Reserve {
        order_id: uuid::Uuid::now_v7(),
        quantity: 1,
    };
    handlers
        .execute::<domain::inventory::InventoryItem>(sku, &command, &meta)
        .await
}

/// A fixture with 1,000 units of `S-HOT` on the shelf.
async fn hot_sku() -> Fixture {
    let f = fixture().await;
    let (status, _) = post(
        &f.handlers,
        "/v1/inventory/S-HOT/restock",
        r#"{"quantity": 1000}"#,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    f
}

/// The reservations held on `S-HOT` and its stream's version.
async fn held(f: &Fixture) -> (u64, i64) {
    let (item, version, _) = f
        .handlers
        .load::<domain::inventory::InventoryItem>("S-HOT")
        .await
        .expect("load");
    (item.reserved(), version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_one_aggregate_share_commits_and_add_up() {
    let f = hot_sku().await;
    let before = f.handlers.store.commits();
    let mut reservations = tokio::task::JoinSet::new();
    for _ in 0..200 {
        reservations.spawn(reserve(f.handlers.clone(), "S-HOT", None));
    }
    while let Some(done) = reservations.join_next().await {
        done.expect("task").expect("reserved");
    }
    let commits = f.handlers.store.commits() - before;
    assert!(
        commits < 200,
        "200 commands on one aggregate took {commits} commits: each waited for the one before"
    );
    assert_eq!(held(&f).await, (200, 201));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_behind_an_append_that_fails_decide_again_on_what_was_written() {
    let f = hot_sku().await;
    reserve(f.handlers.clone(), "S-HOT", Some(("k", "first")))
        .await
        .expect("first use of the key");
    // The key reused for another request fails after it was queued; the commands
    // queued behind it decided on a reservation that is never written.
    let mut rest = tokio::task::JoinSet::new();
    let reused = tokio::spawn(reserve(f.handlers.clone(), "S-HOT", Some(("k", "another"))));
    for _ in 0..20 {
        rest.spawn(reserve(f.handlers.clone(), "S-HOT", None));
    }
    let reused = reused.await.expect("task");
    assert!(
        matches!(reused, Err(crate::app::CommandError::KeyReused)),
        "{reused:?}"
    );
    while let Some(done) = rest.join_next().await {
        done.expect("task").expect("reserved");
    }
    assert_eq!(held(&f).await, (21, 22));
    let events = f
        .handlers
        .store
        .load_stream("inventory", "S-HOT")
        .await
        .expect("stream");
    assert_eq!(events.len(), 22);
}

#[tokio::test]
async fn a_command_on_an_aggregate_this_process_does_not_hold_is_decided_on_what_is_stored() {
    let f = fixture().await;
    let restock = domain::inventory::InventoryCommand::Restock {
        quantity: domain::Quantity::new(5).expect("quantity"),
    };
    let meta = crate::app::Meta::fresh;
    f.handlers
        .execute::<domain::inventory::InventoryItem>("S-1", &restock, &meta())
        .await
        .expect("first restock");
    // Another process (nothing in memory) guesses the sku is new; the guess fails the
    // version check and the command is decided again on the stored stream.
    let other = Handlers::new(f.handlers.store.clone(), Metrics::default());
    other
        .execute::<domain::inventory::InventoryItem>("S-1", &restock, &meta())
        .await
        .expect("second restock");
    let (item, version, _) = other
        .load::<domain::inventory::InventoryItem>("S-1")
        .await
        .expect("load");
    assert_eq!((item.on_hand, version), (10, 2));
}

/// The saga as it is when the answers to its commits are lost: every batch is
/// committed, and the runner hears only that its round failed.
struct AnswersLost<'a>(&'a SagaRunner);

impl Handler for AnswersLost<'_> {
    type Item = schemas::RecordedEvent;
    type Done = crate::saga::Folded;

    fn consumer(&self) -> &infra::consume::Consumer {
        self.0.consumer()
    }

    async fn apply(
        &self,
        tx: &mut sqlx::AnyConnection,
        events: &[schemas::RecordedEvent],
        failures: &mut infra::consume::Failures,
    ) -> Result<crate::saga::Folded, infra::InfraError> {
        self.0.apply(tx, events, failures).await
    }

    fn after(&self, _: crate::saga::Folded, _checkpoint: i64) {
        self.0.failed();
    }

    fn reading(&self) {
        self.0.reading();
    }
}

/// An order carried through by a saga whose commits' answers are all lost: it is
/// confirmed all the same (each batch folded on the states stored, not on older ones
/// kept in memory), and once the runner has read again it no longer counts the
/// order in flight (left counted, each such order would bring the door's bound
/// nearer for good).
#[tokio::test]
async fn an_order_settled_by_commits_whose_answers_were_lost_leaves_the_backlog() {
    let f = fixture().await;
    let (saga, source) = saga(&f).await;
    saga.count_backlog().await.expect("counted");
    let id = place(&f, "tok_ok").await;
    assert_eq!(f.handlers.backlog.in_flight(), 1);
    let unheard = AnswersLost(&saga);
    loop {
        let moved = step(&source, &unheard).await.expect("step") != Step::Idle;
        let idle = saga.between(true).await.expect("between");
        let dispatched = saga.dispatch().await.expect("dispatch");
        if !moved && !dispatched && idle != Idle::Busy {
            break;
        }
    }
    assert!(event_types(&f, "order", &id)
        .await
        .contains(&"OrderConfirmed".to_owned()));
    assert_eq!(f.handlers.backlog.in_flight(), 0);
}
