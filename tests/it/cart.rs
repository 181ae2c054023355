//! The cart (auth on): a customer fills it with products on sale, sees it priced by
//! the catalog, and checks it out into an order exactly once, however often the
//! checkout is retried.

use crate::support::{bearer, on_every_backend, sign_up, Api, Backend, TestServer, SETTLE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

on_every_backend!(a_customer_fills_a_cart_and_checks_it_out_into_one_order);

/// PUT a line, retrying while the cart service has not heard of the product yet.
async fn put_line(api: &Api, sku: &str, quantity: i64) -> (StatusCode, Value) {
    let start = Instant::now();
    loop {
        let answer = api
            .send(
                Method::PUT,
                &format!("/v1/cart/lines/{sku}"),
                json!({ "quantity": quantity }),
            )
            .await;
        if answer.0 != StatusCode::UNPROCESSABLE_ENTITY || start.elapsed() > SETTLE {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn checkout(api: &Api, key: &str) -> (StatusCode, Value) {
    crate::support::body(
        api.client
            .post(api.url("/v1/cart/checkout"))
            .header("idempotency-key", key)
            .json(&json!({ "payment_token": "tok_ok" }))
            .send()
            .await
            .expect("request"),
    )
    .await
}

async fn a_customer_fills_a_cart_and_checks_it_out_into_one_order(backend: Backend) {
    let (server, secrets) = TestServer::secured(backend, None).await;
    let operator = bearer(&server.base, &secrets.operator);
    for (sku, price) in [("TEA-1", 450), ("MUG-1", 1200), ("OLD-1", 100)] {
        let (status, body) = operator
            .post(
                "/v1/products",
                json!({ "sku": sku, "name": sku, "description": "", "price_cents": price }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        operator.restock(sku, 10).await;
    }
    let (status, _) = operator
        .send(
            Method::PATCH,
            "/v1/products/OLD-1",
            json!({ "active": false }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let (customer_id, _, lee) = sign_up(&server, "Lee").await;

    // An empty cart cannot be checked out.
    let (status, empty) = checkout(&lee, "empty-1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{empty}");

    let (status, body) = put_line(&lee, "TEA-1", 3).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = put_line(&lee, "MUG-1", 1).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = put_line(&lee, "TEA-1", 2).await;
    assert_eq!(status, StatusCode::ACCEPTED, "a new quantity: {body}");
    let (status, _) = lee
        .send(
            Method::PUT,
            "/v1/cart/lines/NONE-1",
            json!({ "quantity": 1 }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "an unknown product"
    );
    // Off sale: refused once the cart service has heard so.
    let start = Instant::now();
    loop {
        let (status, _) = lee
            .send(
                Method::PUT,
                "/v1/cart/lines/OLD-1",
                json!({ "quantity": 1 }),
            )
            .await;
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            break;
        }
        assert!(
            start.elapsed() < SETTLE,
            "a product off sale went into the cart: {status}"
        );
        let _ = lee
            .send(Method::DELETE, "/v1/cart/lines/OLD-1", json!({}))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = lee
        .send(Method::DELETE, "/v1/cart/lines/OLD-1", json!({}))
        .await;
    let (status, _) = lee
        .send(
            Method::PUT,
            "/v1/cart/lines/MUG-1",
            json!({ "quantity": -1 }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = put_line(&lee, "SPARE-1", 0).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "0 of what is not in the cart changes nothing"
    );
    let cart = lee
        .eventually("/v1/cart", "two lines", |cart| {
            cart["lines"].as_array().map(Vec::len) == Some(2)
                && cart["total_cents"] == 2 * 450 + 1200
        })
        .await;
    assert_eq!(
        cart["lines"],
        json!([
            { "sku": "MUG-1", "quantity": 1, "unit_price_cents": 1200 },
            { "sku": "TEA-1", "quantity": 2, "unit_price_cents": 450 },
        ])
    );
    let (status, _) = operator.get("/v1/cart").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a cart is a customer's own");

    // Checking out: one order, however often it is retried.
    let (status, first) = checkout(&lee, "checkout-1").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let order_id = first["order_id"].as_str().expect("order id").to_owned();
    for _ in 0..3 {
        let (status, again) = checkout(&lee, "checkout-1").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{again}");
        assert_eq!(again["order_id"], order_id.as_str(), "the same answer");
    }
    let order = lee.order_settles(&order_id, "confirmed").await;
    assert_eq!(order["customer_id"], customer_id.as_str());
    assert_eq!(order["total_cents"], 2 * 450 + 1200);
    lee.eventually("/v1/cart", "empty", |cart| cart["lines"] == json!([]))
        .await;
    let (status, _) = checkout(&lee, "checkout-2").await;
    assert_eq!(status, StatusCode::CONFLICT, "the cart is empty after");
    let (_, page) = lee.get("/v1/orders").await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    let stock = operator.stock("TEA-1").await;
    assert_eq!(stock["reserved"], 2, "{stock}");
    server.finish().await;
}
