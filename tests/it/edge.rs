//! The public edge under abuse, on the real binary: stalled and half-open requests,
//! more connections than the cap, more requests in progress than the server takes,
//! bodies that stop arriving; the server and the gateway.

use crate::support::{body, Api, Process, SETTLE};
use reqwest::StatusCode;
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `orderline serve` on `data` with extra flags.
fn serve_with(data: &Path, flags: &[&str]) -> Process {
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(flags.iter().map(|s| s.to_string()));
    Process::spawn(&args)
}

fn address(api: &Api) -> String {
    api.base.trim_start_matches("http://").to_owned()
}

/// A connection that sent `head` (and nothing more).
async fn stalled(address: &str, head: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("send");
    stream
}

/// The head of a POST to `path` that announces a body of 100 bytes.
fn announcing_a_body(path: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
}

/// What the server sends until it closes the connection; None if it is still open
/// after `limit`.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut received = vec![];
    let read = tokio::time::timeout(limit, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&received).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_requests_are_closed_by_the_server_and_others_are_served_meanwhile() {
    let dir = tempfile::tempdir().expect("dir");
    let node = serve_with(
        &dir.path().join("data"),
        &["--header-timeout-ms", "2000", "--body-timeout-ms", "2000"],
    );
    let api = node.api.clone();
    let at = address(&api);
    let mut connections = vec![];
    for i in 0..1000 {
        let head = if i % 2 == 0 {
            // Half a head, never finished.
            "POST /v1/orders HTTP/1.1\r\nHost: edge\r\n".to_owned()
        } else {
            // A whole head announcing a body that never comes.
            announcing_a_body("/v1/orders")
        };
        connections.push(stalled(&at, &head).await);
    }
    // Meanwhile the server answers others, commands included.
    let (status, _) = api.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    api.restock("EDGE", 5).await;

    // Every stalled request is closed by the server; those with a whole head are
    // answered 408 first.
    let mut answered_408 = 0;
    for (i, connection) in connections.iter_mut().enumerate() {
        let sent = until_closed(connection, SETTLE)
            .await
            .unwrap_or_else(|| panic!("stalled request {i} still open"));
        if sent.starts_with("HTTP/1.1 408") {
            assert!(sent.contains("application/problem+json"), "{sent}");
            answered_408 += 1;
        }
    }
    assert_eq!(answered_408, 500);
    node.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_a_new_connection_waits_until_one_closes() {
    let dir = tempfile::tempdir().expect("dir");
    let node = serve_with(
        &dir.path().join("data"),
        &["--max-connections", "8", "--header-timeout-ms", "1500"],
    );
    let api = node.api.clone();
    let at = address(&api);
    let mut idle = vec![];
    for _ in 0..8 {
        idle.push(TcpStream::connect(&at).await.expect("connect"));
    }
    let waiting = tokio::spawn({
        let api = api.clone();
        async move { api.get("/health").await.0 }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a ninth connection was served while eight were open"
    );
    // The idle connections are closed after the header timeout; the ninth is served.
    let status = tokio::time::timeout(SETTLE, waiting)
        .await
        .expect("served once a connection closed")
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    for mut connection in idle {
        assert!(until_closed(&mut connection, SETTLE).await.is_some());
    }
    node.kill();
}

/// Hold `n` requests in progress (heads announcing bodies that do not come), then
/// expect a new request to `path` shed with 503 and `Retry-After`, and `/health`
/// still answered.
async fn sheds_past(api: &Api, n: usize, path: &str) -> Vec<TcpStream> {
    let at = address(api);
    let head = announcing_a_body(path);
    let mut held = vec![];
    for _ in 0..n {
        held.push(stalled(&at, &head).await);
    }
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        // A held request that met a probe still in progress was itself shed (it was
        // answered): hold another in its place.
        for connection in &mut held {
            let mut buffer = [0u8; 64];
            let answered = match connection.try_read(&mut buffer) {
                Ok(_) => true,
                Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
            };
            if answered {
                *connection = stalled(&at, &head).await;
            }
        }
        let response = api
            .client
            .post(api.url(path))
            .json(&json!({}))
            .send()
            .await
            .expect("an answer");
        let status = response.status();
        let retry_after = response.headers().contains_key("retry-after");
        let (_, problem) = body(response).await;
        if status == StatusCode::SERVICE_UNAVAILABLE
            && problem["type"] == "urn:orderline:problem:busy"
        {
            assert!(retry_after, "a 503 without Retry-After");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never shed; last answer {status}: {problem}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // /health is not counted: it is answered by its handler, not shed.
    let (status, answer) = api.get("/health").await;
    assert!(
        answer["type"] != "urn:orderline:problem:busy",
        "/health was shed: {status} {answer}"
    );
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_cap_requests_are_shed_with_503_and_health_still_answers() {
    let dir = tempfile::tempdir().expect("dir");
    let node = serve_with(
        &dir.path().join("data"),
        &["--max-in-flight", "4", "--body-timeout-ms", "30000"],
    );
    let api = node.api.clone();
    let held = sheds_past(&api, 4, "/v1/orders").await;
    let (status, _) = api.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    drop(held);
    // Once the held requests are gone, requests are taken again.
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let (status, _) = api
            .post("/v1/inventory/EDGE/restock", json!({ "quantity": 1 }))
            .await;
        if status == StatusCode::ACCEPTED {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never taken again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_sheds_past_its_in_flight_cap() {
    let gateway =
        Process::gateway_to_nowhere(&["--max-in-flight", "2", "--body-timeout-ms", "30000"]);
    let held = sheds_past(&gateway.api, 2, "/v1/orders").await;
    drop(held);
    gateway.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_answered_408() {
    let dir = tempfile::tempdir().expect("dir");
    let node = serve_with(&dir.path().join("data"), &["--body-timeout-ms", "1000"]);
    let at = address(&node.api);
    let missing = "0190a0e4-1f00-7000-8000-000000000000";
    // A route that reads its body as JSON, and one that reads raw bytes.
    for path in [
        "/v1/orders".to_owned(),
        format!("/v1/shipments/{missing}/dispatch"),
    ] {
        let mut connection = stalled(&at, &announcing_a_body(&path)).await;
        connection.write_all(b"{\"customer").await.expect("part");
        let sent = until_closed(&mut connection, SETTLE)
            .await
            .expect("closed by the server");
        assert!(sent.starts_with("HTTP/1.1 408"), "{path}: {sent}");
        assert!(sent.contains("application/problem+json"), "{path}: {sent}");
    }
    node.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_passes_repeated_headers_answers_a_stopped_body_408_and_refuses_dot_segments() {
    // One upstream for every service: it answers with a header sent twice and the
    // path it was asked for.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", upstream.local_addr().expect("address"));
    let app = axum::Router::new().fallback(|uri: axum::http::Uri| async move {
        (
            axum::response::AppendHeaders([("vary", "origin"), ("vary", "accept")]),
            uri.path().to_owned(),
        )
    });
    let served = tokio::spawn(async move { axum::serve(upstream, app).await });
    let gateway = Process::spawn(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--order",
            &url,
            "--inventory",
            &url,
            "--payment",
            &url,
            "--shipping",
            &url,
            "--customer",
            &url,
            "--catalog",
            &url,
            "--cart",
            &url,
            "--notification",
            &url,
            "--body-timeout-ms",
            "1000",
        ]
        .map(String::from),
    );
    let client = reqwest::Client::new();
    let answer = client
        .get(format!("{}/v1/orders/o-1", gateway.api.base))
        .send()
        .await
        .expect("get");
    let vary: Vec<_> = answer.headers().get_all("vary").iter().cloned().collect();
    assert_eq!(
        vary,
        ["origin", "accept"],
        "every value of a repeated header"
    );

    // A body that stops arriving: 408 (not 413, which says the body was too large).
    let at = address(&gateway.api);
    let mut connection = stalled(&at, &announcing_a_body("/v1/orders")).await;
    connection.write_all(b"{\"customer").await.expect("part");
    let sent = until_closed(&mut connection, SETTLE)
        .await
        .expect("closed by the gateway");
    assert!(sent.starts_with("HTTP/1.1 408"), "{sent}");
    assert!(sent.contains("application/problem+json"), "{sent}");

    // Dot segments, plain or encoded, would be routed by one path and sent on as
    // another: refused, and nothing reaches a service.
    for path in [
        "/v1/inventory/%2e%2e/orders",
        "/v1/inventory/%2E./orders",
        "/v1/inventory/../orders",
        "/v1/orders/./o-1",
    ] {
        let mut connection = TcpStream::connect(&at).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n");
        connection
            .write_all(request.as_bytes())
            .await
            .expect("send");
        let sent = until_closed(&mut connection, SETTLE)
            .await
            .expect("answered");
        assert!(sent.starts_with("HTTP/1.1 400"), "{path}: {sent}");
        assert!(sent.contains("application/problem+json"), "{path}: {sent}");
    }
    gateway.kill();
    served.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_pages_every_services_dead_letters_in_one_order() {
    // Each service answers its own two dead letters (the page it is asked for).
    let mut urls = vec![];
    let mut served = vec![];
    for service in [
        "order",
        "inventory",
        "payment",
        "shipping",
        "customer",
        "catalog",
        "cart",
        "notification",
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        urls.push(format!(
            "http://{}",
            listener.local_addr().expect("address")
        ));
        let app = axum::Router::new().route(
            "/v1/dead-letters",
            axum::routing::get(move || async move {
                let letter = |n: u32| json!({ "id": format!("{service}:{n}") });
                axum::Json(json!({ "dead_letters": [letter(2), letter(1)], "next_cursor": null }))
            }),
        );
        served.push(tokio::spawn(
            async move { axum::serve(listener, app).await },
        ));
    }
    let gateway = Process::spawn(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--order",
            &urls[0],
            "--inventory",
            &urls[1],
            "--payment",
            &urls[2],
            "--shipping",
            &urls[3],
            "--customer",
            &urls[4],
            "--catalog",
            &urls[5],
            "--cart",
            &urls[6],
            "--notification",
            &urls[7],
        ]
        .map(String::from),
    );
    let (status, page) = gateway.api.get("/v1/dead-letters?limit=3").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let ids: Vec<&str> = page["dead_letters"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|l| l["id"].as_str())
        .collect();
    assert_eq!(ids, ["order:1", "order:2", "inventory:1"]);
    assert_eq!(page["next_cursor"], "inventory:1");
    let (status, all) = gateway.api.get("/v1/dead-letters").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["dead_letters"].as_array().map(Vec::len), Some(16));
    assert!(all["next_cursor"].is_null());
    let (status, problem) = gateway.api.get("/v1/dead-letters?limit=0").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    gateway.kill();
    for task in served {
        task.abort();
    }
}
