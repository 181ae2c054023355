//! The projections. Each owns a few tables in its service's database; the same SQL
//! builds the live tables and their shadow copies (a suffix on every table name).

use domain::cart::CartEvent;
use domain::customer::CustomerEvent;
use domain::inventory::InventoryEvent;
use domain::order::OrderEvent;
use domain::payment::PaymentEvent;
use domain::product::ProductEvent;
use domain::shipment::ShipmentEvent;
use infra::db::Dialect;
use infra::timestamp;
use schemas::{AnyEvent, Envelope};
use sqlx::AnyConnection;
use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

pub use schemas::topics::ProjectionName as Projection;

/// Every projection.
pub const ALL: &[Projection] = Projection::ALL;

/// A projection's tables and how an event changes them.
pub trait ReadModel {
    /// Base names of its tables; the version guard is always the last.
    fn tables(self) -> Vec<String>;
    fn create_tables(self, suffix: &str) -> String;
    /// Indexes of the live tables (built after a swap, not while filling a shadow),
    /// in the dialect's own words.
    fn create_indexes(self, dialect: Dialect) -> String;
    /// The change one event makes to the tables with `suffix`: one statement (so an
    /// event that fails has changed nothing, and the caller dead-letters it), or none.
    fn change(
        self,
        suffix: &str,
        envelope: &Envelope,
        event: &AnyEvent,
    ) -> Result<Option<Change>, String>;
}

/// One statement with its values: `$1`, `$2`, ... are its binds in order.
#[derive(Debug, Clone)]
pub struct Change {
    /// The statement and its values. One row's write makes them when first asked:
    /// most of a rebuild's row writes are merged into others and never run alone.
    statement: OnceLock<(Arc<str>, Vec<Bind>)>,
    /// What it does to one row, when that is all it does: the writes of one row in a
    /// batch then go as one statement ([`coalesce`]).
    row: Option<RowWrite>,
}

impl PartialEq for Change {
    fn eq(&self, other: &Change) -> bool {
        self.row == other.row && self.sql() == other.sql() && self.binds() == other.binds()
    }
}

