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
use infra::EventStore;
use schemas::topics::AGGREGATE_TYPES;
use serde_json::{json, Value};
use std::time::Duration;
use tower::ServiceExt;

struct Fixture {
    handlers: Handlers,
    order_db: Db,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("dir");
    let store = EventStore::open(&dir.path().join("events.db"))
        .await
        .expect("log");
    let order_db = Db::open_sqlite(&dir.path().join("order.db"), 2)
        .await
        .expect("db");
    Fixture {
        handlers: Handlers::new(store, Metrics::default()),
        order_db,
        _dir: dir,
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
        let moved = step(source, saga).await.expect("step") == Step::Moved;
        let idle = saga.between().await.expect("between");
        if !moved && idle != Idle::Busy {
            return idle;
        }
    }
}

#[tokio::test]
async fn the_payment_deadline_fires_when_the_clock_passes_it_and_not_before() {
    let f = fixture().await;
    let clock = ManualClock::at(
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
            .single()
            .expect("time"),
    );
    let saga = SagaRunner::new(
        f.handlers.clone(),
        f.order_db.clone(),
        Duration::from_secs(30),
        Dispatch::InProcess,
    )
    .expect("saga")
    .with_clock(clock.clone());
    let source = LogSource::open(
        f.handlers.store.clone(),
        &AGGREGATE_TYPES,
        NAME,
        &f.order_db,
    )
    .await
    .expect("source");
    post(
        &f.handlers,
        "/v1/inventory/S-1/restock",
        r#"{"quantity": 5}"#,
    )
    .await;
    let (_, placed) = post(&f.handlers, "/v1/orders", &order("tok_no_answer")).await;
    let order_id = placed["order_id"].as_str().expect("order id").to_owned();

    // Reserved and asked to pay; the gateway never answers.
    assert_eq!(
        settle(&saga, &source).await,
        Idle::For(Duration::from_secs(30))
    );
    clock.advance(chrono::Duration::seconds(29));
    settle(&saga, &source).await;
    let stream = f
        .handlers
        .store
        .load_stream("order", &order_id)
        .await
        .expect("stream");
    assert_eq!(stream.len(), 1, "cancelled before the deadline");

    clock.advance(chrono::Duration::seconds(2));
    settle(&saga, &source).await;
    let stream = f
        .handlers
        .store
        .load_stream("order", &order_id)
        .await
        .expect("stream");
    let last = stream.last().expect("events");
    assert_eq!(last.envelope.event_type, "OrderCancelled");
    assert_eq!(last.envelope.payload["reason"], "payment_timeout");
    // The stock is back on the shelf.
    let item = f
        .handlers
        .store
        .load_stream("inventory", "S-1")
        .await
        .expect("stream");
    assert_eq!(
        item.last().expect("events").envelope.event_type,
        "StockReleased"
    );
}

#[tokio::test]
async fn an_order_runs_through_the_saga_to_confirmed() {
    let f = fixture().await;
    let saga = SagaRunner::new(
        f.handlers.clone(),
        f.order_db.clone(),
        Duration::from_secs(30),
        Dispatch::InProcess,
    )
    .expect("saga");
    let source = LogSource::open(
        f.handlers.store.clone(),
        &AGGREGATE_TYPES,
        saga.name(),
        &f.order_db,
    )
    .await
    .expect("source");
    post(
        &f.handlers,
        "/v1/inventory/S-1/restock",
        r#"{"quantity": 5}"#,
    )
    .await;
    let (_, placed) = post(&f.handlers, "/v1/orders", &order("tok_ok")).await;
    let order_id = placed["order_id"].as_str().expect("order id").to_owned();
    assert_eq!(
        settle(&saga, &source).await,
        Idle::For(Duration::from_secs(60))
    );
    let types: Vec<String> = f
        .handlers
        .store
        .load_stream("order", &order_id)
        .await
        .expect("stream")
        .into_iter()
        .map(|e| e.envelope.event_type)
        .collect();
    assert_eq!(types, vec!["OrderPlaced", "OrderConfirmed"]);
}
