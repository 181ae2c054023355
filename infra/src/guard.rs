//! Per-stream version guards: the last version a consumer applied of each stream, in
//! a table of the consumer's database. An event at or below it was applied already (a
//! redelivery) and is skipped, so effects are exactly-once. One batch costs two
//! statements, whatever its size: read the guards of its streams, then move them.

use crate::db::Dialect;
use foldhash::{HashMap, HashSet};
use schemas::RecordedEvent;
use sqlx::{AnyConnection, Row};
use std::borrow::Borrow;

/// How many streams one statement names at most.
const CHUNK: usize = 300;

/// Which of `events` (in log order) are delivered for the first time, moving the
/// guards in `table` past them, in the caller's transaction. A guard moves past an
/// event that then fails to apply too: a later event of its stream still applies.
/// With `memory` (a table only its holder fills, from empty), the guards it holds are
/// not read.
pub async fn first_deliveries(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    events: &[impl Borrow<RecordedEvent>],
    mut memory: Option<&mut Remembered>,
) -> Result<Vec<bool>, sqlx::Error> {
    let deliveries = deliveries(events);
    let unknown = unknown(memory.as_deref(), &deliveries);
    let mut found = Versions::default();
    for chunk in unknown.chunks(CHUNK) {
        for ((aggregate_type, aggregate_id), version) in stored(conn, dialect, table, chunk).await?
        {
            found.raise(&aggregate_type, &aggregate_id, version);
        }
    }
    let (fresh, moved) = decide(&deliveries, |t, id| held(memory.as_deref(), &found, t, id));
    let moved = guards(&deliveries, &moved);
    for chunk in moved.chunks(CHUNK) {
        advance(conn, dialect, table, chunk).await?;
    }
    if let Some(memory) = memory.as_mut() {
        memory.learn(&moved);
    }
    Ok(fresh)
}

/// The same on an SQLite file's own connection ([`crate::local::LocalWriter`]), for
/// the [`deliveries`] of a batch. Each guard is read and moved by a statement of its
/// own, prepared once: on the calling thread that costs less than taking a batch's
/// keys apart from JSON.
pub fn first_deliveries_local(
    conn: &rusqlite::Connection,
    table: &str,
    deliveries: &[Delivery],
    mut memory: Option<&mut Remembered>,
) -> Result<Vec<bool>, rusqlite::Error> {
    let mut found = Versions::default();
    let unknown = unknown(memory.as_deref(), deliveries);
    if !unknown.is_empty() {
        let mut read = conn.prepare_cached(&format!(
            "SELECT version FROM {table} WHERE aggregate_type = ?1 AND aggregate_id = ?2"
        ))?;
        for (aggregate_type, aggregate_id) in unknown {
            let mut rows = read.query((aggregate_type, aggregate_id))?;
            if let Some(row) = rows.next()? {
                found.raise(aggregate_type, aggregate_id, row.get(0)?);
            }
        }
    }
    let (fresh, moved) = decide(deliveries, |t, id| held(memory.as_deref(), &found, t, id));
    let moved = guards(deliveries, &moved);
    let mut write = conn.prepare_cached(&advance_local_sql(table))?;
    for ((aggregate_type, aggregate_id), version) in &moved {
        write.execute((aggregate_type, aggregate_id, version))?;
    }
    if let Some(memory) = memory.as_mut() {
        memory.learn(&moved);
    }
    Ok(fresh)
}

/// One guard moved forward (never back), its values as `?1`, `?2`, `?3`.
fn advance_local_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, version) VALUES (?1, ?2, ?3)
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version
         WHERE {table}.version < excluded.version"
    )
}

/// A batch's first deliveries decided from [`Remembered`] alone, ahead of the
/// transaction that moves its guards ([`advance_local`]).
#[derive(Debug)]
pub struct Decided {
    /// Whether each delivery, in order, is a first one.
    pub fresh: Vec<bool>,
    /// The guards that move: the delivery that names the stream, and its new version.
    moved: Vec<(usize, i64)>,
}

