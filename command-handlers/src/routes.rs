//! The command API: every write of the public contract. Parse and validate (4xx,
//! nothing written), decide, append, answer `202` with a consistency token.

use crate::app::{parse_sku, Backlog, Executed, Handlers, Meta};
use crate::{cart, customers};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use domain::inventory::{InventoryCommand, InventoryItem};
use domain::order::{Order, OrderCommand, OrderLine, MAX_LINES};
use domain::product::{parse_description, parse_product_name, Product, ProductCommand};
use domain::values::parse_note;
use domain::{CancelReason, CustomerId, Money, PaymentToken, Quantity, Sku};
use infra::auth::Principal;
use infra::event_store::IdempotencyRecord;
use infra::http::{token_header, ApiError, JsonBody, RawBody};
use infra::metrics;
use schemas::http::{
    Accepted, CancelOrderRequest, ChangeProductRequest, CommandRefusals, CreateProductRequest,
    PlaceOrderRequest, RestockRequest, IDEMPOTENCY_KEY,
};
use schemas::topics::Service;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

/// Every command route as served with auth off (the crate's tests).
pub fn router(handlers: Handlers) -> Router {
    let (router, _) = Service::ALL
        .iter()
        .fold(OpenApiRouter::new(), |router, service| {
            router.merge(service_routes(*service))
        })
        .with_state(handlers)
        .split_for_parts();
    router.layer(axum::middleware::from_fn(infra::auth::unchecked))
}

/// The command routes of one service, each registered with its description in the
/// OpenAPI document (payment and shipping take commands from the saga only).
pub fn service_routes(service: Service) -> OpenApiRouter<Handlers> {
    match service {
        // The order stream decides placing, cancelling, dispatching and delivering.
        Service::Order => OpenApiRouter::new()
            .routes(routes!(place_order))
            .routes(routes!(cancel_order))
            .routes(routes!(dispatch))
            .routes(routes!(deliver)),
        Service::Inventory => OpenApiRouter::new().routes(routes!(restock)),
        Service::Catalog => OpenApiRouter::new()
            .routes(routes!(create_product))
            .routes(routes!(change_product)),
        Service::Payment | Service::Shipping | Service::Notification => OpenApiRouter::new(),
        Service::Cart => OpenApiRouter::new()
            .routes(routes!(cart::set_line, cart::remove_line))
            .routes(routes!(cart::checkout)),
        Service::Customer => OpenApiRouter::new()
            .routes(routes!(customers::register))
            .routes(routes!(customers::login))
            .routes(routes!(customers::refresh))
            .routes(routes!(customers::logout))
            .routes(routes!(customers::rename)),
    }
}

/// The `Idempotency-Key` of a request, with a hash of what the request asks. A
/// customer's keys are its own: another customer's same key is another request.
pub(crate) fn idempotency(
    headers: &HeaderMap,
    customer: Option<&str>,
    route: &str,
    body: &[u8],
    response: Value,
) -> Result<Option<IdempotencyRecord>, ApiError> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::malformed("Idempotency-Key must be 1 to 255 visible ASCII characters")
        })?;
    let mut hash = Sha256::new();
    hash.update(route.as_bytes());
    hash.update([0]);
    hash.update(body);
    let hash = hash
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let key = match customer {
        Some(customer) => format!("http-customer:{customer}:{key}"),
        None => format!("http:{key}"),
    };
    Ok(Some(IdempotencyRecord {
        key,
        request_hash: hash,
        response,
    }))
}

/// Answer an earlier use of the key without deciding again: the first response for
/// the same request, 422 for another one.
pub(crate) async fn replay(
    handlers: &Handlers,
    record: &Option<IdempotencyRecord>,
) -> Result<Option<Response>, ApiError> {
    let Some(record) = record else {
        return Ok(None);
    };
    match handlers.store.idempotency(&record.key).await? {
        None => Ok(None),
        Some(stored) if stored.request_hash == record.request_hash => {
            let token = handlers.stored_token(&stored.response, stored.position);
            Ok(Some(accepted(stored.response, &token)))
        }
        Some(_) => Err(ApiError::idempotency_key_reused()),
    }
}

pub(crate) fn accepted(mut body: Value, token: &str) -> Response {
    if let Some(object) = body.as_object_mut() {
        object.insert("consistency_token".into(), json!(token));
    }
    (StatusCode::ACCEPTED, token_header(token), Json(body)).into_response()
}

fn finish(executed: Executed, body: Value) -> Response {
    match executed {
        Executed::Done { token, .. } => accepted(body, &token),
        Executed::Repeated { response, token } => accepted(response, &token),
    }
}

