//! The Kafka adapters against a real Kafka-protocol broker (Tansu, started by
//! `infra/kafka/broker.sh`), and against librdkafka's mock cluster where a test must
//! inject broker faults.

use crate::support::kafka_broker;
use command_handlers::{Handlers, Meta};
use domain::inventory::{InventoryCommand, InventoryItem};
use domain::Quantity;
use infra::kafka::{
    ensure_topics, producer, KafkaConfig, KafkaConsumer, OffsetStore, Polled, Relay, Replica,
};
use infra::metrics::Metrics;
use infra::EventStore;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureRecord;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use schemas::topics::AggregateType;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Topics of their own for each test: the broker outlives test runs.
fn isolated(brokers: &str) -> KafkaConfig {
    let mut config = KafkaConfig::local(brokers);
    config.prefix = format!("orderline-test-{}", Uuid::now_v7().simple());
    config
}

async fn offsets(dir: &tempfile::TempDir, consumer: &str) -> OffsetStore {
    let db = infra::db::Db::open_sqlite(&dir.path().join("consumer.db"), 2)
        .await
        .expect("db");
    OffsetStore::new(&db, consumer)
}

/// Poll until `enough` holds of everything read, or fail after a while.
async fn read_until(consumer: &KafkaConsumer, enough: impl Fn(&[Polled]) -> bool) -> Vec<Polled> {
    let start = Instant::now();
    let mut all = vec![];
    while !enough(&all) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "read only {} records",
            all.len()
        );
        all.extend(
            consumer
                .poll_batch(500, Duration::from_millis(200))
                .await
                .expect("poll"),
        );
    }
    all
}

/// (key, sequence) of a test record.
fn key_and_sequence(polled: &Polled) -> (String, i64) {
    let event = polled.event().expect("an event");
    (event.envelope.aggregate_id.clone(), event.envelope.version)
}

async fn produce_sequences(config: &KafkaConfig, topic: &str, keys: usize, per_key: i64) {
    let producer = producer(config).expect("producer");
    let mut deliveries = vec![];
    for version in 1..=per_key {
        for key in 0..keys {
            let event = schemas::RecordedEvent {
                position: version,
                envelope: schemas::Envelope {
                    event_id: Uuid::now_v7(),
                    aggregate_type: "inventory".into(),
                    aggregate_id: format!("k{key}"),
                    version,
                    event_type: "StockRestocked".into(),
                    schema_version: 1,
                    occurred_at: chrono::Utc::now(),
                    correlation_id: Uuid::nil(),
                    causation_id: Uuid::nil(),
                    payload: serde_json::json!({}).into(),
                },
            };
            let payload = serde_json::to_vec(&event).expect("json");
            let headers = OwnedHeaders::new().insert(Header {
                key: "event_type",
                value: Some("StockRestocked"),
            });
            let record = FutureRecord::to(topic)
                .key(&event.envelope.aggregate_id)
                .payload(&payload)
                .headers(headers);
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("queued"),
            );
        }
    }
    for delivery in deliveries {
        delivery
            .await
            .expect("delivered")
            .map_err(|(e, _)| e)
            .expect("acknowledged");
    }
}