/// Move the guards `decided` moves, in the caller's transaction on an SQLite file's
/// own connection; `deliveries` are those it was decided on.
pub fn advance_local(
    conn: &rusqlite::Connection,
    table: &str,
    deliveries: &[Delivery],
    decided: &Decided,
) -> Result<(), rusqlite::Error> {
    let mut write = conn.prepare_cached(&advance_local_sql(table))?;
    for (delivery, version) in &decided.moved {
        if let Some((aggregate_type, aggregate_id, _)) = deliveries.get(*delivery) {
            write.execute((aggregate_type, aggregate_id, version))?;
        }
    }
    Ok(())
}

/// Guards by aggregate type, then aggregate id (looked up by `&str`, no key built).
#[derive(Debug, Default)]
struct Versions(HashMap<String, HashMap<String, i64>>);

impl Versions {
    fn get(&self, aggregate_type: &str, aggregate_id: &str) -> Option<i64> {
        self.0.get(aggregate_type)?.get(aggregate_id).copied()
    }

    /// Move the stream's guard up to `version` (never back); whether it was new.
    fn raise(&mut self, aggregate_type: &str, aggregate_id: &str, version: i64) -> bool {
        let ids = match self.0.get_mut(aggregate_type) {
            Some(ids) => ids,
            None => self.0.entry(aggregate_type.to_owned()).or_default(),
        };
        match ids.get_mut(aggregate_id) {
            Some(held) => {
                *held = (*held).max(version);
                false
            }
            None => {
                ids.insert(aggregate_id.to_owned(), version);
                true
            }
        }
    }
}

/// How many streams' guards [`Remembered`] holds at most.
const REMEMBERED: usize = 1_000_000;

/// The guards of a table that one writer fills from empty (a rebuild's shadow
/// tables), kept in memory as they move so that they are not read back: a stream it
/// holds no guard of has none in the table either. Past [`REMEMBERED`] streams it
/// forgets them all, and from then on reads from the table those it does not hold.
/// Moved before the transaction that writes them commits: a holder whose
/// transaction fails must drop it (a rebuild starts again from empty tables).
#[derive(Debug)]
pub struct Remembered {
    versions: Versions,
    held: usize,
    limit: usize,
    forgot: bool,
}

impl Default for Remembered {
    fn default() -> Remembered {
        Remembered::holding_at_most(REMEMBERED)
    }
}

impl Remembered {
    /// Memory that forgets every guard it holds when it would hold more than `limit`.
    pub fn holding_at_most(limit: usize) -> Remembered {
        Remembered {
            versions: Versions::default(),
            held: 0,
            limit,
            forgot: false,
        }
    }

    /// Decide `deliveries` (in log order) from memory alone and learn the guards that
    /// move, while it has not forgotten (a stream it holds no guard of has none in the
    /// table then); `None` once it has, and the table must be read
    /// ([`first_deliveries_local`]). The same answers as [`first_deliveries_local`]
    /// with this memory, without the table: a holder that writes its batches one
    /// after another, in the order it decided them, decides the next while the last
    /// is written. Once it returns `None` it always does, so no batch is decided
    /// ahead of one whose guards are still to be read.
    pub fn decide(&mut self, deliveries: &[Delivery]) -> Option<Decided> {
        if self.forgot {
            return None;
        }
        let versions = &self.versions;
        let (fresh, moved) = decide(deliveries, |t, id| versions.get(t, id).unwrap_or(0));
        self.learn(&guards(deliveries, &moved));
        Some(Decided { fresh, moved })
    }

