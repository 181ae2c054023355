//! The event store: per-aggregate streams in one SQLite table whose autoincrement
//! position also makes it the log.
//!
//! Writes go through one writer task that owns the only write connection. It takes
//! every append waiting in its queue, reads the heads and idempotency records they
//! name, decides each in order (a version clash or a reused key refuses that append
//! only), writes what passed in a few statements whatever the group's size, and
//! commits them all with one fsync: group commit. Because one task commits,
//! positions become visible in order, and a subscriber that has read up to the
//! published head has missed nothing. On PostgreSQL a group is three round trips
//! ([`append_all_postgres`]).

use crate::db::{Db, Dialect};
use crate::local::Columns;
use crate::metrics::{Metrics, COMMIT_SECONDS, EVENTS_PER_COMMIT};
use crate::{parse_timestamp, parse_uuid, timestamp, InfraError};
use chrono::{DateTime, Utc};
use schemas::{Envelope, Payload, RecordedEvent};
use serde_json::Value;
use sqlx::AnyConnection;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

/// The most appends one commit takes.
const MAX_GROUP: usize = 512;

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub payload: Value,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
}

/// What a command's first success answered, kept under its key.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    pub key: String,
    /// A hash of what the request asked; the same key with another hash is refused.
    pub request_hash: String,
    pub response: Value,
}

#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The stream's version the events were decided on (0: no events yet).
    pub expected_version: i64,
    /// The id of the stream's last event the decision saw, when the caller knows it:
    /// checked too, so a decision made on events still in flight (pipelined behind
    /// an append that then failed) cannot pass on a version another writer reached.
    pub expected_last_event: Option<Uuid>,
    pub events: Vec<NewEvent>,
    pub idempotency: Option<IdempotencyRecord>,
    /// The aggregate's state after these events, to store as its snapshot.
    pub snapshot: Option<Value>,
}

/// An aggregate's state as of a version, so a load reads only the events after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub version: i64,
    pub position: i64,
    pub state: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    /// Appended (or nothing to append); `position` is the stream's last position.
    Appended { position: i64, version: i64 },
    /// The key was used before for the same request: its first answer.
    Duplicate { response: Value, position: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "version conflict on {aggregate_type}/{aggregate_id}: expected {expected}, found {actual}"
    )]
    Conflict {
        aggregate_type: String,
        aggregate_id: String,
        expected: i64,
        actual: i64,
    },
    #[error("the idempotency key was used before for a different request")]
    KeyReused,
    #[error(transparent)]
    Infra(#[from] InfraError),
    #[error("the event store is shut down")]
    Closed,
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::Infra(InfraError::Database(error))
    }
}

struct Job {
    request: AppendRequest,
    reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

/// An append queued with [`EventStore::submit`].
pub struct Submitted(oneshot::Receiver<Result<AppendOutcome, StoreError>>);

impl Submitted {
    /// Wait until the append is committed or refused.
    pub async fn outcome(self) -> Result<AppendOutcome, StoreError> {
        self.0.await.map_err(|_| StoreError::Closed)?
    }
}

/// A stored idempotency record.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub request_hash: String,
    pub response: Value,
    pub position: i64,
}

/// Handle to the event store; cheap to clone.
#[derive(Clone)]
pub struct EventStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    /// The log's file when it is an SQLite file: batches of events are read from it
    /// on a blocking thread ([`crate::local`]), one hop per batch.
    file: Option<std::path::PathBuf>,
    jobs: mpsc::Sender<Job>,
    head: watch::Receiver<i64>,
    /// The position of the last event committed of each aggregate type by this
    /// store's writer, so a consumer of types with nothing new reads nothing.
    latest: Latest,
    commits: Arc<AtomicU64>,
    metrics: Metrics,
}

/// The newest position of each aggregate type, as far as this store's writer knows:
/// a type it has not written since the store opened is taken to be at the head the
/// store opened at (what was there before may be anywhere up to it).
#[derive(Clone)]
struct Latest {
    opened_at: i64,
    by_type: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
}

impl Latest {
    fn new(opened_at: i64) -> Latest {
        Latest {
            opened_at,
            by_type: Arc::default(),
        }
    }

    /// The newest position among `aggregate_types`.
    fn of(&self, aggregate_types: &[&str]) -> i64 {
        let by_type = self
            .by_type
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        aggregate_types
            .iter()
            .map(|t| by_type.get(*t).copied().unwrap_or(self.opened_at))
            .max()
            .unwrap_or(self.opened_at)
    }

    /// `aggregate_type` has an event at `position`.
    fn moved(&self, aggregate_type: &str, position: i64) {
        let mut by_type = self
            .by_type
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match by_type.get_mut(aggregate_type) {
            Some(latest) => *latest = (*latest).max(position),
            None => {
                by_type.insert(aggregate_type.to_owned(), position);
            }
        }
    }
}

impl EventStore {
    /// Open (creating when missing) the log in the SQLite file at `path`.
    pub async fn open(path: &Path) -> Result<EventStore, InfraError> {
        EventStore::with_db(Db::open_sqlite(path, 8).await?).await
    }

