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

use std::collections::BTreeMap;
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{dup2_raw, setsid, Pid};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::containment::SpawnPolicy;

/// Host variables a step inherits from the agent's environment when set (spec §10.1, Unix part).
const HOST_ALLOWLIST: [&str; 10] = [
    "PATH",
    "HOME",
    "USER",
    "SHELL",
    "LANG",
    "LC_ALL",
    "TERM",
    "TMPDIR",
    "NODE_PATH",
    "TZ",
];

/// The child's descriptor of the channel given to [`run_with_channel`].
pub const CHANNEL_FD: i32 = 3;

/// Size of one read from a step's output pipe, hence the largest chunk sent to the consumer.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// After the group has been killed, stop draining the pipes once they stay silent this long.
/// Only a process that left the group (`setsid`, a daemon) can still hold them open by then;
/// everything already written is readable at once, so the bound loses no output of the group.
const DRAIN_IDLE_LIMIT: Duration = Duration::from_secs(1);

/// After the group has been killed, stop draining once this much more output arrived: what the
/// group left in the pipe buffers is far less (at most 1 MiB per pipe on Linux), so more can
/// only come from an escaped process that keeps writing.
const DRAIN_BYTE_LIMIT: usize = 4 * 1024 * 1024;

/// What a step process sees as its environment: built from scratch, never inheriting the
/// agent's environment.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StepEnv {
    vars: BTreeMap<String, String>,
}

impl StepEnv {
    /// Layer 1 of the step environment: the host allowlist (`PATH`, `HOME`, `USER`, `SHELL`,
    /// `LANG`, `LC_ALL`, `TERM`, `TMPDIR`, `NODE_PATH`, `TZ`) copied from `host`, then
    /// `FORCE_COLOR=1`, `CI=true` and `KICI=true`. No `KICI_*` variable is ever copied.
    pub fn from_host(host: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut env = Self::default();
        env.extend(
            host.into_iter()
                .filter(|(name, _)| HOST_ALLOWLIST.contains(&name.as_str())),
        );
        env.set("FORCE_COLOR", "1");
        env.set("CI", "true");
        env.set("KICI", "true");
        env
    }

    /// Sets (or replaces) one variable.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(key.into(), value.into());
    }

    /// Sets every variable of `vars`, later ones replacing earlier ones.
    pub fn extend(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        self.vars.extend(vars);
    }

    /// Puts `dir` in front of `PATH` (`PATH=dir:old`, or just `dir` when `PATH` is unset or
    /// empty).
    pub fn prepend_path(&mut self, dir: &str) {
        let path = match self.get("PATH") {
            Some(old) if !old.is_empty() => format!("{dir}:{old}"),
            _ => dir.to_string(),
        };
        self.set("PATH", path);
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// All variables, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }
}

/// Lists names only: values may be secrets a step exposed.
impl fmt::Debug for StepEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

/// The per-step `$KICI_ENV` / `$KICI_PATH` / `$KICI_OUTPUT` / `$KICI_SECRET_OUTPUT` hand-off
/// files (spec §10.4; the output files are our extension), in a private temporary directory
/// `kici-env-XXXXXX` that is removed on drop (the reference agent leaked one per job).
#[derive(Debug)]
pub struct HandoffFiles {
    /// Held for its drop, which removes the directory with the files.
    _dir: crate::workspace::OwnedDir,
    env_file: PathBuf,
    path_file: PathBuf,
    output_file: PathBuf,
    secret_output_file: PathBuf,
}

impl HandoffFiles {
    /// Creates the directory (in `in_dir`, else the system temp dir) and the four empty files.
    pub fn create(in_dir: Option<&Path>) -> io::Result<Self> {
        let dir = crate::workspace::OwnedDir::create("kici-env-", in_dir)?;
        let files = Self {
            env_file: dir.path().join("env"),
            path_file: dir.path().join("path"),
            output_file: dir.path().join("output"),
            secret_output_file: dir.path().join("secret_output"),
            _dir: dir,
        };
        for file in [
            &files.env_file,
            &files.path_file,
            &files.output_file,
            &files.secret_output_file,
        ] {
            std::fs::File::create(file).map_err(|e| with_path(e, file))?;
        }
        Ok(files)
    }

