//! Kafka adapters (rdkafka) for the distributed deployment:
//!
//! - [`ensure_topics`]: one topic per aggregate type, created when missing, with the
//!   configured partition count and unlimited retention (the log is the history a
//!   replay reads).
//! - [`Relay`]: publishes the event store's log, in order, to those topics. Record
//!   key = aggregate id; idempotent producer with `acks=all`; the published position
//!   advances only after the broker acknowledged every record before it, so a crash
//!   republishes (consumers skip duplicates by version) and never loses.
//! - [`KafkaConsumer`]: reads the partitions its [`Replica`] owns, each from the offset
//!   stored in the consumer's own database with its effects. It joins no consumer
//!   group and commits nothing to Kafka (ADR 12). It is a [`Source`] for the
//!   consumers of [`crate::consume`].
//! - [`TopicReader`]: reads topics from the beginning, for rebuilds.

use crate::consume::{Backoff, Batch, End, Record, Replay, Source};
use crate::db::{Bind, Db, Statement};
use crate::shutdown::Shutdown;
use crate::{EventStore, InfraError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use schemas::topics::{AggregateType, Service, AGGREGATE_TYPES};
use schemas::RecordedEvent;
use sqlx::{AnyConnection, AnyPool};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Where the brokers are and how topics are made.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    /// Partitions of each topic created here.
    pub partitions: i32,
    pub replication_factor: i32,
    /// The first part of every topic name: `<prefix>.<aggregate>.events`
    /// (`orderline` unless several systems share the brokers).
    pub prefix: String,
    /// Which partitions of each topic this process reads.
    pub replica: Replica,
}

/// Which partitions a replica of a service reads: partition `p` of every topic
/// belongs to replica `p mod count`. Written `index/count`; `0/1` is the only replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica {
    index: u32,
    count: u32,
}

impl Replica {
    /// The only replica: every partition.
    pub const ONLY: Replica = Replica { index: 0, count: 1 };

    pub fn new(index: u32, count: u32) -> Result<Replica, String> {
        if count == 0 || index >= count {
            return Err(format!(
                "replica {index}/{count}: the index must be below the count"
            ));
        }
        Ok(Replica { index, count })
    }

    /// Whether this replica reads `partition`.
    pub fn owns(self, partition: i32) -> bool {
        u32::try_from(partition).is_ok_and(|p| p % self.count == self.index)
    }
}

impl std::str::FromStr for Replica {
    type Err = String;

    fn from_str(text: &str) -> Result<Replica, String> {
        let invalid = || format!("{text:?} is not a replica: write INDEX/COUNT, e.g. 0/1");
        let (index, count) = text.split_once('/').ok_or_else(invalid)?;
        let index = index.trim().parse().map_err(|_| invalid())?;
        let count = count.trim().parse().map_err(|_| invalid())?;
        Replica::new(index, count)
    }
}

impl std::fmt::Display for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl KafkaConfig {
    pub fn local(brokers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.into(),
            partitions: 3,
            replication_factor: 1,
            prefix: "orderline".into(),
            replica: Replica::ONLY,
        }
    }

    /// The event topic of an aggregate type: `<prefix>.<aggregate>.events`.
    pub fn events_topic(&self, aggregate_type: AggregateType) -> String {
        aggregate_type.events_topic(&self.prefix)
    }

    /// The command topic of a service: `<prefix>.<service>.commands`.
    pub fn commands_topic(&self, service: Service) -> String {
        service.commands_topic(&self.prefix)
    }

    /// The event topic of every aggregate type.
    pub fn event_topics(&self) -> Vec<String> {
        AggregateType::ALL
            .iter()
            .map(|t| self.events_topic(*t))
            .collect()
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            // A broker that comes back is found within a second (librdkafka waits up
            // to 10 s between attempts by default; a chain of consumers across
            // services added those waits up).
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "1000");
        config
    }
}

/// Create the topics that are missing.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> Result<(), InfraError> {
    let admin: AdminClient<DefaultClientContext> = config.client().create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                config.partitions,
                TopicReplication::Fixed(config.replication_factor),
            )
            .set("retention.ms", "-1")
            .set("retention.bytes", "-1")
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(new.iter(), &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(InfraError::Topic { topic, code }),
        }
    }
    Ok(())
}

