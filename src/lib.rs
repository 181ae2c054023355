//! Orderline wired together, in either deployment.
//!
//! - Embedded ([`System::start`]): one process serves every service on SQLite files
//!   (or PostgreSQL databases); the event table is the log.
//! - Distributed ([`System::start_service`]): one process per service, each with its
//!   own database (event store, outbox, read models, offsets, saga state) and a relay
//!   that publishes its events to Kafka; projections and the saga read Kafka, and the
//!   saga's commands travel over command topics. [`gateway`] puts the public API on
//!   one port in front of them.
//!
//! [`System::router`] is the API a process serves; [`serve`] runs it until a shutdown
//! signal, then stops every task cleanly. `main.rs` is the command line over these.

pub mod gateway;
pub mod openapi;
pub mod runtime;

/// The allocator of every binary that links this crate (the server, its benchmarks and
/// tests): the system allocator spent about a fifth of the CPU of a loaded server
/// consolidating and splitting its free lists. Built without transparent huge pages
/// (the workspace's `no_thp`): with them the kernel zeroed a 2 MiB page each time the
/// allocator took back memory it had returned.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};

use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::response::Response;
use axum::{Json, Router};
use command_handlers::app::{Backlog, TokenStyle};
use command_handlers::cart::Checkout;
use command_handlers::inbox::Inbox;
use command_handlers::notify::{Channel, Notifier};
use command_handlers::saga::{Dispatch, SagaRunner};
use command_handlers::Handlers;
use infra::auth::{Gate, Keys};
use infra::consume::{drive, Source, Transport};
use infra::db::Db;
use infra::http::ApiError;
use infra::kafka::Relay;
use infra::metrics::{Gauge, Metrics, REQUEST_SECONDS};
use infra::progress::Progress;
use infra::retention::Retention;
use infra::serve::Limits;
use infra::shutdown::{self, Shutdown, Trigger};
use infra::{Config, EventStore};
use projectors::Projections;
use query_api::QueryState;
use schemas::topics::Service;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use utoipa_axum::router::OpenApiRouter;

/// The name of each service's relay (its published position is kept under it).
const RELAY: &str = "kafka";

/// Everything one process runs.
pub struct System {
    pub config: Config,
    pub store: EventStore,
    pub handlers: Handlers,
    pub projections: Projections,
    pub queries: QueryState,
    pub metrics: Metrics,
    router: Router,
    trigger: Trigger,
    shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
    /// Where the pipeline's tasks run; shut down after they have stopped.
    _pipeline: Pipeline,
}

/// The runtime the pipeline runs on: projections, the saga, the checkout follower,
/// the notifier, retention, the relay and the command inboxes. The API (and the log's
/// writer, which the door's appends and the saga's share) stays on the runtime that
/// started the system. Two reasons: a request's task never waits in a worker's queue
/// behind a batch of the pipeline's, and the pipeline's threads run at a lower
/// priority ([`BACKGROUND_NICE`]), so under load the kernel hands a core to the door
/// first. The pipeline loses little by it: the door's work per order is a fraction of
/// the pipeline's, and admission control bounds how much of it there is.
///
/// Held ([`Config::hold_pipeline`]), none of its tasks run: the process is the door
/// alone.
struct Pipeline {
    runtime: runtime::Apart,
    held: bool,
}

impl Pipeline {
    fn start(config: &Config) -> std::io::Result<Pipeline> {
        Ok(Pipeline {
            runtime: runtime::Apart::start("orderline-pipeline", BACKGROUND_NICE)?,
            held: config.hold_pipeline,
        })
    }

    /// Run `task` on the pipeline's runtime (when held, drop it unstarted).
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
        if self.held {
            drop(task);
            return self.runtime.spawn(async {});
        }
        self.runtime.spawn(task)
    }
}

/// How much lower the pipeline's threads run than the API's (a nice increment: a
/// thread at +5 gets about a third of the processor a thread at 0 gets when both want
/// it).
const BACKGROUND_NICE: i32 = 5;

