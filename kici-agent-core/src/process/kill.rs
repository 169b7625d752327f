//! The kill ladder: signalling the step's process group, waiting for its leader under the
//! timeout and cancellation, SIGTERM then SIGKILL after the grace, and the guard that kills
//! the group when [`run`](super::run) is abandoned.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{ExitStatus, Outcome, ProcessError, RunLimits};

/// How a running step is stopped: SIGTERM to its group, wait `grace`, SIGKILL to the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillPolicy {
    /// Time the group gets to exit after SIGTERM before it is SIGKILLed.
    pub grace: Duration,
}

impl Default for KillPolicy {
    /// The 10 s grace recommended for step timeouts (spec §11.2).
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
        }
    }
}

/// Sends `signal` to every process of group `pgid`.
///
/// Refuses `pgid` 0 and 1, which `kill(2)` would turn into "the agent's own group" and
/// "every process we may signal".
pub fn signal_group(pgid: i32, signal: Signal) -> io::Result<()> {
    if pgid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal process group {pgid}"),
        ));
    }
    killpg(Pid::from_raw(pgid), signal).map_err(io::Error::from)
}

/// [`signal_group`] for the kill ladder: a group that is already gone is fine, anything else
/// is logged (there is nothing better to do while stopping a step).
pub(super) fn send_to_group(pgid: i32, signal: Signal) {
    match signal_group(pgid, signal) {
        Ok(()) => debug!(pgid, %signal, "signalled step process group"),
        Err(error) if error.raw_os_error() == Some(Errno::ESRCH as i32) => {}
        Err(error) => warn!(pgid, %signal, %error, "failed to signal step process group"),
    }
}

/// SIGKILLs the step's group when [`run`](super::run) is abandoned before it finished its own
/// cleanup, and tells the containment the child is no longer `run`'s to reap.
pub(super) struct GroupKillGuard {
    pub(super) pid: u32,
    pub(super) pgid: i32,
    pub(super) armed: bool,
}

impl Drop for GroupKillGuard {
    fn drop(&mut self) {
        if self.armed {
            send_to_group(self.pgid, Signal::SIGKILL);
        }
        crate::containment::reaped(self.pid);
    }
}

/// Why a running step is being stopped.
enum StopReason {
    TimedOut(Duration),
    Cancelled,
    Forced,
}

/// Waits for the leader to exit, running the kill ladder on timeout or cancellation.
pub(super) async fn supervise(
    child: &mut Child,
    pid: u32,
    pgid: i32,
    limits: &RunLimits,
    output_finished: &CancellationToken,
) -> Result<Outcome, ProcessError> {
    let deadline = limits
        .timeout
        .map(|timeout| (timeout, Instant::now() + timeout));
    let reason = tokio::select! {
        biased;
        status = child.wait() => return Ok(Outcome::Exited(exit_status(status, pid)?)),
        () = limits.force.cancelled() => StopReason::Forced,
        () = limits.cancel.cancelled() => StopReason::Cancelled,
        after = expiry(deadline) => StopReason::TimedOut(after),
    };
    let (status, forced) = match reason {
        StopReason::Forced => (kill_and_reap(child, pid, pgid).await?, true),
        StopReason::TimedOut(_) | StopReason::Cancelled => {
            terminate_gracefully(child, pid, pgid, limits, output_finished).await?
        }
    };
    Ok(match reason {
        StopReason::TimedOut(after) => Outcome::TimedOut { after, status },
        StopReason::Cancelled | StopReason::Forced => Outcome::Cancelled { forced, status },
    })
}

/// Completes at the deadline with the timeout it stands for; never without one.
async fn expiry(deadline: Option<(Duration, Instant)>) -> Duration {
    match deadline {
        Some((timeout, at)) => {
            sleep_until(at).await;
            timeout
        }
        None => std::future::pending().await,
    }
}

