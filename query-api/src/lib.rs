//! The query API: reads served from the read models in each service's database
//! (never from the event store, but for the operator's stream view). A read that
//! carries a consistency token waits, within a bound, until the projection behind it
//! has passed the token, then answers; or answers 503 with Retry-After.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use infra::auth::Principal;
use infra::http::{await_consistency, ApiError};
use infra::local::{self, Columns};
use infra::progress::Progress;
use infra::InfraError;
use infra::{parse_timestamp, EventStore};
use schemas::http::{
    CartLineView, CartView, CustomerView, InventoryView, NotificationPage, NotificationView,
    OrderLineView, OrderPage, OrderView, PaymentView, ProductPage, ProductView, ReadRefusals,
    ShipmentView, StreamView,
};
use schemas::topics::{AggregateType, ProjectionName, UnknownName};
use serde::Deserialize;
use sqlx::AnyPool;
use std::path::{Path as FilePath, PathBuf};
use std::sync::Arc;
use tokio::sync::Semaphore;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

/// What the query routes read from: the event store (for `/v1/streams`) and the
/// databases of the read models this process serves (all four when embedded, its
/// own service's when distributed).
#[derive(Clone)]
pub struct QueryState {
    pub store: EventStore,
    pub progress: Progress,
    pub orders: Option<AnyPool>,
    pub inventory: Option<AnyPool>,
    pub payments: Option<AnyPool>,
    pub shipments: Option<AnyPool>,
    pub customers: Option<AnyPool>,
    pub catalog: Option<AnyPool>,
    pub cart: Option<AnyPool>,
    pub notifications: Option<AnyPool>,
    /// Stream reads in progress at most ([`STREAM_READS`]): they read the event
    /// store's pool, which commands share; past the bound a read is refused (503 with
    /// `Retry-After`) rather than queued in front of commands.
    pub stream_reads: Arc<Semaphore>,
    /// The files of the read models that are SQLite files: their point reads run on
    /// the task ([`point`]).
    pub files: Files,
}

/// The SQLite files of the read models (none on PostgreSQL).
#[derive(Debug, Clone, Default)]
pub struct Files {
    pub orders: Option<PathBuf>,
    pub inventory: Option<PathBuf>,
    pub payments: Option<PathBuf>,
    pub shipments: Option<PathBuf>,
    pub customers: Option<PathBuf>,
    /// Also what tells the catalog's search which dialect to speak (FTS5 on a file,
    /// else PostgreSQL's text search).
    pub catalog: Option<PathBuf>,
    pub cart: Option<PathBuf>,
}

/// How many `/v1/streams` reads run at once in a process.
pub const STREAM_READS: usize = 4;

impl QueryState {
    /// The bound on stream reads of a process.
    pub fn stream_reads() -> Arc<Semaphore> {
        Arc::new(Semaphore::new(STREAM_READS))
    }
}

/// Routes for the read models present in `state`, and the stream view.
pub fn router(state: QueryState) -> OpenApiRouter {
    let served = Served {
        orders: state.orders.is_some(),
        inventory: state.inventory.is_some(),
        payments: state.payments.is_some(),
        shipments: state.shipments.is_some(),
        customers: state.customers.is_some(),
        catalog: state.catalog.is_some(),
        cart: state.cart.is_some(),
        notifications: state.notifications.is_some(),
    };
    routes(served).with_state(state)
}

/// Which read models a process serves.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    pub orders: bool,
    pub inventory: bool,
    pub payments: bool,
    pub shipments: bool,
    pub customers: bool,
    pub catalog: bool,
    pub cart: bool,
    pub notifications: bool,
}

impl Served {
    pub const ALL: Served = Served {
        orders: true,
        inventory: true,
        payments: true,
        shipments: true,
        customers: true,
        catalog: true,
        cart: true,
        notifications: true,
    };
}

/// The query routes of the read models `served`, each registered with its
/// description in the OpenAPI document.
pub fn routes(served: Served) -> OpenApiRouter<QueryState> {
    let mut router = OpenApiRouter::new().routes(routes!(stream));
    if served.orders {
        router = router.routes(routes!(list_orders)).routes(routes!(order));
    }
    if served.inventory {
        router = router.routes(routes!(inventory));
    }
    if served.payments {
        router = router.routes(routes!(payment));
    }
    if served.shipments {
        router = router.routes(routes!(shipment));
    }
    if served.customers {
        router = router.routes(routes!(me));
    }
    if served.notifications {
        router = router.routes(routes!(notifications));
    }
    if served.cart {
        router = router.routes(routes!(cart));
    }
    if served.catalog {
        router = router.routes(routes!(products)).routes(routes!(product));
    }
    router
}