/// What `/metrics` and `/health` report on besides the counters.
#[derive(Clone)]
struct Watched {
    projections: Projections,
    relay: bool,
    /// The saga's database and the source it reads events from.
    saga: Option<(Db, Arc<dyn Source>)>,
    inbox: Option<Arc<dyn Source>>,
    /// Every source of the process: ready once each has been given its partitions.
    sources: Vec<Arc<dyn Source>>,
    /// The door's backlog (the order service's).
    backlog: Option<Backlog>,
}

impl Watched {
    fn new(projections: &Projections) -> Watched {
        Watched {
            projections: projections.clone(),
            relay: false,
            saga: None,
            inbox: None,
            backlog: None,
            sources: projections
                .handles
                .iter()
                .map(|h| h.source.clone())
                .collect(),
        }
    }
}

/// The event store and the databases of the services a process runs, open.
pub struct Storage {
    pub store: EventStore,
    pub projections: Projections,
    services: Vec<(Service, Db)>,
}

impl Storage {
    /// Open (creating what is missing) the log and the service databases: SQLite
    /// files under `config.data_dir`, or PostgreSQL databases when configured.
    pub async fn open(config: &Config) -> anyhow::Result<Storage> {
        if config.postgres.is_none() {
            std::fs::create_dir_all(&config.data_dir)?;
        }
        let store = EventStore::with_db(Db::open(&config.database_url("events"), 8).await?).await?;
        let transport = Transport::InProcess(store.clone());
        let services = open_services(config, Service::ALL, 8).await?;
        Storage::with_services(store, services, &transport).await
    }

    /// The projections of the distributed deployment, for tools (replay, listing):
    /// each in its service's database, fed from Kafka, without joining any group.
    pub async fn open_distributed(config: &Config) -> anyhow::Result<Storage> {
        let kafka = config
            .kafka
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the distributed deployment needs Kafka brokers"))?;
        let services = open_services(config, Service::ALL, 4).await?;
        let order = services
            .iter()
            .find(|(s, _)| *s == Service::Order)
            .map(|(_, db)| db.clone())
            .ok_or_else(|| anyhow::anyhow!("no order database"))?;
        let store = EventStore::with_db(order).await?;
        Storage::with_services(store, services, &Transport::Kafka(kafka)).await
    }

    /// The projections of the services' open databases on `transport`.
    async fn with_services(
        store: EventStore,
        opened: Vec<(Service, Db)>,
        transport: &Transport,
    ) -> anyhow::Result<Storage> {
        let databases: Vec<_> = opened
            .iter()
            .flat_map(|(service, db)| service.projections().map(|p| (p, db.clone())))
            .collect();
        let projections = Projections::open(
            store.clone(),
            Progress::default(),
            store.metrics().clone(),
            &databases,
            transport,
        )
        .await?;
        Ok(Storage {
            store,
            projections,
            services: opened,
        })
    }

    /// The query API over the read models of these services.
    fn queries(&self) -> QueryState {
        let pool = |service: Service| self.db(service).map(|db| db.pool);
        let file = |service: Service| self.db(service).and_then(|db| db.sqlite_file());
        QueryState {
            store: self.store.clone(),
            progress: self.projections.progress.clone(),
            orders: pool(Service::Order),
            inventory: pool(Service::Inventory),
            payments: pool(Service::Payment),
            shipments: pool(Service::Shipping),
            customers: pool(Service::Customer),
            catalog: pool(Service::Catalog),
            cart: pool(Service::Cart),
            notifications: pool(Service::Notification),
            stream_reads: QueryState::stream_reads(),
            files: query_api::Files {
                orders: file(Service::Order),
                inventory: file(Service::Inventory),
                payments: file(Service::Payment),
                shipments: file(Service::Shipping),
                customers: file(Service::Customer),
                catalog: file(Service::Catalog),
                cart: file(Service::Cart),
            },
        }
    }

