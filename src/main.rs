//! The `orderline` command: `serve` (the default), `gateway`, `replay`, `projections`.

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use infra::retention::Retention;
use infra::Config;
use orderline::{serve, Storage, System};
use schemas::topics::{ProjectionName, Service};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "orderline",
    version,
    about = "Event-sourced commerce backend: orders, inventory, payment, shipping, customers, catalog, carts, notifications"
)]
struct Cli {
    /// A file of settings, one `ORDERLINE_*=value` line each (the environment
    /// variables of the flags); flags and the environment win over it.
    #[arg(long, global = true, env = "ORDERLINE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every service in one process (the default).
    Serve(Box<ServeArgs>),
    /// Rebuild one projection from the log (stop the server first, or use the online
    /// rebuild: POST /v1/projections/{name}/rebuild).
    Replay {
        /// orders, inventory, payments or shipments.
        #[arg(long)]
        projection: ProjectionName,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Each projection's checkpoint and lag.
    Projections {
        #[command(flatten)]
        data: DataArgs,
    },
    /// The public API on one port in front of the service processes of the
    /// distributed deployment.
    Gateway {
        /// Address to listen on.
        #[arg(
            long,
            env = "ORDERLINE_GATEWAY_LISTEN",
            default_value = "127.0.0.1:8090"
        )]
        listen: SocketAddr,
        /// The order service (http://host:port).
        #[arg(long, env = "ORDERLINE_ORDER_URL")]
        order: String,
        /// The inventory service.
        #[arg(long, env = "ORDERLINE_INVENTORY_URL")]
        inventory: String,
        /// The payment service.
        #[arg(long, env = "ORDERLINE_PAYMENT_URL")]
        payment: String,
        /// The shipping service.
        #[arg(long, env = "ORDERLINE_SHIPPING_URL")]
        shipping: String,
        /// The customer service (registration, logins, profiles).
        #[arg(long, env = "ORDERLINE_CUSTOMER_URL")]
        customer: String,
        /// The catalog service (products, search).
        #[arg(long, env = "ORDERLINE_CATALOG_URL")]
        catalog: String,
        /// The cart service.
        #[arg(long, env = "ORDERLINE_CART_URL")]
        cart: String,
        /// The notification service.
        #[arg(long, env = "ORDERLINE_NOTIFICATION_URL")]
        notification: String,
        /// Requests a second per client (its token, else its address) as RATE or
        /// RATE/BURST, or `off`; past it, 429 with Retry-After. Default 50/100, or
        /// no limit when ORDERLINE_AUTH is `off`. (Behind a gateway, give the
        /// services `--rate-limit off`: they see every client at its address.)
        #[arg(long, env = "ORDERLINE_RATE_LIMIT")]
        rate_limit: Option<String>,
        #[command(flatten)]
        edge: EdgeArgs,
    },
}

/// The HTTP edge's limits (`infra::serve::Limits`).
#[derive(Args, Clone)]
struct EdgeArgs {
    /// Open connections at most; past it new connections wait until one closes.
    #[arg(long, env = "ORDERLINE_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Requests in progress at most; past it a request is answered 503 with
    /// Retry-After (/health and /metrics are not counted).
    #[arg(long, env = "ORDERLINE_MAX_IN_FLIGHT", default_value_t = 512)]
    max_in_flight: usize,
    /// How long a request's head may take, and a connection may stay idle, in ms.
    #[arg(long, env = "ORDERLINE_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// How long a request's body may pause, in ms (then 408).
    #[arg(long, env = "ORDERLINE_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    body_timeout_ms: u64,
    /// How long a whole request may take, consistency waits included, in ms (then 408).
    #[arg(long, env = "ORDERLINE_REQUEST_TIMEOUT_MS", default_value_t = 60_000)]
    request_timeout_ms: u64,
}

impl EdgeArgs {
    fn limits(&self) -> anyhow::Result<infra::serve::Limits> {
        let limits = infra::serve::Limits {
            max_connections: self.max_connections,
            max_in_flight: self.max_in_flight,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
        };
        if limits.max_connections == 0 || limits.max_in_flight == 0 {
            anyhow::bail!("--max-connections and --max-in-flight must be at least 1");
        }
        if [
            limits.header_timeout,
            limits.body_timeout,
            limits.request_timeout,
        ]
        .contains(&Duration::ZERO)
        {
            anyhow::bail!("the timeouts must be at least 1 ms");
        }
        Ok(limits)
    }
}