impl QueryState {
    /// The read model `projection` in this process, once it reflects the consistency
    /// token in `headers` (if any); 404 when this process does not serve it.
    async fn reflecting(
        &self,
        projection: ProjectionName,
        headers: &HeaderMap,
    ) -> Result<ReadModel<'_>, ApiError> {
        let (pool, file) = match projection {
            ProjectionName::Orders => (&self.orders, &self.files.orders),
            ProjectionName::Inventory => (&self.inventory, &self.files.inventory),
            ProjectionName::Payments => (&self.payments, &self.files.payments),
            ProjectionName::Shipments => (&self.shipments, &self.files.shipments),
            ProjectionName::Customers => (&self.customers, &self.files.customers),
            ProjectionName::Catalog => (&self.catalog, &self.files.catalog),
            ProjectionName::Carts => (&self.cart, &self.files.cart),
            // The order and cart services' own copies, read by their commands only.
            ProjectionName::Prices | ProjectionName::CartPrices => (&None, &None),
        };
        let pool = pool
            .as_ref()
            .ok_or_else(|| ApiError::not_found("this process does not serve that read model"))?;
        await_consistency(&self.progress, projection, pool, headers, self.store.head()).await?;
        Ok(ReadModel {
            pool,
            file: file.as_deref(),
        })
    }
}

/// A read model's database: its pool, and its file when it is an SQLite file.
struct ReadModel<'a> {
    pool: &'a AnyPool,
    file: Option<&'a FilePath>,
}

impl ReadModel<'_> {
    /// The row `sql` finds for `key`, as `map` makes it: read on the task when the
    /// read model is an SQLite file (one short statement: no hop to sqlx's connection
    /// thread, see `infra::local`), else through the pool.
    async fn read_one<T>(
        &self,
        sql: &str,
        key: &str,
        map: impl Fn(&dyn Columns) -> Result<T, InfraError>,
    ) -> Result<Option<T>, ApiError> {
        match self.file {
            Some(file) => Ok(local::read_rows(file, sql, [key], |row| map(row))?
                .into_iter()
                .next()),
            None => match sqlx::query(sql).bind(key).fetch_optional(self.pool).await? {
                Some(row) => Ok(Some(map(&row)?)),
                None => Ok(None),
            },
        }
    }
}

/// Most orders one page holds, and how many when not asked.
pub const MAX_PAGE: i64 = 100;
pub const DEFAULT_PAGE: i64 = 20;

/// A page's `limit`: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when not given.
fn page_limit(raw: Option<&str>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(DEFAULT_PAGE),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| {
                ApiError::invalid(format!("limit must be a whole number from 1 to {MAX_PAGE}"))
            }),
    }
}

fn parse_order_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::invalid(format!("order_id: {raw:?} is not a UUID")))
}