    /// Points `KICI_ENV`, `KICI_PATH`, `KICI_OUTPUT` and `KICI_SECRET_OUTPUT` at the files.
    pub fn apply_to(&self, env: &mut StepEnv) {
        for (name, file) in [
            ("KICI_ENV", &self.env_file),
            ("KICI_PATH", &self.path_file),
            ("KICI_OUTPUT", &self.output_file),
            ("KICI_SECRET_OUTPUT", &self.secret_output_file),
        ] {
            env.set(name, file.to_string_lossy());
        }
    }

    /// Reads what the step wrote, in format v1 (spec §10.4). A file the step deleted counts as
    /// empty.
    pub fn read_delta(&self) -> io::Result<EnvDelta> {
        let path_entries = read_if_present(&self.path_file)?
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_string)
            .collect();
        Ok(EnvDelta {
            vars: parse_assignments(&read_if_present(&self.env_file)?),
            path_entries,
            outputs: parse_assignments(&read_if_present(&self.output_file)?),
            secret_outputs: self.read_secret_outputs()?,
        })
    }

    /// `$KICI_SECRET_OUTPUT`, the file of secret outputs (`KEY=value` lines as `$KICI_OUTPUT`).
    pub fn secret_output_file(&self) -> &Path {
        &self.secret_output_file
    }

    /// The `$KICI_SECRET_OUTPUT` assignments written so far.
    pub fn read_secret_outputs(&self) -> io::Result<Vec<(String, String)>> {
        Ok(parse_assignments(&read_if_present(
            &self.secret_output_file,
        )?))
    }
}

/// Adds the file name to an I/O error, which otherwise would not say which file failed.
fn with_path(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// The file's text (invalid UTF-8 replaced), or nothing when it does not exist.
fn read_if_present(path: &Path) -> io::Result<String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(error) => Err(with_path(error, path)),
    }
}

/// Parses `KEY=value` lines: the line is trimmed, split at the first `=`, the key trimmed and
/// the value kept as is; blank lines, lines without `=` and empty keys are ignored. A repeated
/// key keeps its first position and its last value.
fn parse_assignments(text: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() {
            continue;
        }
        match pairs.iter_mut().find(|(known, _)| known == key) {
            Some(pair) => pair.1 = value.to_string(),
            None => pairs.push((key.to_string(), value.to_string())),
        }
    }
    pairs
}

/// What one step wrote to its hand-off files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvDelta {
    /// `$KICI_ENV` assignments, one per key, in first-seen order, last value winning.
    pub vars: Vec<(String, String)>,
    /// `$KICI_PATH` directories in the order written (the first should end up first on PATH).
    pub path_entries: Vec<String>,
    /// `$KICI_OUTPUT` assignments, same rules as `vars`.
    pub outputs: Vec<(String, String)>,
    /// `$KICI_SECRET_OUTPUT` assignments, same rules as `vars`.
    pub secret_outputs: Vec<(String, String)>,
}

impl EnvDelta {
    /// Applies the variables, except those `protected` names, which are left untouched and
    /// returned so the caller can log `[kici] Cannot override operator secret "<KEY>" via
    /// $KICI_ENV — value preserved`; then prepends the path entries so that the first listed
    /// directory ends up first.
    pub fn apply(&self, env: &mut StepEnv, protected: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut refused = Vec::new();
        for (key, value) in &self.vars {
            if protected(key) {
                refused.push(key.clone());
            } else {
                env.set(key.as_str(), value.as_str());
            }
        }
        for dir in self.path_entries.iter().rev() {
            env.prepend_path(dir);
        }
        refused
    }
}

/// A command to run as one step process.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// Program name (looked up on the step's `PATH`) or path.
    pub program: String,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The complete environment of the process.
    pub env: StepEnv,
    /// Bytes written to the process's stdin, which is then closed; `None` gives it `/dev/null`.
    pub stdin: Option<Vec<u8>>,
}

