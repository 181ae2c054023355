//! Where each projection stands: its checkpoint (watched, so a query can wait for a
//! consistency token without polling) and the progress of a rebuild.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rebuild {
    pub processed: u64,
    pub total: u64,
}

struct Entry {
    checkpoint: watch::Sender<i64>,
    rebuild: Option<Rebuild>,
}

/// Shared by the projection runners (which write) and the query API (which waits).
#[derive(Clone, Default)]
pub struct Progress {
    entries: Arc<Mutex<BTreeMap<String, Entry>>>,
    /// The consistency tokens this process hands out: stream versions (distributed)
    /// rather than log positions (embedded). A read accepts only the kind issued.
    stream_tokens: Arc<AtomicBool>,
}

impl Progress {
    /// From now on, tokens are stream versions (the distributed deployment).
    pub fn issue_stream_tokens(&self) {
        self.stream_tokens.store(true, Ordering::Relaxed);
    }

    pub fn issues_stream_tokens(&self) -> bool {
        self.stream_tokens.load(Ordering::Relaxed)
    }

    fn with<R>(&self, name: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry(name.to_owned()).or_insert_with(|| Entry {
            checkpoint: watch::channel(0).0,
            rebuild: None,
        });
        f(entry)
    }

    pub fn set_checkpoint(&self, name: &str, position: i64) {
        self.with(name, |e| {
            e.checkpoint.send_if_modified(|p| {
                let moved = *p != position;
                *p = position;
                moved
            })
        });
    }

    pub fn checkpoint(&self, name: &str) -> i64 {
        self.with(name, |e| *e.checkpoint.borrow())
    }

    pub fn set_rebuild(&self, name: &str, rebuild: Option<Rebuild>) {
        self.with(name, |e| e.rebuild = rebuild);
    }

    pub fn rebuild(&self, name: &str) -> Option<Rebuild> {
        self.with(name, |e| e.rebuild)
    }

    /// Changes whenever `name` applies a batch.
    pub fn watch(&self, name: &str) -> watch::Receiver<i64> {
        self.with(name, |e| e.checkpoint.subscribe())
    }

    /// Wait until `name` has passed `position`, at most `limit`. True when it has.
    pub async fn wait_for(&self, name: &str, position: i64, limit: Duration) -> bool {
        let mut rx = self.with(name, |e| e.checkpoint.subscribe());
        let reached = tokio::time::timeout(limit, rx.wait_for(|p| *p >= position)).await;
        matches!(reached, Ok(Ok(_)))
    }
}
