//! One way to consume events, whatever carries them.
//!
//! A [`Source`] is where records come from: the embedded log ([`LogSource`]), a
//! Kafka consumer of a replica's partitions or a Kafka replay reader (both in [`crate::kafka`]).
//! It hands out batches, stores how far a consumer got inside the consumer's own
//! transaction, and rewinds to the stored position after a failed batch.
//!
//! A [`Handler`] is what the records mean to one consumer: a projection, the saga,
//! a command inbox. [`drive`] runs any handler over any source until shutdown: read
//! a batch, decode it, apply it and store the position in one transaction, back off
//! and rewind on failure. Records that cannot be decoded and events the handler
//! cannot apply become dead letters here, and only here, and are counted once their
//! transaction commits.

use crate::db::{Db, Statement};
use crate::event_store::EventStore;
use crate::kafka::Polled;
use crate::metrics::{self, Metrics};
use crate::shutdown::Shutdown;
use crate::{checkpoints, dead_letters, InfraError};
use schemas::topics::AggregateType;
use schemas::RecordedEvent;
use serde::de::DeserializeOwned;
use sqlx::{AnyConnection, AnyPool};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// One record as a source read it.
#[derive(Debug, Clone)]
pub enum Record {
    /// An event of the embedded log, read with its position.
    Event(Arc<RecordedEvent>),
    /// A record of a Kafka topic, not yet decoded.
    Kafka(Polled),
}

impl Record {
    /// The record read as an event, or why it is not one.
    pub fn event(&self) -> Result<Cow<'_, RecordedEvent>, String> {
        match self {
            Record::Event(event) => Ok(Cow::Borrowed(&**event)),
            Record::Kafka(polled) => polled.read().map(Cow::Owned),
        }
    }

    /// The record read as a message of type `T` (a command), or why it is not one.
    pub fn message<T: DeserializeOwned>(&self) -> Result<T, String> {
        match self {
            Record::Event(_) => Err("an event of the log, not a message".into()),
            Record::Kafka(polled) => polled.read(),
        }
    }

    /// Its log position, or its offset in its partition.
    pub fn position(&self) -> i64 {
        match self {
            Record::Event(event) => event.position,
            Record::Kafka(polled) => polled.offset,
        }
    }

    /// The statement that keeps the record in `consumer`'s dead letters with `error`:
    /// as an event when it reads as one, else where it was read.
    fn dead_letter(&self, consumer: &str, error: &str) -> Statement {
        match self.event() {
            Ok(event) => dead_letters::record_statement(consumer, &event, error),
            Err(_) => {
                let origin = match self {
                    Record::Kafka(polled) => polled.origin(),
                    Record::Event(event) => serde_json::json!({ "position": event.position }),
                };
                dead_letters::record_unreadable_statement(consumer, self.position(), &origin, error)
            }
        }
    }
}

/// Records read together, and where the source stands once all are done.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// The log position a consumer may store once every record is done: past the
    /// last record when the log holds events of other topics after it.
    pub reached: Option<i64>,
}

impl From<Vec<Polled>> for Batch {
    fn from(polled: Vec<Polled>) -> Batch {
        Batch {
            records: polled.into_iter().map(Record::Kafka).collect(),
            reached: None,
        }
    }
}

impl Batch {
    /// Nothing to apply and nothing to store.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.reached.is_none()
    }
}

/// How far the source has to go to be caught up with what was there at some moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The log's head.
    Position(i64),
    /// The high watermark of every partition.
    Offsets(BTreeMap<(String, i32), i64>),
}

