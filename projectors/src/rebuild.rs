//! Rebuilding a projection from the start of its topics.
//!
//! The events go into shadow tables while the live tables keep serving. When the
//! shadow has caught up, the live runner is paused (its lock), the last events are
//! applied, and in one transaction the live tables are dropped, the shadows renamed
//! into their place, and the checkpoint set. Events that fail during the rebuild are
//! dead-lettered under `<name>@rebuild` and take the place of the old dead letters
//! in the same swap.

use crate::runner::{apply_guarded, ProjectionHandle, Projections};
use infra::progress::Rebuild;
use infra::{checkpoints, dead_letters, InfraError};

const BATCH: i64 = 1000;
const SHADOW: &str = "_shadow";

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
    let pool = &db.pool;
    let rebuild_consumer = format!("{name}@rebuild");
    for table in projection.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}{SHADOW}"))
            .execute(pool)
            .await?;
    }
    sqlx::query("DELETE FROM dead_letters WHERE consumer = $1")
        .bind(&rebuild_consumer)
        .execute(pool)
        .await?;
    db.migrate(&projection.create_tables(SHADOW)).await?;

    let total = all.store.count_after(0, projection.topics()).await?.max(0) as u64;
    let mut progress = Rebuild {
        processed: 0,
        total,
    };
    all.progress.set_rebuild(name, Some(progress));
    report(progress);

    // Catch up without holding up the live runner...
    let position = catch_up(
        all,
        handle,
        &rebuild_consumer,
        0,
        &mut progress,
        &mut report,
    )
    .await?;
    // ...then pause it for the last events and the swap.
    let _paused = handle.lock.lock().await;
    let position = catch_up(
        all,
        handle,
        &rebuild_consumer,
        position,
        &mut progress,
        &mut report,
    )
    .await?;
    let mut tx = db.begin_write().await?;
    for table in projection.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {table}{SHADOW} RENAME TO {table}"))
            .execute(&mut *tx)
            .await?;
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
    checkpoints::save(&mut tx, name, position).await?;
    tx.commit().await?;
    all.progress.set_checkpoint(name, position);
    all.progress.set_rebuild(name, None);
    progress.total = progress.total.max(progress.processed);
    report(progress);
    Ok(progress.processed)
}

/// Fill the shadow from `position` until it has reached the head; the position reached.
async fn catch_up(
    all: &Projections,
    handle: &ProjectionHandle,
    dead_letter_consumer: &str,
    mut position: i64,
    progress: &mut Rebuild,
    report: &mut impl FnMut(Rebuild),
) -> Result<i64, InfraError> {
    loop {
        let (moved, reached) = fill(all, handle, dead_letter_consumer, position, progress).await?;
        position = reached;
        all.progress
            .set_rebuild(handle.projection.name(), Some(*progress));
        report(*progress);
        if !moved {
            return Ok(position);
        }
    }
}

/// Apply one batch to the shadow; (whether it moved, position reached).
async fn fill(
    all: &Projections,
    handle: &ProjectionHandle,
    dead_letter_consumer: &str,
    position: i64,
    progress: &mut Rebuild,
) -> Result<(bool, i64), InfraError> {
    let projection = handle.projection;
    let (events, reached) = all
        .store
        .read_after(position, projection.topics(), BATCH)
        .await?;
    if reached == position {
        return Ok((false, position));
    }
    let mut tx = handle.db.begin_write().await?;
    for recorded in &events {
        if let Err(error) = apply_guarded(&mut tx, projection, SHADOW, recorded).await? {
            dead_letters::record(&mut tx, dead_letter_consumer, recorded, &error).await?;
        }
    }
    tx.commit().await?;
    progress.processed += events.len() as u64;
    progress.total = progress.total.max(progress.processed);
    Ok((true, reached))
}
