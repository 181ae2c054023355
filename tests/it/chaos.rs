//! Faults under load, judged by the history checker (`history.rs`): processes
//! killed at random moments and restarted, clean and rolling restarts, the broker and
//! PostgreSQL away for a while, responses dropped while clients retry, and negative
//! controls that break the system on purpose to show the checker sees loss and
//! duplication.

use crate::faults::{FaultProxy, Link};
use crate::history::{acknowledged_orders_exist, check, Load, Profile, Rng, Workload};
use crate::support::{drop_databases, postgres_server, Api, OwnBroker, Process, TestServer};
use reqwest::StatusCode;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// One distributed scenario at a time: each runs five processes and loads the
/// development broker on purpose; two at once on two cores measure the machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Place one order of a SKU no workload uses (the history need not know of it): its
/// status, whether it carries `Retry-After`, and its body.
async fn probe(api: &Api) -> (StatusCode, bool, serde_json::Value) {
    let response = api
        .client
        .post(api.url("/v1/orders"))
        .json(&json!({ "customer_id": "probe", "lines": [{ "sku": "PROBE", "quantity": 1, "unit_price_cents": 250 }], "payment_token": "tok_ok" }))
        .send()
        .await
        .expect("an answer");
    let status = response.status();
    let retry_after = response.headers().contains_key("retry-after");
    let (_, body) = crate::support::body(response).await;
    (status, retry_after, body)
}

/// How soon after a fault is healed, under load, consumers must be reading new
/// records again. Each scenario prints what it measured. (Without load the lifecycle
/// tests hold the deployment to 30 s; under this load on the development broker,
/// resumption after the broker returns or a service is killed has measured 30-40 s,
/// so the bound here is the suite's settling time: see docs/reliability.md.)
const RESUMED_WITHIN: Duration = crate::support::SETTLE;

/// The SKU of the orders that show consumption has resumed (not in any workload).
const RESUME_SKU: &str = "RESUME";

