//! The cart service's commands: a customer's lines (products on sale, by the cart
//! service's own copy of the catalog's prices) and the checkout, which turns the
//! cart into an order exactly once.
//!
//! The checkout appends `CartCheckedOut` (the order's id, its lines at the prices
//! now, the payment token) under the request's idempotency key, so a retry is
//! answered as the first time. The order itself is placed from that event by the
//! order service ([`Checkout`], a consumer of the cart topic), with the order id as
//! its idempotency key, so it is placed once however often the event is read; where
//! one process serves both (embedded), the request places it at once as well, so its
//! 202 names an order that exists, and the consumer finds it placed.

use crate::app::{CommandError, Executed, Handlers, Meta};
use crate::routes::{accepted, idempotency, invalid, observe, replay, run};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use domain::cart::{Cart, CartCommand, CartEvent};
use domain::order::{Order, OrderCommand, OrderLine};
use domain::{CustomerId, Money, PaymentToken, Quantity, Sku};
use infra::auth::Principal;
use infra::consume::{Consumer, Failures, Handler, Source, Transport};
use infra::db::Db;
use infra::event_store::IdempotencyRecord;
use infra::http::{ApiError, JsonBody};
use infra::InfraError;
use schemas::http::{Accepted, CartLineRequest, CheckoutRequest, CommandRefusals};
use schemas::topics::AggregateType;
use schemas::{AnyEvent, RecordedEvent};
use serde_json::json;
use sqlx::AnyConnection;
use std::sync::Arc;
use uuid::Uuid;

/// The consumer name of the order service's follower of checkouts.
pub const NAME: &str = "checkout";

/// The customer a cart route serves: the caller, who must be one.
fn own(principal: &Principal) -> Result<&str, ApiError> {
    principal
        .customer()
        .ok_or_else(|| ApiError::forbidden("a cart is a customer's own"))
}

/// A product's price now by this process's copy of the catalog; 422 when it is not
/// in the catalog or not on sale.
pub(crate) async fn price(h: &Handlers, sku: &Sku, field: &str) -> Result<Money, ApiError> {
    let db = h
        .prices
        .as_ref()
        .ok_or_else(|| ApiError::internal("this process has no copy of the prices"))?;
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT price_cents, active FROM product_prices WHERE sku = $1")
            .bind(sku.as_str())
            .fetch_optional(&db.pool)
            .await?;
    match row {
        None => Err(ApiError::invalid(format!(
            "{field}: no product {sku} in the catalog"
        ))),
        Some((_, 0)) => Err(ApiError::invalid(format!("{field}: {sku} is not on sale"))),
        Some((cents, _)) => Ok(Money::from_cents(u64::try_from(cents).unwrap_or(0))),
    }
}

/// Put a quantity of a product in the caller's cart (0 takes it out).
#[utoipa::path(
    put,
    path = "/v1/cart/lines/{sku}",
    tag = "cart",
    params(("sku" = String, Path), ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters: a retry with the same key and body is answered as the first time, for 24 hours")),
    request_body = CartLineRequest,
    responses((status = 202, description = "Set", body = Accepted), CommandRefusals)
)]
pub async fn set_line(
    State(h): State<Handlers>,
    principal: Principal,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: Result<JsonBody<CartLineRequest>, ApiError>,
) -> Response {
    let result = async {
        let customer = own(&principal)?;
        let sku = Sku::parse(&sku).map_err(invalid)?;
        let JsonBody(request, raw) = body?;
        let command = if request.quantity == 0 {
            CartCommand::RemoveLine { sku: sku.clone() }
        } else {
            let quantity = Quantity::new(request.quantity).map_err(invalid)?;
            price(&h, &sku, "sku").await?;
            CartCommand::SetLine {
                sku: sku.clone(),
                quantity,
            }
        };
        let response = json!({ "sku": sku.as_str() });
        let route = format!("cart line {sku}");
        let record = idempotency(&headers, Some(customer), &route, &raw, response.clone())?;
        run::<Cart>(&h, customer, command, record, response).await
    }
    .await;
    observe(&h, "set_cart_line", result)
}

/// Take a product out of the caller's cart.
#[utoipa::path(
    delete,
    path = "/v1/cart/lines/{sku}",
    tag = "cart",
    params(("sku" = String, Path)),
    responses((status = 202, description = "Removed", body = Accepted), CommandRefusals)
)]
pub async fn remove_line(
    State(h): State<Handlers>,
    principal: Principal,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        let customer = own(&principal)?;
        let sku = Sku::parse(&sku).map_err(invalid)?;
        let response = json!({ "sku": sku.as_str() });
        let route = format!("remove cart line {sku}");
        let record = idempotency(&headers, Some(customer), &route, b"", response.clone())?;
        let command = CartCommand::RemoveLine { sku };
        run::<Cart>(&h, customer, command, record, response).await
    }
    .await;
    observe(&h, "remove_cart_line", result)
}