/// Where a consumer's records come from.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// Start reading (a Kafka consumer is given its partitions); the default does nothing.
    async fn join(&self) -> Result<(), InfraError> {
        Ok(())
    }

    /// Whether it is reading (a Kafka consumer has been given its partitions).
    fn ready(&self) -> bool {
        true
    }

    /// Up to `max` records after the last batch; empty when nothing came in time.
    async fn next_batch(&self, max: usize) -> Result<Batch, InfraError>;

    /// The statements that record, in the consumer's transaction, that the first
    /// `done` records of `batch` are done (a live consumer's checkpoint or offsets); a
    /// reader for replays keeps its place in memory and stores nothing.
    fn store(&self, batch: &Batch, done: usize) -> Vec<Statement>;

    /// The transaction that stored `done` records of `batch` committed: move on past
    /// them. Returns the consumer's checkpoint (a position, or the sum of its offsets).
    async fn committed(&self, batch: &Batch, done: usize) -> Result<i64, InfraError>;

    /// Read again from the stored position: after a failed batch, or after a rebuild
    /// stored a new one.
    async fn rewind(&self) -> Result<(), InfraError>;

    /// Wait for more records, at most `pause`: the log wakes on appends; a Kafka poll
    /// has waited already.
    async fn idle(&self, pause: Duration, shutdown: &mut Shutdown);

    /// Where the consumer stands: a log position, or the sum of its next offsets
    /// (grows with every batch).
    async fn checkpoint(&self) -> Result<i64, InfraError>;

    /// (checkpoint, records not yet consumed).
    async fn standing(&self) -> Result<(i64, i64), InfraError>;

    /// A reader of the same records from the beginning, for rebuilds.
    async fn replay(&self) -> Result<Box<dyn Replay>, InfraError>;

    /// Stop reading; the default does nothing.
    fn close(&self) {}
}

/// A source read from the beginning to rebuild a consumer's state.
#[async_trait::async_trait]
pub trait Replay: Source {
    /// What there is to read now, to catch up with.
    async fn end(&self) -> Result<End, InfraError>;

    /// Whether every record up to `end` has been read.
    fn reached(&self, end: &End) -> bool;

    /// Store where this reader stands as `consumer`'s position, replacing what was
    /// stored (a rebuild's swap, in its transaction).
    async fn save_as(&self, conn: &mut AnyConnection, consumer: &str) -> Result<(), InfraError>;
}

/// The embedded log as a source: the event store's table, read by position.
pub struct LogSource {
    store: EventStore,
    topics: Vec<AggregateType>,
    /// The consumer whose checkpoint is stored, and the database it is in; `None` for a
    /// reader that starts at the beginning and keeps its place in memory.
    checkpoint: Option<(String, AnyPool)>,
    cursor: AtomicI64,
    head: Mutex<tokio::sync::watch::Receiver<i64>>,
}

impl LogSource {
    /// A live consumer: reads after the checkpoint `name` keeps in `db`.
    pub async fn open(
        store: EventStore,
        topics: &[AggregateType],
        name: &str,
        db: &Db,
    ) -> Result<LogSource, InfraError> {
        let position = checkpoints::load(&db.pool, name).await?;
        let mut source = LogSource::from_start(store, topics);
        source.checkpoint = Some((name.to_owned(), db.pool.clone()));
        source.cursor = AtomicI64::new(position);
        Ok(source)
    }

    /// A reader from the start of the log (replays), storing nothing.
    pub fn from_start(store: EventStore, topics: &[AggregateType]) -> LogSource {
        let head = Mutex::new(store.subscribe());
        LogSource {
            store,
            topics: topics.to_vec(),
            checkpoint: None,
            cursor: AtomicI64::new(0),
            head,
        }
    }

    fn topics(&self) -> Vec<&str> {
        self.topics.iter().map(|t| t.as_str()).collect()
    }

    fn position_after(&self, batch: &Batch, done: usize) -> i64 {
        if done >= batch.records.len() {
            if let Some(reached) = batch.reached {
                return reached;
            }
        }
        match done.checked_sub(1).and_then(|i| batch.records.get(i)) {
            Some(record) => record.position(),
            None => self.cursor.load(Ordering::SeqCst),
        }
    }
}

#[async_trait::async_trait]
impl Source for LogSource {
    async fn next_batch(&self, max: usize) -> Result<Batch, InfraError> {
        // Seen before reading: an append after this wakes the next idle.
        self.head.lock().await.borrow_and_update();
        let after = self.cursor.load(Ordering::SeqCst);
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let (events, reached) = self.store.read_after(after, &self.topics(), limit).await?;
        Ok(Batch {
            records: events
                .into_iter()
                .map(|event| Record::Event(Arc::new(event)))
                .collect(),
            reached: (reached != after).then_some(reached),
        })
    }