/// A write of one row of one table, found by its key.
#[derive(Debug, Clone, PartialEq)]
pub struct RowWrite {
    table: String,
    key: Vec<(&'static str, Bind)>,
    kind: RowKind,
    /// The values written (for an upsert, those of a new row).
    columns: Vec<(&'static str, Bind)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RowKind {
    /// `INSERT`: a row with that key already there fails it.
    Insert,
    /// `INSERT ... ON CONFLICT (key) DO UPDATE SET` these columns to their new
    /// values (none: `DO NOTHING`).
    Upsert(Vec<&'static str>),
    /// `UPDATE ... SET` every column `WHERE` the key (no such row: nothing).
    Update,
}

/// What a row write's statement is made of: everything but its values.
struct Shape {
    table: String,
    key: Vec<&'static str>,
    kind: RowKind,
    columns: Vec<&'static str>,
}

/// Row writes' statements held per thread: of at most this many shape hashes.
const SHAPES_HELD: usize = 1024;

/// Row writes' statements made so far on this thread: by a hash of their shape (see
/// [`RowWrite::shape_hash`]), each with its shape, so a write finds its statement
/// without a [`Shape`] made for the lookup.
#[derive(Default)]
struct Shapes {
    hasher: foldhash::fast::RandomState,
    made: foldhash::HashMap<u64, Vec<(Shape, Arc<str>)>>,
}

thread_local! {
    static SHAPES: RefCell<Shapes> = RefCell::default();
}

impl Shape {
    /// The statement, its values numbered `$1`, `$2`, ... in the order
    /// [`RowWrite::statement`] binds them.
    fn sql(&self) -> String {
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        match &self.kind {
            RowKind::Update => {
                let set: Vec<String> = self
                    .columns
                    .iter()
                    .map(|name| format!("{name} = {}", next()))
                    .collect();
                let found: Vec<String> = self
                    .key
                    .iter()
                    .map(|name| format!("{name} = {}", next()))
                    .collect();
                format!(
                    "UPDATE {} SET {} WHERE {}",
                    self.table,
                    set.join(", "),
                    found.join(" AND ")
                )
            }
            RowKind::Insert | RowKind::Upsert(_) => {
                let names: Vec<&str> = self.key.iter().chain(&self.columns).copied().collect();
                let values: Vec<String> = names.iter().map(|_| next()).collect();
                let keys = self.key.join(", ");
                let conflict = match &self.kind {
                    RowKind::Upsert(set) if set.is_empty() => {
                        format!(" ON CONFLICT ({keys}) DO NOTHING")
                    }
                    RowKind::Upsert(set) => {
                        let set: Vec<String> = set
                            .iter()
                            .map(|name| format!("{name} = excluded.{name}"))
                            .collect();
                        format!(" ON CONFLICT ({keys}) DO UPDATE SET {}", set.join(", "))
                    }
                    _ => String::new(),
                };
                format!(
                    "INSERT INTO {} ({}) VALUES ({}){conflict}",
                    self.table,
                    names.join(", "),
                    values.join(", ")
                )
            }
        }
    }
}

impl RowWrite {
    /// The change that writes this row.
    fn change(
        table: String,
        key: Vec<(&'static str, Bind)>,
        kind: RowKind,
        columns: Vec<(&'static str, Bind)>,
    ) -> Change {
        Change::of_row(RowWrite {
            table,
            key,
            kind,
            columns,
        })
    }

    /// Its statement and values. The statement depends only on the row's shape (its
    /// table, the names of its key and columns, what it does), and is made once per
    /// shape and thread: one row write of a rebuild's batch is one statement, and
    /// writing it out anew cost more than running it.
    fn statement(&self) -> (Arc<str>, Vec<Bind>) {
        let values = match &self.kind {
            RowKind::Update => self.columns.iter().chain(&self.key),
            RowKind::Insert | RowKind::Upsert(_) => self.key.iter().chain(&self.columns),
        };
        let binds = values.map(|(_, value)| value.clone()).collect();
        let sql = SHAPES.with(|shapes| {
            let mut shapes = shapes.borrow_mut();
            let hash = self.shape_hash(&shapes.hasher);
            let same = |(shape, _): &&(Shape, Arc<str>)| self.has_shape(shape);
            if let Some((_, sql)) = shapes
                .made
                .get(&hash)
                .and_then(|made| made.iter().find(same))
            {
                return sql.clone();
            }
            if shapes.made.len() >= SHAPES_HELD {
                shapes.made.clear();
            }
            let shape = Shape {
                table: self.table.clone(),
                key: self.key.iter().map(|(name, _)| *name).collect(),
                kind: self.kind.clone(),
                columns: self.columns.iter().map(|(name, _)| *name).collect(),
            };
            let sql: Arc<str> = shape.sql().into();
            shapes
                .made
                .entry(hash)
                .or_default()
                .push((shape, sql.clone()));
            sql
        });
        (sql, binds)
    }

    /// A hash of its shape: its table, the names of its key and columns, and what it
    /// does (each list with its length, so no two shapes run together the same).
    fn shape_hash(&self, hasher: &impl std::hash::BuildHasher) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut state = hasher.build_hasher();
        self.table.hash(&mut state);
        self.key.len().hash(&mut state);
        for (name, _) in &self.key {
            name.hash(&mut state);
        }
        self.kind.hash(&mut state);
        self.columns.len().hash(&mut state);
        for (name, _) in &self.columns {
            name.hash(&mut state);
        }
        state.finish()
    }

    /// Whether `shape` is its shape.
    fn has_shape(&self, shape: &Shape) -> bool {
        shape.table == self.table
            && shape.kind == self.kind
            && shape.key.iter().eq(self.key.iter().map(|(name, _)| name))
            && shape
                .columns
                .iter()
                .eq(self.columns.iter().map(|(name, _)| name))
    }

    /// Become `self` and then `next`, a write of the same row, as one write that
    /// leaves the row as the two would (whether or not it was there before), when
    /// there is one (true); unchanged otherwise (false).
    fn absorb(&mut self, next: &RowWrite) -> bool {
        let kind = match (&self.kind, &next.kind) {
            // The row is there after `self` (or `self` fails, and so does the one
            // write): `next` updates it.
            (RowKind::Insert, RowKind::Update) => RowKind::Insert,
            (RowKind::Insert, RowKind::Upsert(_)) => RowKind::Insert,
            (RowKind::Upsert(set), RowKind::Update) => {
                RowKind::Upsert(union(set, next.columns.iter().map(|(name, _)| *name)))
            }
            (RowKind::Upsert(set), RowKind::Upsert(then)) => {
                RowKind::Upsert(union(set, then.iter().copied()))
            }
            (RowKind::Update, RowKind::Update) => RowKind::Update,
            // An insert after anything fails or inserts what `self` could not
            // update: kept apart.
            _ => return false,
        };
        // What `next` writes to a row that is there: every column of an update, the
        // columns an upsert updates.
        let updated: Vec<&(&'static str, Bind)> = match &next.kind {
            RowKind::Upsert(set) => next
                .columns
                .iter()
                .filter(|(name, _)| set.contains(name))
                .collect(),
            _ => next.columns.iter().collect(),
        };
        for (name, value) in updated {
            match self.columns.iter_mut().find(|(have, _)| have == name) {
                Some(column) => column.1 = value.clone(),
                None => self.columns.push((name, value.clone())),
            }
        }
        self.kind = kind;
        true
    }
}

fn union(first: &[&'static str], then: impl Iterator<Item = &'static str>) -> Vec<&'static str> {
    let mut all = first.to_vec();
    for name in then {
        if !all.contains(&name) {
            all.push(name);
        }
    }
    all
}

pub use infra::db::Bind;

impl From<Change> for infra::db::Statement {
    fn from(change: Change) -> Self {
        let (sql, binds) = change.into_parts();
        infra::db::Statement::new(sql, binds)
    }
}

/// A row: its table and its key.
type RowKey<'a> = (&'a str, &'a [(&'static str, Bind)]);

/// One statement of a batch for one or more of its changes: `changes` are their
/// places in the list given to [`coalesce`]; `merged` is the one row write they make
/// together, when they are more than one.
pub struct Coalesced {
    pub changes: Vec<usize>,
    pub merged: Option<Change>,
}

impl Coalesced {
    /// Its one statement: the merged write, or its one change of `changes` (the list
    /// given to [`coalesce`]).
    pub fn statement<'a>(&'a self, changes: &'a [(usize, Change)]) -> &'a Change {
        match &self.merged {
            Some(merged) => merged,
            None => &changes[self.changes[0]].1,
        }
    }
}

/// The changes of a batch with each row's writes made one where they can be (see
/// [`RowWrite::absorb`]), at the place of each row's first write: the tables end up
/// as the changes one by one would leave them, in fewer statements. A change that
/// is not one row's write (it may touch any row) ends the merging: nothing before it
/// is merged with anything after it.
pub fn coalesce(changes: &[(usize, Change)]) -> Vec<Coalesced> {
    let mut out: Vec<(Vec<usize>, Option<RowWrite>)> = Vec::with_capacity(changes.len());
    // Where each row's last write is in `out`, since the last change that was not
    // one row's write.
    let mut last: foldhash::HashMap<RowKey, usize> = Default::default();
    for (place, (_, change)) in changes.iter().enumerate() {
        let Some(row) = &change.row else {
            last.clear();
            out.push((vec![place], None));
            continue;
        };
        let key = (row.table.as_str(), row.key.as_slice());
        if let Some(&at) = last.get(&key) {
            let (places, merged) = &mut out[at];
            let joined = match merged {
                Some(merged) => merged.absorb(row),
                // The row's first write, copied once to merge the rest into.
                None => {
                    let mut first = changes[places[0]].1.row.clone();
                    let joined = first.as_mut().is_some_and(|first| first.absorb(row));
                    if joined {
                        *merged = first;
                    }
                    joined
                }
            };
            if joined {
                places.push(place);
                continue;
            }
        }
        last.insert(key, out.len());
        out.push((vec![place], None));
    }
    out.into_iter()
        .map(|(changes, merged)| Coalesced {
            changes,
            merged: merged.map(Change::of_row),
        })
        .collect()
}

impl Change {
    /// A statement with its values, not known to be one row's write.
    pub fn new(sql: String, binds: Vec<Bind>) -> Change {
        Change {
            statement: OnceLock::from((Arc::from(sql), binds)),
            row: None,
        }
    }

