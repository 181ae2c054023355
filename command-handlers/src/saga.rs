//! The runner of the order fulfilment saga.
//!
//! It reads the log from its checkpoint; for each event it loads the saga of the
//! order the event concerns, runs the pure transition, and in ONE transaction of the
//! order service's database stores the new saga state, the commands it emitted (an
//! outbox, each with a deterministic id: UUIDv5 of the causing event id and its
//! index), its deadline and the checkpoint. Only then are the commands carried out;
//! a participant that sees a command id again answers as the first time. Deadlines
//! are rows too, so they survive restarts and fire after one.

use crate::app::{CommandError, Handlers, Meta};
use chrono::{DateTime, Utc};
use domain::saga::{Config, Deadline, Fulfilment, Input, Outcome, Stage};
use domain::Sku;
use infra::clock::{Clock, SystemClock};
use infra::consume::{Backoff, Consumer, Failures, Handler, Idle, Source, Transport};
use infra::db::{Db, Dialect};
use infra::guard;
use infra::kafka::KafkaConfig;
use infra::metrics;
use infra::retention::{self, Retention};
use infra::shutdown::Shutdown;
use infra::{parse_timestamp, parse_uuid, timestamp, InfraError};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::commands::{CommandMessage, SagaCommand};
use schemas::topics::AggregateType;
use schemas::{AnyEvent, RecordedEvent};
use serde_json::{json, Value};
use sqlx::{AnyConnection, Row};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::{Mutex as StdMutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use uuid::Uuid;

/// The consumer name: its checkpoint and dead letters go under it.
pub const NAME: &str = "fulfilment_saga";

/// The aggregate types whose events carry an order through its saga.
const FOLLOWS: &[AggregateType] = &[
    AggregateType::Order,
    AggregateType::Inventory,
    AggregateType::Payment,
    AggregateType::Shipment,
];

/// Namespace of the saga's command ids.
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_726c_696e_6573_6167_6163_6d64);

/// A command waiting in the outbox: row id, command id, command, who caused it.
type Staged = (i64, Uuid, SagaCommand, Meta);

pub struct SagaRunner {
    handlers: Handlers,
    consumer: Consumer,
    db: Db,
    config: Config,
    dispatch: Dispatch,
    clock: Arc<dyn Clock>,
    cache: SagaCache,
    /// Woken when commands were staged.
    staged: Notify,
    /// When the batch being read began to be read.
    reading: StdMutex<Option<DateTime<Utc>>>,
    /// The time up to which every event has been folded (the start of the last read
    /// that found everything there was).
    heard_until: StdMutex<Option<DateTime<Utc>>>,
    /// How long a settled saga's state is kept, and how often they are pruned.
    retention: Retention,
    /// When settled sagas were last pruned.
    pruned_at: StdMutex<Option<DateTime<Utc>>>,
    /// The stored count of settled sagas as this runner has counted them into the
    /// door's backlog (`None` before [`SagaRunner::count_backlog`]).
    settled_counted: StdMutex<Option<u64>>,
    /// A round failed: its commit may have been carried out with its answer lost,
    /// and the sagas it settled not counted. The stored count says.
    recount: AtomicBool,
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the saga's commands reach the services that carry them out.
pub enum Dispatch {
    /// Called directly (embedded: every service is in this process).
    InProcess,
    /// Produced to the owning service's command topic, keyed by target aggregate.
    Kafka {
        producer: FutureProducer,
        config: KafkaConfig,
    },
}

impl Dispatch {
    /// In process, or over the command topics of `transport`'s brokers.
    pub fn over(transport: &Transport) -> Result<Dispatch, InfraError> {
        Ok(match transport.kafka() {
            None => Dispatch::InProcess,
            Some(config) => Dispatch::Kafka {
                producer: infra::kafka::producer(config)?,
                config: config.clone(),
            },
        })
    }
}

#[derive(Clone)]
struct Loaded {
    state: Fulfilment,
    correlation_id: Uuid,
}

/// The most sagas whose state is kept in memory.
const CACHE_CAPACITY: usize = 100_000;

/// The committed state of recent sagas: this runner is the only writer of its sagas,
/// so what it committed last is what the table holds. A write that failed may have
/// been committed all the same (its answer lost), so after one the cache is emptied
/// ([`SagaCache::distrust`]): kept, it would hold a state older than the table's, and
/// the next event would be handled on it (a compensation never sent).
#[derive(Default)]
struct SagaCache(StdMutex<HashMap<Uuid, Loaded>>);

impl SagaCache {
    fn get(&self, order_id: &Uuid) -> Option<Loaded> {
        lock(&self.0).get(order_id).cloned()
    }

