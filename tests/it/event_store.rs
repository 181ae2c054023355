//! The SQLite event store on real files.

use crate::support::{on_both_backends, postgres_server, Backend};
use chrono::Utc;
use infra::event_store::{AppendOutcome, AppendRequest, IdempotencyRecord, NewEvent, StoreError};
use infra::EventStore;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

on_both_backends!(
    an_append_at_a_stale_version_is_a_conflict_and_writes_nothing,
    the_database_refuses_two_events_with_one_version,
    an_idempotency_key_answers_as_the_first_time_and_refuses_another_request,
    concurrent_appends_share_commits,
    a_reader_following_the_head_sees_every_event_once_while_tasks_append_in_turn,
    a_conflict_in_a_group_fails_only_its_own_append,
    appends_in_one_group_see_the_ones_before_them,
    subscribers_are_woken_by_an_append,
    events_survive_reopening_and_readers_pass_over_other_topics,
    a_reader_of_types_with_nothing_new_passes_to_the_head,
    a_reader_of_several_types_gets_each_event_once_in_log_order,
    an_aggregate_loads_from_its_snapshot_and_the_events_after_it,
    quotes_backslashes_and_placeholders_are_stored_and_answered_exactly,
);

fn event(n: i64) -> NewEvent {
    let id = Uuid::now_v7();
    NewEvent {
        event_id: id,
        event_type: "StockRestocked".into(),
        schema_version: 1,
        payload: json!({ "quantity": n, "on_hand": n, "reserved": 0 }),
        occurred_at: Utc::now(),
        correlation_id: id,
        causation_id: id,
    }
}

/// A fresh, empty log on `backend`; `finish` drops a PostgreSQL one.
struct Fresh {
    url: String,
    store: EventStore,
    _dir: tempfile::TempDir,
}

impl Fresh {
    async fn on(backend: Backend) -> Fresh {
        let dir = tempfile::tempdir().expect("dir");
        let url = match backend {
            Backend::Sqlite => infra::db::sqlite_url(&dir.path().join("events.db")),
            Backend::Postgres | Backend::Distributed => format!(
                "{}/orderline_t{}_events",
                postgres_server(),
                Uuid::now_v7().simple()
            ),
        };
        let store = Fresh::open(&url).await;
        Fresh {
            url,
            store,
            _dir: dir,
        }
    }

    async fn open(url: &str) -> EventStore {
        let db = infra::db::Db::open(url, 8).await.expect("db");
        EventStore::with_db(db).await.expect("store")
    }

    async fn pool(&self) -> sqlx::AnyPool {
        infra::db::Db::open(&self.url, 1).await.expect("db").pool
    }

    async fn finish(self) {
        use sqlx::migrate::MigrateDatabase;
        if self.url.starts_with("postgres") {
            let _ = sqlx::Any::force_drop_database(&self.url).await;
        }
    }
}

fn request(id: &str, expected: i64, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest {
        aggregate_type: "inventory".into(),
        aggregate_id: id.into(),
        expected_version: expected,
        expected_last_event: None,
        events,
        idempotency: None,
        snapshot: None,
    }
}

/// Append one event (numbered `n`) to a new stream of `aggregate_type`.
async fn append_new(store: &EventStore, aggregate_type: &str, id: &str, n: i64) {
    let mut append = request(id, 0, vec![event(n)]);
    append.aggregate_type = aggregate_type.into();
    store.append(append).await.expect("append");
}

async fn an_append_at_a_stale_version_is_a_conflict_and_writes_nothing(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    let first = store
        .append(request("A", 0, vec![event(1), event(2)]))
        .await
        .expect("append");
    assert_eq!(
        first,
        AppendOutcome::Appended {
            position: 2,
            version: 2
        }
    );
    match store.append(request("A", 1, vec![event(3)])).await {
        Err(StoreError::Conflict {
            expected: 1,
            actual: 2,
            ..
        }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        store
            .load_stream("inventory", "A")
            .await
            .expect("load")
            .len(),
        2
    );
    assert_eq!(store.head(), 2);
    // Another stream is independent.
    assert!(store.append(request("B", 0, vec![event(1)])).await.is_ok());
    fresh.finish().await;
}

async fn the_database_refuses_two_events_with_one_version(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    store
        .append(request("A", 0, vec![event(1)]))
        .await
        .expect("append");
    let pool = fresh.pool().await;
    let duplicate = sqlx::query(
        "INSERT INTO events (event_id, aggregate_type, aggregate_id, version, event_type, schema_version,
            occurred_at, correlation_id, causation_id, payload)
         VALUES ($1, 'inventory', 'A', 1, 'StockRestocked', 1, '2026-01-01T00:00:00Z', $1, $1, '{}')",
    )
    .bind(Uuid::now_v7().to_string())
    .execute(&pool)
    .await;
    assert!(duplicate.is_err(), "a second version 1 must be refused");
    fresh.finish().await;
}