    /// Open the log in `db` (creating its tables when missing) and start its writer.
    pub async fn with_db(db: Db) -> Result<EventStore, InfraError> {
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&db.pool)
            .await?;
        // An SQLite file's groups go through the writer's own connection (opened on
        // its first group); other databases' through a driver connection.
        let file = db.sqlite_file();
        let writer = match file {
            Some(_) => None,
            None => Some(db.connection().await?),
        };
        let (head_tx, head_rx) = watch::channel(head);
        let latest = Latest::new(head);
        let (jobs, queue) = mpsc::channel(4096);
        let commits = Arc::new(AtomicU64::new(0));
        let metrics = Metrics::default();
        tokio::spawn(write_loop(
            Writer {
                conn: writer,
                db: db.clone(),
                file,
                local: None,
                head: head_tx,
                latest: latest.clone(),
                commits: commits.clone(),
                metrics: metrics.clone(),
            },
            queue,
        ));
        Ok(EventStore {
            inner: Arc::new(Inner {
                file: db.sqlite_file(),
                db,
                jobs,
                head: head_rx,
                latest,
                commits,
                metrics,
            }),
        })
    }

    /// Append to one stream if it is still at `expected_version`.
    pub async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.submit(request).await?.outcome().await
    }

    /// Queue an append; its outcome comes later. Appends are decided and committed in
    /// the order they were queued, so an append may be queued on the version the one
    /// before it will leave (its own check refuses it if that one fails).
    pub async fn submit(&self, request: AppendRequest) -> Result<Submitted, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .send(Job { request, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(Submitted(answer))
    }

    /// `sql`'s rows read on a blocking thread through that thread's read connection
    /// to the log's SQLite file, one hop for the whole read; `None` when the log is
    /// not an SQLite file (the caller reads through the pool).
    fn read_local<T: Send + 'static>(
        &self,
        sql: impl Into<String>,
        params: impl rusqlite::Params + Send + 'static,
        map: fn(&dyn Columns) -> Result<T, InfraError>,
    ) -> Option<impl std::future::Future<Output = Result<Vec<T>, InfraError>>> {
        let (file, sql) = (self.inner.file.clone()?, sql.into());
        Some(async move {
            tokio::task::spawn_blocking(move || {
                crate::local::read_rows(&file, &sql, params, |row| map(row))
            })
            .await?
        })
    }

    /// The position of the last committed event (0 for an empty log).
    pub fn head(&self) -> i64 {
        *self.inner.head.borrow()
    }

    /// The database the store is in.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Where the writer counts (commit durations, events per commit); the process's
    /// other parts count there too.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// How many commits the writer has made (each one fsync), for group-commit stats.
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    /// Changes whenever events are committed: subscribers wait on this, not a timer.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.inner.head.clone()
    }

    /// Every event of one stream, in version order.
    pub async fn load_stream(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Vec<RecordedEvent>, InfraError> {
        self.load_stream_after(aggregate_type, aggregate_id, 0)
            .await
    }

    /// The events of one stream after `version`, in version order.
    pub async fn load_stream_after(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        version: i64,
    ) -> Result<Vec<RecordedEvent>, InfraError> {
        self.load_stream_page(aggregate_type, aggregate_id, version, i64::MAX)
            .await
    }

    /// At most `limit` events of one stream after `version`, in version order.
    pub async fn load_stream_page(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, InfraError> {
        const SQL: &str = "SELECT * FROM events
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3
             ORDER BY version LIMIT $4";
        let stream = (aggregate_type.to_owned(), aggregate_id.to_owned());
        if let Some(read) = self.read_local(SQL, (stream.0, stream.1, version, limit), recorded) {
            return read.await;
        }
        let rows = sqlx::query(SQL)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(version)
            .bind(limit)
            .fetch_all(&self.inner.db.pool)
            .await?;
        rows.iter().map(|row| recorded(row)).collect()
    }

    /// The latest snapshot of one aggregate, if one was taken.
    pub async fn snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Snapshot>, InfraError> {
        const SQL: &str = "SELECT version, position, state FROM snapshots
             WHERE aggregate_type = $1 AND aggregate_id = $2";
        let stream = (aggregate_type.to_owned(), aggregate_id.to_owned());
        if let Some(read) = self.read_local(SQL, stream, snapshot) {
            return Ok(read.await?.into_iter().next());
        }
        let row = sqlx::query(SQL)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_optional(&self.inner.db.pool)
            .await?;
        row.map(|row| snapshot(&row)).transpose()
    }

    /// Up to `limit` events of the given aggregate types after `after`, and the
    /// position the reader may checkpoint: the head when the batch was not cut short,
    /// so a consumer passes over events of other topics too.
    pub async fn read_after(
        &self,
        after: i64,
        aggregate_types: &[&str],
        limit: i64,
    ) -> Result<(Vec<RecordedEvent>, i64), InfraError> {
        let head = self.head();
        if head <= after {
            return Ok((vec![], after));
        }
        // Nothing of these types after `after` up to the head (each type's newest
        // position is known before the head moves past it): the reader passes to the
        // head without a read. Every commit wakes every consumer, most of them for
        // events of other types.
        if self.inner.latest.of(aggregate_types) <= after {
            return Ok((vec![], head));
        }
        let mut distinct = aggregate_types.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.is_empty() {
            return Ok((vec![], head));
        }
        let params = [after.into(), head.into(), limit.into()]
            .into_iter()
            .chain(
                distinct
                    .iter()
                    .map(|t| rusqlite::types::Value::Text((*t).to_owned())),
            )
            .collect::<Vec<rusqlite::types::Value>>();
        let local = self.read_local(
            local_batch_sql(distinct.len()),
            rusqlite::params_from_iter(params),
            recorded,
        );
        let events: Vec<RecordedEvent> = match local {
            Some(read) => read.await?,
            None => {
                let sql = format!(
                    "SELECT * FROM events WHERE position > $1 AND position <= $2
                       AND aggregate_type IN ({}) ORDER BY position LIMIT $4",
                    self.inner.db.dialect.text_list("$3")
                );
                sqlx::query(&sql)
                    .bind(after)
                    .bind(head)
                    .bind(serde_json::to_string(&distinct)?)
                    .bind(limit)
                    .fetch_all(&self.inner.db.pool)
                    .await?
                    .iter()
                    .map(|row| recorded(row))
                    .collect::<Result<_, _>>()?
            }
        };
        let reached = if (events.len() as i64) < limit {
            head
        } else {
            events.last().map_or(after, |e| e.position)
        };
        Ok((events, reached))
    }

    /// How many events of these types lie after `after` (for lag and progress).
    pub async fn count_after(
        &self,
        after: i64,
        aggregate_types: &[&str],
    ) -> Result<i64, InfraError> {
        let types = serde_json::to_string(aggregate_types)?;
        let sql = format!(
            "SELECT COUNT(*) FROM events WHERE position > $1 AND aggregate_type IN ({})",
            self.inner.db.dialect.text_list("$2")
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(after)
            .bind(types)
            .fetch_one(&self.inner.db.pool)
            .await?)
    }

    /// How far the relay `name` has published the log.
    pub async fn relay_position(&self, name: &str) -> Result<i64, InfraError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM relay_positions WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.inner.db.pool)
                .await?;
        Ok(position.unwrap_or(0))
    }

    /// Record that the relay `name` has published everything up to `position`.
    pub async fn set_relay_position(&self, name: &str, position: i64) -> Result<(), InfraError> {
        sqlx::query(
            "INSERT INTO relay_positions (name, position) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(name)
        .bind(position)
        .execute(&self.inner.db.pool)
        .await?;
        Ok(())
    }

    /// The first answer recorded under an idempotency key, if any.
    pub async fn idempotency(&self, key: &str) -> Result<Option<StoredResponse>, InfraError> {
        let row =
            sqlx::query("SELECT request_hash, response, position FROM idempotency WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.inner.db.pool)
                .await?;
        row.map(|row| stored_response(&row)).transpose()
    }
}

fn stored_response(row: &dyn Columns) -> Result<StoredResponse, InfraError> {
    let response = row.text("response")?;
    Ok(StoredResponse {
        request_hash: row.text("request_hash")?,
        response: serde_json::from_str(&response)
            .map_err(|e| InfraError::Corrupt(format!("idempotency record: {e}")))?,
        position: row.int("position")?,
    })
}

fn snapshot(row: &dyn Columns) -> Result<Snapshot, InfraError> {
    Ok(Snapshot {
        version: row.int("version")?,
        position: row.int("position")?,
        state: serde_json::from_str(&row.text("state")?)
            .map_err(|e| InfraError::Corrupt(format!("snapshot: {e}")))?,
    })
}

/// A batch of events of `types` aggregate types from an SQLite log (`?1` after, `?2`
/// up to, `?3` at most, `?4`... the types): each type's events read in position
/// order from `events_by_type` and merged (`UNION ALL` under one `ORDER BY`), so
/// SQLite reads only the batch. Asked as `aggregate_type IN (list)`, it reads the
/// same index but sorts what it finds in a temporary B-tree, copying every row:
/// half a batch read's time.
fn local_batch_sql(types: usize) -> String {
    let one = |n: usize| {
        format!(
            "SELECT * FROM events WHERE aggregate_type = ?{n} AND position > ?1 AND position <= ?2"
        )
    };
    let mut sql = (0..types)
        .map(|i| one(i + 4))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    sql.push_str(" ORDER BY position LIMIT ?3");
    sql
}

/// The event a row of the log holds, its columns read in the table's order (a local
/// row looks at the column after the one last found first).
fn recorded(row: &dyn Columns) -> Result<RecordedEvent, InfraError> {
    Ok(RecordedEvent {
        position: row.int("position")?,
        envelope: Envelope {
            event_id: parse_uuid(row.str("event_id")?)?,
            aggregate_type: row.text("aggregate_type")?,
            aggregate_id: row.text("aggregate_id")?,
            version: row.int("version")?,
            event_type: row.text("event_type")?,
            schema_version: u32::try_from(row.int("schema_version")?)
                .map_err(|e| InfraError::Corrupt(format!("schema version: {e}")))?,
            occurred_at: parse_timestamp(row.str("occurred_at")?)?,
            correlation_id: parse_uuid(row.str("correlation_id")?)?,
            causation_id: parse_uuid(row.str("causation_id")?)?,
            payload: Payload::from_text(row.text("payload")?)
                .map_err(|e| InfraError::Corrupt(format!("payload: {e}")))?,
        },
    })
}

/// The one task that writes to the log, and what it reports to.
struct Writer {
    /// Its connection; `None` after the connection broke, opened again before the
    /// next group (a database that is down answers that group at once).
    conn: Option<AnyConnection>,
    db: Db,
    /// The log's SQLite file: groups are committed through a connection of the
    /// writer's own on a blocking thread ([`commit_local_group`]), not the driver.
    file: Option<std::path::PathBuf>,
    /// That connection; `None` until first used and after it broke.
    local: Option<rusqlite::Connection>,
    head: watch::Sender<i64>,
    /// Told of each type's newest position before the head moves, so a reader that
    /// saw the head move sees its types' positions too.
    latest: Latest,
    commits: Arc<AtomicU64>,
    metrics: Metrics,
}

impl Writer {
    /// The write connection, opened again when the last one broke.
    async fn connection(&mut self) -> Result<&mut AnyConnection, sqlx::Error> {
        if self.conn.is_none() {
            let conn = tokio::time::timeout(RECONNECT_WAIT, self.db.connection())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??;
            tracing::info!("the event store's write connection is open again");
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// The write connection, in a new transaction. A connection that broke while it
    /// was idle (the database restarted, the network dropped it) fails its `BEGIN`,
    /// before anything of a group was sent: it is opened again and the `BEGIN` sent
    /// once more, so the first appends after an outage are not refused for a
    /// connection that had already gone.
    async fn begin(&mut self) -> Result<&mut AnyConnection, sqlx::Error> {
        let begin = self.db.dialect.begin_write();
        let first = match self.connection().await {
            Ok(conn) => sqlx::query(begin).execute(conn).await.map(|_| ()),
            Err(error) => return Err(error),
        };
        match first {
            Ok(()) => {}
            Err(error) if crate::connection_gone(&error) => {
                tracing::info!(error = %error, "the event store's write connection was gone; opening another");
                self.conn = None;
                let conn = self.connection().await?;
                sqlx::query(begin).execute(conn).await?;
            }
            Err(error) => return Err(error),
        }
        self.conn.as_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// Commit `group`; every append gets its outcome.
    async fn commit(&mut self, group: &mut Vec<Job>) {
        let started = std::time::Instant::now();
        let dialect = self.db.dialect;
        let result = match self.file.clone() {
            Some(file) => self.commit_local(file, group).await,
            None if dialect == Dialect::Postgres => self.commit_postgres(group).await,
            None => match self.begin().await {
                Ok(conn) => commit_group(conn, dialect, group).await,
                Err(error) => Err(error.into()),
            },
        };
        match result {
            Ok((outcomes, last)) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                let events: usize = group.iter().map(|job| job.request.events.len()).sum();
                let metrics = &self.metrics;
                metrics.observe(&COMMIT_SECONDS, &[], started.elapsed().as_secs_f64());
                metrics.observe(&EVENTS_PER_COMMIT, &[], events as f64);
                for (job, outcome) in group.iter().zip(&outcomes) {
                    if let Ok(AppendOutcome::Appended { position, .. }) = outcome {
                        self.latest.moved(&job.request.aggregate_type, *position);
                    }
                }
                if let Some(last) = last {
                    self.head.send_if_modified(|h| {
                        let moved = last > *h;
                        *h = (*h).max(last);
                        moved
                    });
                }
                for (job, outcome) in group.drain(..).zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
            Err(error) => {
                tracing::error!(error = %error, "group commit failed; its appends are refused");
                if self.file.is_none() {
                    self.roll_back().await;
                }
                let error = Arc::new(error);
                for job in group.drain(..) {
                    let _ = job
                        .reply
                        .send(Err(StoreError::Infra(InfraError::Shared(error.clone()))));
                }
            }
        }
    }

    /// Commit `group` on the SQLite file's own connection, on a blocking thread; a
    /// failed group is rolled back there (a connection that cannot even do that is
    /// dropped, and the next group opens another).
    async fn commit_local(
        &mut self,
        file: std::path::PathBuf,
        group: &mut Vec<Job>,
    ) -> Result<GroupResult, InfraError> {
        let conn = self.local.take();
        let jobs = std::mem::take(group);
        let (conn, jobs, result) = tokio::task::spawn_blocking(move || {
            let mut conn = match conn.map_or_else(|| crate::local::open_writer(&file), Ok) {
                Ok(conn) => conn,
                Err(error) => return (None, jobs, Err(error)),
            };
            let result = commit_local_group(&mut conn, &jobs);
            let sound =
                result.is_ok() || conn.is_autocommit() || conn.execute_batch("ROLLBACK").is_ok();
            (sound.then_some(conn), jobs, result)
        })
        .await?;
        self.local = conn;
        *group = jobs;
        result
    }

    /// Commit `group` on PostgreSQL ([`append_all_postgres`]). A connection that
    /// broke while it was idle (the database restarted, the network dropped it)
    /// fails the first script, before anything of the group was written: it is
    /// opened again and the script sent once more, so the first appends after an
    /// outage are not refused for a connection that had already gone.
    async fn commit_postgres(&mut self, group: &[Job]) -> Result<GroupResult, InfraError> {
        let requests: Vec<&AppendRequest> = group.iter().map(|job| &job.request).collect();
        let (keys, streams) = names(&requests);
        let script = lookup_script(&keys, &streams);
        let first = match self.connection().await {
            Ok(conn) => script_rows(conn, &script).await,
            Err(error) => return Err(error.into()),
        };
        let lookup = match first {
            Ok(rows) => rows,
            Err(error) if crate::connection_gone(&error) => {
                tracing::info!(error = %error, "the event store's write connection was gone; opening another");
                self.conn = None;
                let conn = self.connection().await?;
                script_rows(conn, &script).await?
            }
            Err(error) => return Err(error.into()),
        };
        let conn = self.conn.as_mut().ok_or(sqlx::Error::PoolClosed)?;
        let outcomes = append_all_postgres(conn, &requests, lookup).await?;
        let last = last_position(&outcomes);
        Ok((outcomes, last))
    }

    /// Undo a failed group; a connection that cannot even do that is dropped, and the
    /// next group opens a new one.
    async fn roll_back(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let undone =
            tokio::time::timeout(RECONNECT_WAIT, sqlx::query("ROLLBACK").execute(conn)).await;
        if !matches!(undone, Ok(Ok(_))) {
            tracing::warn!("the event store's write connection is broken; it is opened again for the next append");
            self.conn = None;
        }
    }
}

/// How long the writer waits to open its connection (or to roll back) before it
/// refuses the waiting appends as unavailable.
const RECONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

async fn write_loop(mut writer: Writer, mut queue: mpsc::Receiver<Job>) {
    let mut group: Vec<Job> = Vec::with_capacity(MAX_GROUP);
    let mut pause = 0;
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        writer.commit(&mut group).await;
        gather(&queue, &mut pause).await;
    }
}

/// Groups [`gather`] lets pass without a turn after a turn that brought nothing.
const GATHER_PAUSE: usize = 16;

/// The most turns [`gather`] gives the tasks a commit answered.
const GATHER_TURNS: usize = 4;

/// A group this big already spreads its fixed cost thin: [`gather`] stops there, and
/// the tasks the commit answered make their next appends while this group commits
/// (where callers' own work per append is much of the time, as in a full process on
/// two cores, that overlap is worth more than a still bigger group).
const GATHERED: usize = 64;

/// Give the tasks a commit just answered their turn before the next group is taken,
/// for as long as they keep queueing appends (at most [`GATHER_TURNS`] turns): a task
/// that appends again at once (the next command of a sequence, the next request of a
/// client) joins the next group instead of waiting out a group of its own. Without
/// it, callers that each wait for their own append settle into two cohorts that take
/// turns at the writer, each paying a whole group's fixed cost (on PostgreSQL: the
/// transaction, the writers' lock, the lookups' planning and the commit). Up to
/// [`GATHERED`] appends; only yields: nothing waits on a clock, and with nothing
/// newly queued the writer goes on after one turn. Where the answered callers do not
/// append again at once (a client over HTTP sends its next request after the
/// answer's round trip), that one turn is only a delay: after a first turn that
/// brought nothing, the next [`GATHER_PAUSE`] groups (counted down in `pause`) go
/// without one.
async fn gather(queue: &mpsc::Receiver<Job>, pause: &mut usize) {
    if *pause > 0 {
        *pause -= 1;
        return;
    }
    for turn in 0..GATHER_TURNS {
        let queued = queue.len();
        if queued >= GATHERED {
            break;
        }
        tokio::task::yield_now().await;
        if queue.len() == queued {
            if turn == 0 {
                *pause = GATHER_PAUSE;
            }
            break;
        }
    }
}

type GroupResult = (Vec<Result<AppendOutcome, StoreError>>, Option<i64>);

/// Apply and commit `group` on `conn` (SQLite through the driver: a database with
/// no file), in the transaction [`Writer::begin`] opened.
async fn commit_group(
    conn: &mut AnyConnection,
    dialect: Dialect,
    group: &[Job],
) -> Result<GroupResult, InfraError> {
    let requests: Vec<&AppendRequest> = group.iter().map(|job| &job.request).collect();
    let outcomes = append_all(&mut Remote(&mut *conn), dialect, &requests).await?;
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    let last = last_position(&outcomes);
    Ok((outcomes, last))
}

/// Apply and commit `group` on the SQLite file's own write connection, on this
/// (blocking) thread: the group's statements run where SQLite does, with no hop to a
/// driver's thread per statement and per row.
fn commit_local_group(
    conn: &mut rusqlite::Connection,
    group: &[Job],
) -> Result<GroupResult, InfraError> {
    conn.execute_batch(Dialect::Sqlite.begin_write())?;
    let requests: Vec<&AppendRequest> = group.iter().map(|job| &job.request).collect();
    let outcomes = at_once(append_all(
        &mut Local(&mut *conn),
        Dialect::Sqlite,
        &requests,
    ))??;
    conn.execute_batch("COMMIT")?;
    let last = last_position(&outcomes);
    Ok((outcomes, last))
}

/// The position of the last event a group appended.
fn last_position(outcomes: &[Result<AppendOutcome, StoreError>]) -> Option<i64> {
    outcomes
        .iter()
        .filter_map(|outcome| match outcome {
            Ok(AppendOutcome::Appended { position, .. }) => Some(*position),
            _ => None,
        })
        .max()
}

/// The output of a future that never waits (the local connection's statements run
/// as they are called).
fn at_once<F: std::future::Future>(future: F) -> Result<F::Output, InfraError> {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => Ok(output),
        std::task::Poll::Pending => Err(InfraError::Unavailable(
            "a statement on the log's own connection waited".into(),
        )),
    }
}

/// Where a group's statements go: a few statements, each with one JSON parameter
/// (or, on a connection that runs where SQLite does, one prepared statement per row).
#[async_trait::async_trait]
trait GroupConn: Send {
    /// What a statement returns for `rows` (JSON arrays of strings, integers and
    /// nulls, or a row of one such value as itself), each row as `map` makes it. `sql` takes them all as one JSON list bound
    /// as `$1` (`fresh_plan`: planned anew each time rather than prepared once per
    /// connection); `row_sql` is the same statement for one row, its values as `?1`,
    /// `?2`, ... A connection that runs statements where SQLite does prepares
    /// `row_sql` once and runs it per row: cheaper there than taking every value out
    /// of the JSON.
    async fn per_row<T: Send + 'static>(
        &mut self,
        sql: &str,
        fresh_plan: bool,
        row_sql: &str,
        rows: Vec<Value>,
        map: for<'r> fn(&'r (dyn Columns + 'r)) -> Result<T, InfraError>,
    ) -> Result<Vec<T>, InfraError>;
}

/// A connection of the driver (PostgreSQL, or SQLite other than a file's own writer).
struct Remote<'a>(&'a mut AnyConnection);

#[async_trait::async_trait]
impl GroupConn for Remote<'_> {
    async fn per_row<T: Send + 'static>(
        &mut self,
        sql: &str,
        fresh_plan: bool,
        _row_sql: &str,
        rows: Vec<Value>,
        map: for<'r> fn(&'r (dyn Columns + 'r)) -> Result<T, InfraError>,
    ) -> Result<Vec<T>, InfraError> {
        let rows = sqlx::query(sql)
            .persistent(!fresh_plan)
            .bind(Value::Array(rows).to_string())
            .fetch_all(&mut *self.0)
            .await?;
        rows.iter().map(|row| map(row)).collect()
    }
}