    /// After a write whose outcome is not known (it may have been committed with
    /// its answer lost): nothing in memory is trusted, every saga is read again.
    fn distrust(&self) {
        lock(&self.0).clear();
    }

    /// After sagas were pruned: their states are gone from the table.
    fn forget(&self, order_ids: impl IntoIterator<Item = Uuid>) {
        let mut cache = lock(&self.0);
        for order_id in order_ids {
            cache.remove(&order_id);
        }
    }

    /// After a commit: the states it wrote.
    fn put(&self, sagas: impl IntoIterator<Item = (Uuid, Loaded)>) {
        let mut cache = lock(&self.0);
        for (order_id, saga) in sagas {
            if cache.len() >= CACHE_CAPACITY && !cache.contains_key(&order_id) {
                cache.clear();
            }
            cache.insert(order_id, saga);
        }
    }
}

/// What a batch (or a round of deadlines) did: outcomes to count, states to cache.
pub struct Folded {
    outcomes: Vec<Outcome>,
    sagas: Vec<(Uuid, Loaded)>,
    /// Sagas that left the stages of an order in flight (confirmed or cancelled).
    settled: u64,
    /// Seconds from placement to confirmation of each order confirmed.
    confirmed_after: Vec<f64>,
}

/// The stages of an order accepted and not yet confirmed or cancelled.
const IN_FLIGHT: [Stage; 4] = [
    Stage::Reserving,
    Stage::AwaitingPayment,
    Stage::AwaitingShipment,
    Stage::AwaitingConfirmation,
];

impl SagaRunner {
    pub fn new(
        handlers: Handlers,
        db: Db,
        payment_timeout: Duration,
        dispatch: Dispatch,
    ) -> Result<SagaRunner, InfraError> {
        let payment_timeout = chrono::Duration::from_std(payment_timeout)
            .map_err(|e| InfraError::Config(format!("payment timeout: {e}")))?;
        Ok(SagaRunner {
            consumer: Consumer::new(NAME, &db, &handlers.metrics),
            handlers,
            db,
            config: Config { payment_timeout },
            dispatch,
            clock: Arc::new(SystemClock),
            cache: SagaCache::default(),
            staged: Notify::new(),
            reading: StdMutex::new(None),
            heard_until: StdMutex::new(None),
            retention: Retention::default(),
            pruned_at: StdMutex::new(None),
            settled_counted: StdMutex::new(None),
            recount: AtomicBool::new(false),
        })
    }

    /// Keep settled sagas' state as `retention` says (by default: 7 days).
    pub fn with_retention(mut self, retention: Retention) -> SagaRunner {
        self.retention = retention;
        self
    }

