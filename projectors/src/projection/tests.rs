//! The projections' SQL, applied by the runner to a real SQLite database.

use super::*;
use crate::runner::{Projections, Runner};
use domain::order::OrderLine;
use domain::{CustomerId, EventName, Money, PaymentToken, Quantity, Sku};
use infra::consume::{step, Consumer, LogSource, Source, Step};
use infra::metrics::Metrics;
use infra::progress::Progress;
use infra::scratch::Scratch;
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

struct Fixture(Scratch);

impl std::ops::Deref for Fixture {
    type Target = Scratch;

    fn deref(&self) -> &Scratch {
        &self.0
    }
}

async fn fixture() -> Fixture {
    let f = Scratch::new().await.expect("scratch");
    for projection in ALL {
        f.db.migrate(&projection.create_tables(""))
            .await
            .expect("tables");
    }
    Fixture(f)
}

impl Fixture {
    /// Append `events` to one stream, after the events it holds.
    async fn append<E: Serialize + EventName>(&self, aggregate_type: &str, id: &str, events: &[E]) {
        let events = events
            .iter()
            .map(|event| schemas::encode(event).expect("encodes"))
            .collect();
        self.0
            .append(aggregate_type, id, events)
            .await
            .expect("appended");
    }

    /// Five of S-1 restocked: the inventory stream's first event.
    async fn restock_five(&self) {
        self.append(
            "inventory",
            "S-1",
            &[InventoryEvent::StockRestocked {
                quantity: 5,
                on_hand: 5,
                reserved: 0,
            }],
        )
        .await;
    }

    fn runner(&self, projection: Projection) -> Runner {
        Runner {
            projection,
            suffix: "",
            consumer: Consumer::new(projection.as_str(), &self.db, &Metrics::default()),
            lock: None,
            progress: None,
            remembered: None,
        }
    }

    /// Run `projection` over the whole log from the start, as a fresh consumer.
    async fn project(&self, projection: Projection) {
        let source = LogSource::open(
            self.store.clone(),
            projection.topics(),
            &format!("{projection}-{}", Uuid::now_v7().simple()),
            &self.db,
        )
        .await
        .expect("source");
        let runner = self.runner(projection);
        while step(&source, &runner).await.expect("step") != Step::Idle {}
    }
}

fn order_id() -> Uuid {
    Uuid::from_u128(42)
}

fn placed() -> OrderEvent {
    let sku = Sku::parse("S-1").expect("sku");
    OrderEvent::OrderPlaced {
        customer_id: CustomerId::parse("c-1").expect("customer"),
        lines: vec![OrderLine {
            sku,
            quantity: Quantity::new(2).expect("quantity"),
            unit_price_cents: Money::from_cents(1299),
        }],
        total_cents: Money::from_cents(2598),
        payment_token: PaymentToken::parse("tok_ok").expect("token"),
    }
}

#[tokio::test]
async fn the_orders_view_joins_the_order_with_its_payment_and_shipment() {
    let f = fixture().await;
    let id = order_id().to_string();
    f.append("order", &id, &[placed()]).await;
    f.append(
        "payment",
        &id,
        &[
            PaymentEvent::PaymentRequested {
                amount_cents: Money::from_cents(2598),
                payment_token: PaymentToken::parse("tok_ok").expect("token"),
            },
            PaymentEvent::PaymentAuthorized {
                amount_cents: Money::from_cents(2598),
            },
        ],
    )
    .await;
    f.append("shipment", &id, &[ShipmentEvent::ShipmentCreated {}])
        .await;
    f.append("order", &id, &[OrderEvent::OrderConfirmed {}])
        .await;
    for projection in ALL {
        f.project(*projection).await;
    }

    let row = sqlx::query(
        "SELECT o.status, o.total_cents, o.customer_id, p.payment_status, p.shipment_status
           FROM orders o JOIN order_progress p ON p.order_id = o.order_id WHERE o.order_id = $1",
    )
    .bind(&id)
    .fetch_one(&f.db.pool)
    .await
    .expect("order row");
    assert_eq!(row.get::<String, _>("status"), "confirmed");
    assert_eq!(row.get::<i64, _>("total_cents"), 2598);
    assert_eq!(row.get::<String, _>("customer_id"), "c-1");
    assert_eq!(row.get::<String, _>("payment_status"), "authorized");
    assert_eq!(row.get::<String, _>("shipment_status"), "created");
    let (status, authorized): (String, i64) =
        sqlx::query_as("SELECT status, authorized_cents FROM payments WHERE order_id = $1")
            .bind(&id)
            .fetch_one(&f.db.pool)
            .await
            .expect("payment row");
    assert_eq!((status.as_str(), authorized), ("authorized", 2598));
    let shipment: String = sqlx::query_scalar("SELECT status FROM shipments WHERE order_id = $1")
        .bind(&id)
        .fetch_one(&f.db.pool)
        .await
        .expect("shipment row");
    assert_eq!(shipment, "created");
}