#[derive(Args, Clone)]
struct KafkaArgs {
    /// Run one service of the distributed deployment (order, inventory, payment,
    /// shipping, customer, catalog, cart, notification) instead of every service
    /// embedded. Needs --kafka-brokers.
    #[arg(long, env = "ORDERLINE_SERVICE")]
    service: Option<Service>,
    /// Partitions of each topic created at start-up.
    #[arg(long, env = "ORDERLINE_KAFKA_PARTITIONS", default_value_t = 3)]
    kafka_partitions: i32,
    /// Replication factor of each topic created at start-up.
    #[arg(long, env = "ORDERLINE_KAFKA_REPLICATION", default_value_t = 1)]
    kafka_replication: i32,
    /// Which partitions this replica of the service reads, as INDEX/COUNT: partition p
    /// of every topic is read by replica p mod COUNT. Each replica of a service needs
    /// its own index; 0/1 (the only replica) reads every partition.
    #[arg(long, env = "ORDERLINE_REPLICA", default_value = "0/1")]
    replica: infra::kafka::Replica,
}

#[derive(Args, Clone)]
struct DataArgs {
    /// The distributed deployment's Kafka bootstrap servers: projections are read
    /// from, and rebuilt from, Kafka (each in its service's database).
    #[arg(long, env = "ORDERLINE_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// The first part of every topic name: <prefix>.<aggregate>.events.
    #[arg(long, env = "ORDERLINE_TOPIC_PREFIX", default_value = "orderline")]
    topic_prefix: String,
    /// Where the log and the service databases live (SQLite files).
    #[arg(long, env = "ORDERLINE_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Keep the log and each service's database on this PostgreSQL server instead
    /// (e.g. postgres://postgres@127.0.0.1:5432); databases are created when missing.
    #[arg(long, env = "ORDERLINE_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// The first part of every PostgreSQL database name.
    #[arg(long, env = "ORDERLINE_DATABASE_PREFIX", default_value = "orderline")]
    database_prefix: String,
}

impl DataArgs {
    fn config(self) -> Config {
        let mut config = Config::with_data_dir(self.data_dir);
        config.postgres = self.postgres_url;
        config.database_prefix = self.database_prefix;
        if let Some(brokers) = self.kafka_brokers {
            let mut kafka = infra::kafka::KafkaConfig::local(brokers);
            kafka.prefix = self.topic_prefix;
            config.kafka = Some(kafka);
        }
        config
    }
}

/// The storage a tool works on: the embedded layout, or the distributed one.
async fn storage(data: DataArgs) -> anyhow::Result<Storage> {
    let config = data.config();
    if config.kafka.is_some() {
        Storage::open_distributed(&config).await
    } else {
        Storage::open(&config).await
    }
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ORDERLINE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    data: DataArgs,
    /// How long the saga waits for the payment gateway before cancelling, in ms
    /// (counted from when the payment service has the request).
    #[arg(long, env = "ORDERLINE_PAYMENT_TIMEOUT_MS", default_value_t = 30_000)]
    payment_timeout_ms: u64,
    /// The most orders in progress (accepted, not yet confirmed or cancelled) before
    /// new orders are refused with 503 and Retry-After; 0 for no bound.
    #[arg(long, env = "ORDERLINE_MAX_BACKLOG", default_value_t = 1_000)]
    max_backlog: u64,
    /// How long a refusal for overload (503) is held before it is answered, in ms:
    /// clients that send again at once cannot make refusals most of the work.
    #[arg(long, env = "ORDERLINE_REFUSAL_DELAY_MS", default_value_t = 100)]
    refusal_delay_ms: u64,
    /// How long clients' idempotency records are kept, in seconds: a retry with the
    /// same Idempotency-Key after that is a new request; 0 keeps them for good.
    #[arg(
        long,
        env = "ORDERLINE_IDEMPOTENCY_RETENTION_SECS",
        default_value_t = 86_400
    )]
    idempotency_retention_secs: u64,
    /// How long a finished saga's state and the records of the saga's commands are
    /// kept, in seconds; 0 keeps them for good.
    #[arg(long, env = "ORDERLINE_SAGA_RETENTION_SECS", default_value_t = 604_800)]
    saga_retention_secs: u64,
    /// Seconds between two retention passes.
    #[arg(long, env = "ORDERLINE_RETENTION_INTERVAL_SECS", default_value_t = 600)]
    retention_interval_secs: u64,
    #[command(flatten)]
    edge: EdgeArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    notifier: NotifierArgs,
}

