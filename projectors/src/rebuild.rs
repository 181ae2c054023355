//! Rebuilding a projection from the start of its topics: from the embedded log, or
//! from Kafka (whichever the live projection reads: its source makes the reader).
//!
//! The events go into shadow tables while the live tables keep serving and the live
//! runner goes on. Catch-up passes repeat while the live projection runs, each up to
//! the end the source had when it began, until one has little left to apply (at most
//! [`TAIL`] events; writes go on meanwhile, so each pass is shorter than the one
//! before as long as the rebuild outpaces them). Only then is the live runner paused
//! (its lock), the few events written during the last pass applied, and in one
//! transaction the live tables dropped, the shadows renamed into their place, and the
//! checkpoint (a position, or the offsets of every partition) set. The pause is
//! measured (`orderline_rebuild_pause_seconds`, `orderline_rebuild_events_total`). Events that fail during the rebuild are dead-lettered under
//! `<name>@rebuild` and take the place of the old dead letters in the same swap.

use crate::projection::ReadModel;
use crate::runner::{ProjectionHandle, Projections, Runner};
use infra::consume::{commit, prepare, Applied, Batch, Consumer, End, Prepared, Replay};
use infra::db::{Db, Dialect};
use infra::metrics::{REBUILD_EVENTS, REBUILD_PAUSE_SECONDS};
use infra::progress::Rebuild;
use infra::InfraError;
use sqlx::AnyConnection;
use std::time::{Duration, Instant};

/// Events per transaction. Larger than the live runner's: a stream's events that fall
/// in one batch are written as one row (`projection::coalesce`) with one guard move,
/// and there are fewer commits. Under load an order is placed, paid and confirmed
/// within a few thousand events of the log; at 4,000 the `rebuild` benchmark's log
/// (1,000 orders between an order's steps) ran at 0.22-0.25 of its raw baseline
/// against 0.15 at 1,000. Three batches are held in memory: one being applied, the
/// next prepared, the one after read.
const BATCH: usize = 4000;
const SHADOW: &str = "_shadow";
/// How long a reader may return nothing before it is caught up, before the rebuild
/// gives up.
const STALLED: Duration = Duration::from_secs(60);
/// A catch-up pass that applied at most this many events ends the catch-up while live.
const TAIL: u64 = 256;
/// Catch-up passes at most while live; past them (writes that outpace the rebuild)
/// the live runner is paused for what is left.
const PASSES: usize = 32;

/// Rebuild `handle`'s projection; `report` hears (processed, total) as it goes.
/// Returns the number of events applied.
pub async fn rebuild(
    all: &Projections,
    handle: &ProjectionHandle,
    mut report: impl FnMut(Rebuild),
) -> Result<u64, InfraError> {
    let projection = handle.projection;
    let name = projection.as_str();
    let db = &handle.db;
    prepare_shadow(handle).await?;
    let reader = handle.source.replay().await?;
    let (_, total) = reader.standing().await?;
    let mut shadow = Shadow {
        all,
        handle,
        runner: Runner {
            projection,
            suffix: SHADOW,
            consumer: Consumer::new(name, db, &all.metrics),
            lock: None,
            progress: None,
            remembered: Some(Default::default()),
        },
        dead_letters: format!("{name}@rebuild"),
        progress: Rebuild {
            processed: 0,
            total: total.max(0) as u64,
        },
    };
    shadow.report(&mut report);
    // Catch up without holding up the live runner, pass after pass...
    let mut passes = 0;
    loop {
        let applied = shadow.fill(&*reader, &mut report).await?;
        all.metrics.add(
            &REBUILD_EVENTS,
            &[("projection", name), ("phase", "live")],
            applied,
        );
        passes += 1;
        if applied <= TAIL || passes >= PASSES {
            break;
        }
    }
    // ...then pause it for the last events and the swap.
    let paused = handle.lock.lock().await;
    let paused_at = Instant::now();
    let tail = shadow.fill(&*reader, &mut report).await?;
    all.metrics.add(
        &REBUILD_EVENTS,
        &[("projection", name), ("phase", "paused")],
        tail,
    );
    let mut tx = db.begin_write().await?;
    swap(&mut tx, handle, &shadow.dead_letters).await?;
    reader.save_as(&mut tx, name).await?;
    tx.commit().await?;
    // The live runner goes on from the rebuilt position, not from where it was.
    handle.source.rewind().await?;
    all.progress
        .set_checkpoint(name, handle.source.checkpoint().await?);
    drop(paused);
    let pause = paused_at.elapsed();
    all.metrics.observe(
        &REBUILD_PAUSE_SECONDS,
        &[("projection", name)],
        pause.as_secs_f64(),
    );
    tracing::info!(
        projection = name,
        passes,
        paused_events = tail,
        pause_ms = pause.as_millis() as u64,
        "rebuild swapped in"
    );
    let mut progress = shadow.progress;
    all.progress.set_rebuild(name, None);
    progress.total = progress.total.max(progress.processed);
    report(progress);
    Ok(progress.processed)
}

