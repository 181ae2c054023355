//! Rebuilds and replays: a rebuilt projection equals the live one, row for row.

use crate::support::{
    drop_databases, dump, on_every_backend, storage_args, Api, Backend, Process, TestServer,
};
use infra::Config;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

/// (projection, service, table, key) of every read-model table; `orders` twice (it
/// has two tables), which also rebuilds it twice.
const TABLES: [(&str, &str, &str, &str); 5] = [
    ("orders", "order", "orders", "order_id"),
    ("orders", "order", "order_progress", "order_id"),
    ("inventory", "inventory", "inventory_levels", "sku"),
    ("payments", "payment", "payments", "order_id"),
    ("shipments", "shipping", "shipments", "order_id"),
];

/// Orders ending every way there is.
async fn workload(api: &Api) {
    api.restock("A", 40).await;
    api.restock("B", 5).await;
    let mut ids = vec![];
    for i in 0..30 {
        let token = match i % 5 {
            0 => "tok_decline",
            _ => "tok_ok",
        };
        ids.push(
            api.place(
                &format!("c-{}", i % 4),
                &[("A", 1, 250), ("B", 1 + i % 2, 99)],
                token,
            )
            .await,
        );
    }
    api.quiesce().await;
    for (i, id) in ids.iter().enumerate() {
        let order = api.order(id).await;
        if order["status"] != "confirmed" {
            continue;
        }
        match i % 3 {
            0 => {
                api.post(&format!("/v1/shipments/{id}/dispatch"), json!({}))
                    .await;
                api.post(&format!("/v1/shipments/{id}/deliver"), json!({}))
                    .await;
            }
            1 => {
                api.post(
                    &format!("/v1/orders/{id}/cancel"),
                    json!({ "reason": "no longer needed" }),
                )
                .await;
            }
            _ => {}
        }
    }
    api.quiesce().await;
}

on_every_backend!(
    an_online_rebuild_equals_the_live_projection_and_queries_keep_answering,
    the_offline_replay_command_equals_the_live_projection,
);

/// Fail with the first rows that differ, table by table.
fn assert_same_rows(actual: &[Vec<String>], expected: &[Vec<String>], what: &str) {
    for ((_, _, table, _), (a, e)) in TABLES.iter().zip(actual.iter().zip(expected.iter())) {
        let missing: Vec<&String> = e.iter().filter(|row| !a.contains(row)).collect();
        let extra: Vec<&String> = a.iter().filter(|row| !e.contains(row)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{what}: table {table} differs\nexpected, not found: {missing:#?}\nfound, not expected: {extra:#?}"
        );
    }
}

async fn dump_all(config: &Config) -> Vec<Vec<String>> {
    let mut out = vec![];
    for (_, service, table, key) in TABLES {
        out.push(dump(config, service, table, key).await);
    }
    out
}

async fn an_online_rebuild_equals_the_live_projection_and_queries_keep_answering(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    workload(&api).await;
    let live = dump_all(&server.config).await;
    assert!(live.iter().all(|rows| !rows.is_empty()));
    let (_, page) = api.get("/v1/orders?limit=1").await;
    let some_order = page["items"][0]["order_id"]
        .as_str()
        .expect("an order")
        .to_owned();

    for (name, _, _, _) in TABLES {
        let (status, body) = api
            .post(&format!("/v1/projections/{name}/rebuild"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        // Queries keep answering while it runs, and the listing shows it.
        loop {
            assert_eq!(
                api.get(&format!("/v1/orders/{some_order}")).await.0,
                StatusCode::OK
            );
            let (_, listing) = api.get("/v1/projections").await;
            let view = listing["projections"]
                .as_array()
                .and_then(|all| all.iter().find(|p| p["name"] == name).cloned())
                .expect("listed");
            if view["status"] == "running" {
                break;
            }
            assert_eq!(view["status"], "rebuilding");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    api.quiesce().await;
    assert_same_rows(
        &dump_all(&server.config).await,
        &live,
        "rebuilt equals live",
    );

    // The live projections go on after the swap.
    let before = api.stock("A").await["on_hand"].as_i64().expect("on hand");
    api.restock("A", 1).await;
    api.quiesce().await;
    assert_eq!(api.stock("A").await["on_hand"], before + 1);
    server.finish().await;
}

async fn the_offline_replay_command_equals_the_live_projection(backend: Backend) {
    let server = TestServer::on(backend).await;
    let api = Api::from(&server);
    workload(&api).await;
    let config = server.config.clone();
    let dir = server.stop().await;
    let live = dump_all(&config).await;
    for (name, _, _, _) in TABLES {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_orderline"))
            .args(["replay", "--projection", name])
            .args(storage_args(&config))
            .output()
            .expect("replay runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "replay {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("{name}: rebuilt from")),
            "{stdout}"
        );
    }
    assert_same_rows(&dump_all(&config).await, &live, "replayed equals live");
    let unknown = std::process::Command::new(env!("CARGO_BIN_EXE_orderline"))
        .args(["replay", "--projection", "nope"])
        .args(storage_args(&config))
        .output()
        .expect("runs");
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no projection named"));
    let listing = std::process::Command::new(env!("CARGO_BIN_EXE_orderline"))
        .arg("projections")
        .args(storage_args(&config))
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&listing.stdout).contains("orders"));
    drop_databases(&config).await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_a_projection_cannot_apply_is_dead_lettered_and_the_projection_goes_on() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let first = Process::serve(&data, 30_000);
    first.api.restock("A", 1).await;
    first.kill();
    // An event of a shape no version of the code wrote, as a damaged log would hold.
    let pool = infra::db::Db::open_sqlite(&data.join("events.db"), 1)
        .await
        .expect("open")
        .pool;
    sqlx::query(
        "INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, schema_version,
            occurred_at, correlation_id, causation_id, payload)
         VALUES ('0190a0e4-1f00-7000-8000-00000000dead', 'inventory', 'A', 2, 'StockRestocked', 1,
            '2026-01-01T00:00:00Z', '0190a0e4-1f00-7000-8000-00000000dead',
            '0190a0e4-1f00-7000-8000-00000000dead', '{\"quantity\": \"many\"}')",
    )
    .execute(&pool)
    .await
    .expect("insert");
    pool.close().await;

    let second = Process::serve(&data, 30_000);
    let api = second.api.clone();
    api.restock("B", 2).await;
    api.quiesce().await;
    assert_eq!(
        api.stock("B").await["on_hand"],
        2,
        "later events still apply"
    );
    let (_, letters) = api.get("/v1/dead-letters").await;
    let letters = letters["dead_letters"].as_array().expect("list").clone();
    let ours: Vec<_> = letters
        .iter()
        .filter(|l| l["consumer"] == "inventory")
        .collect();
    assert_eq!(ours.len(), 1, "{letters:?}");
    assert_eq!(
        ours[0]["event"]["event_id"],
        "0190a0e4-1f00-7000-8000-00000000dead"
    );
    assert!(ours[0]["error"]
        .as_str()
        .unwrap_or_default()
        .contains("StockRestocked"));
    let (_, listing) = api.get("/v1/projections").await;
    assert_eq!(listing["projections"][1]["dead_letters"], 1);
    let id = ours[0]["id"].as_str().expect("id");
    let (status, problem) = api
        .post(&format!("/v1/dead-letters/{id}/retry"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("still cannot be applied"));
    second.kill();
}
