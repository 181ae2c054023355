//! The projection runner: read the next events (from the embedded log after the
//! checkpoint, or from Kafka after the offsets kept in the projection's database),
//! apply each under a savepoint, and commit the changes with the new checkpoint or
//! offsets in one transaction.

use crate::projection::Projection;
use infra::db::Db;
use infra::kafka::{KafkaConfig, KafkaConsumer, OffsetStore};
use infra::metrics::{self, Metrics};
use infra::progress::Progress;
use infra::shutdown::Shutdown;
use infra::{checkpoints, dead_letters, EventStore, InfraError};
use schemas::{AnyEvent, RecordedEvent};
use sqlx::AnyConnection;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

const BATCH: i64 = 500;

/// Where a projection's events come from.
#[derive(Clone)]
pub enum Feed {
    /// The embedded log (the event store's table); the checkpoint is a position.
    Log,
    /// Kafka topics; the checkpoint is the offsets kept in the projection's database.
    Kafka {
        consumer: KafkaConsumer,
        topics: Vec<String>,
        config: KafkaConfig,
    },
}

/// One projection with its database and the lock a rebuild takes to swap tables.
#[derive(Clone)]
pub struct ProjectionHandle {
    pub projection: Projection,
    pub db: Db,
    pub feed: Feed,
    /// Held by the live runner for each batch, and by a rebuild while it swaps.
    pub lock: Arc<Mutex<()>>,
    /// Set while a rebuild runs: one at a time.
    pub rebuilding: Arc<AtomicBool>,
}

/// Every projection of this process, with what the runners and rebuilds share.
#[derive(Clone)]
pub struct Projections {
    pub handles: Vec<ProjectionHandle>,
    pub store: EventStore,
    pub progress: Progress,
    pub metrics: Metrics,
}

impl Projections {
    /// Open each projection's tables (creating them when missing) in its service's
    /// db; with `kafka`, each reads its topics as a member of its own consumer group.
    pub async fn open(
        store: EventStore,
        progress: Progress,
        metrics: Metrics,
        databases: &[(Projection, Db)],
        kafka: Option<&KafkaConfig>,
    ) -> Result<Projections, InfraError> {
        let mut handles = vec![];
        for (projection, db) in databases {
            let name = projection.name();
            db.migrate(&projection.create_tables("")).await?;
            db.migrate(projection.create_indexes()).await?;
            let feed = match kafka {
                None => {
                    let checkpoint = checkpoints::load(&db.pool, name).await?;
                    progress.set_checkpoint(name, checkpoint);
                    Feed::Log
                }
                Some(config) => {
                    let offsets = OffsetStore::new(db, name);
                    progress.set_checkpoint(name, offsets.total().await?);
                    let topics: Vec<String> = projection
                        .topics()
                        .iter()
                        .map(|t| config.events_topic(t))
                        .collect();
                    let group = format!("{}.projection.{name}", config.prefix);
                    let consumer = KafkaConsumer::member(config, &group, &topics, offsets)
                        .map_err(|e| {
                            InfraError::Corrupt(format!("kafka consumer for {name}: {e}"))
                        })?;
                    Feed::Kafka {
                        consumer,
                        topics,
                        config: config.clone(),
                    }
                }
            };
            handles.push(ProjectionHandle {
                projection: *projection,
                db: db.clone(),
                feed,
                lock: Arc::new(Mutex::new(())),
                rebuilding: Arc::new(AtomicBool::new(false)),
            });
        }
        Ok(Projections {
            handles,
            store,
            progress,
            metrics,
        })
    }

    pub fn get(&self, name: &str) -> Option<&ProjectionHandle> {
        self.handles.iter().find(|h| h.projection.name() == name)
    }

    /// Start one runner per projection.
    pub fn spawn_all(&self, shutdown: &Shutdown) -> Vec<tokio::task::JoinHandle<()>> {
        self.handles
            .iter()
            .map(|handle| tokio::spawn(run(self.clone(), handle.clone(), shutdown.clone())))
            .collect()
    }

