//! A real server on a random port over a fresh data directory, and a client for it.

use infra::Config;
use orderline::{serve, System};
use reqwest::{Response, StatusCode};
use schemas::topics::Service;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a test waits for the system to settle before it calls that a failure.
pub const SETTLE: Duration = Duration::from_secs(60);

/// Where a test server keeps its log and service databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite files in a fresh temporary directory.
    Sqlite,
    /// Fresh databases on the PostgreSQL server at [`postgres_server`], dropped after.
    Postgres,
    /// One process per service (the real binary), each with a fresh PostgreSQL
    /// database, topics of their own on the Kafka-protocol broker, and the gateway.
    Distributed,
}

/// The broker the tests use: `ORDERLINE_TEST_KAFKA`, else 127.0.0.1:9092.
pub fn kafka_broker() -> String {
    let address = std::env::var("ORDERLINE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    assert!(
        std::net::TcpStream::connect_timeout(
            &address.parse().expect("host:port"),
            Duration::from_secs(2)
        )
        .is_ok(),
        "no Kafka-protocol broker on {address}: start one with infra/kafka/broker.sh ensure \
         (the README's test command does)"
    );
    address
}

/// The PostgreSQL server tests use: `ORDERLINE_TEST_POSTGRES`, else 127.0.0.1:5432.
pub fn postgres_server() -> String {
    std::env::var("ORDERLINE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Generates, for each scenario `async fn name(backend: Backend)`, one test on SQLite
/// (`sqlite::name`), one on PostgreSQL (`postgres::name`) and one on the distributed
/// deployment (`distributed::name`).
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        crate::support::on_both_backends!($($name),*);
        mod distributed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Backend::Distributed).await
                }
            )*
        }
    };
}
pub(crate) use on_every_backend;

/// Like [`on_every_backend`], for scenarios that need the embedded process.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// The service processes and the gateway, when distributed.
    processes: Vec<Process>,
    _dir: Option<TempDir>,
}

impl TestServer {
    pub async fn on(backend: Backend) -> TestServer {
        Self::on_with(backend, Duration::from_secs(30)).await
    }

    /// A server on fresh storage of `backend`.
    pub async fn on_with(backend: Backend, payment_timeout: Duration) -> TestServer {
        let brokers = (backend == Backend::Distributed).then(kafka_broker);
        Self::fresh(backend, payment_timeout, brokers, None).await
    }

    /// The distributed deployment on fresh databases, on the broker at `brokers`
    /// (a test's own, to stop and start).
    pub async fn distributed_on(brokers: &str) -> TestServer {
        let brokers = Some(brokers.to_owned());
        Self::fresh(Backend::Distributed, Duration::from_secs(30), brokers, None).await
    }

    /// The distributed deployment on fresh databases of the PostgreSQL server at
    /// `postgres` (a URL, e.g. through a test's proxy), on the broker at `brokers`.
    pub async fn distributed_with_postgres(postgres: &str, brokers: &str) -> TestServer {
        let brokers = Some(brokers.to_owned());
        let postgres = Some(postgres.to_owned());
        Self::fresh(
            Backend::Distributed,
            Duration::from_secs(30),
            brokers,
            postgres,
        )
        .await
    }

    async fn fresh(
        backend: Backend,
        payment_timeout: Duration,
        brokers: Option<String>,
        postgres: Option<String>,
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        // The v1 contract, token-free (the auth scenarios turn it on).
        let settings = (
            infra::auth::AuthSettings::off(),
            infra::config::Notifier::File,
        );
        Self::fresh_in(dir, backend, payment_timeout, (brokers, postgres), settings).await
    }

    /// A server on fresh storage of `backend` with auth on: the operator token and the
    /// signing key are files in its directory, given to every process; `rate_limit`
    /// per client, or none.
    pub async fn secured(
        backend: Backend,
        rate_limit: Option<infra::auth::RateLimit>,
    ) -> (TestServer, Secrets) {
        Self::secured_with(backend, rate_limit, infra::config::Notifier::File).await
    }

