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

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use command_handlers::app::TokenStyle;
use command_handlers::saga::SagaRunner;
use command_handlers::Handlers;
use infra::db::Db;
use infra::kafka::{ensure_topics, KafkaConsumer, OffsetStore, Relay};
use infra::metrics::{Gauge, Metrics};
use infra::progress::Progress;
use infra::shutdown::{self, Shutdown, Trigger};
use infra::{Config, EventStore};
use projectors::projection::ALL;
use projectors::Projections;
use query_api::QueryState;
use serde_json::json;
use std::future::Future;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The services and the database each one owns.
pub const SERVICES: [&str; 4] = ["order", "inventory", "payment", "shipping"];

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
}

/// What `/metrics` and `/health` report on besides the counters.
#[derive(Clone)]
struct Watched {
    projections: Projections,
    relay: bool,
    saga: Option<Db>,
    inbox: Option<(KafkaConsumer, String)>,
    /// Every consumer-group member of the process: ready once all have joined.
    members: Vec<KafkaConsumer>,
}

/// The log and every service's database, open.
pub struct Storage {
    pub store: EventStore,
    pub projections: Projections,
    services: Vec<(&'static str, Db)>,
}

impl Storage {
    /// Open (creating what is missing) the log and the service databases: SQLite
    /// files under `config.data_dir`, or PostgreSQL databases when configured.
    pub async fn open(config: &Config) -> anyhow::Result<Storage> {
        if config.postgres.is_none() {
            std::fs::create_dir_all(&config.data_dir)?;
        }
        let store = EventStore::with_db(Db::open(&config.database_url("events"), 8).await?).await?;
        let mut services = vec![];
        for service in SERVICES {
            services.push((service, Db::open(&config.database_url(service), 8).await?));
        }
        let mut databases = vec![];
        for projection in ALL {
            databases.push((projection, service_db(&services, projection.service())?));
        }
        let projections = Projections::open(
            store.clone(),
            Progress::default(),
            Metrics::default(),
            &databases,
            None,
        )
        .await?;
        Ok(Storage {
            store,
            projections,
            services,
        })
    }

    /// The projections of the distributed deployment, for tools (replay, listing):
    /// each in its service's database, fed from Kafka, without joining any group.
    pub async fn open_distributed(config: &Config) -> anyhow::Result<Storage> {
        let kafka = config
            .kafka
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the distributed deployment needs Kafka brokers"))?;
        let mut services = vec![];
        for service in SERVICES {
            services.push((service, Db::open(&config.database_url(service), 4).await?));
        }
        let store = EventStore::with_db(service_db(&services, "order")?).await?;
        let mut databases = vec![];
        for projection in ALL {
            databases.push((projection, service_db(&services, projection.service())?));
        }
        let projections = Projections::open(
            store.clone(),
            Progress::default(),
            Metrics::default(),
            &databases,
            Some(&kafka),
        )
        .await?;
        Ok(Storage {
            store,
            projections,
            services,
        })
    }

