//! A fresh embedded server in the benchmark's process, and what the benchmarks ask
//! it over HTTP.

use orderline::{serve, System};
use serde_json::{json, Value};
use sqlx::Connection;
use std::time::{Duration, Instant};

/// A server under test: embedded in this process (SQLite files in a temporary
/// directory, on a free port), or the distributed deployment (one process per
/// service and the gateway, started by `infra/dev/distributed.sh`).
pub struct Server {
    pub base: String,
    pub client: reqwest::Client,
    running: Running,
}

enum Running {
    Embedded {
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
        /// Dropped after the directory's files are closed (fields drop in order).
        _dir: tempfile::TempDir,
        _runtime: orderline::runtime::Apart,
    },
    Distributed {
        envs: Vec<(&'static str, String)>,
    },
}

/// The gateway's port of the benchmarks' distributed deployment (the services
/// take the next four).
const DISTRIBUTED_PORT: u16 = 18_190;
const DISTRIBUTED_PREFIX: &str = "orderline_bench_distributed";

impl Server {
    /// Start an embedded server whose SKUs `B-0` .. `B-{skus-1}` have plenty of
    /// stock, on a runtime of its own (the load generator's clients run on the
    /// caller's).
    pub async fn start(skus: usize, clients: usize) -> anyhow::Result<Server> {
        Server::embedded(skus, clients, false).await
    }

    /// Start an embedded server whose pipeline is held (nothing is projected, no saga
    /// runs) and whose door has no backlog bound: the door alone, the same code
    /// answering 202 on the same storage, with nothing else wanting the processor.
    pub async fn door_alone(clients: usize) -> anyhow::Result<Server> {
        Server::embedded(0, clients, true).await
    }

    async fn embedded(skus: usize, clients: usize, held: bool) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let mut config = infra::Config::with_data_dir(dir.path());
        // The v1 contract: the load is measured without tokens or rate limits.
        config.auth = infra::auth::AuthSettings::off();
        config.listen = "127.0.0.1:0".parse()?;
        if held {
            config.hold_pipeline = true;
            // Nothing finishes an order: a bound would refuse all but the first.
            config.max_backlog = 0;
        }
        let runtime = super::apart()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (base, task) = runtime
            .spawn(async move {
                let listener = tokio::net::TcpListener::bind(config.listen).await?;
                let base = format!("http://{}", listener.local_addr()?);
                let system = System::start(config).await?;
                let task = tokio::spawn(serve(listener, system, async {
                    let _ = stopped.await;
                }));
                anyhow::Ok((base, task))
            })
            .await??;
        let running = Running::Embedded {
            stop,
            task,
            _dir: dir,
            _runtime: runtime,
        };
        Server::stocked(base, running, skus, clients).await
    }

    /// Start the distributed deployment (the release binary this benchmark was
    /// built with; PostgreSQL databases dropped first; `broker` on empty state),
    /// with the same stock.
    pub async fn distributed(
        broker: &super::services::Broker,
        skus: usize,
        clients: usize,
    ) -> anyhow::Result<Server> {
        let postgres = super::services::postgres()?;
        let mut admin = sqlx::PgConnection::connect(&format!("{postgres}/postgres")).await?;
        for service in schemas::topics::Service::ALL {
            sqlx::Executor::execute(
                &mut admin,
                format!("DROP DATABASE IF EXISTS {DISTRIBUTED_PREFIX}_{service} WITH (FORCE)")
                    .as_str(),
            )
            .await?;
        }
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let run = root.join("target/bench-distributed");
        let _ = std::fs::remove_dir_all(&run);
        let envs = vec![
            ("ORDERLINE_RUN_DIR", run.display().to_string()),
            ("ORDERLINE_BIN", env!("CARGO_BIN_EXE_orderline").to_owned()),
            ("ORDERLINE_POSTGRES_URL", postgres),
            ("ORDERLINE_DATABASE_PREFIX", DISTRIBUTED_PREFIX.to_owned()),
            ("ORDERLINE_KAFKA_BROKERS", broker.address.clone()),
            ("ORDERLINE_BROKER", broker.address.clone()),
            (
                "ORDERLINE_BROKER_DIR",
                root.join("target/bench-broker").display().to_string(),
            ),
            ("ORDERLINE_PORT_BASE", DISTRIBUTED_PORT.to_string()),
            ("ORDERLINE_AUTH", "off".to_owned()),
            // Topics of this deployment's own: its databases start empty, and so
            // must what it reads.
            (
                "ORDERLINE_TOPIC_PREFIX",
                format!("bench-{}", uuid::Uuid::now_v7().simple()),
            ),
        ];
        distributed_sh(&envs, "up")?;
        let base = format!("http://127.0.0.1:{DISTRIBUTED_PORT}");
        Server::stocked(base, Running::Distributed { envs }, skus, clients).await
    }

