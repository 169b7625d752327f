//! The idle self-shutdown of a scaler-managed agent (`KICI_SCALER_MANAGED=1`, spec agent.md
//! §6.5): an ephemeral agent that the auto-scaler started ends itself once it has had nothing to
//! do for a while, so the scaler's capacity goes back.
//!
//! The agent decides *when* it is idle (no job, registered, not draining) and arms this timer;
//! the timer only remembers the one window that is armed and says when it ran out. Every arm or
//! cancel starts a new generation, so an expiry that raced a dispatch is recognised as stale.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a scaler-managed agent shut itself down; the strings are the reference agent's reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SelfShutdownReason {
    /// Idle for `KICI_SCALER_IDLE_TIMEOUT` after its last job or registration.
    Idle,
    /// Registered with a job announced (`pendingDispatch`) that did not arrive within
    /// `KICI_SCALER_PENDING_DISPATCH_TIMEOUT`.
    PendingDispatchTimeout,
}

impl SelfShutdownReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SelfShutdownReason::Idle => "scaler-idle",
            SelfShutdownReason::PendingDispatchTimeout => "scaler-pending-dispatch-timeout",
        }
    }
}

/// What a call to [`IdleTimer::arm`] asks of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Armed {
    /// A window is running; [`IdleTimer::expired`] reports its end.
    Window,
    /// The window is zero: shut down now.
    Now(SelfShutdownReason),
}

/// One armed window.
#[derive(Debug, Clone, Copy)]
struct Window {
    deadline: Instant,
    reason: SelfShutdownReason,
    generation: u64,
}

#[derive(Debug, Default)]
struct TimerState {
    armed: Option<Window>,
    generation: u64,
}

/// The scaler idle timer: at most one armed window.
#[derive(Debug)]
pub(crate) struct IdleTimer {
    idle: Duration,
    pending_dispatch: Duration,
    state: Mutex<TimerState>,
    changed: Notify,
}

impl IdleTimer {
    /// `idle`: the normal window; `pending_dispatch`: the window while an announced job is on
    /// its way (zero = no special wait: the normal window applies).
    pub(crate) fn new(idle: Duration, pending_dispatch: Duration) -> IdleTimer {
        IdleTimer {
            idle,
            pending_dispatch,
            state: Mutex::new(TimerState::default()),
            changed: Notify::new(),
        }
    }

    /// Arms the window for an agent that just became idle, replacing any armed one.
    /// `pending_dispatch`: the registration that made it idle announced a job.
    pub(crate) fn arm(&self, pending_dispatch: bool) -> Armed {
        let (window, reason) = if pending_dispatch && !self.pending_dispatch.is_zero() {
            (
                self.pending_dispatch,
                SelfShutdownReason::PendingDispatchTimeout,
            )
        } else {
            (self.idle, SelfShutdownReason::Idle)
        };
        let mut state = self.lock();
        state.generation += 1;
        if window.is_zero() {
            state.armed = None;
            return Armed::Now(reason);
        }
        state.armed = Some(Window {
            // A window too long to represent never ends (the setting is capped at 7 days).
            deadline: Instant::now()
                .checked_add(window)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600)),
            reason,
            generation: state.generation,
        });
        drop(state);
        self.changed.notify_one();
        Armed::Window
    }

    /// Cancels the armed window (a dispatch arrived).
    pub(crate) fn cancel(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.armed = None;
        drop(state);
        self.changed.notify_one();
    }

    /// Waits until the armed window runs out; returns its reason and generation, which
    /// [`IdleTimer::take_if_current`] checks. Cancel-safe.
    pub(crate) async fn expired(&self) -> (SelfShutdownReason, u64) {
        loop {
            let changed = self.changed.notified();
            let armed = self.lock().armed;
            match armed {
                Some(window) if window.deadline <= Instant::now() => {
                    return (window.reason, window.generation)
                }
                Some(window) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(window.deadline) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Disarms the window of `generation` if it is still the armed one; false when it was
    /// cancelled or replaced after it ran out.
    pub(crate) fn take_if_current(&self, generation: u64) -> bool {
        let mut state = self.lock();
        let current = state.armed.is_some_and(|w| w.generation == generation);
        if current {
            state.armed = None;
        }
        current
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_armed_window_expires_with_its_reason() {
        let timer = IdleTimer::new(Duration::from_secs(5), Duration::from_secs(60));
        assert_eq!(timer.arm(false), Armed::Window);
        let started = Instant::now();
        let (reason, generation) = timer.expired().await;
        assert_eq!(reason, SelfShutdownReason::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(timer.take_if_current(generation));
        assert!(!timer.take_if_current(generation), "taken once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_dispatch_arms_the_longer_window() {
        let timer = IdleTimer::new(Duration::from_secs(5), Duration::from_secs(60));
        timer.arm(true);
        let started = Instant::now();
        let (reason, _) = timer.expired().await;
        assert_eq!(reason, SelfShutdownReason::PendingDispatchTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[test]
    fn zero_windows_mean_now_and_a_zero_pending_window_falls_back_to_idle() {
        let timer = IdleTimer::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(timer.arm(false), Armed::Now(SelfShutdownReason::Idle));
        assert_eq!(timer.arm(true), Armed::Now(SelfShutdownReason::Idle));
        let timer = IdleTimer::new(Duration::from_secs(5), Duration::ZERO);
        assert_eq!(timer.arm(true), Armed::Window);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_or_rearm_makes_an_expiry_stale() {
        let timer = IdleTimer::new(Duration::from_secs(5), Duration::from_secs(60));
        timer.arm(false);
        let (_, first) = timer.expired().await;
        timer.cancel();
        assert!(!timer.take_if_current(first), "cancelled after it ran out");

        timer.arm(false);
        tokio::time::advance(Duration::from_secs(3)).await;
        timer.arm(false);
        let started = Instant::now();
        let (_, second) = timer.expired().await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(5),
            "a whole window from the re-arm"
        );
        assert!(timer.take_if_current(second));
    }
}