/// The SQLite file's own write connection, on the thread that runs the group.
struct Local<'a>(&'a mut rusqlite::Connection);

#[async_trait::async_trait]
impl GroupConn for Local<'_> {
    async fn per_row<T: Send + 'static>(
        &mut self,
        _sql: &str,
        _fresh_plan: bool,
        row_sql: &str,
        rows: Vec<Value>,
        map: for<'r> fn(&'r (dyn Columns + 'r)) -> Result<T, InfraError>,
    ) -> Result<Vec<T>, InfraError> {
        use rusqlite::types::Value as Sql;
        let value = |value: Value| match value {
            Value::Null => Sql::Null,
            Value::String(text) => Sql::Text(text),
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(n), _) => Sql::Integer(n),
                (None, Some(x)) => Sql::Real(x),
                (None, None) => Sql::Null,
            },
            other => Sql::Text(other.to_string()),
        };
        let rows = rows.into_iter().map(|row| {
            rusqlite::params_from_iter(match row {
                Value::Array(values) => values.into_iter().map(value).collect(),
                one => vec![value(one)],
            })
        });
        crate::local::rows_for_each(self.0, row_sql, rows, |row| map(row))
    }
}

/// An append that passed its checks: where its events go.
#[derive(Clone)]
struct Planned {
    stream: (String, String),
    /// The stream's version before and after it.
    from: i64,
    to: i64,
}