async fn an_idempotency_key_answers_as_the_first_time_and_refuses_another_request(
    backend: Backend,
) {
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    let keyed = |hash: &str, expected: i64| {
        let mut r = request("A", expected, vec![event(1)]);
        r.idempotency = Some(IdempotencyRecord {
            key: "http:k".into(),
            request_hash: hash.into(),
            response: json!({ "sku": "A" }),
        });
        r
    };
    assert!(matches!(
        store.append(keyed("h1", 0)).await,
        Ok(AppendOutcome::Appended { .. })
    ));
    assert_eq!(
        store.append(keyed("h1", 1)).await.expect("duplicate"),
        AppendOutcome::Duplicate {
            response: json!({ "sku": "A" }),
            position: 1
        }
    );
    assert!(matches!(
        store.append(keyed("h2", 1)).await,
        Err(StoreError::KeyReused)
    ));
    assert_eq!(store.head(), 1, "neither retry appended");
    let stored = store
        .idempotency("http:k")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.position, 1);
    fresh.finish().await;
}

async fn concurrent_appends_share_commits(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    let before = store.commits();
    let appends: Vec<_> = (0..300)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append(request(&format!("S{i}"), 0, vec![event(i)]))
                    .await
            })
        })
        .collect();
    for append in appends {
        assert!(matches!(
            append.await.expect("task"),
            Ok(AppendOutcome::Appended { .. })
        ));
    }
    let commits = store.commits() - before;
    assert_eq!(store.head(), 300);
    assert!(
        commits < 300,
        "300 appends took {commits} commits: no group commit"
    );
    // Positions are unique and dense.
    let (events, reached) = store
        .read_after(0, &["inventory"], 1000)
        .await
        .expect("read");
    let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=300).collect::<Vec<i64>>());
    assert_eq!(reached, 300);
    fresh.finish().await;
}

/// Tasks that each append to a stream of their own one event at a time, waiting for
/// each append before the next (as a command path does), so the writer gathers them
/// into groups as they come back. Every append lands at its version, the positions
/// are dense, and a reader that follows the head meanwhile sees every event once, in
/// log order.
async fn a_reader_following_the_head_sees_every_event_once_while_tasks_append_in_turn(
    backend: Backend,
) {
    const TASKS: i64 = 16;
    const EACH: i64 = 40;
    let every: Vec<i64> = (1..=TASKS * EACH).collect();
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    let reader = {
        let store = store.clone();
        let mut head = store.subscribe();
        let total = every.len();
        tokio::spawn(async move {
            let (mut seen, mut after) = (vec![], 0);
            while seen.len() < total {
                if store.head() > after {
                    let (events, reached) = store
                        .read_after(after, &["inventory"], 100)
                        .await
                        .expect("read");
                    seen.extend(events.iter().map(|e| e.position));
                    after = reached;
                    continue;
                }
                tokio::time::timeout(Duration::from_secs(10), head.changed())
                    .await
                    .expect("woken while appends go on")
                    .expect("store alive");
            }
            seen
        })
    };
    let writers: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut positions = vec![];
                for version in 0..EACH {
                    let appended = store
                        .append(request(&format!("T{task}"), version, vec![event(version)]))
                        .await;
                    let Ok(AppendOutcome::Appended {
                        position,
                        version: now,
                    }) = appended
                    else {
                        panic!("T{task} at {version}: {appended:?}");
                    };
                    assert_eq!(now, version + 1);
                    positions.push(position);
                }
                positions
            })
        })
        .collect();
    let mut all = vec![];
    for writer in writers {
        let positions = writer.await.expect("writer");
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        all.extend(positions);
    }
    all.sort_unstable();
    assert_eq!(all, every);
    let seen = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the reader reached the head")
        .expect("reader");
    assert_eq!(seen, every);
    fresh.finish().await;
}