#[tokio::test]
async fn stock_levels_follow_every_inventory_event_and_a_cancellation_records_its_reason() {
    let f = fixture().await;
    f.append(
        "inventory",
        "S-1",
        &[
            InventoryEvent::StockRestocked {
                quantity: 10,
                on_hand: 10,
                reserved: 0,
            },
            InventoryEvent::StockReserved {
                order_id: order_id(),
                quantity: 2,
                on_hand: 10,
                reserved: 2,
            },
            InventoryEvent::StockReservationRejected {
                order_id: Uuid::from_u128(43),
                requested: 20,
                available: 8,
            },
        ],
    )
    .await;
    let id = order_id().to_string();
    f.append("order", &id, &[placed()]).await;
    f.append(
        "order",
        &id,
        &[OrderEvent::OrderCancelled {
            reason: domain::CancelReason::PaymentTimeout,
            note: None,
        }],
    )
    .await;
    f.project(Projection::Inventory).await;
    f.project(Projection::Orders).await;

    let (on_hand, reserved): (i64, i64) =
        sqlx::query_as("SELECT on_hand, reserved FROM inventory_levels WHERE sku = 'S-1'")
            .fetch_one(&f.db.pool)
            .await
            .expect("level");
    assert_eq!((on_hand, reserved), (10, 2));
    let (status, reason): (String, Option<String>) =
        sqlx::query_as("SELECT status, cancel_reason FROM orders WHERE order_id = $1")
            .bind(&id)
            .fetch_one(&f.db.pool)
            .await
            .expect("order");
    assert_eq!(status, "cancelled");
    assert_eq!(reason.as_deref(), Some("payment_timeout"));
}

#[tokio::test]
async fn a_redelivered_event_is_skipped_by_the_version_guard() {
    let f = fixture().await;
    f.restock_five().await;
    f.project(Projection::Inventory).await;
    // Changed behind the projection's back: a second pass over the same events
    // (a fresh consumer) must not touch the row again.
    sqlx::query("UPDATE inventory_levels SET on_hand = 99")
        .execute(&f.db.pool)
        .await
        .expect("update");
    f.project(Projection::Inventory).await;
    let on_hand: i64 = sqlx::query_scalar("SELECT on_hand FROM inventory_levels")
        .fetch_one(&f.db.pool)
        .await
        .expect("level");
    assert_eq!(on_hand, 99);
    let applied: i64 = sqlx::query_scalar("SELECT version FROM inventory_applied")
        .fetch_one(&f.db.pool)
        .await
        .expect("guard");
    assert_eq!(applied, 1);
}