pub(crate) fn observe(
    handlers: &Handlers,
    command: &str,
    result: Result<Response, ApiError>,
) -> Response {
    match result {
        Ok(response) => {
            handlers
                .metrics
                .inc(&metrics::COMMANDS_ACCEPTED, &[("command", command)]);
            response
        }
        Err(error) => {
            let status = error.status.as_u16().to_string();
            handlers.metrics.inc(
                &metrics::COMMANDS_REJECTED,
                &[("command", command), ("status", &status)],
            );
            error.into_response()
        }
    }
}

pub(crate) fn invalid(error: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(error.to_string())
}

fn parse_order_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::invalid(format!("order_id: {raw:?} is not a UUID")))
}

/// Run one command against one aggregate under the request's idempotency key.
pub(crate) async fn run<A>(
    handlers: &Handlers,
    id: &str,
    command: A::Command,
    record: Option<IdempotencyRecord>,
    body: Value,
) -> Result<Response, ApiError>
where
    A: domain::Aggregate + crate::app::Stateful,
    A::Event: serde::Serialize + serde::de::DeserializeOwned + domain::EventName,
{
    run_admitted::<A>(handlers, id, command, record, body, None).await
}

/// [`run`], for a command that starts a saga: a retry is answered as the first time
/// whatever the load; a new one only while `backlog` admits it, and then counts in it.
async fn run_admitted<A>(
    handlers: &Handlers,
    id: &str,
    command: A::Command,
    record: Option<IdempotencyRecord>,
    body: Value,
    backlog: Option<&Backlog>,
) -> Result<Response, ApiError>
where
    A: domain::Aggregate + crate::app::Stateful,
    A::Event: serde::Serialize + serde::de::DeserializeOwned + domain::EventName,
{
    if let Some(response) = replay(handlers, &record).await? {
        return Ok(response);
    }
    if let Some(backlog) = backlog {
        if let Err(refused) = backlog.admit() {
            // Held a moment (nothing is written meanwhile): clients that send again at
            // once cannot turn refusals into most of the server's work.
            tokio::time::sleep(backlog.refusal_delay).await;
            return Err(refused);
        }
    }
    let mut meta = Meta::fresh();
    meta.idempotency = record;
    let executed = handlers
        .execute::<A>(id, &command, &meta)
        .await
        .map_err(ApiError::from)?;
    if let (Some(backlog), Executed::Done { events, .. }) = (backlog, &executed) {
        if *events > 0 {
            backlog.entered();
        }
    }
    Ok(finish(executed, body))
}

/// Add stock to a SKU.
#[utoipa::path(
    post,
    path = "/v1/inventory/{sku}/restock",
    tag = "inventory",
    params(
        ("sku" = String, Path, description = "1 to 64 of A-Z a-z 0-9 - _"),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters: a retry with the same key and body is answered as the first time, for 24 hours"),
    ),
    request_body = RestockRequest,
    responses((status = 202, description = "Restocked", body = Accepted), CommandRefusals)
)]
async fn restock(
    State(h): State<Handlers>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Result<JsonBody<RestockRequest>, ApiError>,
) -> Response {
    let result = async {
        let sku = parse_sku(&sku)?;
        let JsonBody(request, raw) = body?;
        let quantity = Quantity::new(request.quantity).map_err(invalid)?;
        let response = json!({ "sku": sku.as_str() });
        let record = idempotency(
            &headers,
            None,
            &format!("restock {sku}"),
            &raw,
            response.clone(),
        )?;
        run::<InventoryItem>(
            &h,
            sku.as_str(),
            InventoryCommand::Restock { quantity },
            record,
            response,
        )
        .await
    }
    .await;
    observe(&h, "restock", result)
}

/// Whose order it is: a customer's own (naming another is 403), or the one an
/// operator (or anyone, with auth off) names.
fn orderer(principal: &Principal, named: Option<&str>) -> Result<CustomerId, ApiError> {
    let customer = principal
        .whose(
            named,
            "customer_id: a customer places orders for itself only",
        )?
        .ok_or_else(|| ApiError::invalid("customer_id: required"))?;
    CustomerId::parse(&customer).map_err(invalid)
}

