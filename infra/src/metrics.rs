//! Counters and gauges, rendered as Prometheus text at `/metrics`.

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

const COUNTERS: [&Family; 6] = [
    &COMMANDS_ACCEPTED,
    &COMMANDS_REJECTED,
    &EVENTS_APPENDED,
    &SAGA_OUTCOMES,
    &DEAD_LETTERS,
    &CONSUMER_ERRORS,
];

impl Metrics {
    /// Add `by` to the counter `family{labels}`; labels as `key="value",...`.
    pub fn add(&self, family: &Family, labels: &[(&str, &str)], by: u64) {
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect::<Vec<_>>()
            .join(",");
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        *counters
            .entry((family.name.to_owned(), labels))
            .or_insert(0) += by;
    }

    pub fn inc(&self, family: &Family, labels: &[(&str, &str)]) {
        self.add(family, labels, 1);
    }

    /// The counters, then the gauges given.
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
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
