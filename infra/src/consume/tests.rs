//! The driver and the log source, on real SQLite files.

use super::*;
use crate::scratch::Scratch;
use crate::shutdown;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize};

async fn fixture() -> Scratch {
    let f = Scratch::new().await.expect("scratch");
    sqlx::query("CREATE TABLE seen (aggregate_id TEXT NOT NULL, quantity BIGINT NOT NULL)")
        .execute(&f.db.pool)
        .await
        .expect("table");
    f
}

/// Append one event of `aggregate_type` whose payload holds `quantity`.
async fn append(f: &Scratch, aggregate_type: &str, id: &str, quantity: i64) -> i64 {
    let event = ("StockRestocked".into(), 1, json!({ "quantity": quantity }));
    f.append(aggregate_type, id, vec![event])
        .await
        .expect("appended")
}

/// A live reader of the inventory topic for `consumer`.
async fn inventory_source(f: &Scratch, consumer: &str) -> LogSource {
    LogSource::open(
        f.store.clone(),
        &[AggregateType::Inventory],
        consumer,
        &f.db,
    )
    .await
    .expect("source")
}

/// An event's stream and quantity; a negative quantity cannot be read.
struct Seen(String, i64);

impl Decode for Seen {
    fn decode(record: &Record) -> Result<Option<Seen>, String> {
        let event = record.event()?;
        let quantity = event.envelope.payload.to_value()["quantity"]
            .as_i64()
            .unwrap_or(-1);
        if quantity < 0 {
            return Err("no quantity".into());
        }
        Ok(Some(Seen(event.envelope.aggregate_id.clone(), quantity)))
    }
}

/// Writes each event's quantity into `seen`; zero cannot be applied; `before` lets
/// only `allow` items through when set.
struct Recorder {
    consumer: Consumer,
    allow: Option<usize>,
    checkpoints: Arc<AtomicUsize>,
}

