//! The projection runner: a [`Handler`] that applies each event under a savepoint,
//! behind a per-stream version guard, in the transaction that stores the
//! projection's position. Driven by [`infra::consume::drive`] over whatever source
//! the process reads (the embedded log, or Kafka).

use crate::projection::{coalesce, Change, Projection, ReadModel};
use infra::consume::{self, Consumer, Failures, Handler, LocalWork, Source, Transport};
use infra::db::{Db, Dialect};
use infra::guard;
use infra::metrics::Metrics;
use infra::progress::Progress;
use infra::shutdown::Shutdown;
use infra::{EventStore, InfraError};
use schemas::{AnyEvent, RecordedEvent};
use sqlx::AnyConnection;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::sync::Mutex;

/// One projection with its database, its source and the lock a rebuild takes to swap
/// tables.
#[derive(Clone)]
pub struct ProjectionHandle {
    pub projection: Projection,
    pub db: Db,
    pub source: Arc<dyn Source>,
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
    /// Where the runners and online rebuilds run: the process's pipeline runtime when
    /// it has one, else the caller's.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl Projections {
    /// Open each projection's tables (creating them when missing) in its service's
    /// database, with a source on `transport` that has not started reading yet.
    pub async fn open(
        store: EventStore,
        progress: Progress,
        metrics: Metrics,
        databases: &[(Projection, Db)],
        transport: &Transport,
    ) -> Result<Projections, InfraError> {
        let mut handles = vec![];
        for (projection, db) in databases {
            let name = projection.as_str();
            db.migrate(&projection.create_tables("")).await?;
            db.migrate(&projection.create_indexes(db.dialect)).await?;
            let source = transport.events(name, projection.topics(), db).await?;
            progress.set_checkpoint(name, source.checkpoint().await?);
            handles.push(ProjectionHandle {
                projection: *projection,
                db: db.clone(),
                source,
                lock: Arc::new(Mutex::new(())),
                rebuilding: Arc::new(AtomicBool::new(false)),
            });
        }
        Ok(Projections {
            handles,
            store,
            progress,
            metrics,
            runtime: None,
        })
    }

    pub fn get(&self, name: Projection) -> Option<&ProjectionHandle> {
        self.handles.iter().find(|h| h.projection == name)
    }

    /// The live runner of one projection, as a handler.
    pub fn runner(&self, handle: &ProjectionHandle) -> Runner {
        Runner {
            projection: handle.projection,
            suffix: "",
            consumer: Consumer::new(handle.projection.as_str(), &handle.db, &self.metrics),
            lock: Some(handle.lock.clone()),
            progress: Some(self.progress.clone()),
            remembered: None,
        }
    }

    /// Run `task` where the projections' tasks run.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.runtime {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// Start one runner per projection.
    pub fn spawn_all(&self, shutdown: &Shutdown) -> Vec<tokio::task::JoinHandle<()>> {
        self.handles
            .iter()
            .map(|handle| {
                self.spawn(consume::drive(
                    handle.source.clone(),
                    self.runner(handle),
                    shutdown.clone(),
                ))
            })
            .collect()
    }

    /// (checkpoint, lag) of a projection: a position and the events after it, or the
    /// sum of its offsets and the records not yet consumed.
    pub async fn standing(&self, handle: &ProjectionHandle) -> Result<(i64, i64), InfraError> {
        handle.source.standing().await
    }
}

/// Applies events to one projection's tables (the live ones, or a rebuild's shadows).
pub struct Runner {
    pub projection: Projection,
    /// The suffix of the tables written: empty for the live ones.
    pub suffix: &'static str,
    pub consumer: Consumer,
    pub lock: Option<Arc<Mutex<()>>>,
    /// Told of each new checkpoint (the live runner), so reads can wait for tokens.
    pub progress: Option<Progress>,
    /// The guards of tables this runner alone fills from empty (a rebuild's shadows),
    /// so they are not read back; `None` for the live tables.
    pub remembered: Option<Arc<Mutex<guard::Remembered>>>,
}

impl Handler for Runner {
    type Item = Arc<RecordedEvent>;
    type Done = ();

    fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    fn lock(&self) -> Option<Arc<Mutex<()>>> {
        self.lock.clone()
    }