    /// The database of one service, if this storage holds it.
    pub fn db(&self, service: Service) -> Option<Db> {
        self.services
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, db)| db.clone())
    }
}

/// The databases of `services`, opened (created when missing).
async fn open_services(
    config: &Config,
    services: &[Service],
    connections: u32,
) -> anyhow::Result<Vec<(Service, Db)>> {
    let mut opened = vec![];
    for service in services {
        let db = Db::open(&config.database_url(service.as_str()), connections).await?;
        opened.push((*service, db));
    }
    Ok(opened)
}

impl System {
    /// Every service in one process, on the embedded log: its event table is the
    /// log every consumer reads, and the saga's commands are function calls.
    pub async fn start(config: Config) -> anyhow::Result<System> {
        let storage = Storage::open(&config).await?;
        let transport = Transport::InProcess(storage.store.clone());
        System::assemble(config, storage, transport).await
    }

    /// One service of the distributed deployment: its database (PostgreSQL, or an
    /// SQLite file) holds its event store, outbox, read models and offsets; Kafka
    /// carries its events and the saga's commands.
    pub async fn start_service(config: Config, service: Service) -> anyhow::Result<System> {
        let kafka = config.kafka.clone().ok_or_else(|| {
            anyhow::anyhow!("a service process needs Kafka brokers (--kafka-brokers)")
        })?;
        if config.postgres.is_none() {
            std::fs::create_dir_all(&config.data_dir)?;
        }
        let db = Db::open(&config.database_url(service.as_str()), 16).await?;
        let store = EventStore::with_db(db.clone()).await?;
        let transport = Transport::Kafka(kafka);
        // One pool for the service's database: its event store and everything else.
        let storage = Storage::with_services(store, vec![(service, db)], &transport).await?;
        System::assemble(config, storage, transport).await
    }