    /// Forget the state of every saga settled (`Fulfilment::is_settled`) and last
    /// changed before `before`, with its deadline: nothing its order's streams may
    /// still bring would need it. The per-stream guard (`saga_applied`) stays, so a
    /// redelivered old event is still passed over rather than starting a saga anew.
    /// Returns how many were forgotten.
    pub async fn prune_settled(&self, before: DateTime<Utc>) -> Result<u64, InfraError> {
        let before = timestamp(before);
        let dialect = self.db.dialect;
        let mut removed = 0;
        let mut after = String::new();
        loop {
            let page: Vec<(String, String)> = sqlx::query_as(
                "SELECT order_id, state FROM sagas s
                 WHERE stage IN ('delivered', 'cancelled') AND updated_at < $1 AND order_id > $2
                   AND NOT EXISTS (SELECT 1 FROM saga_outbox o WHERE o.order_id = s.order_id)
                 ORDER BY order_id LIMIT $3",
            )
            .bind(&before)
            .bind(&after)
            .bind(retention::BATCH)
            .fetch_all(&self.db.pool)
            .await?;
            let Some((last, _)) = page.last() else {
                return Ok(removed);
            };
            after = last.clone();
            let full = page.len() as i64 == retention::BATCH;
            let settled: Vec<String> = page
                .into_iter()
                .filter(|(_, state)| {
                    serde_json::from_str::<Fulfilment>(state).is_ok_and(|s| s.is_settled())
                })
                .map(|(order_id, _)| order_id)
                .collect();
            if !settled.is_empty() {
                let ids = Value::from(settled.clone()).to_string();
                let mut tx = self.db.begin_write().await?;
                for table in ["saga_deadlines", "sagas"] {
                    let sql = format!(
                        "DELETE FROM {table} WHERE {}",
                        dialect.in_text_list("order_id", "$1")
                    );
                    let n = sqlx::query(&sql)
                        .bind(&ids)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if table == "sagas" {
                        removed += n;
                    }
                }
                tx.commit().await?;
                self.cache
                    .forget(settled.iter().filter_map(|id| Uuid::parse_str(id).ok()));
            }
            if !full {
                return Ok(removed);
            }
        }
    }

    /// Prune settled sagas when the retention interval has passed since the last time.
    async fn prune_when_due(&self) -> Result<(), InfraError> {
        let Some(age) = self.retention.sagas else {
            return Ok(());
        };
        let now = self.clock.now();
        {
            let mut last = lock(&self.pruned_at);
            let interval = chrono::Duration::from_std(self.retention.interval)
                .unwrap_or(chrono::Duration::MAX);
            if last.is_some_and(|at| now - at < interval) {
                return Ok(());
            }
            *last = Some(now);
        }
        let Some(before) = retention::cutoff(now, age) else {
            return Ok(());
        };
        let removed = self.prune_settled(before).await?;
        self.handlers
            .metrics
            .add(&metrics::PRUNED, &[("kind", "saga")], removed);
        Ok(())
    }

    /// Read the time from `clock` (deadlines are set and fired by it).
    pub fn with_clock(mut self, clock: impl Clock) -> SagaRunner {
        self.clock = Arc::new(clock);
        self
    }

    /// Count the orders in flight in the saga table into the door's backlog (at
    /// start-up; orders placed but not yet heard of by the saga are not in it).
    pub async fn count_backlog(&self) -> Result<u64, InfraError> {
        let stages = IN_FLIGHT
            .iter()
            .map(|stage| {
                serde_json::to_value(stage).map(|v| v.as_str().unwrap_or_default().to_owned())
            })
            .collect::<Result<Vec<String>, _>>()?;
        let sql = format!(
            "SELECT COUNT(*) FROM sagas WHERE stage IN ({})",
            self.db.dialect.text_list("$1")
        );
        let in_flight: i64 = sqlx::query_scalar(&sql)
            .bind(serde_json::to_string(&stages)?)
            .fetch_one(&self.db.pool)
            .await?;
        let in_flight = in_flight.max(0) as u64;
        let settled = self.stored_settled().await?;
        self.handlers.backlog.reset(in_flight);
        *lock(&self.settled_counted) = Some(settled);
        Ok(in_flight)
    }

    /// How many sagas have settled, as stored with them.
    async fn stored_settled(&self) -> Result<u64, InfraError> {
        let settled: Option<i64> =
            sqlx::query_scalar("SELECT settled FROM saga_totals WHERE name = 'sagas'")
                .fetch_optional(&self.db.pool)
                .await?;
        Ok(settled.unwrap_or(0).max(0) as u64)
    }

    /// After a failed round: the sagas settled by a commit whose answer was lost are
    /// taken out of the door's backlog (they were not, since the round failed).
    async fn recount_settled(&self) -> Result<(), InfraError> {
        if !self.recount.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let stored = match self.stored_settled().await {
            Ok(stored) => stored,
            Err(error) => {
                self.recount.store(true, Ordering::SeqCst);
                return Err(error);
            }
        };
        let mut counted = lock(&self.settled_counted);
        if let Some(known) = counted.as_mut() {
            if stored > *known {
                tracing::info!(
                    uncounted = stored - *known,
                    "sagas settled by a commit whose answer was lost"
                );
                self.handlers.backlog.settled(stored - *known);
                *known = stored;
            }
        }
        Ok(())
    }