    fn learn(&mut self, moved: &[Guard<'_>]) {
        if self.held + moved.len() > self.limit {
            self.versions = Versions::default();
            self.held = 0;
            self.forgot = true;
        }
        for ((aggregate_type, aggregate_id), version) in moved {
            if self.versions.raise(aggregate_type, aggregate_id, *version) {
                self.held += 1;
            }
        }
    }
}

/// The streams of `deliveries` whose guards must be read from the table: all of them
/// without memory; with it, none until it has forgotten, then those it does not hold.
fn unknown<'a>(memory: Option<&Remembered>, deliveries: &'a [Delivery]) -> Vec<(&'a str, &'a str)> {
    match memory {
        None => streams_of(deliveries),
        Some(memory) if !memory.forgot => vec![],
        Some(memory) => streams_of(deliveries)
            .into_iter()
            .filter(|(t, id)| memory.versions.get(t, id).is_none())
            .collect(),
    }
}

/// An event as its guard sees it: its stream (aggregate type and id) and version.
pub type Delivery = (String, String, i64);

/// The deliveries of `events`, in log order.
pub fn deliveries(events: &[impl Borrow<RecordedEvent>]) -> Vec<Delivery> {
    events
        .iter()
        .map(|event| {
            let envelope = &event.borrow().envelope;
            (
                envelope.aggregate_type.clone(),
                envelope.aggregate_id.clone(),
                envelope.version,
            )
        })
        .collect()
}

/// A stream's guard: (aggregate type, aggregate id) and the last version applied.
type Guard<'a> = ((&'a str, &'a str), i64);

/// The distinct streams of `deliveries`, each where it first comes (found by hash:
/// sorting a batch's keys to find them cost a rebuild more than deciding it).
fn streams_of(deliveries: &[Delivery]) -> Vec<(&str, &str)> {
    let mut seen: HashSet<(&str, &str)> =
        HashSet::with_capacity_and_hasher(deliveries.len(), Default::default());
    deliveries
        .iter()
        .map(|(aggregate_type, aggregate_id, _)| (aggregate_type.as_str(), aggregate_id.as_str()))
        .filter(|key| seen.insert(*key))
        .collect()
}

/// A stream's guard as known before a batch: held in `memory`, else `found` in the
/// table, else none (0).
fn held(
    memory: Option<&Remembered>,
    found: &Versions,
    aggregate_type: &str,
    aggregate_id: &str,
) -> i64 {
    memory
        .and_then(|m| m.versions.get(aggregate_type, aggregate_id))
        .or_else(|| found.get(aggregate_type, aggregate_id))
        .unwrap_or(0)
}

/// Which deliveries (in log order) are first ones, each stream's guard before the
/// batch being what `held` says, and the guards that move: the first delivery that
/// names the stream, with its new version (in log order).
fn decide(
    deliveries: &[Delivery],
    held: impl Fn(&str, &str) -> i64,
) -> (Vec<bool>, Vec<(usize, i64)>) {
    // Each stream: its first delivery, its guard before, and the guard as it moves.
    let mut streams: HashMap<(&str, &str), (usize, i64, i64)> =
        HashMap::with_capacity_and_hasher(deliveries.len(), Default::default());
    let fresh = deliveries
        .iter()
        .enumerate()
        .map(|(i, (aggregate_type, aggregate_id, version))| {
            let key = (aggregate_type.as_str(), aggregate_id.as_str());
            let (_, _, applied) = streams.entry(key).or_insert_with(|| {
                let before = held(key.0, key.1);
                (i, before, before)
            });
            let first = *applied < *version;
            if first {
                *applied = *version;
            }
            first
        })
        .collect();
    let mut moved: Vec<(usize, i64)> = streams
        .into_values()
        .filter(|(_, before, applied)| applied != before)
        .map(|(first, _, applied)| (first, applied))
        .collect();
    moved.sort_unstable();
    (fresh, moved)
}

/// The guards `moved` (from [`decide`]) names, as streams of `deliveries`.
fn guards<'a>(deliveries: &'a [Delivery], moved: &[(usize, i64)]) -> Vec<Guard<'a>> {
    moved
        .iter()
        .filter_map(|(i, version)| {
            let (aggregate_type, aggregate_id, _) = deliveries.get(*i)?;
            Some(((aggregate_type.as_str(), aggregate_id.as_str()), *version))
        })
        .collect()
}

