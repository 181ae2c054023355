//! Application services: load, decide, append, with bounded retry on version clashes.

use crate::gateway::{Answer, SimulatedGateway};
use domain::inventory::InventoryItem;
use domain::order::Order;
use domain::payment::{Payment, PaymentCommand, PaymentStatus};
use domain::saga::Participant;
use domain::shipment::Shipment;
use domain::{Aggregate, DomainError, EventName, Sku};
use infra::event_store::{
    AppendOutcome, AppendRequest, IdempotencyRecord, NewEvent, StoreError, Submitted,
};
use infra::http::ApiError;
use infra::metrics::{self, Metrics};
use infra::{EventStore, InfraError};
use schemas::commands::SagaCommand;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use uuid::Uuid;

/// How often a command is retried on a version clash before the client gets a 409.
pub const MAX_ATTEMPTS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("the idempotency key was used before for a different request")]
    KeyReused,
    #[error("too many concurrent changes to {0}; try again")]
    Contention(String),
    #[error(transparent)]
    Store(StoreError),
    #[error("stored event cannot be read: {0}")]
    Schema(#[from] schemas::SchemaError),
}

impl From<InfraError> for CommandError {
    fn from(error: InfraError) -> Self {
        CommandError::Store(StoreError::Infra(error))
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Domain(DomainError::NotFound(what)) => {
                ApiError::not_found(format!("no such {what}"))
            }
            CommandError::Domain(DomainError::Conflict(detail)) => ApiError::conflict(detail),
            CommandError::Domain(DomainError::Invalid(detail)) => ApiError::invalid(detail),
            CommandError::KeyReused => ApiError::idempotency_key_reused(),
            CommandError::Contention(_) => ApiError::conflict(error.to_string()),
            CommandError::Store(StoreError::Infra(error)) => ApiError::from(error),
            CommandError::Store(StoreError::Closed) => ApiError::unavailable(StoreError::Closed),
            CommandError::Store(error) => ApiError::internal(error),
            CommandError::Schema(error) => ApiError::internal(error),
        }
    }
}

/// Who caused a command, and under which key it is recorded.
#[derive(Debug, Clone)]
pub struct Meta {
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    /// The idempotency record: `http:<Idempotency-Key>` or `cmd:<command id>`.
    pub idempotency: Option<IdempotencyRecord>,
}

impl Meta {
    /// A new request from outside: its own correlation.
    pub fn fresh() -> Meta {
        let id = Uuid::now_v7();
        Meta {
            correlation_id: id,
            causation_id: id,
            idempotency: None,
        }
    }
}

/// What an executed command left behind.
#[derive(Debug, Clone, PartialEq)]
pub enum Executed {
    /// Appended now (maybe nothing); `token` names the stream's state after it.
    Done { token: String, events: usize },
    /// A retry of a command already done: the first answer, with its token.
    Repeated { response: Value, token: String },
}

/// One lock per aggregate that has a command in flight in this process: commands on
/// one aggregate take turns to decide instead of clashing, so a hot sku does not turn
/// into retries and 409s. A command holds the turn only while it decides and queues
/// its append, not while the append commits: the next one decides on the state the
/// queued appends will leave ([`Speculative`]), and its append is queued behind
/// theirs, so one hot aggregate's commands share group commits instead of waiting
/// for a commit each. The expected-version check (and the last event seen) still
/// guards every append.
#[derive(Clone, Default)]
struct StreamLocks(Arc<StdMutex<HashMap<String, Weak<Turn>>>>);

/// An aggregate's turn, and what the appends queued for it will leave.
type Turn = Mutex<Option<Speculative>>;

impl StreamLocks {
    fn get(&self, key: String) -> Arc<Turn> {
        let mut locks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lock) = locks.get(&key).and_then(Weak::upgrade) {
            return lock;
        }
        if locks.len() >= 1024 {
            locks.retain(|_, lock| lock.strong_count() > 0);
        }
        let lock = Arc::new(Mutex::new(None));
        locks.insert(key, Arc::downgrade(&lock));
        lock
    }
}

/// An aggregate's state after the appends queued for it and not yet settled.
struct Speculative {
    state: Arc<dyn Any + Send + Sync>,
    version: i64,
    /// The id of the last event queued.
    last_event: Uuid,
    /// Becomes true when the last append queued has settled (every earlier one has
    /// then settled too: appends settle in the order they were queued).
    settled: watch::Receiver<bool>,
    /// Set when an append of the chain failed: what it stands on never happened.
    broken: Arc<AtomicBool>,
}