    /// The saga's source of events on `transport`: every event topic.
    pub async fn source(transport: &Transport, db: &Db) -> Result<Arc<dyn Source>, InfraError> {
        transport.events(NAME, FOLLOWS, db).await
    }

    /// Carry out staged commands until shutdown, woken by each commit that staged
    /// some: beside the consumer, so the saga goes on reading while commands run.
    pub async fn dispatch_until(&self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::default();
        while !shutdown.is_set() {
            let pause = match self.dispatch().await {
                Ok(true) => {
                    backoff.reset();
                    continue;
                }
                Ok(false) => {
                    backoff.reset();
                    Duration::from_secs(1)
                }
                Err(error) => {
                    tracing::error!(error = %error, kind = error.kind(), "saga dispatch failed; retrying");
                    backoff.fail()
                }
            };
            tokio::select! {
                _ = self.staged.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait() => {}
            }
        }
    }

    /// How long to sleep when idle: until the next deadline, or a while.
    async fn idle_time(&self) -> Result<Duration, InfraError> {
        let next: Option<String> = sqlx::query_scalar("SELECT MIN(due_at) FROM saga_deadlines")
            .fetch_one(&self.db.pool)
            .await?;
        // At most a minute, and at most the retention interval (pruning runs then).
        let most = Duration::from_secs(60).min(self.retention.interval);
        Ok(match next {
            None => most,
            Some(due) => (parse_timestamp(&due)? - self.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(most),
        })
    }

    /// Run the transitions of `events` in the caller's transaction: new states,
    /// staged commands, deadlines. The outcomes, to count once committed.
    async fn fold(
        &self,
        tx: &mut AnyConnection,
        events: &[RecordedEvent],
        failures: &mut Failures,
    ) -> Result<Folded, InfraError> {
        let now = self.clock.now();
        let mut sagas: HashMap<Uuid, Loaded> = HashMap::new();
        let mut outcomes = vec![];
        let mut settled = 0;
        let mut confirmed_after = vec![];
        let mut writes = Writes::default();
        let fresh =
            guard::first_deliveries(tx, self.db.dialect, "saga_applied", events, None).await?;
        for (i, (recorded, fresh)) in events.iter().zip(fresh).enumerate() {
            if !fresh {
                // Published again (a relay that restarted): already folded in.
                continue;
            }
            let Some((order_id, input)) = (match route(recorded) {
                Ok(routed) => routed,
                Err(error) => {
                    failures.push(i, error);
                    continue;
                }
            }) else {
                continue;
            };
            let saga = match sagas.entry(order_id) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    let new = Loaded {
                        state: Fulfilment::default(),
                        correlation_id: recorded.envelope.correlation_id,
                    };
                    // An order's first event, delivered for the first time, starts its
                    // saga: nothing is stored for it yet.
                    let first = matches!(input, Input::Order(_)) && recorded.envelope.version == 1;
                    let stored = if first {
                        None
                    } else {
                        self.load(tx, order_id).await?
                    };
                    entry.insert(stored.unwrap_or(new))
                }
            };
            if saga.state.stage == Stage::NotStarted && !matches!(input, Input::Order(_)) {
                // Nothing of this order was seen yet (e.g. a restock): not a saga's business.
                continue;
            }
            let was = saga.state.stage;
            let transition = saga.state.handle(&input, now, &self.config);
            if IN_FLIGHT.contains(&was) && !IN_FLIGHT.contains(&saga.state.stage) {
                settled += 1;
            }
            if transition.outcome == Some(Outcome::Confirmed) {
                confirmed_after.extend(since_placed(order_id, recorded));
            }
            let cause = recorded.envelope.event_id;
            let meta = (saga.correlation_id, cause);
            writes.stage(order_id, &transition.commands, meta, |i| {
                Uuid::new_v5(&COMMAND_NAMESPACE, format!("{cause}/{i}").as_bytes())
            })?;
            writes.deadline(order_id, transition.deadline);
            outcomes.extend(transition.outcome);
        }
        sagas.retain(|_, saga| saga.state.stage != Stage::NotStarted);
        writes.write(tx, self.db.dialect, &sagas).await?;
        if settled > 0 {
            sqlx::query(
                "INSERT INTO saga_totals (name, settled) VALUES ('sagas', $1)
                 ON CONFLICT (name) DO UPDATE SET settled = saga_totals.settled + excluded.settled",
            )
            .bind(settled as i64)
            .execute(&mut *tx)
            .await?;
        }
        Ok(Folded {
            outcomes,
            sagas: sagas.into_iter().collect(),
            settled,
            confirmed_after,
        })
    }

