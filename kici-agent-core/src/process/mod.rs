//! Running step commands: environment, process groups, output streaming and the kill ladder.
//!
//! * Every command starts in its own session (`setsid`), so its process group id equals its pid
//!   and every signal the agent sends reaches the whole tree the step started, not just its
//!   shell (spec §11.2, §13.2).
//! * The environment is built from scratch ([`StepEnv`]); nothing of the agent's own
//!   environment leaks in except the host allowlist (spec §10.1).
//! * stdout and stderr are read as raw chunks, merged in arrival order, and sent through a
//!   bounded channel: while the consumer is not reading, the pipes are not read either, so the
//!   step blocks on its writes instead of the agent buffering without limit (spec §14.3).
//! * Kill ladder (timeout or graceful cancel): SIGTERM to the group, wait [`KillPolicy::grace`],
//!   SIGKILL to the group. A fired force token short-cuts straight to SIGKILL (spec §13.1).
//! * Orphan cleanup: once the leader has exited, whatever is left of its group is SIGKILLed,
//!   like GitHub Actions does with a job's leftover processes. A step therefore cannot leave a
//!   background process behind (`server &` without `wait`), and such a process cannot keep the
//!   output pipes, and with them [`run`], open forever.
//!
//! This file is the module's face: the limits a step runs under, how it ended (`Outcome`,
//! `ExitStatus`, `RunReport`, `ProcessError`), and [`run`] / [`run_with_channel`], which tie
//! the rooms below together:
//! - `env`: the step environment (`StepEnv`) and the host allowlist;
//! - `handoff`: the `$KICI_ENV` / `$KICI_PATH` / `$KICI_OUTPUT` / `$KICI_SECRET_OUTPUT` files
//!   and what a step wrote to them (`EnvDelta`);
//! - `spawn`: the command (`CommandSpec`) and the process built for it (session, environment,
//!   pipes, containment and sandbox);
//! - `kill`: the kill ladder (`KillPolicy`, signalling the group, waiting for the leader, the
//!   guard that kills the group when `run` is dropped);
//! - `pipes`: feeding stdin, reading stdout and stderr as one stream with backpressure, the
//!   bounded drain after the kill.

mod env;
mod handoff;
mod kill;
mod pipes;
mod spawn;

use std::io;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::Signal;
use nix::unistd::dup2_raw;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use env::StepEnv;
pub use handoff::HandoffFiles;
pub use kill::KillPolicy;
pub use spawn::CommandSpec;

use kill::{send_to_group, supervise, GroupKillGuard};
use pipes::{feed_stdin, pump_output, MergedPipes};
use spawn::build_command;

/// The child's descriptor of the channel given to [`run_with_channel`].
pub const CHANNEL_FD: i32 = 3;

/// How the step's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was terminated by this signal.
    Signal(i32),
}

/// Why and how a step process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ended on its own.
    Exited(ExitStatus),
    /// It was stopped because it ran longer than `after` (the configured timeout).
    TimedOut {
        /// The timeout that expired.
        after: Duration,
        /// How the main process ended.
        status: ExitStatus,
    },
    /// It was stopped because of a cancellation.
    Cancelled {
        /// Whether the force token cut the grace short with SIGKILL.
        forced: bool,
        /// How the main process ended.
        status: ExitStatus,
    },
}

/// The limits a step process runs under.
#[derive(Debug, Clone, Default)]
pub struct RunLimits {
    /// Stop the process (kill ladder) once it has run this long.
    pub timeout: Option<Duration>,
    /// Fired: stop the process gracefully (kill ladder).
    pub cancel: CancellationToken,
    /// Fired, before or during the grace: SIGKILL the group at once.
    pub force: CancellationToken,
    /// The kill ladder used on timeout and graceful cancel.
    pub kill: KillPolicy,
}

/// The result of [`run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunReport {
    /// Why and how the process ended.
    pub outcome: Outcome,
    /// Its pid, which is also its process group and session id.
    pub pid: u32,
    /// Time from spawn until the output was drained.
    pub duration: Duration,
}

/// Failures of [`run`] itself (a failing step is an [`Outcome`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The process could not be started (missing program, missing working directory, …).
    #[error("failed to start `{program}`: {source}")]
    Spawn {
        /// The program that was to be started.
        program: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Waiting for the process to end failed.
    #[error("failed to wait for process {pid}: {source}")]
    Wait {
        /// The process waited for.
        pid: u32,
        /// The underlying error.
        source: io::Error,
    },
}

/// Runs `spec` in its own session and process group under `limits`, sending its stdout and
/// stderr, merged in arrival order, to `output` as raw chunks.
///
/// Returns once the main process has been reaped, the rest of its group killed (orphan
/// cleanup) and the pipes drained. If the returned future is dropped early, the whole group
/// is SIGKILLed. If the receiver of `output` goes away, output is read and discarded so the
/// step is not blocked.
pub async fn run(
    spec: CommandSpec,
    limits: RunLimits,
    output: mpsc::Sender<Vec<u8>>,
) -> Result<RunReport, ProcessError> {
    run_inner(spec, limits, output, None).await
}

