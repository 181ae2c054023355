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
use infra::db::Db;
use infra::kafka::{KafkaConfig, KafkaConsumer, OffsetStore};
use infra::metrics;
use infra::shutdown::Shutdown;
use infra::{checkpoints, dead_letters, parse_timestamp, parse_uuid, timestamp, InfraError};
use rdkafka::producer::{FutureProducer, FutureRecord};
use schemas::commands::{CommandMessage, SagaCommand};
use schemas::topics::AGGREGATE_TYPES;
use schemas::{AnyEvent, RecordedEvent};
use sqlx::{AnyConnection, Row};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::task::JoinSet;
use uuid::Uuid;

/// The consumer name: its checkpoint and dead letters go under it.
pub const NAME: &str = "fulfilment_saga";

/// Namespace of the saga's command ids.
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_726c_696e_6573_6167_6163_6d64);

const BATCH: i64 = 500;

/// A command waiting in the outbox: row id, command id, command, who caused it.
type Staged = (i64, Uuid, SagaCommand, Meta);

pub struct SagaRunner {
    handlers: Handlers,
    db: Db,
    config: Config,
    feed: Feed,
    dispatch: Dispatch,
}

/// Where the saga hears events from.
enum Feed {
    /// The embedded log; the checkpoint is a position.
    Log,
    /// The event topics; the checkpoint is the offsets kept in the order database.
    Kafka(KafkaConsumer),
}

/// How the saga's commands reach the services that carry them out.
enum Dispatch {
    /// Called directly (embedded: every service is in this process).
    InProcess,
    /// Produced to the owning service's command topic, keyed by target aggregate.
    Kafka {
        producer: FutureProducer,
        config: KafkaConfig,
    },
}

struct Loaded {
    state: Fulfilment,
    correlation_id: Uuid,
}

impl SagaRunner {
    pub async fn new(
        handlers: Handlers,
        db: Db,
        payment_timeout: Duration,
    ) -> Result<SagaRunner, InfraError> {
        let payment_timeout = chrono::Duration::from_std(payment_timeout)
            .map_err(|e| InfraError::Corrupt(format!("payment timeout: {e}")))?;
        Ok(SagaRunner {
            handlers,
            db,
            config: Config { payment_timeout },
            feed: Feed::Log,
            dispatch: Dispatch::InProcess,
        })
    }

    /// Hear events from the Kafka topics and send commands over command topics.
    pub async fn with_kafka(mut self, config: &KafkaConfig) -> Result<SagaRunner, InfraError> {
        let kafka = |e: rdkafka::error::KafkaError| InfraError::Corrupt(format!("kafka: {e}"));
        let offsets = OffsetStore::new(&self.db, NAME);
        let group = format!("{}.saga.{NAME}", config.prefix);
        let consumer = KafkaConsumer::subscribe(config, &group, &config.event_topics(), offsets)
            .map_err(kafka)?;
        self.feed = Feed::Kafka(consumer);
        self.dispatch = Dispatch::Kafka {
            producer: infra::kafka::producer(config).map_err(kafka)?,
            config: config.clone(),
        };
        Ok(self)
    }

    /// The consumer-group member the saga reads Kafka with, if it does.
    pub fn kafka_consumer(&self) -> Option<KafkaConsumer> {
        match &self.feed {
            Feed::Kafka(consumer) => Some(consumer.clone()),
            Feed::Log => None,
        }
    }