    fn store(&self, batch: &Batch, done: usize) -> Vec<Statement> {
        match &self.checkpoint {
            Some((name, _)) => vec![checkpoints::save_statement(
                name,
                self.position_after(batch, done),
            )],
            None => vec![],
        }
    }

    async fn committed(&self, batch: &Batch, done: usize) -> Result<i64, InfraError> {
        let position = self.position_after(batch, done);
        self.cursor.store(position, Ordering::SeqCst);
        Ok(position)
    }

    async fn rewind(&self) -> Result<(), InfraError> {
        if let Some((name, pool)) = &self.checkpoint {
            let position = checkpoints::load(pool, name).await?;
            self.cursor.store(position, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn idle(&self, pause: Duration, shutdown: &mut Shutdown) {
        let mut head = self.head.lock().await;
        tokio::select! {
            _ = head.changed() => {}
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait() => {}
        }
    }

    async fn checkpoint(&self) -> Result<i64, InfraError> {
        Ok(self.cursor.load(Ordering::SeqCst))
    }

    async fn standing(&self) -> Result<(i64, i64), InfraError> {
        let checkpoint = self.cursor.load(Ordering::SeqCst);
        let lag = self.store.count_after(checkpoint, &self.topics()).await?;
        Ok((checkpoint, lag))
    }

    async fn replay(&self) -> Result<Box<dyn Replay>, InfraError> {
        Ok(Box::new(LogSource::from_start(
            self.store.clone(),
            &self.topics,
        )))
    }
}

#[async_trait::async_trait]
impl Replay for LogSource {
    async fn end(&self) -> Result<End, InfraError> {
        Ok(End::Position(self.store.head()))
    }

    fn reached(&self, end: &End) -> bool {
        match end {
            End::Position(head) => self.cursor.load(Ordering::SeqCst) >= *head,
            End::Offsets(_) => false,
        }
    }

    async fn save_as(&self, conn: &mut AnyConnection, consumer: &str) -> Result<(), InfraError> {
        checkpoints::save(conn, consumer, self.cursor.load(Ordering::SeqCst)).await?;
        Ok(())
    }
}

/// What one batch left behind.
#[derive(Debug, Default)]
pub struct Failures(Vec<(usize, String)>);

impl Failures {
    /// The item at `index` of the batch could not be applied: it becomes a dead letter.
    pub fn push(&mut self, index: usize, error: impl Into<String>) {
        self.0.push((index, error.into()));
    }
}

/// Who a consumer is: its name (its position and dead letters are kept under it),
/// the database its effects, position and dead letters are written to, and where it
/// counts.
#[derive(Clone)]
pub struct Consumer {
    pub name: String,
    pub db: Db,
    pub metrics: Metrics,
}

impl Consumer {
    pub fn new(name: impl Into<String>, db: &Db, metrics: &Metrics) -> Consumer {
        Consumer {
            name: name.into(),
            db: db.clone(),
            metrics: metrics.clone(),
        }
    }
}

/// How a record reads as what a consumer takes.
pub trait Decode: Sized + Send + Sync {
    /// `Ok(None)` when the record is none of the consumer's business, `Err` when it
    /// cannot be read (it becomes a dead letter).
    fn decode(record: &Record) -> Result<Option<Self>, String>;
}

impl Decode for RecordedEvent {
    fn decode(record: &Record) -> Result<Option<Self>, String> {
        record.event().map(|event| Some(event.into_owned()))
    }
}

/// An event of the log shared with the batch that holds it, not copied.
impl Decode for Arc<RecordedEvent> {
    fn decode(record: &Record) -> Result<Option<Self>, String> {
        match record {
            Record::Event(event) => Ok(Some(event.clone())),
            Record::Kafka(polled) => polled.read().map(|event| Some(Arc::new(event))),
        }
    }
}

impl Decode for schemas::commands::CommandMessage {
    fn decode(record: &Record) -> Result<Option<Self>, String> {
        record.message().map(Some)
    }
}

/// What a consumer does with the records of its source.
pub trait Handler: Send + Sync {
    /// A record as this consumer reads it.
    type Item: Decode;
    /// What applying a batch yields, handed to [`Handler::after`] once committed.
    type Done: Send + 'static;

    fn consumer(&self) -> &Consumer;

    /// The most records one batch takes.
    fn batch_size(&self) -> usize {
        500
    }

    /// Held while a batch is read and applied (a rebuild takes it to swap tables).
    fn lock(&self) -> Option<Arc<Mutex<()>>> {
        None
    }

    /// What a record is to this consumer: `Ok(None)` when it is none of its business,
    /// `Err` when it cannot be read (it becomes a dead letter).
    fn decode(&self, record: &Record) -> Result<Option<Self::Item>, String> {
        Self::Item::decode(record)
    }

    /// Effects outside the transaction, in order (a command inbox carries its commands
    /// out through the event store): how many items are done. The rest is read again.
    fn before(&self, items: &[Self::Item]) -> impl Future<Output = usize> + Send {
        let all = items.len();
        async move { all }
    }

    /// Effects inside the transaction that also stores the position. An item that
    /// cannot be applied is undone by the handler and pushed to `failures`.
    fn apply(
        &self,
        tx: &mut AnyConnection,
        items: &[Self::Item],
        failures: &mut Failures,
    ) -> impl Future<Output = Result<Self::Done, InfraError>> + Send;

    /// The effects of [`Handler::apply`] as work on an SQLite file's own connection
    /// ([`crate::local::LocalWriter`]), run on a blocking thread in the transaction
    /// that also stores the position, for a handler that can say them without the
    /// driver. `None` (the default): they go through `apply`.
    fn local(&self, items: &[Self::Item]) -> Option<LocalWork<Self::Done>> {
        let _ = items;
        None
    }

    /// After the commit, with the consumer's new checkpoint.
    fn after(&self, done: Self::Done, checkpoint: i64);

    /// The consumer passed over records that were none of its own (its new checkpoint;
    /// stored with its next batch).
    fn passed(&self, checkpoint: i64) {
        let _ = checkpoint;
    }

    /// A batch is about to be read.
    fn reading(&self) {}

    /// Work between batches (the saga's deadlines): whether it did something, and
    /// how long the consumer may idle otherwise. `caught_up`: the last read found
    /// everything there was when it began (no backlog behind it).
    fn between(&self, caught_up: bool) -> impl Future<Output = Result<Idle, InfraError>> + Send {
        let _ = caught_up;
        async { Ok(Idle::For(Duration::from_secs(60))) }
    }

    /// A round failed: a batch, or the work between batches. What it wrote may have
    /// been committed all the same (a `COMMIT` carried out whose answer was lost), so
    /// a handler that keeps in memory what it committed last must read it again.
    fn failed(&self) {}
}

/// A handler's effects on an SQLite file's own connection (see [`Handler::local`]).
pub type LocalWork<D> =
    Box<dyn FnOnce(&rusqlite::Connection, &mut Failures) -> Result<D, InfraError> + Send>;

/// A shared handler (one that also runs work of its own beside the driver).
impl<H: Handler> Handler for Arc<H> {
    type Item = H::Item;
    type Done = H::Done;

    fn consumer(&self) -> &Consumer {
        (**self).consumer()
    }

    fn batch_size(&self) -> usize {
        (**self).batch_size()
    }

    fn lock(&self) -> Option<Arc<Mutex<()>>> {
        (**self).lock()
    }

    fn decode(&self, record: &Record) -> Result<Option<H::Item>, String> {
        (**self).decode(record)
    }

    fn before(&self, items: &[H::Item]) -> impl Future<Output = usize> + Send {
        (**self).before(items)
    }

    fn apply(
        &self,
        tx: &mut AnyConnection,
        items: &[H::Item],
        failures: &mut Failures,
    ) -> impl Future<Output = Result<H::Done, InfraError>> + Send {
        (**self).apply(tx, items, failures)
    }

    fn local(&self, items: &[H::Item]) -> Option<LocalWork<H::Done>> {
        (**self).local(items)
    }

    fn after(&self, done: H::Done, checkpoint: i64) {
        (**self).after(done, checkpoint)
    }

    fn passed(&self, checkpoint: i64) {
        (**self).passed(checkpoint)
    }

    fn reading(&self) {
        (**self).reading()
    }

    fn between(&self, caught_up: bool) -> impl Future<Output = Result<Idle, InfraError>> + Send {
        (**self).between(caught_up)
    }

    fn failed(&self) {
        (**self).failed()
    }
}

/// What the work between batches asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// It did something: go round again at once.
    Busy,
    /// Nothing to do for at most this long.
    For(Duration),
}

/// How a round of the loop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The position moved; there is more to read.
    Moved,
    /// The position moved past everything there was when the batch was read.
    CaughtUp,
    /// Nothing new.
    Idle,
    /// Some records were not done (the rest is read again after a pause).
    Stalled,
}

/// The one retry policy of long-running loops: 100 ms more after each failure in a
/// row, at most 5 s.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// One more failure: how long to wait before trying again.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Duration::from_millis(100 * u64::from(self.failures.min(50)))
    }

    pub fn failing(&self) -> bool {
        self.failures > 0
    }
}

