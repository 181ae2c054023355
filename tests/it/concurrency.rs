//! Many clients at once: nothing oversold, nothing lost.

use crate::support::{on_every_backend, Api, Backend, TestServer};

on_every_backend!(
    thirty_parallel_orders_for_ten_units_confirm_exactly_ten,
    parallel_restocks_of_one_sku_all_count
);
use reqwest::StatusCode;
use serde_json::json;

async fn thirty_parallel_orders_for_ten_units_confirm_exactly_ten(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    api.restock("HOT", 10).await;
    let orders: Vec<_> = (0..30)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                api.place(&format!("c-{i}"), &[("HOT", 1, 100)], "tok_ok")
                    .await
            })
        })
        .collect();
    let mut ids = vec![];
    for order in orders {
        ids.push(order.await.expect("task"));
    }
    let mut confirmed = 0;
    let mut cancelled = 0;
    for id in &ids {
        let order = api
            .eventually(&format!("/v1/orders/{id}"), "settled", |o| {
                o["status"] == "confirmed" || o["status"] == "cancelled"
            })
            .await;
        if order["status"] == "confirmed" {
            confirmed += 1;
        } else {
            assert_eq!(order["cancel_reason"], "out_of_stock");
            cancelled += 1;
        }
    }
    assert_eq!((confirmed, cancelled), (10, 20));
    api.quiesce().await;
    assert_eq!(
        api.stock("HOT").await,
        json!({ "sku": "HOT", "on_hand": 10, "reserved": 10, "available": 0 })
    );
    server.finish().await;
}

async fn parallel_restocks_of_one_sku_all_count(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    let restocks: Vec<_> = (0..40)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move {
                api.post("/v1/inventory/BUSY/restock", json!({ "quantity": 3 }))
                    .await
            })
        })
        .collect();
    for restock in restocks {
        let (status, body) = restock.await.expect("task");
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    api.quiesce().await;
    assert_eq!(api.stock("BUSY").await["on_hand"], 120);
    let (_, stream) = api.get("/v1/streams/inventory/BUSY").await;
    let versions: Vec<u64> = stream["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["version"].as_u64())
        .collect();
    assert_eq!(versions, (1..=40).collect::<Vec<u64>>());
    server.finish().await;
}
