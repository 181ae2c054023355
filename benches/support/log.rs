//! A log of orders written straight into an event table (before a benchmark's
//! clock starts): each order placed, confirmed, shipped and delivered.

use sqlx::Connection;

pub const EVENTS_PER_ORDER: usize = 4;
/// Orders placed between confirmations: the streams interleave as they do live.
const BLOCK: usize = 1_000;

/// The rows of one order's events: (aggregate id, version, type, schema version,
/// payload).
fn order_events(order: usize) -> [(String, i64, &'static str, i64, String); 4] {
    let id = uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | order as u128)
        .to_string();
    let placed = serde_json::json!({
        "customer_id": format!("c-{}", order % 10_000),
        "lines": [
            {"sku": format!("S-{}", order % 1_000), "quantity": 2, "unit_price_cents": 1299},
            {"sku": "S-gift", "quantity": 1, "unit_price_cents": 0},
        ],
        "payment_token": "tok_ok",
        "total_cents": 2598,
    })
    .to_string();
    let version = |t: &str| schemas::events::current_version(t).map_or(1, i64::from);
    [
        (id.clone(), 1, "OrderPlaced", version("OrderPlaced"), placed),
        (
            id.clone(),
            2,
            "OrderConfirmed",
            version("OrderConfirmed"),
            "{}".into(),
        ),
        (
            id.clone(),
            3,
            "OrderShipped",
            version("OrderShipped"),
            "{}".into(),
        ),
        (
            id,
            4,
            "OrderDelivered",
            version("OrderDelivered"),
            "{}".into(),
        ),
    ]
}

/// The log's rows in the order they are written: a block of orders placed, then
/// confirmed, shipped and delivered.
fn log_rows(orders: usize) -> impl Iterator<Item = [String; 10]> {
    let at = infra::timestamp(chrono::Utc::now());
    (0..orders).step_by(BLOCK).flat_map(move |first| {
        let block: Vec<_> = (first..(first + BLOCK).min(orders))
            .map(order_events)
            .collect();
        let at = at.clone();
        (0..EVENTS_PER_ORDER).flat_map(move |step| {
            let at = at.clone();
            block
                .iter()
                .map(move |events| {
                    let (id, version, event_type, schema, payload) = events[step].clone();
                    let event_id = uuid::Uuid::now_v7().to_string();
                    [
                        event_id.clone(),
                        "order".into(),
                        id,
                        version.to_string(),
                        event_type.into(),
                        schema.to_string(),
                        at.clone(),
                        event_id.clone(),
                        event_id,
                        payload,
                    ]
                })
                .collect::<Vec<_>>()
        })
    })
}

pub const COLUMNS: &str = "event_id, aggregate_type, aggregate_id, version, event_type, \
     schema_version, occurred_at, correlation_id, causation_id, payload";

pub fn fill_sqlite(
    path: &std::path::Path,
    orders: usize,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let mut db = rusqlite::Connection::open(path)?;
    let tx = db.transaction()?;
    {
        let mut insert = tx.prepare(&format!(
            "INSERT INTO events ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ))?;
        for row in log_rows(orders) {
            insert.execute(rusqlite::params_from_iter(row.iter()))?;
            bar.inc(1);
        }
    }
    tx.commit()?;
    Ok(())
}

pub async fn fill_postgres(
    url: &str,
    orders: usize,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY events ({COLUMNS}) FROM STDIN WITH (FORMAT csv)"
        ))
        .await?;
    let mut chunk = String::new();
    for row in log_rows(orders) {
        let fields: Vec<String> = row
            .iter()
            .map(|f| format!("\"{}\"", f.replace('"', "\"\"")))
            .collect();
        chunk.push_str(&fields.join(","));
        chunk.push('\n');
        bar.inc(1);
        if chunk.len() > 1 << 20 {
            copy.send(std::mem::take(&mut chunk).into_bytes()).await?;
        }
    }
    copy.send(chunk.into_bytes()).await?;
    copy.finish().await?;
    Ok(())
}