/// The stored guards of `keys` (those that have one).
async fn stored(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    keys: &[(&str, &str)],
) -> Result<Vec<((String, String), i64)>, sqlx::Error> {
    let mut types: Vec<&str> = keys.iter().map(|(t, _)| *t).collect();
    types.sort_unstable();
    types.dedup();
    let ids: Vec<&str> = keys.iter().map(|(_, id)| *id).collect();
    let list = |values: &[&str]| serde_json::to_string(values).unwrap_or_else(|_| "[]".into());
    let rows = sqlx::query(&format!(
        "SELECT aggregate_type, aggregate_id, version FROM {table}
          WHERE {} AND {}",
        dialect.in_text_list("aggregate_type", "$1"),
        dialect.in_text_list("aggregate_id", "$2"),
    ))
    // Planned anew each time on PostgreSQL (once per batch): a plan prepared while
    // the table was small could scan it whole for good (see `stream_heads`).
    .persistent(dialect == Dialect::Sqlite)
    .bind(list(&types))
    .bind(list(&ids))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                (row.try_get("aggregate_type")?, row.try_get("aggregate_id")?),
                row.try_get("version")?,
            ))
        })
        .collect()
}

/// Move the guard of `event`'s stream up to its version (never back), in the
/// caller's transaction: a retried dead letter counts as applied.
pub async fn advance_to(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    event: &RecordedEvent,
) -> Result<(), sqlx::Error> {
    let envelope = &event.envelope;
    let stream = (
        envelope.aggregate_type.as_str(),
        envelope.aggregate_id.as_str(),
    );
    advance(conn, dialect, table, &[(stream, envelope.version)]).await
}

