//! Interpreter exit. Before Python finalizes, the agents still running are shut down (so their
//! jobs are reported, not lost) and every blocking wait of this module returns. On Python < 3.14
//! a thread that re-attaches to a finalizing interpreter is ended with `pthread_exit`, and that
//! aborts the process when it unwinds through Rust frames: a daemon thread iterating
//! `agent.events()` would do exactly that.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use kici_agent_core::Agent as CoreAgent;
use pyo3::prelude::*;

/// How much longer than its grace an agent may take to stop at exit (the core abandons
/// unresponsive steps and flushes the log in that time).
pub const STOP_EXTRA: Duration = Duration::from_secs(15);

/// Agents that may still run, with their shutdown grace.
static AGENTS: Mutex<Vec<(Weak<CoreAgent>, Duration)>> = Mutex::new(Vec::new());

/// Threads inside a blocking wait, and whether new waits must return at once.
static WAITS: Mutex<Waits> = Mutex::new(Waits {
    active: 0,
    exiting: false,
});
static WAITS_CHANGED: Condvar = Condvar::new();

struct Waits {
    active: usize,
    exiting: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remembers `agent` so that exit can shut it down.
pub fn track(agent: &Arc<CoreAgent>, grace: Duration) {
    let mut agents = lock(&AGENTS);
    agents.retain(|(agent, _)| agent.strong_count() > 0);
    agents.push((Arc::downgrade(agent), grace));
}

/// A blocking wait in progress; `None` when the interpreter is exiting and waits must not start.
pub struct WaitGuard(());

impl WaitGuard {
    /// Enters a wait, unless the interpreter is exiting.
    pub fn enter() -> Option<WaitGuard> {
        let mut waits = lock(&WAITS);
        if waits.exiting {
            return None;
        }
        waits.active += 1;
        Some(WaitGuard(()))
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        lock(&WAITS).active -= 1;
        WAITS_CHANGED.notify_all();
    }
}

/// Registered with `atexit` by the module: shuts down the running agents (each with its own
/// grace), then ends blocking waits in other threads and returns once they returned.
#[pyfunction]
#[pyo3(name = "_at_exit")]
pub fn at_exit(py: Python<'_>) {
    let agents: Vec<(Arc<CoreAgent>, Duration)> = lock(&AGENTS)
        .iter()
        .filter_map(|(agent, grace)| Some((agent.upgrade()?, *grace)))
        .filter(|(agent, _)| agent.http_addr().is_some() && !agent.state().stopped)
        .collect();
    py.detach(|| {
        for (agent, grace) in &agents {
            agent.shutdown(*grace);
        }
        for (agent, grace) in &agents {
            agent.wait(Some(*grace + STOP_EXTRA));
        }
        let mut waits = lock(&WAITS);
        waits.exiting = true;
        // Each wait returns within one slice; the bound only guards against a wedged thread.
        let _ = WAITS_CHANGED
            .wait_timeout_while(waits, Duration::from_secs(5), |waits| waits.active > 0)
            .unwrap_or_else(|e| e.into_inner());
    });
    drop(agents);
}
