//! The catalog (auth on): operators add and change products; anyone lists and
//! searches them (full text: FTS5 on SQLite, text search on PostgreSQL), with the
//! stock available; orders are taken only for products on sale, at their prices now.

use crate::support::{bearer, on_every_backend, sign_up, Api, Backend, TestServer, SETTLE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

on_every_backend!(operators_keep_the_catalog_anyone_searches_it_and_orders_pay_its_prices);

/// The skus of a page of products.
fn skus(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| p["sku"].as_str().expect("sku").to_owned())
        .collect()
}

/// Place an order of one line until it is not refused for a price the order
/// service has not heard of yet; the last answer.
async fn order_when_priced(api: &Api, sku: &str, price: i64, refusal: &str) -> (StatusCode, Value) {
    let start = Instant::now();
    loop {
        let answer = api
            .post(
                "/v1/orders",
                json!({ "lines": [{ "sku": sku, "quantity": 1, "unit_price_cents": price }], "payment_token": "tok_ok" }),
            )
            .await;
        let type_ = answer.1["type"].as_str().unwrap_or_default().to_owned();
        if !type_.ends_with(refusal) || start.elapsed() > SETTLE {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn operators_keep_the_catalog_anyone_searches_it_and_orders_pay_its_prices(backend: Backend) {
    let (server, secrets) = TestServer::secured(backend, None).await;
    let operator = bearer(&server.base, &secrets.operator);
    let anyone = Api::from(&server);
    let products = [
        ("TEA-1", "Green tea", "Loose leaves from Shizuoka", 450),
        ("TEA-2", "Black tea", "Assam, strong", 390),
        ("MUG-1", "Mug", "Stoneware; holds a pot of tea", 1200),
    ];
    for (sku, name, description, price) in products {
        let (status, created) = operator
            .post(
                "/v1/products",
                json!({ "sku": sku, "name": name, "description": description, "price_cents": price }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(created["sku"], sku);
    }
    let create = |sku: &str, price: i64| json!({ "sku": sku, "name": "X", "description": "", "price_cents": price });
    for (body, expected) in [
        (create("TEA-1", 1), StatusCode::CONFLICT),
        (create("BAD SKU", 1), StatusCode::UNPROCESSABLE_ENTITY),
        (create("NEG-1", -1), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({ "sku": "X-1", "name": "X", "description": "", "price_cents": 1, "colour": "red" }),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, problem) = operator.post("/v1/products", body.clone()).await;
        assert_eq!(status, expected, "{body}: {problem}");
    }
    let (status, _) = operator
        .send(
            Method::PATCH,
            "/v1/products/NOPE-1",
            json!({ "price_cents": 1 }),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = anyone.post("/v1/products", create("ANON-1", 1)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Anyone lists and searches, with the stock available.
    operator.restock("TEA-1", 5).await;
    anyone
        .eventually("/v1/products/TEA-1", "stocked", |p| {
            p["available"] == 5 && p["price_cents"] == 450 && p["active"] == true
        })
        .await;
    anyone
        .eventually("/v1/products?q=tea", "three teas", |page| {
            skus(page) == ["MUG-1", "TEA-1", "TEA-2"]
        })
        .await;
    for (q, expected) in [
        ("green", vec!["TEA-1"]),
        ("GREEN leaves", vec!["TEA-1"]),
        ("stoneware tea", vec!["MUG-1"]),
        ("coffee", vec![]),
        ("\"*(", vec![]),
    ] {
        let (status, page) = anyone
            .get(&format!("/v1/products?q={}", q.replace(' ', "%20")))
            .await;
        assert_eq!(status, StatusCode::OK, "{q}: {page}");
        assert_eq!(skus(&page), expected, "search {q:?}");
    }
    let (_, first) = anyone.get("/v1/products?limit=2").await;
    assert_eq!(skus(&first), ["MUG-1", "TEA-1"]);
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let (_, second) = anyone
        .get(&format!("/v1/products?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(skus(&second), ["TEA-2"]);
    assert!(second["next_cursor"].is_null());
    let (status, _) = anyone.get("/v1/products?limit=0").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Orders pay the catalog's prices, for products on sale.
    let (_, _, kim) = sign_up(&server, "Kim").await;
    let (status, placed) = order_when_priced(&kim, "TEA-1", 450, "invalid-value").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    let (status, stale) = kim
        .post(
            "/v1/orders",
            json!({ "lines": [{ "sku": "TEA-1", "quantity": 1, "unit_price_cents": 400 }], "payment_token": "tok_ok" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{stale}");
    assert!(
        stale["type"]
            .as_str()
            .expect("type")
            .ends_with("price-changed"),
        "{stale}"
    );
    let (status, _) = operator
        .send(
            Method::PATCH,
            "/v1/products/TEA-1",
            json!({ "price_cents": 500 }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = order_when_priced(&kim, "TEA-1", 500, "price-changed").await;
    assert_eq!(status, StatusCode::ACCEPTED, "the new price");
    let (status, old) = kim
        .post(
            "/v1/orders",
            json!({ "lines": [{ "sku": "TEA-1", "quantity": 1, "unit_price_cents": 450 }], "payment_token": "tok_ok" }),
        )
        .await;
    assert!(
        old["type"]
            .as_str()
            .expect("type")
            .ends_with("price-changed"),
        "{status} {old}"
    );
    let (status, _) = operator
        .send(
            Method::PATCH,
            "/v1/products/TEA-2",
            json!({ "active": false }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    anyone
        .eventually("/v1/products/TEA-2", "off sale", |p| p["active"] == false)
        .await;
    let (status, _) = order_when_priced(&kim, "TEA-2", 390, "never").await;
    let start = Instant::now();
    let mut status = status;
    while status != StatusCode::UNPROCESSABLE_ENTITY && start.elapsed() < SETTLE {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = order_when_priced(&kim, "TEA-2", 390, "never").await.0;
    }
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a product off sale"
    );
    let (status, _) = order_when_priced(&kim, "NONE-1", 100, "never").await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "an unknown product"
    );

    // A rebuild of the catalog keeps its search.
    let (status, body) = operator
        .post("/v1/projections/catalog/rebuild", json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    operator.projection_running("catalog").await;
    anyone
        .eventually("/v1/products?q=green", "found after the rebuild", |page| {
            skus(page) == ["TEA-1"]
        })
        .await;
    server.finish().await;
}