fn assert_in_order_per_key(records: &[Polled], keys: usize, per_key: i64) {
    let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for record in records {
        let (key, sequence) = key_and_sequence(record);
        seen.entry(key).or_default().push(sequence);
    }
    assert_eq!(seen.len(), keys);
    for (key, sequences) in seen {
        assert_eq!(
            sequences,
            (1..=per_key).collect::<Vec<_>>(),
            "key {key} out of order or incomplete"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_keeps_order_per_key_and_a_consumer_resumes_from_stored_offsets() {
    let config = isolated(&kafka_broker());
    let topic = config.events_topic(AggregateType::Inventory);
    ensure_topics(&config, std::slice::from_ref(&topic))
        .await
        .expect("topic created");
    ensure_topics(&config, std::slice::from_ref(&topic))
        .await
        .expect("creating it again is harmless");
    produce_sequences(&config, &topic, 6, 40).await;

    let dir = tempfile::tempdir().expect("dir");
    let store = offsets(&dir, "test").await;
    let first = KafkaConsumer::reading(&config, std::slice::from_ref(&topic), store.clone())
        .await
        .expect("consumer");
    let records = read_until(&first, |all| all.len() >= 240).await;
    assert_eq!(records.len(), 240);
    assert_in_order_per_key(&records, 6, 40);

    // Store the offsets of the first half only, as a consumer that crashed mid-way would.
    let mut tx = store.pool.begin().await.expect("tx");
    let mut done = 0;
    let mut per_partition: BTreeMap<i32, i64> = BTreeMap::new();
    for record in records.iter().take(120) {
        per_partition.insert(record.partition, record.offset);
        done += 1;
    }
    for (partition, offset) in &per_partition {
        store
            .save(&mut tx, &topic, *partition, *offset)
            .await
            .expect("save");
    }
    tx.commit().await.expect("commit");
    first.close();
    drop(first);

    // The next consumer starts where the database says, not from Kafka.
    let second = KafkaConsumer::reading(&config, std::slice::from_ref(&topic), store.clone())
        .await
        .expect("consumer");
    let rest = read_until(&second, |all| all.len() >= 240 - done).await;
    let expected: usize = records
        .iter()
        .filter(|r| {
            per_partition
                .get(&r.partition)
                .is_none_or(|last| r.offset > *last)
        })
        .count();
    assert_eq!(rest.len(), expected);
    let polled_again = second
        .poll_batch(100, Duration::from_millis(500))
        .await
        .expect("poll");
    assert!(polled_again.is_empty(), "nothing is read twice");
    second.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_read_disjoint_partitions_that_together_are_the_topic() {
    let mut config = isolated(&kafka_broker());
    config.partitions = 5;
    let topic = config.events_topic(AggregateType::Order);
    ensure_topics(&config, std::slice::from_ref(&topic))
        .await
        .expect("topic created");
    produce_sequences(&config, &topic, 20, 5).await;

    let marks = infra::kafka::TopicReader::from_beginning(&config, std::slice::from_ref(&topic))
        .await
        .expect("reader")
        .watermarks()
        .await
        .expect("watermarks");
    let dir = tempfile::tempdir().expect("dir");
    let mut read = vec![];
    for index in 0..2 {
        let mut replica = config.clone();
        replica.replica = Replica::new(index, 2).expect("replica");
        let owned: i64 = marks
            .iter()
            .filter(|((_, partition), _)| replica.replica.owns(*partition))
            .map(|(_, (_, high))| high)
            .sum();
        let consumer = KafkaConsumer::reading(
            &replica,
            std::slice::from_ref(&topic),
            offsets(&dir, &format!("replica-{index}")).await,
        )
        .await
        .expect("consumer");
        let mut records = read_until(&consumer, |all| all.len() as i64 >= owned).await;
        records.extend(
            consumer
                .poll_batch(500, Duration::from_millis(500))
                .await
                .expect("poll"),
        );
        assert_eq!(
            records.len() as i64,
            owned,
            "replica {index} reads its partitions"
        );
        assert!(records
            .iter()
            .all(|r| u32::try_from(r.partition).expect("partition") % 2 == index));
        consumer.close();
        read.push(records);
    }
    let mut all: Vec<(i32, i64)> = read
        .iter()
        .flatten()
        .map(|r| (r.partition, r.offset))
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 100, "every record read once, by one replica");
    assert!(read.iter().all(|records| !records.is_empty()));
}

/// Topics of a test's own on the suite's broker, and an event store (with its
/// command handlers) in a temporary folder for a relay to publish.
async fn relay_setup() -> (KafkaConfig, tempfile::TempDir, EventStore, Handlers) {
    let config = isolated(&kafka_broker());
    ensure_topics(&config, &config.event_topics())
        .await
        .expect("topics");
    let dir = tempfile::tempdir().expect("dir");
    let store = EventStore::open(&dir.path().join("events.db"))
        .await
        .expect("store");
    let handlers = Handlers::new(store.clone(), Metrics::default());
    (config, dir, store, handlers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_the_log_in_order_and_republishes_rather_than_loses() {
    let (config, dir, store, handlers) = relay_setup().await;
    for round in 0..10 {
        for sku in ["R-1", "R-2", "R-3"] {
            handlers
                .execute::<InventoryItem>(
                    sku,
                    &InventoryCommand::Restock {
                        quantity: Quantity::new(round + 1).expect("valid"),
                    },
                    &Meta::fresh(),
                )
                .await
                .expect("restock");
        }
    }
    let relay = Relay::new(store.clone(), &config, "relay").expect("relay");
    while relay.publish_batch().await.expect("published") {}
    assert_eq!(store.relay_position("relay").await.expect("position"), 30);

    let consumer_store = offsets(&dir, "reader").await;
    let consumer = KafkaConsumer::reading(
        &config,
        &[config.events_topic(AggregateType::Inventory)],
        consumer_store,
    )
    .await
    .expect("consumer");
    let records = read_until(&consumer, |all| all.len() >= 30).await;
    assert_in_order_per_key(&records, 3, 10);
    for record in &records {
        let event = record.event().expect("event");
        assert_eq!(record.topic, config.events_topic(AggregateType::Inventory));
        assert!(event.envelope.event_type == "StockRestocked");
        let header = |name: &str| {
            record
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let envelope = &event.envelope;
        assert_eq!(header("event_type").as_deref(), Some("StockRestocked"));
        assert_eq!(
            header("schema_version"),
            Some(envelope.schema_version.to_string())
        );
        assert_eq!(header("event_id"), Some(envelope.event_id.to_string()));
        assert_eq!(
            header("correlation_id"),
            Some(envelope.correlation_id.to_string())
        );
        assert_eq!(
            header("causation_id"),
            Some(envelope.causation_id.to_string())
        );
    }

    // A relay that died after producing and before recording its position publishes
    // again: duplicates, never a gap.
    store.set_relay_position("relay", 12).await.expect("rewind");
    while relay.publish_batch().await.expect("published") {}
    let again = read_until(&consumer, |all| all.len() >= 18).await;
    let mut versions: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for record in records.iter().chain(again.iter()) {
        let (key, version) = key_and_sequence(record);
        versions.entry(key).or_default().push(version);
    }
    for (key, mut seen) in versions {
        seen.dedup();
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique, (1..=10).collect::<Vec<_>>(), "{key} lost an event");
    }
    consumer.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_several_batches_in_flight_and_each_stream_stays_in_order() {
    let (config, dir, store, handlers) = relay_setup().await;
    // 3,000 events: more than the batches the relay keeps in flight at once.
    let mut writers = tokio::task::JoinSet::new();
    for sku in 0..30 {
        let handlers = handlers.clone();
        writers.spawn(async move {
            for _ in 0..100 {
                handlers
                    .execute::<InventoryItem>(
                        &format!("P-{sku}"),
                        &InventoryCommand::Restock {
                            quantity: Quantity::new(1).expect("valid"),
                        },
                        &Meta::fresh(),
                    )
                    .await
                    .expect("restock");
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    let relay = Relay::new(store.clone(), &config, "relay").expect("relay");
    assert!(relay.publish_available().await.expect("published"));
    assert_eq!(
        store.relay_position("relay").await.expect("position"),
        3_000
    );
    assert!(!relay.publish_available().await.expect("nothing new"));

    let consumer = KafkaConsumer::reading(
        &config,
        &[config.events_topic(AggregateType::Inventory)],
        offsets(&dir, "reader").await,
    )
    .await
    .expect("consumer");
    let records = read_until(&consumer, |all| all.len() >= 3_000).await;
    assert_eq!(records.len(), 3_000, "each record once");
    assert_in_order_per_key(&records, 30, 100);
    consumer.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_produce_and_fetch_errors_are_retried_without_loss_or_reordering() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    let mut config = KafkaConfig::local(cluster.bootstrap_servers());
    config.prefix = "mock".into();
    let topic = config.events_topic(AggregateType::Inventory);
    cluster.create_topic(&topic, 3, 1).expect("topic");
    let retriable = [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
    ];
    cluster.request_errors(RDKafkaApiKey::Produce, &retriable.repeat(4));
    produce_sequences(&config, &topic, 5, 30).await;

    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ]
        .repeat(3),
    );
    let dir = tempfile::tempdir().expect("dir");
    let consumer = KafkaConsumer::reading(
        &config,
        std::slice::from_ref(&topic),
        offsets(&dir, "mock").await,
    )
    .await
    .expect("consumer");
    let records = read_until(&consumer, |all| all.len() >= 150).await;
    assert_eq!(records.len(), 150);
    assert_in_order_per_key(&records, 5, 30);
    consumer.close();
}