    async fn stocked(
        base: String,
        running: Running,
        skus: usize,
        clients: usize,
    ) -> anyhow::Result<Server> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(clients)
            .build()?;
        for i in 0..skus {
            let response = client
                .post(format!("{base}/v1/inventory/{}/restock", sku(i, skus)))
                .json(&json!({ "quantity": 1_000_000 }))
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == 202,
                "restock answered {}",
                response.status()
            );
        }
        Ok(Server {
            base,
            client,
            running,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        match self.running {
            Running::Embedded { stop, task, .. } => {
                let _ = stop.send(());
                task.await?
            }
            Running::Distributed { envs } => distributed_sh(&envs, "down"),
        }
    }

    /// The body of an order for one unit of `sku`.
    pub fn order(customer: &str, sku: &str) -> Value {
        json!({
            "customer_id": customer,
            "lines": [{"sku": sku, "quantity": 1, "unit_price_cents": 100}],
            "payment_token": "tok_ok",
        })
    }

    /// Wait until the read model shows all `accepted` orders of the customer and
    /// none of them pending; when that was, or `None` if it did not after
    /// `patience`. (With none pending, the whole list is read to count them: a
    /// read model that has not seen an order yet shows none pending either.)
    pub async fn wait_settled(
        &self,
        customer: &str,
        accepted: usize,
        patience: Duration,
    ) -> anyhow::Result<Option<Instant>> {
        let give_up = Instant::now() + patience;
        loop {
            let page: Value = self
                .client
                .get(format!(
                    "{}/v1/orders?customer_id={customer}&status=pending&limit=1",
                    self.base
                ))
                .send()
                .await?
                .json()
                .await?;
            if page["items"].as_array().is_some_and(Vec::is_empty) {
                let at = Instant::now();
                if self.orders_of(customer).await?.len() >= accepted {
                    return Ok(Some(at));
                }
            }
            if Instant::now() > give_up {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every order of the customer, as the orders read model shows it.
    pub async fn orders_of(&self, customer: &str) -> anyhow::Result<Vec<Value>> {
        let mut cursor: Option<String> = None;
        let mut orders = vec![];
        loop {
            let mut url = format!("{}/v1/orders?customer_id={customer}&limit=100", self.base);
            if let Some(cursor) = &cursor {
                url.push_str(&format!("&cursor={cursor}"));
            }
            let mut page: Value = self.client.get(url).send().await?.json().await?;
            if let Some(items) = page["items"].as_array_mut() {
                orders.append(items);
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return Ok(orders),
            }
        }
    }
}

/// The `n`th of `skus` SKUs.
pub fn sku(n: usize, skus: usize) -> String {
    format!("B-{}", n % skus)
}

fn distributed_sh(envs: &[(&'static str, String)], command: &str) -> anyhow::Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/dev/distributed.sh");
    let status = std::process::Command::new(script)
        .arg(command)
        .envs(envs.iter().map(|(k, v)| (k, v.as_str())))
        .status()?;
    anyhow::ensure!(
        status.success(),
        "infra/dev/distributed.sh {command}: {status}"
    );
    Ok(())
}
