//! What every benchmark shares: its rows, printed and merged into
//! `target/bench/summary.json`; percentiles; an embedded server; progress; the
//! outside services some scenarios need. (Each benchmark uses a part of it.)
#![allow(dead_code)]

pub mod log;
pub mod plot;
pub mod progress;
pub mod server;
pub mod services;

use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// One figure: ours, the baseline measured in the same run, and their unit.
pub struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub ours: f64,
    pub baseline: Option<f64>,
    pub unit: &'static str,
}

/// Print the rows of `scenario` and merge them into `target/bench/summary.json`
/// (rows of other scenarios already there stay).
pub fn report(scenario: &str, rows: &[Row]) -> anyhow::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("summary.json");
    let mut all: Vec<Value> = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    // A run of some variants only replaces their rows; a whole run, every row of its
    // scenario (so rows a newer version no longer measures do not linger).
    let partial = !filters().is_empty();
    all.retain(|old| {
        old["scenario"] != scenario
            || (partial && !rows.iter().any(|row| old["metric"] == row.metric.as_str()))
    });
    for row in rows {
        let ratio = row
            .baseline
            .map(|b| if b > 0.0 { row.ours / b } else { 0.0 });
        println!(
            "{:<12} {:<48} ours {:>10.1} {:<8} baseline {:>10} ratio {}",
            row.scenario,
            row.metric,
            row.ours,
            row.unit,
            row.baseline.map_or("-".into(), |b| format!("{b:.1}")),
            ratio.map_or("-".into(), |r| format!("{r:.2}")),
        );
        all.push(json!({
            "scenario": row.scenario,
            "metric": row.metric,
            "ours": row.ours,
            "baseline": row.baseline,
            "ratio": ratio,
            "unit": row.unit,
        }));
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&all)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The `q` quantile of sorted durations (zero when there are none).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// A lock that a panicked holder does not poison.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the run was asked for with `--quick` (short sizes).
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
}

/// The variants asked for: the arguments that are not flags
/// (`cargo bench --bench rebuild -- --quick sqlite`); none means all of them.
pub fn filters() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect()
}

/// Whether to run the variant `name`: every variant when none was asked for, else
/// those named exactly.
pub fn selected(name: &str) -> bool {
    let filters = filters();
    filters.is_empty() || filters.iter().any(|f| f == name)
}

/// The runtime a benchmark drives its async work on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A runtime of its own for a server under test, apart from the load generator's (as
/// a server in another process would be): the clients' tasks never wait in the
/// server's queues, nor its tasks in theirs. At the priority of the load generator.
pub fn apart() -> anyhow::Result<orderline::runtime::Apart> {
    Ok(orderline::runtime::Apart::start("bench-server", 0)?)
}