/// What became of one append while the group is planned.
#[derive(Clone)]
enum Plan<'a> {
    Write(Planned),
    /// Its key was used before for the same request: the first answer.
    Repeat(AppendOutcome),
    /// Its key was used before for another request.
    KeyReused,
    /// The stream is not where the append was decided (`actual` is its version).
    Conflict {
        actual: i64,
    },
    /// Its key was first used earlier in the group, for the same request, by an
    /// append that leaves `stream` at `version`: the first answer.
    SameAs {
        stream: (String, String),
        version: i64,
        response: &'a Value,
    },
}

/// Apply every append of a group in a few statements, whatever its size: read the
/// idempotency records and the stream heads the group names, decide each append in
/// order (an append sees the ones before it), then write all events, snapshots and
/// records. An append that is refused or answered from its record writes nothing; a
/// database error fails the whole group.
async fn append_all<C: GroupConn>(
    conn: &mut C,
    dialect: Dialect,
    requests: &[&AppendRequest],
) -> Result<Vec<Result<AppendOutcome, StoreError>>, InfraError> {
    let (keys, streams) = names(requests);
    let answered = idempotency_records(conn, dialect, &keys).await?;
    let stored_heads = stream_heads(conn, dialect, &streams).await?;
    let (outcomes, rest) = write_events(conn, dialect, requests, &answered, &stored_heads).await?;
    for (insert, rows) in rest {
        let (sql, row_sql) = (insert.json_sql(dialect), insert.row_sql());
        conn.per_row(&sql, false, &row_sql, rows, |_| Ok(()))
            .await?;
    }
    Ok(outcomes)
}

