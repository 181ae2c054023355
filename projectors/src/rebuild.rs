//! Rebuilding a projection from the start of its topics: from the embedded log, or
//! from Kafka.
//!
//! The events go into shadow tables while the live tables keep serving. When the
//! shadow has caught up, the live runner is paused (its lock), the last events are
//! applied, and in one transaction the live tables are dropped, the shadows renamed
//! into their place, and the checkpoint (a position, or the offsets of every
//! partition) set. Events that fail during the rebuild are dead-lettered under
//! `<name>@rebuild` and take the place of the old dead letters in the same swap.

use crate::runner::{apply_guarded, Feed, ProjectionHandle, Projections};
use infra::db::Dialect;
use infra::kafka::TopicReader;
use infra::progress::Rebuild;
use infra::{checkpoints, dead_letters, InfraError};
use schemas::RecordedEvent;
use sqlx::AnyConnection;
use std::collections::BTreeMap;
use std::time::Duration;

const BATCH: i64 = 1000;
const SHADOW: &str = "_shadow";

/// Where a rebuilt projection stands after the swap.
enum Reached {
    Position(i64),
    /// The next offset of every partition read.
    Offsets(BTreeMap<(String, i32), i64>),
}

/// Rebuild `handle`'s projection; `report` hears (processed, total) as it goes.
/// Returns the number of events applied.
pub async fn rebuild(
    all: &Projections,
    handle: &ProjectionHandle,
    mut report: impl FnMut(Rebuild),
) -> Result<u64, InfraError> {
    let projection = handle.projection;
    let name = projection.name();
    let db = &handle.db;
    let rebuild_consumer = format!("{name}@rebuild");
    for table in projection.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}{SHADOW}"))
            .execute(&db.pool)
            .await?;
    }
    sqlx::query("DELETE FROM dead_letters WHERE consumer = $1")
        .bind(&rebuild_consumer)
        .execute(&db.pool)
        .await?;
    db.migrate(&projection.create_tables(SHADOW)).await?;

    let mut shadow = Shadow {
        all,
        handle,
        dead_letters: rebuild_consumer.clone(),
        progress: Rebuild::default(),
    };
    let (reached, _paused) = match &handle.feed {
        Feed::Log => {
            shadow.progress.total =
                all.store.count_after(0, projection.topics()).await?.max(0) as u64;
            shadow.report(&mut report);
            // Catch up without holding up the live runner...
            let position = shadow.fill_from_log(0, &mut report).await?;
            // ...then pause it for the last events and the swap.
            let paused = handle.lock.lock().await;
            (
                Reached::Position(shadow.fill_from_log(position, &mut report).await?),
                paused,
            )
        }
        Feed::Kafka { config, topics, .. } => {
            let reader = TopicReader::from_beginning(config, topics)
                .await
                .map_err(kafka_error)?;
            let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
            let marks = reader.watermarks().await.map_err(kafka_error)?;
            shadow.progress.total = marks
                .values()
                .map(|(low, high)| (high - low).max(0) as u64)
                .sum();
            shadow.report(&mut report);
            shadow
                .fill_from_kafka(&reader, marks, &mut next, &mut report)
                .await?;
            let paused = handle.lock.lock().await;
            let marks = reader.watermarks().await.map_err(kafka_error)?;
            shadow
                .fill_from_kafka(&reader, marks, &mut next, &mut report)
                .await?;
            (Reached::Offsets(next), paused)
        }
    };

    let mut tx = db.begin_write().await?;
    for table in projection.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {table}{SHADOW} RENAME TO {table}"))
            .execute(&mut *tx)
            .await?;
        if db.dialect == Dialect::Postgres {
            // Index names are global in PostgreSQL: free the shadow's for the next rebuild.
            sqlx::query(&format!(
                "ALTER INDEX IF EXISTS {table}{SHADOW}_pkey RENAME TO {table}_pkey"
            ))
            .execute(&mut *tx)
            .await?;
        }
    }
    for statement in projection
        .create_indexes()
        .split(';')
        .filter(|s| !s.trim().is_empty())
    {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    sqlx::query("DELETE FROM dead_letters WHERE consumer = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE dead_letters SET consumer = $1 WHERE consumer = $2")
        .bind(name)
        .bind(&rebuild_consumer)
        .execute(&mut *tx)
        .await?;
    match &reached {
        Reached::Position(position) => checkpoints::save(&mut tx, name, *position).await?,
        Reached::Offsets(next) => {
            let Feed::Kafka { consumer, .. } = &handle.feed else {
                return Err(InfraError::Corrupt("offsets without a Kafka feed".into()));
            };
            sqlx::query("DELETE FROM kafka_offsets WHERE consumer = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            for ((topic, partition), next) in next {
                if *next > 0 {
                    consumer
                        .offsets
                        .save(&mut tx, topic, *partition, next - 1)
                        .await?;
                }
            }
        }
    }
    tx.commit().await?;
    match (&reached, &handle.feed) {
        (Reached::Position(position), _) => all.progress.set_checkpoint(name, *position),
        (Reached::Offsets(_), Feed::Kafka { consumer, .. }) => {
            // The live consumer goes on from the rebuilt offsets, not from where it was.
            consumer.rewind().await.map_err(kafka_error)?;
            all.progress
                .set_checkpoint(name, consumer.offsets.total().await?);
        }
        (Reached::Offsets(_), Feed::Log) => {}
    }
    let mut progress = shadow.progress;
    all.progress.set_rebuild(name, None);
    progress.total = progress.total.max(progress.processed);
    report(progress);
    Ok(progress.processed)
}