/// How the notification service sends its messages.
#[derive(Args, Clone)]
struct NotifierArgs {
    /// `file`: JSON lines in <data-dir>/notifications.jsonl; `log`: the server's log;
    /// `smtp`: mail through --smtp-url.
    #[arg(long, env = "ORDERLINE_NOTIFIER", default_value = "file", value_parser = ["file", "log", "smtp"])]
    notifier: String,
    /// The SMTP server for --notifier smtp: smtp://host[:port] (plain SMTP, as to a
    /// relay in the deployment's own network).
    #[arg(long, env = "ORDERLINE_SMTP_URL")]
    smtp_url: Option<String>,
    /// The sender of the mails.
    #[arg(
        long,
        env = "ORDERLINE_SMTP_FROM",
        default_value = "Orderline <orderline@localhost>"
    )]
    smtp_from: String,
}

impl NotifierArgs {
    fn notifier(self) -> anyhow::Result<infra::config::Notifier> {
        Ok(match self.notifier.as_str() {
            "log" => infra::config::Notifier::Log,
            "smtp" => infra::config::Notifier::Smtp {
                url: self
                    .smtp_url
                    .ok_or_else(|| anyhow::anyhow!("--notifier smtp needs --smtp-url"))?,
                from: self.smtp_from,
            },
            _ => infra::config::Notifier::File,
        })
    }
}

/// Who may call what (API.md, "v1.1 additions").
#[derive(Args, Clone)]
struct AuthArgs {
    /// `on`: customers' routes need a customer's access token, operators' routes the
    /// operator token. `off`: the token-free v1 contract, for local experiments only
    /// (a warning is logged), with no rate limit unless --rate-limit is given.
    #[arg(long, env = "ORDERLINE_AUTH", default_value = "on", value_parser = ["on", "off"])]
    auth: String,
    /// A file holding the operator token (at least 32 bytes). Default: the
    /// ORDERLINE_OPERATOR_TOKEN variable, else <data-dir>/operator-token, created
    /// (mode 0600) on first start.
    #[arg(long, env = "ORDERLINE_OPERATOR_TOKEN_FILE")]
    operator_token_file: Option<PathBuf>,
    /// The operator token itself (prefer the file).
    #[arg(
        long = "operator-token",
        env = "ORDERLINE_OPERATOR_TOKEN",
        hide_env_values = true,
        hide = true
    )]
    operator_token: Option<String>,
    /// A file holding the key access tokens are signed with (at least 32 bytes).
    /// Default: the ORDERLINE_SIGNING_KEY variable, else <data-dir>/signing-key,
    /// created (mode 0600) on first start. Every process of a deployment needs the same.
    #[arg(long, env = "ORDERLINE_SIGNING_KEY_FILE")]
    signing_key_file: Option<PathBuf>,
    /// The signing key itself (prefer the file).
    #[arg(
        long = "signing-key",
        env = "ORDERLINE_SIGNING_KEY",
        hide_env_values = true,
        hide = true
    )]
    signing_key: Option<String>,
    /// Requests a second per client (its token's subject, else its address), as
    /// RATE or RATE/BURST, or `off`; past it, 429 with Retry-After. Default 50/100
    /// with auth on, no limit with auth off.
    #[arg(long, env = "ORDERLINE_RATE_LIMIT")]
    rate_limit: Option<String>,
}

impl AuthArgs {
    fn settings(self) -> anyhow::Result<infra::auth::AuthSettings> {
        let enabled = self.auth == "on";
        let rate_limit = rate_limit_of(self.rate_limit.as_deref(), enabled)?;
        Ok(infra::auth::AuthSettings {
            enabled,
            operator_token: infra::auth::SecretSource {
                value: self.operator_token,
                file: self.operator_token_file,
            },
            signing_key: infra::auth::SecretSource {
                value: self.signing_key,
                file: self.signing_key_file,
            },
            rate_limit,
        })
    }
}