    /// Run until shutdown: follow the log, fire deadlines, dispatch commands.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut head = self.handlers.store.subscribe();
        let mut failures: u32 = 0;
        while !shutdown.is_set() {
            head.borrow_and_update();
            let round = self.round().await;
            let pause = match round {
                Ok(true) => {
                    failures = 0;
                    continue;
                }
                // A Kafka poll has waited already.
                Ok(false) if matches!(self.feed, Feed::Kafka(_)) => {
                    failures = 0;
                    continue;
                }
                Ok(false) => {
                    failures = 0;
                    self.idle_time().await.unwrap_or(Duration::from_secs(1))
                }
                Err(error) => {
                    failures += 1;
                    tracing::error!(error = %error, saga = NAME, "saga round failed; retrying");
                    if let Feed::Kafka(consumer) = &self.feed {
                        if let Err(error) = consumer.rewind().await {
                            tracing::error!(error = %error, "cannot rewind to the stored offsets");
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
        if let Feed::Kafka(consumer) = &self.feed {
            consumer.close();
        }
        tracing::info!(saga = NAME, "saga runner stopped");
    }

    /// One round; true when it did something (so another round follows at once).
    async fn round(&self) -> Result<bool, InfraError> {
        let consumed = self.consume().await?;
        let fired = self.fire_deadlines(Utc::now()).await?;
        let dispatched = self.dispatch().await?;
        Ok(consumed || fired || dispatched)
    }

    /// How long to sleep when idle: until the next deadline, or a while; soon when
    /// commands are still waiting to be carried out.
    async fn idle_time(&self) -> Result<Duration, InfraError> {
        let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM saga_outbox")
            .fetch_one(&self.db.pool)
            .await?;
        if pending > 0 {
            return Ok(Duration::from_millis(200));
        }
        let next: Option<String> = sqlx::query_scalar("SELECT MIN(due_at) FROM saga_deadlines")
            .fetch_one(&self.db.pool)
            .await?;
        Ok(match next {
            None => Duration::from_secs(60),
            Some(due) => (parse_timestamp(&due)? - Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(Duration::from_secs(60)),
        })
    }

    /// Fold the next batch of events into the sagas; true when the checkpoint moved.
    async fn consume(&self) -> Result<bool, InfraError> {
        match &self.feed {
            Feed::Log => {
                let checkpoint = checkpoints::load(&self.db.pool, NAME).await?;
                let (events, reached) = self
                    .handlers
                    .store
                    .read_after(checkpoint, &AGGREGATE_TYPES, BATCH)
                    .await?;
                if reached == checkpoint {
                    return Ok(false);
                }
                let mut tx = self.db.begin_write().await?;
                let outcomes = self.fold(&mut tx, &events).await?;
                checkpoints::save(&mut tx, NAME, reached).await?;
                tx.commit().await?;
                self.count(&outcomes);
            }
            Feed::Kafka(consumer) => {
                let polled = consumer
                    .poll_batch(BATCH as usize, Duration::from_millis(200))
                    .await
                    .map_err(|e| InfraError::Corrupt(format!("kafka: {e}")))?;
                if polled.is_empty() {
                    return Ok(false);
                }
                let mut tx = self.db.begin_write().await?;
                let mut events = Vec::with_capacity(polled.len());
                for record in &polled {
                    match record.event() {
                        Ok(event) => events.push(event),
                        Err(error) => {
                            tracing::error!(error = %error, topic = %record.topic, offset = record.offset, "saga cannot read record; dead-lettered");
                            dead_letters::record_unreadable(
                                &mut tx,
                                NAME,
                                record.offset,
                                &record.origin(),
                                &error,
                            )
                            .await?;
                        }
                    }
                }
                let outcomes = self.fold(&mut tx, &events).await?;
                consumer.offsets.save_batch(&mut tx, &polled).await?;
                tx.commit().await?;
                self.count(&outcomes);
            }
        }
        Ok(true)
    }

    /// Run the transitions of `events` in the caller's transaction: new states,
    /// staged commands, deadlines. The outcomes, to count once committed.
    async fn fold(
        &self,
        tx: &mut AnyConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Outcome>, InfraError> {
        let now = Utc::now();
        let mut sagas: HashMap<Uuid, Loaded> = HashMap::new();
        let mut outcomes = vec![];
        for recorded in events {
            if !first_delivery(tx, recorded).await? {
                // Published again (a relay that restarted): already folded in.
                continue;
            }
            let Some((order_id, input)) = (match route(recorded) {
                Ok(routed) => routed,
                Err(error) => {
                    tracing::error!(error = %error, position = recorded.position, "saga cannot read event; dead-lettered");
                    dead_letters::record(tx, NAME, recorded, &error).await?;
                    self.handlers
                        .metrics
                        .inc(&metrics::DEAD_LETTERS, &[("consumer", NAME)]);
                    continue;
                }
            }) else {
                continue;
            };
            let saga = match sagas.entry(order_id) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    let loaded = load(tx, order_id).await?.unwrap_or(Loaded {
                        state: Fulfilment::default(),
                        correlation_id: recorded.envelope.correlation_id,
                    });
                    entry.insert(loaded)
                }
            };
            if saga.state.stage == Stage::NotStarted && !matches!(input, Input::Order(_)) {
                // Nothing of this order was seen yet (e.g. a restock): not a saga's business.
                continue;
            }
            let transition = saga.state.handle(order_id, &input, now, &self.config);
            let cause = recorded.envelope.event_id;
            let meta = (saga.correlation_id, cause);
            stage_commands(tx, order_id, &transition.commands, meta, |i| {
                Uuid::new_v5(&COMMAND_NAMESPACE, format!("{cause}/{i}").as_bytes())
            })
            .await?;
            set_deadline(tx, order_id, transition.deadline).await?;
            outcomes.extend(transition.outcome);
        }
        for (order_id, saga) in &sagas {
            if saga.state.stage != Stage::NotStarted {
                save(tx, *order_id, saga).await?;
            }
        }
        Ok(outcomes)
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
        for (order_id, due_at) in &due {
            let order_id = parse_uuid(order_id)?;
            sqlx::query("DELETE FROM saga_deadlines WHERE order_id = $1")
                .bind(order_id.to_string())
                .execute(&mut *tx)
                .await?;
            let Some(mut saga) = load(&mut tx, order_id).await? else {
                continue;
            };
            let transition =
                saga.state
                    .handle(order_id, &Input::PaymentDeadlinePassed, now, &self.config);
            let cause = Uuid::new_v5(
                &COMMAND_NAMESPACE,
                format!("deadline/{order_id}/{due_at}").as_bytes(),
            );
            stage_commands(
                &mut tx,
                order_id,
                &transition.commands,
                (saga.correlation_id, cause),
                |i| Uuid::new_v5(&cause, i.to_string().as_bytes()),
            )
            .await?;
            set_deadline(&mut tx, order_id, transition.deadline).await?;
            outcomes.extend(transition.outcome);
            save(&mut tx, order_id, &saga).await?;
        }
        tx.commit().await?;
        self.count(&outcomes);
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

    /// Carry out the staged commands: one target aggregate's in order, different
    /// targets side by side. A command the participant refuses is logged and dropped;
    /// one that fails for another reason stays for the next round.
    pub async fn dispatch(&self) -> Result<bool, InfraError> {
        let rows = sqlx::query("SELECT id, command_id, command, correlation_id, causation_id FROM saga_outbox ORDER BY id LIMIT 2000")
            .fetch_all(&self.db.pool)
            .await?;
        if rows.is_empty() {
            return Ok(false);
        }
        let mut groups: BTreeMap<(&'static str, String), Vec<Staged>> = BTreeMap::new();
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
        let mut tasks = JoinSet::new();
        for (_, group) in groups {
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
        let ids = serde_json::to_string(&done).map_err(|e| InfraError::Corrupt(e.to_string()))?;
        let sql = format!(
            "DELETE FROM saga_outbox WHERE id IN ({})",
            self.db.dialect.integer_list("$1")
        );
        sqlx::query(&sql).bind(ids).execute(&self.db.pool).await?;
        Ok(true)
    }
}

/// Produce staged commands to their services' command topics, keyed by target
/// aggregate (one target's commands stay in order); the ids the broker acknowledged.
async fn publish(
    producer: &FutureProducer,
    config: &KafkaConfig,
    groups: BTreeMap<(&'static str, String), Vec<Staged>>,
) -> Vec<i64> {
    let mut deliveries = vec![];
    for ((aggregate_type, target), group) in groups {
        let Some(service) = schemas::topics::owning_service(aggregate_type) else {
            continue;
        };
        let topic = config.commands_topic(service);
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
        AnyEvent::Inventory(event) => match event.order_id() {
            None => None,
            Some(order_id) => {
                let sku = Sku::parse(&envelope.aggregate_id).map_err(|e| e.to_string())?;
                Some((order_id, Input::Inventory { sku, event }))
            }
        },
    })
}

/// Whether the saga sees this event for the first time (per-stream version guard),
/// recording that it has.
async fn first_delivery(
    conn: &mut AnyConnection,
    recorded: &RecordedEvent,
) -> Result<bool, InfraError> {
    let envelope = &recorded.envelope;
    let applied: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM saga_applied WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(&envelope.aggregate_type)
    .bind(&envelope.aggregate_id)
    .fetch_optional(&mut *conn)
    .await?;
    if applied.is_some_and(|v| v >= envelope.version) {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO saga_applied (aggregate_type, aggregate_id, version) VALUES ($1, $2, $3)
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version",
    )
    .bind(&envelope.aggregate_type)
    .bind(&envelope.aggregate_id)
    .bind(envelope.version)
    .execute(&mut *conn)
    .await?;
    Ok(true)
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

async fn save(conn: &mut AnyConnection, order_id: Uuid, saga: &Loaded) -> Result<(), InfraError> {
    let state =
        serde_json::to_string(&saga.state).map_err(|e| InfraError::Corrupt(e.to_string()))?;
    let stage =
        serde_json::to_value(saga.state.stage).map_err(|e| InfraError::Corrupt(e.to_string()))?;
    sqlx::query(
        "INSERT INTO sagas (order_id, state, stage, correlation_id, updated_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, stage = excluded.stage, updated_at = excluded.updated_at",
    )
    .bind(order_id.to_string())
    .bind(state)
    .bind(stage.as_str().unwrap_or_default())
    .bind(saga.correlation_id.to_string())
    .bind(timestamp(Utc::now()))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn stage_commands(
    conn: &mut AnyConnection,
    order_id: Uuid,
    commands: &[domain::saga::Command],
    (correlation_id, causation_id): (Uuid, Uuid),
    command_id: impl Fn(usize) -> Uuid,
) -> Result<(), InfraError> {
    for (i, command) in commands.iter().enumerate() {
        let Some(wire) = SagaCommand::from_domain(order_id, command) else {
            tracing::error!(
                ?command,
                "the saga emitted a command it may not send; dropped"
            );
            continue;
        };
        let text = serde_json::to_string(&wire).map_err(|e| InfraError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO saga_outbox (command_id, order_id, command, correlation_id, causation_id, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (command_id) DO NOTHING",
        )
        .bind(command_id(i).to_string())
        .bind(order_id.to_string())
        .bind(text)
        .bind(correlation_id.to_string())
        .bind(causation_id.to_string())
        .bind(timestamp(Utc::now()))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn set_deadline(
    conn: &mut AnyConnection,
    order_id: Uuid,
    deadline: Deadline,
) -> Result<(), InfraError> {
    match deadline {
        Deadline::Keep => {}
        Deadline::Set(due) => {
            sqlx::query(
                "INSERT INTO saga_deadlines (order_id, due_at) VALUES ($1, $2)
                 ON CONFLICT (order_id) DO UPDATE SET due_at = excluded.due_at",
            )
            .bind(order_id.to_string())
            .bind(timestamp(due))
            .execute(&mut *conn)
            .await?;
        }
        Deadline::Clear => {
            sqlx::query("DELETE FROM saga_deadlines WHERE order_id = $1")
                .bind(order_id.to_string())
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}
