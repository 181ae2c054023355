//! Orderline wired together: one process serving every service on embedded storage.
//!
//! [`System::start`] opens the event log and the service databases under the data
//! directory and starts the projection runners and the saga runner; [`router`] is the
//! whole public HTTP API; [`serve`] runs it until a shutdown signal, then stops every
//! task cleanly. `main.rs` is the command line over these.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use command_handlers::saga::SagaRunner;
use command_handlers::Handlers;
use infra::db::Db;
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

/// Everything one embedded process runs.
pub struct System {
    pub config: Config,
    pub store: EventStore,
    pub handlers: Handlers,
    pub projections: Projections,
    pub queries: QueryState,
    pub metrics: Metrics,
    trigger: Trigger,
    shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
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
        Ok(System {
            config,
            store,
            handlers,
            projections,
            queries,
            metrics,
            trigger,
            shutdown,
            tasks,
        })
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

/// The whole public API (see API.md).
pub fn router(system: &System) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route(
            "/metrics",
            get(metrics).with_state(system.projections.clone()),
        )
        .merge(command_handlers::routes::router(system.handlers.clone()))
        .merge(query_api::router(system.queries.clone()))
        .merge(projectors::admin::router(system.projections.clone()))
        .fallback(infra::http::not_found_fallback)
        .layer(DefaultBodyLimit::max(infra::http::MAX_BODY_BYTES))
}

async fn metrics(State(all): State<Projections>) -> impl IntoResponse {
    let mut lag = vec![];
    let mut checkpoint = vec![];
    if let Ok(views) = projectors::admin::views(&all).await {
        for view in views {
            let labels = format!("projection=\"{}\"", view.name);
            lag.push((labels.clone(), view.lag));
            checkpoint.push((labels, view.checkpoint));
        }
    }
    let head = vec![(String::new(), all.store.head())];
    let body = all.metrics.render(&[
        Gauge {
            name: "orderline_projection_lag",
            help: "Events in the log not yet applied by the projection.",
            samples: lag,
        },
        Gauge {
            name: "orderline_projection_checkpoint",
            help: "The last log position the projection has passed.",
            samples: checkpoint,
        },
        Gauge {
            name: "orderline_log_head",
            help: "The position of the last event in the log.",
            samples: head,
        },
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Serve until `stop` resolves, then drain requests and stop every task.
pub async fn serve(
    listener: TcpListener,
    system: System,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = router(&system);
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
