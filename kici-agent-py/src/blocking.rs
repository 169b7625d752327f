//! Blocking with the GIL released, while still answering Ctrl-C.

use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::exit::WaitGuard;

/// How long the GIL stays released between two checks for Ctrl-C.
const SLICE: Duration = Duration::from_millis(50);

/// Calls `attempt` with the GIL released, in slices of at most [`SLICE`], until it returns a
/// value or `timeout` (`None` = no limit) has passed. Between slices it runs Python's signal
/// handlers, so Ctrl-C raises `KeyboardInterrupt` here (on the main thread). Once the
/// interpreter is exiting it returns `None` at once (see [`crate::exit`]).
pub fn wait_interruptibly<T, F>(
    py: Python<'_>,
    timeout: Option<Duration>,
    mut attempt: F,
) -> PyResult<Option<T>>
where
    T: Send,
    F: FnMut(Duration) -> Option<T> + Send,
{
    // A timeout too far away to represent (`float('inf')`-like hosts) is no limit.
    let deadline = timeout.and_then(|timeout| Instant::now().checked_add(timeout));
    loop {
        let slice = match deadline {
            Some(deadline) => deadline
                .saturating_duration_since(Instant::now())
                .min(SLICE),
            None => SLICE,
        };
        let Some(guard) = WaitGuard::enter() else {
            return Ok(None);
        };
        let attempted = py.detach(|| attempt(slice));
        drop(guard);
        if let Some(value) = attempted {
            return Ok(Some(value));
        }
        py.check_signals()?;
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_too_large_for_a_deadline_waits_without_one() {
        Python::initialize();
        Python::attach(|py| {
            let mut attempts = 0;
            let waited = wait_interruptibly(py, Some(Duration::MAX), |slice| {
                assert!(slice <= SLICE);
                attempts += 1;
                (attempts == 3).then_some(attempts)
            });
            assert_eq!(waited.unwrap(), Some(3));
        });
    }
}