/// Empty shadow tables, and no dead letters of an earlier rebuild.
async fn prepare_shadow(handle: &ProjectionHandle) -> Result<(), InfraError> {
    let projection = handle.projection;
    let db = &handle.db;
    for table in projection.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}{SHADOW}"))
            .execute(&db.pool)
            .await?;
    }
    sqlx::query("DELETE FROM dead_letters WHERE consumer = $1")
        .bind(format!("{}@rebuild", projection.as_str()))
        .execute(&db.pool)
        .await?;
    db.migrate(&projection.create_tables(SHADOW)).await?;
    Ok(())
}

/// In the caller's transaction: the shadow tables take the live ones' place, with
/// their indexes, and the rebuild's dead letters the live ones'.
async fn swap(
    tx: &mut AnyConnection,
    handle: &ProjectionHandle,
    rebuild_dead_letters: &str,
) -> Result<(), InfraError> {
    let projection = handle.projection;
    let Db { dialect, .. } = &handle.db;
    for table in projection.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {table}{SHADOW} RENAME TO {table}"))
            .execute(&mut *tx)
            .await?;
        if *dialect == Dialect::Postgres {
            // Index names are global in PostgreSQL: free the shadow's for the next rebuild.
            sqlx::query(&format!(
                "ALTER INDEX IF EXISTS {table}{SHADOW}_pkey RENAME TO {table}_pkey"
            ))
            .execute(&mut *tx)
            .await?;
        }
    }
    for statement in infra::db::statements(&projection.create_indexes(*dialect)) {
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    sqlx::query("DELETE FROM dead_letters WHERE consumer = $1")
        .bind(projection.as_str())
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE dead_letters SET consumer = $1 WHERE consumer = $2")
        .bind(projection.as_str())
        .bind(rebuild_dead_letters)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The shadow tables being filled.
struct Shadow<'a> {
    all: &'a Projections,
    handle: &'a ProjectionHandle,
    runner: Runner,
    dead_letters: String,
    progress: Rebuild,
}

impl Shadow<'_> {
    fn report(&self, report: &mut impl FnMut(Rebuild)) {
        self.all
            .progress
            .set_rebuild(self.handle.projection.as_str(), Some(self.progress));
        report(self.progress);
    }

    /// Apply what the reader holds now, until it has caught up with it; the number of
    /// events applied. Three batches are under way at once: one is written while the
    /// next is prepared (decoded, its changes made) and the one after that read (the
    /// reader keeps its place in memory only, and a rebuild that fails starts again
    /// from empty shadows, so it may move on before the batches it read are written).
    async fn fill(
        &mut self,
        reader: &dyn Replay,
        report: &mut impl FnMut(Rebuild),
    ) -> Result<u64, InfraError> {
        let mut applied = 0;
        let end = reader.end().await?;
        let mut last_read = Instant::now();
        let first = self.read(reader, &end).await?;
        let mut prepared = self.prepare(reader, first).await;
        let mut upcoming = self.read(reader, &end).await?;
        loop {
            if prepared.batch().is_empty() {
                if upcoming.records.is_empty() {
                    if reader.reached(&end) {
                        break;
                    }
                    if last_read.elapsed() > STALLED {
                        return Err(InfraError::Unavailable(
                            "the source stopped returning records before the rebuild caught up"
                                .into(),
                        ));
                    }
                }
                prepared = self.prepare(reader, upcoming).await;
                upcoming = self.read(reader, &end).await?;
                continue;
            }
            last_read = Instant::now();
            let records = prepared.batch().records.len();
            // The read is started before the preparing, which runs on this task.
            let (written, (read, next)) = tokio::join!(
                commit(&self.runner, &self.dead_letters, &self.handle.db, prepared),
                async { tokio::join!(self.read(reader, &end), self.prepare(reader, upcoming)) }
            );
            let Applied { done, .. } = written?;
            if done < records {
                return Err(InfraError::Unavailable(format!(
                    "the rebuild applied {done} of a batch of {records} records"
                )));
            }
            applied += done as u64;
            self.progress.processed += done as u64;
            self.progress.total = self.progress.total.max(self.progress.processed);
            self.report(report);
            prepared = next;
            upcoming = read?;
        }
        Ok(applied)
    }

    /// The reader's next batch (none once it has reached `end`); the reader moved past
    /// it at once.
    async fn read(&self, reader: &dyn Replay, end: &End) -> Result<Batch, InfraError> {
        if reader.reached(end) {
            return Ok(Batch::default());
        }
        let batch = reader.next_batch(BATCH).await?;
        reader.committed(&batch, batch.records.len()).await?;
        Ok(batch)
    }

    async fn prepare(&self, reader: &dyn Replay, batch: Batch) -> Prepared<Runner> {
        prepare(&self.runner, &self.handle.db, reader, batch).await
    }
}