    /// (checkpoint, lag) of a projection: a position and the events after it, or the
    /// sum of its offsets and the records not yet consumed.
    pub async fn standing(&self, handle: &ProjectionHandle) -> Result<(i64, i64), InfraError> {
        match &handle.feed {
            Feed::Log => {
                let checkpoint = self.progress.checkpoint(handle.projection.name());
                let lag = self
                    .store
                    .count_after(checkpoint, handle.projection.topics())
                    .await?;
                Ok((checkpoint, lag))
            }
            Feed::Kafka {
                consumer, topics, ..
            } => consumer
                .progress(topics)
                .await
                .map_err(|e| InfraError::Corrupt(format!("kafka: {e}"))),
        }
    }
}

/// Follow the feed until shutdown.
pub async fn run(all: Projections, handle: ProjectionHandle, mut shutdown: Shutdown) {
    let name = handle.projection.name();
    if let Feed::Kafka { consumer, .. } = &handle.feed {
        if let Err(error) = consumer.join() {
            tracing::error!(error = %error, projection = name, "cannot join the consumer group");
            return;
        }
    }
    let mut head = all.store.subscribe();
    let mut failures: u32 = 0;
    while !shutdown.is_set() {
        head.borrow_and_update();
        let pause = match step(&all, &handle).await {
            Ok(true) => {
                failures = 0;
                continue;
            }
            // Kafka polls wait by themselves; the log wakes the runner on appends.
            Ok(false) if matches!(handle.feed, Feed::Kafka { .. }) => continue,
            Ok(false) => Duration::from_secs(60),
            Err(error) => {
                failures += 1;
                tracing::error!(error = %error, projection = name, "projection batch failed; retrying");
                if let Feed::Kafka { consumer, .. } = &handle.feed {
                    if let Err(error) = consumer.rewind().await {
                        tracing::error!(error = %error, projection = name, "cannot rewind to the stored offsets");
                    }
                }
                Duration::from_millis(100 * u64::from(failures.min(50)))
            }
        };
        tokio::select! {
            _ = head.changed() => {}
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait() => {}
        }
    }
    if let Feed::Kafka { consumer, .. } = &handle.feed {
        consumer.close();
    }
    tracing::info!(projection = name, "projection runner stopped");
}

/// Apply the next batch; true when the checkpoint moved.
pub async fn step(all: &Projections, handle: &ProjectionHandle) -> Result<bool, InfraError> {
    match &handle.feed {
        Feed::Log => step_log(all, handle).await,
        Feed::Kafka { consumer, .. } => step_kafka(all, handle, consumer).await,
    }
}

async fn step_log(all: &Projections, handle: &ProjectionHandle) -> Result<bool, InfraError> {
    let _live = handle.lock.lock().await;
    let projection = handle.projection;
    let name = projection.name();
    let checkpoint = checkpoints::load(&handle.db.pool, name).await?;
    let (events, reached) = all
        .store
        .read_after(checkpoint, projection.topics(), BATCH)
        .await?;
    if reached == checkpoint {
        all.progress.set_checkpoint(name, checkpoint);
        return Ok(false);
    }
    let mut tx = handle.db.begin_write().await?;
    for recorded in &events {
        apply_or_dead_letter(&mut tx, all, projection, recorded).await?;
    }
    checkpoints::save(&mut tx, name, reached).await?;
    tx.commit().await?;
    all.progress.set_checkpoint(name, reached);
    Ok(true)
}