    /// A saga's committed state: from memory, else from its table.
    async fn load(
        &self,
        conn: &mut AnyConnection,
        order_id: Uuid,
    ) -> Result<Option<Loaded>, InfraError> {
        match self.cache.get(&order_id) {
            Some(saga) => Ok(Some(saga)),
            None => load(conn, order_id).await,
        }
    }

    /// Fire every deadline due by `now`; true when one fired.
    pub async fn fire_deadlines(&self, now: DateTime<Utc>) -> Result<bool, InfraError> {
        let due: Vec<(String, String)> = sqlx::query_as("SELECT order_id, due_at FROM saga_deadlines WHERE due_at <= $1 ORDER BY due_at LIMIT 500")
            .bind(timestamp(now))
            .fetch_all(&self.db.pool)
            .await?;
        if due.is_empty() {
            return Ok(false);
        }
        let mut tx = self.db.begin_write().await?;
        let mut outcomes = vec![];
        let mut sagas = HashMap::new();
        let mut writes = Writes::default();
        for (order_id, due_at) in &due {
            let order_id = parse_uuid(order_id)?;
            writes.deadline(order_id, Deadline::Clear);
            let Some(mut saga) = self.load(&mut tx, order_id).await? else {
                continue;
            };
            let transition = saga
                .state
                .handle(&Input::PaymentDeadlinePassed, now, &self.config);
            let cause = Uuid::new_v5(
                &COMMAND_NAMESPACE,
                format!("deadline/{order_id}/{due_at}").as_bytes(),
            );
            writes.stage(
                order_id,
                &transition.commands,
                (saga.correlation_id, cause),
                |i| Uuid::new_v5(&cause, i.to_string().as_bytes()),
            )?;
            writes.deadline(order_id, transition.deadline);
            outcomes.extend(transition.outcome);
            sagas.insert(order_id, saga);
        }
        // A failure here fails the round: `failed` empties the cache.
        writes.write(&mut tx, self.db.dialect, &sagas).await?;
        tx.commit().await?;
        self.cache.put(sagas);
        self.count(&outcomes);
        self.staged.notify_one();
        Ok(true)
    }

    fn count(&self, outcomes: &[Outcome]) {
        for outcome in outcomes {
            let label = match outcome {
                Outcome::Confirmed => "confirmed",
                Outcome::Delivered => "delivered",
                Outcome::Cancelled(reason) => reason.as_str(),
            };
            self.handlers
                .metrics
                .inc(&metrics::SAGA_OUTCOMES, &[("outcome", label)]);
        }
    }