    /// The database of one service.
    pub fn db(&self, service: &str) -> anyhow::Result<Db> {
        service_db(&self.services, service)
    }
}

fn service_db(services: &[(&'static str, Db)], service: &str) -> anyhow::Result<Db> {
    services
        .iter()
        .find(|(s, _)| *s == service)
        .map(|(_, db)| db.clone())
        .ok_or_else(|| anyhow::anyhow!("no database for service {service}"))
}

impl System {
    pub async fn start(config: Config) -> anyhow::Result<System> {
        let storage = Storage::open(&config).await?;
        let store = storage.store.clone();
        let projections = storage.projections.clone();
        let metrics = projections.metrics.clone();
        let handlers = Handlers::new(store.clone(), metrics.clone());
        let queries = QueryState {
            store: store.clone(),
            progress: projections.progress.clone(),
            orders: Some(storage.db("order")?.pool),
            inventory: Some(storage.db("inventory")?.pool),
            payments: Some(storage.db("payment")?.pool),
            shipments: Some(storage.db("shipping")?.pool),
        };
        let (trigger, shutdown) = shutdown::channel();
        let mut tasks = projections.spawn_all(&shutdown);
        let saga = SagaRunner::new(
            handlers.clone(),
            storage.db("order")?,
            config.payment_timeout,
        )
        .await?;
        tasks.push(tokio::spawn(saga.run(shutdown.clone())));
        let watched = Watched {
            projections: projections.clone(),
            relay: false,
            saga: Some(storage.db("order")?),
            inbox: None,
            members: vec![],
        };
        let router = api(
            command_handlers::routes::router(handlers.clone()),
            &queries,
            watched,
        );
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
        })
    }

    /// One service of the distributed deployment: its database (PostgreSQL, or an
    /// SQLite file) and Kafka.
    pub async fn start_service(config: Config, service: &str) -> anyhow::Result<System> {
        let Some(service) = SERVICES.iter().copied().find(|s| *s == service) else {
            anyhow::bail!(
                "no service named {service:?}; the services are {}",
                SERVICES.join(", ")
            );
        };
        let kafka = config.kafka.clone().ok_or_else(|| {
            anyhow::anyhow!("a service process needs Kafka brokers (--kafka-brokers)")
        })?;
        if config.postgres.is_none() {
            std::fs::create_dir_all(&config.data_dir)?;
        }
        let db = Db::open(&config.database_url(service), 16).await?;
        let store = EventStore::with_db(db.clone()).await?;
        let mut topics = kafka.event_topics();
        topics.extend(SERVICES.iter().map(|s| kafka.commands_topic(s)));
        ensure_topics(&kafka, &topics).await?;

        let metrics = Metrics::default();
        let mut handlers = Handlers::new(store.clone(), metrics.clone());
        handlers.tokens = TokenStyle::Stream;
        let owned: Vec<_> = ALL
            .into_iter()
            .filter(|p| p.service() == service)
            .map(|p| (p, db.clone()))
            .collect();
        let projections = Projections::open(
            store.clone(),
            Progress::default(),
            metrics.clone(),
            &owned,
            Some(&kafka),
        )
        .await?;
        let serves = |s: &str| (service == s).then(|| db.pool.clone());
        let queries = QueryState {
            store: store.clone(),
            progress: projections.progress.clone(),
            orders: serves("order"),
            inventory: serves("inventory"),
            payments: serves("payment"),
            shipments: serves("shipping"),
        };

        let (trigger, shutdown) = shutdown::channel();
        let mut tasks = projections.spawn_all(&shutdown);
        let relay = Relay::new(store.clone(), &kafka, RELAY)?;
        tasks.push(tokio::spawn(relay.run(shutdown.clone())));
        let inbox_topic = kafka.commands_topic(service);
        let inbox = KafkaConsumer::subscribe(
            &kafka,
            &format!("{}.commands.{service}", kafka.prefix),
            std::slice::from_ref(&inbox_topic),
            OffsetStore::new(&db, "commands"),
        )?;
        tasks.push(tokio::spawn(command_handlers::inbox::run(
            handlers.clone(),
            inbox.clone(),
            db.clone(),
            shutdown.clone(),
        )));
        let mut members: Vec<KafkaConsumer> = projections
            .handles
            .iter()
            .filter_map(|h| match &h.feed {
                projectors::runner::Feed::Kafka { consumer, .. } => Some(consumer.clone()),
                projectors::runner::Feed::Log => None,
            })
            .collect();
        members.push(inbox.clone());
        let mut saga_db = None;
        if service == "order" {
            let saga = SagaRunner::new(handlers.clone(), db.clone(), config.payment_timeout)
                .await?
                .with_kafka(&kafka)
                .await?;
            members.extend(saga.kafka_consumer());
            tasks.push(tokio::spawn(saga.run(shutdown.clone())));
            saga_db = Some(db.clone());
        }
        let commands = match service {
            "order" => command_handlers::routes::orders_router(handlers.clone()),
            "inventory" => command_handlers::routes::inventory_router(handlers.clone()),
            _ => Router::new(),
        };
        let watched = Watched {
            projections: projections.clone(),
            relay: true,
            saga: saga_db,
            inbox: Some((inbox, inbox_topic)),
            members,
        };
        let router = api(commands, &queries, watched);
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

/// A process's API: its commands, its queries, the operator routes.
fn api(commands: Router, queries: &QueryState, watched: Watched) -> Router {
    Router::new()
        .route("/health", get(health).with_state(watched.clone()))
        .route("/metrics", get(metrics).with_state(watched.clone()))
        .merge(commands)
        .merge(query_api::router(queries.clone()))
        .merge(projectors::admin::router(watched.projections))
        .fallback(infra::http::not_found_fallback)
        .layer(DefaultBodyLimit::max(infra::http::MAX_BODY_BYTES))
}

/// 200 once every consumer-group member has joined its group (at once when
/// embedded); 503 while the process is still starting.
async fn health(State(watched): State<Watched>) -> impl IntoResponse {
    if watched.members.iter().all(KafkaConsumer::has_joined) {
        (StatusCode::OK, Json(json!({ "status": "ok" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "starting" })),
        )
    }
}

async fn metrics(State(watched): State<Watched>) -> impl IntoResponse {
    let all = &watched.projections;
    let mut lag = vec![];
    let mut checkpoint = vec![];
    if let Ok(views) = projectors::admin::views(all).await {
        for view in views {
            let labels = format!("projection=\"{}\"", view.name);
            lag.push((labels.clone(), view.lag));
            checkpoint.push((labels, view.checkpoint));
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
    if let Some(db) = &watched.saga {
        let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM saga_outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(0);
        gauges.push(Gauge {
            name: "orderline_saga_pending_commands",
            help: "Saga commands staged and not yet carried out (or handed to the brokers).",
            samples: vec![(String::new(), pending)],
        });
    }
    if let Some((inbox, topic)) = &watched.inbox {
        if let Ok((_, lag)) = inbox.progress(std::slice::from_ref(topic)).await {
            gauges.push(Gauge {
                name: "orderline_command_inbox_lag",
                help: "Commands on this service's command topic not yet carried out.",
                samples: vec![(String::new(), lag)],
            });
        }
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
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = stop => {}
                _ = internal.wait() => {}
            }
        })
        .await?;
    system.stop().await;
    Ok(())
}