/// A SKU's stock.
#[utoipa::path(
    get,
    path = "/v1/inventory/{sku}",
    tag = "inventory",
    params(("sku" = String, Path), ("X-Consistency-Token" = Option<String>, Header, description = "The token of a write: the read waits until it reflects it"), ("X-Consistency-Wait-Ms" = Option<u32>, Header, description = "How long to wait for the token, 0 to 30000 ms (default 2000)")),
    responses((status = 200, body = InventoryView), ReadRefusals)
)]
async fn inventory(
    State(s): State<QueryState>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Result<Json<InventoryView>, ApiError> {
    let sku = domain::Sku::parse(&sku).map_err(|e| ApiError::invalid(e.to_string()))?;
    let db = s.reflecting(ProjectionName::Inventory, &headers).await?;
    let (on_hand, reserved) = db
        .read_one(
            "SELECT on_hand, reserved FROM inventory_levels WHERE sku = $1",
            sku.as_str(),
            |row| Ok((row.int("on_hand")?, row.int("reserved")?)),
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no stock recorded for sku {sku}")))?;
    let (on_hand, reserved) = (on_hand.max(0) as u64, reserved.max(0) as u64);
    Ok(Json(InventoryView {
        sku: sku.to_string(),
        on_hand,
        reserved,
        available: on_hand.saturating_sub(reserved),
    }))
}

/// An order's row joined with its payment's and shipment's progress (a macro, so
/// that the queries built on it are literals too).
macro_rules! order_view {
    () => {
        "SELECT o.order_id, o.customer_id, o.status, o.lines, o.total_cents,
        o.cancel_reason, o.placed_at, o.updated_at, p.payment_status, p.shipment_status,
        p.updated_at AS progress_at
   FROM orders o LEFT JOIN order_progress p ON p.order_id = o.order_id"
    };
}
const ORDER_BY_ID: &str = concat!(order_view!(), " WHERE o.order_id = $1");
const ORDER_PAGE: &str = concat!(
    order_view!(),
    " WHERE ($1 IS NULL OR o.customer_id = $1) AND ($2 IS NULL OR o.status = $2)
        AND ($3 IS NULL OR o.order_id < $3)
      ORDER BY o.order_id DESC LIMIT $4"
);

/// One page of `rows`, which were read with a limit of `limit + 1`: the first `limit`
/// as views, and the cursor of the last of them when there were more.
fn page<T>(
    rows: &[sqlx::any::AnyRow],
    limit: i64,
    view: impl Fn(&dyn Columns) -> Result<T, InfraError>,
    cursor: impl Fn(&T) -> String,
) -> Result<(Vec<T>, Option<String>), InfraError> {
    let shown = usize::try_from(limit).unwrap_or(0);
    let items = rows
        .iter()
        .take(shown)
        .map(|row| view(row))
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if rows.len() > shown {
        items.last().map(cursor)
    } else {
        None
    };
    Ok((items, next_cursor))
}

fn order_view(row: &dyn Columns) -> Result<OrderView, InfraError> {
    let lines: Vec<OrderLineView> = serde_json::from_str(&row.text("lines")?)
        .map_err(|e| InfraError::Corrupt(format!("order lines: {e}")))?;
    Ok(OrderView {
        order_id: infra::parse_uuid(&row.text("order_id")?)?,
        customer_id: row.text("customer_id")?,
        status: row.text("status")?,
        lines,
        total_cents: row.int("total_cents")?.max(0) as u64,
        payment_status: row.maybe_text("payment_status")?,
        shipment_status: row.maybe_text("shipment_status")?,
        cancel_reason: row.maybe_text("cancel_reason")?,
        placed_at: parse_timestamp(&row.text("placed_at")?)?,
        updated_at: {
            let order_at = parse_timestamp(&row.text("updated_at")?)?;
            match row.maybe_text("progress_at")? {
                Some(progress_at) => order_at.max(parse_timestamp(&progress_at)?),
                None => order_at,
            }
        },
    })
}

/// An order, with its payment's and shipment's progress.
#[utoipa::path(
    get,
    path = "/v1/orders/{order_id}",
    tag = "orders",
    params(("order_id" = Uuid, Path), ("X-Consistency-Token" = Option<String>, Header, description = "The token of a write: the read waits until it reflects it"), ("X-Consistency-Wait-Ms" = Option<u32>, Header, description = "How long to wait for the token, 0 to 30000 ms (default 2000)")),
    responses((status = 200, body = OrderView), ReadRefusals)
)]
async fn order(
    State(s): State<QueryState>,
    principal: Principal,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<OrderView>, ApiError> {
    let order_id = parse_order_id(&order_id)?;
    let db = s.reflecting(ProjectionName::Orders, &headers).await?;
    let view = db
        .read_one(ORDER_BY_ID, &order_id.to_string(), order_view)
        .await?
        // Another customer's order is not there for this one.
        .filter(|view| principal.may_act_for(&view.customer_id))
        .ok_or_else(|| ApiError::not_found(format!("no order {order_id}")))?;
    Ok(Json(view))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Only this customer's orders.
    customer_id: Option<String>,
    /// Only orders in this status.
    status: Option<String>,
    /// Orders per page: 1 to 100 (default 20).
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
    /// `next_cursor` of the page before.
    cursor: Option<String>,
}

/// Newest first; `next_cursor` is the last order id of the page when more follow.
#[utoipa::path(
    get,
    path = "/v1/orders",
    tag = "orders",
    params(ListParams, ("X-Consistency-Token" = Option<String>, Header, description = "The token of a write: the read waits until it reflects it"), ("X-Consistency-Wait-Ms" = Option<u32>, Header, description = "How long to wait for the token, 0 to 30000 ms (default 2000)")),
    responses((status = 200, body = OrderPage), ReadRefusals)
)]
async fn list_orders(
    State(s): State<QueryState>,
    principal: Principal,
    params: Result<Query<ListParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<OrderPage>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::malformed(e.body_text()))?;
    let limit = page_limit(params.limit.as_deref())?;
    let status = params
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|raw| {
            domain::order::OrderStatus::parse(raw)
                .map(|s| s.as_str())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "status must be one of pending, confirmed, shipped, delivered, cancelled",
                    )
                })
        })
        .transpose()?;
    let cursor = params
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|raw| {
            Uuid::parse_str(raw)
                .map_err(|_| ApiError::invalid("cursor is not one this server issued"))
        })
        .transpose()?;
    let customer = principal.whose(
        params.customer_id.as_deref().filter(|c| !c.is_empty()),
        "customer_id: a customer lists its own orders only",
    )?;
    let db = s.reflecting(ProjectionName::Orders, &headers).await?;
    let rows = sqlx::query(ORDER_PAGE)
        .bind(customer)
        .bind(status)
        .bind(cursor.map(|c| c.to_string()))
        .bind(limit + 1)
        .fetch_all(db.pool)
        .await?;
    let (items, next_cursor) = page(&rows, limit, order_view, |o| o.order_id.to_string())?;
    Ok(Json(OrderPage { items, next_cursor }))
}

