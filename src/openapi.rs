//! The OpenAPI document of the public contract, generated from the handlers: each
//! route is registered together with its description (utoipa-axum's `routes!`), so
//! what a process serves and what its document says cannot drift. Every process
//! serves the document of what it serves at `GET /openapi.json`; the embedded server
//! and the gateway serve the whole contract ([`document`]). `docs/openapi.json` is a
//! copy, checked against [`document`] by the test suite.

use crate::{__path_health, __path_metrics, health, metrics, Watched};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Router;
use schemas::topics::Service;
use std::sync::Arc;
use utoipa::openapi::OpenApi as Document;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Orderline",
        version = "1",
        description = "An event-sourced commerce backend: commands answer 202 with a consistency token, reads serve read models, errors are problem+json (RFC 9457). With auth on (the default), customers' routes take `Authorization: Bearer <access token>` (from /v1/auth/login) and operators' routes the operator token; 401, 403 and 429 answer those who lack them.",
        license(name = "Apache-2.0")
    ),
    components(schemas(schemas::http::Problem)),
    tags(
        (name = "orders", description = "Placing, cancelling and reading orders"),
        (name = "inventory", description = "Stock per SKU"),
        (name = "payments", description = "An order's payment"),
        (name = "shipments", description = "An order's shipment"),
        (name = "customers", description = "Registration, logins (access and refresh tokens) and the customer's own profile"),
        (name = "catalog", description = "Products, their prices and stock; full-text search"),
        (name = "cart", description = "A customer's cart, and its checkout into an order"),
        (name = "notifications", description = "What was sent to customers about their orders"),
        (name = "operators", description = "Health, metrics, event streams, projections and dead letters")
    )
)]
struct Contract;

/// The document's head (title, version, tags), without paths.
pub fn base() -> Document {
    Contract::openapi()
}

/// The whole public contract: every service's commands and reads, the operators'
/// routes and this document's own.
pub fn document() -> Document {
    let mut document = base();
    for service in Service::ALL.iter().copied() {
        document.merge(
            command_handlers::routes::service_routes(service)
                .split_for_parts()
                .1,
        );
    }
    document.merge(
        query_api::routes(query_api::Served::ALL)
            .split_for_parts()
            .1,
    );
    document.merge(projectors::admin::routes().split_for_parts().1);
    document.merge(operator_routes().split_for_parts().1);
    document.merge(own_route().split_for_parts().1);
    document
}

/// `/health` and `/metrics`, outside the cap on requests in progress.
pub(crate) fn operator_routes() -> OpenApiRouter<Watched> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
}

fn own_route() -> OpenApiRouter<Arc<str>> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// The route serving `document` (to which its own description is added).
pub fn serving(mut document: Document) -> Router {
    let (router, own) = own_route().split_for_parts();
    document.merge(own);
    let text = document
        .to_pretty_json()
        .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"));
    router.with_state(Arc::from(text))
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operators",
    responses((status = 200, description = "The OpenAPI document of what this process serves", content_type = "application/json", body = Object))
)]
async fn openapi_json(State(document): State<Arc<str>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.to_string(),
    )
}