    /// Carry out the staged commands: one order's commands to one target aggregate in
    /// order, the rest side by side. A command the participant refuses is logged and dropped;
    /// one that fails for another reason stays for the next round.
    pub async fn dispatch(&self) -> Result<bool, InfraError> {
        let rows = sqlx::query("SELECT id, command_id, command, correlation_id, causation_id FROM saga_outbox ORDER BY id LIMIT 2000")
            .fetch_all(&self.db.pool)
            .await?;
        if rows.is_empty() {
            return Ok(false);
        }
        let mut groups: BTreeMap<(AggregateType, String), Vec<Staged>> = BTreeMap::new();
        let mut done = vec![];
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let text: String = row.try_get("command")?;
            let command: SagaCommand = match serde_json::from_str(&text) {
                Ok(command) => command,
                Err(error) => {
                    tracing::error!(error = %error, command = %text, "unreadable saga command dropped");
                    done.push(id);
                    continue;
                }
            };
            let meta = Meta {
                correlation_id: parse_uuid(row.try_get("correlation_id")?)?,
                causation_id: parse_uuid(row.try_get("causation_id")?)?,
                idempotency: None,
            };
            let command_id = parse_uuid(row.try_get("command_id")?)?;
            groups
                .entry(command.target())
                .or_default()
                .push((id, command_id, command, meta));
        }
        if let Dispatch::Kafka { producer, config } = &self.dispatch {
            done.extend(publish(producer, config, groups).await);
            return self.forget(done).await;
        }
        // In process, one order's commands to one aggregate run in order; different
        // orders' commands run side by side even on one aggregate (a hot sku), where
        // they take turns to decide and share group commits.
        let mut chains: BTreeMap<(AggregateType, String, Uuid), Vec<Staged>> = BTreeMap::new();
        for staged in groups.into_values().flatten() {
            chains.entry(staged.2.chain()).or_default().push(staged);
        }
        let mut tasks = JoinSet::new();
        for (_, group) in chains {
            let handlers = self.handlers.clone();
            tasks.spawn(async move {
                let mut done = vec![];
                for (id, command_id, command, meta) in group {
                    match handlers.run_saga_command(command_id, &command, &meta).await {
                        Ok(_) => done.push(id),
                        Err(CommandError::Domain(refusal)) => {
                            tracing::info!(?command, reason = %refusal, correlation_id = %meta.correlation_id, "participant refused saga command");
                            done.push(id);
                        }
                        Err(error) => {
                            tracing::warn!(?command, error = %error, "saga command failed; will retry");
                            break;
                        }
                    }
                }
                done
            });
        }
        while let Some(finished) = tasks.join_next().await {
            match finished {
                Ok(ids) => done.extend(ids),
                Err(error) => tracing::error!(error = %error, "saga dispatch task failed"),
            }
        }
        self.forget(done).await
    }

    /// Delete the outbox rows that were carried out (or handed to the broker).
    async fn forget(&self, done: Vec<i64>) -> Result<bool, InfraError> {
        if done.is_empty() {
            return Ok(false);
        }
        let ids = serde_json::to_string(&done)?;
        let sql = format!(
            "DELETE FROM saga_outbox WHERE id IN ({})",
            self.db.dialect.integer_list("$1")
        );
        sqlx::query(&sql).bind(ids).execute(&self.db.pool).await?;
        Ok(true)
    }
}

impl Handler for SagaRunner {
    type Item = RecordedEvent;
    type Done = Folded;

    fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    async fn apply(
        &self,
        tx: &mut AnyConnection,
        events: &[RecordedEvent],
        failures: &mut Failures,
    ) -> Result<Folded, InfraError> {
        self.fold(tx, events, failures).await
    }

    fn after(&self, folded: Folded, _checkpoint: i64) {
        self.cache.put(folded.sagas);
        self.count(&folded.outcomes);
        self.handlers.backlog.settled(folded.settled);
        if let Some(known) = lock(&self.settled_counted).as_mut() {
            *known += folded.settled;
        }
        for seconds in folded.confirmed_after {
            self.handlers
                .metrics
                .observe(&metrics::PLACED_TO_CONFIRMED_SECONDS, &[], seconds);
        }
        self.staged.notify_one();
    }

    fn reading(&self) {
        *lock(&self.reading) = Some(self.clock.now());
    }

    fn failed(&self) {
        self.cache.distrust();
        self.recount.store(true, Ordering::SeqCst);
    }

    /// Fire the deadlines that are due, as far as the saga has heard everything: a
    /// deadline is not passed while an answer to it may still be waiting unread.
    async fn between(&self, caught_up: bool) -> Result<Idle, InfraError> {
        if caught_up {
            *lock(&self.heard_until) = *lock(&self.reading);
        }
        self.recount_settled().await?;
        let heard_until = *lock(&self.heard_until);
        let fired = match heard_until {
            Some(until) => self.fire_deadlines(until).await?,
            None => false,
        };
        self.prune_when_due().await?;
        Ok(if fired {
            Idle::Busy
        } else {
            Idle::For(self.idle_time().await?)
        })
    }
}