/// A group on PostgreSQL in three round trips, the same appends as [`append_all`]:
/// the transaction, the lock and both lookups as one script (`lookup`, from
/// [`lookup_script`]); the events; then the snapshots, the records and the commit as
/// another script. A script goes over the simple query protocol with its values
/// written in as literals, so it is planned anew each time (as the lookups must be:
/// see [`stream_heads`]) and costs one round trip whatever its statements.
async fn append_all_postgres(
    conn: &mut AnyConnection,
    requests: &[&AppendRequest],
    lookup: Vec<sqlx::any::AnyRow>,
) -> Result<Vec<Result<AppendOutcome, StoreError>>, InfraError> {
    let mut answered = std::collections::HashMap::new();
    let mut stored_heads = std::collections::HashMap::new();
    for row in &lookup {
        use sqlx::Row;
        if row.try_column("request_hash").is_ok() {
            answered.insert(row.text("key")?, stored_response(row)?);
        } else if row.try_column("event_id").is_ok() {
            let (stream, head) = head(row)?;
            stored_heads.insert(stream, head);
        }
    }
    let dialect = Dialect::Postgres;
    let (outcomes, rest) = write_events(
        &mut Remote(&mut *conn),
        dialect,
        requests,
        &answered,
        &stored_heads,
    )
    .await?;
    let mut script = String::new();
    for (insert, rows) in &rest {
        script.push_str(&insert.literal_sql(rows));
        script.push_str(";\n");
    }
    script.push_str("COMMIT");
    script_rows(conn, &script).await?;
    Ok(outcomes)
}

