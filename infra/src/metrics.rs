//! Counters, histograms and gauges, rendered as Prometheus text at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, PoisonError};

/// A gauge family read at render time: its samples as (labels, value).
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Vec<(String, i64)>,
}

#[derive(Clone, Default)]
pub struct Metrics {
    counters: Arc<Mutex<BTreeMap<(String, String), u64>>>,
    histograms: Arc<Mutex<BTreeMap<(String, String), Histogram>>>,
}

/// Observations counted into buckets (cumulative when rendered), with their sum.
#[derive(Debug, Clone)]
struct Histogram {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A histogram family: name, help, and the upper bounds of its buckets.
pub struct HistogramFamily {
    pub name: &'static str,
    pub help: &'static str,
    pub bounds: &'static [f64],
}

const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

pub const REQUEST_SECONDS: HistogramFamily = HistogramFamily {
    name: "orderline_http_request_duration_seconds",
    help: "HTTP requests, by route and status.",
    bounds: SECONDS,
};
pub const COMMIT_SECONDS: HistogramFamily = HistogramFamily {
    name: "orderline_append_commit_duration_seconds",
    help: "Group commits of the event store, from the first statement to the commit.",
    bounds: SECONDS,
};
pub const EVENTS_PER_COMMIT: HistogramFamily = HistogramFamily {
    name: "orderline_events_per_commit",
    help: "Events written by one group commit of the event store.",
    bounds: &[
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
    ],
};
pub const PLACED_TO_CONFIRMED_SECONDS: HistogramFamily = HistogramFamily {
    name: "orderline_order_placed_to_confirmed_seconds",
    help: "From an order's placement to its confirmation.",
    bounds: SECONDS,
};

pub const REBUILD_PAUSE_SECONDS: HistogramFamily = HistogramFamily {
    name: "orderline_rebuild_pause_seconds",
    help: "How long a rebuild kept its live projection paused (the last events and the swap), by projection.",
    bounds: SECONDS,
};

const HISTOGRAMS: [&HistogramFamily; 5] = [
    &REQUEST_SECONDS,
    &COMMIT_SECONDS,
    &EVENTS_PER_COMMIT,
    &PLACED_TO_CONFIRMED_SECONDS,
    &REBUILD_PAUSE_SECONDS,
];

fn label_text(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(",")
}

/// One metric family: its name, help text and type.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
}

pub const COMMANDS_ACCEPTED: Family = Family {
    name: "orderline_commands_accepted_total",
    help: "Commands accepted, by command.",
};
pub const COMMANDS_REJECTED: Family = Family {
    name: "orderline_commands_rejected_total",
    help: "Commands rejected, by command and HTTP status.",
};
pub const EVENTS_APPENDED: Family = Family {
    name: "orderline_events_appended_total",
    help: "Events appended to the log, by aggregate type.",
};
pub const SAGA_OUTCOMES: Family = Family {
    name: "orderline_saga_outcomes_total",
    help: "Fulfilment sagas reaching an outcome.",
};
pub const DEAD_LETTERS: Family = Family {
    name: "orderline_dead_letters_total",
    help: "Events a consumer could not apply.",
};

pub const CONSUMER_ERRORS: Family = Family {
    name: "orderline_consumer_errors_total",
    help: "Batches a consumer had to retry, by consumer and kind of error.",
};

pub const REBUILD_EVENTS: Family = Family {
    name: "orderline_rebuild_events_total",
    help: "Events applied by rebuilds, by projection and phase: `live` while the live projection ran, `paused` while it waited for the swap.",
};

pub const PRUNED: Family = Family {
    name: "orderline_pruned_total",
    help: "Rows removed by retention, by kind (idempotency, saga, snapshot).",
};

const COUNTERS: [&Family; 8] = [
    &COMMANDS_ACCEPTED,
    &COMMANDS_REJECTED,
    &EVENTS_APPENDED,
    &SAGA_OUTCOMES,
    &DEAD_LETTERS,
    &CONSUMER_ERRORS,
    &REBUILD_EVENTS,
    &PRUNED,
];

impl Metrics {
    /// Add `by` to the counter `family{labels}`; labels as `key="value",...`.
    pub fn add(&self, family: &Family, labels: &[(&str, &str)], by: u64) {
        let labels = label_text(labels);
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        *counters
            .entry((family.name.to_owned(), labels))
            .or_insert(0) += by;
    }

    pub fn inc(&self, family: &Family, labels: &[(&str, &str)]) {
        self.add(family, labels, 1);
    }

    /// Count `value` into the histogram `family{labels}`.
    pub fn observe(&self, family: &HistogramFamily, labels: &[(&str, &str)], value: f64) {
        let labels = label_text(labels);
        let mut histograms = self
            .histograms
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let histogram = histograms
            .entry((family.name.to_owned(), labels))
            .or_insert_with(|| Histogram {
                buckets: vec![0; family.bounds.len()],
                sum: 0.0,
                count: 0,
            });
        if let Some(i) = family.bounds.iter().position(|bound| value <= *bound) {
            histogram.buckets[i] += 1;
        }
        histogram.sum += value;
        histogram.count += 1;
    }

    fn render_histograms(&self, out: &mut String) {
        let histograms = self
            .histograms
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for family in HISTOGRAMS {
            let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
            let _ = writeln!(out, "# TYPE {} histogram", family.name);
            for ((name, labels), histogram) in histograms.iter() {
                if name != family.name {
                    continue;
                }
                let sep = if labels.is_empty() { "" } else { "," };
                let mut cumulative = 0;
                for (bound, n) in family.bounds.iter().zip(&histogram.buckets) {
                    cumulative += n;
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
                    );
                }
                let count = histogram.count;
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", histogram.sum);
                let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
            }
        }
    }

    /// The counters, the histograms, then the gauges given.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::new();
        self.render_histograms(&mut out);
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        for family in COUNTERS {
            let _ = writeln!(out, "# HELP {} {}", family.name, family.help);
            let _ = writeln!(out, "# TYPE {} counter", family.name);
            for ((name, labels), value) in counters.iter() {
                if name == family.name {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            }
        }
        for Gauge {
            name,
            help,
            samples,
        } in gauges
        {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets_with_sum_and_count() {
        let metrics = Metrics::default();
        for value in [0.0004, 0.003, 0.003, 100.0] {
            metrics.observe(
                &REQUEST_SECONDS,
                &[("route", "/v1/orders"), ("status", "202")],
                value,
            );
        }
        let text = metrics.render(&[]);
        let line = |le: &str| {
            format!("orderline_http_request_duration_seconds_bucket{{route=\"/v1/orders\",status=\"202\",le=\"{le}\"}}")
        };
        assert!(text.contains(&format!("{} 1\n", line("0.0005"))), "{text}");
        assert!(text.contains(&format!("{} 3\n", line("0.005"))), "{text}");
        assert!(text.contains(&format!("{} 3\n", line("60"))), "{text}");
        assert!(text.contains(&format!("{} 4\n", line("+Inf"))), "{text}");
        assert!(text.contains(
            "orderline_http_request_duration_seconds_count{route=\"/v1/orders\",status=\"202\"} 4"
        ));
        assert!(text.contains("# TYPE orderline_events_per_commit histogram"));
    }
}
