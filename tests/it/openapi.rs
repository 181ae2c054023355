//! The OpenAPI document against what is served: the embedded server and the gateway
//! serve the whole contract at `/openapi.json`; every operation it describes is
//! routed (no answer from the router's fallback: 404 "no such resource" or 405); and
//! `docs/openapi.json` is the document as the code generates it
//! (`ORDERLINE_BLESS=1` rewrites it).

use crate::support::{body, Api, Backend, Process, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::PathBuf;

fn generated() -> Value {
    serde_json::to_value(orderline::openapi::document()).expect("document")
}

/// `path` with each `{parameter}` filled in with a value of the right shape.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|segment| match segment {
            "{order_id}" => "0190a0e4-1f00-7000-8000-000000000000",
            "{sku}" => "SKU-1",
            "{aggregate_type}" => "order",
            "{aggregate_id}" => "0190a0e4-1f00-7000-8000-000000000000",
            "{name}" => "nope",
            "{id}" => "order:999",
            other if other.starts_with('{') => "x",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_described_operation_is_served_and_the_document_is_the_one_generated() {
    let server = TestServer::on(Backend::Sqlite).await;
    let api = Api::from(&server);
    let (status, served) = api.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let document = generated();
    assert_eq!(
        served, document,
        "the embedded server serves the whole contract"
    );

    let mut operations = 0;
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("operations").keys() {
            let method: Method = method.to_uppercase().parse().expect("method");
            let mut request = api.client.request(method.clone(), api.url(&concrete(path)));
            if method == Method::POST {
                request = request.json(&json!({}));
            }
            let response = request.send().await.expect("an answer");
            let status = response.status();
            let (_, answer) = body(response).await;
            let unrouted = status == StatusCode::METHOD_NOT_ALLOWED
                || (status == StatusCode::NOT_FOUND && answer["detail"] == "no such resource");
            assert!(
                !unrouted,
                "{method} {path} is described but not served: {status} {answer}"
            );
            operations += 1;
        }
    }
    assert!(operations >= 18, "{operations} operations");
    // A route nobody described is not served either.
    let (status, answer) = api.get("/v1/nothing-here").await;
    assert_eq!(
        (status, answer["detail"].clone()),
        (StatusCode::NOT_FOUND, json!("no such resource"))
    );
    server.finish().await;

    // The gateway serves the same document.
    let gateway = Process::gateway_to_nowhere(&[]);
    let (status, served) = gateway.api.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, document, "the gateway serves the whole contract");
    gateway.kill();

    // docs/openapi.json is the document the code generates.
    let copy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let text = orderline::openapi::document()
        .to_pretty_json()
        .expect("json")
        + "\n";
    if std::env::var("ORDERLINE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&copy, &text).expect("write docs/openapi.json");
    }
    let checked_in = std::fs::read_to_string(&copy).unwrap_or_default();
    assert!(
        checked_in == text,
        "docs/openapi.json differs from the document the code generates; run the test with ORDERLINE_BLESS=1 to update it"
    );
}
