//! The gateway: the whole public API on one port, in front of the service processes
//! of the distributed deployment. Each request goes to the service that owns what it
//! names; the operator listings (`/v1/projections`, `/v1/dead-letters`), `/health`
//! and `/metrics` gather every service's.
//!
//! Tokens are checked by the services, which the gateway passes them on to. Two
//! rules need the whole deployment and are kept here: a customer's access token is
//! vouched for by the customer service (which keeps the logins) before a request
//! goes to another service, so a token of an ended login stops working everywhere;
//! and each client's rate is limited here, where the client's address is known.

use axum::body::to_bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use infra::auth::{Limiter, RateLimit};
use infra::dead_letters;
use infra::http::{ApiError, MAX_BODY_BYTES};
use schemas::topics::{AggregateType, ProjectionName, Service};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where each service listens (`http://host:port`), and each client's rate.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub services: Vec<(Service, String)>,
    /// Requests a second and burst per client (a token, else an address).
    pub rate_limit: Option<RateLimit>,
}

impl Upstreams {
    fn url(&self, service: Service) -> Option<&str> {
        self.services
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, url)| url.trim_end_matches('/'))
    }
}

struct Gateway {
    upstreams: Upstreams,
    client: reqwest::Client,
    limiter: Option<Limiter>,
    /// Customers' tokens the customer service vouched for, by digest, and when.
    vouched: Mutex<HashMap<String, Instant>>,
}

/// How long the customer service's word on a token is taken.
const VOUCHED_FOR: Duration = Duration::from_secs(2);
/// The most tokens remembered as vouched for (then all are forgotten).
const MAX_VOUCHED: usize = 100_000;

pub fn router(upstreams: Upstreams, limits: &infra::serve::Limits) -> anyhow::Result<Router> {
    let client = reqwest::Client::builder()
        .timeout(limits.request_timeout)
        // Idle connections are dropped before a service's header timeout closes them
        // (which could meet a request on its way).
        .pool_idle_timeout(limits.header_timeout / 2)
        .build()?;
    let limiter = upstreams.rate_limit.map(Limiter::new);
    let gateway = Arc::new(Gateway {
        upstreams,
        client,
        limiter,
        vouched: Mutex::new(HashMap::new()),
    });
    // Operators' /health and /metrics stay outside the cap on requests in progress
    // and the rate limits.
    let limited = limits.apply(
        Router::new()
            .route("/v1/projections", get(projections))
            .route("/v1/dead-letters", get(dead_letters))
            .fallback(proxy)
            .layer(axum::middleware::from_fn_with_state(gateway.clone(), rate))
            .with_state(gateway.clone()),
    );
    Ok(limited
        .merge(
            Router::new()
                .route("/health", get(health))
                .route("/metrics", get(metrics))
                .with_state(gateway),
        )
        // The whole contract, as the embedded server describes it.
        .merge(crate::openapi::serving(crate::openapi::document()))
        .layer(axum::middleware::from_fn(infra::http::problem_json)))
}

/// The service that owns what a request names.
pub fn owner(method: &Method, path: &str) -> Option<Service> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "inventory", ..] => Some(Service::Inventory),
        ["v1", "orders", ..] => Some(Service::Order),
        ["v1", "shipments", _, "dispatch" | "deliver"] if method == Method::POST => {
            Some(Service::Order)
        }
        ["v1", "shipments", ..] => Some(Service::Shipping),
        ["v1", "payments", ..] => Some(Service::Payment),
        ["v1", "customers" | "auth", ..] => Some(Service::Customer),
        ["v1", "products", ..] => Some(Service::Catalog),
        ["v1", "cart", ..] => Some(Service::Cart),
        ["v1", "notifications", ..] => Some(Service::Notification),
        ["v1", "streams", aggregate_type, ..] => aggregate_type
            .parse::<AggregateType>()
            .ok()
            .map(AggregateType::service),
        ["v1", "projections", name, ..] => name
            .parse::<ProjectionName>()
            .ok()
            .map(ProjectionName::service),
        ["v1", "dead-letters", id, ..] => id.split(':').next()?.parse().ok(),
        _ => None,
    }
}

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

fn unavailable(service: Service, error: impl std::fmt::Display) -> ApiError {
    tracing::warn!(%service, error = %error, "upstream unavailable");
    let mut problem = ApiError::not_yet_consistent(1);
    problem.status = StatusCode::BAD_GATEWAY;
    problem.kind = "upstream-unavailable";
    problem.title = "Service unavailable";
    problem.detail = format!("the {service} service did not answer; retry");
    problem
}