/// A new order (retried while the door refuses it) is carried through the saga to
/// confirmed within [`RESUMED_WITHIN`] of `since`: every consumer on its way reads
/// new records again. How long it took.
async fn resumes(api: &Api, since: Instant, what: &str) -> Duration {
    let deadline = since + RESUMED_WITHIN;
    let body = json!({ "customer_id": format!("resume-{what}"), "lines": [{ "sku": RESUME_SKU, "quantity": 1, "unit_price_cents": 250 }], "payment_token": "tok_ok" });
    let id = loop {
        if let Ok(response) = api
            .client
            .post(api.url("/v1/orders"))
            .json(&body)
            .send()
            .await
        {
            let (status, answer) = crate::support::body(response).await;
            if status == StatusCode::ACCEPTED {
                break answer["order_id"].as_str().expect("id").to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no order taken within {RESUMED_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    api.eventually_within(
        &format!("/v1/orders/{id}"),
        "confirmed",
        |o| o["status"] == "confirmed",
        left,
    )
    .await;
    since.elapsed()
}

/// Sagas end (confirmed or cancelled) again within [`RESUMED_WITHIN`] of `since`.
async fn sagas_end_again(api: &Api, since: Instant) -> Duration {
    let ended = |text: &str| crate::support::metric(text, "orderline_saga_outcomes_total", &[]);
    let scrape = || async {
        match api.client.get(api.url("/metrics")).send().await {
            Ok(response) => response.text().await.ok(),
            Err(_) => None,
        }
    };
    let mut before = None;
    loop {
        if let Some(text) = scrape().await {
            let now = ended(&text);
            match before {
                None => before = Some(now),
                Some(before) if now > before => {
                    let took = since.elapsed();
                    assert!(
                        took < RESUMED_WITHIN,
                        "sagas ended again only {took:?} after"
                    );
                    return took;
                }
                Some(_) => {}
            }
        }
        assert!(
            since.elapsed() < RESUMED_WITHIN,
            "no saga ended within {RESUMED_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every SQLite file under `dir` passes `PRAGMA integrity_check`.
fn integrity_check(dir: &Path) {
    let mut files = vec![];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("data dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "db") {
                files.push(path);
            }
        }
    }
    assert!(!files.is_empty(), "no database under {}", dir.display());
    for file in files {
        let connection = rusqlite::Connection::open(&file).expect("open");
        let verdict: String = connection
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("integrity_check");
        assert_eq!(verdict, "ok", "{}", file.display());
    }
}

/// The embedded server on SQLite under load, stopped `times` times at random moments
/// by `stop` and started again on its files: after each start every order
/// acknowledged before the stop is there, with no gap, and the files are sound; at
/// the end the whole history checks.
async fn restarts_under_load(scenario: &str, times: usize, stop: fn(Process)) {
    let profile = Profile::from_env();
    println!("history {scenario}: seed {}", profile.seed);
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let mut node = Process::serve(&data, 30_000);
    let api = node.api.clone();
    let mut workload = Workload::new(8);
    // A steady load (about 50 operations a second).
    workload.pace = Duration::from_millis(60);
    let stock = workload.restock(&api, 300).await;
    let load = Load::start(&api.base, &workload, 3, profile.seed);
    let mut rng = Rng::new(profile.seed);
    let mut down_for = Duration::ZERO;
    // The history is in order of completion: what is past `checked` is new.
    let mut checked = 0;
    for _ in 0..times {
        load.until_acknowledged(5).await;
        tokio::time::sleep(rng.between(Duration::ZERO, Duration::from_millis(700))).await;
        let args = node.args.clone();
        let stopped = Instant::now();
        stop(node);
        let acknowledged = load.so_far();
        integrity_check(&data);
        node = Process::spawn(&args);
        down_for += stopped.elapsed();
        let lost = acknowledged_orders_exist(&api, &acknowledged[checked..]).await;
        checked = acknowledged.len();
        assert!(
            lost.is_empty(),
            "{scenario}: lost after a restart: {lost:?}"
        );
    }
    let (history, took) = load.stop().await;
    api.quiesce().await;
    let report = check(&api, &history, &stock).await;
    report.print(scenario, took);
    println!(
        "history {scenario}: {times} restarts, down {:.1} s in all",
        down_for.as_secs_f64()
    );
    report.assert_clean(scenario);
    node.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_killed_at_random_moments_under_load_loses_and_repeats_nothing() {
    let times = Profile::from_env().faults;
    restarts_under_load("sqlite, SIGKILL", times, Process::kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_stopped_cleanly_under_load_loses_and_repeats_nothing() {
    let times = Profile::from_env().faults / 4;
    restarts_under_load("sqlite, SIGTERM", times, Process::stop_cleanly).await;
}

/// A deployment a scenario runs on, to take down at the end.
enum Deployment {
    Embedded {
        node: Process,
        config: infra::Config,
        _dir: tempfile::TempDir,
    },
    Distributed(TestServer),
}

impl Deployment {
    /// The embedded server as a process, on SQLite files or on the PostgreSQL server
    /// at `postgres`.
    fn embedded(postgres: Option<String>) -> Deployment {
        let dir = tempfile::tempdir().expect("dir");
        let mut config = infra::Config::with_data_dir(dir.path().join("data"));
        config.auth = infra::auth::AuthSettings::off();
        if postgres.is_some() {
            config.postgres = postgres;
            config.database_prefix = format!("orderline_h{}", uuid::Uuid::now_v7().simple());
        }
        let mut args = vec![
            "serve".to_owned(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        args.extend(crate::support::storage_args(&config));
        Deployment::Embedded {
            node: Process::spawn(&args),
            config,
            _dir: dir,
        }
    }

    fn api(&self) -> Api {
        match self {
            Deployment::Embedded { node, .. } => node.api.clone(),
            Deployment::Distributed(server) => Api::from(server),
        }
    }

    async fn finish(self) {
        match self {
            Deployment::Embedded { node, config, .. } => {
                node.kill();
                drop_databases(&config).await;
            }
            Deployment::Distributed(server) => server.finish().await,
        }
    }
}

/// Clients through a proxy in front of `deployment` that drops a quarter of the
/// responses, retrying with or without their keys, until `enough` responses were
/// dropped; the history, checked.
async fn responses_dropped(
    deployment: Deployment,
    keys: bool,
    enough: u64,
) -> crate::history::Report {
    let profile = Profile::from_env();
    let api = deployment.api();
    let mut workload = Workload::new(8);
    workload.keys = keys;
    let stock = workload.restock(&api, 300).await;
    let proxy = FaultProxy::start(api.base.trim_start_matches("http://")).await;
    proxy.set(Link::DropResponses(25));
    let load = Load::start(
        &format!("http://{}", proxy.address),
        &workload,
        profile.clients,
        profile.seed,
    );
    let start = Instant::now();
    while proxy.dropped() < enough {
        assert!(start.elapsed() < crate::support::SETTLE, "nothing dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.set(Link::Up);
    let (history, took) = load.stop().await;
    api.quiesce().await;
    let report = check(&api, &history, &stock).await;
    let scenario = format!("responses dropped, keys {keys}");
    report.print(&scenario, took);
    println!("history {scenario}: {} responses dropped", proxy.dropped());
    deployment.finish().await;
    report
}

fn enough_dropped() -> u64 {
    if Profile::from_env().long {
        1000
    } else {
        150
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_dropped_and_retried_with_the_same_key_take_effect_once() {
    let report = responses_dropped(Deployment::embedded(None), true, enough_dropped()).await;
    assert!(report.retried > 0, "nothing was retried");
    report.assert_clean("responses dropped, retried with the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_responses_dropped_and_retried_with_the_same_key_take_effect_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let server = TestServer::on(crate::support::Backend::Distributed).await;
    let report = responses_dropped(Deployment::Distributed(server), true, enough_dropped()).await;
    assert!(report.retried > 0, "nothing was retried");
    report.assert_clean("distributed, responses dropped, retried with the key");
}

/// Negative control: a client that retries without its key places orders twice, and
/// the checker must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_sees_duplicates_when_retries_carry_no_key() {
    let report = responses_dropped(Deployment::embedded(None), false, 60).await;
    assert!(
        !report.duplicated.is_empty(),
        "the checker missed duplicates: {report:?}"
    );
}

/// Negative control: the server's files rolled back to a copy taken earlier (what a
/// lost write cache or a stale backup does) under acknowledged orders; the checker
/// must report them lost, right after the restart and at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_sees_loss_when_the_files_are_rolled_back() {
    let profile = Profile::from_env();
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    let copy = dir.path().join("copy");
    let node = Process::serve(&data, 30_000);
    let api = node.api.clone();
    let workload = Workload::new(4);
    let stock = workload.restock(&api, 300).await;
    let load = Load::start(&api.base, &workload, profile.clients, profile.seed);
    load.until_acknowledged(20).await;
    let args = node.args.clone();
    node.stop_cleanly();
    copy_dir(&data, &copy);
    let node = Process::spawn(&args);
    load.until_acknowledged(30).await;
    node.kill();
    let acknowledged = load.so_far();
    std::fs::remove_dir_all(&data).expect("remove");
    copy_dir(&copy, &data);
    let node = Process::spawn(&args);
    let lost_at_restart = acknowledged_orders_exist(&api, &acknowledged).await;
    let (history, took) = load.stop().await;
    api.quiesce().await;
    let report = check(&api, &history, &stock).await;
    report.print("files rolled back", took);
    assert!(
        !lost_at_restart.is_empty() && !report.lost.is_empty(),
        "the checker missed lost orders: {report:?}"
    );
    node.kill();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// The history load on 300 of each of the workload's SKUs (and the resumption
/// probes' SKU) by the profile's clients, once it flows: the stock restocked, and
/// the load.
async fn history_load(
    api: &Api,
    profile: &Profile,
) -> (std::collections::BTreeMap<String, i64>, Load) {
    let workload = Workload::new(8);
    let stock = workload.restock(api, 300).await;
    api.restock(RESUME_SKU, 1000).await;
    let load = Load::start(&api.base, &workload, profile.clients, profile.seed);
    load.until_acknowledged(30).await;
    (stock, load)
}

/// A proxy in front of the suite's PostgreSQL server ([`FaultProxy::postgres`]) and
/// the server's URL through it.
async fn postgres_proxy(seed: u64) -> (FaultProxy, String) {
    let upstream = postgres_server();
    let host = upstream
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:5432")
        .trim_end_matches('/');
    let proxy = FaultProxy::postgres(host, seed).await;
    let url = format!("postgres://postgres@{}", proxy.address);
    (proxy, url)
}

/// PostgreSQL away (every connection cut, new ones refused, through a proxy) for
/// the outage, under load: commands answer 503 with `Retry-After` (never 500, never
/// hang), the services reconnect by themselves, and the history checks.
async fn postgres_away(distributed: bool) {
    let profile = Profile::from_env();
    let (proxy, url) = postgres_proxy(profile.seed).await;
    // On the suite's broker, filled by the tests before this one (ADR 15).
    let broker = distributed.then(crate::support::kafka_broker);
    let deployment = if let Some(broker) = &broker {
        Deployment::Distributed(TestServer::distributed_with_postgres(&url, broker).await)
    } else {
        Deployment::embedded(Some(url))
    };
    let scenario = if distributed {
        "distributed, postgres away"
    } else {
        "postgres away"
    };
    println!("history {scenario}: seed {}", profile.seed);
    let api = deployment.api();
    let (stock, load) = history_load(&api, &profile).await;

    proxy.set(Link::Down);
    let away = Instant::now();
    // A new order while PostgreSQL is away: a 503 with Retry-After, in bounded time.
    let mut probes = 0;
    while away.elapsed() < profile.outage {
        let asked = Instant::now();
        let (status, retry_after, body) = probe(&api).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(retry_after, "a 503 without Retry-After: {body}");
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "an answer took {:?}",
            asked.elapsed()
        );
        probes += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    proxy.set(Link::Up);
    let back = resumes(&api, Instant::now(), "postgres back").await;
    println!(
        "history {scenario}: {probes} probes, each a 503, over {:.0} s; consuming again {:.1} s after",
        away.elapsed().as_secs_f64(),
        (back).as_secs_f64()
    );
    load.until_acknowledged(30).await;
    let (history, took) = load.stop().await;
    api.quiesce().await;
    let report = check(&api, &history, &stock).await;
    report.print(scenario, took);
    report.assert_clean(scenario);
    deployment.finish().await;
}

/// The embedded deployment on PostgreSQL under load while the answers to a share of
/// its explicit `COMMIT`s are lost: each of those transactions is committed and its
/// client sees only its connection cut (the log's groups, the saga's and the
/// projections' batches, the saga's deadlines). Whoever committed must not take it
/// for undone: the history checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_whose_answers_are_lost_under_load_lose_and_repeat_nothing() {
    let profile = Profile::from_env();
    println!("history lost commits: seed {}", profile.seed);
    let (proxy, url) = postgres_proxy(profile.seed).await;
    let deployment = Deployment::embedded(Some(url));
    let api = deployment.api();
    let (stock, load) = history_load(&api, &profile).await;
    proxy.set(Link::LoseCommits(LOST_COMMITS_PERCENT));
    let began = Instant::now();
    while proxy.lost_commits() < profile.faults as u64 && began.elapsed() < profile.outage {
        load.until_acknowledged(5).await;
    }
    proxy.set(Link::Up);
    let lost = proxy.lost_commits();
    let back = resumes(&api, Instant::now(), "commits answered again").await;
    println!(
        "history lost commits: {lost} commits carried out and their answers lost over {:.0} s; consuming again {:.1} s after",
        began.elapsed().as_secs_f64(),
        back.as_secs_f64()
    );
    assert!(
        lost > 0,
        "no commit's answer was lost: the scenario tested nothing"
    );
    load.until_acknowledged(30).await;
    let (history, took) = load.stop().await;
    api.quiesce().await;
    let report = check(&api, &history, &stock).await;
    report.print("lost commits", took);
    report.assert_clean("lost commits");
    // Every order settled: none is still counted in flight (the sagas a lost answer
    // settled were counted once the runner read again; left, they would keep the
    // door's bound that much nearer).
    let backlog = crate::support::metric(&api.metrics().await, "orderline_fulfilment_backlog", &[]);
    assert_eq!(backlog, 0, "orders counted in flight after all settled");
    deployment.finish().await;
}

/// The share of `COMMIT`s whose answers [`commits_whose_answers_are_lost_under_load_lose_and_repeat_nothing`] loses.
const LOST_COMMITS_PERCENT: u8 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_under_load_is_503_then_recovers_losing_nothing() {
    postgres_away(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_postgres_away_under_load_is_503_then_recovers_losing_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    postgres_away(true).await;
}

/// The distributed deployment under load: services killed at random moments and
/// started again, then every service restarted cleanly one after the other (a
/// rolling restart); the history checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_services_killed_and_restarted_under_load_lose_and_repeat_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let profile = Profile::from_env();
    println!("history distributed restarts: seed {}", profile.seed);
    let mut server = TestServer::on(crate::support::Backend::Distributed).await;
    let api = Api::from(&server);
    let mut workload = Workload::new(8);
    // A steady load the development broker carries (about 50 operations a second):
    // killed services read again 3-5 s after their restart. At the load of the other
    // scenarios (about 100 operations a second, the door at its bound) it took 9-57 s
    // (docs/reliability.md, "Not yet shown").
    workload.pace = Duration::from_millis(60);
    let stock = workload.restock(&api, 300).await;
    api.restock(RESUME_SKU, 1000).await;
    let load = Load::start(&api.base, &workload, 3, profile.seed);
    let mut rng = Rng::new(profile.seed);
    let services = schemas::topics::Service::ALL;
    // The history is in order of completion: what is past `checked` is new.
    let mut checked = 0;
    // Fewer kills than on SQLite: each waits for a new order to be confirmed after
    // the restart (consumption resumed), and prints how long that took.
    for _ in 0..profile.faults / 4 {
        load.until_acknowledged(5).await;
        tokio::time::sleep(rng.between(Duration::ZERO, Duration::from_millis(700))).await;
        let service = services[rng.below(services.len() as u64) as usize];
        server.replace_service(service.as_str(), Process::kill_and_restart);
        let restarted = Instant::now();
        let acknowledged = load.so_far();
        let lost = acknowledged_orders_exist(&api, &acknowledged[checked..]).await;
        assert!(lost.is_empty(), "lost after {service} was killed: {lost:?}");
        checked = acknowledged.len();
        let back = resumes(&api, restarted, &format!("{service} killed")).await;
        println!(
            "history distributed restarts: {service} killed and restarted; consuming again {:.1} s after",
            back.as_secs_f64()
        );
    }
    for service in services {
        load.until_acknowledged(5).await;
        server.replace_service(service.as_str(), Process::stop_and_restart);
    }
    load.until_acknowledged(10).await;
    let (history, took) = load.stop().await;
    api.quiesce().await;
    let report = check(&api, &history, &stock).await;
    report.print("distributed restarts", took);
    report.assert_clean("distributed restarts");
    server.finish().await;
}

/// The distributed deployment's broker away for the outage under load: commands are
/// still taken, everything is carried through when it returns, and the history checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_broker_away_under_load_loses_and_repeats_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let profile = Profile::from_env();
    let mut broker = OwnBroker::start();
    let server = TestServer::distributed_on(&broker.address).await;
    let api = Api::from(&server);
    let (stock, load) = history_load(&api, &profile).await;
    broker.stop();
    // Orders are still acknowledged while the broker is away.
    load.until_acknowledged(30).await;
    tokio::time::sleep(profile.outage).await;
    broker.resume();
    // A backlog at the door's bound waits behind the outage: the first saga that
    // ends after the broker is back shows consumption has resumed.
    let back = sagas_end_again(&api, Instant::now()).await;
    println!(
        "history broker away: consuming again {:.1} s after it returned",
        back.as_secs_f64()
    );
    load.until_acknowledged(30).await;
    let (history, took) = load.stop().await;
    api.quiesce().await;
    let report = check(&api, &history, &stock).await;
    report.print("broker away", took);
    report.assert_clean("broker away");
    server.finish().await;
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mount a tmpfs of `megabytes`; None where mounting is not allowed (not root).
    fn mount(megabytes: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).expect("mkdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { path, _dir: dir })
    }

    /// Fill what is left of the disk; the file that fills it.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Until `within`, new orders (of a SKU the workload does not use, so the history
/// need not know of them) answer only 202 or 503 with Retry-After (never a
/// 500); at least one is refused with 503. How many were refused.
async fn refused_with_503(api: &Api, within: Duration) -> usize {
    let start = Instant::now();
    let mut refused = 0;
    while start.elapsed() < within || refused == 0 {
        assert!(
            start.elapsed() < crate::support::SETTLE,
            "writes were never refused"
        );
        let (status, retry_after, body) = probe(api).await;
        match status {
            StatusCode::ACCEPTED => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(retry_after, "a 503 without Retry-After: {body}");
                refused += 1;
            }
            other => panic!("{other}: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused
}

/// The embedded server's files on a small disk that fills up under load, twice:
/// writes are refused with 503 (never a 500), nothing acknowledged is lost, and when
/// space returns the server goes on by itself. (A tmpfs with files open for writing
/// cannot be remounted read-only, so the read-only disk is not a scenario here.) Needs root to mount a tmpfs; elsewhere it says so and checks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_a_full_disk_refuses_writes_and_recovers() {
    let Some(disk) = SmallDisk::mount(64) else {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    };
    let profile = Profile::from_env();
    let data = disk.path.join("data");
    let node = Process::serve(&data, 30_000);
    let api = node.api.clone();
    let workload = Workload::new(8);
    let stock = workload.restock(&api, 300).await;
    let load = Load::start(&api.base, &workload, profile.clients, profile.seed);
    load.until_acknowledged(30).await;

    for round in 0..2 {
        let filler = disk.fill();
        let refused = refused_with_503(&api, Duration::from_secs(5)).await;
        std::fs::remove_file(&filler).expect("free the disk");
        println!("history disk full ({round}): {refused} orders refused");
        load.until_acknowledged(30).await;
    }

    let (history, took) = load.stop().await;
    api.quiesce().await;
    let report = check(&api, &history, &stock).await;
    report.print("disk full", took);
    node.kill();
    integrity_check(&data);
    report.assert_clean("disk full");
}