/// SIGTERM to the group, then SIGKILL once the grace is over or the force token fires.
/// Returns the leader's status and whether the force token cut the grace short.
async fn terminate_gracefully(
    child: &mut Child,
    pid: u32,
    pgid: i32,
    limits: &RunLimits,
    output_finished: &CancellationToken,
) -> Result<(ExitStatus, bool), ProcessError> {
    send_to_group(pgid, Signal::SIGTERM);
    let grace_end = Instant::now() + limits.kill.grace;
    let status = tokio::select! {
        biased;
        status = child.wait() => exit_status(status, pid)?,
        () = limits.force.cancelled() => return Ok((kill_and_reap(child, pid, pgid).await?, true)),
        () = sleep_until(grace_end) => return Ok((kill_and_reap(child, pid, pgid).await?, false)),
    };
    // The shell often dies on SIGTERM at once while the program it ran is still shutting
    // down cleanly. That program holds the output pipes until it exits, so let the rest of
    // the grace run until they close before the caller's final SIGKILL.
    let forced = tokio::select! {
        biased;
        () = output_finished.cancelled() => false,
        () = limits.force.cancelled() => true,
        () = sleep_until(grace_end) => false,
    };
    Ok((status, forced))
}

/// SIGKILLs the group and reaps the leader.
async fn kill_and_reap(child: &mut Child, pid: u32, pgid: i32) -> Result<ExitStatus, ProcessError> {
    send_to_group(pgid, Signal::SIGKILL);
    exit_status(child.wait().await, pid)
}