fn parse_order(
    request: &PlaceOrderRequest,
    principal: &Principal,
) -> Result<OrderCommand, ApiError> {
    let customer_id = orderer(principal, request.customer_id.as_deref())?;
    let payment_token = PaymentToken::parse(&request.payment_token).map_err(invalid)?;
    if request.lines.is_empty() || request.lines.len() > MAX_LINES {
        return Err(ApiError::invalid(format!(
            "lines: an order holds 1 to {MAX_LINES} lines"
        )));
    }
    let lines = request
        .lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let at = |e: domain::ValueError| ApiError::invalid(format!("lines[{i}].{e}"));
            Ok(OrderLine {
                sku: Sku::parse(&line.sku).map_err(at)?,
                quantity: Quantity::new(line.quantity).map_err(at)?,
                unit_price_cents: Money::unit_price(line.unit_price_cents).map_err(at)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(OrderCommand::Place {
        customer_id,
        lines,
        payment_token,
    })
}

/// With auth on, an order is for products on sale at their prices now: an unknown
/// or inactive sku is a 422, a stated price that is not the current one a 422 of its
/// own kind (`price-changed`).
async fn priced(h: &Handlers, lines: &[OrderLine]) -> Result<(), ApiError> {
    for (i, line) in lines.iter().enumerate() {
        let price = crate::cart::price(h, &line.sku, &format!("lines[{i}].sku")).await?;
        if price.cents() != line.unit_price_cents.cents() {
            return Err(ApiError::price_changed(format!(
                "lines[{i}].unit_price_cents: {} costs {} now",
                line.sku,
                price.cents()
            )));
        }
    }
    Ok(())
}

/// Add a product to the catalog (on sale at once).
#[utoipa::path(
    post,
    path = "/v1/products",
    tag = "catalog",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters: a retry with the same key and body is answered as the first time, for 24 hours")),
    request_body = CreateProductRequest,
    responses((status = 201, description = "Created", body = Accepted), CommandRefusals)
)]
async fn create_product(
    State(h): State<Handlers>,
    headers: HeaderMap,
    body: Result<JsonBody<CreateProductRequest>, ApiError>,
) -> Response {
    let result = async {
        let JsonBody(request, raw) = body?;
        let sku = Sku::parse(&request.sku).map_err(invalid)?;
        let command = ProductCommand::Create {
            name: parse_product_name(&request.name).map_err(invalid)?,
            description: parse_description(&request.description).map_err(invalid)?,
            price: Money::unit_price(request.price_cents).map_err(invalid)?,
        };
        let response = json!({ "sku": sku.as_str() });
        let record = idempotency(&headers, None, "create product", &raw, response.clone())?;
        let mut answer = run::<Product>(&h, sku.as_str(), command, record, response).await?;
        *answer.status_mut() = StatusCode::CREATED;
        Ok(answer)
    }
    .await;
    observe(&h, "create_product", result)
}

/// Change a product: its name, description, price, or whether it is on sale.
#[utoipa::path(
    patch,
    path = "/v1/products/{sku}",
    tag = "catalog",
    params(
        ("sku" = String, Path, description = "1 to 64 of A-Z a-z 0-9 - _"),
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters: a retry with the same key and body is answered as the first time, for 24 hours"),
    ),
    request_body = ChangeProductRequest,
    responses((status = 202, description = "Changed", body = Accepted), CommandRefusals)
)]
async fn change_product(
    State(h): State<Handlers>,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Result<JsonBody<ChangeProductRequest>, ApiError>,
) -> Response {
    let result = async {
        let sku = parse_sku(&sku)?;
        let JsonBody(request, raw) = body?;
        let command = ProductCommand::Change {
            name: request
                .name
                .as_deref()
                .map(parse_product_name)
                .transpose()
                .map_err(invalid)?,
            description: request
                .description
                .as_deref()
                .map(parse_description)
                .transpose()
                .map_err(invalid)?,
            price: request
                .price_cents
                .map(Money::unit_price)
                .transpose()
                .map_err(invalid)?,
            active: request.active,
        };
        let response = json!({ "sku": sku.as_str() });
        let record = idempotency(
            &headers,
            None,
            &format!("change product {sku}"),
            &raw,
            response.clone(),
        )?;
        run::<Product>(&h, sku.as_str(), command, record, response).await
    }
    .await;
    observe(&h, "change_product", result)
}