    fn of_row(row: RowWrite) -> Change {
        Change {
            statement: OnceLock::new(),
            row: Some(row),
        }
    }

    fn parts(&self) -> &(Arc<str>, Vec<Bind>) {
        self.statement.get_or_init(|| match &self.row {
            Some(row) => row.statement(),
            None => (Arc::from(""), vec![]),
        })
    }

    pub fn sql(&self) -> &str {
        &self.parts().0
    }

    pub fn binds(&self) -> &[Bind] {
        &self.parts().1
    }

    /// The statement and its values, made now if not yet.
    pub fn into_parts(self) -> (String, Vec<Bind>) {
        self.parts();
        self.statement.into_inner().map_or_else(
            || (String::new(), vec![]),
            |(sql, binds)| (sql.to_string(), binds),
        )
    }

    /// A statement without values.
    pub fn statement(sql: &str) -> Change {
        Change::new(sql.to_owned(), vec![])
    }

    /// Execute without keeping the prepared statement (a script's text is new each
    /// time; cached, it would push the statements that repeat out of the cache).
    pub async fn execute_once(&self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        bind_all(sqlx::query(self.sql()), self.binds())
            .persistent(false)
            .execute(conn)
            .await
            .map(|_| ())
    }

    pub async fn execute(&self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        bind_all(sqlx::query(self.sql()), self.binds())
            .execute(conn)
            .await
            .map(|_| ())
    }