async fn a_conflict_in_a_group_fails_only_its_own_append(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    let (a, b, c) = tokio::join!(
        store.append(request("X", 0, vec![event(1)])),
        store.append(request("X", 0, vec![event(2)])),
        store.append(request("Y", 0, vec![event(3)])),
    );
    let conflicts = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Conflict { .. })))
        .count();
    assert_eq!(conflicts, 1, "{a:?} {b:?}");
    assert!(c.is_ok());
    assert_eq!(
        store
            .load_stream("inventory", "X")
            .await
            .expect("load")
            .len(),
        1
    );
    fresh.finish().await;
}

/// Appends queued together (one group commit, most likely) are decided in order: an
/// append may build on the one before it in the same group, and a key used earlier
/// in the group answers as that first use.
async fn appends_in_one_group_see_the_ones_before_them(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    let keyed = |id: &str, expected, events, key: &str, hash: &str| AppendRequest {
        idempotency: Some(IdempotencyRecord {
            key: key.into(),
            request_hash: hash.into(),
            response: json!({ "first": id }),
        }),
        ..request(id, expected, events)
    };
    let (a, b, c, d, e) = tokio::join!(
        store.append(keyed("X", 0, vec![event(1), event(2)], "k1", "h")),
        store.append(request("X", 2, vec![event(3)])),
        store.append(keyed("Y", 0, vec![event(4)], "k1", "h")),
        store.append(keyed("Z", 0, vec![event(5)], "k1", "other")),
        store.append(keyed("X", 3, vec![], "k2", "h")),
    );
    let Ok(AppendOutcome::Appended { position, version }) = a else {
        panic!("first append: {a:?}")
    };
    assert_eq!(version, 2);
    assert_eq!(
        b.expect("second append builds on the first"),
        AppendOutcome::Appended {
            position: position + 1,
            version: 3
        }
    );
    assert_eq!(
        c.expect("same key, same request"),
        AppendOutcome::Duplicate {
            response: json!({ "first": "X" }),
            position
        }
    );
    assert!(matches!(d, Err(StoreError::KeyReused)), "{d:?}");
    assert_eq!(
        e.expect("no events, a record"),
        AppendOutcome::Appended {
            position: position + 1,
            version: 3
        }
    );
    for (stream, length) in [("X", 3), ("Y", 0), ("Z", 0)] {
        let events = store.load_stream("inventory", stream).await.expect("load");
        assert_eq!(events.len(), length, "{stream}");
    }
    let stored = store.idempotency("k2").await.expect("read").expect("kept");
    assert_eq!(stored.position, position + 1);
    fresh.finish().await;
}

async fn subscribers_are_woken_by_an_append(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    let mut head = store.subscribe();
    head.borrow_and_update();
    let writer = store.clone();
    tokio::spawn(async move { writer.append(request("A", 0, vec![event(1)])).await });
    tokio::time::timeout(Duration::from_secs(10), head.changed())
        .await
        .expect("woken without polling")
        .expect("store alive");
    assert_eq!(*head.borrow(), 1);
    fresh.finish().await;
}

async fn events_survive_reopening_and_readers_pass_over_other_topics(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    {
        let store = Fresh::open(&fresh.url).await;
        store
            .append(request("A", 0, vec![event(1)]))
            .await
            .expect("append");
        let mut order = request("o-1", 0, vec![event(2)]);
        order.aggregate_type = "order".into();
        store.append(order).await.expect("append");
    }
    let store = Fresh::open(&fresh.url).await;
    assert_eq!(store.head(), 2);
    let (events, reached) = store.read_after(0, &["inventory"], 10).await.expect("read");
    assert_eq!(events.len(), 1);
    assert_eq!(reached, 2, "the checkpoint moves past the order event too");
    let (events, reached) = store
        .read_after(0, &["inventory", "order"], 1)
        .await
        .expect("read");
    assert_eq!(
        (events.len(), reached),
        (1, 1),
        "a cut-short batch checkpoints its last event"
    );
    fresh.finish().await;
}