    async fn apply(
        &self,
        tx: &mut AnyConnection,
        events: &[Arc<RecordedEvent>],
        failures: &mut Failures,
    ) -> Result<(), InfraError> {
        let dialect = self.consumer.db.dialect;
        let guard = self.projection.applied_table(self.suffix);
        let mut memory = match &self.remembered {
            Some(memory) => Some(memory.lock().await),
            None => None,
        };
        let fresh =
            guard::first_deliveries(tx, dialect, &guard, events, memory.as_deref_mut()).await?;
        drop(memory);
        apply_scripted(
            tx,
            dialect,
            self.projection,
            self.suffix,
            events,
            &fresh,
            failures,
        )
        .await
    }

    /// On an SQLite file's own connection: the guards read and moved, then each fresh
    /// event's change, prepared once per connection. A change that fails is undone by
    /// SQLite (a failed statement changes nothing) and its event dead-lettered; a
    /// database that cannot take writes fails the batch, which is tried again.
    ///
    /// With the guards in memory (a rebuild's shadows, whose batches are written in
    /// the order they are prepared, and whose failure starts the rebuild again), the
    /// first deliveries are decided here, while the batch before is written, and the
    /// writer only moves the guards: until the memory forgets, after which the writer
    /// decides, reading the guards it does not hold. The writer locks the memory only
    /// then, so here it is only ever found locked once it has forgotten.
    fn local(&self, events: &[Arc<RecordedEvent>]) -> Option<LocalWork<()>> {
        let guard = self.projection.applied_table(self.suffix);
        let deliveries = guard::deliveries(events);
        let changes: Vec<_> = events
            .iter()
            .map(|recorded| change_of(self.projection, self.suffix, recorded))
            .collect();
        let remembered = self.remembered.clone();
        let decided = remembered
            .as_ref()
            .and_then(|memory| memory.try_lock().ok())
            .and_then(|mut memory| memory.decide(&deliveries));
        Some(Box::new(move |conn, failures| {
            // On the writer's blocking thread.
            let fresh = match decided {
                Some(decided) => {
                    guard::advance_local(conn, &guard, &deliveries, &decided)?;
                    decided.fresh
                }
                None => {
                    let mut memory = remembered.as_ref().map(|m| m.blocking_lock());
                    guard::first_deliveries_local(conn, &guard, &deliveries, memory.as_deref_mut())?
                }
            };
            let changes = fresh_changes(changes.into_iter().zip(fresh), failures);
            let execute = |change: &Change| -> Result<Result<(), String>, InfraError> {
                match infra::local::execute_with(conn, change.sql(), change.binds()) {
                    Ok(_) => Ok(Ok(())),
                    Err(error) if infra::local::unavailable(&error) => Err(error.into()),
                    Err(error) => Ok(Err(format!(
                        "{}{error}",
                        infra::dead_letters::DATABASE_ERROR
                    ))),
                }
            };
            for unit in coalesce(&changes) {
                let failed = match execute(unit.statement(&changes))? {
                    Ok(()) => continue,
                    Err(error) => error,
                };
                if unit.merged.is_none() {
                    failures.push(changes[unit.changes[0]].0, failed);
                    continue;
                }
                // One by one: only the change that fails is dead-lettered.
                for place in unit.changes {
                    let (i, change) = &changes[place];
                    if let Err(error) = execute(change)? {
                        failures.push(*i, error);
                    }
                }
            }
            Ok(())
        }))
    }

    fn after(&self, _: (), checkpoint: i64) {
        self.passed(checkpoint);
    }

    fn passed(&self, checkpoint: i64) {
        if let Some(progress) = &self.progress {
            progress.set_checkpoint(self.projection.as_str(), checkpoint);
        }
    }
}

/// Changes per script: each is a short statement prepared anew, so a script is kept
/// to a size whose preparation costs less than the round trips it saves.
const SCRIPT_CHANGES: usize = 200;