#[tokio::test]
async fn an_event_that_cannot_be_applied_is_undone_dead_lettered_and_passed() {
    let f = fixture().await;
    let id = order_id().to_string();
    // Confirmed before it was placed as far as this table knows, and with a table
    // that refuses it: the update's savepoint is rolled back, the event kept.
    sqlx::query("DROP TABLE order_progress")
        .execute(&f.db.pool)
        .await
        .expect("drop");
    f.append("order", &id, &[placed()]).await;
    f.append("shipment", &id, &[ShipmentEvent::ShipmentCreated {}])
        .await;
    f.append("order", &id, &[OrderEvent::OrderConfirmed {}])
        .await;
    f.project(Projection::Orders).await;

    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
        .bind(&id)
        .fetch_one(&f.db.pool)
        .await
        .expect("order");
    assert_eq!(status, "confirmed");
    let letters = infra::dead_letters::list(&f.db.pool, "order")
        .await
        .expect("dead letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].event["event_type"], "ShipmentCreated");
    // The database's own message (it names the table) stays out of the API.
    assert!(
        !letters[0].error.contains("order_progress"),
        "{}",
        letters[0].error
    );
    assert!(
        letters[0].error.contains("database refused"),
        "{}",
        letters[0].error
    );
}

/// Ask the operator routes of `projections`: (status, JSON body).
async fn operator(projections: &Projections, method: &str, uri: &str) -> (u16, serde_json::Value) {
    use tower::ServiceExt;
    let request = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .body(axum::body::Body::empty())
        .expect("request");
    let response = crate::admin::router(projections.clone())
        .oneshot(request)
        .await
        .expect("answer");
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test]
async fn dead_letters_are_paged_and_a_retry_applies_once_and_never_over_later_events() {
    let f = fixture().await;
    // Three shipments whose first event the read model cannot take (its table is
    // gone); the third's stream then moves on.
    sqlx::query("DROP TABLE shipments")
        .execute(&f.db.pool)
        .await
        .expect("drop");
    let ids: Vec<String> = (0..3).map(|_| Uuid::now_v7().to_string()).collect();
    for id in &ids {
        f.append("shipment", id, &[ShipmentEvent::ShipmentCreated {}])
            .await;
    }
    f.project(Projection::Shipments).await;
    f.db.migrate(&Projection::Shipments.create_tables(""))
        .await
        .expect("tables back");
    f.append("shipment", &ids[2], &[ShipmentEvent::ShipmentDispatched {}])
        .await;
    f.project(Projection::Shipments).await;

    let transport = infra::consume::Transport::InProcess(f.store.clone());
    let projections = Projections::open(
        f.store.clone(),
        Progress::default(),
        Metrics::default(),
        &[(Projection::Shipments, f.db.clone())],
        &transport,
    )
    .await
    .expect("open");

    // Paged: two, then the last one.
    let (status, first) = operator(&projections, "GET", "/v1/dead-letters?limit=2").await;
    assert_eq!(status, 200, "{first}");
    let page: Vec<&str> = first["dead_letters"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|l| l["id"].as_str())
        .collect();
    assert_eq!(page.len(), 2);
    let cursor = first["next_cursor"].as_str().expect("more");
    assert_eq!(cursor, page[1]);
    let (_, rest) = operator(
        &projections,
        "GET",
        &format!("/v1/dead-letters?limit=2&after={cursor}"),
    )
    .await;
    let last = rest["dead_letters"].as_array().expect("list");
    assert_eq!(last.len(), 1);
    assert!(rest["next_cursor"].is_null());
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "after=nothing",
        "other=1",
    ] {
        let (status, problem) =
            operator(&projections, "GET", &format!("/v1/dead-letters?{bad}")).await;
        assert!(status == 400 || status == 422, "{bad}: {status} {problem}");
    }

    // The first applies once: a second retry finds nothing.
    let (status, applied) = operator(
        &projections,
        "POST",
        &format!("/v1/dead-letters/{}/retry", page[0]),
    )
    .await;
    assert_eq!(status, 200, "{applied}");
    let (status, _) = operator(
        &projections,
        "POST",
        &format!("/v1/dead-letters/{}/retry", page[0]),
    )
    .await;
    assert_eq!(status, 404);
    let shipped: String = sqlx::query_scalar("SELECT status FROM shipments WHERE order_id = $1")
        .bind(&ids[0])
        .fetch_one(&f.db.pool)
        .await
        .expect("row");
    assert_eq!(shipped, "created");

    // The third's stream moved on: its old event is not applied over the new one.
    let third = last[0]["id"].as_str().expect("id");
    let (status, problem) = operator(
        &projections,
        "POST",
        &format!("/v1/dead-letters/{third}/retry"),
    )
    .await;
    assert_eq!(status, 409, "{problem}");
    assert!(problem["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("later events"));
}

#[tokio::test]
async fn projections_open_their_tables_and_start_at_the_stored_checkpoint() {
    let f = fixture().await;
    f.append(
        "inventory",
        "S-1",
        &[InventoryEvent::StockRestocked {
            quantity: 1,
            on_hand: 1,
            reserved: 0,
        }],
    )
    .await;
    let transport = infra::consume::Transport::InProcess(f.store.clone());
    let databases = [(Projection::Inventory, f.db.clone())];
    let open = || {
        Projections::open(
            f.store.clone(),
            Progress::default(),
            Metrics::default(),
            &databases,
            &transport,
        )
    };
    let projections = open().await.expect("open");
    let handle = projections
        .get(Projection::Inventory)
        .expect("handle")
        .clone();
    assert_eq!(
        projections.standing(&handle).await.expect("standing"),
        (0, 1)
    );
    while step(&*handle.source, &projections.runner(&handle))
        .await
        .expect("step")
        != Step::Idle
    {}
    assert_eq!(projections.progress.checkpoint("inventory"), f.store.head());
    let reopened = open().await.expect("reopen");
    let handle = reopened.get(Projection::Inventory).expect("handle");
    assert_eq!(
        reopened.standing(handle).await.expect("standing"),
        (f.store.head(), 0)
    );
}

#[tokio::test]
async fn a_batch_the_database_cannot_take_now_is_tried_again_never_dead_lettered() {
    let f = fixture().await;
    f.restock_five().await;
    let source = LogSource::open(
        f.store.clone(),
        Projection::Inventory.topics(),
        "inventory",
        &f.db,
    )
    .await
    .expect("source");
    let runner = f.runner(Projection::Inventory);
    // Another writer holds SQLite's write lock past the busy timeout (10 s).
    let mut other = f.db.pool.acquire().await.expect("connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *other)
        .await
        .expect("write lock");
    assert!(step(&source, &runner).await.is_err(), "the batch fails");
    sqlx::query("ROLLBACK")
        .execute(&mut *other)
        .await
        .expect("released");
    drop(other);
    let letters = infra::dead_letters::list(&f.db.pool, "inventory")
        .await
        .expect("dead letters");
    assert!(letters.is_empty(), "{letters:?}");

    source.rewind().await.expect("rewind");
    while step(&source, &runner).await.expect("step") != Step::Idle {}
    let on_hand: i64 = sqlx::query_scalar("SELECT on_hand FROM inventory_levels")
        .fetch_one(&f.db.pool)
        .await
        .expect("level");
    assert_eq!(on_hand, 5);
}

/// Random writes of a few rows (inserts, upserts, upserts that do nothing on a
/// conflict, updates; some that fail), with statements that are not one row's write
/// among them: applied one by one and coalesced, each on its own database, they
/// leave the same rows, and a coalesced write that fails is applied one by one.
#[test]
fn coalesced_writes_leave_the_rows_the_writes_one_by_one_leave() {
    let columns = ["a", "b", "c"];
    let mut seed = 0x5eed_u64;
    let mut next = move |n: u64| {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    };
    let mut merged_at_all = 0;
    for round in 0..300 {
        let mut changes = vec![];
        for i in 0..(5 + next(25)) {
            let key = vec![("k", Bind::Integer(next(3) as i64))];
            let mut row: Vec<(&'static str, Bind)> = columns
                .iter()
                .filter(|_| next(3) > 0)
                .map(|name| (*name, Bind::Integer((round * 100 + i) as i64)))
                .collect();
            if row.is_empty() {
                row.push(("a", Bind::Integer(-1)));
            }
            let change = match next(9) {
                0 => Change::new("UPDATE t SET c = c + 1".into(), vec![]),
                1 | 2 => RowWrite::change("t".into(), key, RowKind::Insert, row),
                3 => RowWrite::change("t".into(), key, RowKind::Upsert(vec![]), row),
                4 | 5 => {
                    let set = row
                        .iter()
                        .map(|(name, _)| *name)
                        .filter(|_| next(2) == 0)
                        .collect();
                    RowWrite::change("t".into(), key, RowKind::Upsert(set), row)
                }
                _ => RowWrite::change("t".into(), key, RowKind::Update, row),
            };
            changes.push((i as usize, change));
        }
        let open = || {
            let conn = rusqlite::Connection::open_in_memory().expect("database");
            conn.execute_batch(
                "CREATE TABLE t (k INTEGER PRIMARY KEY, a INTEGER, b INTEGER, c INTEGER)",
            )
            .expect("table");
            conn
        };
        let rows = |conn: &rusqlite::Connection| -> Vec<Vec<Option<i64>>> {
            let mut select = conn
                .prepare("SELECT k, a, b, c FROM t ORDER BY k")
                .expect("select");
            let rows = select
                .query_map([], |r| (0..4).map(|i| r.get(i)).collect())
                .expect("rows");
            rows.map(|r| r.expect("row")).collect()
        };
        let (one_by_one, coalesced) = (open(), open());
        let mut failed = vec![];
        for (i, change) in &changes {
            if infra::local::execute_with(&one_by_one, change.sql(), change.binds()).is_err() {
                failed.push(*i);
            }
        }
        let mut failed_coalesced = vec![];
        for unit in coalesce(&changes) {
            if let Some(merged) = &unit.merged {
                merged_at_all += 1;
                if infra::local::execute_with(&coalesced, merged.sql(), merged.binds()).is_ok() {
                    continue;
                }
            }
            for place in &unit.changes {
                let (i, change) = &changes[*place];
                if infra::local::execute_with(&coalesced, change.sql(), change.binds()).is_err() {
                    failed_coalesced.push(*i);
                }
            }
        }
        failed_coalesced.sort_unstable();
        assert_eq!(
            rows(&coalesced),
            rows(&one_by_one),
            "round {round}: {changes:#?}"
        );
        assert_eq!(failed_coalesced, failed, "round {round}: {changes:#?}");
    }
    assert!(
        merged_at_all > 100,
        "few writes were merged: {merged_at_all}"
    );
}

/// An order's four events in one batch are one statement.
#[test]
fn an_orders_writes_in_one_batch_are_one_statement() {
    let envelope = |version: i64, event: &OrderEvent| {
        let (event_type, schema_version, payload) = schemas::encode(event).expect("encodes");
        Envelope {
            event_id: Uuid::now_v7(),
            aggregate_type: "order".into(),
            aggregate_id: order_id().to_string(),
            version,
            event_type,
            schema_version,
            occurred_at: chrono::Utc::now(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            payload: payload.into(),
        }
    };
    let events = [
        placed(),
        OrderEvent::OrderConfirmed {},
        OrderEvent::OrderShipped {},
        OrderEvent::OrderDelivered {},
    ];
    let changes: Vec<(usize, Change)> = events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let envelope = envelope(i as i64 + 1, event);
            let event = AnyEvent::from_envelope(&envelope).expect("decodes");
            let change = Projection::Orders
                .change("", &envelope, &event)
                .expect("change")
                .expect("a change");
            (i, change)
        })
        .collect();
    let units = coalesce(&changes);
    assert_eq!(units.len(), 1);
    let merged = units[0].merged.as_ref().expect("merged");
    assert!(
        merged.sql().starts_with("INSERT INTO orders "),
        "{}",
        merged.sql()
    );
    assert!(
        merged.binds().contains(&Bind::Text("delivered".into())),
        "{merged:?}"
    );
}