/// Decode a batch: the items, the index of each item's record, and the records that
/// could not be read.
fn decode<H: Handler>(handler: &H, batch: &Batch) -> (Vec<H::Item>, Vec<usize>, Failures) {
    let mut items = Vec::with_capacity(batch.records.len());
    let mut index = Vec::with_capacity(batch.records.len());
    let mut unreadable = Failures::default();
    for (i, record) in batch.records.iter().enumerate() {
        match handler.decode(record) {
            Ok(Some(item)) => {
                items.push(item);
                index.push(i);
            }
            Ok(None) => {}
            Err(error) => unreadable.push(i, error),
        }
    }
    (items, index, unreadable)
}

/// A batch applied and committed.
pub struct Applied<D> {
    /// The batch, handed back (its records went to the thread that wrote them).
    pub batch: Batch,
    /// How many of its records are done.
    pub done: usize,
    /// What the handler yields.
    pub out: D,
    /// How many records became dead letters.
    pub dead: usize,
}

/// A batch decoded, and its effects made ready as work on an SQLite file's own
/// connection when the handler has them so: everything [`apply_and_commit`] does
/// before it opens the transaction. A rebuild prepares the next batch while the one
/// before commits (its handler's [`Handler::before`] has no effects).
pub struct Prepared<H: Handler> {
    batch: Batch,
    items: Vec<H::Item>,
    index: Vec<usize>,
    unreadable: Failures,
    /// How many of the batch's records are done (those [`Handler::before`] did not stop at).
    done: usize,
    store: Vec<Statement>,
    local: Option<LocalWork<H::Done>>,
}

