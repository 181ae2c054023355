//! Progress of long steps on standard error (indicatif), so a full run shows it is
//! moving.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// A bar for `total` items of `what`.
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "  {msg:<28} [{bar:30}] {pos:>9}/{len:9} {per_sec:>12} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// A bar that counts the seconds of a timed phase.
pub fn timed(seconds: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(seconds);
    bar.set_style(
        ProgressStyle::with_template("  {msg:<28} [{bar:30}] {pos:>3}/{len} s")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    let ticking = bar.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while !ticking.is_finished() && ticking.position() < ticking.length().unwrap_or(0) {
            tick.tick().await;
            ticking.inc(1);
        }
    });
    bar
}
