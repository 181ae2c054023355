//! The distributed deployment restarted on the state it left: every process stopped
//! cleanly or killed and started again, the broker restarted, a burst through the
//! gateway. After each, new orders must go all the way to `confirmed`.

use crate::support::{Api, Backend, OwnBroker, Process, TestServer};
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

/// How the deployment is restarted: a name, how each process stops, how long it
/// stays down.
type Restart = (&'static str, fn(Process), Duration);

/// Place an order of one unit of `sku` and wait until it is confirmed.
async fn confirms(api: &Api, sku: &str, customer: &str) -> String {
    let id = api.place(customer, &[(sku, 1, 100)], "tok_ok").await;
    api.order_settles(&id, "confirmed").await;
    id
}

/// How soon after a restart (the processes started, or the broker back) consumers
/// must be reading new records again: a new order is confirmed by then.
const RESUMED_WITHIN: Duration = Duration::from_secs(30);

/// Place an order of one unit of `sku`; it must be confirmed within
/// [`RESUMED_WITHIN`] of `since`. Prints how long it took.
async fn confirms_soon_after(api: &Api, sku: &str, customer: &str, since: Instant) {
    let id = api.place(customer, &[(sku, 1, 100)], "tok_ok").await;
    let limit = RESUMED_WITHIN.saturating_sub(since.elapsed());
    api.eventually_within(
        &format!("/v1/orders/{id}"),
        "confirmed",
        |o| o["status"] == "confirmed",
        limit,
    )
    .await;
    println!(
        "lifecycle {customer}: confirmed {:.1} s after the restart",
        since.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_deployment_stopped_or_killed_and_started_again_goes_on_consuming() {
    let mut server = TestServer::on(Backend::Distributed).await;
    let api = Api::from(&server);
    api.restock("LIFE", 100).await;
    confirms(&api, "LIFE", "before").await;

    // Started again at once, and after longer than a Kafka group session lasts (a
    // consumer group would have given up on every member by then).
    let stops: [Restart; 4] = [
        ("stopped", Process::stop_cleanly, Duration::ZERO),
        (
            "stopped for a while",
            Process::stop_cleanly,
            Duration::from_secs(12),
        ),
        ("killed", Process::kill, Duration::ZERO),
        ("killed for a while", Process::kill, Duration::from_secs(12)),
    ];
    let mut placed = 1;
    for (how, stop, down) in stops {
        let started = server.restart_every_process(stop, down).await;
        // Two orders one after the other: the second needs records that arrived
        // after the consumers had caught up with the first.
        for n in 0..2 {
            confirms_soon_after(&api, "LIFE", &format!("{how}-{n}"), started).await;
            placed += 1;
        }
    }
    api.quiesce().await;
    assert_eq!(
        api.stock("LIFE").await,
        json!({ "sku": "LIFE", "on_hand": 100, "reserved": placed, "available": 100 - placed })
    );
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_on_its_state_is_read_again_past_the_next_record() {
    let mut broker = OwnBroker::start();
    let server = TestServer::distributed_on(&broker.address).await;
    let api = Api::from(&server);
    api.restock("BRK", 100).await;
    confirms(&api, "BRK", "before").await;

    for round in 0..2 {
        broker.stop();
        broker.resume();
        let back = Instant::now();
        for n in 0..3 {
            confirms_soon_after(&api, "BRK", &format!("after-{round}-{n}"), back).await;
        }
    }
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_every_accepted_order_is_confirmed_and_a_restart_goes_on() {
    // A broker of its own, on empty state: the development broker (Tansu with its
    // SQLite engine) answers fetches more slowly the more topics the suite's other
    // tests have left on it (on a shared broker holding the whole suite's topics,
    // this burst took over a minute to carry through; on its own, seconds).
    let broker = OwnBroker::start();
    let mut server = TestServer::distributed_on(&broker.address).await;
    let api = Api::from(&server);
    for sku in 0..20 {
        api.restock(&format!("BURST-{sku}"), 1000).await;
    }
    // 16 clients place as fast as they can: each order is accepted (202) or refused
    // at the door (503), never left behind.
    let clients: Vec<_> = (0..16)
        .map(|client| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut accepted = vec![];
                let mut refused = 0;
                for i in 0..40 {
                    let (status, body) = api
                        .post(
                            "/v1/orders",
                            json!({ "customer_id": format!("b-{client}-{i}"), "lines": [{ "sku": format!("BURST-{}", (client + i) % 20), "quantity": 1, "unit_price_cents": 100 }], "payment_token": "tok_ok" }),
                        )
                        .await;
                    match status {
                        StatusCode::ACCEPTED => {
                            accepted.push(body["order_id"].as_str().expect("id").to_owned());
                        }
                        StatusCode::SERVICE_UNAVAILABLE => refused += 1,
                        other => panic!("unexpected {other}: {body}"),
                    }
                }
                (accepted, refused)
            })
        })
        .collect();
    let mut accepted = vec![];
    for client in clients {
        let (ids, _refused) = client.await.expect("client");
        accepted.extend(ids);
    }
    assert!(!accepted.is_empty());
    for id in &accepted {
        api.order_settles(id, "confirmed").await;
    }

    let started = server
        .restart_every_process(Process::stop_cleanly, Duration::ZERO)
        .await;
    confirms_soon_after(&api, "BURST-0", "after", started).await;
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_started_while_the_broker_is_down_takes_orders_and_catches_up_after() {
    let mut broker = OwnBroker::start();
    let mut server = TestServer::distributed_on(&broker.address).await;
    let api = Api::from(&server);
    api.restock("DOWN", 100).await;
    confirms(&api, "DOWN", "before").await;

    broker.stop();
    // The order service starts (and listens) without the broker, and takes orders.
    server.replace_service("order", Process::kill_and_restart);
    let id = api.place("while-down", &[("DOWN", 1, 100)], "tok_ok").await;
    broker.resume();
    let back = Instant::now();
    api.order_settles(&id, "confirmed").await;
    confirms_soon_after(&api, "DOWN", "after", back).await;
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_away_every_process_stops_within_seconds_of_sigterm() {
    let mut broker = OwnBroker::start();
    let server = TestServer::distributed_on(&broker.address).await;
    let api = Api::from(&server);
    api.restock("TERM", 100).await;
    confirms(&api, "TERM", "before").await;
    broker.stop();
    // Records the relay cannot publish, and consumers that cannot fetch.
    for n in 0..3 {
        api.place(&format!("while-away-{n}"), &[("TERM", 1, 100)], "tok_ok")
            .await;
    }
    server.finish_within(Duration::from_secs(15)).await;
}