async fn step_kafka(
    all: &Projections,
    handle: &ProjectionHandle,
    consumer: &KafkaConsumer,
) -> Result<bool, InfraError> {
    let polled = consumer
        .poll_batch(BATCH as usize, Duration::from_millis(500))
        .await
        .map_err(|e| InfraError::Corrupt(format!("kafka: {e}")))?;
    if polled.is_empty() {
        return Ok(false);
    }
    let _live = handle.lock.lock().await;
    let projection = handle.projection;
    let name = projection.name();
    let mut tx = handle.db.begin_write().await?;
    for record in &polled {
        match record.event() {
            Ok(event) => apply_or_dead_letter(&mut tx, all, projection, &event).await?,
            Err(error) => {
                tracing::error!(error = %error, projection = name, topic = %record.topic, offset = record.offset, "unreadable record dead-lettered");
                dead_letters::record_unreadable(
                    &mut tx,
                    name,
                    record.offset,
                    &record.origin(),
                    &error,
                )
                .await?;
                all.metrics
                    .inc(&metrics::DEAD_LETTERS, &[("consumer", name)]);
            }
        }
    }
    consumer.offsets.save_batch(&mut tx, &polled).await?;
    tx.commit().await?;
    all.progress
        .set_checkpoint(name, consumer.offsets.total().await?);
    Ok(true)
}

async fn apply_or_dead_letter(
    conn: &mut AnyConnection,
    all: &Projections,
    projection: Projection,
    recorded: &RecordedEvent,
) -> Result<(), InfraError> {
    let name = projection.name();
    if let Err(error) = apply_guarded(conn, projection, "", recorded).await? {
        tracing::error!(error = %error, projection = name, position = recorded.position, "event dead-lettered");
        dead_letters::record(conn, name, recorded, &error).await?;
        all.metrics
            .inc(&metrics::DEAD_LETTERS, &[("consumer", name)]);
    }
    Ok(())
}

/// Apply one event unless the version guard says it was applied already. The outer
/// error is the database failing (retry the batch); the inner one is this event
/// failing (its changes are undone; dead-letter it and go on).
pub async fn apply_guarded(
    conn: &mut AnyConnection,
    projection: Projection,
    suffix: &str,
    recorded: &RecordedEvent,
) -> Result<Result<(), String>, sqlx::Error> {
    let envelope = &recorded.envelope;
    let guard = projection.guard_table(suffix);
    let applied: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT version FROM {guard} WHERE aggregate_type = $1 AND aggregate_id = $2"
    ))
    .bind(&envelope.aggregate_type)
    .bind(&envelope.aggregate_id)
    .fetch_optional(&mut *conn)
    .await?;
    if applied.is_some_and(|v| v >= envelope.version) {
        return Ok(Ok(()));
    }
    let outcome = apply_one(conn, projection, suffix, recorded).await?;
    // The guard moves past a dead-lettered event too: a later event of the stream
    // still applies, and a retry from the dead-letter store bypasses the guard.
    sqlx::query(&format!(
        "INSERT INTO {guard} (aggregate_type, aggregate_id, version) VALUES ($1, $2, $3)
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version"
    ))
    .bind(&envelope.aggregate_type)
    .bind(&envelope.aggregate_id)
    .bind(envelope.version)
    .execute(&mut *conn)
    .await?;
    Ok(outcome)
}

/// Decode and apply one event under a savepoint, without the version guard.
pub async fn apply_one(
    conn: &mut AnyConnection,
    projection: Projection,
    suffix: &str,
    recorded: &RecordedEvent,
) -> Result<Result<(), String>, sqlx::Error> {
    let event = match AnyEvent::from_envelope(&recorded.envelope) {
        Ok(event) => event,
        Err(error) => return Ok(Err(error.to_string())),
    };
    sqlx::query("SAVEPOINT apply_event")
        .execute(&mut *conn)
        .await?;
    let applied = projection
        .apply(conn, suffix, &recorded.envelope, &event)
        .await;
    if applied.is_err() {
        sqlx::query("ROLLBACK TO apply_event")
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("RELEASE apply_event")
        .execute(&mut *conn)
        .await?;
    Ok(applied.map_err(|e| e.to_string()))
}
