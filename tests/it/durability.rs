//! Crashes: the real binary killed with SIGKILL and started again.

use crate::support::{Api, Process, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_keeps_every_acknowledged_order_and_finishes_pending_sagas() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let timeout_ms = 1500;

    let first = Process::serve(&data, timeout_ms);
    let api = first.api.clone();
    api.restock("S", 100).await;
    // Orders whose payment never answers: killed while they wait on the deadline.
    let mut waiting = vec![];
    for i in 0..3 {
        waiting.push(
            api.place(&format!("w-{i}"), &[("S", 1, 100)], "tok_no_answer")
                .await,
        );
    }
    for id in &waiting {
        api.eventually(&format!("/v1/orders/{id}"), "awaiting payment", |o| {
            o["payment_status"] == "requested"
        })
        .await;
    }
    // Orders acknowledged right before the kill, their sagas anywhere in flight.
    let placing: Vec<_> = (0..20)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                api.place(&format!("c-{i}"), &[("S", 1, 100)], "tok_ok")
                    .await
            })
        })
        .collect();
    let mut acknowledged = vec![];
    for order in placing {
        acknowledged.push(order.await.expect("acknowledged"));
    }
    first.kill();

    let second = Process::serve(&data, timeout_ms);
    let api = second.api.clone();
    for id in &acknowledged {
        let order = api.order_settles(id, "confirmed").await;
        assert_eq!(order["payment_status"], "authorized");
    }
    for id in &waiting {
        let order = api.order_settles(id, "cancelled").await;
        assert_eq!(order["cancel_reason"], "payment_timeout");
    }
    api.quiesce().await;
    assert_eq!(
        api.stock("S").await,
        json!({ "sku": "S", "on_hand": 100, "reserved": 20, "available": 80 })
    );
    // Exactly once: no saga step was applied twice across the crash.
    for id in &acknowledged {
        assert_eq!(api.count_events("order", id, "OrderConfirmed").await, 1);
        assert_eq!(
            api.count_events("payment", id, "PaymentAuthorized").await,
            1
        );
        assert_eq!(api.count_events("shipment", id, "ShipmentCreated").await, 1);
    }
    assert_eq!(
        api.count_events("inventory", "S", "StockReserved").await,
        23
    );
    assert_eq!(api.count_events("inventory", "S", "StockReleased").await, 3);

    // A clean stop (SIGTERM) exits 0, and a third start sees the same state.
    assert!(second.terminate().success());
    let third = Process::serve(&data, timeout_ms);
    let order: Value = third.api.order(&acknowledged[0]).await;
    assert_eq!(order["status"], "confirmed");
    third.kill();
}

/// A process started with its pipeline held takes orders and moves none of them (the
/// door alone, as the end-to-end benchmark measures it); the next start on the same
/// files carries each of them through, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_taken_with_the_pipeline_held_are_fulfilled_once_by_the_next_start() {
    let dir = tempfile::tempdir().expect("dir");
    let mut config = infra::Config::with_data_dir(dir.path().join("data"));
    config.auth = infra::auth::AuthSettings::off();
    config.hold_pipeline = true;

    let held = TestServer::start_in(config.clone()).await;
    let api = Api::from(&held);
    api.restock("H", 10).await;
    let mut ids = vec![];
    for i in 0..3 {
        ids.push(
            api.place(&format!("h-{i}"), &[("H", 1, 100)], "tok_ok")
                .await,
        );
    }
    // The orders are in the log, and nothing acts on them: no read model, no saga.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids {
        assert_eq!(api.count_events("order", id, "OrderPlaced").await, 1);
        let (status, _) = api.get(&format!("/v1/orders/{id}")).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "a held process projects nothing"
        );
    }
    assert_eq!(api.count_events("inventory", "H", "StockReserved").await, 0);
    held.stop().await;

    config.hold_pipeline = false;
    let running = TestServer::start_in(config).await;
    let api = Api::from(&running);
    for id in &ids {
        let order = api.order_settles(id, "confirmed").await;
        assert_eq!(order["payment_status"], "authorized");
        assert_eq!(api.count_events("order", id, "OrderConfirmed").await, 1);
    }
    api.quiesce().await;
    assert_eq!(
        api.stock("H").await,
        json!({ "sku": "H", "on_hand": 10, "reserved": 3, "available": 7 })
    );
    assert_eq!(api.count_events("inventory", "H", "StockReserved").await, 3);
    running.stop().await;
}
