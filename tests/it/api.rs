//! Every row of the public contract, through a real server.

use crate::support::{body, metric, on_every_backend, Api, Backend, TestServer, SETTLE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

on_every_backend!(
    an_order_goes_from_restock_to_delivery,
    an_order_for_missing_stock_is_cancelled_as_out_of_stock_and_holds_nothing,
    a_declined_payment_cancels_the_order_and_releases_the_stock,
    an_unanswered_payment_times_out_releases_the_stock_and_voids_the_request,
    a_customer_cancel_before_dispatch_releases_the_stock_and_voids_the_payment,
    a_shipped_order_cannot_be_cancelled,
    dispatch_needs_a_confirmed_order_and_delivery_a_dispatched_one,
    unknown_resources_are_404_problems,
    errors_of_routing_and_extractors_are_problems_too,
    malformed_bodies_are_400_and_write_nothing,
    invalid_values_are_422_and_write_nothing,
    a_body_over_the_limit_is_413,
    the_same_idempotency_key_returns_the_first_answer_and_changes_nothing,
    a_read_with_a_consistency_token_reflects_the_write,
    a_token_not_yet_reached_answers_503_with_retry_after,
    orders_are_listed_by_customer_and_status_page_by_page,
    a_stream_shows_every_envelope_field_in_version_order,
    a_stream_is_read_a_page_at_a_time,
    operators_see_health_projections_and_metrics,
);

fn price(order: &Value) -> u64 {
    order["total_cents"].as_u64().expect("total")
}

async fn an_order_goes_from_restock_to_delivery(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("S-1", 10).await;
    api.restock("S-2", 3).await;
    let id = api
        .place("c-1", &[("S-1", 2, 1299), ("S-2", 1, 500)], "tok_ok")
        .await;

    let order = api.order_settles(&id, "confirmed").await;
    assert_eq!(price(&order), 2 * 1299 + 500);
    assert_eq!(order["customer_id"], "c-1");
    assert_eq!(order["payment_status"], "authorized");
    assert_eq!(order["shipment_status"], "created");
    assert_eq!(order["cancel_reason"], Value::Null);
    assert_eq!(
        order["lines"][0],
        json!({ "sku": "S-1", "quantity": 2, "unit_price_cents": 1299 })
    );
    let stock = api
        .eventually("/v1/inventory/S-1", "reserved", |s| s["reserved"] == 2)
        .await;
    assert_eq!(
        stock,
        json!({ "sku": "S-1", "on_hand": 10, "reserved": 2, "available": 8 })
    );

    let (status, accepted) = api
        .post(&format!("/v1/shipments/{id}/dispatch"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let order = api
        .eventually(&format!("/v1/orders/{id}"), "shipped and captured", |o| {
            o["status"] == "shipped"
                && o["payment_status"] == "captured"
                && o["shipment_status"] == "dispatched"
        })
        .await;
    assert_eq!(order["status"], "shipped");
    api.eventually("/v1/inventory/S-1", "committed", |s| {
        *s == json!({ "sku": "S-1", "on_hand": 8, "reserved": 0, "available": 8 })
    })
    .await;

    let (status, _) = api
        .post(&format!("/v1/shipments/{id}/deliver"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    api.eventually(&format!("/v1/orders/{id}"), "delivered", |o| {
        o["status"] == "delivered" && o["shipment_status"] == "delivered"
    })
    .await;
    let payment = api
        .eventually(&format!("/v1/payments/{id}"), "captured", |p| {
            p["status"] == "captured"
        })
        .await;
    assert_eq!(payment["captured_cents"], json!(2 * 1299 + 500));
    server.finish().await;
}

async fn an_order_for_missing_stock_is_cancelled_as_out_of_stock_and_holds_nothing(
    backend: Backend,
) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("A", 5).await;
    api.restock("B", 1).await;
    let id = api
        .place("c-1", &[("A", 2, 100), ("B", 3, 100)], "tok_ok")
        .await;
    let order = api.order_settles(&id, "cancelled").await;
    assert_eq!(order["cancel_reason"], "out_of_stock");
    assert_eq!(
        order["payment_status"],
        Value::Null,
        "no payment is asked for"
    );
    api.quiesce().await;
    assert_eq!(
        api.stock("A").await,
        json!({ "sku": "A", "on_hand": 5, "reserved": 0, "available": 5 })
    );
    assert_eq!(
        api.stock("B").await,
        json!({ "sku": "B", "on_hand": 1, "reserved": 0, "available": 1 })
    );
    // A sku never stocked is out of stock too.
    let id = api.place("c-1", &[("NEVER", 1, 100)], "tok_ok").await;
    assert_eq!(
        api.order_settles(&id, "cancelled").await["cancel_reason"],
        "out_of_stock"
    );
    server.finish().await;
}

async fn a_declined_payment_cancels_the_order_and_releases_the_stock(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("A", 5).await;
    let id = api.place("c-1", &[("A", 2, 100)], "tok_decline").await;
    let order = api.order_settles(&id, "cancelled").await;
    assert_eq!(order["cancel_reason"], "payment_declined");
    assert_eq!(order["payment_status"], "declined");
    api.quiesce().await;
    assert_eq!(api.stock("A").await["available"], 5);
    assert_eq!(api.stock("A").await["reserved"], 0);
    server.finish().await;
}

async fn an_unanswered_payment_times_out_releases_the_stock_and_voids_the_request(
    backend: Backend,
) {
    let server = TestServer::on_with(backend, Duration::from_millis(300)).await;
    let api = Api::from(&server);
    api.restock("A", 5).await;
    let id = api.place("c-1", &[("A", 2, 100)], "tok_no_answer").await;
    let order = api.order_settles(&id, "cancelled").await;
    assert_eq!(order["cancel_reason"], "payment_timeout");
    api.quiesce().await;
    assert_eq!(api.order(&id).await["payment_status"], "voided");
    assert_eq!(api.stock("A").await["available"], 5);
    server.finish().await;
}

async fn a_customer_cancel_before_dispatch_releases_the_stock_and_voids_the_payment(
    backend: Backend,
) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("A", 5).await;
    let id = api.place("c-1", &[("A", 2, 100)], "tok_ok").await;
    api.order_settles(&id, "confirmed").await;
    let (status, body) = api
        .post(
            &format!("/v1/orders/{id}/cancel"),
            json!({ "reason": "changed my mind" }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["order_id"], id.as_str());
    let order = api
        .eventually(
            &format!("/v1/orders/{id}"),
            "cancelled and compensated",
            |o| {
                o["status"] == "cancelled"
                    && o["payment_status"] == "voided"
                    && o["shipment_status"] == "cancelled"
            },
        )
        .await;
    assert_eq!(order["cancel_reason"], "customer_request");
    api.quiesce().await;
    assert_eq!(api.stock("A").await["available"], 5);
    let payment = api.get(&format!("/v1/payments/{id}")).await.1;
    assert_eq!(payment["voided_cents"], 200);
    assert_eq!(payment["captured_cents"], 0);

    // A pending order can be cancelled too (its payment never answers).
    let id = api.place("c-1", &[("A", 1, 100)], "tok_no_answer").await;
    api.eventually(&format!("/v1/orders/{id}"), "awaiting payment", |o| {
        o["payment_status"] == "requested"
    })
    .await;
    let (status, _) = api
        .post(&format!("/v1/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    api.eventually(&format!("/v1/orders/{id}"), "cancelled", |o| {
        o["status"] == "cancelled" && o["payment_status"] == "voided"
    })
    .await;
    api.quiesce().await;
    assert_eq!(api.stock("A").await["available"], 5);
    server.finish().await;
}

async fn a_shipped_order_cannot_be_cancelled(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("A", 5).await;
    let id = api.place("c-1", &[("A", 1, 100)], "tok_ok").await;
    api.order_settles(&id, "confirmed").await;
    assert_eq!(
        api.post(&format!("/v1/shipments/{id}/dispatch"), json!({}))
            .await
            .0,
        StatusCode::ACCEPTED
    );
    let head = api.head().await;
    let (status, problem) = api
        .post(&format!("/v1/orders/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["status"], 409);
    api.quiesce().await;
    assert_eq!(api.order(&id).await["status"], "shipped");
    // Cancelling twice is refused as well.
    let id2 = api.place("c-1", &[("A", 1, 100)], "tok_ok").await;
    assert_eq!(
        api.post(&format!("/v1/orders/{id2}/cancel"), json!({}))
            .await
            .0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        api.post(&format!("/v1/orders/{id2}/cancel"), json!({}))
            .await
            .0,
        StatusCode::CONFLICT
    );
    assert!(api.head().await > head);
    server.finish().await;
}

async fn dispatch_needs_a_confirmed_order_and_delivery_a_dispatched_one(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("A", 5).await;
    let pending = api.place("c-1", &[("A", 1, 100)], "tok_no_answer").await;
    api.eventually(&format!("/v1/orders/{pending}"), "awaiting payment", |o| {
        o["payment_status"] == "requested"
    })
    .await;
    let (status, problem) = api
        .post(&format!("/v1/shipments/{pending}/dispatch"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(
        api.post(&format!("/v1/shipments/{pending}/deliver"), json!({}))
            .await
            .0,
        StatusCode::CONFLICT
    );

    let confirmed = api.place("c-1", &[("A", 1, 100)], "tok_ok").await;
    api.order_settles(&confirmed, "confirmed").await;
    assert_eq!(
        api.post(&format!("/v1/shipments/{confirmed}/deliver"), json!({}))
            .await
            .0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        api.post(&format!("/v1/shipments/{confirmed}/dispatch"), json!({}))
            .await
            .0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        api.post(&format!("/v1/shipments/{confirmed}/dispatch"), json!({}))
            .await
            .0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        api.post(&format!("/v1/shipments/{confirmed}/deliver"), json!({}))
            .await
            .0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        api.post(&format!("/v1/shipments/{confirmed}/deliver"), json!({}))
            .await
            .0,
        StatusCode::CONFLICT
    );
    server.finish().await;
}

fn assert_problem(status: StatusCode, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["status"], expected.as_u16(), "{body}");
    for field in ["type", "title", "detail"] {
        assert!(
            body[field].as_str().is_some_and(|s| !s.is_empty()),
            "problem lacks {field}: {body}"
        );
    }
}

async fn unknown_resources_are_404_problems(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    let missing = "0190a0e4-1f00-7000-8000-000000000000";
    for path in [
        format!("/v1/orders/{missing}"),
        "/v1/inventory/NOPE".to_owned(),
        "/v1/no/such/route".to_owned(),
        format!("/v1/streams/order/{missing}"),
        "/v1/streams/widget/1".to_owned(),
        format!("/v1/payments/{missing}"),
    ] {
        let (status, body) = api.get(&path).await;
        assert_problem(status, &body, StatusCode::NOT_FOUND);
    }
    for path in [
        format!("/v1/orders/{missing}/cancel"),
        format!("/v1/shipments/{missing}/dispatch"),
        format!("/v1/shipments/{missing}/deliver"),
        "/v1/projections/nope/rebuild".to_owned(),
    ] {
        let (status, body) = api.post(&path, json!({})).await;
        assert_problem(status, &body, StatusCode::NOT_FOUND);
    }
    let response = server
        .client
        .get(server.url("/v1/orders/x/y/z"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    assert_eq!(api.head().await, 0, "nothing was written");
    server.finish().await;
}

/// What the framework answers by itself (a method a route does not take, a path that
/// does not decode) is problem+json like every other error; an Idempotency-Key with a
/// space is refused (the contract says visible ASCII). Nothing is written.
async fn errors_of_routing_and_extractors_are_problems_too(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    let send = |method: reqwest::Method, path: &str| {
        api.client
            .request(method, api.url(path))
            .header("content-type", "application/json")
            .body(r#"{"quantity": 1}"#)
    };
    let cases = [
        (
            send(reqwest::Method::POST, "/health"),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            send(reqwest::Method::DELETE, "/v1/orders"),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            send(reqwest::Method::POST, "/v1/inventory/%FF/restock"),
            StatusCode::BAD_REQUEST,
        ),
        (
            send(reqwest::Method::POST, "/v1/inventory/S-1/restock")
                .header("idempotency-key", "two words"),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (request, expected) in cases {
        let response = request.send().await.expect("request");
        let content_type = response.headers().get("content-type").cloned();
        let allow = response.headers().get("allow").cloned();
        let (status, problem) = body(response).await;
        assert_problem(status, &problem, expected);
        assert_eq!(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{problem}"
        );
        if expected == StatusCode::METHOD_NOT_ALLOWED {
            assert!(allow.is_some(), "a 405 names the methods it takes");
        }
    }
    assert_eq!(api.head().await, 0, "nothing was written");
    server.finish().await;
}

async fn post_raw(api: &Api, path: &str, raw: &str) -> (StatusCode, Value) {
    body(
        api.client
            .post(api.url(path))
            .header("content-type", "application/json")
            .body(raw.to_owned())
            .send()
            .await
            .expect("request"),
    )
    .await
}

async fn malformed_bodies_are_400_and_write_nothing(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    let cases = [
        ("/v1/inventory/S-1/restock", "{\"quantity\": "),
        ("/v1/inventory/S-1/restock", "{\"quantity\": 1, \"colour\": \"red\"}"),
        ("/v1/inventory/S-1/restock", "{}"),
        ("/v1/inventory/S-1/restock", "{\"quantity\": \"ten\"}"),
        ("/v1/inventory/S-1/restock", "[1]"),
        ("/v1/orders", "not json"),
        ("/v1/orders", "{\"customer_id\": \"c\", \"lines\": [], \"payment_token\": \"t\", \"coupon\": 1}"),
        ("/v1/orders", "{\"customer_id\": \"c\", \"payment_token\": \"t\"}"),
        ("/v1/orders", "{\"customer_id\": \"c\", \"lines\": [{\"sku\": \"A\", \"quantity\": 1}], \"payment_token\": \"t\"}"),
    ];
    for (path, raw) in cases {
        let (status, problem) = post_raw(&api, path, raw).await;
        assert_problem(status, &problem, StatusCode::BAD_REQUEST);
    }
    let (status, problem) = post_raw(&api, "/v1/orders", "{\"lines\": 1}").await;
    assert_problem(status, &problem, StatusCode::BAD_REQUEST);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("lines"),
        "{problem}"
    );
    assert_eq!(api.head().await, 0, "nothing was written");
    server.finish().await;
}

async fn invalid_values_are_422_and_write_nothing(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    let line = |sku: &str, quantity: i64, price: i64| json!({ "sku": sku, "quantity": quantity, "unit_price_cents": price });
    let order = |customer: &str, lines: Vec<Value>, token: &str| json!({ "customer_id": customer, "lines": lines, "payment_token": token });
    let long_sku = "A".repeat(65);
    let cases = vec![
        (
            "/v1/inventory/S-1/restock".to_owned(),
            json!({ "quantity": 0 }),
        ),
        (
            "/v1/inventory/S-1/restock".to_owned(),
            json!({ "quantity": -5 }),
        ),
        (
            "/v1/inventory/S-1/restock".to_owned(),
            json!({ "quantity": 1_000_001 }),
        ),
        (
            "/v1/inventory/bad%20sku/restock".to_owned(),
            json!({ "quantity": 1 }),
        ),
        (
            format!("/v1/inventory/{long_sku}/restock"),
            json!({ "quantity": 1 }),
        ),
        ("/v1/orders".to_owned(), order("c-1", vec![], "tok_ok")),
        (
            "/v1/orders".to_owned(),
            order(
                "c-1",
                (0..101).map(|i| line(&format!("S{i}"), 1, 1)).collect(),
                "tok_ok",
            ),
        ),
        (
            "/v1/orders".to_owned(),
            order("c-1", vec![line("S 1", 1, 1)], "tok_ok"),
        ),
        (
            "/v1/orders".to_owned(),
            order("c-1", vec![line("S-1", 0, 1)], "tok_ok"),
        ),
        (
            "/v1/orders".to_owned(),
            order("c-1", vec![line("S-1", 1, -1)], "tok_ok"),
        ),
        (
            "/v1/orders".to_owned(),
            order("   ", vec![line("S-1", 1, 1)], "tok_ok"),
        ),
        (
            "/v1/orders".to_owned(),
            order("c-1", vec![line("S-1", 1, 1)], ""),
        ),
        ("/v1/orders/not-a-uuid/cancel".to_owned(), json!({})),
        ("/v1/shipments/not-a-uuid/dispatch".to_owned(), json!({})),
    ];
    for (path, request) in cases {
        let (status, problem) = api.post(&path, request.clone()).await;
        assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
        let _ = request;
    }
    let (status, problem) = api
        .post(
            "/v1/orders",
            order("c-1", vec![line("S-1", 1, 1), line("S 2", 1, 1)], "tok_ok"),
        )
        .await;
    assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("lines[1].sku"),
        "{problem}"
    );
    let (status, problem) = api.get("/v1/orders?limit=0").await;
    assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, problem) = api.get("/v1/orders?status=lost").await;
    assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, problem) = api.get("/v1/orders?colour=red").await;
    assert_problem(status, &problem, StatusCode::BAD_REQUEST);
    assert_eq!(api.head().await, 0, "nothing was written");
    server.finish().await;
}

async fn a_body_over_the_limit_is_413(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    let huge = format!("{{\"customer_id\": \"{}\"}}", "x".repeat(100 * 1024));
    // A route that reads its body as JSON, and one that reads raw bytes.
    let missing = "0190a0e4-1f00-7000-8000-000000000000";
    for path in [
        "/v1/orders".to_owned(),
        format!("/v1/shipments/{missing}/dispatch"),
    ] {
        let (status, problem) = post_raw(&api, &path, &huge).await;
        assert_problem(status, &problem, StatusCode::PAYLOAD_TOO_LARGE);
    }
    assert_eq!(api.head().await, 0);
    server.finish().await;
}

async fn the_same_idempotency_key_returns_the_first_answer_and_changes_nothing(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    let send = |key: &str, request: Value| {
        let api = api.clone();
        let key = key.to_owned();
        async move {
            body(
                api.client
                    .post(api.url("/v1/orders"))
                    .header("Idempotency-Key", key)
                    .json(&request)
                    .send()
                    .await
                    .expect("request"),
            )
            .await
        }
    };
    api.restock("A", 10).await;
    let request = json!({ "customer_id": "c-1", "lines": [{ "sku": "A", "quantity": 1, "unit_price_cents": 5 }], "payment_token": "tok_ok" });
    let (first_status, first) = send("key-1", request.clone()).await;
    assert_eq!(first_status, StatusCode::ACCEPTED);
    let (again_status, again) = send("key-1", request.clone()).await;
    assert_eq!(again_status, StatusCode::ACCEPTED);
    assert_eq!(again, first, "the retry answers as the first time");
    api.quiesce().await;
    let (_, page) = api.get("/v1/orders?customer_id=c-1").await;
    assert_eq!(
        page["items"].as_array().map(Vec::len),
        Some(1),
        "one order, not two"
    );
    let head = api.head().await;

    let mut other = request.clone();
    other["lines"][0]["quantity"] = json!(2);
    let (status, problem) = send("key-1", other).await;
    assert_problem(status, &problem, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        problem["type"]
            .as_str()
            .unwrap_or_default()
            .contains("idempotency"),
        "{problem}"
    );

    // Retried in parallel, a key still places one order.
    let racers: Vec<_> = (0..8)
        .map(|_| tokio::spawn(send("key-2", request.clone())))
        .collect();
    let mut ids = vec![];
    for racer in racers {
        let (status, answer) = racer.await.expect("task");
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        ids.push(answer["order_id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every retry names the same order");
    api.quiesce().await;
    let (_, page) = api.get("/v1/orders?customer_id=c-1").await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));
    assert!(api.head().await > head);

    // Restocks too: the key makes a retried restock count once.
    for _ in 0..3 {
        let response = api
            .client
            .post(api.url("/v1/inventory/B/restock"))
            .header("Idempotency-Key", "restock-b")
            .json(&json!({ "quantity": 4 }))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    api.quiesce().await;
    assert_eq!(api.stock("B").await["on_hand"], 4);
    server.finish().await;
}

async fn a_read_with_a_consistency_token_reflects_the_write(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    for round in 1..=20 {
        let response = api
            .client
            .post(api.url("/v1/inventory/T/restock"))
            .json(&json!({ "quantity": 1 }))
            .send()
            .await
            .expect("request");
        let token = response
            .headers()
            .get("x-consistency-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .expect("token header");
        let (_, accepted) = body(response).await;
        assert_eq!(accepted["consistency_token"], token.as_str());
        let read = api
            .client
            .get(api.url("/v1/inventory/T"))
            .header("X-Consistency-Token", &token)
            .send()
            .await
            .expect("request");
        let (status, stock) = body(read).await;
        assert_eq!(status, StatusCode::OK, "{stock}");
        assert_eq!(stock["on_hand"], round, "the read reflects the write");
        // A read model that shows nothing of that write passes it too: a read of it
        // with the write's token is answered (it holds every order event before it).
        let read = api
            .client
            .get(api.url("/v1/orders?customer_id=nobody"))
            .header("X-Consistency-Token", &token)
            .header("X-Consistency-Wait-Ms", "20000")
            .send()
            .await
            .expect("request");
        let (status, page) = body(read).await;
        assert_eq!(status, StatusCode::OK, "{page}");
    }
    let response = api
        .client
        .post(api.url("/v1/orders"))
        .json(&json!({ "customer_id": "c-9", "lines": [{ "sku": "T", "quantity": 1, "unit_price_cents": 1 }], "payment_token": "tok_ok" }))
        .send()
        .await
        .expect("request");
    let (_, accepted) = body(response).await;
    let token = accepted["consistency_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let id = accepted["order_id"].as_str().expect("id").to_owned();
    let read = api
        .client
        .get(api.url(&format!("/v1/orders/{id}")))
        .header("X-Consistency-Token", token)
        .send()
        .await
        .expect("request");
    assert_eq!(read.status(), StatusCode::OK);
    server.finish().await;
}

async fn a_token_not_yet_reached_answers_503_with_retry_after(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("A", 1).await;
    // A token of the kind this deployment issues (a log position embedded, a
    // stream version distributed), far ahead; the other kind was never issued here.
    let (ahead, foreign) = match backend {
        Backend::Distributed => ("inventory:A:99", "999999"),
        _ => ("999999", "inventory:A:99"),
    };
    let response = api
        .client
        .get(api.url("/v1/inventory/A"))
        .header("X-Consistency-Token", ahead)
        .header("X-Consistency-Wait-Ms", "50")
        .send()
        .await
        .expect("request");
    if backend == Backend::Distributed {
        // A stream version a service may yet reach: waited for, then 503.
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().get("retry-after").is_some());
        let (status, problem) = body(response).await;
        assert_problem(status, &problem, StatusCode::SERVICE_UNAVAILABLE);
    } else {
        // A position past the log's head was never issued (the wait for one not yet
        // reached is tested with the query API itself).
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
    let response = api
        .client
        .get(api.url("/v1/inventory/A"))
        .header("X-Consistency-Token", "yesterday")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = api
        .client
        .get(api.url("/v1/inventory/A"))
        .header("X-Consistency-Token", foreign)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    server.finish().await;
}

async fn orders_are_listed_by_customer_and_status_page_by_page(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("A", 100).await;
    let mut mine = vec![];
    for _ in 0..5 {
        mine.push(api.place("alice", &[("A", 1, 10)], "tok_ok").await);
    }
    let declined = api.place("alice", &[("A", 1, 10)], "tok_decline").await;
    api.place("bob", &[("A", 1, 10)], "tok_ok").await;
    api.order_settles(&declined, "cancelled").await;
    for id in &mine {
        api.order_settles(id, "confirmed").await;
    }
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/orders?customer_id=alice&status=confirmed&limit=2".to_owned(),
            Some(c) => format!("/v1/orders?customer_id=alice&status=confirmed&limit=2&cursor={c}"),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 2);
        for item in items {
            assert_eq!(item["customer_id"], "alice");
            assert_eq!(item["status"], "confirmed");
            seen.push(item["order_id"].as_str().expect("id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    mine.sort();
    mine.reverse();
    assert_eq!(seen, mine, "newest first, each once");
    let (_, all_alice) = api.get("/v1/orders?customer_id=alice").await;
    assert_eq!(all_alice["items"].as_array().map(Vec::len), Some(6));
    let (_, cancelled) = api.get("/v1/orders?status=cancelled").await;
    assert_eq!(cancelled["items"][0]["order_id"], declined.as_str());
    server.finish().await;
}

/// `/v1/streams` pages: `from_version` and `limit`, and where the next page starts;
/// out-of-range values are 422, unknown parameters 400.
async fn a_stream_is_read_a_page_at_a_time(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    for _ in 0..5 {
        api.restock("P", 1).await;
    }
    let api = &api;
    let page = |query: &str| {
        let path = format!("/v1/streams/inventory/P{query}");
        async move { api.get(&path).await }
    };
    let versions = |page: &Value| -> Vec<u64> {
        page["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["version"].as_u64())
            .collect()
    };
    let (status, first) = page("?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(versions(&first), [1, 2]);
    assert_eq!(first["next_from_version"], 3);
    let (_, second) = page("?from_version=3&limit=2").await;
    assert_eq!(versions(&second), [3, 4]);
    let (_, last) = page("?from_version=5&limit=2").await;
    assert_eq!(versions(&last), [5]);
    assert_eq!(last["next_from_version"], Value::Null);
    let (status, past) = page("?from_version=9").await;
    assert_eq!((status, versions(&past)), (StatusCode::OK, vec![]));
    let (_, whole) = page("").await;
    assert_eq!(versions(&whole), [1, 2, 3, 4, 5]);
    for (query, expected) in [
        ("?limit=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("?limit=1001", StatusCode::UNPROCESSABLE_ENTITY),
        ("?from_version=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("?from_version=x", StatusCode::UNPROCESSABLE_ENTITY),
        ("?page=2", StatusCode::BAD_REQUEST),
    ] {
        let (status, problem) = page(query).await;
        assert_problem(status, &problem, expected);
    }
    let (status, problem) = api.get("/v1/streams/inventory/NONE?from_version=3").await;
    assert_problem(status, &problem, StatusCode::NOT_FOUND);
    server.finish().await;
}

async fn a_stream_shows_every_envelope_field_in_version_order(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("A", 3).await;
    let id = api.place("c-1", &[("A", 1, 10)], "tok_ok").await;
    api.order_settles(&id, "confirmed").await;
    let (status, stream) = api.get(&format!("/v1/streams/order/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let events = stream["events"].as_array().expect("events");
    let types: Vec<&str> = events
        .iter()
        .filter_map(|e| e["event_type"].as_str())
        .collect();
    assert_eq!(types, ["OrderPlaced", "OrderConfirmed"]);
    for (i, event) in events.iter().enumerate() {
        for field in [
            "event_id",
            "aggregate_type",
            "aggregate_id",
            "version",
            "event_type",
            "schema_version",
            "occurred_at",
            "correlation_id",
            "causation_id",
            "payload",
        ] {
            assert!(!event[field].is_null(), "envelope lacks {field}: {event}");
        }
        assert_eq!(event["version"], i as u64 + 1);
        assert_eq!(event["aggregate_id"], id.as_str());
    }
    assert_eq!(events[0]["schema_version"], 2);
    // The payment token is a secret: kept in the log, not shown.
    assert_eq!(events[0]["payload"]["payment_token"], "[redacted]");
    let (_, payment) = api.get(&format!("/v1/streams/payment/{id}")).await;
    assert_eq!(payment["events"][0]["event_type"], "PaymentRequested");
    assert_eq!(
        payment["events"][0]["payload"]["payment_token"],
        "[redacted]"
    );
    assert!(!payment.to_string().contains("tok_ok"), "{payment}");
    // The saga's confirmation carries the order's correlation id.
    assert_eq!(events[1]["correlation_id"], events[0]["correlation_id"]);
    let (_, stock) = api.get("/v1/streams/inventory/A").await;
    assert_eq!(stock["events"][1]["event_type"], "StockReserved");
    assert_eq!(
        stock["events"][1]["correlation_id"],
        events[0]["correlation_id"]
    );
    server.finish().await;
}

async fn operators_see_health_projections_and_metrics(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    assert_eq!(api.get("/health").await.0, StatusCode::OK);
    api.restock("A", 3).await;
    let id = api.place("c-1", &[("A", 1, 10)], "tok_decline").await;
    api.order_settles(&id, "cancelled").await;
    let _ = api
        .post("/v1/inventory/A/restock", json!({ "quantity": 0 }))
        .await;
    api.quiesce().await;
    let (_, listing) = api.get("/v1/projections").await;
    let names: Vec<&str> = listing["projections"]
        .as_array()
        .expect("projections")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "orders",
            "prices",
            "inventory",
            "payments",
            "shipments",
            "customers",
            "catalog",
            "carts",
            "cart_prices"
        ]
    );
    for projection in listing["projections"].as_array().expect("projections") {
        assert_eq!(projection["lag"], 0, "{projection}");
        assert_eq!(projection["status"], "running");
        assert!(
            projection["checkpoint"].as_i64().is_some_and(|c| c >= 0),
            "{projection}"
        );
    }
    // A gauge that needs the brokers is left out of a scrape that cannot read it in
    // time (a loaded broker): scrape until every one is there.
    let gauges = ["orderline_projection_lag", "orderline_saga_lag"];
    let start = std::time::Instant::now();
    let metrics = loop {
        let metrics = server
            .client
            .get(server.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if gauges.iter().all(|g| metrics.contains(g)) || start.elapsed() > SETTLE {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let expected: [(&str, &[&str], i64); 6] = [
        (
            "orderline_commands_accepted_total",
            &["command=\"restock\""],
            1,
        ),
        (
            "orderline_commands_rejected_total",
            &["command=\"restock\"", "status=\"422\""],
            1,
        ),
        (
            "orderline_events_appended_total",
            &["aggregate_type=\"order\""],
            2,
        ),
        (
            "orderline_saga_outcomes_total",
            &["outcome=\"payment_declined\""],
            1,
        ),
        ("orderline_projection_lag", &["projection=\"orders\""], 0),
        ("orderline_saga_lag", &[], 0),
    ];
    for (name, labels, value) in expected {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "metrics lack {name}:\n{metrics}"
        );
        assert_eq!(
            metric(&metrics, name, labels),
            value,
            "{name}{labels:?} in:\n{metrics}"
        );
    }
    server.finish().await;
}