/// Converts the result of waiting for the leader.
fn exit_status(
    waited: io::Result<std::process::ExitStatus>,
    pid: u32,
) -> Result<ExitStatus, ProcessError> {
    let status = waited.map_err(|source| ProcessError::Wait { pid, source })?;
    Ok(match (status.signal(), status.code()) {
        (Some(signal), _) => ExitStatus::Signal(signal),
        (None, Some(code)) => ExitStatus::Code(code),
        // wait(2) without WUNTRACED only reports exits and kills, so this is unreachable.
        (None, None) => ExitStatus::Code(-1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::run;
    use crate::process::tests::{
        assert_all_dead, bash, limits_with_timeout, printed_pids, read_to_end, read_until,
        run_collect,
    };
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn timeout_terminates_gracefully_when_sigterm_suffices() {
        let limits = limits_with_timeout(Duration::from_millis(200), Duration::from_secs(30));
        let (report, _) = run_collect(bash("sleep 300"), limits).await;
        let report = report.expect("run");
        assert_eq!(
            report.outcome,
            Outcome::TimedOut {
                after: Duration::from_millis(200),
                status: ExitStatus::Signal(Signal::SIGTERM as i32),
            }
        );
        assert!(
            report.duration < Duration::from_secs(10),
            "no wait for the grace"
        );
    }

    #[tokio::test]
    async fn timeout_kills_a_step_that_ignores_sigterm_and_its_background_child() {
        // The background sleep inherits the ignored SIGTERM; only SIGKILL stops either.
        let script = "trap '' TERM; sleep 300 & echo \"pids: $$ $!\"; wait";
        let limits = limits_with_timeout(Duration::from_secs(1), Duration::from_millis(200));
        let (report, output) = run_collect(bash(script), limits).await;
        let report = report.expect("run");
        assert_eq!(
            report.outcome,
            Outcome::TimedOut {
                after: Duration::from_secs(1),
                status: ExitStatus::Signal(Signal::SIGKILL as i32),
            }
        );
        let pids = printed_pids(&String::from_utf8_lossy(&output));
        assert_eq!(pids.len(), 2);
        assert_all_dead(report.pid as i32, &pids).await;
    }

    #[tokio::test]
    async fn background_children_left_after_a_normal_exit_are_killed() {
        let script = "sleep 300 & echo \"pids: $!\"";
        let limits = limits_with_timeout(Duration::from_secs(60), Duration::from_secs(60));
        let (report, output) = run_collect(bash(script), limits).await;
        let report = report.expect("run");
        assert_eq!(report.outcome, Outcome::Exited(ExitStatus::Code(0)));
        assert!(report.duration < Duration::from_secs(10));
        assert_all_dead(
            report.pid as i32,
            &printed_pids(&String::from_utf8_lossy(&output)),
        )
        .await;
    }

    #[tokio::test]
    async fn graceful_cancel_lets_the_rest_of_the_group_finish_within_the_grace() {
        // The leader exits on SIGTERM at once; its worker needs a moment to clean up.
        let script = r#"
            trap 'exit 0' TERM
            ( trap 'sleep 0.3; echo worker-cleaned-up; exit 0' TERM
              echo worker-ready
              while :; do sleep 0.05; done ) &
            wait
        "#;
        let limits = RunLimits {
            kill: KillPolicy {
                grace: Duration::from_secs(20),
            },
            ..RunLimits::default()
        };
        let cancel = limits.cancel.clone();
        let (sender, mut receiver) = mpsc::channel(8);
        let task = tokio::spawn(run(bash(script), limits, sender));
        let mut seen = String::new();
        read_until(&mut receiver, &mut seen, "worker-ready").await;
        cancel.cancel();
        read_to_end(&mut receiver, &mut seen).await;
        let report = task.await.expect("task").expect("run");
        assert_eq!(
            report.outcome,
            Outcome::Cancelled {
                forced: false,
                status: ExitStatus::Code(0),
            }
        );
        assert!(seen.contains("worker-cleaned-up"), "{seen}");
        assert!(
            report.duration < Duration::from_secs(10),
            "no wait for the grace"
        );
    }

    #[tokio::test]
    async fn force_during_the_grace_kills_at_once() {
        let script = "trap '' TERM; echo ready; while :; do sleep 0.05; done";
        let limits = RunLimits {
            kill: KillPolicy {
                grace: Duration::from_secs(60),
            },
            ..RunLimits::default()
        };
        let (cancel, force) = (limits.cancel.clone(), limits.force.clone());
        let (sender, mut receiver) = mpsc::channel(8);
        let task = tokio::spawn(run(bash(script), limits, sender));
        let mut seen = String::new();
        read_until(&mut receiver, &mut seen, "ready").await;
        cancel.cancel();
        force.cancel();
        read_to_end(&mut receiver, &mut seen).await;
        let report = task.await.expect("task").expect("run");
        assert_eq!(
            report.outcome,
            Outcome::Cancelled {
                forced: true,
                status: ExitStatus::Signal(Signal::SIGKILL as i32),
            }
        );
        assert!(report.duration < Duration::from_secs(30));
        assert_all_dead(report.pid as i32, &[]).await;
    }

    #[tokio::test]
    async fn force_fired_before_start_kills_at_once() {
        let limits = RunLimits::default();
        limits.force.cancel();
        let (report, _) = run_collect(bash("sleep 300"), limits).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Cancelled {
                forced: true,
                status: ExitStatus::Signal(Signal::SIGKILL as i32),
            }
        );
    }

    #[tokio::test]
    async fn dropping_run_kills_the_group() {
        let script = "sleep 300 & echo \"pids: $$ $!\"; wait";
        let (sender, mut receiver) = mpsc::channel(8);
        let task = tokio::spawn(run(bash(script), RunLimits::default(), sender));
        let mut seen = String::new();
        read_until(&mut receiver, &mut seen, "\n").await;
        task.abort();
        assert!(task.await.is_err_and(|error| error.is_cancelled()));
        let pids = printed_pids(&seen);
        assert_all_dead(pids[0], &pids).await;
    }

    #[test]
    fn signal_group_refuses_own_and_all_groups() {
        for pgid in [-5, 0, 1] {
            // SIGCONT: harmless should the guard ever let it through.
            let error = signal_group(pgid, Signal::SIGCONT).expect_err("must refuse");
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