/// A producer waiting for every in-sync replica (`acks=all`), retrying without
/// limit with one request in flight per broker: a record is either delivered, in
/// order, or not acknowledged. A retry after an answer was lost may write a record
/// twice; consumers pass over the second by its stream's version. Not idempotent
/// (ADR 22): the development broker's storage stops answering for good when an
/// idempotent producer's batch arrives after a restart with a producer epoch it
/// does not hold.
pub fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    config
        .client()
        .set("enable.idempotence", "false")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "1")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "2")
        .create()
}

const HEADERS: [&str; 6] = [
    "event_id",
    "event_type",
    "schema_version",
    "correlation_id",
    "causation_id",
    "aggregate_type",
];

/// The record an event travels as: (topic, key, payload, headers).
pub fn record_of(
    config: &KafkaConfig,
    event: &RecordedEvent,
) -> Result<(String, String, Vec<u8>, OwnedHeaders), InfraError> {
    let envelope = &event.envelope;
    let aggregate_type: AggregateType = envelope
        .aggregate_type
        .parse()
        .map_err(|e| InfraError::Corrupt(format!("event {}: {e}", envelope.event_id)))?;
    let payload = serde_json::to_vec(event)?;
    let values = [
        envelope.event_id.to_string(),
        envelope.event_type.clone(),
        envelope.schema_version.to_string(),
        envelope.correlation_id.to_string(),
        envelope.causation_id.to_string(),
        envelope.aggregate_type.clone(),
    ];
    let mut headers = OwnedHeaders::new_with_capacity(HEADERS.len());
    for (key, value) in HEADERS.iter().zip(values.iter()) {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_str()),
        });
    }
    Ok((
        config.events_topic(aggregate_type),
        envelope.aggregate_id.clone(),
        payload,
        headers,
    ))
}

/// Publishes the event store's log to Kafka, in order, resuming where it stopped.
pub struct Relay {
    store: EventStore,
    producer: FutureProducer,
    config: KafkaConfig,
    name: String,
    /// Topics it creates before it publishes (none unless asked).
    topics: Vec<String>,
}

const RELAY_BATCH: i64 = 500;
/// Batches the relay has sent and the brokers not yet acknowledged, at most.
const RELAY_IN_FLIGHT: usize = 4;

/// A batch handed to the producer: the position it reaches, and its deliveries.
struct Sent {
    reached: i64,
    deliveries: Vec<rdkafka::producer::DeliveryFuture>,
}

impl Sent {
    /// Wait until the brokers acknowledged every record of the batch.
    async fn acknowledged(self) -> Result<i64, InfraError> {
        for delivery in self.deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(error.into()),
                Err(_) => return Err(KafkaError::Canceled.into()),
            }
        }
        Ok(self.reached)
    }
}

impl Relay {
    pub fn new(
        store: EventStore,
        config: &KafkaConfig,
        name: impl Into<String>,
    ) -> Result<Relay, KafkaError> {
        Ok(Relay {
            store,
            producer: producer(config)?,
            config: config.clone(),
            name: name.into(),
            topics: vec![],
        })
    }

    /// Create `topics` (those missing) before publishing: a broker that is down or
    /// too busy to answer delays the publishing, not the process's start.
    pub fn creating(mut self, topics: Vec<String>) -> Relay {
        self.topics = topics;
        self
    }

    /// Create the topics, retrying until the broker answers; false on shutdown.
    async fn create_topics(&self, shutdown: &mut Shutdown) -> bool {
        let mut backoff = Backoff::default();
        loop {
            let created = tokio::select! {
                created = ensure_topics(&self.config, &self.topics) => created,
                _ = shutdown.wait() => return false,
            };
            let Err(error) = created else {
                return true;
            };
            tracing::warn!(error = %error, kind = error.kind(), "cannot create the topics yet; retrying");
            tokio::select! {
                _ = tokio::time::sleep(backoff.fail()) => {}
                _ = shutdown.wait() => return false,
            }
        }
    }