impl CommandSpec {
    /// `bash --noprofile --norc -eo pipefail -c <script>`: fail on the first failing command or
    /// pipeline stage, and skip the startup files (the reference agent's steps paid ~125 ms for
    /// `~/.bashrc`).
    pub fn bash(script: &str, cwd: PathBuf, env: StepEnv) -> Self {
        let args = ["--noprofile", "--norc", "-eo", "pipefail", "-c", script];
        Self {
            program: "bash".to_string(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            cwd,
            env,
            stdin: None,
        }
    }
}

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
fn send_to_group(pgid: i32, signal: Signal) {
    match signal_group(pgid, signal) {
        Ok(()) => debug!(pgid, %signal, "signalled step process group"),
        Err(error) if error.raw_os_error() == Some(Errno::ESRCH as i32) => {}
        Err(error) => warn!(pgid, %signal, %error, "failed to signal step process group"),
    }
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

/// The process for `spec`: own session, exactly the step environment, piped output; inside
/// the job's containment (its cgroups and tag) and sandbox when there are.
fn build_command(spec: &CommandSpec, policy: Option<&SpawnPolicy>) -> Command {
    let (program, args) = match policy.and_then(|p| p.sandbox.as_deref()) {
        Some(sandbox) => {
            // The hand-off files' directory, which the step must be able to write.
            let handoff_dir = spec.env.get("KICI_ENV").and_then(|f| Path::new(f).parent());
            sandbox.wrap(&spec.program, &spec.args, handoff_dir)
        }
        None => (spec.program.clone(), spec.args.clone()),
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter())
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cgroup_fds = match policy {
        Some(policy) => {
            command.env(crate::containment::TAG_VARIABLE, policy.containment.tag());
            policy.containment.join_fds()
        }
        None => Vec::new(),
    };
    // A new session rather than only a new group: the step also loses any controlling
    // terminal, so a tool prompting on /dev/tty fails at once instead of hanging the step.
    // SAFETY: the closure runs between fork and exec and only calls setsid(2) and write(2)
    // on already open fds, which are async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            crate::containment::join_in_child(&cgroup_fds);
            setsid()?;
            Ok(())
        });
    }
    command
}

