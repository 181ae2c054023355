//! The query routes, called without a socket on real SQLite read models.

use super::*;
use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use infra::scratch::Scratch;
use projectors::projection::{ReadModel, ALL};
use serde_json::{json, Value};
use tower::ServiceExt;

struct Fixture {
    state: QueryState,
    scratch: Scratch,
}

async fn fixture() -> Fixture {
    let scratch = Scratch::new().await.expect("scratch");
    for projection in ALL {
        scratch
            .db
            .migrate(&projection.create_tables(""))
            .await
            .expect("tables");
    }
    let pool = Some(scratch.db.pool.clone());
    let state = QueryState {
        store: scratch.store.clone(),
        progress: Progress::default(),
        orders: pool.clone(),
        inventory: pool.clone(),
        payments: pool.clone(),
        shipments: pool.clone(),
        customers: pool.clone(),
        catalog: pool.clone(),
        cart: pool.clone(),
        notifications: pool,
        stream_reads: QueryState::stream_reads(),
        // The point reads of the embedded deployment (on the task, not the pool).
        files: Files {
            orders: scratch.db.sqlite_file(),
            inventory: scratch.db.sqlite_file(),
            payments: scratch.db.sqlite_file(),
            shipments: scratch.db.sqlite_file(),
            customers: scratch.db.sqlite_file(),
            catalog: scratch.db.sqlite_file(),
            cart: scratch.db.sqlite_file(),
        },
    };
    Fixture { state, scratch }
}

/// GET `path` with `headers`: the status, the content type and the body as JSON.
async fn get(
    state: &QueryState,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, Value) {
    let mut request = Request::get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (router, _) = router(state.clone()).split_for_parts();
    let response = router
        .layer(axum::middleware::from_fn(infra::auth::unchecked))
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("answer");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, content_type, json)
}

#[tokio::test]
async fn stock_is_read_from_the_read_model_with_what_is_available() {
    let f = fixture().await;
    sqlx::query("INSERT INTO inventory_levels (sku, on_hand, reserved, updated_at) VALUES ('S-1', 10, 3, 'x')")
        .execute(&f.scratch.db.pool)
        .await
        .expect("row");
    let (status, _, body) = get(&f.state, "/v1/inventory/S-1", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"sku": "S-1", "on_hand": 10, "reserved": 3, "available": 7})
    );
    let (status, content_type, body) = get(&f.state, "/v1/inventory/S-9", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(body["status"], 404);
}

#[tokio::test]
async fn a_malformed_id_or_parameter_is_refused_with_a_problem() {
    let f = fixture().await;
    let (status, content_type, body) = get(&f.state, "/v1/orders/not-a-uuid", &[]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(content_type, "application/problem+json");
    assert!(body["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("not a UUID"));
    let (status, _, _) = get(&f.state, "/v1/orders?limit=0", &[]).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _, _) = get(&f.state, "/v1/orders?colour=red", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, body) = get(&f.state, "/v1/streams/widget/1", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("order, inventory, payment, shipment"));
}

#[tokio::test]
async fn orders_are_listed_newest_first_a_page_at_a_time() {
    let f = fixture().await;
    for n in 1..=3u128 {
        sqlx::query(
            "INSERT INTO orders (order_id, customer_id, status, lines, total_cents, placed_at, updated_at)
             VALUES ($1, 'c-1', 'pending', '[]', 100, '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z')",
        )
        .bind(Uuid::from_u128(n).to_string())
        .execute(&f.scratch.db.pool)
        .await
        .expect("row");
    }
    let (status, _, page) = get(&f.state, "/v1/orders?limit=2", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o["order_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![
            Uuid::from_u128(3).to_string(),
            Uuid::from_u128(2).to_string()
        ]
    );
    let cursor = page["next_cursor"].as_str().expect("more").to_owned();
    let (_, _, rest) = get(
        &f.state,
        &format!("/v1/orders?limit=2&cursor={cursor}"),
        &[],
    )
    .await;
    assert_eq!(rest["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(rest["next_cursor"], Value::Null);
}

#[tokio::test]
async fn a_read_waits_for_its_consistency_token_and_answers_503_when_it_does_not_come() {
    let f = fixture().await;
    sqlx::query("INSERT INTO inventory_levels (sku, on_hand, reserved, updated_at) VALUES ('S-1', 1, 0, 'x')")
        .execute(&f.scratch.db.pool)
        .await
        .expect("row");
    // A token past the log's head was never issued: refused, not waited for.
    let (status, _, body) = get(
        &f.state,
        "/v1/inventory/S-1",
        &[("x-consistency-token", "5")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let restocked = ("StockRestocked".to_owned(), 1, serde_json::json!({}));
    f.scratch
        .append("inventory", "S-1", vec![restocked; 5])
        .await
        .expect("events");
    let token = [
        ("x-consistency-token", "5"),
        ("x-consistency-wait-ms", "20"),
    ];
    let (status, _, body) = get(&f.state, "/v1/inventory/S-1", &token).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["type"], "urn:orderline:problem:not-yet-consistent");
    f.state.progress.set_checkpoint("inventory", 5);
    let (status, _, _) = get(&f.state, "/v1/inventory/S-1", &token).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get(
        &f.state,
        "/v1/inventory/S-1",
        &[("x-consistency-token", "later")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A stream token is what the distributed deployment issues, not this one.
    let (status, _, body) = get(
        &f.state,
        "/v1/inventory/S-1",
        &[("x-consistency-token", "inventory:S-1:1")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    f.state.progress.issue_stream_tokens();
    let (status, _, body) = get(&f.state, "/v1/inventory/S-1", &token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn stream_reads_past_the_bound_are_refused_not_queued() {
    let f = fixture().await;
    let held = f
        .state
        .stream_reads
        .clone()
        .acquire_many_owned(STREAM_READS as u32)
        .await
        .expect("permits");
    let (status, content_type, problem) = get(&f.state, "/v1/streams/inventory/S-1", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(problem["type"], "urn:orderline:problem:busy");
    drop(held);
    let (status, _, _) = get(&f.state, "/v1/streams/inventory/S-1", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a read goes through again");
}