async fn proxy(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    // The upstream URL is normalised (a `..` segment, also written `%2e%2e`, takes
    // the one before it away): a path with such segments would reach another
    // resource than the one it was routed by.
    if path.split('/').any(dot_segment) {
        return ApiError::malformed("the path may not hold `.` or `..` segments").into_response();
    }
    let Some(service) = owner(&parts.method, &path) else {
        return ApiError::not_found("no such resource").into_response();
    };
    let Some(base) = gateway.upstreams.url(service) else {
        return unavailable(service, "no address configured").into_response();
    };
    if service != Service::Customer {
        if let Err(refused) = gateway.vouch(&parts.headers).await {
            return refused;
        }
    }
    let body = match to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(error) => return infra::http::unreadable_body(&error).into_response(),
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let mut upstream = gateway
        .client
        .request(parts.method.clone(), format!("{base}{path}{query}"))
        .body(body);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            upstream = upstream.header(name, value);
        }
    }
    match upstream.send().await {
        Err(error) => unavailable(service, error).into_response(),
        Ok(answer) => {
            let status = answer.status();
            let headers = forwarded(answer.headers());
            match answer.bytes().await {
                Ok(bytes) => (status, headers, bytes).into_response(),
                Err(error) => unavailable(service, error).into_response(),
            }
        }
    }
}

/// The bearer token of a request, when it has the shape of an access token (a JWT:
/// three parts); the operator token is not one.
fn access_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (token.split('.').count() == 3).then_some(token)
}

impl Gateway {
    /// Let a request with a customer's access token on only if the customer service
    /// (which keeps the logins) takes the token: its answer to the token on
    /// `/v1/customers/me`, remembered for [`VOUCHED_FOR`]. A refusal (401) is the
    /// caller's answer.
    async fn vouch(&self, headers: &HeaderMap) -> Result<(), Response> {
        let Some(token) = access_token(headers) else {
            return Ok(());
        };
        let key = infra::auth::digest(token);
        let now = Instant::now();
        let fresh = |vouched: &HashMap<String, Instant>| {
            vouched
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < VOUCHED_FOR)
        };
        if fresh(&self.vouched.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(());
        }
        let Some(base) = self.upstreams.url(Service::Customer) else {
            return Err(unavailable(Service::Customer, "no address configured").into_response());
        };
        let answer = self
            .client
            .get(format!("{base}/v1/customers/me"))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|error| unavailable(Service::Customer, error).into_response())?;
        let status = answer.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::TOO_MANY_REQUESTS {
            let headers = forwarded(answer.headers());
            let body = answer.bytes().await.unwrap_or_default();
            return Err((status, headers, body).into_response());
        }
        if status.is_server_error() {
            return Err(
                unavailable(Service::Customer, format!("answered {status}")).into_response()
            );
        }
        let mut vouched = self.vouched.lock().unwrap_or_else(|p| p.into_inner());
        if vouched.len() >= MAX_VOUCHED {
            vouched.clear();
        }
        vouched.insert(key, now);
        Ok(())
    }
}

/// Each client's rate: its token's bucket, else its address's; past it, 429.
async fn rate(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    if let Some(limiter) = &gateway.limiter {
        let client = match request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
        {
            Some(credentials) => format!("token:{}", infra::auth::digest(credentials)),
            None => match request.extensions().get::<ConnectInfo<SocketAddr>>() {
                Some(ConnectInfo(peer)) => format!("address:{}", peer.ip()),
                None => "address:unknown".to_owned(),
            },
        };
        if let Err(wait) = limiter.check(&client) {
            return ApiError::rate_limited(wait.max(1)).into_response();
        }
    }
    next.run(request).await
}

/// `.` or `..`, plainly or percent-encoded (as URL parsers read them).
fn dot_segment(segment: &str) -> bool {
    let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
    decoded == "." || decoded == ".."
}

fn forwarded(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            // `append`: a header the service sent several times (e.g. `Vary`,
            // `Set-Cookie`) is passed on with every value.
            out.append(HeaderName::from(name), value.clone());
        }
    }
    out
}

/// GET `path` from every service with the caller's credentials: (service, JSON body
/// or why not). A service's refusal of the credentials (401, 403, 429) is the
/// caller's answer, as it is.
async fn gather(
    gateway: &Gateway,
    path: &str,
    caller: &HeaderMap,
) -> Result<Vec<(Service, Result<Value, String>)>, Response> {
    let mut out = vec![];
    for (service, base) in &gateway.upstreams.services {
        let mut request = gateway
            .client
            .get(format!("{}{path}", base.trim_end_matches('/')));
        if let Some(credentials) = caller.get(header::AUTHORIZATION) {
            request = request.header(header::AUTHORIZATION, credentials);
        }
        let answer = match request.send().await {
            Err(error) => Err(error.to_string()),
            Ok(response) => {
                let status = response.status();
                if refusal(status) {
                    let headers = forwarded(response.headers());
                    let body = response.bytes().await.unwrap_or_default();
                    return Err((status, headers, body).into_response());
                }
                if status.is_success() {
                    response.json::<Value>().await.map_err(|e| e.to_string())
                } else {
                    Err(format!("answered {status}"))
                }
            }
        };
        out.push((*service, answer));
    }
    Ok(out)
}

/// A service's refusal of the caller (not a fault of the service).
fn refusal(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
    )
}