fn kafka_error(error: infra::kafka::KafkaAdapterError) -> InfraError {
    InfraError::Corrupt(format!("kafka: {error}"))
}

/// The shadow tables being filled.
struct Shadow<'a> {
    all: &'a Projections,
    handle: &'a ProjectionHandle,
    dead_letters: String,
    progress: Rebuild,
}

impl Shadow<'_> {
    fn report(&self, report: &mut impl FnMut(Rebuild)) {
        self.all
            .progress
            .set_rebuild(self.handle.projection.name(), Some(self.progress));
        report(self.progress);
    }

    /// Apply events from the log after `position` until the head; the position reached.
    async fn fill_from_log(
        &mut self,
        mut position: i64,
        report: &mut impl FnMut(Rebuild),
    ) -> Result<i64, InfraError> {
        loop {
            let (events, reached) = self
                .all
                .store
                .read_after(position, self.handle.projection.topics(), BATCH)
                .await?;
            if reached == position {
                return Ok(position);
            }
            let mut tx = self.handle.db.begin_write().await?;
            self.apply(&mut tx, &events).await?;
            tx.commit().await?;
            position = reached;
            self.report(report);
        }
    }

    /// Apply records until every partition has reached its high watermark in `marks`.
    async fn fill_from_kafka(
        &mut self,
        reader: &TopicReader,
        marks: BTreeMap<(String, i32), (i64, i64)>,
        next: &mut BTreeMap<(String, i32), i64>,
        report: &mut impl FnMut(Rebuild),
    ) -> Result<(), InfraError> {
        let behind = |next: &BTreeMap<(String, i32), i64>| {
            marks
                .iter()
                .any(|(key, (low, high))| next.get(key).copied().unwrap_or(*low) < *high)
        };
        let mut idle = 0;
        while behind(next) {
            let polled = reader
                .poll_batch(BATCH as usize, Duration::from_millis(500))
                .await
                .map_err(kafka_error)?;
            if polled.is_empty() {
                idle += 1;
                if idle > 120 {
                    return Err(InfraError::Corrupt(
                        "the brokers stopped returning records before the rebuild caught up".into(),
                    ));
                }
                continue;
            }
            idle = 0;
            let mut tx = self.handle.db.begin_write().await?;
            let mut events = vec![];
            for record in &polled {
                match record.event() {
                    Ok(event) => events.push(event),
                    Err(error) => {
                        dead_letters::record_unreadable(
                            &mut tx,
                            &self.dead_letters,
                            record.offset,
                            &record.origin(),
                            &error,
                        )
                        .await?;
                    }
                }
                next.insert((record.topic.clone(), record.partition), record.offset + 1);
            }
            self.apply(&mut tx, &events).await?;
            self.progress.processed += (polled.len() - events.len()) as u64;
            tx.commit().await?;
            self.report(report);
        }
        Ok(())
    }

    async fn apply(
        &mut self,
        tx: &mut AnyConnection,
        events: &[RecordedEvent],
    ) -> Result<(), InfraError> {
        let projection = self.handle.projection;
        for recorded in events {
            if let Err(error) = apply_guarded(tx, projection, SHADOW, recorded).await? {
                dead_letters::record(tx, &self.dead_letters, recorded, &error).await?;
            }
        }
        self.progress.processed += events.len() as u64;
        self.progress.total = self.progress.total.max(self.progress.processed);
        Ok(())
    }
}