/// Move the guards of distinct streams forward (never back), in one statement.
async fn advance(
    conn: &mut AnyConnection,
    dialect: Dialect,
    table: &str,
    moved: &[Guard<'_>],
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, version)
         SELECT k.value ->> 0, k.value ->> 1, CAST(k.value ->> 2 AS BIGINT)
           FROM {} WHERE true ORDER BY k.key
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version
         WHERE {table}.version < excluded.version",
        dialect.json_rows("$1")
    );
    let rows: Vec<serde_json::Value> = moved
        .iter()
        .map(|((aggregate_type, aggregate_id), version)| {
            serde_json::json!([aggregate_type, aggregate_id, version])
        })
        .collect();
    sqlx::query(&sql)
        .bind(serde_json::Value::Array(rows).to_string())
        .execute(conn)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(conn: &rusqlite::Connection, name: &str) {
        let sql = format!(
            "CREATE TABLE {name} (aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL,
               version BIGINT NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id))"
        );
        conn.execute_batch(&sql).expect("create table");
    }

    fn guards(conn: &rusqlite::Connection, name: &str) -> Vec<(String, String, i64)> {
        let sql = format!("SELECT * FROM {name} ORDER BY aggregate_type, aggregate_id");
        let mut statement = conn.prepare(&sql).expect("prepare");
        let rows = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .expect("query");
        rows.collect::<Result<_, _>>().expect("rows")
    }

    /// Batches of redeliveries and new events over a few streams, decided with memory
    /// (small enough to forget several times), by reading the table, and ahead of the
    /// write from memory alone until it forgets ([`Remembered::decide`]): the same
    /// first deliveries, and the same guards stored.
    #[test]
    fn remembered_guards_decide_as_the_stored_ones() {
        let conn = rusqlite::Connection::open_in_memory().expect("open");
        table(&conn, "read_back");
        table(&conn, "remembered");
        table(&conn, "ahead");
        table(&conn, "all_ahead");
        let mut memory = Remembered::holding_at_most(5);
        // Forgets after a few batches; never forgets.
        let mut ahead = (Remembered::holding_at_most(17), 0, 0);
        let mut all_ahead = (Remembered::holding_at_most(1_000), 0, 0);
        // Decided ahead while it can, then by reading: (memory, decided, read).
        let decide_ahead =
            |table: &str, batch: &[Delivery], ahead: &mut (Remembered, i32, i32)| match ahead
                .0
                .decide(batch)
            {
                Some(decided) => {
                    assert_eq!(ahead.2, 0, "decided ahead after forgetting");
                    advance_local(&conn, table, batch, &decided).expect("advance");
                    ahead.1 += 1;
                    decided.fresh
                }
                None => {
                    ahead.2 += 1;
                    first_deliveries_local(&conn, table, batch, Some(&mut ahead.0))
                        .expect("after forgetting")
                }
            };
        let mut next = {
            let mut state: u64 = 0x2545_f491_4f6c_dd1d;
            move |bound: u64| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 33) % bound
            }
        };
        let mut latest: HashMap<(String, String), i64> = HashMap::default();
        // The newest version of each stream delivered so far: a delivery is a first
        // one exactly when it is past it.
        let mut applied: HashMap<(String, String), i64> = HashMap::default();
        let mut fresh_events = 0;
        for _ in 0..300 {
            let batch: Vec<Delivery> = (0..next(12))
                .map(|_| {
                    let key = (
                        ["order", "payment"][next(2) as usize].to_owned(),
                        format!("s-{}", next(9)),
                    );
                    let newest = latest.get(&key).copied().unwrap_or(0);
                    // A redelivery (an old version) or the stream's next event.
                    let version = match next(3) {
                        0 if newest > 0 => 1 + next(newest as u64) as i64,
                        _ => newest + 1,
                    };
                    latest.insert(key.clone(), newest.max(version));
                    (key.0, key.1, version)
                })
                .collect();
            let expected: Vec<bool> = batch
                .iter()
                .map(|(aggregate_type, aggregate_id, version)| {
                    let newest = applied
                        .entry((aggregate_type.clone(), aggregate_id.clone()))
                        .or_default();
                    let first = *version > *newest;
                    *newest = (*newest).max(*version);
                    first
                })
                .collect();
            let read = first_deliveries_local(&conn, "read_back", &batch, None).expect("read");
            assert_eq!(read, expected, "first deliveries of {batch:?}, read back");
            let held = first_deliveries_local(&conn, "remembered", &batch, Some(&mut memory))
                .expect("remembered");
            assert_eq!(read, held, "first deliveries of {batch:?}");
            let decided = decide_ahead("ahead", &batch, &mut ahead);
            let all_decided = decide_ahead("all_ahead", &batch, &mut all_ahead);
            assert_eq!(read, decided, "first deliveries decided ahead of {batch:?}");
            assert_eq!(
                read, all_decided,
                "first deliveries decided ahead of {batch:?}"
            );
            fresh_events += read.iter().filter(|f| **f).count();
        }
        assert!(memory.forgot, "the memory never reached its limit");
        assert!(
            ahead.1 > 0 && ahead.2 > 100,
            "ahead: {:?}",
            (ahead.1, ahead.2)
        );
        assert_eq!((all_ahead.1, all_ahead.2), (300, 0));
        assert_eq!(guards(&conn, "read_back"), guards(&conn, "ahead"));
        assert_eq!(guards(&conn, "read_back"), guards(&conn, "all_ahead"));
        assert!(
            fresh_events > 300,
            "too few first deliveries: {fresh_events}"
        );
        let mut newest: Vec<(String, String, i64)> = applied
            .into_iter()
            .map(|((aggregate_type, aggregate_id), version)| {
                (aggregate_type, aggregate_id, version)
            })
            .collect();
        newest.sort();
        assert_eq!(guards(&conn, "read_back"), newest);
        assert_eq!(guards(&conn, "read_back"), guards(&conn, "remembered"));
    }
}