impl<H: Handler> Prepared<H> {
    pub fn batch(&self) -> &Batch {
        &self.batch
    }
}

/// Decode `batch`, carry out [`Handler::before`] and make the handler's local work
/// (when `db` is an SQLite file), for [`commit`].
pub async fn prepare<H: Handler>(
    handler: &H,
    db: &Db,
    source: &dyn Source,
    batch: Batch,
) -> Prepared<H> {
    let (mut items, index, unreadable) = decode(handler, &batch);
    let done_items = handler.before(&items).await.min(items.len());
    let done = index
        .get(done_items)
        .copied()
        .unwrap_or(batch.records.len());
    items.truncate(done_items);
    let store = source.store(&batch, done);
    let local = db.local.as_ref().and_then(|_| handler.local(&items));
    Prepared {
        batch,
        items,
        index,
        unreadable,
        done,
        store,
        local,
    }
}

/// Apply a prepared batch (dead letters included, under `dead_letters_as`) and store
/// what its source stores for it, in one transaction of `db`, and commit: on an
/// SQLite file's own connection when the handler has its effects as
/// [`Handler::local`] work, through the driver otherwise.
pub async fn commit<H: Handler>(
    handler: &H,
    dead_letters_as: &str,
    db: &Db,
    prepared: Prepared<H>,
) -> Result<Applied<H::Done>, InfraError> {
    let Prepared {
        batch,
        items,
        index,
        unreadable,
        done,
        store,
        local,
    } = prepared;
    let name = dead_letters_as.to_owned();
    if let (Some(writer), Some(work)) = (&db.local, local) {
        return writer
            .transaction(move |conn| {
                let mut failures = Failures::default();
                let out = work(conn, &mut failures)?;
                let dead = dead_letters_of(&batch, done, &name, &index, unreadable, failures);
                for statement in dead.iter().chain(&store) {
                    crate::local::execute(conn, statement)?;
                }
                Ok(Applied {
                    batch,
                    done,
                    out,
                    dead: dead.len(),
                })
            })
            .await;
    }
    let mut tx = db.begin_write().await?;
    let mut failures = Failures::default();
    let out = handler.apply(&mut tx, &items, &mut failures).await?;
    let dead = dead_letters_of(&batch, done, &name, &index, unreadable, failures);
    for statement in dead.iter().chain(&store) {
        statement.execute(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(Applied {
        batch,
        done,
        out,
        dead: dead.len(),
    })
}

/// [`prepare`] and [`commit`] `batch`.
pub async fn apply_and_commit<H: Handler>(
    handler: &H,
    dead_letters_as: &str,
    db: &Db,
    source: &dyn Source,
    batch: Batch,
) -> Result<Applied<H::Done>, InfraError> {
    let prepared = prepare(handler, db, source, batch).await;
    commit(handler, dead_letters_as, db, prepared).await
}

/// The dead letters of the records among the first `done` that could not be read
/// (`unreadable`, by record) or applied (`failed`, by item; `index` gives each item's
/// record).
fn dead_letters_of(
    batch: &Batch,
    done: usize,
    consumer: &str,
    index: &[usize],
    unreadable: Failures,
    failed: Failures,
) -> Vec<Statement> {
    let failed = failed
        .0
        .into_iter()
        .filter_map(|(item, error)| index.get(item).map(|record| (*record, error)));
    unreadable
        .0
        .into_iter()
        .chain(failed)
        .filter(|(record, _)| *record < done)
        .filter_map(|(record, error)| {
            let record = batch.records.get(record)?;
            tracing::error!(error = %error, consumer, position = record.position(), "dead-lettered");
            Some(record.dead_letter(consumer, &error))
        })
        .collect()
}

/// Read, apply and store one batch.
pub async fn step<H: Handler>(source: &dyn Source, handler: &H) -> Result<Step, InfraError> {
    let lock = handler.lock();
    let _held: Option<OwnedMutexGuard<()>> = match lock {
        Some(lock) => Some(lock.lock_owned().await),
        None => None,
    };
    handler.reading();
    let batch = source.next_batch(handler.batch_size()).await?;
    if batch.is_empty() {
        return Ok(Step::Idle);
    }
    if batch.records.is_empty() {
        // Only records of other consumers lay ahead: nothing to apply, so nothing is
        // written; the position moves in memory and is stored with the next batch
        // (read again from the stored one, the same records are passed over again).
        let checkpoint = source.committed(&batch, 0).await?;
        handler.passed(checkpoint);
        return Ok(Step::CaughtUp);
    }
    let full = batch.records.len() >= handler.batch_size();
    let consumer = handler.consumer();
    let name = consumer.name.as_str();
    let Applied {
        batch,
        done,
        out,
        dead,
    } = apply_and_commit(handler, name, &consumer.db, source, batch).await?;
    if dead > 0 {
        consumer
            .metrics
            .add(&metrics::DEAD_LETTERS, &[("consumer", name)], dead as u64);
    }
    let checkpoint = source.committed(&batch, done).await?;
    handler.after(out, checkpoint);
    Ok(if done < batch.records.len() {
        Step::Stalled
    } else if full {
        Step::Moved
    } else {
        Step::CaughtUp
    })
}

/// Run `handler` over `source` until shutdown.
pub async fn drive<H: Handler>(source: Arc<dyn Source>, handler: H, mut shutdown: Shutdown) {
    let name = handler.consumer().name.clone();
    let mut backoff = Backoff::default();
    // A broker that is down, or a topic not there yet, delays the start; it never
    // ends the consumer.
    while let Err(error) = source.join().await {
        tracing::warn!(error = %error, kind = error.kind(), consumer = %name, "cannot start reading yet; retrying");
        tokio::select! {
            _ = tokio::time::sleep(backoff.fail()) => {}
            _ = shutdown.wait() => return,
        }
    }
    backoff.reset();
    // After a failed or stalled batch the source goes back to the stored position
    // before it reads again; until it has, nothing is read (reading on from where a
    // failed batch left the source would skip that batch's records).
    let mut rewind = false;
    while !shutdown.is_set() {
        if rewind {
            if let Err(error) = source.rewind().await {
                tracing::error!(error = %error, consumer = %name, "cannot rewind to the stored position; retrying before reading on");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.fail()) => {}
                    _ = shutdown.wait() => {}
                }
                continue;
            }
            rewind = false;
        }
        let round = async {
            let step = step(&*source, &handler).await?;
            let idle = handler
                .between(matches!(step, Step::Idle | Step::CaughtUp))
                .await?;
            Ok::<_, InfraError>((step, idle))
        }
        .await;
        let pause = match round {
            Ok((Step::Moved | Step::CaughtUp, _)) | Ok((Step::Idle, Idle::Busy)) => {
                backoff.reset();
                continue;
            }
            Ok((Step::Idle, Idle::For(pause))) => {
                backoff.reset();
                source.idle(pause, &mut shutdown).await;
                continue;
            }
            Ok((Step::Stalled, _)) => backoff.fail(),
            Err(error) => {
                tracing::error!(error = %error, kind = error.kind(), consumer = %name, "batch failed; retrying");
                handler.failed();
                handler.consumer().metrics.inc(
                    &metrics::CONSUMER_ERRORS,
                    &[("consumer", &name), ("kind", error.kind())],
                );
                backoff.fail()
            }
        };
        rewind = true;
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait() => {}
        }
    }
    source.close();
    tracing::info!(consumer = %name, "consumer stopped");
}

