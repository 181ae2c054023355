//! The `orderline` command: `serve` (the default), `replay`, `projections`.

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use infra::Config;
use orderline::{serve, Storage, System};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "orderline",
    version,
    about = "Event-sourced commerce backend: orders, inventory, payment, shipping"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every service in one process (the default).
    Serve(ServeArgs),
    /// Rebuild one projection from the log (stop the server first, or use the online
    /// rebuild: POST /v1/projections/{name}/rebuild).
    Replay {
        #[arg(long)]
        projection: String,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Each projection's checkpoint and lag.
    Projections {
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Args, Clone)]
struct DataArgs {
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
        config
    }
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ORDERLINE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    data: DataArgs,
    /// How long the saga waits for the payment gateway before cancelling, in ms.
    #[arg(long, env = "ORDERLINE_PAYMENT_TIMEOUT_MS", default_value_t = 30_000)]
    payment_timeout_ms: u64,
}

fn main() -> anyhow::Result<()> {
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
            Some(Command::Serve(args)) => run_server(args).await,
            Some(Command::Replay { projection, data }) => replay(&projection, data).await,
            Some(Command::Projections { data }) => list_projections(data).await,
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
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let address = listener.local_addr()?;
    let data_dir = config.data_dir.clone();
    let system = System::start(config).await?;
    tracing::info!(data_dir = %data_dir.display(), "orderline listening on http://{address}");
    serve(listener, system, stop_signal()).await?;
    tracing::info!("orderline stopped");
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

async fn replay(name: &str, data: DataArgs) -> anyhow::Result<()> {
    let projections = Storage::open(&data.config()).await?.projections;
    let Some(handle) = projections.get(name).cloned() else {
        let names: Vec<&str> = projectors::projection::ALL
            .iter()
            .map(|p| p.name())
            .collect();
        anyhow::bail!(
            "no projection named {name:?}; the projections are {}",
            names.join(", ")
        );
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
        projections.progress.checkpoint(name)
    );
    Ok(())
}

async fn list_projections(data: DataArgs) -> anyhow::Result<()> {
    let projections = Storage::open(&data.config()).await?.projections;
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