/// [`run`], with `channel` as the child's fd 3: a private channel between the agent and a
/// program it runs (the TypeScript runner), apart from the output pipes.
pub async fn run_with_channel(
    spec: CommandSpec,
    limits: RunLimits,
    output: mpsc::Sender<Vec<u8>>,
    channel: std::os::fd::OwnedFd,
) -> Result<RunReport, ProcessError> {
    run_inner(spec, limits, output, Some(channel)).await
}

async fn run_inner(
    spec: CommandSpec,
    limits: RunLimits,
    output: mpsc::Sender<Vec<u8>>,
    channel: Option<std::os::fd::OwnedFd>,
) -> Result<RunReport, ProcessError> {
    let started = Instant::now();
    let spawn_error = |source| ProcessError::Spawn {
        program: spec.program.clone(),
        source,
    };
    let policy = crate::containment::current();
    let mut command = build_command(&spec, policy.as_ref());
    if let Some(channel) = &channel {
        use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
        let fd = channel.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only calls dup2(2) and fcntl(2),
        // which are async-signal-safe and allocate nothing.
        unsafe {
            command.pre_exec(move || {
                // SAFETY: `channel` stays open in the agent until the spawn returned, so the
                // child's copy of `fd` is open here.
                let channel = BorrowedFd::borrow_raw(fd);
                if fd == CHANNEL_FD {
                    // dup2 onto itself keeps close-on-exec: clear it instead.
                    fcntl(channel, FcntlArg::F_SETFD(FdFlag::empty()))?;
                } else {
                    // SAFETY: nothing else in the child owns fd 3; it is released at once so
                    // that it stays open across exec.
                    let _ = dup2_raw(channel, CHANNEL_FD)?.into_raw_fd();
                }
                Ok(())
            });
        }
    }
    let (mut child, pid) = {
        let mut spawning = crate::containment::spawning();
        let spawned = command.spawn();
        // The child has its copy; the agent keeps only its own end.
        drop(channel);
        let child = spawned.map_err(spawn_error)?;
        // A pid is only missing once the child has been reaped, which cannot have happened yet.
        let pid = child
            .id()
            .ok_or_else(|| spawn_error(io::Error::other("spawned process has no pid")))?;
        spawning.spawned(pid);
        (child, pid)
    };
    let mut group_guard = GroupKillGuard {
        pid,
        pgid: i32::try_from(pid)
            .map_err(|_| spawn_error(io::Error::other(format!("pid {pid} out of range"))))?,
        armed: true,
    };
    let pgid = group_guard.pgid;

    let pipes = MergedPipes::new(child.stdout.take(), child.stderr.take());
    let stdin = child.stdin.take();
    let group_killed = CancellationToken::new();
    let output_finished = CancellationToken::new();

    let supervision = async {
        let outcome = supervise(&mut child, pid, pgid, &limits, &output_finished).await;
        // Orphan cleanup: whatever the leader left running in its group dies with it.
        send_to_group(pgid, Signal::SIGKILL);
        group_killed.cancel();
        outcome
    };
    let pumping = async {
        pump_output(pipes, &output, &group_killed).await;
        output_finished.cancel();
    };
    let feeding = feed_stdin(stdin, spec.stdin, &group_killed);
    let (outcome, (), ()) = tokio::join!(supervision, pumping, feeding);
    group_guard.armed = false;

    Ok(RunReport {
        outcome: outcome?,
        pid,
        duration: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tokio::time::sleep;

    pub(super) fn host_env() -> StepEnv {
        StepEnv::from_host(std::env::vars())
    }

    pub(super) fn bash(script: &str) -> CommandSpec {
        CommandSpec::bash(script, std::env::temp_dir(), host_env())
    }

    pub(super) fn limits_with_timeout(timeout: Duration, grace: Duration) -> RunLimits {
        RunLimits {
            timeout: Some(timeout),
            kill: KillPolicy { grace },
            ..RunLimits::default()
        }
    }

    /// Runs to completion while collecting all output.
    pub(super) async fn run_collect(
        spec: CommandSpec,
        limits: RunLimits,
    ) -> (Result<RunReport, ProcessError>, Vec<u8>) {
        let (sender, mut receiver) = mpsc::channel::<Vec<u8>>(8);
        let collector = tokio::spawn(async move {
            let mut all = Vec::new();
            while let Some(chunk) = receiver.recv().await {
                all.extend_from_slice(&chunk);
            }
            all
        });
        let report = run(spec, limits, sender).await;
        (report, collector.await.expect("collector task"))
    }

    /// Receives output into `seen` until it contains `marker`.
    pub(super) async fn read_until(
        receiver: &mut mpsc::Receiver<Vec<u8>>,
        seen: &mut String,
        marker: &str,
    ) {
        while !seen.contains(marker) {
            let chunk = receiver
                .recv()
                .await
                .expect("output ended before the marker");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads the rest of the output into `seen`.
    pub(super) async fn read_to_end(receiver: &mut mpsc::Receiver<Vec<u8>>, seen: &mut String) {
        while let Some(chunk) = receiver.recv().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// State letter and process group of a pid, from /proc; `None` when it no longer exists.
    fn proc_state(pid: i32) -> Option<(char, i32)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, after_comm) = stat.rsplit_once(')')?;
        let mut fields = after_comm.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let pgrp = fields.nth(1)?.parse().ok()?;
        Some((state, pgrp))
    }

    /// Live (non-zombie) processes in group `pgid`. A zombie is dead; reaping orphans is the
    /// job of init, not ours.
    fn live_group_members(pgid: i32) -> Vec<i32> {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| {
                proc_state(pid).is_some_and(|(state, pgrp)| pgrp == pgid && state != 'Z')
            })
            .collect()
    }

    fn is_dead(pid: i32) -> bool {
        !matches!(proc_state(pid), Some((state, _)) if state != 'Z')
    }

    /// Waits (bounded) for SIGKILLed processes to finish dying: the kernel completes their
    /// exit asynchronously.
    pub(super) async fn assert_all_dead(pgid: i32, pids: &[i32]) {
        for _ in 0..300 {
            if live_group_members(pgid).is_empty() && pids.iter().all(|&pid| is_dead(pid)) {
                return;
            }
            sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "still alive: group {pgid} members {:?}, pids {pids:?}",
            live_group_members(pgid)
        );
    }

    /// The pids a script printed as `pids: <a> <b> ...`.
    pub(super) fn printed_pids(output: &str) -> Vec<i32> {
        let line = output
            .lines()
            .find_map(|line| line.strip_prefix("pids: "))
            .expect("script printed its pids");
        line.split_whitespace()
            .map(|pid| pid.parse().expect("numeric pid"))
            .collect()
    }

    #[tokio::test]
    async fn child_sees_exactly_the_step_env() {
        let mut env = host_env();
        env.set("ONLY_FOR_THE_STEP", "with spaces = and equals");
        let spec = CommandSpec {
            program: "env".to_string(),
            args: vec!["-0".to_string()],
            cwd: std::env::temp_dir(),
            env: env.clone(),
            stdin: None,
        };
        let (report, output) = run_collect(spec, RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(0))
        );
        let seen: BTreeMap<String, String> = output
            .split(|&byte| byte == 0)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                let entry = String::from_utf8_lossy(entry);
                let (name, value) = entry.split_once('=').expect("NAME=value");
                (name.to_string(), value.to_string())
            })
            .collect();
        assert_eq!(seen, env.vars);
    }

    #[tokio::test]
    async fn runs_in_its_own_session_and_group() {
        let script = r#"read -r -a stat < /proc/$$/stat; echo "${stat[0]} ${stat[4]} ${stat[5]}""#;
        let (report, output) = run_collect(bash(script), RunLimits::default()).await;
        let report = report.expect("run");
        let ids: Vec<u32> = String::from_utf8_lossy(&output)
            .split_whitespace()
            .map(|id| id.parse().expect("numeric id"))
            .collect();
        assert_eq!(ids, [report.pid; 3], "pid, pgrp and session all equal");
        let own_group = nix::unistd::getpgrp().as_raw();
        assert_ne!(i64::from(report.pid), i64::from(own_group));
    }

    #[tokio::test]
    async fn reports_exit_codes_and_signals() {
        let (report, _) = run_collect(bash("exit 3"), RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(3))
        );
        let (report, _) = run_collect(bash("kill -9 $$"), RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Signal(Signal::SIGKILL as i32))
        );
        let (report, _) = run_collect(bash("false | true"), RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(1)),
            "pipefail is on"
        );
    }

    #[tokio::test]
    async fn spawn_failures_name_the_program() {
        let spec = CommandSpec {
            program: "/nonexistent/kici-no-such-program".to_string(),
            args: Vec::new(),
            cwd: std::env::temp_dir(),
            env: host_env(),
            stdin: None,
        };
        let (report, _) = run_collect(spec, RunLimits::default()).await;
        let error = report.expect_err("spawn must fail");
        let ProcessError::Spawn { program, .. } = &error else {
            panic!("not a spawn error: {error}");
        };
        assert!(program.contains("kici-no-such-program"), "{error}");
    }

    #[tokio::test]
    async fn the_channel_is_the_childs_fd_3_and_ours_alone_afterwards() {
        use std::io::Read;
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (sender, _receiver) = mpsc::channel(8);
        let report = run_with_channel(
            bash("echo through-the-channel >&3"),
            RunLimits::default(),
            sender,
            theirs.into(),
        )
        .await
        .expect("run");
        assert_eq!(report.outcome, Outcome::Exited(ExitStatus::Code(0)));
        // The child's copy died with it and `run_with_channel` dropped the agent's: the read
        // ends instead of waiting for a writer that is gone.
        let mut received = String::new();
        ours.read_to_string(&mut received)
            .expect("read the channel");
        assert_eq!(received, "through-the-channel\n");
    }
}