impl Recorder {
    fn new(db: &Db) -> Recorder {
        Recorder {
            consumer: Consumer::new("recorder", db, &Metrics::default()),
            allow: None,
            checkpoints: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Handler for Recorder {
    type Item = Seen;
    type Done = usize;

    fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    async fn before(&self, items: &[Seen]) -> usize {
        self.allow.unwrap_or(items.len())
    }

    async fn apply(
        &self,
        tx: &mut AnyConnection,
        items: &[Seen],
        failures: &mut Failures,
    ) -> Result<usize, InfraError> {
        for (i, Seen(id, quantity)) in items.iter().enumerate() {
            if *quantity == 0 {
                failures.push(i, "zero");
                continue;
            }
            sqlx::query("INSERT INTO seen (aggregate_id, quantity) VALUES ($1, $2)")
                .bind(id)
                .bind(quantity)
                .execute(&mut *tx)
                .await?;
        }
        Ok(items.len())
    }

    fn after(&self, _: usize, _checkpoint: i64) {
        self.checkpoints.fetch_add(1, Ordering::SeqCst);
    }
}

async fn seen(db: &Db) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT aggregate_id, quantity FROM seen ORDER BY rowid")
        .fetch_all(&db.pool)
        .await
        .expect("seen")
}

#[test]
fn backoff_waits_a_tenth_of_a_second_more_per_failure_up_to_five_seconds() {
    let mut backoff = Backoff::default();
    assert!(!backoff.failing());
    assert_eq!(backoff.fail(), Duration::from_millis(100));
    assert_eq!(backoff.fail(), Duration::from_millis(200));
    for _ in 0..100 {
        backoff.fail();
    }
    assert_eq!(backoff.fail(), Duration::from_secs(5));
    backoff.reset();
    assert_eq!(backoff.fail(), Duration::from_millis(100));
}

#[tokio::test]
async fn a_log_source_reads_its_topics_after_the_stored_checkpoint_and_rewinds_to_it() {
    let f = fixture().await;
    let first = append(&f, "inventory", "S-1", 1).await;
    let second = append(&f, "inventory", "S-2", 2).await;
    append(&f, "order", "o-1", 3).await;
    let source = inventory_source(&f, "c").await;

    let batch = source.next_batch(1).await.expect("batch");
    assert_eq!(batch.records.len(), 1);
    assert_eq!(batch.reached, Some(first));
    let mut tx = f.db.begin_write().await.expect("tx");
    for statement in source.store(&batch, 1) {
        statement.execute(&mut tx).await.expect("stored");
    }
    tx.commit().await.expect("commit");
    assert_eq!(source.committed(&batch, 1).await.expect("moved"), first);

    // The rest of the topic, and the position past the other topic's event.
    let batch = source.next_batch(10).await.expect("batch");
    assert_eq!(batch.records.len(), 1);
    assert_eq!(batch.records[0].position(), second);
    assert_eq!(batch.reached, Some(f.store.head()));
    assert_eq!(
        source.committed(&batch, 1).await.expect("moved"),
        f.store.head()
    );
    // Not stored: a rewind goes back to the stored checkpoint.
    source.rewind().await.expect("rewound");
    assert_eq!(source.checkpoint().await.expect("checkpoint"), first);
    let (_, lag) = source.standing().await.expect("standing");
    assert_eq!(lag, 1);
}

#[tokio::test]
async fn a_batch_stores_its_position_with_its_effects_and_dead_letters_what_fails() {
    let f = fixture().await;
    append(&f, "inventory", "S-1", 5).await;
    append(&f, "inventory", "S-2", -1).await; // unreadable
    append(&f, "inventory", "S-3", 0).await; // cannot be applied
    let last = append(&f, "inventory", "S-4", 7).await;
    let source = LogSource::open(
        f.store.clone(),
        &[AggregateType::Inventory],
        "recorder",
        &f.db,
    )
    .await
    .expect("source");
    let handler = Recorder::new(&f.db);

    assert_eq!(step(&source, &handler).await.expect("step"), Step::CaughtUp);
    assert_eq!(step(&source, &handler).await.expect("step"), Step::Idle);

    assert_eq!(
        seen(&f.db).await,
        vec![("S-1".into(), 5), ("S-4".into(), 7)]
    );
    assert_eq!(
        checkpoints::load(&f.db.pool, "recorder")
            .await
            .expect("checkpoint"),
        last
    );
    let letters = dead_letters::list(&f.db.pool, "inventory")
        .await
        .expect("dead letters");
    let errors: Vec<&str> = letters.iter().map(|l| l.error.as_str()).collect();
    assert_eq!(errors, vec!["no quantity", "zero"]);
    assert!(handler
        .consumer
        .metrics
        .render(&[])
        .contains("orderline_dead_letters_total{consumer=\"recorder\"} 2"));
    assert_eq!(handler.checkpoints.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_batch_done_only_in_part_stores_the_part_and_reads_the_rest_again() {
    let f = fixture().await;
    let first = append(&f, "inventory", "S-1", 1).await;
    append(&f, "inventory", "S-2", 2).await;
    let source = LogSource::open(
        f.store.clone(),
        &[AggregateType::Inventory],
        "recorder",
        &f.db,
    )
    .await
    .expect("source");
    let mut handler = Recorder::new(&f.db);
    handler.allow = Some(1);

    assert_eq!(step(&source, &handler).await.expect("step"), Step::Stalled);
    assert_eq!(
        checkpoints::load(&f.db.pool, "recorder")
            .await
            .expect("checkpoint"),
        first
    );
    handler.allow = None;
    assert_eq!(step(&source, &handler).await.expect("step"), Step::CaughtUp);
    assert_eq!(
        seen(&f.db).await,
        vec![("S-1".into(), 1), ("S-2".into(), 2)]
    );
}

#[tokio::test]
async fn the_driver_follows_appends_and_stops_on_shutdown() {
    let f = fixture().await;
    let source: Arc<dyn Source> = Arc::new(
        LogSource::open(
            f.store.clone(),
            &[AggregateType::Inventory],
            "recorder",
            &f.db,
        )
        .await
        .expect("source"),
    );
    let (trigger, stop) = shutdown::channel();
    let task = tokio::spawn(drive(source, Recorder::new(&f.db), stop));
    append(&f, "inventory", "S-1", 3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen(&f.db).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "not applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stopped")
        .expect("no panic");
}

#[tokio::test]
async fn a_replay_reads_from_the_start_and_stores_where_it_stands_for_another_consumer() {
    let f = fixture().await;
    append(&f, "inventory", "S-1", 1).await;
    let last = append(&f, "inventory", "S-2", 2).await;
    let live = inventory_source(&f, "live").await;
    let replay = live.replay().await.expect("replay");
    let end = replay.end().await.expect("end");
    assert!(!replay.reached(&end));
    let batch = replay.next_batch(10).await.expect("batch");
    assert_eq!(batch.records.len(), 2);
    replay.committed(&batch, 2).await.expect("moved");
    assert!(replay.reached(&end));
    let mut tx = f.db.begin_write().await.expect("tx");
    replay.save_as(&mut tx, "live").await.expect("saved");
    tx.commit().await.expect("commit");
    live.rewind().await.expect("rewound");
    assert_eq!(live.checkpoint().await.expect("checkpoint"), last);
}

/// A source that reads ahead like a Kafka consumer (its read position moves when it
/// reads, not when a batch commits) and whose rewind fails `failing_rewinds` times.
struct ReadAhead {
    inner: LogSource,
    failing_rewinds: AtomicUsize,
}

#[async_trait::async_trait]
impl Source for ReadAhead {
    async fn next_batch(&self, max: usize) -> Result<Batch, InfraError> {
        let batch = self.inner.next_batch(max).await?;
        self.inner.committed(&batch, batch.records.len()).await?;
        Ok(batch)
    }

    fn store(&self, batch: &Batch, done: usize) -> Vec<Statement> {
        self.inner.store(batch, done)
    }

    async fn committed(&self, batch: &Batch, done: usize) -> Result<i64, InfraError> {
        Ok(self.inner.position_after(batch, done))
    }

    async fn rewind(&self) -> Result<(), InfraError> {
        let failing = self.failing_rewinds.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_rewinds.store(failing - 1, Ordering::SeqCst);
            return Err(InfraError::Unavailable("the database is away".into()));
        }
        self.inner.rewind().await
    }

    async fn idle(&self, pause: Duration, shutdown: &mut Shutdown) {
        self.inner.idle(pause, shutdown).await
    }

    async fn checkpoint(&self) -> Result<i64, InfraError> {
        self.inner.checkpoint().await
    }

    async fn standing(&self) -> Result<(i64, i64), InfraError> {
        self.inner.standing().await
    }

    async fn replay(&self) -> Result<Box<dyn Replay>, InfraError> {
        self.inner.replay().await
    }
}

/// Fails its first batch (the database away), then records like [`Recorder`].
struct FailsFirst {
    recorder: Recorder,
    failed: AtomicBool,
}

impl Handler for FailsFirst {
    type Item = Seen;
    type Done = usize;

    fn consumer(&self) -> &Consumer {
        self.recorder.consumer()
    }

    async fn apply(
        &self,
        tx: &mut AnyConnection,
        items: &[Seen],
        failures: &mut Failures,
    ) -> Result<usize, InfraError> {
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Err(InfraError::Unavailable("the database is away".into()));
        }
        self.recorder.apply(tx, items, failures).await
    }

    fn after(&self, done: usize, checkpoint: i64) {
        self.recorder.after(done, checkpoint)
    }
}

#[tokio::test]
async fn after_a_failed_batch_nothing_is_read_until_the_rewind_succeeds() {
    let f = fixture().await;
    append(&f, "inventory", "S-1", 3).await;
    append(&f, "inventory", "S-2", 4).await;
    let source: Arc<dyn Source> = Arc::new(ReadAhead {
        inner: inventory_source(&f, "recorder").await,
        failing_rewinds: AtomicUsize::new(2),
    });
    let handler = FailsFirst {
        recorder: Recorder::new(&f.db),
        failed: AtomicBool::new(false),
    };
    let (trigger, stop) = shutdown::channel();
    let task = tokio::spawn(drive(source, handler, stop));
    append(&f, "inventory", "S-3", 5).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen(&f.db).await.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "skipped: {:?}",
            seen(&f.db).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen(&f.db).await,
        vec![("S-1".into(), 3), ("S-2".into(), 4), ("S-3".into(), 5)]
    );
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stopped")
        .expect("no panic");
}