impl Speculative {
    /// The events `command` appends on this state, with the state to apply them to;
    /// `None` when the state is no longer usable (its last append settled, or one of
    /// its chain failed) or the answer would append nothing.
    fn decide<A: Aggregate + Clone + 'static>(
        &self,
        command: &A::Command,
    ) -> Option<(A, Vec<A::Event>)> {
        // Usable while its last append is in flight (its command still waits for it)
        // and nothing of the chain failed.
        let usable = self.settled.has_changed().is_ok()
            && !*self.settled.borrow()
            && !self.broken.load(Ordering::Acquire);
        let state = self.state.downcast_ref::<A>().filter(|_| usable)?.clone();
        let events = state.decide(command).ok().filter(|e| !e.is_empty())?;
        Some((state, events))
    }

    /// Wait until every queued append has settled.
    async fn drained(&self) {
        let mut settled = self.settled.clone();
        let _ = settled.wait_for(|done| *done).await;
    }
}

/// An append queued by a command, with what the command needs once it settles.
struct Queued<A> {
    submitted: Submitted,
    /// The state the append leaves (shared with the next command's [`Speculative`]).
    state: Arc<A>,
    version: i64,
    events: usize,
    done: watch::Sender<bool>,
    chain: Arc<AtomicBool>,
}

/// What a command's turn came to.
enum Step<A> {
    Answered(Executed),
    Queued(Queued<A>),
}

/// The key of an aggregate's stream in this process's locks and cache.
fn stream_key<A: Aggregate>(id: &str) -> String {
    format!("{}/{id}", A::TYPE)
}

/// What an aggregate's state needs to be cached and snapshotted.
pub trait Stateful: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> Stateful for T {}

/// Whether a stored snapshot still reads as its aggregate's state (retention removes
/// those that do not: every load passes over them).
pub fn snapshot_readable(aggregate_type: &str, state: &Value) -> bool {
    fn reads<A: DeserializeOwned>(state: &Value) -> bool {
        A::deserialize(state).is_ok()
    }
    match aggregate_type {
        Order::TYPE => reads::<Order>(state),
        InventoryItem::TYPE => reads::<InventoryItem>(state),
        Payment::TYPE => reads::<Payment>(state),
        Shipment::TYPE => reads::<Shipment>(state),
        _ => false,
    }
}

/// A snapshot is stored each time a stream crosses a multiple of this many events.
pub const SNAPSHOT_EVERY: i64 = 64;

/// The most aggregates whose state is kept in memory.
const CACHE_CAPACITY: usize = 50_000;

/// The last committed state of recently used aggregates, with its version and
/// position: a load reads only the events after it. Only states this process
/// committed (or read) go in, so a cached state is always one the log holds.
#[derive(Clone, Default)]
struct StateCache(Arc<StdMutex<HashMap<String, Cached>>>);

struct Cached {
    version: i64,
    position: i64,
    state: Arc<dyn Any + Send + Sync>,
}

impl StateCache {
    fn get<A: Clone + 'static>(&self, key: &str) -> Option<(A, i64, i64)> {
        let cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = cache.get(key)?;
        let state = cached.state.downcast_ref::<A>()?.clone();
        Some((state, cached.version, cached.position))
    }

    fn forget(&self, key: &str) {
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        cache.remove(key);
    }

    /// Keep `state` at `version`, unless a later version is kept already (appends
    /// settle in order, but their commands may wake in another).
    fn put<A: Send + Sync + 'static>(
        &self,
        key: String,
        state: Arc<A>,
        version: i64,
        position: i64,
    ) {
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if cache
            .get(&key)
            .is_some_and(|cached| cached.version > version)
        {
            return;
        }
        if cache.len() >= CACHE_CAPACITY && !cache.contains_key(&key) {
            cache.clear();
        }
        cache.insert(
            key,
            Cached {
                version,
                position,
                state,
            },
        );
    }
}

/// What a consistency token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStyle {
    /// A position in the one log (embedded deployment).
    Position,
    /// A version of the written stream (distributed deployment, where positions are
    /// per service).
    Stream,
}

