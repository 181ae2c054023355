//! Every request decoder of the public API under arbitrary input, in process: paths
//! with arbitrary segments, arbitrary query strings, headers (idempotency keys,
//! consistency tokens, content types) and bodies (arbitrary bytes, arbitrary JSON,
//! and valid requests with one field damaged). Whatever arrives is answered below
//! 500, every refusal as problem+json, and nothing panics.

use axum::body::Body;
use axum::http::{Method, Request};
use axum::Router;
use proptest::prelude::*;
use proptest::test_runner::{Config as Cases, TestRunner};
use serde_json::{json, Value};
use tower::ServiceExt;

/// Any JSON value, a few levels deep, with the names and shapes the requests use.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-3i64..1_000_000).prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,16}".prop_map(Value::from),
        prop::sample::select(vec!["SKU-1", "c-1", "tok_ok", "tok_decline", "", " "])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(field_name(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "customer_id",
            "lines",
            "sku",
            "quantity",
            "unit_price_cents",
            "payment_token",
            "reason",
            "note",
        ])
        .prop_map(String::from),
        "[a-z_]{1,12}",
    ]
}

/// A valid request body for each command route, to damage one field of.
fn valid_body(route: usize) -> Value {
    match route {
        0 => json!({
            "customer_id": "c-1",
            "lines": [{ "sku": "SKU-1", "quantity": 1, "unit_price_cents": 100 }],
            "payment_token": "tok_ok",
        }),
        1 => json!({ "reason": "customer_request" }),
        _ => json!({ "quantity": 3 }),
    }
}

/// A body: arbitrary bytes, arbitrary JSON, or a valid body with one field (at any
/// depth of the first level) replaced or removed.
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..128),
        any_json().prop_map(|v| v.to_string().into_bytes()),
        (0..3usize, field_name(), proptest::option::of(any_json())).prop_map(
            |(route, name, value)| {
                let mut body = valid_body(route);
                if let Some(fields) = body.as_object_mut() {
                    match value {
                        Some(value) => fields.insert(name, value),
                        None => fields.remove(&name),
                    };
                }
                body.to_string().into_bytes()
            }
        ),
    ]
}

/// A path segment: an id that may exist, a uuid, arbitrary text (percent-encoded as
/// a client would send it), or raw bytes a client should not send.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "SKU-1",
            "0190a0e4-1f00-7000-8000-000000000000",
            "orders",
            "inventory",
            "order",
            "%FF",
            "%2e%2e",
            "..",
            "",
            "inventory:1",
        ])
        .prop_map(String::from),
        "\\PC{1,24}".prop_map(|s| s
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            })
            .collect()),
    ]
}

/// Every route of the public API, with arbitrary path segments.
fn any_target() -> impl Strategy<Value = (Method, String)> {
    (0..18usize, segment(), segment()).prop_map(|(route, a, b)| match route {
        0 => (Method::POST, "/v1/orders".to_owned()),
        1 => (Method::POST, format!("/v1/orders/{a}/cancel")),
        2 => (Method::POST, format!("/v1/inventory/{a}/restock")),
        3 => (Method::POST, format!("/v1/shipments/{a}/dispatch")),
        4 => (Method::POST, format!("/v1/shipments/{a}/deliver")),
        5 => (Method::GET, "/v1/orders".to_owned()),
        6 => (Method::GET, format!("/v1/orders/{a}")),
        7 => (Method::GET, format!("/v1/inventory/{a}")),
        8 => (Method::GET, format!("/v1/payments/{a}")),
        9 => (Method::GET, format!("/v1/shipments/{a}")),
        10 => (Method::GET, format!("/v1/streams/{a}/{b}")),
        11 => (Method::GET, "/v1/projections".to_owned()),
        12 => (Method::POST, format!("/v1/projections/{a}/rebuild")),
        13 => (Method::GET, "/v1/dead-letters".to_owned()),
        14 => (Method::POST, format!("/v1/dead-letters/{a}/retry")),
        15 => (Method::DELETE, format!("/v1/orders/{a}")),
        16 => (Method::GET, format!("/{a}/{b}")),
        _ => (Method::PUT, "/v1/orders".to_owned()),
    })
}