/// SIGKILLs the step's group when [`run`] is abandoned before it finished its own cleanup,
/// and tells the containment the child is no longer `run`'s to reap.
struct GroupKillGuard {
    pid: u32,
    pgid: i32,
    armed: bool,
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
async fn supervise(
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

/// Writes the step's input, then closes its stdin so it sees end of file. Gives up once the
/// group is dead (nobody left to read it).
async fn feed_stdin(
    stdin: Option<ChildStdin>,
    input: Option<Vec<u8>>,
    group_killed: &CancellationToken,
) {
    let (Some(mut pipe), Some(input)) = (stdin, input) else {
        return;
    };
    tokio::select! {
        written = pipe.write_all(&input) => {
            if let Err(error) = written {
                // Usually EPIPE: the step exited without reading all of its input.
                debug!(%error, "step stopped reading its stdin");
            }
        }
        () = group_killed.cancelled() => {}
    }
}

/// Reads both pipes until both are closed, forwarding each chunk to `output`.
///
/// Sending waits for room in the bounded channel, and no read happens meanwhile: that is the
/// backpressure. Once the group has been killed, the drain is bounded by [`DRAIN_IDLE_LIMIT`]
/// and [`DRAIN_BYTE_LIMIT`] in case a process that left the group still holds a pipe.
async fn pump_output(
    mut pipes: MergedPipes,
    output: &mpsc::Sender<Vec<u8>>,
    group_killed: &CancellationToken,
) {
    let mut receiver_gone = false;
    let mut drained_after_kill: Option<usize> = None;
    loop {
        let chunk = tokio::select! {
            // Reads first: output that is already there always wins over the drain bound.
            biased;
            chunk = poll_fn(|cx| pipes.poll_chunk(cx)) => chunk,
            () = group_killed.cancelled(), if drained_after_kill.is_none() => {
                drained_after_kill = Some(0);
                continue;
            }
            () = sleep(DRAIN_IDLE_LIMIT), if drained_after_kill.is_some() => {
                warn!("step output held open by a process outside its group; stopped reading");
                break;
            }
        };
        let Some(chunk) = chunk else { break };
        if let Some(drained) = drained_after_kill.as_mut() {
            *drained += chunk.len();
            if *drained > DRAIN_BYTE_LIMIT {
                warn!("step output still flowing from outside its group; stopped reading");
                break;
            }
        }
        if !receiver_gone && output.send(chunk).await.is_err() {
            debug!("step output receiver dropped; discarding the rest of the output");
            receiver_gone = true;
        }
    }
}

/// A step's stdout and stderr, read as one stream of chunks.
///
/// The pipes take turns so neither can starve the other, except that after a chunk ending
/// mid-line the same pipe goes first again: when both hold data, the rest of that line then
/// follows before the other pipe's output instead of being spliced apart by it. A pipe that
/// stays readable without ending a line keeps that priority for [`MAX_PARTIAL_LINE_BYTES`].
/// (A line still in the writer's buffer, not yet in the pipe, can be split: nothing to read.)
struct MergedPipes {
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    /// Which pipe is polled first next time.
    stderr_first: bool,
    /// Bytes read in a row from one pipe without reaching a line end or catching up.
    partial_line_bytes: usize,
    buf: Box<[u8]>,
}

/// How much output one pipe may deliver in a row while the other waits, if it ends no line.
const MAX_PARTIAL_LINE_BYTES: usize = 1024 * 1024;

impl MergedPipes {
    fn new(stdout: Option<ChildStdout>, stderr: Option<ChildStderr>) -> Self {
        Self {
            stdout,
            stderr,
            stderr_first: false,
            partial_line_bytes: 0,
            buf: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
        }
    }

    /// The next chunk from whichever pipe has data, or `None` once both are closed.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
        for from_stderr in [self.stderr_first, !self.stderr_first] {
            let chunk = if from_stderr {
                poll_pipe(&mut self.stderr, cx, &mut self.buf)
            } else {
                poll_pipe(&mut self.stdout, cx, &mut self.buf)
            };
            if let Some(chunk) = chunk {
                self.partial_line_bytes += chunk.len();
                let mid_line = chunk.last() != Some(&b'\n');
                if mid_line && self.partial_line_bytes < MAX_PARTIAL_LINE_BYTES {
                    self.stderr_first = from_stderr;
                } else {
                    self.partial_line_bytes = 0;
                    self.stderr_first = !from_stderr;
                }
                return Poll::Ready(Some(chunk));
            }
        }
        if self.stdout.is_none() && self.stderr.is_none() {
            Poll::Ready(None)
        } else {
            // Caught up with the writers: the other pipe is not being starved.
            self.partial_line_bytes = 0;
            Poll::Pending
        }
    }
}

/// Polls one pipe: `Some(data)` when it had some; `None` when it has nothing yet (a wake-up is
/// registered) or is closed, in which case the slot is emptied.
fn poll_pipe<R: AsyncRead + Unpin>(
    slot: &mut Option<R>,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Option<Vec<u8>> {
    let pipe = slot.as_mut()?;
    let mut read_buf = ReadBuf::new(buf);
    match Pin::new(pipe).poll_read(cx, &mut read_buf) {
        Poll::Pending => None,
        Poll::Ready(Ok(())) if read_buf.filled().is_empty() => {
            *slot = None;
            None
        }
        Poll::Ready(Ok(())) => Some(read_buf.filled().to_vec()),
        Poll::Ready(Err(error)) => {
            warn!(%error, "reading step output failed; closing that pipe");
            *slot = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_env() -> StepEnv {
        StepEnv::from_host(std::env::vars())
    }

    fn bash(script: &str) -> CommandSpec {
        CommandSpec::bash(script, std::env::temp_dir(), host_env())
    }

    fn limits_with_timeout(timeout: Duration, grace: Duration) -> RunLimits {
        RunLimits {
            timeout: Some(timeout),
            kill: KillPolicy { grace },
            ..RunLimits::default()
        }
    }

    /// Runs to completion while collecting all output.
    async fn run_collect(
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
    async fn read_until(receiver: &mut mpsc::Receiver<Vec<u8>>, seen: &mut String, marker: &str) {
        while !seen.contains(marker) {
            let chunk = receiver
                .recv()
                .await
                .expect("output ended before the marker");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads the rest of the output into `seen`.
    async fn read_to_end(receiver: &mut mpsc::Receiver<Vec<u8>>, seen: &mut String) {
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
    async fn assert_all_dead(pgid: i32, pids: &[i32]) {
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
    fn printed_pids(output: &str) -> Vec<i32> {
        let line = output
            .lines()
            .find_map(|line| line.strip_prefix("pids: "))
            .expect("script printed its pids");
        line.split_whitespace()
            .map(|pid| pid.parse().expect("numeric pid"))
            .collect()
    }

    #[test]
    fn from_host_keeps_only_the_allowlist_and_adds_ci_markers() {
        let host = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/ci"),
            ("TZ", "UTC"),
            ("KICI_AGENT_TOKEN", "kat_secret"),
            ("KICI_URL", "wss://x"),
            ("AWS_SECRET_ACCESS_KEY", "nope"),
            ("LD_PRELOAD", "/evil.so"),
            ("FORCE_COLOR", "0"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let env = StepEnv::from_host(host);
        let all: Vec<_> = env.iter().collect();
        assert_eq!(
            all,
            [
                ("CI", "true"),
                ("FORCE_COLOR", "1"),
                ("HOME", "/home/ci"),
                ("KICI", "true"),
                ("PATH", "/usr/bin"),
                ("TZ", "UTC"),
            ]
        );
    }

    #[test]
    fn debug_output_hides_values() {
        let mut env = StepEnv::default();
        env.set("TOKEN", "hunter2");
        let shown = format!("{env:?}");
        assert!(
            shown.contains("TOKEN") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn prepend_path_handles_missing_and_present_path() {
        let mut env = StepEnv::default();
        env.prepend_path("/a");
        assert_eq!(env.get("PATH"), Some("/a"));
        env.prepend_path("/b");
        assert_eq!(env.get("PATH"), Some("/b:/a"));
    }

    #[test]
    fn assignments_follow_format_v1() {
        let text = "A=1\n\n  B = two words  \nno equals here\n=empty key\nA=3\nC=x=y\r\nD=\n";
        assert_eq!(
            parse_assignments(text),
            [("A", "3"), ("B", " two words"), ("C", "x=y"), ("D", "")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn delta_apply_refuses_protected_keys_and_orders_path() {
        let delta = EnvDelta {
            vars: vec![
                ("FOO".to_string(), "bar".to_string()),
                ("SECRET".to_string(), "overridden".to_string()),
            ],
            path_entries: vec!["/first".to_string(), "/second".to_string()],
            outputs: Vec::new(),
            secret_outputs: Vec::new(),
        };
        let mut env = StepEnv::default();
        env.set("SECRET", "kept");
        env.set("PATH", "/usr/bin");
        let refused = delta.apply(&mut env, &|key| key == "SECRET");
        assert_eq!(refused, ["SECRET"]);
        assert_eq!(env.get("SECRET"), Some("kept"));
        assert_eq!(env.get("FOO"), Some("bar"));
        assert_eq!(env.get("PATH"), Some("/first:/second:/usr/bin"));
    }

    #[tokio::test]
    async fn handoff_files_round_trip_through_a_step_and_are_removed() {
        let parent = tempfile::tempdir().expect("tempdir");
        let files = HandoffFiles::create(Some(parent.path())).expect("create");
        let dir = files.env_file.parent().expect("a directory").to_path_buf();
        assert!(dir
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("kici-env-")));
        let mut env = host_env();
        files.apply_to(&mut env);
        assert_eq!(
            env.get("KICI_ENV").map(PathBuf::from),
            Some(dir.join("env"))
        );
        let script = r#"
            echo "GREETING=hello world" >> "$KICI_ENV"
            echo "GREETING=bye" >> "$KICI_ENV"
            printf '/opt/one\n\n  /opt/two  \n' >> "$KICI_PATH"
            echo "result=42" >> "$KICI_OUTPUT"
            echo "token=abc=def" >> "$KICI_SECRET_OUTPUT"
        "#;
        let spec = CommandSpec::bash(script, parent.path().to_path_buf(), env);
        let (report, _) = run_collect(spec, RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(0))
        );
        let delta = files.read_delta().expect("delta");
        assert_eq!(
            delta,
            EnvDelta {
                vars: vec![("GREETING".to_string(), "bye".to_string())],
                path_entries: vec!["/opt/one".to_string(), "/opt/two".to_string()],
                outputs: vec![("result".to_string(), "42".to_string())],
                secret_outputs: vec![("token".to_string(), "abc=def".to_string())],
            }
        );
        drop(files);
        assert!(!dir.exists());
    }

    #[test]
    fn deleted_handoff_file_reads_as_empty() {
        let files = HandoffFiles::create(None).expect("create");
        std::fs::remove_file(&files.env_file).expect("remove");
        assert_eq!(files.read_delta().expect("delta"), EnvDelta::default());
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
    async fn output_arrives_complete_and_in_order() {
        let script = "seq 1 200000; echo to-stderr >&2";
        let (report, output) = run_collect(bash(script), RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(0))
        );
        let text = String::from_utf8(output).expect("utf-8");
        let stdout: String = text.lines().filter(|line| *line != "to-stderr").fold(
            String::new(),
            |mut all, line| {
                all.push_str(line);
                all.push('\n');
                all
            },
        );
        let expected: String = (1..=200_000).map(|n| format!("{n}\n")).collect();
        assert_eq!(stdout, expected);
        assert_eq!(text.matches("to-stderr\n").count(), 1);
    }

    #[tokio::test]
    async fn stdin_is_fed_then_closed_and_null_otherwise() {
        let input: Vec<u8> = (0..1_000_000u32).map(|n| (n % 251) as u8).collect();
        let mut spec = bash("cat");
        spec.stdin = Some(input.clone());
        let (report, output) = run_collect(spec, RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(0))
        );
        assert_eq!(output, input);

        let limits = limits_with_timeout(Duration::from_secs(10), Duration::from_secs(1));
        let (report, output) = run_collect(bash("cat"), limits).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(0))
        );
        assert!(output.is_empty());
    }

    #[tokio::test]
    async fn slow_consumer_holds_the_step_back_without_losing_output() {
        const TOTAL: usize = 4 * 1024 * 1024;
        let (sender, mut receiver) = mpsc::channel(1);
        let script = format!("head -c {TOTAL} /dev/zero");
        let task = tokio::spawn(run(bash(&script), RunLimits::default(), sender));
        // Nothing is read: with a pipe buffer, one queued and one in-flight chunk, the step
        // must be blocked writing, far from done.
        sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "step finished without a reader");
        let mut received = 0;
        while let Some(chunk) = receiver.recv().await {
            assert!(chunk.iter().all(|&byte| byte == 0));
            received += chunk.len();
            tokio::task::yield_now().await;
        }
        let report = task.await.expect("task").expect("run");
        assert_eq!(report.outcome, Outcome::Exited(ExitStatus::Code(0)));
        assert_eq!(received, TOTAL);
    }

    #[tokio::test]
    async fn dropped_receiver_does_not_block_the_step() {
        let (sender, receiver) = mpsc::channel(1);
        drop(receiver);
        let report = run(
            bash("head -c 1000000 /dev/zero"),
            RunLimits::default(),
            sender,
        )
        .await
        .expect("run");
        assert_eq!(report.outcome, Outcome::Exited(ExitStatus::Code(0)));
    }

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
    async fn drain_is_bounded_when_an_escaped_process_holds_the_pipe() {
        // `setsid` moves the sleep out of the step's group, out of reach of the orphan kill.
        let script = "setsid sleep 300 & echo \"pids: $!\"";
        let (report, output) = run_collect(bash(script), RunLimits::default()).await;
        let escaped = printed_pids(&String::from_utf8_lossy(&output));
        for &pid in &escaped {
            // The pid is this test's own (started above); it may be gone already.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let report = report.expect("run");
        assert_eq!(report.outcome, Outcome::Exited(ExitStatus::Code(0)));
        assert!(
            report.duration < DRAIN_IDLE_LIMIT * 5,
            "{:?}",
            report.duration
        );
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

    #[test]
    fn signal_group_refuses_own_and_all_groups() {
        for pgid in [-5, 0, 1] {
            // SIGCONT: harmless should the guard ever let it through.
            let error = signal_group(pgid, Signal::SIGCONT).expect_err("must refuse");
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