async fn a_reader_of_several_types_gets_each_event_once_in_log_order(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    let types = ["order", "inventory", "payment"];
    // Types interleaved unevenly, one stream each: positions 1..=30.
    for n in 1..=30i64 {
        let aggregate_type = types[((n * n + n / 5) % 3) as usize];
        append_new(&store, aggregate_type, &format!("s-{n}"), n).await;
    }
    let log: Vec<(i64, String)> = store
        .read_after(0, &types, 100)
        .await
        .expect("read")
        .0
        .into_iter()
        .map(|e| (e.position, e.envelope.aggregate_type))
        .collect();
    assert_eq!(log.len(), 30);
    // A type named twice, in batches of 4: each event once, in position order, and
    // each cut-short batch checkpoints its last event.
    let wanted = ["payment", "order", "payment"];
    let expected: Vec<i64> = log
        .iter()
        .filter(|(_, t)| wanted.contains(&t.as_str()))
        .map(|(position, _)| *position)
        .collect();
    let (mut after, mut seen) = (0, vec![]);
    loop {
        let (events, reached) = store.read_after(after, &wanted, 4).await.expect("read");
        assert!(events.len() <= 4);
        seen.extend(events.iter().map(|e| e.position));
        if events.len() == 4 {
            assert_eq!(Some(reached), events.last().map(|e| e.position));
        }
        if events.is_empty() || reached == after {
            break;
        }
        after = reached;
        if events.len() < 4 {
            assert_eq!(reached, 30, "a batch not cut short reaches the head");
            break;
        }
    }
    assert_eq!(seen, expected);
    fresh.finish().await;
}

async fn a_reader_of_types_with_nothing_new_passes_to_the_head(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    {
        let store = Fresh::open(&fresh.url).await;
        append_new(&store, "inventory", "A", 1).await;
        append_new(&store, "order", "o-1", 2).await;
        append_new(&store, "inventory", "B", 3).await;
        let (events, reached) = store.read_after(0, &["order"], 10).await.expect("read");
        assert_eq!((events.len(), reached), (1, 3));
        append_new(&store, "inventory", "C", 4).await;
        // Nothing of `order` after 3: the reader passes over the inventory event.
        let (events, reached) = store.read_after(3, &["order"], 10).await.expect("read");
        assert_eq!((events.len(), reached), (0, 4));
        let (events, reached) = store
            .read_after(3, &["inventory", "order"], 10)
            .await
            .expect("read");
        assert_eq!((events.len(), reached), (1, 4));
    }
    // A store opened on existing state does not know where each type stands: it
    // reads whatever lies before the head it opened at.
    let store = Fresh::open(&fresh.url).await;
    let (events, reached) = store.read_after(0, &["order"], 10).await.expect("read");
    assert_eq!((events.len(), reached), (1, 4));
    let (events, _) = store.read_after(2, &["order"], 10).await.expect("read");
    assert!(events.is_empty());
    fresh.finish().await;
}

async fn an_aggregate_loads_from_its_snapshot_and_the_events_after_it(backend: Backend) {
    use command_handlers::app::SNAPSHOT_EVERY;
    use command_handlers::{Handlers, Meta};
    use domain::inventory::{InventoryCommand, InventoryItem};
    use domain::Quantity;

    let fresh_log = Fresh::on(backend).await;
    let store = fresh_log.store.clone();
    let handlers = Handlers::new(store.clone(), infra::metrics::Metrics::default());
    let restock = InventoryCommand::Restock {
        quantity: Quantity::new(2).expect("valid"),
    };
    for _ in 0..150 {
        handlers
            .execute::<InventoryItem>("A", &restock, &Meta::fresh())
            .await
            .expect("restock");
    }
    let snapshot = store
        .snapshot("inventory", "A")
        .await
        .expect("read")
        .expect("taken");
    assert_eq!(snapshot.version, 150 / SNAPSHOT_EVERY * SNAPSHOT_EVERY);
    assert_eq!(snapshot.state["on_hand"], snapshot.version * 2);

    // A process with nothing cached starts from the snapshot.
    let fresh = Handlers::new(store.clone(), infra::metrics::Metrics::default());
    let (item, version, position) = fresh.load::<InventoryItem>("A").await.expect("load");
    assert_eq!((item.on_hand, version, position), (300, 150, 150));

    // A snapshot that no longer reads is passed over.
    let pool = fresh_log.pool().await;
    sqlx::query("UPDATE snapshots SET state = '{\"shape\": \"old\"}'")
        .execute(&pool)
        .await
        .expect("update");
    let again = Handlers::new(store.clone(), infra::metrics::Metrics::default());
    let (item, version, _) = again.load::<InventoryItem>("A").await.expect("load");
    assert_eq!((item.on_hand, version), (300, 150));

    // Another writer's events are seen past a cached state.
    store
        .append(request("A", 150, vec![event(0)]))
        .await
        .expect("append");
    let (_, version, _) = handlers.load::<InventoryItem>("A").await.expect("load");
    assert_eq!(version, 151);
    fresh_log.finish().await;
}