    /// [`TestServer::secured`], its notifications sent by `notifier`.
    pub async fn secured_with(
        backend: Backend,
        rate_limit: Option<infra::auth::RateLimit>,
        notifier: infra::config::Notifier,
    ) -> (TestServer, Secrets) {
        let dir = tempfile::tempdir().expect("temp dir");
        let secrets = Secrets {
            operator: format!("operator-{}", uuid::Uuid::now_v7().simple()),
            signing: format!("signing-{}", uuid::Uuid::now_v7().simple()),
        };
        let file = |name: &str, secret: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, secret).expect("secret file");
            infra::auth::SecretSource {
                value: None,
                file: Some(path),
            }
        };
        let auth = infra::auth::AuthSettings {
            enabled: true,
            operator_token: file("operator-token", &secrets.operator),
            signing_key: file("signing-key", &secrets.signing),
            rate_limit,
        };
        let brokers = (backend == Backend::Distributed).then(kafka_broker);
        let timeout = Duration::from_secs(30);
        let server = Self::fresh_in(dir, backend, timeout, (brokers, None), (auth, notifier)).await;
        (server, secrets)
    }

    async fn fresh_in(
        dir: TempDir,
        backend: Backend,
        payment_timeout: Duration,
        (brokers, postgres): (Option<String>, Option<String>),
        (auth, notifier): (infra::auth::AuthSettings, infra::config::Notifier),
    ) -> TestServer {
        let mut config = Config::with_data_dir(dir.path().join("data"));
        config.auth = auth;
        config.notifier = notifier;
        config.payment_timeout = payment_timeout;
        if backend != Backend::Sqlite {
            config.postgres = Some(postgres.unwrap_or_else(postgres_server));
            config.database_prefix = format!("orderline_t{}", uuid::Uuid::now_v7().simple());
        }
        let mut server = if let Some(brokers) = brokers {
            let mut kafka = infra::kafka::KafkaConfig::local(brokers);
            kafka.prefix = format!("orderline-t{}", uuid::Uuid::now_v7().simple());
            config.kafka = Some(kafka);
            Self::start_distributed(config).await
        } else {
            Self::start_in(config).await
        };
        server._dir = Some(dir);
        server
    }

    /// Every service as a process of its own, and the gateway in front.
    pub async fn start_distributed(config: Config) -> TestServer {
        let mut processes = vec![];
        let mut upstreams = vec![];
        for service in Service::ALL {
            let mut args = vec![
                "serve".to_owned(),
                "--service".to_owned(),
                service.to_string(),
                "--listen".to_owned(),
                "127.0.0.1:0".to_owned(),
                "--payment-timeout-ms".to_owned(),
                config.payment_timeout.as_millis().to_string(),
            ];
            args.extend(storage_args(&config));
            args.extend(auth_args(&config));
            let process = Process::spawn(&args);
            upstreams.push(format!("--{service}"));
            upstreams.push(process.api.base.clone());
            processes.push(process);
        }
        let mut args = vec![
            "gateway".to_owned(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        args.extend(upstreams);
        if let Some(limit) = config.auth.rate_limit {
            let limit = format!("{}/{}", limit.per_second, limit.burst);
            args.extend(["--rate-limit".to_owned(), limit]);
        }
        let gateway = Process::spawn(&args);
        let base = gateway.api.base.clone();
        // Ready when every service's consumers have been given their partitions.
        gateway.api.eventually("/health", "ready", |_| true).await;
        processes.push(gateway);
        TestServer {
            base,
            client: client(),
            config,
            stop: None,
            task: None,
            processes,
            _dir: None,
        }
    }

    /// A server with this configuration (its storage is kept when it stops).
    pub async fn start_in(config: Config) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let system = System::start(config.clone()).await.expect("system starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, system, async move {
            let _ = stopped.await;
        }));
        TestServer {
            base: format!("http://{address}"),
            client: client(),
            config,
            stop: Some(stop),
            task: Some(task),
            processes: vec![],
            _dir: None,
        }
    }

    /// Stop cleanly: drain, commit, exit.
    pub async fn stop(mut self) -> Option<TempDir> {
        for process in self.processes.drain(..).rev() {
            assert!(
                process.terminate().success(),
                "a process did not stop cleanly"
            );
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server stops cleanly");
        }
        self._dir.take()
    }

    /// Stop every process with SIGTERM; each must exit cleanly within `limit`. Then
    /// drop the PostgreSQL databases.
    pub async fn finish_within(mut self, limit: Duration) {
        for process in self.processes.drain(..).rev() {
            assert!(
                process.terminate_within(limit).success(),
                "a process did not stop cleanly"
            );
        }
        self.finish().await;
    }

    /// Stop, and drop the PostgreSQL databases it made.
    pub async fn finish(self) {
        let config = self.config.clone();
        self.stop().await;
        drop_databases(&config).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stop every process of the distributed deployment with `stop` (SIGTERM or
    /// SIGKILL), wait `down`, then start each again with its arguments, on the same
    /// addresses and the same state; ready when the gateway says so.
    pub async fn restart_every_process(&mut self, stop: fn(Process), down: Duration) -> Instant {
        let processes: Vec<Process> = self.processes.drain(..).collect();
        let args: Vec<Vec<String>> = processes.iter().map(|p| p.args.clone()).collect();
        for process in processes.into_iter().rev() {
            stop(process);
        }
        tokio::time::sleep(down).await;
        let started = Instant::now();
        self.processes = args.iter().map(|args| Process::spawn(args)).collect();
        let gateway = &self.processes.last().expect("the gateway").api;
        gateway.eventually("/health", "ready", |_| true).await;
        started
    }

    /// Run `change` on the process of a service (distributed only), in its place.
    pub fn replace_service(&mut self, service: &str, change: impl FnOnce(Process) -> Process) {
        let index = Service::ALL
            .iter()
            .position(|s| s.as_str() == service)
            .expect("a service");
        let process = self.processes.remove(index);
        self.processes.insert(index, change(process));
    }
}

/// Drop the PostgreSQL databases of a configuration (nothing for SQLite files).
pub async fn drop_databases(config: &Config) {
    if config.postgres.is_some() {
        use sqlx::migrate::MigrateDatabase;
        sqlx::any::install_default_drivers();
        let services = Service::ALL.iter().map(|s| s.as_str());
        for name in std::iter::once("events").chain(services) {
            let _ = sqlx::Any::force_drop_database(&config.database_url(name)).await;
        }
    }
}

/// The command-line flags that point `orderline` at a configuration's storage.
pub fn storage_args(config: &Config) -> Vec<String> {
    let mut args = vec![
        "--data-dir".to_owned(),
        config.data_dir.display().to_string(),
    ];
    if let Some(kafka) = &config.kafka {
        args.extend([
            "--kafka-brokers".to_owned(),
            kafka.brokers.clone(),
            "--topic-prefix".to_owned(),
            kafka.prefix.clone(),
        ]);
    }
    if let Some(server) = &config.postgres {
        args.extend([
            "--postgres-url".to_owned(),
            server.clone(),
            "--database-prefix".to_owned(),
            config.database_prefix.clone(),
        ]);
    }
    args
}

/// The flags that give a service of the distributed deployment a configuration's
/// auth settings.
pub fn auth_args(config: &Config) -> Vec<String> {
    let mut args = vec![];
    let auth = &config.auth;
    if auth.enabled {
        args.extend(["--auth".to_owned(), "on".to_owned()]);
        let files = [
            ("--operator-token-file", &auth.operator_token.file),
            ("--signing-key-file", &auth.signing_key.file),
        ];
        for (flag, file) in files {
            if let Some(file) = file {
                args.extend([flag.to_owned(), file.display().to_string()]);
            }
        }
    }
    // Behind the gateway, which limits each client's rate.
    args.extend(["--rate-limit".to_owned(), "off".to_owned()]);
    match &config.notifier {
        infra::config::Notifier::File => {}
        infra::config::Notifier::Log => args.extend(["--notifier".to_owned(), "log".to_owned()]),
        infra::config::Notifier::Smtp { url, from } => args.extend([
            "--notifier".to_owned(),
            "smtp".to_owned(),
            "--smtp-url".to_owned(),
            url.clone(),
            "--smtp-from".to_owned(),
            from.clone(),
        ]),
    }
    args
}

/// The operator token and the signing key of a secured test server.
pub struct Secrets {
    pub operator: String,
    pub signing: String,
}

impl Secrets {
    /// Sign `claims` as the server does (HS256 with its key), or with another key.
    pub fn sign(&self, claims: &Value, key: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
        )
        .expect("signed")
    }
}