/// Orders accepted and not yet confirmed or cancelled, and how many the door lets in:
/// past the bound, a new order is refused (503, Retry-After) rather than accepted
/// to wait behind the others.
#[derive(Clone, Debug)]
pub struct Backlog {
    in_flight: Arc<AtomicI64>,
    /// The most orders in flight; `None`: no bound.
    pub bound: Option<u64>,
    /// How long a refusal is held before it is answered: a client that sends again
    /// at once, whatever `Retry-After` says, then sends a few times a second rather
    /// than thousands, and the pipeline keeps the processor.
    pub refusal_delay: Duration,
}

/// Orders in flight the door admits unless configured otherwise.
pub const DEFAULT_MAX_BACKLOG: u64 = 1_000;

/// How long a refusal for overload is held unless configured otherwise.
pub const DEFAULT_REFUSAL_DELAY: Duration = Duration::from_millis(100);

impl Default for Backlog {
    fn default() -> Self {
        Backlog {
            in_flight: Arc::new(AtomicI64::new(0)),
            bound: Some(DEFAULT_MAX_BACKLOG),
            refusal_delay: DEFAULT_REFUSAL_DELAY,
        }
    }
}

impl Backlog {
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed).max(0) as u64
    }

    /// Refuse a new saga while the backlog is at its bound.
    pub fn admit(&self) -> Result<(), ApiError> {
        let in_flight = self.in_flight();
        match self.bound {
            Some(bound) if in_flight >= bound => {
                // Ask to come back after about the time the backlog takes at the
                // pipeline's usual pace (~500 orders/s), within 1 to 30 s.
                Err(ApiError::overloaded((in_flight / 500).clamp(1, 30)))
            }
            _ => Ok(()),
        }
    }

    /// A saga started (an order was accepted).
    pub fn entered(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Sagas settled (confirmed or cancelled).
    pub fn settled(&self, count: u64) {
        self.in_flight
            .fetch_sub(i64::try_from(count).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Start from what the saga table holds in flight (after a restart).
    pub fn reset(&self, in_flight: u64) {
        self.in_flight.store(
            i64::try_from(in_flight).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// The application services of every bounded context; cheap to clone.
#[derive(Clone)]
pub struct Handlers {
    pub store: EventStore,
    pub metrics: Metrics,
    pub backlog: Backlog,
    pub gateway: SimulatedGateway,
    pub tokens: TokenStyle,
    /// The keys access tokens are signed with (the process's own until set).
    pub keys: infra::auth::Keys,
    /// This process's copy of the catalog's prices (the order service's `prices` read
    /// model, or the cart service's `cart_prices`): orders are checked against it
    /// with auth on, and carts priced by it.
    pub prices: Option<infra::db::Db>,
    /// Whether this process runs the order service (a checkout then places its order
    /// at once).
    pub places_orders: bool,
    locks: StreamLocks,
    cache: StateCache,
}

impl Handlers {
    pub fn new(store: EventStore, metrics: Metrics) -> Handlers {
        Handlers {
            store,
            metrics,
            gateway: SimulatedGateway,
            tokens: TokenStyle::Position,
            keys: infra::auth::Keys::ephemeral(),
            prices: None,
            places_orders: false,
            backlog: Backlog::default(),
            locks: StreamLocks::default(),
            cache: StateCache::default(),
        }
    }

    /// Load the aggregate, decide, append at the version it was loaded at; on a clash,
    /// reload and decide again, up to [`MAX_ATTEMPTS`] times.
    #[tracing::instrument(skip_all, fields(aggregate_type = A::TYPE, aggregate_id = %id, correlation_id = %meta.correlation_id))]
    pub async fn execute<A>(
        &self,
        id: &str,
        command: &A::Command,
        meta: &Meta,
    ) -> Result<Executed, CommandError>
    where
        A: Aggregate + Stateful,
        A::Event: Serialize + DeserializeOwned + EventName,
    {
        let key = stream_key::<A>(id);
        let lock = self.locks.get(key.clone());
        for attempt in 0..MAX_ATTEMPTS {
            let turn = {
                let mut queued = lock.lock().await;
                // The first attempt may guess that the aggregate is new.
                let guess_new = attempt == 0;
                self.turn::<A>(&mut queued, (&key, id, guess_new), command, meta)
                    .await?
            };
            let settled = match turn {
                Step::Answered(executed) => return Ok(executed),
                Step::Queued(queued) => self.settle::<A>(&key, id, queued).await?,
            };
            if let Some(executed) = settled {
                return Ok(executed);
            }
            tracing::debug!(attempt, "version conflict; deciding again");
            if attempt > 0 {
                // Spread the retries of clashing writers apart (the first retry may
                // only have found a guess wrong: it loads at once).
                let jitter = u64::from(Uuid::now_v7().as_bytes()[15] % 8);
                tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 2 + jitter)).await;
            }
        }
        Err(CommandError::Contention(key))
    }

    /// Decide, and queue the append (or answer at once), holding the aggregate's turn.
    async fn turn<A>(
        &self,
        queued: &mut Option<Speculative>,
        (key, id, guess_new): (&str, &str, bool),
        command: &A::Command,
        meta: &Meta,
    ) -> Result<Step<A>, CommandError>
    where
        A: Aggregate + Stateful,
        A::Event: Serialize + DeserializeOwned + EventName,
    {
        if let Some(ahead) = queued.as_ref() {
            if let Some((state, events)) = ahead.decide::<A>(command) {
                let (version, last, chain) =
                    (ahead.version, ahead.last_event, ahead.broken.clone());
                return self
                    .queue(
                        queued,
                        (id, meta),
                        (state, version, Some(last)),
                        events,
                        chain,
                    )
                    .await;
            }
            // A refusal, or nothing to do, is answered on committed state only: wait
            // for the appends ahead to settle.
            ahead.drained().await;
            *queued = None;
        }
        let (state, version, position, events) = self
            .decide::<A>((key, id, guess_new), command, meta)
            .await?;
        if events.is_empty() && meta.idempotency.is_none() {
            return Ok(Step::Answered(Executed::Done {
                token: self.token::<A>(id, position, version),
                events: 0,
            }));
        }
        let chain = Arc::new(AtomicBool::new(false));
        self.queue(queued, (id, meta), (state, version, None), events, chain)
            .await
    }

    /// Queue the append of `events`, decided on `state` at `version`; the state they
    /// leave becomes what the next command on the aggregate decides on.
    async fn queue<A>(
        &self,
        queued: &mut Option<Speculative>,
        (id, meta): (&str, &Meta),
        (mut state, version, last_event): (A, i64, Option<Uuid>),
        events: Vec<A::Event>,
        chain: Arc<AtomicBool>,
    ) -> Result<Step<A>, CommandError>
    where
        A: Aggregate + Stateful,
        A::Event: Serialize + EventName,
    {
        let new_events = new_events(&events, meta)?;
        for event in &events {
            state.apply(event);
        }
        let new_version = version + events.len() as i64;
        let last = new_events.last().map(|event| event.event_id);
        let request = AppendRequest {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: id.to_owned(),
            expected_version: version,
            expected_last_event: last_event,
            events: new_events,
            idempotency: self.idempotency_record::<A>(id, meta, new_version),
            snapshot: (new_version / SNAPSHOT_EVERY > version / SNAPSHOT_EVERY)
                .then(|| serde_json::to_value(&state).ok())
                .flatten(),
        };
        let submitted = self
            .store
            .submit(request)
            .await
            .map_err(CommandError::Store)?;
        let state = Arc::new(state);
        let (done, settled) = watch::channel(false);
        if let Some(last) = last {
            *queued = Some(Speculative {
                state: state.clone(),
                version: new_version,
                last_event: last,
                settled,
                broken: chain.clone(),
            });
        }
        Ok(Step::Queued(Queued {
            submitted,
            state,
            version: new_version,
            events: events.len(),
            done,
            chain,
        }))
    }

    /// Wait for a queued append; `None` when another writer appended first (or an
    /// append it stood on failed): decide again.
    async fn settle<A>(
        &self,
        key: &str,
        id: &str,
        queued: Queued<A>,
    ) -> Result<Option<Executed>, CommandError>
    where
        A: Aggregate + Stateful,
    {
        let Queued {
            submitted,
            state,
            version,
            events,
            done,
            chain,
        } = queued;
        let outcome = submitted.outcome().await;
        if events > 0 && !matches!(outcome, Ok(AppendOutcome::Appended { .. })) {
            // The state the commands queued behind this one decided on never happened.
            chain.store(true, Ordering::Release);
        }
        let settled = match outcome {
            Ok(AppendOutcome::Appended { position, .. }) => {
                if events > 0 {
                    self.metrics.add(
                        &metrics::EVENTS_APPENDED,
                        &[("aggregate_type", A::TYPE)],
                        events as u64,
                    );
                    self.cache.put(key.to_owned(), state, version, position);
                }
                Ok(Some(Executed::Done {
                    token: self.token::<A>(id, position, version),
                    events,
                }))
            }
            Ok(AppendOutcome::Duplicate { response, position }) => Ok(Some(Executed::Repeated {
                token: self.stored_token(&response, position),
                response,
            })),
            Err(StoreError::Conflict { .. }) => {
                // Another process wrote the stream: what this one holds is stale.
                self.cache.forget(key);
                Ok(None)
            }
            Err(StoreError::KeyReused) => Err(CommandError::KeyReused),
            Err(error) => Err(CommandError::Store(error)),
        };
        let _ = done.send(true);
        settled
    }

    /// Decide `command` on the aggregate's state: the state this process last
    /// committed when it holds it (the append's version check catches another
    /// process having written since), else the stored one. An answer that would not
    /// reach the version check (a refusal, or nothing to append) is decided again on
    /// the stored state.
    async fn decide<A>(
        &self,
        (key, id, guess_new): (&str, &str, bool),
        command: &A::Command,
        meta: &Meta,
    ) -> Result<(A, i64, i64, Vec<A::Event>), CommandError>
    where
        A: Aggregate + Stateful,
        A::Event: DeserializeOwned,
    {
        // Not held: guess a new aggregate (most commands that find nothing in memory
        // create one: an order, its payment, its shipment). A guess that is wrong
        // fails the append's version check and the command is decided again on the
        // stored state; an answer that would not reach that check is never guessed.
        let known = match self.cache.get::<A>(key) {
            Some(cached) => Some(cached),
            None if guess_new => Some((A::default(), 0, 0)),
            None => None,
        };
        if let Some((state, version, position)) = known {
            match state.decide(command) {
                Ok(events) if !events.is_empty() || meta.idempotency.is_some() => {
                    return Ok((state, version, position, events));
                }
                _ => {}
            }
        }
        let (state, version, position) = self.load::<A>(id).await?;
        let events = state.decide(command)?;
        Ok((state, version, position, events))
    }

    /// The idempotency record to keep with the events; in the distributed deployment
    /// its answer names the stream version the command leaves behind.
    fn idempotency_record<A: Aggregate>(
        &self,
        id: &str,
        meta: &Meta,
        new_version: i64,
    ) -> Option<IdempotencyRecord> {
        let mut record = meta.idempotency.clone()?;
        if let (TokenStyle::Stream, Some(response)) = (self.tokens, record.response.as_object_mut())
        {
            let token = self.token::<A>(id, 0, new_version);
            response.insert("consistency_token".into(), Value::String(token));
        }
        Some(record)
    }

    /// The consistency token of a stream at `version`, last written at `position`.
    pub fn token<A: Aggregate>(&self, id: &str, position: i64, version: i64) -> String {
        match self.tokens {
            TokenStyle::Position => position.to_string(),
            TokenStyle::Stream => format!("{}:{id}:{version}", A::TYPE),
        }
    }

    /// The token of an answer kept under an idempotency key.
    pub fn stored_token(&self, response: &Value, position: i64) -> String {
        match response.get("consistency_token").and_then(Value::as_str) {
            Some(token) => token.to_owned(),
            None => position.to_string(),
        }
    }

    /// The aggregate's state, version and last position: from the cache or the latest
    /// snapshot, plus the events after it. A snapshot that no longer reads (the state's
    /// shape changed) is passed over and the stream is folded from the start.
    pub async fn load<A>(&self, id: &str) -> Result<(A, i64, i64), CommandError>
    where
        A: Aggregate + Stateful,
        A::Event: DeserializeOwned,
    {
        let key = stream_key::<A>(id);
        let (mut state, mut version, mut position) = match self.cache.get::<A>(&key) {
            Some(cached) => cached,
            None => match self.store.snapshot(A::TYPE, id).await? {
                Some(snapshot) => match serde_json::from_value::<A>(snapshot.state) {
                    Ok(state) => (state, snapshot.version, snapshot.position),
                    Err(error) => {
                        tracing::warn!(error = %error, aggregate = %key, "snapshot unreadable; folding the whole stream");
                        (A::default(), 0, 0)
                    }
                },
                None => (A::default(), 0, 0),
            },
        };
        let loaded_from = version;
        for recorded in self.store.load_stream_after(A::TYPE, id, version).await? {
            let envelope = &recorded.envelope;
            let event: A::Event = schemas::decode(
                &envelope.event_type,
                envelope.schema_version,
                &envelope.payload,
            )?;
            state.apply(&event);
            version = envelope.version;
            position = recorded.position;
        }
        if version != loaded_from {
            self.cache
                .put(key, Arc::new(state.clone()), version, position);
        }
        Ok((state, version, position))
    }

    /// Carry out a saga's command. The command id makes a redelivered command a no-op.
    pub async fn run_saga_command(
        &self,
        command_id: Uuid,
        command: &SagaCommand,
        meta: &Meta,
    ) -> Result<Executed, CommandError> {
        let mut meta = meta.clone();
        meta.idempotency = Some(IdempotencyRecord {
            key: format!("cmd:{command_id}"),
            request_hash: command_id.to_string(),
            response: Value::Null,
        });
        let order_id = command.order_id.to_string();
        match command.participant() {
            Participant::Inventory(sku, command) => {
                self.execute::<InventoryItem>(sku.as_str(), &command, &meta)
                    .await
            }
            Participant::Payment(command) => {
                let executed = self.execute::<Payment>(&order_id, &command, &meta).await?;
                if let PaymentCommand::Request { .. } = command {
                    self.ask_gateway(command_id, &order_id, &meta).await?;
                }
                Ok(executed)
            }
            Participant::Shipment(command) => {
                self.execute::<Shipment>(&order_id, &command, &meta).await
            }
            Participant::Order(command) => self.execute::<Order>(&order_id, &command, &meta).await,
        }
    }

    /// While a payment waits for the gateway, ask it and record its answer. Asked again
    /// when the request is redelivered, which is how a crash before the answer heals.
    async fn ask_gateway(
        &self,
        command_id: Uuid,
        id: &str,
        meta: &Meta,
    ) -> Result<(), CommandError> {
        // The payment as this process last committed it (it just did), else stored.
        let payment = match self.cache.get::<Payment>(&stream_key::<Payment>(id)) {
            Some((payment, _, _)) => payment,
            None => self.load::<Payment>(id).await?.0,
        };
        let (Some(PaymentStatus::Requested), Some(token)) =
            (payment.status, payment.token.as_ref())
        else {
            return Ok(());
        };
        let command = match self.gateway.charge(token, payment.amount).await {
            Answer::Approved => PaymentCommand::Authorize,
            Answer::Declined(reason) => PaymentCommand::Decline { reason },
            Answer::NoAnswer => return Ok(()),
        };
        let answer_id = Uuid::new_v5(&command_id, b"gateway-answer");
        let meta = Meta {
            correlation_id: meta.correlation_id,
            causation_id: command_id,
            idempotency: Some(IdempotencyRecord {
                key: format!("cmd:{answer_id}"),
                request_hash: answer_id.to_string(),
                response: Value::Null,
            }),
        };
        match self.execute::<Payment>(id, &command, &meta).await {
            // Voided meanwhile (the deadline passed): the late answer is dropped.
            Err(CommandError::Domain(DomainError::Conflict(_))) => Ok(()),
            other => other.map(|_| ()),
        }
    }
}

/// The envelopes of a command's events: new ids, one time, the command's correlation.
fn new_events<E: Serialize + EventName>(
    events: &[E],
    meta: &Meta,
) -> Result<Vec<NewEvent>, CommandError> {
    let occurred_at = chrono::Utc::now();
    events
        .iter()
        .map(|event| {
            let (event_type, schema_version, payload) = schemas::encode(event)?;
            Ok(NewEvent {
                event_id: Uuid::now_v7(),
                event_type,
                schema_version,
                payload,
                occurred_at,
                correlation_id: meta.correlation_id,
                causation_id: meta.causation_id,
            })
        })
        .collect()
}

/// The sku in a path, parsed.
pub fn parse_sku(raw: &str) -> Result<Sku, ApiError> {
    Sku::parse(raw).map_err(|e| ApiError::invalid(e.to_string()))
}