    /// Read the batch after `after` and hand its records to the producer; `None`
    /// when there is nothing after it.
    async fn send_batch(&self, after: i64) -> Result<Option<Sent>, InfraError> {
        let (events, reached) = self
            .store
            .read_after(after, &AGGREGATE_TYPES, RELAY_BATCH)
            .await?;
        if reached == after {
            return Ok(None);
        }
        let mut deliveries = Vec::with_capacity(events.len());
        for event in &events {
            let (topic, key, payload, headers) = record_of(&self.config, event)?;
            let record = FutureRecord::to(&topic)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            let delivery = match self.producer.send_result(record) {
                Ok(delivery) => delivery,
                Err((error, _)) => return Err(error.into()),
            };
            deliveries.push(delivery);
        }
        Ok(Some(Sent {
            reached,
            deliveries,
        }))
    }

    /// Publish the next batch; true when the published position moved.
    pub async fn publish_batch(&self) -> Result<bool, InfraError> {
        let published = self.store.relay_position(&self.name).await?;
        let Some(sent) = self.send_batch(published).await? else {
            return Ok(false);
        };
        let reached = sent.acknowledged().await?;
        // Every record up to `reached` is acknowledged: only now does the position move.
        self.store.set_relay_position(&self.name, reached).await?;
        Ok(true)
    }

    /// Publish everything there is, with up to [`RELAY_IN_FLIGHT`] batches sent and
    /// not yet acknowledged: the position moves past a batch once it and every batch
    /// before it are acknowledged (the producer keeps each partition's records in
    /// order). True when the position moved.
    pub async fn publish_available(&self) -> Result<bool, InfraError> {
        let start = self.store.relay_position(&self.name).await?;
        let mut next = start;
        let mut in_flight = std::collections::VecDeque::with_capacity(RELAY_IN_FLIGHT);
        loop {
            while in_flight.len() < RELAY_IN_FLIGHT {
                let Some(sent) = self.send_batch(next).await? else {
                    break;
                };
                next = sent.reached;
                in_flight.push_back(sent);
            }
            let Some(oldest) = in_flight.pop_front() else {
                return Ok(next != start);
            };
            let reached = oldest.acknowledged().await?;
            self.store.set_relay_position(&self.name, reached).await?;
        }
    }

    /// Publish until shutdown, waking on appends; on a broker error, back off and
    /// publish again from the last acknowledged position.
    pub async fn run(self, mut shutdown: Shutdown) {
        if !self.topics.is_empty() && !self.create_topics(&mut shutdown).await {
            return;
        }
        let mut head = self.store.subscribe();
        let mut backoff = Backoff::default();
        while !shutdown.is_set() {
            head.borrow_and_update();
            // A broker that is down keeps a publish waiting for ever (deliveries are
            // retried without limit): shutdown does not wait for it. What was not
            // acknowledged is published again by the next start.
            let published = tokio::select! {
                published = self.publish_available() => published,
                _ = shutdown.wait() => break,
            };
            let pause = match published {
                Ok(true) => {
                    backoff.reset();
                    continue;
                }
                Ok(false) => {
                    backoff.reset();
                    Duration::from_secs(60)
                }
                Err(error) => {
                    tracing::warn!(error = %error, kind = error.kind(), relay = %self.name, "publishing failed; retrying");
                    backoff.fail()
                }
            };
            tokio::select! {
                _ = head.changed() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait() => {}
            }
        }
    }
}

/// A consumer's Kafka offsets, kept in its own database.
#[derive(Clone)]
pub struct OffsetStore {
    pub pool: AnyPool,
    pub consumer: String,
}

impl OffsetStore {
    /// The offsets of `consumer`, in `db` (whose migrations made the table).
    pub fn new(db: &Db, consumer: impl Into<String>) -> OffsetStore {
        OffsetStore {
            pool: db.pool.clone(),
            consumer: consumer.into(),
        }
    }

    /// The next offset to read of a partition, if the consumer has been there.
    pub async fn next_offset(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT next_offset FROM kafka_offsets WHERE consumer = $1 AND topic = $2 AND partition = $3")
            .bind(&self.consumer)
            .bind(topic)
            .bind(i64::from(partition))
            .fetch_optional(&self.pool)
            .await
    }

