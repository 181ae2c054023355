//! A tokio runtime of its own for one part of a process, optionally at a lower
//! priority than the thread that starts it: the pipeline's (see [`crate::System`]), and
//! the benchmarks' servers under test, kept apart from their load generators.

use std::future::Future;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// A multi-threaded runtime with one worker per core, shut down without waiting when
/// dropped (from any context, async or not): whoever owns it stops its tasks first.
pub struct Apart {
    /// Taken only when dropped.
    runtime: Option<tokio::runtime::Runtime>,
    handle: Handle,
}

impl Apart {
    /// Start one whose threads are named `name` and, where the system keeps a nice
    /// value per thread (Linux), run `nicer` levels below the thread that starts it.
    pub fn start(name: &str, nicer: i32) -> std::io::Result<Apart> {
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        // The level is set, not added to: a thread inherits the nice value of the
        // thread that started it, and the runtime's threads start one another.
        let level = match nicer {
            0 => None,
            nicer => own_priority().map(|now| (now + nicer).clamp(-20, 19)),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .on_thread_start(move || {
                if let Some(level) = level {
                    set_own_priority(level);
                }
            })
            .enable_all()
            .build()?;
        Ok(Apart {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Where to spawn onto it.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Run `task` there.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }
}

impl Drop for Apart {
    fn drop(&mut self) {
        // Its tasks have stopped (or their owner was dropped without stopping them):
        // what is left (blocking work in flight) is not waited for.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The calling thread's nice value, where the system keeps one per thread (Linux;
/// elsewhere setting it could lower the whole process, so nothing changes there).
fn own_priority() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Set the calling thread's nice value (Linux).
fn set_own_priority(level: i32) {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), level)
    {
        tracing::debug!(error = %error, "the runtime's thread keeps its priority");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = level;
}