    /// Several changes as one SQLite script of statements (their parameters
    /// numbered on), so they cost one round trip to the connection's thread.
    pub fn script<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Change {
        let mut sql = String::new();
        let mut binds = vec![];
        for change in changes {
            sql.push_str(&renumber(change.sql(), binds.len()));
            sql.push_str(";\n");
            binds.extend(change.binds().iter().cloned());
        }
        Change::new(sql, binds)
    }
}

impl Change {
    /// Several changes as one PostgreSQL script with their values written in as
    /// literals (`E'...'` with backslashes and quotes escaped, so the text reads
    /// back exactly whatever `standard_conforming_strings` says), for the simple
    /// query protocol.
    pub fn literal_script<'a>(changes: impl IntoIterator<Item = &'a Change>) -> String {
        let mut sql = String::new();
        for change in changes {
            sql.push_str(&inline(change.sql(), change.binds()));
            sql.push_str(";\n");
        }
        sql
    }
}

/// A value as a PostgreSQL literal.
fn literal(bind: &Bind) -> String {
    match bind {
        // In parentheses when negative: `x -$1` must not become the comment `x --1`.
        Bind::Integer(n) if *n < 0 => format!("({n})"),
        Bind::Integer(n) => n.to_string(),
        Bind::Text(text) => infra::db::text_literal(text),
    }
}

/// `sql` with every `$n` replaced by the literal of `binds[n - 1]` (a number with
/// no value is left as it is, and fails when run).
fn inline(sql: &str, binds: &[Bind]) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            digits.push(*d);
            chars.next();
        }
        match digits
            .parse::<usize>()
            .ok()
            .and_then(|n| binds.get(n.checked_sub(1)?))
        {
            Some(bind) => out.push_str(&literal(bind)),
            None => {
                out.push('$');
                out.push_str(&digits);
            }
        }
    }
    out
}

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    binds: &'q [Bind],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for bind in binds {
        query = match bind {
            Bind::Text(text) => query.bind(text.as_str()),
            Bind::Integer(n) => query.bind(*n),
        };
    }
    query
}

/// `sql` with every `$n` made `$(n + offset)`.
fn renumber(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '$' {
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            digits.push(*d);
            chars.next();
        }
        match digits.parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&digits),
        }
    }
    out
}

fn text(value: impl Into<String>) -> Bind {
    Bind::Text(value.into())
}

impl ReadModel for Projection {
    fn tables(self) -> Vec<String> {
        let main: &[&str] = match self {
            Projection::Orders => &["orders", "order_progress"],
            Projection::Inventory => &["inventory_levels"],
            Projection::Payments => &["payments"],
            Projection::Shipments => &["shipments"],
            Projection::Customers => &["customers"],
            Projection::Catalog => &["products", "product_stock"],
            Projection::Prices | Projection::CartPrices => &["product_prices"],
            Projection::Carts => &["cart_lines"],
        };
        let mut tables: Vec<String> = main.iter().map(|t| (*t).to_owned()).collect();
        tables.push(self.applied_table(""));
        tables
    }