/// An order's payment.
#[utoipa::path(
    get,
    path = "/v1/payments/{order_id}",
    tag = "payments",
    params(("order_id" = Uuid, Path), ("X-Consistency-Token" = Option<String>, Header, description = "The token of a write: the read waits until it reflects it"), ("X-Consistency-Wait-Ms" = Option<u32>, Header, description = "How long to wait for the token, 0 to 30000 ms (default 2000)")),
    responses((status = 200, body = PaymentView), ReadRefusals)
)]
async fn payment(
    State(s): State<QueryState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<PaymentView>, ApiError> {
    let order_id = parse_order_id(&order_id)?;
    let db = s.reflecting(ProjectionName::Payments, &headers).await?;
    let view = db
        .read_one(
            "SELECT status, amount_cents, authorized_cents, captured_cents, voided_cents,
                decline_reason
           FROM payments WHERE order_id = $1",
            &order_id.to_string(),
            |row| {
                Ok(PaymentView {
                    order_id,
                    status: row.text("status")?,
                    amount_cents: row.int("amount_cents")?,
                    authorized_cents: row.int("authorized_cents")?,
                    captured_cents: row.int("captured_cents")?,
                    voided_cents: row.int("voided_cents")?,
                    decline_reason: row.maybe_text("decline_reason")?,
                })
            },
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no payment for order {order_id}")))?;
    Ok(Json(view))
}

/// An order's shipment.
#[utoipa::path(
    get,
    path = "/v1/shipments/{order_id}",
    tag = "shipments",
    params(("order_id" = Uuid, Path), ("X-Consistency-Token" = Option<String>, Header, description = "The token of a write: the read waits until it reflects it"), ("X-Consistency-Wait-Ms" = Option<u32>, Header, description = "How long to wait for the token, 0 to 30000 ms (default 2000)")),
    responses((status = 200, body = ShipmentView), ReadRefusals)
)]
async fn shipment(
    State(s): State<QueryState>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ShipmentView>, ApiError> {
    let order_id = parse_order_id(&order_id)?;
    let db = s.reflecting(ProjectionName::Shipments, &headers).await?;
    let view = db
        .read_one(
            "SELECT status, updated_at FROM shipments WHERE order_id = $1",
            &order_id.to_string(),
            |row| {
                Ok(ShipmentView {
                    order_id,
                    status: row.text("status")?,
                    updated_at: parse_timestamp(&row.text("updated_at")?)?,
                })
            },
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no shipment for order {order_id}")))?;
    Ok(Json(view))
}

/// Most events one page of a stream holds, and how many when not asked.
pub const MAX_STREAM_PAGE: i64 = 1000;
pub const DEFAULT_STREAM_PAGE: i64 = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StreamParams {
    /// The first version of the page (default 1).
    #[param(value_type = Option<u64>)]
    from_version: Option<String>,
    /// Events per page: 1 to 1000 (default 100).
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
}

/// A whole number in `range` from the query, or `default` when absent; 422 otherwise.
fn number(
    raw: Option<&str>,
    name: &str,
    range: std::ops::RangeInclusive<i64>,
    default: i64,
) -> Result<i64, ApiError> {
    match raw {
        None => Ok(default),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "{name} must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                ))
            }),
    }
}