    /// Sum of the next offsets over every partition: grows with every batch.
    pub async fn total(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT CAST(COALESCE(SUM(next_offset), 0) AS BIGINT) FROM kafka_offsets WHERE consumer = $1")
            .bind(&self.consumer)
            .fetch_one(&self.pool)
            .await
    }

    /// Record, inside the caller's transaction, that `offset` of a partition is done.
    pub async fn save(
        &self,
        conn: &mut AnyConnection,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<(), sqlx::Error> {
        save_next_offset(conn, &self.consumer, topic, partition, offset + 1).await
    }

    /// [`OffsetStore::save`] as a statement, to run on any connection.
    pub fn save_statement(&self, topic: &str, partition: i32, offset: i64) -> Statement {
        next_offset_statement(&self.consumer, topic, partition, offset + 1)
    }
}

/// Record, inside the caller's transaction, the next offset `consumer` reads of a partition.
async fn save_next_offset(
    conn: &mut AnyConnection,
    consumer: &str,
    topic: &str,
    partition: i32,
    next: i64,
) -> Result<(), sqlx::Error> {
    next_offset_statement(consumer, topic, partition, next)
        .execute(conn)
        .await
}

/// [`save_next_offset`] as a statement, to run on any connection.
fn next_offset_statement(consumer: &str, topic: &str, partition: i32, next: i64) -> Statement {
    Statement::new(
        "INSERT INTO kafka_offsets (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
         ON CONFLICT (consumer, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
        vec![
            Bind::Text(consumer.to_owned()),
            Bind::Text(topic.to_owned()),
            Bind::Integer(i64::from(partition)),
            Bind::Integer(next),
        ],
    )
}

/// One record read from a topic.
#[derive(Debug, Clone)]
pub struct Polled {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
    /// The record's headers whose values are text.
    pub headers: Vec<(String, String)>,
}

impl Polled {
    fn of<M: Message>(message: &M) -> Polled {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .filter_map(|h| {
                        let value = std::str::from_utf8(h.value?).ok()?;
                        Some((h.key.to_owned(), value.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Polled {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// The record read as an event, or why it is not one.
    pub fn event(&self) -> Result<RecordedEvent, String> {
        self.read()
    }

    /// The record read as JSON of type `T`, or why it is not one.
    pub fn read<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        let payload = self
            .payload
            .as_deref()
            .ok_or("a record without a payload")?;
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    }

    /// Where the record was read, for a dead letter that is not an event.
    pub fn origin(&self) -> serde_json::Value {
        serde_json::json!({ "topic": self.topic, "partition": self.partition, "offset": self.offset })
    }
}

/// Partitions, by topic name and number.
type Partitions = Vec<(String, i32)>;

/// How long a poll waits for the first record of a batch.
const POLL_WAIT: Duration = Duration::from_millis(200);

/// A consumer of the partitions its replica owns, from the offsets stored in its own
/// database. It joins no consumer group: a group coordinator that misbehaves cannot
/// stop it (ADR 12).
#[derive(Clone)]
pub struct KafkaConsumer {
    consumer: Arc<BaseConsumer>,
    topics: Vec<String>,
    config: KafkaConfig,
    /// Set once it has been given its partitions.
    reading: Arc<std::sync::atomic::AtomicBool>,
    pub offsets: OffsetStore,
    /// The watermarks last asked of the brokers, and when: reused for
    /// [`WATERMARKS_REUSED_FOR`], so frequent scrapes do not load the brokers.
    watermarks: Arc<std::sync::Mutex<Option<(std::time::Instant, Watermarks)>>>,
    /// The partitions this replica owns, once the brokers have named them: a rewind
    /// assigns them again without asking (partitions are never taken from a topic).
    owned: Arc<tokio::sync::OnceCell<Partitions>>,
}

/// How long the watermarks a consumer asked for serve its lag figures (shorter than
/// any settling window that reads them).
const WATERMARKS_REUSED_FOR: Duration = Duration::from_millis(250);

impl KafkaConsumer {
    /// A consumer of `topics` that reads once [`KafkaConsumer::start`]ed (so a tool
    /// that only needs its offsets reads nothing).
    pub fn new(
        config: &KafkaConfig,
        topics: &[String],
        offsets: OffsetStore,
    ) -> Result<KafkaConsumer, KafkaError> {
        let consumer: BaseConsumer = reader(config, &offsets.consumer).create()?;
        Ok(KafkaConsumer {
            consumer: Arc::new(consumer),
            topics: topics.to_vec(),
            config: config.clone(),
            reading: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            offsets,
            watermarks: Arc::new(std::sync::Mutex::new(None)),
            owned: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    /// A consumer of `topics` that reads from its stored offsets.
    pub async fn reading(
        config: &KafkaConfig,
        topics: &[String],
        offsets: OffsetStore,
    ) -> Result<KafkaConsumer, InfraError> {
        let consumer = KafkaConsumer::new(config, topics, offsets)?;
        consumer.start().await?;
        Ok(consumer)
    }

    /// Whether it has been given its partitions.
    pub fn is_reading(&self) -> bool {
        self.reading.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Read the partitions this replica owns, each from its stored offset (from the
    /// beginning where none is stored). Also what a rewind does: assigning again is
    /// what librdkafka does reliably whatever state a partition's fetcher is in.
    ///
    /// The partitions are asked of the brokers once; a rewind (after a failed batch,
    /// e.g. the database away) only assigns them again from the stored offsets, so
    /// it needs nothing of a broker that is slow to answer metadata requests.
    pub async fn start(&self) -> Result<(), InfraError> {
        let owned = self
            .owned
            .get_or_try_init(|| async {
                let all = partitions(self.consumer.clone(), self.topics.clone()).await?;
                Ok::<_, InfraError>(
                    all.into_iter()
                        .filter(|(_, partition)| self.config.replica.owns(*partition))
                        .collect(),
                )
            })
            .await?;
        let mut assignment = TopicPartitionList::new();
        for (topic, partition) in owned {
            let next = self.offsets.next_offset(topic, *partition).await?;
            let offset = next.map_or(Offset::Beginning, Offset::Offset);
            assignment.add_partition_offset(topic, *partition, offset)?;
        }
        self.consumer.assign(&assignment)?;
        self.reading
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Up to `max` records, waiting at most `wait` for the first. Transient errors the
    /// client retries by itself end the batch early and are logged.
    pub async fn poll_batch(&self, max: usize, wait: Duration) -> Result<Vec<Polled>, InfraError> {
        poll_batch(self.consumer.clone(), max, wait).await
    }

    /// (sum of stored next offsets, records not yet consumed) over every partition
    /// of its topics, whichever replica reads it.
    pub async fn progress(&self) -> Result<(i64, i64), InfraError> {
        let cached = self
            .watermarks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < WATERMARKS_REUSED_FOR)
            .map(|(_, marks)| marks.clone());
        let marks = match cached {
            Some(marks) => marks,
            None => {
                let marks = watermarks(self.consumer.clone(), self.topics.clone()).await?;
                *self
                    .watermarks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((std::time::Instant::now(), marks.clone()));
                marks
            }
        };
        let (mut done, mut lag) = (0, 0);
        for ((topic, partition), (_, high)) in marks {
            let next = self
                .offsets
                .next_offset(&topic, partition)
                .await?
                .unwrap_or(0);
            done += next;
            lag += (high - next).max(0);
        }
        Ok((done, lag))
    }

    /// Stop reading.
    pub fn close(&self) {
        if let Err(error) = self.consumer.unassign() {
            tracing::warn!(error = %error, "cannot stop reading");
        }
    }
}

/// The client settings of every reader: nothing committed to Kafka. librdkafka wants
/// a `group.id` before it assigns partitions; a consumer that only assigns never
/// joins that group (no JoinGroup, no heartbeats, no rebalances).
fn reader(config: &KafkaConfig, name: &str) -> ClientConfig {
    let mut client = config.client();
    client
        .set("group.id", format!("{}.{name}", config.prefix))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // A command or an event waits at most this long in the broker before it is
        // fetched: the saga's round trips go through several fetches.
        .set("fetch.wait.max.ms", "50")
        // Small fetches: a broker answers each one quickly even when the reader is far
        // behind (the development broker reads and sizes every record up to the
        // response limit, one header query per record), so no request outlives its
        // time-out and gets sent again.
        .set("fetch.max.bytes", FETCH_BYTES)
        .set("message.max.bytes", FETCH_BYTES)
        .set("max.partition.fetch.bytes", FETCH_BYTES);
    client
}

/// The most a fetch asks for (all partitions together); our records are a few
/// kilobytes at most.
const FETCH_BYTES: &str = "262144";

/// The polled records among the first `done` of a batch.
fn polled(batch: &Batch, done: usize) -> Vec<&Polled> {
    batch.records[..done.min(batch.records.len())]
        .iter()
        .filter_map(|record| match record {
            Record::Kafka(polled) => Some(polled),
            Record::Event(_) => None,
        })
        .collect()
}

/// The highest offset of each partition among `records`.
fn last_offsets<'a>(
    records: impl IntoIterator<Item = &'a Polled>,
) -> BTreeMap<(&'a str, i32), i64> {
    let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for record in records {
        let entry = last
            .entry((record.topic.as_str(), record.partition))
            .or_insert(record.offset);
        *entry = (*entry).max(record.offset);
    }
    last
}

#[async_trait::async_trait]
impl Source for KafkaConsumer {
    async fn join(&self) -> Result<(), InfraError> {
        self.start().await
    }

    fn ready(&self) -> bool {
        self.is_reading()
    }

    async fn next_batch(&self, max: usize) -> Result<Batch, InfraError> {
        Ok(self.poll_batch(max, POLL_WAIT).await?.into())
    }

    fn store(&self, batch: &Batch, done: usize) -> Vec<Statement> {
        last_offsets(polled(batch, done))
            .into_iter()
            .map(|((topic, partition), offset)| {
                self.offsets.save_statement(topic, partition, offset)
            })
            .collect()
    }

    async fn committed(&self, _batch: &Batch, _done: usize) -> Result<i64, InfraError> {
        Ok(self.offsets.total().await?)
    }

    async fn rewind(&self) -> Result<(), InfraError> {
        self.start().await
    }

    async fn idle(&self, _pause: Duration, _shutdown: &mut Shutdown) {
        // The poll has waited for records already.
    }

    async fn checkpoint(&self) -> Result<i64, InfraError> {
        Ok(self.offsets.total().await?)
    }

    async fn standing(&self) -> Result<(i64, i64), InfraError> {
        self.progress().await
    }

    async fn replay(&self) -> Result<Box<dyn Replay>, InfraError> {
        Ok(Box::new(
            TopicReader::from_beginning(&self.config, &self.topics).await?,
        ))
    }

    fn close(&self) {
        KafkaConsumer::close(self);
    }
}

/// Up to `max` records from `consumer`, waiting at most `wait` for the first.
async fn poll_batch(
    consumer: Arc<BaseConsumer>,
    max: usize,
    wait: Duration,
) -> Result<Vec<Polled>, InfraError> {
    let polled = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut timeout = wait;
        while out.len() < max {
            match consumer.poll(timeout) {
                None => break,
                // Consumption errors are reports: librdkafka retries the fetch itself.
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "kafka consumer reported an error; it retries");
                    break;
                }
                Some(Ok(message)) => {
                    out.push(Polled::of(&message));
                    timeout = Duration::ZERO;
                }
            }
        }
        out
    })
    .await?;
    Ok(polled)
}

type Watermarks = BTreeMap<(String, i32), (i64, i64)>;

/// How long the broker has to answer the metadata and watermark requests of one
/// question (which partitions, how far they go): a broker that is slow makes the
/// question unavailable, it never holds up a health check or a scrape for long.
const BROKER_ANSWER: Duration = Duration::from_secs(5);

/// What is left of `budget` since `start`; unavailable once it is spent.
fn remaining(start: std::time::Instant, budget: Duration) -> Result<Duration, InfraError> {
    budget
        .checked_sub(start.elapsed())
        .filter(|left| !left.is_zero())
        .ok_or_else(|| {
            InfraError::Unavailable(format!(
                "the broker did not answer within {} s",
                budget.as_secs()
            ))
        })
}

/// Every (topic, partition) of `topics`; unavailable while a topic has none yet.
async fn partitions(
    consumer: Arc<BaseConsumer>,
    topics: Vec<String>,
) -> Result<Partitions, InfraError> {
    tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        for topic in topics {
            let wait = remaining(start, BROKER_ANSWER)?;
            let metadata = consumer.fetch_metadata(Some(&topic), wait)?;
            let found: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if found.is_empty() {
                return Err(InfraError::Unavailable(format!(
                    "topic {topic} has no partitions (yet)"
                )));
            }
            out.extend(found.into_iter().map(|p| (topic.clone(), p)));
        }
        Ok(out)
    })
    .await?
}

/// The (topic, partition) -> (low, high) watermarks of every partition of `topics`.
async fn watermarks(
    consumer: Arc<BaseConsumer>,
    topics: Vec<String>,
) -> Result<Watermarks, InfraError> {
    let partitions = partitions(consumer.clone(), topics).await?;
    // Every partition's at once (one blocking call each): asked one after the other,
    // a loaded broker's answers add up past what a scrape can wait.
    let start = std::time::Instant::now();
    let mut asked = tokio::task::JoinSet::new();
    for (topic, partition) in partitions {
        let consumer = consumer.clone();
        asked.spawn_blocking(move || -> Result<_, InfraError> {
            let wait = remaining(start, BROKER_ANSWER)?;
            let marks = consumer.fetch_watermarks(&topic, partition, wait)?;
            Ok(((topic, partition), marks))
        });
    }
    let mut out = BTreeMap::new();
    while let Some(answered) = asked.join_next().await {
        let (key, marks) = answered??;
        out.insert(key, marks);
    }
    Ok(out)
}

/// Reads topics from their beginning, for replays: it commits nothing; where it stands is kept in memory
/// until a rebuild stores it with [`Replay::save_as`].
pub struct TopicReader {
    consumer: Arc<BaseConsumer>,
    topics: Vec<String>,
    /// The next offset of every partition read so far.
    next: std::sync::Mutex<BTreeMap<(String, i32), i64>>,
}

impl TopicReader {
    pub async fn from_beginning(
        config: &KafkaConfig,
        topics: &[String],
    ) -> Result<TopicReader, InfraError> {
        let consumer: BaseConsumer = reader(config, "replay").create()?;
        let consumer = Arc::new(consumer);
        let partitions = watermarks(consumer.clone(), topics.to_vec()).await?;
        let mut assignment = TopicPartitionList::new();
        for (topic, partition) in partitions.keys() {
            assignment.add_partition_offset(topic, *partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        Ok(TopicReader {
            consumer,
            topics: topics.to_vec(),
            next: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// (low, high) watermarks of every partition now.
    pub async fn watermarks(&self) -> Result<Watermarks, InfraError> {
        watermarks(self.consumer.clone(), self.topics.clone()).await
    }

    pub async fn poll_batch(&self, max: usize, wait: Duration) -> Result<Vec<Polled>, InfraError> {
        poll_batch(self.consumer.clone(), max, wait).await
    }

    fn next(&self) -> BTreeMap<(String, i32), i64> {
        self.next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[async_trait::async_trait]
impl Source for TopicReader {
    async fn next_batch(&self, max: usize) -> Result<Batch, InfraError> {
        Ok(self.poll_batch(max, POLL_WAIT).await?.into())
    }

    fn store(&self, _batch: &Batch, _done: usize) -> Vec<Statement> {
        vec![]
    }

    async fn committed(&self, batch: &Batch, done: usize) -> Result<i64, InfraError> {
        let mut next = self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((topic, partition), offset) in last_offsets(polled(batch, done)) {
            next.insert((topic.to_owned(), partition), offset + 1);
        }
        Ok(next.values().sum())
    }

    async fn rewind(&self) -> Result<(), InfraError> {
        Ok(())
    }

    async fn idle(&self, _pause: Duration, _shutdown: &mut Shutdown) {}

    async fn checkpoint(&self) -> Result<i64, InfraError> {
        Ok(self.next().values().sum())
    }

    async fn standing(&self) -> Result<(i64, i64), InfraError> {
        let next = self.next();
        let (mut done, mut lag) = (0, 0);
        for (key, (low, high)) in self.watermarks().await? {
            let at = next.get(&key).copied().unwrap_or(low);
            done += at;
            lag += (high - at).max(0);
        }
        Ok((done, lag))
    }

    async fn replay(&self) -> Result<Box<dyn Replay>, InfraError> {
        Err(InfraError::Config("a replay reader is not replayed".into()))
    }
}

#[async_trait::async_trait]
impl Replay for TopicReader {
    async fn end(&self) -> Result<End, InfraError> {
        Ok(End::Offsets(replay_end(self.watermarks().await?)))
    }

    fn reached(&self, end: &End) -> bool {
        let End::Offsets(end) = end else {
            return false;
        };
        reached_end(&self.next(), end)
    }

    async fn save_as(&self, conn: &mut AnyConnection, consumer: &str) -> Result<(), InfraError> {
        sqlx::query("DELETE FROM kafka_offsets WHERE consumer = $1")
            .bind(consumer)
            .execute(&mut *conn)
            .await?;
        for ((topic, partition), next) in self.next() {
            save_next_offset(conn, consumer, &topic, partition, next).await?;
        }
        Ok(())
    }
}

/// Where a replay of partitions with these watermarks ends: each partition's high
/// watermark, or 0 for one with nothing to read (empty, or emptied by retention: its
/// low watermark is its high one), which counts as reached without a read.
fn replay_end(marks: Watermarks) -> BTreeMap<(String, i32), i64> {
    marks
        .into_iter()
        .map(|(key, (low, high))| (key, if low >= high { 0 } else { high }))
        .collect()
}

/// Whether a reader whose next offsets are `next` has reached `end`: each partition
/// read up to its end, and each one never read with nothing to read.
fn reached_end(next: &BTreeMap<(String, i32), i64>, end: &BTreeMap<(String, i32), i64>) -> bool {
    end.iter()
        .all(|(key, high)| next.get(key).map_or(*high <= 0, |at| at >= high))
}

#[cfg(test)]
mod tests {
    use super::{reached_end, replay_end, Replica, Watermarks};
    use std::collections::BTreeMap;

    /// A partition that retention emptied (low = high > 0) is never read: the replay
    /// must not wait for it (it used to, until the rebuild gave up as stalled).
    #[test]
    fn a_replay_reaches_its_end_past_partitions_with_nothing_to_read() {
        let key = |partition: i32| ("orders".to_owned(), partition);
        let marks: Watermarks = [
            (key(0), (0, 10)),
            (key(1), (5, 5)),
            (key(2), (0, 0)),
            (key(3), (4, 9)),
        ]
        .into();
        let end = replay_end(marks);
        let mut next = BTreeMap::new();
        assert!(!reached_end(&next, &end));
        next.insert(key(0), 10);
        assert!(!reached_end(&next, &end), "partition 3 is not read yet");
        next.insert(key(3), 8);
        assert!(!reached_end(&next, &end), "partition 3 is read to 8 of 9");
        next.insert(key(3), 9);
        assert!(reached_end(&next, &end));
    }

    #[test]
    fn replicas_share_every_partition_out_once() {
        let replicas: Vec<Replica> = ["0/3", "1/3", " 2 / 3 "]
            .iter()
            .map(|text| text.parse().expect("a replica"))
            .collect();
        for partition in 0..12 {
            let owners = replicas.iter().filter(|r| r.owns(partition)).count();
            assert_eq!(owners, 1, "partition {partition}");
        }
        assert!((0..12).all(|p| Replica::ONLY.owns(p)));
        assert!(!Replica::ONLY.owns(-1));
        assert_eq!(replicas[1].to_string(), "1/3");
        for bad in ["3/3", "0/0", "1", "a/b", "-1/2", ""] {
            assert!(bad.parse::<Replica>().is_err(), "{bad:?}");
        }
    }
}