    fn create_tables(self, suffix: &str) -> String {
        // Small rows looked up by their key only: on SQLite the key's index is the
        // table (one B-tree written per guard moved instead of two).
        let guard = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, version BIGINT NOT NULL,
                PRIMARY KEY (aggregate_type, aggregate_id)){{without_rowid}};",
            self.applied_table(suffix)
        );
        let main = match self {
            // The order's own stream and its payment's and shipment's go to separate
            // tables, joined when read: streams of different aggregates may be read in
            // any order (from Kafka, or in a replay), and each table depends on one.
            Projection::Orders => format!(
                "CREATE TABLE IF NOT EXISTS orders{suffix} (
                    order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, status TEXT NOT NULL,
                    lines TEXT NOT NULL, total_cents BIGINT NOT NULL, cancel_reason TEXT,
                    placed_at TEXT NOT NULL, updated_at TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS order_progress{suffix} (
                    order_id TEXT PRIMARY KEY, payment_status TEXT, shipment_status TEXT,
                    updated_at TEXT NOT NULL);"
            ),
            Projection::Inventory => format!(
                "CREATE TABLE IF NOT EXISTS inventory_levels{suffix} (
                    sku TEXT PRIMARY KEY, on_hand BIGINT NOT NULL, reserved BIGINT NOT NULL,
                    updated_at TEXT NOT NULL);"
            ),
            Projection::Payments => format!(
                "CREATE TABLE IF NOT EXISTS payments{suffix} (
                    order_id TEXT PRIMARY KEY, status TEXT NOT NULL, amount_cents BIGINT NOT NULL,
                    authorized_cents BIGINT NOT NULL DEFAULT 0, captured_cents BIGINT NOT NULL DEFAULT 0,
                    voided_cents BIGINT NOT NULL DEFAULT 0, decline_reason TEXT, updated_at TEXT NOT NULL);"
            ),
            Projection::Shipments => format!(
                "CREATE TABLE IF NOT EXISTS shipments{suffix} (
                    order_id TEXT PRIMARY KEY, status TEXT NOT NULL, updated_at TEXT NOT NULL);"
            ),
            // What a profile shows; the password hash stays in the customer's stream.
            Projection::Customers => format!(
                "CREATE TABLE IF NOT EXISTS customers{suffix} (
                    customer_id TEXT PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL,
                    registered_at TEXT NOT NULL, updated_at TEXT NOT NULL);"
            ),
            // Products and their stock in tables of their own (the streams of two
            // aggregates), joined when read.
            Projection::Catalog => format!(
                "CREATE TABLE IF NOT EXISTS products{suffix} (
                    sku TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL,
                    price_cents BIGINT NOT NULL, active BIGINT NOT NULL, updated_at TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS product_stock{suffix} (
                    sku TEXT PRIMARY KEY, available BIGINT NOT NULL, updated_at TEXT NOT NULL);"
            ),
            Projection::Carts => format!(
                "CREATE TABLE IF NOT EXISTS cart_lines{suffix} (
                    customer_id TEXT NOT NULL, sku TEXT NOT NULL, quantity BIGINT NOT NULL,
                    updated_at TEXT NOT NULL, PRIMARY KEY (customer_id, sku));"
            ),
            Projection::Prices | Projection::CartPrices => format!(
                "CREATE TABLE IF NOT EXISTS product_prices{suffix} (
                    sku TEXT PRIMARY KEY, price_cents BIGINT NOT NULL, active BIGINT NOT NULL,
                    updated_at TEXT NOT NULL);"
            ),
        };
        format!("{main}\n{guard}")
    }

    fn create_indexes(self, dialect: Dialect) -> String {
        match (self, dialect) {
            (Projection::Orders, _) => {
                "CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id, order_id);
                 CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status, order_id);"
                    .into()
            }
            // Full-text search of names and descriptions: an FTS5 index over the
            // products table, kept by triggers (one statement per event still
            // changes everything), filled again from the table after a swap and at
            // start-up (a rebuild's shadow has neither index nor triggers).
            (Projection::Catalog, Dialect::Sqlite) => format!(
                "CREATE VIRTUAL TABLE IF NOT EXISTS {SEARCH} USING fts5(name, description, content='products');
                 CREATE TRIGGER IF NOT EXISTS {SEARCH}_insert AFTER INSERT ON products BEGIN
                    INSERT INTO {SEARCH} (rowid, name, description) VALUES (new.rowid, new.name, new.description);
                 END;
                 CREATE TRIGGER IF NOT EXISTS {SEARCH}_update AFTER UPDATE ON products BEGIN
                    INSERT INTO {SEARCH} ({SEARCH}, rowid, name, description) VALUES ('delete', old.rowid, old.name, old.description);
                    INSERT INTO {SEARCH} (rowid, name, description) VALUES (new.rowid, new.name, new.description);
                 END;
                 CREATE TRIGGER IF NOT EXISTS {SEARCH}_delete AFTER DELETE ON products BEGIN
                    INSERT INTO {SEARCH} ({SEARCH}, rowid, name, description) VALUES ('delete', old.rowid, old.name, old.description);
                 END;
                 INSERT INTO {SEARCH} ({SEARCH}) VALUES ('rebuild');"
            ),
            (Projection::Catalog, Dialect::Postgres) => format!(
                "CREATE INDEX IF NOT EXISTS {SEARCH} ON products USING GIN ({SEARCH_VECTOR});"
            ),
            _ => String::new(),
        }
    }

    fn change(
        self,
        suffix: &str,
        envelope: &Envelope,
        event: &AnyEvent,
    ) -> Result<Option<Change>, String> {
        let id = envelope.aggregate_id.as_str();
        let at = timestamp(envelope.occurred_at);
        Ok(match (self, event) {
            (Projection::Orders, AnyEvent::Order(event)) => {
                Some(order_change(suffix, id, &at, event)?)
            }
            (Projection::Orders, AnyEvent::Payment(event)) => Some(progress_change(
                suffix,
                id,
                &at,
                "payment_status",
                payment_status(event),
            )),
            (Projection::Orders, AnyEvent::Shipment(event)) => Some(progress_change(
                suffix,
                id,
                &at,
                "shipment_status",
                shipment_status(event),
            )),
            (Projection::Inventory, AnyEvent::Inventory(event)) => {
                inventory_change(suffix, id, &at, event)
            }
            (Projection::Payments, AnyEvent::Payment(event)) => {
                Some(payment_change(suffix, id, &at, event))
            }
            (Projection::Shipments, AnyEvent::Shipment(event)) => Some(RowWrite::change(
                format!("shipments{suffix}"),
                vec![("order_id", text(id))],
                RowKind::Upsert(vec!["status", "updated_at"]),
                vec![
                    ("status", text(shipment_status(event))),
                    ("updated_at", text(at)),
                ],
            )),
            (Projection::Customers, AnyEvent::Customer(event)) => {
                Some(customer_change(suffix, id, &at, event))
            }
            (Projection::Catalog, AnyEvent::Product(event)) => {
                Some(product_change(suffix, id, &at, event))
            }
            (Projection::Catalog, AnyEvent::Inventory(event)) => {
                stock_change(suffix, id, &at, event)
            }
            (Projection::Prices | Projection::CartPrices, AnyEvent::Product(event)) => {
                Some(price_change(suffix, id, &at, event))
            }
            (Projection::Carts, AnyEvent::Cart(event)) => Some(cart_change(suffix, id, &at, event)),
            _ => None,
        })
    }
}