    /// The same wiring for both: the services of `storage`, their consumers on
    /// `transport`, and (on Kafka) each service's relay and command inbox.
    async fn assemble(
        config: Config,
        storage: Storage,
        transport: Transport,
    ) -> anyhow::Result<System> {
        let queries = storage.queries();
        let Storage {
            store,
            mut projections,
            services,
        } = storage;
        let metrics = projections.metrics.clone();
        let mut handlers = Handlers::new(store.clone(), metrics.clone());
        let gate = gate(&config, &services, &mut handlers)?;
        handlers.backlog.bound = (config.max_backlog > 0).then_some(config.max_backlog);
        handlers.backlog.refusal_delay = config.refusal_delay;
        let database = |wanted: Service| {
            services
                .iter()
                .find(|(s, _)| *s == wanted)
                .map(|(_, db)| db.clone())
        };
        // The copy of the catalog's prices orders are checked against (the order
        // service's), or carts priced by (the cart service's).
        handlers.prices = database(Service::Order).or_else(|| database(Service::Cart));
        handlers.places_orders = database(Service::Order).is_some();
        if transport.kafka().is_some() {
            handlers.tokens = TokenStyle::Stream;
            projections.progress.issue_stream_tokens();
        }
        let (trigger, shutdown) = shutdown::channel();
        let pipeline = Pipeline::start(&config)?;
        projections.runtime = Some(pipeline.runtime.handle().clone());
        let mut tasks = match pipeline.held {
            true => vec![],
            false => projections.spawn_all(&shutdown),
        };
        tasks.push(pipeline.spawn(retain(store.clone(), config.retention, shutdown.clone())));
        let mut watched = Watched::new(&projections);
        if let Some((_, order)) = services.iter().find(|(s, _)| *s == Service::Order) {
            let saga = Arc::new(
                SagaRunner::new(
                    handlers.clone(),
                    order.clone(),
                    config.payment_timeout,
                    Dispatch::over(&transport)?,
                )?
                .with_retention(config.retention),
            );
            saga.count_backlog().await?;
            let source = SagaRunner::source(&transport, order).await?;
            watched.sources.push(source.clone());
            watched.saga = Some((order.clone(), source.clone()));
            watched.backlog = Some(handlers.backlog.clone());
            let dispatcher = saga.clone();
            let stop = shutdown.clone();
            tasks.push(pipeline.spawn(async move { dispatcher.dispatch_until(stop).await }));
            tasks.push(pipeline.spawn(drive(source, saga, shutdown.clone())));
            // The order service places the orders of checked-out carts.
            let checkout = Checkout::new(handlers.clone(), order);
            let source = Checkout::source(&transport, order).await?;
            watched.sources.push(source.clone());
            tasks.push(pipeline.spawn(drive(source, checkout, shutdown.clone())));
        }
        if let Some(db) = database(Service::Notification) {
            let channel = match &config.notifier {
                infra::config::Notifier::File => {
                    Channel::File(config.data_dir.join("notifications.jsonl"))
                }
                infra::config::Notifier::Log => Channel::Log,
                infra::config::Notifier::Smtp { url, from } => Channel::Smtp {
                    url: url.clone(),
                    from: from.clone(),
                },
            };
            let notifier = Arc::new(Notifier::new(&handlers, &db, &channel).await?);
            let source = Notifier::source(&transport, &db).await?;
            watched.sources.push(source.clone());
            tasks.push(pipeline.spawn(drive(source, notifier.clone(), shutdown.clone())));
            let stop = shutdown.clone();
            tasks.push(pipeline.spawn(async move { notifier.dispatch_until(stop).await }));
        }
        if let Some(kafka) = transport.kafka() {
            // A service process publishes its own log and hears the saga's commands.
            // It creates the topics first, retrying while the broker does not answer;
            // consumers start reading once their topics have partitions.
            let mut topics = kafka.event_topics();
            topics.extend(
                Service::SAGA_PARTICIPANTS
                    .iter()
                    .map(|s| kafka.commands_topic(*s)),
            );
            let relay = Relay::new(store.clone(), kafka, RELAY)?.creating(topics);
            tasks.push(pipeline.spawn(relay.run(shutdown.clone())));
            watched.relay = true;
            // Only the saga's participants hear commands.
            let participants = services.iter().filter(|(s, _)| s.takes_saga_commands());
            for (service, db) in participants {
                let (source, task) =
                    inbox(&transport, *service, db, &handlers, &shutdown, &pipeline)?;
                watched.sources.push(source.clone());
                watched.inbox = Some(source);
                tasks.push(task);
            }
        }
        let commands = services
            .iter()
            .fold(OpenApiRouter::new(), |router, (service, _)| {
                router.merge(command_handlers::routes::service_routes(*service))
            })
            .with_state(handlers.clone());
        let router = api(commands, &queries, watched, gate, &config.limits);
        Ok(System {
            config,
            store,
            handlers,
            projections,
            queries,
            metrics,
            router,
            trigger,
            shutdown,
            tasks,
            _pipeline: pipeline,
        })
    }

    /// The API this process serves.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Ask every task to stop, and wait until they have committed and exited.
    pub async fn stop(self) {
        self.trigger.fire();
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(error = %error, "a task ended abnormally");
            }
        }
    }

    pub fn shutdown_signal(&self) -> Shutdown {
        self.shutdown.clone()
    }
}

/// Retention over the event store's database (idempotency records, snapshots that
/// no longer read), a pass every interval until shutdown.
async fn retain(store: EventStore, retention: Retention, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(retention.interval) => {}
        }
        let pass = infra::retention::prune_store(
            &store,
            &retention,
            chrono::Utc::now(),
            &command_handlers::app::snapshot_readable,
        )
        .await;
        match pass {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, "retention: bookkeeping past its time removed"),
            Err(error) => {
                tracing::warn!(error = %error, "retention pass failed; it runs again next interval")
            }
        }
    }
}