/// Produce staged commands to their services' command topics, keyed by target
/// aggregate (one target's commands stay in order); the ids the broker acknowledged.
async fn publish(
    producer: &FutureProducer,
    config: &KafkaConfig,
    groups: BTreeMap<(AggregateType, String), Vec<Staged>>,
) -> Vec<i64> {
    let mut deliveries = vec![];
    for ((aggregate_type, target), group) in groups {
        let topic = config.commands_topic(aggregate_type.service());
        for (id, command_id, command, meta) in group {
            let message = CommandMessage {
                command_id,
                correlation_id: meta.correlation_id,
                causation_id: meta.causation_id,
                command,
            };
            let Ok(payload) = serde_json::to_vec(&message) else {
                continue;
            };
            let record = FutureRecord::to(&topic).key(&target).payload(&payload);
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push((id, delivery)),
                Err((error, _)) => {
                    tracing::warn!(error = %error, "cannot queue saga command; will retry");
                    break;
                }
            }
        }
    }
    let mut done = vec![];
    for (id, delivery) in deliveries {
        match delivery.await {
            Ok(Ok(_)) => done.push(id),
            Ok(Err((error, _))) => {
                tracing::warn!(error = %error, "saga command not acknowledged; will retry")
            }
            Err(_) => tracing::warn!("saga command delivery cancelled; will retry"),
        }
    }
    done
}

/// Seconds from an order's placement (its id is a UUIDv7, made when it was placed)
/// to `event`.
fn since_placed(order_id: Uuid, event: &RecordedEvent) -> Option<f64> {
    let (secs, nanos) = order_id.get_timestamp()?.to_unix();
    let placed = DateTime::<Utc>::from_timestamp(i64::try_from(secs).ok()?, nanos)?;
    let elapsed = event.envelope.occurred_at - placed;
    Some(elapsed.num_microseconds()? as f64 / 1e6)
}

/// The order an event concerns and what the saga hears of it; `None` for events no
/// saga follows (restocks).
fn route(recorded: &RecordedEvent) -> Result<Option<(Uuid, Input)>, String> {
    let envelope = &recorded.envelope;
    let event = AnyEvent::from_envelope(envelope).map_err(|e| e.to_string())?;
    let own_id =
        || Uuid::parse_str(&envelope.aggregate_id).map_err(|e| format!("aggregate id: {e}"));
    Ok(match event {
        AnyEvent::Order(event) => Some((own_id()?, Input::Order(event))),
        AnyEvent::Payment(event) => Some((own_id()?, Input::Payment(event))),
        AnyEvent::Shipment(event) => Some((own_id()?, Input::Shipment(event))),
        // Customers and their logins are no order's business.
        AnyEvent::Customer(_) | AnyEvent::Session(_) | AnyEvent::Product(_) | AnyEvent::Cart(_) => {
            None
        }
        AnyEvent::Inventory(event) => match event.order_id() {
            None => None,
            Some(order_id) => {
                let sku = Sku::parse(&envelope.aggregate_id).map_err(|e| e.to_string())?;
                Some((order_id, Input::Inventory { sku, event }))
            }
        },
    })
}