/// Every string of an append (its stream, its events, its key, its answer and its
/// snapshot) is written exactly, whatever it holds: on PostgreSQL a group's lookups
/// and its last writes go as scripts with their values written in as literals.
async fn quotes_backslashes_and_placeholders_are_stored_and_answered_exactly(backend: Backend) {
    let fresh = Fresh::on(backend).await;
    let store = fresh.store.clone();
    let hostile = "it's \\ a \"test\" $1 ?1 E'x' '); DROP TABLE events; -- \n\t üñí \\'";
    let stream = format!("A{hostile}");
    let mut first = request(&stream, 0, vec![event(1)]);
    first.events[0].payload = json!({ "note": hostile, "lines": [hostile] });
    first.snapshot = Some(json!({ "state": hostile }));
    first.idempotency = Some(IdempotencyRecord {
        key: format!("http:{hostile}"),
        request_hash: hostile.into(),
        response: json!({ "answer": hostile }),
    });
    let appended = store.append(first.clone()).await.expect("append");
    assert!(matches!(
        appended,
        AppendOutcome::Appended { version: 1, .. }
    ));
    let events = store.load_stream("inventory", &stream).await.expect("load");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].envelope.payload, first.events[0].payload);
    assert_eq!(events[0].envelope.aggregate_id, stream);
    // The same key again: answered from its record, exactly.
    let mut retry = first.clone();
    retry.expected_version = 1;
    retry.events = vec![event(2)];
    match store.append(retry).await.expect("retry") {
        AppendOutcome::Duplicate { response, .. } => {
            assert_eq!(response, json!({ "answer": hostile }))
        }
        other => panic!("expected the first answer, got {other:?}"),
    }
    let snapshot = store
        .snapshot("inventory", &stream)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(snapshot.state, json!({ "state": hostile }));
    // The stream's head is found by its name: the next version appends after it.
    let next = store
        .append(request(&stream, 1, vec![event(3)]))
        .await
        .expect("next");
    assert!(matches!(next, AppendOutcome::Appended { version: 2, .. }));
    assert_eq!(store.head(), 2);
    fresh.finish().await;
}

#[tokio::test]
async fn sqlite_databases_are_durable_by_default() {
    use sqlx::{Connection, Row};
    let dir = tempfile::tempdir().expect("dir");
    let db = infra::db::Db::open_sqlite(&dir.path().join("x.db"), 1)
        .await
        .expect("open");
    let mut writer = db.connection().await.expect("connection");
    for conn in [&mut *db.pool.acquire().await.expect("pooled"), &mut writer] {
        let mode: String = pragma(conn, "journal_mode").await.try_get(0).expect("text");
        assert_eq!(mode, "wal");
        let synchronous: i64 = pragma(conn, "synchronous")
            .await
            .try_get(0)
            .expect("number");
        assert_eq!(synchronous, 2, "synchronous=FULL");
        // Checkpoints every 16,000 pages of the write-ahead log, not SQLite's 1,000.
        let checkpoint_pages: i64 = pragma(conn, "wal_autocheckpoint")
            .await
            .try_get(0)
            .expect("number");
        assert_eq!(checkpoint_pages, 16_000);
    }
    writer.close().await.expect("close");
}

/// The row `PRAGMA {name}` answers on `conn`.
async fn pragma(conn: &mut sqlx::AnyConnection, name: &str) -> sqlx::any::AnyRow {
    sqlx::query(&format!("PRAGMA {name}"))
        .fetch_one(conn)
        .await
        .expect("pragma")
}

/// PostgreSQL ends the writer's idle connection (a server restart, a dropped link):
/// the next append opens another and succeeds, instead of being refused for a
/// connection that had already gone.
#[tokio::test]
async fn on_postgres_an_append_after_the_writers_connection_was_ended_succeeds() {
    let fresh = Fresh::on(Backend::Postgres).await;
    let store = fresh.store.clone();
    store
        .append(request("A", 0, vec![event(1)]))
        .await
        .expect("first append");
    let database = fresh
        .url
        .rsplit('/')
        .next()
        .expect("database name")
        .to_owned();
    let admin = infra::db::Db::open(&format!("{}/postgres", postgres_server()), 1)
        .await
        .expect("admin");
    let ended: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = $1 AND pid <> pg_backend_pid()) AS ended",
    )
    .bind(&database)
    .fetch_one(&admin.pool)
    .await
    .expect("terminate");
    assert!(ended > 0, "no connection of {database} to end");
    let after = store.append(request("A", 1, vec![event(2)])).await;
    assert_eq!(
        after.expect("the append after the connection was ended"),
        AppendOutcome::Appended {
            position: 2,
            version: 2
        }
    );
    admin.pool.close().await;
    fresh.finish().await;
}