/// The rows of every statement of `script`, sent over the simple query protocol.
async fn script_rows(
    conn: &mut AnyConnection,
    script: &str,
) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    use sqlx::Executor;
    conn.fetch_all(sqlx::raw_sql(script)).await
}

/// The script that opens a group's transaction on PostgreSQL, takes the writers'
/// lock (writers in other processes wait there, so positions become visible in the
/// order they were taken and a reader bounded by the head never skips one), and
/// reads the stream heads and idempotency records the group names.
fn lookup_script(keys: &[&str], streams: &[(&str, &str)]) -> String {
    let dialect = Dialect::Postgres;
    let mut script =
        String::from("BEGIN;\nSELECT 1 AS locked FROM pg_advisory_xact_lock(7306249455123);\n");
    if !streams.is_empty() {
        let list = serde_json::json!(streams
            .iter()
            .map(|(aggregate_type, aggregate_id)| serde_json::json!([aggregate_type, aggregate_id]))
            .collect::<Vec<_>>());
        script.push_str(&heads_sql(dialect, &literal(&list)));
        script.push_str(";\n");
    }
    if !keys.is_empty() {
        script.push_str(&records_sql(dialect, &literal(&serde_json::json!(keys))));
        script.push_str(";\n");
    }
    script
}

/// The idempotency keys and the streams (each once) that `requests` name.
fn names<'a>(requests: &[&'a AppendRequest]) -> (Vec<&'a str>, Vec<(&'a str, &'a str)>) {
    let keys = requests
        .iter()
        .filter_map(|r| r.idempotency.as_ref().map(|i| i.key.as_str()))
        .collect();
    let mut streams: Vec<(&str, &str)> = requests
        .iter()
        .map(|r| (r.aggregate_type.as_str(), r.aggregate_id.as_str()))
        .collect();
    streams.sort_unstable();
    streams.dedup();
    (keys, streams)
}

type Stream = (String, String);

/// Each append's outcome, in order, and the rows still to write after the events
/// (snapshots, idempotency records), each with its [`Insert`].
type Settled = (
    Vec<Result<AppendOutcome, StoreError>>,
    Vec<(&'static Insert, Vec<Value>)>,
);

/// Decide each append of the group in order on what was read (an append sees the
/// ones before it), insert the events of those that pass, and settle every append's
/// outcome: what is left to write is the snapshots and the records, as rows of their
/// [`Insert`]s.
async fn write_events<C: GroupConn>(
    conn: &mut C,
    dialect: Dialect,
    requests: &[&AppendRequest],
    answered: &std::collections::HashMap<String, StoredResponse>,
    stored_heads: &std::collections::HashMap<Stream, Head>,
) -> Result<Settled, InfraError> {
    let plans = plan(requests, answered, stored_heads);
    let positions = insert_events(conn, dialect, requests, &plans).await?;
    Ok(settle(requests, &plans, &positions, stored_heads))
}

/// What becomes of each append, in order, on the records and heads read.
fn plan<'a>(
    requests: &[&'a AppendRequest],
    answered: &std::collections::HashMap<String, StoredResponse>,
    stored_heads: &std::collections::HashMap<Stream, Head>,
) -> Vec<Plan<'a>> {
    let mut heads: std::collections::HashMap<Stream, (i64, Option<String>)> = stored_heads
        .iter()
        .map(|(stream, head)| (stream.clone(), (head.version, Some(head.event_id.clone()))))
        .collect();
    // Each key's first use in this group: its request, and where it leaves its stream.
    let mut first_use: std::collections::HashMap<&str, (&IdempotencyRecord, Plan)> =
        std::collections::HashMap::new();
    let mut plans = Vec::with_capacity(requests.len());
    for request in requests {
        if let Some(record) = &request.idempotency {
            if let Some(stored) = answered.get(&record.key) {
                plans.push(if stored.request_hash == record.request_hash {
                    Plan::Repeat(AppendOutcome::Duplicate {
                        response: stored.response.clone(),
                        position: stored.position,
                    })
                } else {
                    Plan::KeyReused
                });
                continue;
            }
            if let Some((first, same_as)) = first_use.get(record.key.as_str()) {
                plans.push(if first.request_hash == record.request_hash {
                    same_as.clone()
                } else {
                    Plan::KeyReused
                });
                continue;
            }
        }
        let stream = (request.aggregate_type.clone(), request.aggregate_id.clone());
        let (actual, last_event) = heads.get(&stream).cloned().unwrap_or((0, None));
        let saw_last = request
            .expected_last_event
            .is_none_or(|id| last_event.as_deref() == Some(id.to_string().as_str()));
        if actual != request.expected_version || !saw_last {
            plans.push(Plan::Conflict { actual });
            continue;
        }
        let to = actual + request.events.len() as i64;
        let last_event = match request.events.last() {
            Some(event) => Some(event.event_id.to_string()),
            None => last_event,
        };
        heads.insert(stream.clone(), (to, last_event));
        if let Some(record) = &request.idempotency {
            let same_as = Plan::SameAs {
                stream: stream.clone(),
                version: to,
                response: &record.response,
            };
            first_use.insert(record.key.as_str(), (record, same_as));
        }
        plans.push(Plan::Write(Planned {
            stream,
            from: actual,
            to,
        }));
    }
    plans
}