/// A service's command inbox (distributed): its source and its running task.
fn inbox(
    transport: &Transport,
    service: Service,
    db: &Db,
    handlers: &Handlers,
    shutdown: &Shutdown,
    pipeline: &Pipeline,
) -> anyhow::Result<(Arc<dyn Source>, JoinHandle<()>)> {
    let source: Arc<dyn Source> = Arc::new(Inbox::source(transport, service, db)?);
    let inbox = Inbox::new(handlers.clone(), db);
    let task = pipeline.spawn(drive(source.clone(), inbox, shutdown.clone()));
    Ok((source, task))
}

/// Who may call what: the keys (loaded, or created in the data directory), the rate
/// limit, and (where the process keeps logins) the check that a login is live.
fn gate(
    config: &Config,
    services: &[(Service, Db)],
    handlers: &mut Handlers,
) -> anyhow::Result<Gate> {
    if !config.auth.enabled {
        tracing::warn!(
            "auth is off: every route is open to anyone (the v1 contract); never run this way in production"
        );
        return Ok(Gate::new(&config.auth, handlers.keys.clone()));
    }
    let keys = Keys::load(&config.auth, &config.data_dir)?;
    handlers.keys = keys.clone();
    let mut gate = Gate::new(&config.auth, keys);
    if services.iter().any(|(s, _)| *s == Service::Customer) {
        gate.sessions = Some(Arc::new(handlers.clone()));
    }
    Ok(gate)
}

/// A process's API: its commands, its queries, the operator routes.
fn api(
    commands: OpenApiRouter,
    queries: &QueryState,
    watched: Watched,
    gate: Gate,
    limits: &Limits,
) -> Router {
    let timing = middleware::from_fn_with_state(watched.projections.metrics.clone(), timed);
    let authenticated = middleware::from_fn_with_state(gate, infra::auth::authenticate);
    let mut document = openapi::base();
    let (limited, served) = OpenApiRouter::new()
        .merge(commands)
        .merge(query_api::router(queries.clone()))
        .merge(projectors::admin::routes().with_state(watched.projections.clone()))
        .split_for_parts();
    document.merge(served);
    // Operators' /health and /metrics stay outside the cap on requests in progress.
    let (operators, described) = openapi::operator_routes()
        .with_state(watched)
        .split_for_parts();
    document.merge(described);
    limits
        .apply(limited.route_layer(authenticated))
        .merge(operators)
        .merge(openapi::serving(document))
        .route_layer(timing)
        .fallback(infra::http::not_found_fallback)
        .layer(DefaultBodyLimit::max(infra::http::MAX_BODY_BYTES))
        .layer(middleware::from_fn(infra::http::problem_json))
}

/// Count each request's duration by route, method and status.
async fn timed(
    State(metrics): State<Metrics>,
    route: MatchedPath,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics.observe(
        &REQUEST_SECONDS,
        &[
            ("route", route.as_str()),
            ("method", method.as_str()),
            ("status", response.status().as_str()),
        ],
        started.elapsed().as_secs_f64(),
    );
    response
}

/// 200 once every Kafka consumer has been given its partitions (at once when
/// embedded); 503 while the process is still starting.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operators",
    responses(
        (status = 200, description = "Serving", body = schemas::http::Health),
        (status = 503, description = "Still starting", body = schemas::http::Health)
    )
)]
async fn health(State(watched): State<Watched>) -> impl IntoResponse {
    if watched.sources.iter().all(|source| source.ready()) {
        (StatusCode::OK, Json(json!({ "status": "ok" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "starting" })),
        )
    }
}

/// How long one scrape of /metrics may wait for what needs the brokers.
const SCRAPE_BUDGET: Duration = Duration::from_secs(5);