/// One page of a stream, in version order from `from_version` (default 1), at most
/// `limit` events (default 100, at most 1000); `next_from_version` when more follow.
#[utoipa::path(
    get,
    path = "/v1/streams/{aggregate_type}/{aggregate_id}",
    tag = "operators",
    params(
        ("aggregate_type" = String, Path, description = "order, inventory, payment or shipment"),
        ("aggregate_id" = String, Path),
        StreamParams,
    ),
    responses((status = 200, body = StreamView), ReadRefusals)
)]
async fn stream(
    State(s): State<QueryState>,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
    params: Result<Query<StreamParams>, QueryRejection>,
) -> Result<Json<StreamView>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::malformed(e.body_text()))?;
    let _turn = s
        .stream_reads
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::busy("too many stream reads in progress; retry"))?;
    let aggregate_type: AggregateType = aggregate_type
        .parse()
        .map_err(|e: UnknownName| ApiError::not_found(e.to_string()))?;
    let from = number(
        params.from_version.as_deref(),
        "from_version",
        1..=i64::MAX,
        1,
    )?;
    let limit = number(
        params.limit.as_deref(),
        "limit",
        1..=MAX_STREAM_PAGE,
        DEFAULT_STREAM_PAGE,
    )?;
    let mut events = s
        .store
        .load_stream_page(aggregate_type.as_str(), &aggregate_id, from - 1, limit + 1)
        .await?;
    let next_from_version = match events.len() as i64 > limit {
        true => {
            events.truncate(limit as usize);
            events.last().map(|e| e.envelope.version + 1)
        }
        false => None,
    };
    let exists = !events.is_empty()
        || (from > 1
            && !s
                .store
                .load_stream_page(aggregate_type.as_str(), &aggregate_id, 0, 1)
                .await?
                .is_empty());
    if !exists {
        return Err(ApiError::not_found(format!(
            "no stream {aggregate_type}/{aggregate_id}"
        )));
    }
    for event in &mut events {
        schemas::redact_payload(&mut event.envelope.payload);
    }
    Ok(Json(StreamView {
        events,
        next_from_version,
    }))
}

#[cfg(test)]
mod tests;

/// The caller's own profile (a customer's).
#[utoipa::path(
    get,
    path = "/v1/customers/me",
    tag = "customers",
    params(("X-Consistency-Token" = Option<String>, Header, description = "The token of a write: the read waits until it reflects it"), ("X-Consistency-Wait-Ms" = Option<u32>, Header, description = "How long to wait for the token, 0 to 30000 ms (default 2000)")),
    responses((status = 200, body = CustomerView), ReadRefusals)
)]
async fn me(
    State(s): State<QueryState>,
    principal: Principal,
    headers: HeaderMap,
) -> Result<Json<CustomerView>, ApiError> {
    let customer = principal
        .customer()
        .ok_or_else(|| ApiError::forbidden("only a customer has a profile"))?
        .to_owned();
    let db = s.reflecting(ProjectionName::Customers, &headers).await?;
    let view = db
        .read_one(
            "SELECT customer_id, email, name FROM customers WHERE customer_id = $1",
            &customer,
            |row| {
                Ok(CustomerView {
                    customer_id: row.text("customer_id")?,
                    email: row.text("email")?,
                    name: row.text("name")?,
                })
            },
        )
        .await?
        .ok_or_else(|| ApiError::not_found("no profile for this customer yet"))?;
    Ok(Json(view))
}