/// Each append's outcome once its events are in (`positions`), and the snapshots and
/// idempotency records still to write.
fn settle(
    requests: &[&AppendRequest],
    plans: &[Plan<'_>],
    positions: &std::collections::HashMap<(String, String, i64), i64>,
    stored_heads: &std::collections::HashMap<Stream, Head>,
) -> Settled {
    // The position of a stream's event at `version` (its head when nothing was added).
    let position_of = |stream: &Stream, version: i64| -> i64 {
        positions
            .get(&(stream.0.clone(), stream.1.clone(), version))
            .copied()
            .or_else(|| {
                stored_heads
                    .get(stream)
                    .filter(|head| head.version == version)
                    .map(|head| head.position)
            })
            .unwrap_or(0)
    };
    let mut snapshots: std::collections::BTreeMap<&Stream, (i64, i64, &Value)> = Default::default();
    let mut records = vec![];
    let mut outcomes: Vec<Result<AppendOutcome, StoreError>> = Vec::with_capacity(plans.len());
    for (request, plan) in requests.iter().zip(plans) {
        outcomes.push(match plan {
            Plan::Write(planned) => {
                let position = position_of(&planned.stream, planned.to);
                if let (Some(state), true) = (&request.snapshot, planned.to > planned.from) {
                    snapshots.insert(&planned.stream, (planned.to, position, state));
                }
                if let Some(record) = &request.idempotency {
                    records.push((record, position));
                }
                Ok(AppendOutcome::Appended {
                    position,
                    version: planned.to,
                })
            }
            Plan::Repeat(outcome) => Ok(outcome.clone()),
            Plan::KeyReused => Err(StoreError::KeyReused),
            Plan::Conflict { actual } => Err(StoreError::Conflict {
                aggregate_type: request.aggregate_type.clone(),
                aggregate_id: request.aggregate_id.clone(),
                expected: request.expected_version,
                actual: *actual,
            }),
            Plan::SameAs {
                stream,
                version,
                response,
            } => Ok(AppendOutcome::Duplicate {
                response: (*response).clone(),
                position: position_of(stream, *version),
            }),
        });
    }
    let mut rest = vec![];
    if !snapshots.is_empty() {
        let rows = snapshots
            .into_iter()
            .map(
                |((aggregate_type, aggregate_id), (version, position, state))| {
                    serde_json::json!([
                        aggregate_type,
                        aggregate_id,
                        version,
                        position,
                        state.to_string()
                    ])
                },
            )
            .collect();
        rest.push((&SNAPSHOTS, rows));
    }
    if !records.is_empty() {
        let now = timestamp(Utc::now());
        let rows = records
            .into_iter()
            .map(|(record, position)| {
                serde_json::json!([
                    record.key,
                    record.request_hash,
                    record.response.to_string(),
                    position,
                    now
                ])
            })
            .collect();
        rest.push((&RECORDS, rows));
    }
    (outcomes, rest)
}

/// The kind of a column an [`Insert`] writes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Integer,
}

/// An insert of many rows, written in each of the forms a group's connection takes.
/// Its rows are JSON arrays of strings and integers, in the order of `columns`.
struct Insert {
    table: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// What follows the values: `ON CONFLICT ...`, `RETURNING ...`.
    tail: &'static str,
}

impl Insert {
    fn head(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(name, _)| *name).collect();
        format!("INSERT INTO {} ({})", self.table, names.join(", "))
    }

    /// Every row from one JSON list bound as `$1`, inserted in its order.
    fn json_sql(&self, dialect: Dialect) -> String {
        let values: Vec<String> = (0..self.columns.len())
            .map(|i| match self.columns[i].1 {
                Kind::Text => format!("k.value ->> {i}"),
                Kind::Integer => format!("CAST(k.value ->> {i} AS BIGINT)"),
            })
            .collect();
        format!(
            "{} SELECT {} FROM {} WHERE true ORDER BY k.key {}",
            self.head(),
            values.join(", "),
            dialect.json_rows("$1"),
            self.tail
        )
    }

    /// One row, its values bound as `?1`, `?2`, ...
    fn row_sql(&self) -> String {
        let values: Vec<String> = (1..=self.columns.len()).map(|i| format!("?{i}")).collect();
        format!(
            "{} VALUES ({}) {}",
            self.head(),
            values.join(", "),
            self.tail
        )
    }

    /// Every row written in as literals (PostgreSQL), inserted in their order.
    fn literal_sql(&self, rows: &[Value]) -> String {
        let rows: Vec<String> = rows
            .iter()
            .map(|row| match row {
                Value::Array(values) => {
                    let values: Vec<String> = values.iter().map(literal).collect();
                    format!("({})", values.join(", "))
                }
                one => format!("({})", literal(one)),
            })
            .collect();
        format!("{} VALUES {} {}", self.head(), rows.join(", "), self.tail)
    }
}

/// A JSON value as a PostgreSQL literal: a string as a string, an integer as an
/// integer, anything else as its JSON text.
fn literal(value: &Value) -> String {
    match value {
        Value::Null => "NULL".into(),
        Value::String(text) => crate::db::text_literal(text),
        Value::Number(n) => match n.as_i64() {
            // In parentheses when negative: `x -1` after a minus must not become `--1`.
            Some(n) if n < 0 => format!("({n})"),
            Some(n) => n.to_string(),
            None => crate::db::text_literal(&n.to_string()),
        },
        other => crate::db::text_literal(&other.to_string()),
    }
}

const EVENTS: Insert = Insert {
    table: "events",
    columns: &[
        ("event_id", Kind::Text),
        ("aggregate_type", Kind::Text),
        ("aggregate_id", Kind::Text),
        ("version", Kind::Integer),
        ("event_type", Kind::Text),
        ("schema_version", Kind::Integer),
        ("occurred_at", Kind::Text),
        ("correlation_id", Kind::Text),
        ("causation_id", Kind::Text),
        ("payload", Kind::Text),
    ],
    tail: "RETURNING aggregate_type, aggregate_id, version, position",
};

