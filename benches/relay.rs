//! The `relay` benchmark: events per second published from the event store (the
//! outbox) to the broker by the relay (`infra::kafka::Relay::run`: read batches by
//! position, send their records, and move the relay's position past a batch once
//! the brokers acknowledged it and every batch before it). The baseline, in the same run on the same broker: a raw
//! rdkafka producer with the same settings (`infra::kafka::producer`: `acks=all`,
//! one request in flight per broker, `linger.ms=2`) sending the same records, built
//! in memory before its clock starts, with as many queued as librdkafka takes.
//!
//! The broker is the benchmarks' own Tansu on 127.0.0.1:19094 (started on empty
//! state; `ORDERLINE_BENCH_KAFKA` to use another). The log is an SQLite file.
//!
//! `cargo bench --bench relay -- --quick` publishes 20,000 events; without
//! `--quick`, 100,000.

mod support;

use infra::kafka::{ensure_topics, record_of, KafkaConfig, Relay};
use infra::EventStore;
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::topics::AGGREGATE_TYPES;
use std::time::{Duration, Instant};
use support::log::{self, EVENTS_PER_ORDER};
use support::{progress, report, Row};

fn main() -> anyhow::Result<()> {
    let quick = support::quick();
    let events = if quick { 20_000 } else { 100_000 };
    let broker = support::services::Broker::start()?;
    let runtime = support::runtime()?;
    eprintln!("relay: {events} events to {} ...", broker.address);
    let (ours, baseline) = runtime.block_on(run(&broker.address, events))?;
    report(
        "relay",
        &[Row {
            scenario: "relay",
            metric: "sqlite log to broker".into(),
            ours,
            baseline: Some(baseline),
            unit: "events/s",
        }],
    )
}

async fn run(brokers: &str, events: usize) -> anyhow::Result<(f64, f64)> {
    let config = KafkaConfig::local(brokers);
    ensure_topics(&config, &config.event_topics()).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("events.db");
    drop(EventStore::open(&path).await?);
    let fill = progress::bar(events as u64, "writing the log");
    log::fill_sqlite(&path, events / EVENTS_PER_ORDER, &fill)?;
    fill.finish_and_clear();
    let store = EventStore::open(&path).await?;

    // Ours: the relay's own loop from position 0 until it has published everything.
    let relay = Relay::new(store.clone(), &config, "bench")?;
    let (trigger, shutdown) = infra::shutdown::channel();
    let bar = progress::bar(events as u64, "relay publishing");
    let start = Instant::now();
    let running = tokio::spawn(relay.run(shutdown));
    loop {
        let published = store.relay_position("bench").await?;
        bar.set_position(published as u64);
        if published as usize >= events {
            break;
        }
        anyhow::ensure!(!running.is_finished(), "the relay stopped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ours = start.elapsed();
    trigger.fire();
    running.await?;
    bar.finish_and_clear();

    // The baseline: the same records, built first, sent by a raw producer.
    let mut records = Vec::with_capacity(events);
    let mut after = 0;
    loop {
        let (batch, reached) = store.read_after(after, &AGGREGATE_TYPES, 10_000).await?;
        if reached == after {
            break;
        }
        for event in &batch {
            records.push(record_of(&config, event)?);
        }
        after = reached;
    }
    // The relay's own producer settings (`infra::kafka::producer`).
    let producer: FutureProducer = infra::kafka::producer(&config)?;
    let bar = progress::bar(records.len() as u64, "raw producer");
    let start = Instant::now();
    let mut deliveries = Vec::with_capacity(records.len());
    for (topic, key, payload, headers) in &records {
        let mut record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(headers.clone());
        // librdkafka's queue is bounded: when it is full, wait for room.
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((error, back)) => {
                    anyhow::ensure!(
                        error.rdkafka_error_code()
                            == Some(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        "the raw producer failed: {error}"
                    );
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => bar.inc(1),
            Ok(Err((error, _))) => anyhow::bail!("the raw producer failed: {error}"),
            Err(_) => anyhow::bail!("the raw producer dropped a record"),
        }
    }
    let baseline = start.elapsed();
    bar.finish_and_clear();
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    Ok((rate(ours), rate(baseline)))
}