/// Turn the caller's cart into an order at the catalog's prices now; the cart is
/// empty after. Retried with the same `Idempotency-Key`: the same answer, one order.
#[utoipa::path(
    post,
    path = "/v1/cart/checkout",
    tag = "cart",
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters: a retry with the same key and body is answered as the first time, for 24 hours")),
    request_body = CheckoutRequest,
    responses((status = 202, description = "Accepted; the order follows", body = Accepted), CommandRefusals)
)]
pub async fn checkout(
    State(h): State<Handlers>,
    principal: Principal,
    headers: HeaderMap,
    body: Result<JsonBody<CheckoutRequest>, ApiError>,
) -> Response {
    let result = async {
        let customer = own(&principal)?;
        let JsonBody(request, raw) = body?;
        let payment_token = PaymentToken::parse(&request.payment_token).map_err(invalid)?;
        let order_id = Uuid::now_v7();
        let response = json!({ "order_id": order_id });
        let record = idempotency(&headers, Some(customer), "checkout", &raw, response.clone())?;
        if let Some(answer) = replay(&h, &record).await? {
            return Ok(answer);
        }
        let (cart, _, _) = h.load::<Cart>(customer).await.map_err(ApiError::from)?;
        if cart.lines.is_empty() {
            return Err(ApiError::conflict("the cart is empty"));
        }
        let mut lines = vec![];
        for (sku, quantity) in &cart.lines {
            lines.push(OrderLine {
                sku: sku.clone(),
                quantity: *quantity,
                unit_price_cents: price(&h, sku, "sku").await?,
            });
        }
        // Where this process places the order too, it is a door like POST /v1/orders.
        if h.places_orders {
            if let Err(refused) = h.backlog.admit() {
                tokio::time::sleep(h.backlog.refusal_delay).await;
                return Err(refused);
            }
        }
        let mut meta = Meta::fresh();
        meta.idempotency = record;
        let command = CartCommand::CheckOut {
            order_id,
            lines: lines.clone(),
            payment_token: payment_token.clone(),
        };
        let executed = h
            .execute::<Cart>(customer, &command, &meta)
            .await
            .map_err(ApiError::from)?;
        let token = match executed {
            // A retry that raced the first: its answer.
            Executed::Repeated { response, token } => return Ok(accepted(response, &token)),
            Executed::Done { token, .. } => token,
        };
        let token = if h.places_orders {
            let placing = Placing {
                customer,
                order_id,
                lines,
                payment_token,
                correlation_id: meta.correlation_id,
                causation_id: meta.causation_id,
            };
            match place(&h, placing).await {
                Ok(Executed::Done { token, .. } | Executed::Repeated { token, .. }) => token,
                // The consumer of the cart's events places it.
                Err(error) => {
                    tracing::warn!(error = %error, %order_id, "checked out; the order is placed from the cart's event");
                    token
                }
            }
        } else {
            token
        };
        Ok(accepted(response, &token))
    }
    .await;
    observe(&h, "checkout", result)
}

/// An order a checkout asks for.
struct Placing<'a> {
    customer: &'a str,
    order_id: Uuid,
    lines: Vec<OrderLine>,
    payment_token: PaymentToken,
    correlation_id: Uuid,
    causation_id: Uuid,
}

/// Place a checked-out order, once: the order id is its idempotency key.
async fn place(h: &Handlers, placing: Placing<'_>) -> Result<Executed, CommandError> {
    let response = json!({ "order_id": placing.order_id });
    let meta = Meta {
        correlation_id: placing.correlation_id,
        causation_id: placing.causation_id,
        idempotency: Some(IdempotencyRecord {
            key: format!("checkout:{}", placing.order_id),
            request_hash: "checkout".into(),
            response,
        }),
    };
    let customer_id = CustomerId::parse(placing.customer)
        .map_err(|e| CommandError::Domain(domain::DomainError::Invalid(e.to_string())))?;
    let command = OrderCommand::Place {
        customer_id,
        lines: placing.lines,
        payment_token: placing.payment_token,
    };
    let executed = h
        .execute::<Order>(&placing.order_id.to_string(), &command, &meta)
        .await?;
    if let Executed::Done { events, .. } = &executed {
        if *events > 0 {
            h.backlog.entered();
        }
    }
    Ok(executed)
}

/// The order service's follower of checkouts: it places the order of every
/// `CartCheckedOut` (once: the order id is the idempotency key), then stores how far
/// it has read.
pub struct Checkout {
    handlers: Handlers,
    consumer: Consumer,
}

impl Checkout {
    pub fn new(handlers: Handlers, db: &Db) -> Checkout {
        Checkout {
            consumer: Consumer::new(NAME, db, &handlers.metrics),
            handlers,
        }
    }

    /// The cart events, from the log (embedded) or the cart topic (distributed).
    pub async fn source(transport: &Transport, db: &Db) -> Result<Arc<dyn Source>, InfraError> {
        transport.events(NAME, &[AggregateType::Cart], db).await
    }
}

impl Handler for Checkout {
    type Item = RecordedEvent;
    type Done = ();

    fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    fn batch_size(&self) -> usize {
        200
    }

    /// Place the orders of the checkouts, in order; done up to the first that failed
    /// for a reason other than a refusal (it and the rest are read again).
    async fn before(&self, events: &[RecordedEvent]) -> usize {
        for (index, recorded) in events.iter().enumerate() {
            let envelope = &recorded.envelope;
            let Ok(AnyEvent::Cart(CartEvent::CartCheckedOut {
                order_id,
                lines,
                payment_token,
                ..
            })) = AnyEvent::from_envelope(envelope)
            else {
                continue;
            };
            let placing = Placing {
                customer: &envelope.aggregate_id,
                order_id,
                lines,
                payment_token,
                correlation_id: envelope.correlation_id,
                causation_id: envelope.event_id,
            };
            match place(&self.handlers, placing).await {
                Ok(_) => {}
                Err(CommandError::Domain(refusal)) => {
                    tracing::info!(%order_id, reason = %refusal, "a checked-out order was refused");
                }
                Err(error) => {
                    tracing::warn!(%order_id, error = %error, "placing a checked-out order failed; it is read again");
                    return index;
                }
            }
        }
        events.len()
    }

    async fn apply(
        &self,
        _tx: &mut AnyConnection,
        _events: &[RecordedEvent],
        _failures: &mut Failures,
    ) -> Result<(), InfraError> {
        Ok(())
    }

    fn after(&self, _: (), _checkpoint: i64) {}
}