/// Place an order: its saga reserves the stock, takes the payment and creates the
/// shipment, or cancels it.
#[utoipa::path(
    post,
    path = "/v1/orders",
    tag = "orders",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters: a retry with the same key and body is answered as the first time, for 24 hours")),
    request_body = PlaceOrderRequest,
    responses((status = 202, description = "Accepted; fulfilment follows", body = Accepted), CommandRefusals)
)]
async fn place_order(
    State(h): State<Handlers>,
    principal: Principal,
    headers: HeaderMap,
    body: Result<JsonBody<PlaceOrderRequest>, ApiError>,
) -> Response {
    let result = async {
        let JsonBody(request, raw) = body?;
        let command = parse_order(&request, &principal)?;
        if principal != Principal::Anyone {
            if let OrderCommand::Place { lines, .. } = &command {
                priced(&h, lines).await?;
            }
        }
        let order_id = Uuid::now_v7();
        let response = json!({ "order_id": order_id });
        let record = idempotency(
            &headers,
            principal.customer(),
            "place order",
            &raw,
            response.clone(),
        )?;
        let backlog = Some(&h.backlog);
        run_admitted::<Order>(
            &h,
            &order_id.to_string(),
            command,
            record,
            response,
            backlog,
        )
        .await
    }
    .await;
    observe(&h, "place_order", result)
}

/// Cancel an order (before it ships): its stock is released and its payment voided.
#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/cancel",
    tag = "orders",
    params(("order_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters: a retry with the same key and body is answered as the first time, for 24 hours")),
    request_body(content = CancelOrderRequest, description = "May be empty"),
    responses((status = 202, description = "Cancelled", body = Accepted), CommandRefusals)
)]
async fn cancel_order(
    State(h): State<Handlers>,
    principal: Principal,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    body: Result<JsonBody<CancelOrderRequest>, ApiError>,
) -> Response {
    let result = async {
        let order_id = parse_order_id(&order_id)?;
        let JsonBody(request, raw) = body?;
        if let Some(customer) = principal.customer() {
            // Another customer's order is not there for this one.
            let (order, _, _) = h
                .load::<Order>(&order_id.to_string())
                .await
                .map_err(ApiError::from)?;
            if order.customer_id.as_ref().map(CustomerId::as_str) != Some(customer) {
                return Err(ApiError::not_found("no such order"));
            }
        }
        let note = request
            .reason
            .as_deref()
            .map(parse_note)
            .transpose()
            .map_err(invalid)?;
        let response = json!({ "order_id": order_id });
        let record = idempotency(
            &headers,
            principal.customer(),
            &format!("cancel {order_id}"),
            &raw,
            response.clone(),
        )?;
        let command = OrderCommand::Cancel {
            reason: CancelReason::CustomerRequest,
            note,
        };
        run::<Order>(&h, &order_id.to_string(), command, record, response).await
    }
    .await;
    observe(&h, "cancel_order", result)
}

async fn shipment_step(
    h: &Handlers,
    order_id: &str,
    headers: &HeaderMap,
    raw: &Bytes,
    command: OrderCommand,
) -> Result<Response, ApiError> {
    let step = match command {
        OrderCommand::Ship => "dispatch",
        _ => "deliver",
    };
    let order_id = parse_order_id(order_id)?;
    let response = json!({ "order_id": order_id });
    let record = idempotency(
        headers,
        None,
        &format!("{step} {order_id}"),
        raw,
        response.clone(),
    )?;
    match run::<Order>(h, &order_id.to_string(), command, record, response).await {
        // The shipment's state lives on the order stream, so "no such order" is "no such shipment".
        Err(error) if error.status == StatusCode::NOT_FOUND => {
            Err(ApiError::not_found("no shipment for this order"))
        }
        other => other,
    }
}

/// Dispatch a confirmed order's shipment (the stock is committed and the payment
/// captured).
#[utoipa::path(
    post,
    path = "/v1/shipments/{order_id}/dispatch",
    tag = "shipments",
    params(("order_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters: a retry with the same key and body is answered as the first time, for 24 hours")),
    responses((status = 202, description = "Dispatched", body = Accepted), CommandRefusals)
)]
async fn dispatch(
    State(h): State<Handlers>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> Response {
    let step = shipment_step(&h, &order_id, &headers, &raw, OrderCommand::Ship);
    observe(&h, "dispatch_shipment", step.await)
}

/// Record a dispatched shipment as delivered.
#[utoipa::path(
    post,
    path = "/v1/shipments/{order_id}/deliver",
    tag = "shipments",
    params(("order_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters: a retry with the same key and body is answered as the first time, for 24 hours")),
    responses((status = 202, description = "Delivered", body = Accepted), CommandRefusals)
)]
async fn deliver(
    State(h): State<Handlers>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
    RawBody(raw): RawBody,
) -> Response {
    let step = shipment_step(&h, &order_id, &headers, &raw, OrderCommand::Deliver);
    observe(&h, "deliver_shipment", step.await)
}
