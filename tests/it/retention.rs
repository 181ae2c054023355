//! Retention on a running server: clients' idempotency records past their time, the
//! state of settled sagas and snapshots that no longer read are removed; everything
//! still needed stays, and the system goes on as before.

use crate::support::{
    body, drop_databases, metric, postgres_server, storage_args, Api, Process, SETTLE,
};
use infra::db::Db;
use infra::Config;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

async fn restock_with_key(api: &Api, sku: &str, key: &str) -> StatusCode {
    let response = api
        .client
        .post(api.url(&format!("/v1/inventory/{sku}/restock")))
        .header("Idempotency-Key", key)
        .json(&json!({ "quantity": 1 }))
        .send()
        .await
        .expect("restock");
    body(response).await.0
}

async fn sagas(config: &Config) -> Vec<(String, String)> {
    let db = Db::open(&config.database_url("order"), 1)
        .await
        .expect("order database");
    let rows = sqlx::query_as("SELECT order_id, stage FROM sagas ORDER BY order_id")
        .fetch_all(&db.pool)
        .await
        .expect("sagas");
    db.pool.close().await;
    rows
}

async fn snapshots(config: &Config) -> Vec<(String, String)> {
    let db = Db::open(&config.database_url("events"), 1)
        .await
        .expect("log");
    let rows =
        sqlx::query_as("SELECT aggregate_type, aggregate_id FROM snapshots ORDER BY aggregate_id")
            .fetch_all(&db.pool)
            .await
            .expect("snapshots");
    db.pool.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_their_retention_keys_settled_sagas_and_unreadable_snapshots_go_and_nothing_else() {
    let dir = tempfile::tempdir().expect("dir");
    prunes_what_is_past_its_time(Config::with_data_dir(dir.path().join("data"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_past_their_retention_keys_settled_sagas_and_unreadable_snapshots_go() {
    let dir = tempfile::tempdir().expect("dir");
    let mut config = Config::with_data_dir(dir.path().join("data"));
    config.postgres = Some(postgres_server());
    config.database_prefix = format!("orderline_t{}", uuid::Uuid::now_v7().simple());
    prunes_what_is_past_its_time(config.clone()).await;
    drop_databases(&config).await;
}

async fn prunes_what_is_past_its_time(config: Config) {
    let start = |retention: &str| {
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--idempotency-retention-secs",
            retention,
            "--saga-retention-secs",
            retention,
            "--retention-interval-secs",
            "1",
        ]
        .map(String::from)
        .to_vec();
        args.extend(storage_args(&config));
        Process::spawn(&args)
    };
    // First with everything kept: the history to prune.
    let node = start("0");
    let api = node.api.clone();
    api.restock("A", 10).await;
    // A stream long enough to have a snapshot (one each 64 events).
    for _ in 0..70 {
        api.restock("LONG", 1).await;
    }
    assert_eq!(
        restock_with_key(&api, "KEYED", "key-1").await,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        restock_with_key(&api, "KEYED", "key-1").await,
        StatusCode::ACCEPTED
    );
    let delivered = api.place("c-1", &[("A", 1, 100)], "tok_ok").await;
    let declined = api.place("c-1", &[("A", 1, 100)], "tok_decline").await;
    let confirmed = api.place("c-1", &[("A", 1, 100)], "tok_ok").await;
    api.eventually(&format!("/v1/orders/{delivered}"), "confirmed", |o| {
        o["status"] == "confirmed"
    })
    .await;
    api.post(&format!("/v1/shipments/{delivered}/dispatch"), json!({}))
        .await;
    api.post(&format!("/v1/shipments/{delivered}/deliver"), json!({}))
        .await;
    api.eventually(&format!("/v1/orders/{declined}"), "cancelled", |o| {
        o["status"] == "cancelled"
    })
    .await;
    api.eventually(&format!("/v1/orders/{confirmed}"), "confirmed", |o| {
        o["status"] == "confirmed"
    })
    .await;
    api.eventually(&format!("/v1/orders/{delivered}"), "delivered", |o| {
        o["status"] == "delivered"
    })
    .await;
    api.quiesce().await;
    assert_eq!(
        api.stock("KEYED").await["on_hand"],
        1,
        "the retry was a replay"
    );
    node.terminate();
    assert_eq!(sagas(&config).await.len(), 3);
    // A snapshot of a shape no version of the code reads, beside the real one.
    let log = Db::open(&config.database_url("events"), 1)
        .await
        .expect("log");
    sqlx::query(
        "INSERT INTO snapshots (aggregate_type, aggregate_id, version, position, state)
         VALUES ('inventory', 'A', 1, 1, '[\"a shape of long ago\"]')",
    )
    .execute(&log.pool)
    .await
    .expect("snapshot");
    log.pool.close().await;
    assert_eq!(snapshots(&config).await.len(), 2);

    // Then with a retention of a second.
    let node = start("1");
    let api = node.api.clone();
    let deadline = Instant::now() + SETTLE;
    loop {
        let metrics = api.metrics().await;
        let pruned = |kind: &str| {
            metric(
                &metrics,
                "orderline_pruned_total",
                &[&format!("kind=\"{kind}\"")],
            )
        };
        if pruned("idempotency") >= 1 && pruned("saga") >= 2 && pruned("snapshot") >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not pruned:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The settled sagas are gone; the confirmed order's, still needed to ship it, stays.
    let left = sagas(&config).await;
    assert_eq!(left, vec![(confirmed.clone(), "confirmed".to_owned())]);
    // The unreadable snapshot is gone; the real one stays.
    assert_eq!(
        snapshots(&config).await,
        vec![("inventory".to_owned(), "LONG".to_owned())]
    );
    // A key past its retention is a new request.
    assert_eq!(
        restock_with_key(&api, "KEYED", "key-1").await,
        StatusCode::ACCEPTED
    );
    api.quiesce().await;
    assert_eq!(api.stock("KEYED").await["on_hand"], 2);
    // And everything goes on: the confirmed order ships and is delivered, its stock
    // committed and its payment captured; the others read as they were; new orders
    // are fulfilled.
    api.post(&format!("/v1/shipments/{confirmed}/dispatch"), json!({}))
        .await;
    api.post(&format!("/v1/shipments/{confirmed}/deliver"), json!({}))
        .await;
    api.eventually(&format!("/v1/orders/{confirmed}"), "delivered", |o| {
        o["status"] == "delivered"
    })
    .await;
    api.eventually(&format!("/v1/payments/{confirmed}"), "captured", |p| {
        p["status"] == "captured"
    })
    .await;
    assert_eq!(api.order(&delivered).await["status"], "delivered");
    assert_eq!(api.order(&declined).await["status"], "cancelled");
    let next = api.place("c-2", &[("A", 1, 100)], "tok_ok").await;
    api.eventually(&format!("/v1/orders/{next}"), "confirmed", |o| {
        o["status"] == "confirmed"
    })
    .await;
    // The order's read model says confirmed; the inventory's may not have the
    // reservation yet: wait for every projection.
    api.quiesce().await;
    let stock = api.stock("A").await;
    assert_eq!(stock["reserved"], 1, "only the new order's: {stock}");
    node.kill();
}
