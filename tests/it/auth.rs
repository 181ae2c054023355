//! The secured API (auth on): customers register, log in and act for themselves
//! only; operators hold the operator routes; every protected route refuses missing,
//! expired, forged and foreign tokens; refresh tokens work once; clients past their
//! rate get 429.

use crate::support::{
    bearer, body, log_in, on_every_backend, sign_up_as, Api, Backend, TestServer, PASSWORD, SETTLE,
};
use infra::auth::{access, Access, RateLimit, AUDIENCE, ISSUER};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

on_every_backend!(
    a_customer_registers_logs_in_and_follows_its_own_order_to_delivery,
    every_protected_route_refuses_missing_expired_forged_and_foreign_tokens,
);

/// Register `email` (201), log in; the customer's id and a client with its token.
async fn customer(server: &TestServer, email: &str, name: &str) -> (String, Api, Value) {
    let (id, api, tokens) = sign_up_as(server, email, name).await;
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 900);
    (id, api, tokens)
}

async fn login(anyone: &Api, email: &str) -> Value {
    let tokens = log_in(anyone, email).await;
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 900);
    tokens
}

async fn a_customer_registers_logs_in_and_follows_its_own_order_to_delivery(backend: Backend) {
    let (server, secrets) = TestServer::secured(backend, None).await;
    let anyone = Api::from(&server);
    let operator = bearer(&server.base, &secrets.operator);

    // One email registers once, even when its registrations race.
    let email = format!("ada-{}@example.com", uuid::Uuid::now_v7().simple());
    let racing = (0..8).map(|i| {
        let anyone = anyone.clone();
        let email = if i % 2 == 0 {
            email.clone()
        } else {
            email.to_uppercase()
        };
        async move {
            anyone
                .post(
                    "/v1/customers",
                    json!({ "email": email, "password": PASSWORD, "name": "Ada" }),
                )
                .await
        }
    });
    let answers = futures_util::future::join_all(racing).await;
    let created: Vec<&Value> = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::CREATED)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    assert!(answers
        .iter()
        .all(|(status, _)| [StatusCode::CREATED, StatusCode::CONFLICT].contains(status)));
    let ada_id = created[0]["customer_id"].as_str().expect("id").to_owned();
    let (status, short) = anyone
        .post(
            "/v1/customers",
            json!({ "email": "bob@example.com", "password": "too short", "name": "Bob" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{short}");

    // A wrong password and an unknown email get the same answer.
    let (wrong, wrong_body) = anyone
        .post(
            "/v1/auth/login",
            json!({ "email": email, "password": "not the password" }),
        )
        .await;
    let (unknown, unknown_body) = anyone
        .post(
            "/v1/auth/login",
            json!({ "email": "nobody@example.com", "password": PASSWORD }),
        )
        .await;
    assert_eq!(
        (wrong, unknown),
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED)
    );
    assert_eq!(wrong_body["detail"], unknown_body["detail"]);

    let tokens = login(&anyone, &email).await;
    let ada = bearer(
        &server.base,
        tokens["access_token"].as_str().expect("access token"),
    );
    ada.eventually("/v1/customers/me", "Ada's profile", |me| {
        me["customer_id"] == ada_id.as_str() && me["email"] == email.as_str()
    })
    .await;
    let (status, renamed) = ada
        .send(
            Method::PATCH,
            "/v1/customers/me",
            json!({ "name": "Ada L." }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{renamed}");
    ada.eventually("/v1/customers/me", "renamed", |me| me["name"] == "Ada L.")
        .await;
    let (status, _) = operator.get("/v1/customers/me").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "an operator has no profile");

    // Ada orders for herself; naming someone else is refused.
    let (status, product) = operator
        .post(
            "/v1/products",
            json!({ "sku": "S-1", "name": "Tea", "description": "", "price_cents": 500 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{product}");
    operator.restock("S-1", 10).await;
    let lines = json!([{ "sku": "S-1", "quantity": 2, "unit_price_cents": 500 }]);
    // (The order service learns the product's price from the catalog's events.)
    let start = std::time::Instant::now();
    let (status, placed) = loop {
        let answer = ada
            .post(
                "/v1/orders",
                json!({ "lines": lines, "payment_token": "tok_ok" }),
            )
            .await;
        if answer.0 != StatusCode::UNPROCESSABLE_ENTITY || start.elapsed() > SETTLE {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    let order_id = placed["order_id"].as_str().expect("order id").to_owned();
    let (status, _) = ada
        .post(
            "/v1/orders",
            json!({ "customer_id": "someone-else", "lines": lines, "payment_token": "tok_ok" }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let order = ada.order_settles(&order_id, "confirmed").await;
    assert_eq!(order["customer_id"], ada_id.as_str());

    // Another customer sees none of it.
    let bob_email = format!("bob-{}@example.com", uuid::Uuid::now_v7().simple());
    let (bob_id, bob, _) = customer(&server, &bob_email, "Bob").await;
    let (status, _) = bob.get(&format!("/v1/orders/{order_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another customer's order");
    let (status, _) = bob
        .post(&format!("/v1/orders/{order_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "cancelling another's order");
    let (status, page) = bob.get("/v1/orders").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"], json!([]), "Bob has no orders");
    let (status, _) = bob.get(&format!("/v1/orders?customer_id={ada_id}")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    bob.eventually("/v1/customers/me", "Bob's own profile", |me| {
        me["customer_id"] == bob_id.as_str()
    })
    .await;
    let (status, page) = ada.get("/v1/orders").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"][0]["order_id"], order_id.as_str());
    let (status, _) = operator.get(&format!("/v1/orders/{order_id}")).await;
    assert_eq!(status, StatusCode::OK, "operators see every order");

    // Operators ship it; the customer cannot.
    let (status, _) = ada
        .post(&format!("/v1/shipments/{order_id}/dispatch"), json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for step in ["dispatch", "deliver"] {
        let (status, answer) = operator
            .post(&format!("/v1/shipments/{order_id}/{step}"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{step}: {answer}");
    }
    ada.order_settles(&order_id, "delivered").await;

    // A refresh token works once; its reuse ends the whole login.
    let first = tokens["refresh_token"].as_str().expect("refresh token");
    let (status, second) = anyone
        .post("/v1/auth/refresh", json!({ "refresh_token": first }))
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let renewed = bearer(
        &server.base,
        second["access_token"].as_str().expect("token"),
    );
    let (status, _) = renewed.get("/v1/customers/me").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = anyone
        .post("/v1/auth/refresh", json!({ "refresh_token": first }))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a used refresh token");
    let (status, _) = anyone
        .post(
            "/v1/auth/refresh",
            json!({ "refresh_token": second["refresh_token"] }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the login ended");
    for client in [&ada, &renewed] {
        let (status, _) = client.get("/v1/customers/me").await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "the login's access tokens"
        );
        // Everywhere: behind the gateway, once its word from the customer service
        // (kept two seconds) has passed.
        refused_within(client, "/v1/orders", Duration::from_secs(10)).await;
    }

    // Logout ends a login too.
    let tokens = login(&anyone, &email).await;
    let refresh = json!({ "refresh_token": tokens["refresh_token"] });
    let (status, _) = anyone.post("/v1/auth/logout", refresh.clone()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = anyone.post("/v1/auth/refresh", refresh).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = anyone
        .post("/v1/auth/refresh", json!({ "refresh_token": "forged" }))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.finish().await;
}

/// Wait until GET `path` answers 401; panics after `limit`.
async fn refused_within(api: &Api, path: &str, limit: Duration) {
    let start = std::time::Instant::now();
    loop {
        let (status, answer) = api.get(path).await;
        if status == StatusCode::UNAUTHORIZED {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{path} still answers {status} with a token of an ended login: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A path of the document with its parameters filled in.
fn concrete(path: &str, order_id: &str) -> String {
    path.replace("{sku}", "S-1")
        .replace("{order_id}", order_id)
        .replace("{aggregate_type}", "order")
        .replace("{aggregate_id}", order_id)
        .replace("{name}", "orders")
        .replace("{id}", "order:1")
}

fn claims(audience: &str, expires_in: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "sub": "c-1",
        "sid": uuid::Uuid::now_v7(),
        "iss": ISSUER,
        "aud": audience,
        "iat": now,
        "exp": now + expires_in,
    })
}

/// A token that says `alg: none` and carries no signature.
fn unsigned() -> String {
    use base64::Engine;
    let encode = |value: Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string().as_bytes())
    };
    format!(
        "{}.{}.",
        encode(json!({ "alg": "none", "typ": "JWT" })),
        encode(claims(AUDIENCE, 600))
    )
}

async fn every_protected_route_refuses_missing_expired_forged_and_foreign_tokens(backend: Backend) {
    let (server, secrets) = TestServer::secured(backend, None).await;
    let email = format!("eve-{}@example.com", uuid::Uuid::now_v7().simple());
    let (_, eve, _) = customer(&server, &email, "Eve").await;
    let forged: [(&str, String); 5] = [
        ("no token", String::new()),
        (
            "an expired token",
            secrets.sign(&claims(AUDIENCE, -120), &secrets.signing),
        ),
        (
            "a token signed with another key",
            secrets.sign(&claims(AUDIENCE, 600), "another key of 32 bytes or more.."),
        ),
        ("a token of alg none", unsigned()),
        (
            "a token for another audience",
            secrets.sign(&claims("someone-else", 600), &secrets.signing),
        ),
    ];
    let order_id = uuid::Uuid::now_v7().to_string();
    let document = serde_json::to_value(orderline::openapi::document()).expect("document");
    let paths = document["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, item) in paths {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let method: Method = method.to_uppercase().parse().expect("method");
            let route = access(&method, path);
            if route == Access::Open {
                continue;
            }
            let url = server.url(&concrete(path, &order_id));
            for (what, token) in &forged {
                let mut request = server.client.request(method.clone(), &url).json(&json!({}));
                if !token.is_empty() {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await.expect("request");
                let challenge = response.headers().get("www-authenticate").cloned();
                let (status, problem) = body(response).await;
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} with {what}: {problem}"
                );
                assert!(
                    challenge.is_some(),
                    "{method} {path}: a 401 says how to authenticate"
                );
                assert_eq!(problem["status"], 401);
                // No secret in an error body.
                if !token.is_empty() {
                    assert!(!problem.to_string().contains(token.as_str()), "{problem}");
                }
                assert!(!problem.to_string().contains(&secrets.signing));
            }
            let (status, problem) = eve
                .send(method.clone(), &concrete(path, &order_id), json!({}))
                .await;
            match route {
                Access::Operator => assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "a customer on {method} {path}: {problem}"
                ),
                _ => assert!(
                    ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&status),
                    "a customer on its own route {method} {path}: {status} {problem}"
                ),
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 17,
        "only {checked} protected routes in the document"
    );
    let operator = bearer(&server.base, &secrets.operator);
    let (status, _) = operator.get("/v1/projections").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the operator token opens operator routes"
    );
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_rate_a_client_is_answered_429_with_retry_after() {
    past_its_rate_a_client_is_limited(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_gateway_past_its_rate_a_client_is_answered_429_with_retry_after() {
    past_its_rate_a_client_is_limited(Backend::Distributed).await
}

async fn past_its_rate_a_client_is_limited(backend: Backend) {
    let limit = RateLimit {
        per_second: 1,
        burst: 5,
    };
    let (server, secrets) = TestServer::secured(backend, Some(limit)).await;
    let operator = bearer(&server.base, &secrets.operator);
    let mut statuses = vec![];
    // A quick route (distributed, the listing of projections gathers every service's
    // and can take longer than the bucket takes to refill).
    for _ in 0..10 {
        let response = operator
            .client
            .get(operator.url("/v1/inventory/S-1"))
            .send()
            .await
            .expect("request");
        let retry_after = response.headers().get("retry-after").cloned();
        let (status, _) = body(response).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert!(retry_after.is_some(), "a 429 says when to come back");
        }
        statuses.push(status);
    }
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(limited >= 2, "{statuses:?}");
    assert_eq!(
        statuses[0],
        StatusCode::NOT_FOUND,
        "no stock yet, and not limited"
    );
    // Another client has a bucket of its own.
    let (status, _) = Api::from(&server)
        .post(
            "/v1/customers",
            json!({ "email": "rate@example.com", "password": PASSWORD, "name": "R" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    server.finish().await;
}