/// Counters, histograms and gauges in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operators",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain", body = String))
)]
async fn metrics(State(watched): State<Watched>) -> impl IntoResponse {
    let all = &watched.projections;
    let mut lag = vec![];
    let mut checkpoint = vec![];
    // What needs the brokers (distributed) is bounded, so a slow broker cannot hold
    // a scrape: what did not answer in time is left out.
    let scrape = tokio::time::Instant::now() + SCRAPE_BUDGET;
    // Asked side by side, each within the whole budget.
    let standing = |source: Option<Arc<dyn Source>>| async move {
        let source = source?;
        tokio::time::timeout_at(scrape, source.standing())
            .await
            .ok()?
            .ok()
    };
    let (views, saga_standing, inbox_standing) = tokio::join!(
        async {
            tokio::time::timeout_at(scrape, projectors::admin::views(all))
                .await
                .unwrap_or_else(|_| Err(ApiError::busy("no answer in time")))
        },
        standing(watched.saga.as_ref().map(|(_, source)| source.clone())),
        standing(watched.inbox.clone()),
    );
    match views {
        Ok(views) => {
            for view in views {
                let labels = format!("projection=\"{}\"", view.name);
                lag.push((labels.clone(), view.lag));
                checkpoint.push((labels, view.checkpoint));
            }
        }
        // The lag is left out (a scraper sees it missing, not a false 0); where each
        // projection stands is read from its own database.
        Err(error) => {
            tracing::warn!(error = %error.detail, "projection lag unavailable for /metrics");
            for handle in &all.handles {
                if let Ok(at) = handle.source.checkpoint().await {
                    let labels = format!("projection=\"{}\"", handle.projection.as_str());
                    checkpoint.push((labels, at));
                }
            }
        }
    }
    let head = all.store.head();
    let mut gauges = vec![
        Gauge {
            name: "orderline_projection_lag",
            help: "Events not yet applied by the projection.",
            samples: lag,
        },
        Gauge {
            name: "orderline_projection_checkpoint",
            help: "Where the projection stands: a log position, or the sum of its offsets.",
            samples: checkpoint,
        },
        Gauge {
            name: "orderline_log_head",
            help: "The position of the last event in this process's event store.",
            samples: vec![(String::new(), head)],
        },
    ];
    if watched.relay {
        let published = all.store.relay_position(RELAY).await.unwrap_or(0);
        gauges.push(Gauge {
            name: "orderline_relay_lag",
            help: "Events appended but not yet acknowledged by the brokers.",
            samples: vec![(String::new(), head - published)],
        });
    }
    if let Some((db, _)) = &watched.saga {
        let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM saga_outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(0);
        gauges.push(Gauge {
            name: "orderline_saga_pending_commands",
            help: "Saga commands staged and not yet carried out (or handed to the brokers).",
            samples: vec![(String::new(), pending)],
        });
        // Left out (not a false 0) when it cannot be read in time.
        if let Some((_, lag)) = saga_standing {
            gauges.push(Gauge {
                name: "orderline_saga_lag",
                help: "Events the saga has not yet taken in (behind after a failure, or busy).",
                samples: vec![(String::new(), lag)],
            });
        }
    }
    if let Some(backlog) = &watched.backlog {
        let bound = backlog
            .bound
            .map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX));
        gauges.push(Gauge {
            name: "orderline_fulfilment_backlog",
            help: "Orders accepted and not yet confirmed or cancelled.",
            samples: vec![(String::new(), backlog.in_flight() as i64)],
        });
        gauges.push(Gauge {
            name: "orderline_fulfilment_backlog_bound",
            help: "Orders in progress past which new ones are refused with 503 (0: no bound).",
            samples: vec![(String::new(), bound)],
        });
    }
    // Left out (not a false 0) when it cannot be read in time, or there is no inbox.
    if let Some((_, lag)) = inbox_standing {
        gauges.push(Gauge {
            name: "orderline_command_inbox_lag",
            help: "Commands on this service's command topic not yet carried out.",
            samples: vec![(String::new(), lag)],
        });
    }
    let body = all.metrics.render(&gauges);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Serve until `stop` resolves, then drain requests and stop every task.
pub async fn serve(
    listener: TcpListener,
    system: System,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = system.router();
    let mut internal = system.shutdown_signal();
    let stop = async move {
        tokio::select! {
            _ = stop => {}
            _ = internal.wait() => {}
        }
    };
    infra::serve::serve(listener, app, system.config.limits, stop).await?;
    system.stop().await;
    Ok(())
}