/// A product's row with its stock (a macro, so that the queries built on it are
/// literals too).
macro_rules! product_view {
    () => {
        "SELECT p.sku, p.name, p.description, p.price_cents, p.active,
        COALESCE(s.available, 0) AS available
   FROM products p LEFT JOIN product_stock s ON s.sku = p.sku"
    };
}
const PRODUCT_BY_SKU: &str = concat!(product_view!(), " WHERE p.sku = $1");
const PRODUCT_PAGE_SQLITE: &str = concat!(
    product_view!(),
    " WHERE ($1 IS NULL OR p.rowid IN (SELECT rowid FROM products_search WHERE products_search MATCH $1))
        AND ($2 IS NULL OR p.sku > $2)
      ORDER BY p.sku LIMIT $3"
);
const PRODUCT_PAGE_POSTGRES: &str = concat!(
    product_view!(),
    " WHERE ($1 IS NULL OR to_tsvector('simple', p.name || ' ' || p.description) @@ plainto_tsquery('simple', $1))
        AND ($2 IS NULL OR p.sku > $2)
      ORDER BY p.sku LIMIT $3"
);

fn product_view(row: &dyn Columns) -> Result<ProductView, InfraError> {
    Ok(ProductView {
        sku: row.text("sku")?,
        name: row.text("name")?,
        description: row.text("description")?,
        price_cents: row.int("price_cents")?.max(0) as u64,
        active: row.int("active")? != 0,
        available: row.int("available")?.max(0) as u64,
    })
}

/// The words of a search, each quoted for FTS5 (so no input is read as its query
/// syntax); all must match. `None` when nothing searchable is left.
fn search_terms(q: &str, fts5: bool) -> Option<String> {
    let words: Vec<String> = q
        .split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .take(16)
        .map(|word| {
            if fts5 {
                format!("\"{word}\"")
            } else {
                word.to_owned()
            }
        })
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ProductParams {
    /// Words to find in the name or description (all of them).
    q: Option<String>,
    /// Products per page: 1 to 100 (default 20).
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
    /// `next_cursor` of the page before.
    cursor: Option<String>,
}

/// The catalog, by sku; with `q`, the products whose name or description hold every
/// word of it (full-text search).
#[utoipa::path(
    get,
    path = "/v1/products",
    tag = "catalog",
    params(ProductParams, ("X-Consistency-Token" = Option<String>, Header, description = "The token of a write: the read waits until it reflects it"), ("X-Consistency-Wait-Ms" = Option<u32>, Header, description = "How long to wait for the token, 0 to 30000 ms (default 2000)")),
    responses((status = 200, body = ProductPage), ReadRefusals)
)]
async fn products(
    State(s): State<QueryState>,
    params: Result<Query<ProductParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<ProductPage>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::malformed(e.body_text()))?;
    let limit = page_limit(params.limit.as_deref())?;
    let cursor = params
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|raw| {
            domain::Sku::parse(raw)
                .map(|sku| sku.as_str().to_owned())
                .map_err(|_| ApiError::invalid("cursor is not one this server issued"))
        })
        .transpose()?;
    let fts5 = s.files.catalog.is_some();
    let query = params.q.as_deref().filter(|q| !q.trim().is_empty());
    let terms = match query.map(|q| search_terms(q, fts5)) {
        // Nothing in the search that could match a word.
        Some(None) => {
            return Ok(Json(ProductPage {
                items: vec![],
                next_cursor: None,
            }))
        }
        Some(terms) => terms,
        None => None,
    };
    let db = s.reflecting(ProjectionName::Catalog, &headers).await?;
    let sql = if fts5 {
        PRODUCT_PAGE_SQLITE
    } else {
        PRODUCT_PAGE_POSTGRES
    };
    let rows = sqlx::query(sql)
        .bind(terms)
        .bind(cursor)
        .bind(limit + 1)
        .fetch_all(db.pool)
        .await?;
    let (items, next_cursor) = page(&rows, limit, product_view, |p| p.sku.clone())?;
    Ok(Json(ProductPage { items, next_cursor }))
}