/// The full-text index of the catalog (an FTS5 table on SQLite, a GIN index on
/// PostgreSQL).
pub const SEARCH: &str = "products_search";
/// What the PostgreSQL index holds and a search matches against.
pub const SEARCH_VECTOR: &str = "to_tsvector('simple', name || ' ' || description)";

/// A product as it is after the event (every event carries all of it).
fn product_state(event: &ProductEvent) -> (&str, &str, u64, bool) {
    match event {
        ProductEvent::ProductCreated {
            name,
            description,
            price_cents,
        } => (name, description, price_cents.cents(), true),
        ProductEvent::ProductChanged {
            name,
            description,
            price_cents,
            active,
        } => (name, description, price_cents.cents(), *active),
    }
}

fn product_change(suffix: &str, sku: &str, at: &str, event: &ProductEvent) -> Change {
    let (name, description, price, active) = product_state(event);
    let columns = vec![
        ("name", text(name)),
        ("description", text(description)),
        ("price_cents", Bind::Integer(price as i64)),
        ("active", Bind::Integer(i64::from(active))),
        ("updated_at", text(at)),
    ];
    RowWrite::change(
        format!("products{suffix}"),
        vec![("sku", text(sku))],
        RowKind::Upsert(columns.iter().map(|(name, _)| *name).collect()),
        columns,
    )
}

