//! A customer's whole journey with auth on, as the README walks it: register, log
//! in, search the catalog, fill a cart, check out, follow the order to delivery, and
//! receive a message at each step.

use crate::support::{bearer, on_every_backend, sign_up, Api, Backend, TestServer, SETTLE};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::{Duration, Instant};

on_every_backend!(a_customer_finds_fills_checks_out_follows_and_hears_of_its_order);

async fn a_customer_finds_fills_checks_out_follows_and_hears_of_its_order(backend: Backend) {
    let (server, secrets) = TestServer::secured(backend, None).await;
    let operator = bearer(&server.base, &secrets.operator);
    let anyone = Api::from(&server);

    // The shop: a product with stock.
    let (status, body) = operator
        .post(
            "/v1/products",
            json!({ "sku": "S-1", "name": "Green tea", "description": "Loose leaves, 100 g", "price_cents": 1299 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    operator.restock("S-1", 10).await;

    // Register and log in.
    let (_, _, ada) = sign_up(&server, "Ada").await;

    // Search the catalog.
    let found = anyone
        .eventually("/v1/products?q=green%20tea", "found", |page| {
            page["items"][0]["sku"] == "S-1" && page["items"][0]["available"] == 10
        })
        .await;
    let price = found["items"][0]["price_cents"].as_i64().expect("price");

    // Fill the cart (once the cart service has heard of the product) and check out.
    let start = Instant::now();
    loop {
        let answer = crate::support::body(
            ada.client
                .request(Method::PUT, ada.url("/v1/cart/lines/S-1"))
                .json(&json!({ "quantity": 2 }))
                .send()
                .await
                .expect("request"),
        )
        .await;
        if answer.0 == StatusCode::ACCEPTED {
            break;
        }
        assert!(start.elapsed() < SETTLE, "{answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ada.eventually("/v1/cart", "filled", |cart| {
        cart["total_cents"] == 2 * price
    })
    .await;
    let (status, checked_out) = crate::support::body(
        ada.client
            .post(ada.url("/v1/cart/checkout"))
            .header("idempotency-key", "checkout-0001")
            .json(&json!({ "payment_token": "tok_ok" }))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{checked_out}");
    let order_id = checked_out["order_id"]
        .as_str()
        .expect("order id")
        .to_owned();

    // Follow it to delivery.
    ada.order_settles(&order_id, "confirmed").await;
    for step in ["dispatch", "deliver"] {
        let (status, body) = operator
            .post(&format!("/v1/shipments/{order_id}/{step}"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{step}: {body}");
    }
    let delivered = ada
        .eventually(
            &format!("/v1/orders/{order_id}"),
            "delivered and paid",
            |o| o["status"] == "delivered" && o["payment_status"] == "captured",
        )
        .await;
    assert_eq!(delivered["total_cents"], 2 * price);

    // Hear of each step, once.
    let page = ada
        .eventually("/v1/notifications", "three messages", |page| {
            page["items"].as_array().map(Vec::len) == Some(3)
        })
        .await;
    let mut kinds: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| n["kind"].as_str().expect("kind"))
        .collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        ["order_confirmed", "order_delivered", "order_shipped"]
    );
    assert!(page["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|n| n["order_id"] == order_id.as_str() && n["channel"] == "file"));
    server.finish().await;
}