/// One product of the catalog.
#[utoipa::path(
    get,
    path = "/v1/products/{sku}",
    tag = "catalog",
    params(("sku" = String, Path), ("X-Consistency-Token" = Option<String>, Header, description = "The token of a write: the read waits until it reflects it"), ("X-Consistency-Wait-Ms" = Option<u32>, Header, description = "How long to wait for the token, 0 to 30000 ms (default 2000)")),
    responses((status = 200, body = ProductView), ReadRefusals)
)]
async fn product(
    State(s): State<QueryState>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ProductView>, ApiError> {
    let sku = domain::Sku::parse(&sku).map_err(|e| ApiError::invalid(e.to_string()))?;
    let db = s.reflecting(ProjectionName::Catalog, &headers).await?;
    let view = db
        .read_one(PRODUCT_BY_SKU, sku.as_str(), product_view)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no product {sku}")))?;
    Ok(Json(view))
}

/// The caller's cart, each line at the catalog's price now (as the cart service's
/// copy of the prices has it).
#[utoipa::path(
    get,
    path = "/v1/cart",
    tag = "cart",
    params(("X-Consistency-Token" = Option<String>, Header, description = "The token of a write: the read waits until it reflects it"), ("X-Consistency-Wait-Ms" = Option<u32>, Header, description = "How long to wait for the token, 0 to 30000 ms (default 2000)")),
    responses((status = 200, body = CartView), ReadRefusals)
)]
async fn cart(
    State(s): State<QueryState>,
    principal: Principal,
    headers: HeaderMap,
) -> Result<Json<CartView>, ApiError> {
    let customer = principal
        .customer()
        .ok_or_else(|| ApiError::forbidden("a cart is a customer's own"))?
        .to_owned();
    let db = s.reflecting(ProjectionName::Carts, &headers).await?;
    let rows = sqlx::query(
        "SELECT c.sku, c.quantity, COALESCE(p.price_cents, 0) AS price_cents
           FROM cart_lines c LEFT JOIN product_prices p ON p.sku = c.sku
          WHERE c.customer_id = $1 ORDER BY c.sku",
    )
    .bind(customer)
    .fetch_all(db.pool)
    .await?;
    let mut lines = vec![];
    for row in &rows {
        let row: &dyn Columns = row;
        lines.push(CartLineView {
            sku: row.text("sku")?,
            quantity: row.int("quantity")?.max(0) as u64,
            unit_price_cents: row.int("price_cents")?.max(0) as u64,
        });
    }
    let total_cents = lines
        .iter()
        .map(|line| line.quantity.saturating_mul(line.unit_price_cents))
        .fold(0u64, u64::saturating_add);
    Ok(Json(CartView { lines, total_cents }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct NotificationParams {
    /// Whose (operators; a customer sees its own).
    customer_id: Option<String>,
    /// Notifications per page: 1 to 100 (default 20).
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
    /// `next_cursor` of the page before.
    cursor: Option<String>,
}

/// What was sent, newest first: a customer's own; an operator's, anyone's (or
/// `customer_id`'s).
#[utoipa::path(
    get,
    path = "/v1/notifications",
    tag = "notifications",
    params(NotificationParams),
    responses((status = 200, body = NotificationPage), ReadRefusals)
)]
async fn notifications(
    State(s): State<QueryState>,
    principal: Principal,
    params: Result<Query<NotificationParams>, QueryRejection>,
) -> Result<Json<NotificationPage>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::malformed(e.body_text()))?;
    let limit = page_limit(params.limit.as_deref())?;
    let customer = principal.whose(
        params.customer_id.as_deref().filter(|c| !c.is_empty()),
        "customer_id: a customer sees its own notifications only",
    )?;
    let cursor = params
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|raw| {
            Uuid::parse_str(raw)
                .map(|id| id.to_string())
                .map_err(|_| ApiError::invalid("cursor is not one this server issued"))
        })
        .transpose()?;
    let pool = s
        .notifications
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this process does not serve notifications"))?;
    let rows = sqlx::query(
        "SELECT notification_id, order_id, kind, channel, sent_at FROM notifications n
          WHERE sent_at IS NOT NULL AND ($1 IS NULL OR customer_id = $1)
            AND ($2 IS NULL OR (created_at, notification_id) <
                 (SELECT created_at, notification_id FROM notifications WHERE notification_id = $2))
          ORDER BY created_at DESC, notification_id DESC LIMIT $3",
    )
    .bind(customer)
    .bind(cursor)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let (items, next_cursor) = page(
        &rows,
        limit,
        |row| {
            Ok(NotificationView {
                notification_id: infra::parse_uuid(&row.text("notification_id")?)?,
                order_id: row.text("order_id")?,
                kind: row.text("kind")?,
                channel: row.maybe_text("channel")?.unwrap_or_default(),
                sent_at: parse_timestamp(&row.text("sent_at")?)?,
            })
        },
        |n| n.notification_id.to_string(),
    )?;
    Ok(Json(NotificationPage { items, next_cursor }))
}