/// A query string of the parameters the reads take, with arbitrary values.
fn any_query() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec![
        "limit",
        "cursor",
        "after",
        "from_version",
        "status",
        "customer_id",
        "x",
    ]);
    let value = prop_oneof![
        (-5i64..2000).prop_map(|n| n.to_string()),
        prop::sample::select(vec!["", "placed", "confirmed", "%FF", "1e3", "0x10"])
            .prop_map(String::from),
        "[ -~]{0,12}".prop_map(|s| s.replace(['&', '#', ' '], "_")),
    ];
    proptest::collection::vec((name, value), 0..3).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    })
}

/// Headers a client may send, valid or not.
fn any_headers() -> impl Strategy<Value = Vec<(&'static str, Vec<u8>)>> {
    let header = prop_oneof![
        "[ -~]{0,40}".prop_map(|v| ("idempotency-key", v.into_bytes())),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(|v| ("idempotency-key", v)),
        prop::sample::select(vec![
            "0",
            "1",
            "x",
            "-1",
            "order:a:1",
            "inventory:SKU-1:1",
            ""
        ])
        .prop_map(|v| ("x-consistency-token", v.as_bytes().to_vec())),
        prop::sample::select(vec!["0", "10", "-1", "40000", "x"])
            .prop_map(|v| ("x-consistency-wait-ms", v.as_bytes().to_vec())),
        prop::sample::select(vec![
            "application/json",
            "text/plain",
            "",
            "application/json; charset=utf-8"
        ])
        .prop_map(|v| ("content-type", v.as_bytes().to_vec())),
    ];
    proptest::collection::vec(header, 0..3)
}

#[test]
fn no_input_makes_the_server_fail_or_answer_outside_problem_json() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("dir");
    let mut config = infra::Config::with_data_dir(dir.path().join("data"));
    config.auth = infra::auth::AuthSettings::off();
    config.payment_timeout = std::time::Duration::from_secs(30);
    let system = runtime
        .block_on(orderline::System::start(config))
        .expect("system starts");
    let router: Router = system.router();
    // Something to find: an order and a SKU.
    runtime.block_on(async {
        for (path, body) in [
            ("/v1/inventory/SKU-1/restock", valid_body(2)),
            ("/v1/orders", valid_body(0)),
        ] {
            let request = Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .expect("request");
            let response = router.clone().oneshot(request).await.expect("answer");
            assert!(
                response.status().is_success(),
                "{path}: {}",
                response.status()
            );
        }
    });

    let cases = std::env::var("ORDERLINE_DECODER_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(768);
    let mut runner = TestRunner::new(Cases {
        cases,
        failure_persistence: None,
        ..Cases::default()
    });
    let input = (any_target(), any_query(), any_headers(), any_body());
    runner
        .run(&input, |((method, path), query, headers, body)| {
            let uri = if query.is_empty() {
                path.clone()
            } else {
                format!("{path}?{query}")
            };
            let mut request = Request::builder().method(method.clone()).uri(&uri);
            for (name, value) in &headers {
                request = request.header(*name, value.as_slice());
            }
            // A request the HTTP layer would not have let through (a URI or header
            // that does not parse) is not the decoders' to answer.
            let Ok(request) = request.body(Body::from(body.clone())) else {
                return Ok(());
            };
            let response = runtime
                .block_on(router.clone().oneshot(request))
                .expect("an answer");
            let status = response.status();
            let problem = response
                .headers()
                .get("content-type")
                .is_some_and(|t| t == "application/problem+json");
            let shown = || {
                format!(
                    "{method} {uri} {headers:?} {}",
                    String::from_utf8_lossy(&body)
                )
            };
            prop_assert!(status.as_u16() < 500, "{status} for {}", shown());
            prop_assert!(
                status.is_success() || problem,
                "{status} without problem+json for {}",
                shown()
            );
            Ok(())
        })
        .unwrap_or_else(|failure| panic!("{failure}"));
    runtime.block_on(system.stop());
}