/// A client that sends `Authorization: Bearer <token>` with every request.
/// The password every test customer registers with.
pub const PASSWORD: &str = "correct horse battery";

/// Register `email` as `name` (201) and log in (200): the customer's id, a client
/// with its access token, and the login's tokens.
pub async fn sign_up_as(server: &TestServer, email: &str, name: &str) -> (String, Api, Value) {
    let anyone = Api::from(server);
    let (status, registered) = anyone
        .post(
            "/v1/customers",
            json!({ "email": email, "password": PASSWORD, "name": name }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "register {email}: {registered}"
    );
    let tokens = log_in(&anyone, email).await;
    let id = registered["customer_id"].as_str().expect("id").to_owned();
    let access = tokens["access_token"].as_str().expect("access token");
    (id, bearer(&server.base, access), tokens)
}

/// Log `email` in with [`PASSWORD`] (200): the login's tokens.
pub async fn log_in(anyone: &Api, email: &str) -> Value {
    let (status, tokens) = anyone
        .post(
            "/v1/auth/login",
            json!({ "email": email, "password": PASSWORD }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "login {email}: {tokens}");
    tokens
}

/// [`sign_up_as`] with an email of its own: the customer's id, email and client.
pub async fn sign_up(server: &TestServer, name: &str) -> (String, String, Api) {
    let email = format!(
        "{}-{}@example.com",
        name.to_lowercase(),
        uuid::Uuid::now_v7().simple()
    );
    let (id, api, _) = sign_up_as(server, &email, name).await;
    (id, email, api)
}

pub fn bearer(base: &str, token: &str) -> Api {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    Api {
        base: base.to_owned(),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(5))
            .default_headers(headers)
            .build()
            .expect("client"),
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        // Dropped before the server's idle timeout (10 s) closes them.
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

/// A test client over a base URL (an in-process server or a child process).
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

impl From<&TestServer> for Api {
    fn from(server: &TestServer) -> Api {
        Api {
            base: server.base.clone(),
            client: server.client.clone(),
        }
    }
}

pub async fn body(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `method` on `path` with a JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        json: Value,
    ) -> (StatusCode, Value) {
        body(
            self.client
                .request(method, self.url(path))
                .json(&json)
                .send()
                .await
                .expect("request"),
        )
        .await
    }

    pub async fn post(&self, path: &str, body_json: Value) -> (StatusCode, Value) {
        body(
            self.client
                .post(self.url(path))
                .json(&body_json)
                .send()
                .await
                .expect("request"),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        body(
            self.client
                .get(self.url(path))
                .send()
                .await
                .expect("request"),
        )
        .await
    }

    pub async fn restock(&self, sku: &str, quantity: i64) -> Value {
        let (status, body) = self
            .post(
                &format!("/v1/inventory/{sku}/restock"),
                json!({ "quantity": quantity }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "restock: {body}");
        body
    }

    /// Place an order of `lines` (sku, quantity, price); its id.
    pub async fn place(&self, customer: &str, lines: &[(&str, i64, i64)], token: &str) -> String {
        let lines: Vec<Value> = lines
            .iter()
            .map(|(sku, quantity, price)| json!({ "sku": sku, "quantity": quantity, "unit_price_cents": price }))
            .collect();
        let (status, body) = self
            .post(
                "/v1/orders",
                json!({ "customer_id": customer, "lines": lines, "payment_token": token }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "place order: {body}");
        body["order_id"].as_str().expect("order id").to_owned()
    }

    pub async fn order(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/orders/{id}")).await;
        assert_eq!(status, StatusCode::OK, "order {id}: {body}");
        body
    }

    /// Wait until the projection `name` is listed as running (again, after a rebuild).
    pub async fn projection_running(&self, name: &str) {
        self.eventually("/v1/projections", "running", |listing| {
            listing["projections"]
                .as_array()
                .and_then(|all| all.iter().find(|p| p["name"] == name))
                .is_some_and(|p| p["status"] == "running")
        })
        .await;
    }

    /// Wait until `check` holds of what GET `path` answers; panics after [`SETTLE`].
    pub async fn eventually(
        &self,
        path: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        self.eventually_within(path, what, check, SETTLE).await
    }

    /// Wait until `check` holds of what GET `path` answers; panics after `limit`.
    pub async fn eventually_within(
        &self,
        path: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
        limit: Duration,
    ) -> Value {
        let start = Instant::now();
        loop {
            let (status, body) = self.get(path).await;
            if status == StatusCode::OK && check(&body) {
                return body;
            }
            if start.elapsed() > limit {
                panic!(
                    "{path} did not become {what} within {limit:?}; last answer {status}: {body}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn order_settles(&self, id: &str, status: &str) -> Value {
        self.eventually(&format!("/v1/orders/{id}"), status, |o| {
            o["status"] == status
        })
        .await
    }

    pub async fn stock(&self, sku: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/inventory/{sku}")).await;
        assert_eq!(status, StatusCode::OK, "stock {sku}: {body}");
        body
    }

    /// Wait until every projection has caught up with the log and no saga command
    /// is left to run (the log stops moving).
    pub async fn quiesce(&self) {
        let start = Instant::now();
        let mut last_head = -1;
        let mut stable_since = Instant::now();
        // A scrape that could not read a projection's standing leaves its samples
        // out: settled only when every projection seen so far reports.
        let mut projections = 0;
        loop {
            // A scrape that fails (a gateway waiting on a busy service) is not settled.
            let text = match self.client.get(self.url("/metrics")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            let head = sum(&text, "orderline_log_head");
            let reporting = text
                .lines()
                .filter(|l| l.starts_with("orderline_projection_lag{"))
                .count();
            projections = projections.max(reporting);
            let lagging = [
                "orderline_projection_lag{",
                "orderline_relay_lag{",
                "orderline_saga_pending_commands{",
                "orderline_saga_lag{",
                "orderline_command_inbox_lag{",
            ]
            .iter()
            .any(|family| {
                text.lines()
                    .filter(|l| l.starts_with(family))
                    .any(|l| !l.ends_with(" 0"))
            });
            if head != last_head {
                last_head = head;
                stable_since = Instant::now();
            }
            if !lagging
                && reporting == projections
                && projections > 0
                && stable_since.elapsed() > Duration::from_millis(300)
            {
                return;
            }
            assert!(
                start.elapsed() < SETTLE,
                "the system never settled:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The sum of a metric over every sample whose labels hold all of `labels`
/// (e.g. `command="restock"`), across services.
pub fn metric(metrics: &str, name: &str, labels: &[&str]) -> i64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<i64>().ok()))
        .sum()
}

fn sum(metrics: &str, name: &str) -> i64 {
    metric(metrics, name, &[])
}

impl Api {
    /// How many events of `event_type` one stream holds.
    pub async fn count_events(&self, aggregate: &str, id: &str, event_type: &str) -> usize {
        let (_, stream) = self.get(&format!("/v1/streams/{aggregate}/{id}")).await;
        stream["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter(|e| e["event_type"] == event_type)
                    .count()
            })
            .unwrap_or(0)
    }

    /// The log position of the last event (from /metrics).
    pub async fn head(&self) -> i64 {
        sum(&self.metrics().await, "orderline_log_head")
    }

    /// The Prometheus text of /metrics.
    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        let (_, metrics) = body(response).await;
        metrics.as_str().unwrap_or_default().to_owned()
    }
}

/// A loopback address for a process that may be restarted on it. The port lies below
/// the OS's ephemeral range: a port of that range, free while its process restarts,
/// can meanwhile be handed to any outgoing connection of the machine, and the
/// restart's bind then fails. Each port is given once per test process (from a start
/// that differs between processes) and only when nothing listens on it.
fn restartable_address() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // Ports [low - SPAN, low), clear of the well-known ones and of this project's
    // fixed ones (brokers 1909x, benchmarks 181xx, the distributed script 187xx).
    const SPAN: u32 = 10_000;
    if low < 20_000 + SPAN {
        return "127.0.0.1:0".to_owned();
    }
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low - SPAN + (start + n) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return format!("127.0.0.1:{port}");
        }
    }
    "127.0.0.1:0".to_owned()
}

/// The real `orderline` binary as a child process.
pub struct Process {
    child: std::process::Child,
    pub api: Api,
    /// What it was started with (the listen address made concrete), to restart it.
    pub args: Vec<String>,
}

impl Process {
    /// Start `orderline serve` on a random port over `data_dir`.
    pub fn serve(data_dir: &Path, payment_timeout_ms: u64) -> Process {
        Process::spawn(&[
            "serve".to_owned(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--payment-timeout-ms".to_owned(),
            payment_timeout_ms.to_string(),
            "--data-dir".to_owned(),
            data_dir.display().to_string(),
        ])
    }

    /// `orderline gateway` in front of services that are not there (the gateway alone
    /// under test), with extra flags.
    pub fn gateway_to_nowhere(flags: &[&str]) -> Process {
        let nowhere = "http://127.0.0.1:9";
        let mut args: Vec<String> = ["gateway", "--listen", "127.0.0.1:0"]
            .map(String::from)
            .to_vec();
        for service in Service::ALL {
            args.push(format!("--{service}"));
            args.push(nowhere.to_owned());
        }
        args.extend(flags.iter().map(|f| f.to_string()));
        Process::spawn(&args)
    }

    /// Start `orderline` with `args`; it must log where it listens. A listen address
    /// of `127.0.0.1:0` becomes a port of [`restartable_address`], kept in `args` so
    /// that a restart listens where the first start did.
    pub fn spawn(args: &[String]) -> Process {
        use std::io::{BufRead, BufReader};
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if a == "127.0.0.1:0" {
                    restartable_address()
                } else {
                    a.clone()
                }
            })
            .collect();
        // ORDERLINE_TEST_BIN runs another build (the long history profile uses the
        // release binary).
        let binary = std::env::var("ORDERLINE_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_orderline").to_owned());
        let mut child = std::process::Command::new(binary)
            .args(&args)
            .env("RUST_LOG", "info,sqlx=warn,rdkafka=warn")
            // The v1 contract, token-free, unless the flags say `--auth on`.
            .env("ORDERLINE_AUTH", "off")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("orderline starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // ORDERLINE_TEST_LOG_DIR keeps every process's log, for looking into a failure.
        let mut log = std::env::var_os("ORDERLINE_TEST_LOG_DIR").and_then(|dir| {
            let what = args.iter().take(3).cloned().collect::<Vec<_>>().join("-");
            let name = format!("{}-{}.log", what.replace(['/', ':'], "_"), child.id());
            std::fs::create_dir_all(&dir).ok()?;
            std::fs::File::create(std::path::Path::new(&dir).join(name)).ok()
        });
        std::thread::spawn(move || {
            use std::io::Write;
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(log) = log.as_mut() {
                    let _ = writeln!(log, "{line}");
                }
                if !sent {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let url = rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        let _ = tx.send(url);
                        sent = true;
                    }
                }
            }
        });
        let base = rx
            .recv_timeout(SETTLE)
            .expect("orderline says where it listens");
        Process {
            child,
            api: Api {
                base,
                client: client(),
            },
            args,
        }
    }

    /// SIGKILL: no drain, no clean shutdown.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("reaped");
    }

    /// SIGKILL, then the same command again (on the same address).
    pub fn kill_and_restart(mut self) -> Process {
        self.child.kill().expect("kill");
        self.child.wait().expect("reaped");
        let args = std::mem::take(&mut self.args);
        drop(self);
        Process::spawn(&args)
    }

    /// SIGTERM (it must exit cleanly), then the same command again.
    pub fn stop_and_restart(mut self) -> Process {
        let args = std::mem::take(&mut self.args);
        self.stop_cleanly();
        Process::spawn(&args)
    }

    /// SIGTERM, and wait until it exits, cleanly.
    pub fn stop_cleanly(self) {
        assert!(self.terminate().success(), "a process did not stop cleanly");
    }

    /// SIGTERM, and the exit status; panics when it has not exited within `limit`.
    pub fn terminate_within(mut self, limit: Duration) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "still running {limit:?} after SIGTERM: {:?}",
                self.args
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("exits")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every row of a table in a service database, in key order, as JSON text.
pub async fn dump(config: &Config, service: &str, table: &str, key: &str) -> Vec<String> {
    use sqlx::{Column, Row};
    let pool = infra::db::Db::open(&config.database_url(service), 1)
        .await
        .expect("open")
        .pool;
    let rows = sqlx::query(&format!("SELECT * FROM {table} ORDER BY {key}"))
        .fetch_all(&pool)
        .await
        .expect("dump");
    let out = rows
        .iter()
        .map(|row| {
            let mut object = serde_json::Map::new();
            for (i, column) in row.columns().iter().enumerate() {
                let value: Value = row
                    .try_get::<i64, _>(i)
                    .map(Value::from)
                    .or_else(|_| {
                        row.try_get::<Option<String>, _>(i)
                            .map(|s| s.map_or(Value::Null, Value::from))
                    })
                    .unwrap_or(Value::Null);
                object.insert(column.name().to_owned(), value);
            }
            Value::Object(object).to_string()
        })
        .collect();
    pool.close().await;
    out
}

/// A Tansu of the test's own, to stop and start.
pub struct OwnBroker {
    child: Option<std::process::Child>,
    pub address: String,
    dir: tempfile::TempDir,
}

impl OwnBroker {
    fn binary() -> String {
        std::env::var("ORDERLINE_TANSU_BIN").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            format!("{home}/.cache/orderline/tansu-0.6.0/bin/tansu")
        })
    }

    pub fn start() -> OwnBroker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut broker = OwnBroker {
            child: None,
            address: format!("127.0.0.1:{port}"),
            dir: tempfile::tempdir().expect("dir"),
        };
        broker.resume();
        broker
    }

    pub fn resume(&mut self) {
        let url = format!("tcp://{}", self.address);
        let child = std::process::Command::new(OwnBroker::binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu starts (infra/kafka/broker.sh install)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(&self.address).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tansu did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        index_storage(self.dir.path());
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The indexes Tansu's schema lacks (ADR 15), added by `infra/kafka/broker.sh index`
/// once Tansu has created its tables in `dir`.
fn index_storage(dir: &std::path::Path) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/infra/kafka/broker.sh");
    let status = std::process::Command::new("bash")
        .args([script, "index"])
        .env("ORDERLINE_BROKER_DIR", dir)
        .status()
        .expect("bash runs broker.sh");
    assert!(
        status.success(),
        "tansu's storage in {} was not indexed",
        dir.display()
    );
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