/// How this process's consumers hear events: the embedded log they share with the
/// event store, or the brokers of the distributed deployment.
#[derive(Clone)]
pub enum Transport {
    /// The embedded log (every service in one process).
    InProcess(EventStore),
    /// Kafka topics, each partition read by the replica that owns it.
    Kafka(crate::kafka::KafkaConfig),
}

impl Transport {
    /// A source of the events of `aggregate_types` for `consumer`, whose position is
    /// kept in `db`; on Kafka, a consumer of this replica's partitions that is not
    /// reading yet ([`drive`] starts it).
    pub async fn events(
        &self,
        consumer: &str,
        aggregate_types: &[AggregateType],
        db: &Db,
    ) -> Result<Arc<dyn Source>, InfraError> {
        Ok(match self {
            Transport::InProcess(store) => {
                Arc::new(LogSource::open(store.clone(), aggregate_types, consumer, db).await?)
            }
            Transport::Kafka(config) => {
                let topics: Vec<String> = aggregate_types
                    .iter()
                    .map(|t| config.events_topic(*t))
                    .collect();
                Arc::new(crate::kafka::KafkaConsumer::new(
                    config,
                    &topics,
                    crate::kafka::OffsetStore::new(db, consumer),
                )?)
            }
        })
    }

    pub fn kafka(&self) -> Option<&crate::kafka::KafkaConfig> {
        match self {
            Transport::InProcess(_) => None,
            Transport::Kafka(config) => Some(config),
        }
    }
}

#[cfg(test)]
mod tests;
