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
    let inventory = listing["projections"]
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == "inventory").cloned())
        .expect("the inventory projection is listed");
    assert_eq!(inventory["dead_letters"], 1, "{listing}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_batch_is_one_script_and_a_change_that_fails_is_dead_lettered_alone() {
    use domain::order::{OrderEvent, OrderLine};
    use domain::shipment::ShipmentEvent;
    use infra::consume::{step, Consumer, LogSource, Step};
    use projectors::projection::{Bind, Change, ReadModel};
    use projectors::runner::Runner;
    use projectors::Projection;

    let url = format!(
        "{}/orderline_script_{}",
        crate::support::postgres_server(),
        uuid::Uuid::now_v7().simple()
    );
    let db = infra::db::Db::open(&url, 2).await.expect("database");

    // Values written into a script as literals read back exactly.
    sqlx::raw_sql("CREATE TABLE literals (t TEXT, n BIGINT)")
        .execute(&db.pool)
        .await
        .expect("table");
    let tricky = "it's a \\ back'slash, $1, E'x' -- not a comment; DROP TABLE literals; é";
    let script = Change::literal_script(&[Change::new(
        "INSERT INTO literals (t, n) VALUES ($1, 5 -$2)".into(),
        vec![Bind::Text(tricky.into()), Bind::Integer(-7)],
    )]);
    sqlx::raw_sql(&script)
        .execute(&db.pool)
        .await
        .expect("script");
    let (t, n): (String, i64) = sqlx::query_as("SELECT t, n FROM literals")
        .fetch_one(&db.pool)
        .await
        .expect("row");
    assert_eq!((t.as_str(), n), (tricky, 12));

    // A batch whose middle event's change fails: the others apply, that one is
    // dead-lettered, the transaction goes on.
    let store = infra::EventStore::with_db(db.clone()).await.expect("store");
    let projection = Projection::Orders;
    db.migrate(&projection.create_tables(""))
        .await
        .expect("tables");
    sqlx::raw_sql("DROP TABLE order_progress")
        .execute(&db.pool)
        .await
        .expect("drop");
    let id = uuid::Uuid::now_v7().to_string();
    let placed = OrderEvent::OrderPlaced {
        customer_id: domain::CustomerId::parse("c-1").expect("id"),
        lines: vec![OrderLine {
            sku: domain::Sku::parse("S-1").expect("sku"),
            quantity: domain::Quantity::new(1).expect("quantity"),
            unit_price_cents: domain::Money::from_cents(100),
        }],
        total_cents: domain::Money::from_cents(100),
        payment_token: domain::PaymentToken::parse("tok_ok").expect("token"),
    };
    let append =
        |aggregate_type: &'static str, version: i64, event: (String, u32, serde_json::Value)| {
            let (store, id) = (store.clone(), id.clone());
            async move {
                let event_id = uuid::Uuid::now_v7();
                store
                    .append(infra::event_store::AppendRequest {
                        aggregate_type: aggregate_type.into(),
                        aggregate_id: id,
                        expected_version: version,
                        expected_last_event: None,
                        events: vec![infra::event_store::NewEvent {
                            event_id,
                            event_type: event.0,
                            schema_version: event.1,
                            payload: event.2,
                            occurred_at: chrono::Utc::now(),
                            correlation_id: event_id,
                            causation_id: event_id,
                        }],
                        idempotency: None,
                        snapshot: None,
                    })
                    .await
                    .expect("appended");
            }
        };
    append("order", 0, schemas::encode(&placed).expect("encodes")).await;
    let created = ShipmentEvent::ShipmentCreated {};
    append("shipment", 0, schemas::encode(&created).expect("encodes")).await;
    let confirmed = OrderEvent::OrderConfirmed {};
    append("order", 1, schemas::encode(&confirmed).expect("encodes")).await;
    let source = LogSource::open(store.clone(), projection.topics(), "orders", &db)
        .await
        .expect("source");
    let runner = Runner {
        projection,
        suffix: "",
        consumer: Consumer::new("orders", &db, &infra::metrics::Metrics::default()),
        lock: None,
        progress: None,
        remembered: None,
    };
    while step(&source, &runner).await.expect("step") != Step::Idle {}
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
        .bind(&id)
        .fetch_one(&db.pool)
        .await
        .expect("order");
    assert_eq!(status, "confirmed");
    let letters = infra::dead_letters::list(&db.pool, "order")
        .await
        .expect("dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].event["event_type"], "ShipmentCreated");
    db.pool.close().await;
    use sqlx::migrate::MigrateDatabase;
    let _ = sqlx::Any::force_drop_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_steady_writes_an_online_rebuild_pauses_the_live_projection_only_for_a_short_tail() {
    use crate::support::metric;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;

    const WRITERS: usize = 16;
    const HISTORY: i64 = 1500;
    let dir = tempfile::tempdir().expect("dir");
    let node = Process::serve(&dir.path().join("data"), 30_000);
    let api = node.api.clone();
    // A history long enough that writes go on while the rebuild reads it...
    let history = (0..WRITERS).map(|w| {
        let api = api.clone();
        tokio::spawn(async move {
            // Long enough that a rebuild of 4,000-event batches still takes in
            // well over the bound below of writes made while it runs.
            for _ in 0..HISTORY {
                api.restock(&format!("SKU-{w}"), 1).await;
            }
        })
    });
    for task in history {
        task.await.expect("history");
    }
    // ...and writers that keep on through it.
    let running = Arc::new(AtomicBool::new(true));
    let during = Arc::new(AtomicI64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (api, running, during) = (api.clone(), running.clone(), during.clone());
            tokio::spawn(async move {
                let mut written = 0;
                while running.load(Ordering::SeqCst) {
                    api.restock(&format!("SKU-{w}"), 1).await;
                    written += 1;
                    during.fetch_add(1, Ordering::SeqCst);
                }
                written
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The rebuild must take in more writes than the bound on its pause below, so that
    // one that paused the live projection for all of them would fail. How many come
    // while it runs depends on how fast this machine rebuilds against how fast it
    // writes: a rebuild that took in too few is made again, on the log grown since.
    const ATTEMPTS: usize = 3;
    let events = "orderline_rebuild_events_total";
    let counted = |metrics: &str| {
        (
            metric(
                metrics,
                events,
                &["projection=\"inventory\"", "phase=\"live\""],
            ),
            metric(
                metrics,
                events,
                &["projection=\"inventory\"", "phase=\"paused\""],
            ),
        )
    };
    let mut attempt = 0;
    let (live, written_during_rebuild) = loop {
        attempt += 1;
        let (live_before, paused_before) = counted(&api.metrics().await);
        let at_start = during.load(Ordering::SeqCst);
        let (status, body) = api
            .post("/v1/projections/inventory/rebuild", json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        api.projection_running("inventory").await;
        let written_during_rebuild = during.load(Ordering::SeqCst) - at_start;
        let (live_after, paused_after) = counted(&api.metrics().await);
        let (live, paused) = (live_after - live_before, paused_after - paused_before);
        eprintln!(
            "rebuild {attempt} under writes: {live} events while live, {paused} while paused, {written_during_rebuild} written meanwhile"
        );
        // Every rebuild, whatever it took in, paused the live projection only for a
        // short tail.
        assert!(
            paused <= 400,
            "rebuild {attempt}: {paused} events applied while the live projection was paused ({live} while live, {written_during_rebuild} written during the rebuild)"
        );
        if written_during_rebuild > 800 || attempt == ATTEMPTS {
            break (live, written_during_rebuild);
        }
    };
    running.store(false, Ordering::SeqCst);
    let mut written = vec![];
    for writer in writers {
        written.push(writer.await.expect("writer"));
    }
    assert!(
        written_during_rebuild > 800,
        "too few writes during any of {ATTEMPTS} rebuilds to tell: {written_during_rebuild} during the last"
    );
    assert!(live >= 16_000, "{live}");
    // And the rebuilt projection holds every write, before, during and after.
    api.quiesce().await;
    for (w, extra) in written.iter().enumerate() {
        assert_eq!(
            api.stock(&format!("SKU-{w}")).await["on_hand"],
            HISTORY + extra,
            "SKU-{w}"
        );
    }
    node.kill();
}