async fn load(conn: &mut AnyConnection, order_id: Uuid) -> Result<Option<Loaded>, InfraError> {
    let row = sqlx::query("SELECT state, correlation_id FROM sagas WHERE order_id = $1")
        .bind(order_id.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let state: String = row.try_get("state")?;
    Ok(Some(Loaded {
        state: serde_json::from_str(&state)
            .map_err(|e| InfraError::Corrupt(format!("saga {order_id}: {e}")))?,
        correlation_id: parse_uuid(row.try_get("correlation_id")?)?,
    }))
}

/// The rows a batch (or a round of deadlines) writes, gathered while its sagas are
/// folded and written with a few multi-row statements at the end.
#[derive(Default)]
struct Writes {
    /// Commands staged, in the order they were emitted.
    outbox: Vec<OutboxRow>,
    /// Each order's deadline after the batch: set to a time, or cleared.
    deadlines: BTreeMap<Uuid, Option<DateTime<Utc>>>,
}

struct OutboxRow {
    command_id: Uuid,
    order_id: Uuid,
    command: String,
    correlation_id: Uuid,
    causation_id: Uuid,
}

impl Writes {
    fn stage(
        &mut self,
        order_id: Uuid,
        commands: &[domain::saga::Command],
        (correlation_id, causation_id): (Uuid, Uuid),
        command_id: impl Fn(usize) -> Uuid,
    ) -> Result<(), InfraError> {
        for (i, command) in commands.iter().enumerate() {
            let wire = SagaCommand::new(order_id, command.clone());
            self.outbox.push(OutboxRow {
                command_id: command_id(i),
                order_id,
                command: serde_json::to_string(&wire)?,
                correlation_id,
                causation_id,
            });
        }
        Ok(())
    }

    fn deadline(&mut self, order_id: Uuid, deadline: Deadline) {
        match deadline {
            Deadline::Keep => {}
            Deadline::Set(due) => {
                self.deadlines.insert(order_id, Some(due));
            }
            Deadline::Clear => {
                self.deadlines.insert(order_id, None);
            }
        }
    }

    /// Write the staged commands, the deadlines and the sagas' new states: a
    /// statement for each, whatever the batch's size.
    async fn write<'a>(
        self,
        conn: &mut AnyConnection,
        dialect: Dialect,
        sagas: impl IntoIterator<Item = (&'a Uuid, &'a Loaded)>,
    ) -> Result<(), InfraError> {
        let now = timestamp(Utc::now());
        let rows = |rows: Vec<Value>| Value::Array(rows).to_string();
        if !self.outbox.is_empty() {
            let outbox = self.outbox.iter().map(|row| {
                json!([
                    row.command_id,
                    row.order_id,
                    row.command,
                    row.correlation_id,
                    row.causation_id,
                    now
                ])
            });
            sqlx::query(&format!(
                "INSERT INTO saga_outbox (command_id, order_id, command, correlation_id, causation_id, created_at)
                 SELECT k.value ->> 0, k.value ->> 1, k.value ->> 2, k.value ->> 3, k.value ->> 4, k.value ->> 5
                   FROM {} WHERE true ORDER BY k.key
                 ON CONFLICT (command_id) DO NOTHING",
                dialect.json_rows("$1")
            ))
            .bind(rows(outbox.collect()))
            .execute(&mut *conn)
            .await?;
        }
        let (set, cleared): (Vec<_>, Vec<_>) = self
            .deadlines
            .into_iter()
            .partition(|(_, due)| due.is_some());
        if !cleared.is_empty() {
            let ids: Vec<Value> = cleared.iter().map(|(id, _)| json!(id)).collect();
            sqlx::query(&format!(
                "DELETE FROM saga_deadlines WHERE order_id IN ({})",
                dialect.text_list("$1")
            ))
            .bind(rows(ids))
            .execute(&mut *conn)
            .await?;
        }
        if !set.is_empty() {
            let set = set
                .iter()
                .map(|(order_id, due)| json!([order_id, due.map(timestamp)]));
            sqlx::query(&format!(
                "INSERT INTO saga_deadlines (order_id, due_at)
                 SELECT k.value ->> 0, k.value ->> 1 FROM {} WHERE true ORDER BY k.key
                 ON CONFLICT (order_id) DO UPDATE SET due_at = excluded.due_at",
                dialect.json_rows("$1")
            ))
            .bind(rows(set.collect()))
            .execute(&mut *conn)
            .await?;
        }
        let mut states = vec![];
        for (order_id, saga) in sagas {
            let stage = serde_json::to_value(saga.state.stage)?;
            states.push(json!([
                order_id,
                serde_json::to_string(&saga.state)?,
                stage,
                saga.correlation_id,
                now
            ]));
        }
        if !states.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO sagas (order_id, state, stage, correlation_id, updated_at)
                 SELECT k.value ->> 0, k.value ->> 1, k.value ->> 2, k.value ->> 3, k.value ->> 4
                   FROM {} WHERE true ORDER BY k.key
                 ON CONFLICT (order_id) DO UPDATE SET state = excluded.state,
                    stage = excluded.stage, updated_at = excluded.updated_at",
                dialect.json_rows("$1")
            ))
            .bind(rows(states))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}