async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    let mut services = serde_json::Map::new();
    let mut healthy = true;
    let answers = match gather(&gateway, "/health", &HeaderMap::new()).await {
        Ok(answers) => answers,
        Err(refused) => return refused,
    };
    for (service, answer) in answers {
        healthy &= answer.is_ok();
        services.insert(
            service.to_string(),
            match answer {
                Ok(_) => json!("ok"),
                Err(error) => json!(error),
            },
        );
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({ "status": if healthy { "ok" } else { "degraded" }, "services": services });
    (status, Json(body)).into_response()
}

/// Concatenate a list field of every service's answer.
async fn listing(gateway: &Gateway, path: &str, field: &str, caller: &HeaderMap) -> Response {
    let answers = match gather(gateway, path, caller).await {
        Ok(answers) => answers,
        Err(refused) => return refused,
    };
    let mut items = vec![];
    for (service, answer) in answers {
        match answer {
            Ok(body) => items.extend(body[field].as_array().cloned().unwrap_or_default()),
            Err(error) => return unavailable(service, error).into_response(),
        }
    }
    Json(json!({ field: items })).into_response()
}

async fn projections(State(gateway): State<Arc<Gateway>>, caller: HeaderMap) -> Response {
    listing(&gateway, "/v1/projections", "projections", &caller).await
}

/// A page of every service's dead letters: each service is asked for the same page
/// (its first `limit` after the cursor), and the first `limit` of them all, in order
/// of service then number, are the page.
async fn dead_letters(
    State(gateway): State<Arc<Gateway>>,
    params: Result<Query<dead_letters::PageParams>, QueryRejection>,
    RawQuery(query): RawQuery,
    caller: HeaderMap,
) -> Response {
    let page = match params
        .map_err(|e| ApiError::malformed(e.body_text()))
        .and_then(|Query(params)| params.page().map_err(ApiError::invalid))
    {
        Ok(page) => page,
        Err(problem) => return problem.into_response(),
    };
    let path = match query {
        Some(query) => format!("/v1/dead-letters?{query}"),
        None => "/v1/dead-letters".to_owned(),
    };
    let mut items = vec![];
    let mut more = false;
    let answers = match gather(&gateway, &path, &caller).await {
        Ok(answers) => answers,
        Err(refused) => return refused,
    };
    for (service, answer) in answers {
        match answer {
            Ok(body) => {
                items.extend(body["dead_letters"].as_array().cloned().unwrap_or_default());
                more |= !body["next_cursor"].is_null();
            }
            Err(error) => return unavailable(service, error).into_response(),
        }
    }
    let order = |letter: &Value| {
        letter["id"]
            .as_str()
            .and_then(dead_letters::order_of)
            .unwrap_or((usize::MAX, i64::MAX))
    };
    items.sort_by_key(order);
    more |= items.len() > page.limit;
    items.truncate(page.limit);
    let next_cursor = if more {
        items.last().map(|letter| letter["id"].clone())
    } else {
        None
    };
    Json(json!({ "dead_letters": items, "next_cursor": next_cursor })).into_response()
}

/// Every service's metrics as one exposition, each sample labelled with its service.
async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = vec![];
    for (service, base) in &gateway.upstreams.services {
        let text = match gateway
            .client
            .get(format!("{}/metrics", base.trim_end_matches('/')))
            .send()
            .await
        {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(error) => return unavailable(*service, error).into_response(),
        };
        merge_exposition(&mut families, service.as_str(), &text);
    }
    let mut out = String::new();
    for (_, meta, samples) in families {
        for line in meta.iter().chain(samples.iter()) {
            out.push_str(line);
            out.push('\n');
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Fold one service's Prometheus text into `families` (name, HELP/TYPE lines,
/// samples), adding `service="<name>"` to each sample.
pub fn merge_exposition(
    families: &mut Vec<(String, Vec<String>, Vec<String>)>,
    service: &str,
    text: &str,
) {
    for line in text.lines() {
        let (name, is_meta) = if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.split_whitespace();
            let _kind = words.next();
            (words.next().unwrap_or_default().to_owned(), true)
        } else {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            (line[..end].to_owned(), false)
        };
        if name.is_empty() {
            continue;
        }
        let index = match families.iter().position(|(n, _, _)| *n == name) {
            Some(index) => index,
            None => {
                families.push((name.clone(), vec![], vec![]));
                families.len() - 1
            }
        };
        let family = &mut families[index];
        if is_meta {
            if !family.1.contains(&line.to_owned()) {
                family.1.push(line.to_owned());
            }
        } else if let Some(open) = line.find('{') {
            let labels = &line[open + 1..];
            let separator = if labels.starts_with('}') { "" } else { "," };
            family.2.push(format!(
                "{}{{service=\"{service}\"{separator}{labels}",
                &line[..open]
            ));
        } else if let Some(space) = line.find(' ') {
            family.2.push(format!(
                "{}{{service=\"{service}\"}}{}",
                &line[..space],
                &line[space..]
            ));
        }
    }
}