fn price_change(suffix: &str, sku: &str, at: &str, event: &ProductEvent) -> Change {
    let (_, _, price, active) = product_state(event);
    RowWrite::change(
        format!("product_prices{suffix}"),
        vec![("sku", text(sku))],
        RowKind::Upsert(vec!["price_cents", "active", "updated_at"]),
        vec![
            ("price_cents", Bind::Integer(price as i64)),
            ("active", Bind::Integer(i64::from(active))),
            ("updated_at", text(at)),
        ],
    )
}

/// What of a SKU's stock is available, as the catalog shows it.
fn stock_change(suffix: &str, sku: &str, at: &str, event: &InventoryEvent) -> Option<Change> {
    let (on_hand, reserved) = stock_levels(event)?;
    Some(RowWrite::change(
        format!("product_stock{suffix}"),
        vec![("sku", text(sku))],
        RowKind::Upsert(vec!["available", "updated_at"]),
        vec![
            (
                "available",
                Bind::Integer(on_hand.saturating_sub(reserved) as i64),
            ),
            ("updated_at", text(at)),
        ],
    ))
}

/// A cart's lines (its id is its customer's).
fn cart_change(suffix: &str, customer: &str, at: &str, event: &CartEvent) -> Change {
    match event {
        CartEvent::CartLineSet { sku, quantity } => RowWrite::change(
            format!("cart_lines{suffix}"),
            vec![("customer_id", text(customer)), ("sku", text(sku.as_str()))],
            RowKind::Upsert(vec!["quantity", "updated_at"]),
            vec![
                ("quantity", Bind::Integer(quantity.get() as i64)),
                ("updated_at", text(at)),
            ],
        ),
        CartEvent::CartLineRemoved { sku } => Change::new(
            format!("DELETE FROM cart_lines{suffix} WHERE customer_id = $1 AND sku = $2"),
            vec![text(customer), text(sku.as_str())],
        ),
        CartEvent::CartCheckedOut { .. } => Change::new(
            format!("DELETE FROM cart_lines{suffix} WHERE customer_id = $1"),
            vec![text(customer)],
        ),
    }
}

fn customer_change(suffix: &str, id: &str, at: &str, event: &CustomerEvent) -> Change {
    match event {
        CustomerEvent::CustomerRegistered { email, name, .. } => RowWrite::change(
            format!("customers{suffix}"),
            vec![("customer_id", text(id))],
            RowKind::Insert,
            vec![
                ("email", text(email.as_str())),
                ("name", text(name.as_str())),
                ("registered_at", text(at)),
                ("updated_at", text(at)),
            ],
        ),
        CustomerEvent::CustomerRenamed { name } => RowWrite::change(
            format!("customers{suffix}"),
            vec![("customer_id", text(id))],
            RowKind::Update,
            vec![("name", text(name.as_str())), ("updated_at", text(at))],
        ),
    }
}

fn payment_status(event: &PaymentEvent) -> &'static str {
    match event {
        PaymentEvent::PaymentRequested { .. } => "requested",
        PaymentEvent::PaymentAuthorized { .. } => "authorized",
        PaymentEvent::PaymentDeclined { .. } => "declined",
        PaymentEvent::PaymentCaptured { .. } => "captured",
        PaymentEvent::PaymentVoided { .. } => "voided",
    }
}

fn shipment_status(event: &ShipmentEvent) -> &'static str {
    match event {
        ShipmentEvent::ShipmentCreated {} => "created",
        ShipmentEvent::ShipmentDispatched {} => "dispatched",
        ShipmentEvent::ShipmentDelivered {} => "delivered",
        ShipmentEvent::ShipmentCancelled {} => "cancelled",
    }
}

/// The payment or shipment status of an order, kept apart from the order's row.
fn progress_change(suffix: &str, id: &str, at: &str, field: &str, value: &str) -> Change {
    Change::new(
        format!(
            "INSERT INTO order_progress{suffix} (order_id, {field}, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (order_id) DO UPDATE SET {field} = excluded.{field},
                updated_at = CASE WHEN excluded.updated_at > order_progress{suffix}.updated_at
                                  THEN excluded.updated_at ELSE order_progress{suffix}.updated_at END"
        ),
        vec![text(id), text(value), text(at)],
    )
}

