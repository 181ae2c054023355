//! Faults in the distributed deployment: a service killed mid-stream, a relay that
//! publishes everything again, the broker stopped under load.

use crate::support::{dump, Api, Backend, OwnBroker, Process, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

/// Place `count` orders of one unit of `sku`, `pause` apart, through `api`; the ids
/// of those acknowledged (a service may be down meanwhile).
fn place_in_background(
    api: &Api,
    sku: &'static str,
    count: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<Vec<String>> {
    let api = api.clone();
    tokio::spawn(async move {
        let mut acknowledged = vec![];
        for i in 0..count {
            let (status, body) = api
                .post(
                    "/v1/orders",
                    json!({ "customer_id": format!("load-{i}"), "lines": [{ "sku": sku, "quantity": 1, "unit_price_cents": 100 }], "payment_token": "tok_ok" }),
                )
                .await;
            if status == StatusCode::ACCEPTED {
                acknowledged.push(body["order_id"].as_str().expect("id").to_owned());
            }
            tokio::time::sleep(pause).await;
        }
        acknowledged
    })
}

async fn order_tables(server: &TestServer) -> Vec<Vec<String>> {
    vec![
        dump(&server.config, "order", "orders", "order_id").await,
        dump(&server.config, "order", "order_progress", "order_id").await,
        dump(&server.config, "inventory", "inventory_levels", "sku").await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_killed_mid_stream_resume_without_skipping_or_repeating() {
    let mut server = TestServer::on(Backend::Distributed).await;
    let api = Api::from(&server);
    api.restock("KILL", 1000).await;
    api.quiesce().await;

    let load = place_in_background(&api, "KILL", 40, Duration::from_millis(40));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The order service: the orders projection, the saga, a relay and an inbox.
    server.replace_service("order", Process::kill_and_restart);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The inventory service: its projection, relay and inbox, while reservations flow.
    server.replace_service("inventory", Process::kill_and_restart);
    let acknowledged = load.await.expect("load");
    api.eventually("/health", "ready", |_| true).await;
    assert!(!acknowledged.is_empty());

    for id in &acknowledged {
        api.order_settles(id, "confirmed").await;
    }
    api.quiesce().await;
    // A request cut off by a kill may have been carried out without its answer
    // reaching the client: every order that exists is held to the same rules.
    let mut placed = vec![];
    for i in 0..40 {
        let (status, body) = api.get(&format!("/v1/orders?customer_id=load-{i}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for item in body["items"].as_array().expect("items") {
            placed.push(item["order_id"].as_str().expect("id").to_owned());
        }
    }
    assert!(acknowledged.iter().all(|id| placed.contains(id)));
    for id in &placed {
        api.order_settles(id, "confirmed").await;
    }
    let reserved = placed.len() as u64;
    assert_eq!(
        api.stock("KILL").await,
        json!({ "sku": "KILL", "on_hand": 1000, "reserved": reserved, "available": 1000 - reserved })
    );
    for id in &placed {
        assert_eq!(api.count_events("order", id, "OrderConfirmed").await, 1);
        assert_eq!(
            api.count_events("payment", id, "PaymentAuthorized").await,
            1
        );
    }

    // Nothing skipped, nothing applied twice: the read models equal a fresh rebuild.
    let live = order_tables(&server).await;
    for name in ["orders", "inventory"] {
        let (status, body) = api
            .post(&format!("/v1/projections/{name}/rebuild"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        api.projection_running(name).await;
    }
    api.quiesce().await;
    assert_eq!(
        order_tables(&server).await,
        live,
        "read models equal their rebuild"
    );
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_publishes_everything_again_changes_nothing_downstream() {
    let mut server = TestServer::on(Backend::Distributed).await;
    let api = Api::from(&server);
    api.restock("DUP", 10).await;
    let mut ids = vec![];
    for token in ["tok_ok", "tok_decline", "tok_ok"] {
        ids.push(api.place("c-1", &[("DUP", 2, 100)], token).await);
    }
    api.post(&format!("/v1/orders/{}/cancel", ids[2]), json!({}))
        .await;
    api.quiesce().await;
    let before = order_tables(&server).await;
    let stock_before: Value = api.stock("DUP").await;

    // As if the inventory relay died after producing and before recording how far:
    // on restart it publishes every event of the service again.
    let database = server.config.database_url("inventory");
    server.replace_service("inventory", |process| {
        let args = process.args.clone();
        process.kill();
        let rewind = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async move {
                    let db = infra::db::Db::open(&database, 1).await.expect("db");
                    sqlx::query("UPDATE relay_positions SET position = 0")
                        .execute(&db.pool)
                        .await
                        .expect("rewind the relay");
                })
        });
        rewind.join().expect("rewound");
        Process::spawn(&args)
    });
    api.quiesce().await;
    assert_eq!(
        order_tables(&server).await,
        before,
        "duplicates were skipped"
    );
    assert_eq!(api.stock("DUP").await, stock_before);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_accepted_while_the_broker_is_down_and_everything_arrives_after() {
    let mut broker = OwnBroker::start();
    let server = TestServer::distributed_on(&broker.address).await;
    let api = Api::from(&server);
    api.restock("OUT", 100).await;
    api.quiesce().await;

    broker.stop();
    // The outbox holds what the services accept while the broker is away.
    let mut accepted = vec![];
    for i in 0..10 {
        let (status, body) = api
            .post(
                "/v1/orders",
                json!({ "customer_id": format!("o-{i}"), "lines": [{ "sku": "OUT", "quantity": 1, "unit_price_cents": 100 }], "payment_token": "tok_ok" }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        accepted.push(body["order_id"].as_str().expect("id").to_owned());
    }
    let (status, _) = api
        .post("/v1/inventory/OUT/restock", json!({ "quantity": 5 }))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.resume();

    for id in &accepted {
        api.order_settles(id, "confirmed").await;
    }
    api.quiesce().await;
    assert_eq!(
        api.stock("OUT").await,
        json!({ "sku": "OUT", "on_hand": 105, "reserved": 10, "available": 95 })
    );
    server.finish().await;
}