/// `--rate-limit`: RATE/BURST, `off`, or when not given the default if `on_by_default`.
fn rate_limit_of(
    given: Option<&str>,
    on_by_default: bool,
) -> anyhow::Result<Option<infra::auth::RateLimit>> {
    Ok(match given {
        Some("off") => None,
        Some(limit) => Some(
            limit
                .parse()
                .map_err(|e| anyhow::anyhow!("--rate-limit {e}"))?,
        ),
        None => on_by_default.then(infra::auth::RateLimit::default),
    })
}

/// The settings a `--config` file may hold.
const SETTINGS: [&str; 40] = [
    "ORDERLINE_AUTH",
    "ORDERLINE_OPERATOR_TOKEN_FILE",
    "ORDERLINE_OPERATOR_TOKEN",
    "ORDERLINE_SIGNING_KEY_FILE",
    "ORDERLINE_SIGNING_KEY",
    "ORDERLINE_RATE_LIMIT",
    "ORDERLINE_LISTEN",
    "ORDERLINE_MAX_BACKLOG",
    "ORDERLINE_REFUSAL_DELAY_MS",
    "ORDERLINE_IDEMPOTENCY_RETENTION_SECS",
    "ORDERLINE_SAGA_RETENTION_SECS",
    "ORDERLINE_RETENTION_INTERVAL_SECS",
    "ORDERLINE_DATA_DIR",
    "ORDERLINE_PAYMENT_TIMEOUT_MS",
    "ORDERLINE_POSTGRES_URL",
    "ORDERLINE_DATABASE_PREFIX",
    "ORDERLINE_SERVICE",
    "ORDERLINE_KAFKA_BROKERS",
    "ORDERLINE_KAFKA_PARTITIONS",
    "ORDERLINE_KAFKA_REPLICATION",
    "ORDERLINE_REPLICA",
    "ORDERLINE_TOPIC_PREFIX",
    "ORDERLINE_GATEWAY_LISTEN",
    "ORDERLINE_ORDER_URL",
    "ORDERLINE_INVENTORY_URL",
    "ORDERLINE_PAYMENT_URL",
    "ORDERLINE_SHIPPING_URL",
    "ORDERLINE_CUSTOMER_URL",
    "ORDERLINE_CATALOG_URL",
    "ORDERLINE_CART_URL",
    "ORDERLINE_NOTIFICATION_URL",
    "ORDERLINE_NOTIFIER",
    "ORDERLINE_SMTP_URL",
    "ORDERLINE_SMTP_FROM",
    "ORDERLINE_MAX_CONNECTIONS",
    "ORDERLINE_MAX_IN_FLIGHT",
    "ORDERLINE_HEADER_TIMEOUT_MS",
    "ORDERLINE_BODY_TIMEOUT_MS",
    "ORDERLINE_REQUEST_TIMEOUT_MS",
    "RUST_LOG",
];

/// Read the `--config` file (or `ORDERLINE_CONFIG`) into the environment, where the
/// flags' defaults come from; a variable already set is left as it is.
fn load_config_file() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let named = args.iter().enumerate().find_map(|(i, arg)| {
        if arg == "--config" {
            args.get(i + 1).cloned()
        } else {
            arg.strip_prefix("--config=").map(str::to_owned)
        }
    });
    let Some(path) = named.or_else(|| std::env::var("ORDERLINE_CONFIG").ok()) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read the config file {path}: {e}"))?;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{path}:{}", number + 1);
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{}: expected a line KEY=value", at()))?;
        let key = key.trim();
        if !SETTINGS.contains(&key) {
            anyhow::bail!(
                "{}: unknown setting {key}; the settings are {}",
                at(),
                SETTINGS.join(", ")
            );
        }
        if std::env::var_os(key).is_none() {
            std::env::set_var(key, value.trim().trim_matches('"'));
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    load_config_file()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            None => run_server(cli.serve).await,
            Some(Command::Serve(args)) => run_server(*args).await,
            Some(Command::Replay { projection, data }) => replay(projection, data).await,
            Some(Command::Projections { data }) => list_projections(data).await,
            Some(Command::Gateway {
                listen,
                order,
                inventory,
                payment,
                shipping,
                customer,
                catalog,
                cart,
                notification,
                rate_limit,
                edge,
            }) => {
                let auth_off = std::env::var("ORDERLINE_AUTH").is_ok_and(|v| v == "off");
                let rate_limit = rate_limit_of(rate_limit.as_deref(), !auth_off)?;
                let upstreams = orderline::gateway::Upstreams {
                    services: vec![
                        (Service::Order, order),
                        (Service::Inventory, inventory),
                        (Service::Payment, payment),
                        (Service::Shipping, shipping),
                        (Service::Customer, customer),
                        (Service::Catalog, catalog),
                        (Service::Cart, cart),
                        (Service::Notification, notification),
                    ],
                    rate_limit,
                };
                run_gateway(listen, upstreams, edge.limits()?).await
            }
        }
    })
}