/// Apply the changes of the fresh events as scripts, one round trip per script
/// instead of one (SQLite) or three (PostgreSQL, with a savepoint each) per event:
/// on SQLite one statement text with numbered parameters, on PostgreSQL statements
/// with their values written in as literals (the simple query protocol takes several
/// statements, the extended one does not). A script that fails is rolled back to its
/// savepoint and its changes are applied one by one, so only the event that fails is
/// dead-lettered.
async fn apply_scripted(
    tx: &mut AnyConnection,
    dialect: Dialect,
    projection: Projection,
    suffix: &str,
    events: &[Arc<RecordedEvent>],
    fresh: &[bool],
    failures: &mut Failures,
) -> Result<(), InfraError> {
    let changes = fresh_changes(
        events
            .iter()
            .map(|recorded| change_of(projection, suffix, recorded))
            .zip(fresh.iter().copied()),
        failures,
    );
    let units = coalesce(&changes);
    let (begin, end) = (
        Change::statement("SAVEPOINT project_batch"),
        Change::statement("RELEASE project_batch"),
    );
    for chunk in units.chunks(SCRIPT_CHANGES) {
        let statements = chunk.iter().map(|unit| unit.statement(&changes));
        let script = std::iter::once(&begin)
            .chain(statements)
            .chain(std::iter::once(&end));
        let ran = match dialect {
            Dialect::Sqlite => Change::script(script).execute_once(tx).await,
            Dialect::Postgres => run_script(tx, Change::literal_script(script)).await,
        };
        match ran {
            Ok(()) => continue,
            // The database cannot take writes now: the batch is tried again.
            Err(error) if infra::database_unavailable(&error) => return Err(error.into()),
            Err(_) => {}
        }
        for sql in ["ROLLBACK TO project_batch", "RELEASE project_batch"] {
            sqlx::query(sql).execute(&mut *tx).await?;
        }
        // One by one: only the change that fails is dead-lettered.
        for place in chunk.iter().flat_map(|unit| &unit.changes) {
            let (i, change) = &changes[*place];
            match apply_change(tx, dialect, change).await? {
                Ok(()) => {}
                Err(error) => failures.push(*i, error),
            }
        }
    }
    Ok(())
}

/// The changes of the fresh events, each with its event's place in the batch; an
/// event that cannot be read or applied goes to `failures`.
fn fresh_changes(
    changes: impl Iterator<Item = (Result<Option<Change>, String>, bool)>,
    failures: &mut Failures,
) -> Vec<(usize, Change)> {
    let mut fresh_changes = vec![];
    for (i, (change, fresh)) in changes.enumerate() {
        if !fresh {
            continue;
        }
        match change {
            Ok(Some(change)) => fresh_changes.push((i, change)),
            Ok(None) => {}
            Err(error) => failures.push(i, error),
        }
    }
    fresh_changes
}

/// Statements without parameters, in one round trip (PostgreSQL's simple query
/// protocol).
async fn run_script(tx: &mut AnyConnection, script: String) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    tx.execute(script.as_str()).await.map(|_| ())
}

/// One change on its own; on PostgreSQL under a savepoint, rolled back if it fails
/// (a failed statement spoils the whole transaction there).
async fn apply_change(
    tx: &mut AnyConnection,
    dialect: Dialect,
    change: &Change,
) -> Result<Result<(), String>, sqlx::Error> {
    let guarded = dialect == Dialect::Postgres;
    if guarded {
        sqlx::query("SAVEPOINT apply_event")
            .execute(&mut *tx)
            .await?;
    }
    let applied = match change.execute(tx).await {
        Err(error) if infra::database_unavailable(&error) => return Err(error),
        other => other,
    };
    if guarded {
        if applied.is_err() {
            sqlx::query("ROLLBACK TO apply_event")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("RELEASE apply_event").execute(&mut *tx).await?;
    }
    Ok(applied.map_err(|e| format!("{}{e}", infra::dead_letters::DATABASE_ERROR)))
}

/// Decode and apply one event, without the version guard: its one change
/// ([`apply_change`]), so an event that fails has written nothing.
pub async fn apply_one(
    conn: &mut AnyConnection,
    dialect: Dialect,
    projection: Projection,
    suffix: &str,
    recorded: &RecordedEvent,
) -> Result<Result<(), String>, sqlx::Error> {
    match change_of(projection, suffix, recorded) {
        Ok(Some(change)) => apply_change(conn, dialect, &change).await,
        Ok(None) => Ok(Ok(())),
        Err(error) => Ok(Err(error)),
    }
}

/// The change an event makes to `projection`'s tables with `suffix` (none, or why it
/// cannot be read or applied).
fn change_of(
    projection: Projection,
    suffix: &str,
    recorded: &RecordedEvent,
) -> Result<Option<Change>, String> {
    AnyEvent::from_envelope(&recorded.envelope)
        .map_err(|e| e.to_string())
        .and_then(|event| projection.change(suffix, &recorded.envelope, &event))
}