const SNAPSHOTS: Insert = Insert {
    table: "snapshots",
    columns: &[
        ("aggregate_type", Kind::Text),
        ("aggregate_id", Kind::Text),
        ("version", Kind::Integer),
        ("position", Kind::Integer),
        ("state", Kind::Text),
    ],
    tail: "ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET
             version = excluded.version, position = excluded.position, state = excluded.state",
};

const RECORDS: Insert = Insert {
    table: "idempotency",
    columns: &[
        ("key", Kind::Text),
        ("request_hash", Kind::Text),
        ("response", Kind::Text),
        ("position", Kind::Integer),
        ("created_at", Kind::Text),
    ],
    tail: "",
};

/// The stored records whose keys are in the JSON list of strings `list` (a
/// parameter, or a literal).
fn records_sql(dialect: Dialect, list: &str) -> String {
    format!(
        "SELECT key, request_hash, response, position FROM idempotency WHERE {}",
        dialect.in_text_list("key", list)
    )
}

/// The stored records under `keys`.
async fn idempotency_records<C: GroupConn>(
    conn: &mut C,
    dialect: Dialect,
    keys: &[&str],
) -> Result<std::collections::HashMap<String, StoredResponse>, InfraError> {
    if keys.is_empty() {
        return Ok(Default::default());
    }
    let sql = records_sql(dialect, "$1");
    // Planned anew each time on PostgreSQL (once per group; see `stream_heads`).
    let fresh_plan = dialect == Dialect::Postgres;
    const ROW: &str =
        "SELECT key, request_hash, response, position FROM idempotency WHERE key = ?1";
    // A list of keys, not of one-key rows: the statement's list form reads strings.
    let rows = keys.iter().map(|key| serde_json::json!(key)).collect();
    let found = conn
        .per_row(&sql, fresh_plan, ROW, rows, |row| {
            Ok((row.text("key")?, stored_response(row)?))
        })
        .await?;
    Ok(found.into_iter().collect())
}

/// The last event of a stream.
struct Head {
    version: i64,
    position: i64,
    event_id: String,
}

fn head(row: &dyn Columns) -> Result<(Stream, Head), InfraError> {
    Ok((
        (row.text("aggregate_type")?, row.text("aggregate_id")?),
        Head {
            version: row.int("version")?,
            position: row.int("position")?,
            event_id: row.text("event_id")?,
        },
    ))
}

/// The last event of each stream in the JSON list `list` of `[type, id]` pairs (a
/// parameter, or a literal): one statement, an index seek per stream.
fn heads_sql(dialect: Dialect, list: &str) -> String {
    match dialect {
        // SQLite finds each head by its rowid (`position`).
        Dialect::Sqlite => format!(
            "SELECT h.aggregate_type, h.aggregate_id, h.version, h.position, h.event_id
               FROM events h JOIN (
                 SELECT (SELECT e.position FROM events e
                          WHERE e.aggregate_type = k.value ->> 0
                            AND e.aggregate_id = k.value ->> 1
                          ORDER BY e.version DESC LIMIT 1) AS position
                   FROM {}) AS last ON h.position = last.position",
            dialect.json_rows(list)
        ),
        // PostgreSQL would hash-join the form above against a scan of the whole
        // event table (it cannot tell how few streams a group names): a lateral
        // join seeks each head in the stream index instead.
        Dialect::Postgres => format!(
            "SELECT h.aggregate_type, h.aggregate_id, h.version, h.position, h.event_id
               FROM {} CROSS JOIN LATERAL (
                 SELECT e.aggregate_type, e.aggregate_id, e.version, e.position, e.event_id
                   FROM events e
                  WHERE e.aggregate_type = k.value ->> 0 AND e.aggregate_id = k.value ->> 1
                  ORDER BY e.version DESC LIMIT 1) AS h",
            dialect.json_rows(list)
        ),
    }
}

/// The last event of each of `streams` that has one (on the log's own connection,
/// one prepared seek per stream).
async fn stream_heads<C: GroupConn>(
    conn: &mut C,
    dialect: Dialect,
    streams: &[(&str, &str)],
) -> Result<std::collections::HashMap<Stream, Head>, InfraError> {
    if streams.is_empty() {
        return Ok(Default::default());
    }
    let sql = heads_sql(dialect, "$1");
    // Planned anew each time, not prepared once per connection: a plan made while
    // the table was nearly empty (and PostgreSQL without statistics of it) can scan
    // every event of a type for each head, and a prepared plan is kept for good
    // when nothing analyzes the table.
    let fresh_plan = dialect == Dialect::Postgres;
    const ROW: &str = "SELECT aggregate_type, aggregate_id, version, position, event_id FROM events
          WHERE aggregate_type = ?1 AND aggregate_id = ?2 ORDER BY version DESC LIMIT 1";
    let rows = streams
        .iter()
        .map(|(aggregate_type, aggregate_id)| serde_json::json!([aggregate_type, aggregate_id]))
        .collect();
    let heads = conn.per_row(&sql, fresh_plan, ROW, rows, head).await?;
    Ok(heads.into_iter().collect())
}

/// Insert the events of the planned appends, in order: the position of each, by
/// (aggregate type, aggregate id, version).
async fn insert_events<C: GroupConn>(
    conn: &mut C,
    dialect: Dialect,
    requests: &[&AppendRequest],
    plans: &[Plan<'_>],
) -> Result<std::collections::HashMap<(String, String, i64), i64>, InfraError> {
    let mut rows = vec![];
    for (request, plan) in requests.iter().zip(plans) {
        if let Plan::Write(planned) = plan {
            for (version, event) in (planned.from + 1..).zip(&request.events) {
                rows.push(serde_json::json!([
                    event.event_id,
                    request.aggregate_type,
                    request.aggregate_id,
                    version,
                    event.event_type,
                    event.schema_version,
                    timestamp(event.occurred_at),
                    event.correlation_id,
                    event.causation_id,
                    event.payload.to_string(),
                ]));
            }
        }
    }
    if rows.is_empty() {
        return Ok(Default::default());
    }
    let (sql, row_sql) = (EVENTS.json_sql(dialect), EVENTS.row_sql());
    let inserted = conn
        .per_row(&sql, false, &row_sql, rows, |row| {
            Ok((
                (
                    row.text("aggregate_type")?,
                    row.text("aggregate_id")?,
                    row.int("version")?,
                ),
                row.int("position")?,
            ))
        })
        .await?;
    Ok(inserted.into_iter().collect())
}