async fn run_server(args: ServeArgs) -> anyhow::Result<()> {
    if args.payment_timeout_ms == 0 {
        anyhow::bail!("--payment-timeout-ms must be at least 1");
    }
    let mut config = args.data.config();
    config.listen = args.listen;
    config.payment_timeout = Duration::from_millis(args.payment_timeout_ms);
    config.max_backlog = args.max_backlog;
    config.refusal_delay = Duration::from_millis(args.refusal_delay_ms);
    config.limits = args.edge.limits()?;
    config.auth = args.auth.settings()?;
    config.notifier = args.notifier.notifier()?;
    if args.retention_interval_secs == 0 {
        anyhow::bail!("--retention-interval-secs must be at least 1");
    }
    let kept = |secs: u64| (secs > 0).then(|| Duration::from_secs(secs));
    config.retention = Retention {
        idempotency: kept(args.idempotency_retention_secs),
        sagas: kept(args.saga_retention_secs),
        interval: Duration::from_secs(args.retention_interval_secs),
    };
    if let Some(kafka) = config.kafka.as_mut() {
        kafka.partitions = args.kafka.kafka_partitions;
        kafka.replication_factor = args.kafka.kafka_replication;
        kafka.replica = args.kafka.replica;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let address = listener.local_addr()?;
    let storage = match &config.postgres {
        Some(_) => format!("postgres databases {}_*", config.database_prefix),
        None => config.data_dir.display().to_string(),
    };
    let (system, what) = match &args.kafka.service {
        None => (System::start(config).await?, "every service".to_owned()),
        Some(service) => (
            System::start_service(config, *service).await?,
            format!("the {service} service"),
        ),
    };
    tracing::info!(storage, serving = %what, "orderline listening on http://{address}");
    serve(listener, system, stop_signal()).await?;
    tracing::info!("orderline stopped");
    Ok(())
}

async fn run_gateway(
    listen: SocketAddr,
    upstreams: orderline::gateway::Upstreams,
    limits: infra::serve::Limits,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let address = listener.local_addr()?;
    let app = orderline::gateway::router(upstreams, &limits)?.layer(
        axum::extract::DefaultBodyLimit::max(infra::http::MAX_BODY_BYTES),
    );
    tracing::info!("orderline gateway listening on http://{address}");
    infra::serve::serve(listener, app, limits, stop_signal()).await?;
    tracing::info!("orderline gateway stopped");
    Ok(())
}

async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

async fn replay(name: ProjectionName, data: DataArgs) -> anyhow::Result<()> {
    let projections = storage(data).await?.projections;
    let Some(handle) = projections.get(name).cloned() else {
        anyhow::bail!("the projection {name} is not in this deployment");
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} events ({per_sec}, {eta} left)",
        )?
        .progress_chars("=> "),
    );
    bar.set_message(format!("replaying {name}"));
    let events = projectors::rebuild::rebuild(&projections, &handle, |p| {
        bar.set_length(p.total);
        bar.set_position(p.processed);
    })
    .await?;
    bar.finish_with_message(format!("replayed {name}"));
    println!(
        "{name}: rebuilt from {events} events; checkpoint {}",
        projections.progress.checkpoint(name.as_str())
    );
    Ok(())
}

async fn list_projections(data: DataArgs) -> anyhow::Result<()> {
    let projections = storage(data).await?.projections;
    println!(
        "{:<12} {:>12} {:>10} {:>13}",
        "PROJECTION", "CHECKPOINT", "LAG", "DEAD LETTERS"
    );
    for view in projectors::admin::views(&projections)
        .await
        .map_err(|e| anyhow::anyhow!(e.detail))?
    {
        println!(
            "{:<12} {:>12} {:>10} {:>13}",
            view.name, view.checkpoint, view.lag, view.dead_letters
        );
    }
    Ok(())
}