fn order_change(suffix: &str, id: &str, at: &str, event: &OrderEvent) -> Result<Change, String> {
    let status = match event {
        OrderEvent::OrderPlaced {
            customer_id,
            lines,
            total_cents,
            ..
        } => {
            let lines = serde_json::to_string(lines).map_err(|e| e.to_string())?;
            return Ok(RowWrite::change(
                format!("orders{suffix}"),
                vec![("order_id", text(id))],
                RowKind::Insert,
                vec![
                    ("customer_id", text(customer_id.as_str())),
                    ("status", text("pending")),
                    ("lines", text(lines)),
                    ("total_cents", Bind::Integer(total_cents.cents() as i64)),
                    ("placed_at", text(at)),
                    ("updated_at", text(at)),
                ],
            ));
        }
        OrderEvent::OrderConfirmed {} => "confirmed",
        OrderEvent::OrderShipped {} => "shipped",
        OrderEvent::OrderDelivered {} => "delivered",
        OrderEvent::OrderCancelled { reason, .. } => {
            return Ok(RowWrite::change(
                format!("orders{suffix}"),
                vec![("order_id", text(id))],
                RowKind::Update,
                vec![
                    ("status", text("cancelled")),
                    ("cancel_reason", text(reason.as_str())),
                    ("updated_at", text(at)),
                ],
            ));
        }
    };
    Ok(RowWrite::change(
        format!("orders{suffix}"),
        vec![("order_id", text(id))],
        RowKind::Update,
        vec![("status", text(status)), ("updated_at", text(at))],
    ))
}

/// A SKU's stock after the event (on hand, reserved); `None` when it did not change.
fn stock_levels(event: &InventoryEvent) -> Option<(u64, u64)> {
    Some(match event {
        InventoryEvent::StockRestocked {
            on_hand, reserved, ..
        }
        | InventoryEvent::StockReserved {
            on_hand, reserved, ..
        }
        | InventoryEvent::StockReleased {
            on_hand, reserved, ..
        }
        | InventoryEvent::StockCommitted {
            on_hand, reserved, ..
        } => (*on_hand, *reserved),
        InventoryEvent::StockReservationRejected { .. } => return None,
    })
}

fn inventory_change(suffix: &str, sku: &str, at: &str, event: &InventoryEvent) -> Option<Change> {
    let (on_hand, reserved) = stock_levels(event)?;
    Some(RowWrite::change(
        format!("inventory_levels{suffix}"),
        vec![("sku", text(sku))],
        RowKind::Upsert(vec!["on_hand", "reserved", "updated_at"]),
        vec![
            ("on_hand", Bind::Integer(on_hand as i64)),
            ("reserved", Bind::Integer(reserved as i64)),
            ("updated_at", text(at)),
        ],
    ))
}

fn payment_change(suffix: &str, id: &str, at: &str, event: &PaymentEvent) -> Change {
    let status = payment_status(event);
    let (column, cents) = match event {
        PaymentEvent::PaymentRequested { amount_cents, .. } => {
            return RowWrite::change(
                format!("payments{suffix}"),
                vec![("order_id", text(id))],
                RowKind::Upsert(vec![]),
                vec![
                    ("status", text(status)),
                    ("amount_cents", Bind::Integer(amount_cents.cents() as i64)),
                    ("updated_at", text(at)),
                ],
            );
        }
        PaymentEvent::PaymentAuthorized { amount_cents } => {
            ("authorized_cents", amount_cents.cents())
        }
        PaymentEvent::PaymentCaptured { amount_cents } => ("captured_cents", amount_cents.cents()),
        PaymentEvent::PaymentVoided { amount_cents } => ("voided_cents", amount_cents.cents()),
        PaymentEvent::PaymentDeclined { reason } => {
            return RowWrite::change(
                format!("payments{suffix}"),
                vec![("order_id", text(id))],
                RowKind::Update,
                vec![
                    ("status", text(status)),
                    ("decline_reason", text(reason.as_str())),
                    ("updated_at", text(at)),
                ],
            );
        }
    };
    RowWrite::change(
        format!("payments{suffix}"),
        vec![("order_id", text(id))],
        RowKind::Update,
        vec![
            ("status", text(status)),
            (column, Bind::Integer(cents as i64)),
            ("updated_at", text(at)),
        ],
    )
}

#[cfg(test)]
mod tests;
