//! [`TypeScriptExecutor`]: runs the steps of a KiCI TypeScript job (`jobConfig.source.file`
//! ending in `.ts`) with the agent's own Node runner.
//!
//! The runner (`kici-agent-core/runner/*.mjs`, embedded in the library) is written once to a
//! private directory and started once per job with Node >= 20.6, in the job's process group,
//! with the sanitised step environment, in the workspace. It speaks JSON lines with the agent
//! over a socketpair on its fd 3; its stdout and stderr are job-level log lines, and the last
//! of them explain a crash. See `runner/runner.mjs` for the messages.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::geteuid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, OnceCell};

use crate::deps::{DepsTarball, InstallCache};
use crate::executor::{JobContext, StepFailure};
use crate::job_executor::{JobExecutor, JobIo, JobOutcome, StepFinished, StepStarted};
use crate::process::{self, CommandSpec, KillPolicy, Outcome, RunLimits, StepEnv};
use crate::protocol::{JobConfig, JobState, StepState, StepType, JOB_LOG_INDEX};

/// The oldest Node that has `module.register` (the runner's TypeScript hooks).
pub const MIN_NODE_VERSION: (u32, u32) = (20, 6);

/// Lines of the runner's own output kept to explain a crash.
const CRASH_TAIL_LINES: usize = 20;

/// Longest a runner may take to load a module and list its jobs.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// After the runner exited, how long to wait for the rest of its channel.
const CHANNEL_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// The runner's files: (name, content). Written out together; `runner.mjs` is the entry point.
const RUNNER_FILES: [(&str, &str); 3] = [
    ("runner.mjs", include_str!("../runner/runner.mjs")),
    ("loader.mjs", include_str!("../runner/loader.mjs")),
    (
        "vendor/sucrase.mjs",
        include_str!("../runner/vendor/sucrase.mjs"),
    ),
];

/// Why TypeScript jobs cannot run on this host.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunnerUnavailable {
    #[error("this job's steps are TypeScript and need Node.js >= {}.{}: {reason} (install Node.js or set KICI_NODE)", MIN_NODE_VERSION.0, MIN_NODE_VERSION.1)]
    Node { reason: String },
    #[error("could not write the TypeScript runner to {path}: {reason}")]
    Install { path: PathBuf, reason: String },
}

/// A Node found and checked.
#[derive(Debug, Clone)]
struct Node {
    path: PathBuf,
    /// `node --version`, e.g. `v20.6.1` (native modules of an install depend on it).
    version: String,
}

/// Runs TypeScript jobs through the embedded Node runner.
pub struct TypeScriptExecutor {
    /// `KICI_NODE`; `None`: `node` on the agent's PATH.
    node: Option<PathBuf>,
    kill_grace: Duration,
    default_step_timeout: Duration,
    /// Found once per agent, on the first TypeScript job.
    found: OnceCell<Result<(Node, PathBuf), RunnerUnavailable>>,
    /// Local runs: the repository to run in, in place of the job workspace.
    in_place: Option<PathBuf>,
    /// Installed workflow dependencies, per lock file, shared by the jobs of this host.
    install_cache: InstallCache,
}

/// The jobs of one workflow of a module.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WorkflowJobs {
    pub name: String,
    pub jobs: Vec<String>,
}

impl TypeScriptExecutor {
    /// An executor with Node at `node` (else `node` on PATH), the SIGTERM -> SIGKILL grace of
    /// the runner's process group, and the step timeout for steps that name none.
    pub fn new(
        node: Option<PathBuf>,
        kill_grace: Duration,
        default_step_timeout: Duration,
    ) -> Self {
        TypeScriptExecutor {
            node,
            kill_grace,
            default_step_timeout,
            found: OnceCell::new(),
            in_place: None,
            install_cache: InstallCache::default(),
        }
    }

    /// Runs jobs in the repository at `root` itself instead of the job workspace (local runs
    /// of a working copy: `kici-agent exec workflow.ts`).
    pub fn in_place(mut self, root: PathBuf) -> Self {
        self.in_place = Some(root);
        self
    }

    /// The workflows and jobs of `source_file` (relative to the repository at `root`), as the
    /// runner loads them.
    pub async fn list_jobs(
        &self,
        root: &Path,
        source_file: &str,
    ) -> Result<Vec<WorkflowJobs>, String> {
        let (node, dir) = self.ready().await.map_err(|e| e.to_string())?;
        let (ours, theirs) = channel_pair()
            .map_err(|e| format!("could not create the TypeScript runner's channel: {e}"))?;
        let spec = CommandSpec {
            program: node.path.display().to_string(),
            args: vec![dir.join("runner.mjs").display().to_string()],
            cwd: root.to_path_buf(),
            env: StepEnv::from_host(std::env::vars()),
            stdin: None,
        };
        let limits = RunLimits {
            timeout: Some(LIST_TIMEOUT),
            cancel: tokio_util::sync::CancellationToken::new(),
            force: tokio_util::sync::CancellationToken::new(),
            kill: KillPolicy {
                grace: self.kill_grace,
            },
        };
        let (output_tx, mut output_rx) = mpsc::channel::<Vec<u8>>(16);
        let runner = process::run_with_channel(spec, limits, output_tx, theirs.into());
        let output = async {
            let mut tail = Tail::default();
            while let Some(bytes) = output_rx.recv().await {
                tail.push(&bytes);
            }
            tail
        };
        let request = ListRequest {
            kind: "list",
            workspace: root,
            runner_dir: dir,
            source_file,
        };
        let talk = async {
            let (read_half, mut write_half) = ours.into_split();
            let mut line = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
            line.push(b'\n');
            write_half
                .write_all(&line)
                .await
                .map_err(|e| e.to_string())?;
            let mut lines = BufReader::new(read_half).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<RunnerMessage>(&line) {
                    Ok(RunnerMessage::Jobs { workflows }) => return Ok(workflows),
                    Ok(RunnerMessage::JobComplete {
                        error: Some(error), ..
                    }) => return Err(error),
                    _ => {}
                }
            }
            Err(String::new())
        };
        let ((_, tail), reply) = tokio::join!(async { tokio::join!(runner, output) }, talk);
        reply.map_err(|error| {
            let detail = if error.is_empty() { tail.text() } else { error };
            format!("could not list the jobs of {source_file}: {detail}")
        })
    }

    /// Checks (once) that Node >= 20.6 is there and the runner is written out.
    pub async fn available(&self) -> Result<(), RunnerUnavailable> {
        self.ready().await.map(|_| ())
    }

    async fn ready(&self) -> Result<&(Node, PathBuf), RunnerUnavailable> {
        self.found
            .get_or_init(|| async {
                let node = find_node(self.node.as_deref()).await?;
                let dir = runner_dir();
                let install_dir = dir.clone();
                tokio::task::spawn_blocking(move || install_runner(&install_dir))
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))
                    .and_then(|r| r)
                    .map_err(|e| RunnerUnavailable::Install {
                        path: dir.clone(),
                        reason: e.to_string(),
                    })?;
                Ok((node, dir))
            })
            .await
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl TypeScriptExecutor {
    /// A fresh clone has no `.kici/node_modules`. With the dispatch's tarball (`depsUrl`) it is
    /// restored from that (sha256 checked), else from `.kici/package.json` by the package
    /// manager its lock file names (`pnpm-lock.yaml`: `pnpm install --frozen-lockfile`;
    /// `package-lock.json`: `npm ci`; none: `npm install`), in the job's environment and
    /// process-group rules, its output as job-level lines. Either is kept in the host's
    /// [`InstallCache`] (an install only with a lock file: without one it is not repeatable)
    /// and restored from there by the next job with the same key.
    async fn install_dependencies(
        &self,
        root: &Path,
        node: &Node,
        env: &StepEnv,
        io: &JobIo,
        tarball: Option<&DepsTarball>,
    ) -> Result<(), String> {
        let kici = root.join(".kici");
        if kici.join("node_modules").exists() {
            return Ok(());
        }
        if let Some(tarball) = tarball {
            let Some(reason) = tarball.unavailable_in_this_build() else {
                return self.restore_tarball(root, &kici, tarball, io).await;
            };
            io.output(
                JOB_LOG_INDEX,
                format!(
                    "[kici] Not restoring the workflow dependencies from the dispatch's tarball ({}): {reason}; installing them instead\n",
                    tarball.shown()
                ),
            )
            .await;
        }
        if !kici.join("package.json").exists() {
            return Ok(());
        }
        let (manager, args, lock_file): (&str, &[&str], Option<&str>) =
            if kici.join("pnpm-lock.yaml").exists() {
                (
                    "pnpm",
                    &["install", "--frozen-lockfile"],
                    Some("pnpm-lock.yaml"),
                )
            } else if kici.join("package-lock.json").exists() {
                (
                    "npm",
                    &["ci", "--no-audit", "--no-fund"],
                    Some("package-lock.json"),
                )
            } else {
                ("npm", &["install", "--no-audit", "--no-fund"], None)
            };
        let key = match lock_file {
            Some(lock_file) => {
                let read = |name: &str| std::fs::read(kici.join(name)).unwrap_or_default();
                Some(crate::deps::install_key(&[
                    manager.as_bytes(),
                    lock_file.as_bytes(),
                    &read(lock_file),
                    &read("package.json"),
                    node.version.as_bytes(),
                    std::env::consts::OS.as_bytes(),
                    std::env::consts::ARCH.as_bytes(),
                ]))
            }
            None => None,
        };
        if let Some(key) = &key {
            if self.restore_cached(key, &kici, io).await {
                return Ok(());
            }
        }
        // npm ships beside node; pnpm is wherever the host installed it.
        let program = node
            .path
            .parent()
            .map(|dir| dir.join(manager))
            .filter(|beside| beside.is_file())
            .or_else(|| find_on_path(manager))
            .ok_or_else(|| {
                format!(
                    "installing the workflow dependencies needs {manager}: none next to {} or on PATH",
                    node.path.display()
                )
            })?;
        let command = format!("{manager} {}", args.join(" "));
        io.output(
            JOB_LOG_INDEX,
            format!("[kici] Installing workflow dependencies: {command} (in .kici)\n"),
        )
        .await;
        // npm and pnpm run scripts with `node` from PATH: make it the one that runs the job.
        let mut env = env.clone();
        if let Some(dir) = node.path.parent() {
            env.prepend_path(&dir.display().to_string());
        }
        let mut program = program.display().to_string();
        let mut argv: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if crate::containment::current().is_some_and(|p| p.sandbox.is_some()) {
            // In the sandbox a process starts in /workspace whatever working directory it
            // was given (and npm's `--prefix` would also move its global config): `cd` first.
            let script = r#"cd "$1" && shift && exec "$@""#;
            let mut wrapped = vec!["-c".into(), script.into(), "sh".into()];
            wrapped.extend([kici.display().to_string(), program]);
            wrapped.append(&mut argv);
            (program, argv) = ("sh".into(), wrapped);
            // The user's package cache is not in the sandbox; its private /tmp is.
            env.set("npm_config_cache", "/tmp/.npm");
            env.set("npm_config_store_dir", "/tmp/.pnpm-store");
        }
        let spec = CommandSpec {
            program,
            args: argv,
            cwd: kici.clone(),
            env,
            stdin: None,
        };
        let limits = RunLimits {
            timeout: None,
            cancel: io.cancellation().clone(),
            force: io.force().clone(),
            kill: KillPolicy {
                grace: self.kill_grace,
            },
        };
        let (output_tx, mut output_rx) = mpsc::channel::<Vec<u8>>(64);
        let install = process::run(spec, limits, output_tx);
        let forward = async {
            while let Some(bytes) = output_rx.recv().await {
                io.output(JOB_LOG_INDEX, bytes).await;
            }
        };
        let (report, ()) = tokio::join!(install, forward);
        let report = report.map_err(|e| format!("installing the workflow dependencies: {e}"))?;
        match report.outcome {
            Outcome::Exited(process::ExitStatus::Code(0)) => {}
            other => {
                return Err(format!(
                    "installing the workflow dependencies failed: {command} ended with {}",
                    describe(&other)
                ))
            }
        }
        if let Some(key) = key {
            self.store_cached(key, &kici, io).await;
        }
        Ok(())
    }

    /// The dispatch's pre-built tarball: from the host cache when a job had it already, else
    /// downloaded, checked and unpacked (then cached).
    async fn restore_tarball(
        &self,
        root: &Path,
        kici: &Path,
        tarball: &DepsTarball,
        io: &JobIo,
    ) -> Result<(), String> {
        if self.restore_cached(&tarball.sha256, kici, io).await {
            return Ok(());
        }
        io.output(
            JOB_LOG_INDEX,
            format!(
                "[kici] Restoring the workflow dependencies from the dispatch's tarball ({}, sha256 {})\n",
                tarball.shown(),
                tarball.sha256
            ),
        )
        .await;
        let scratch = root.join(format!(".kici-deps-{}.tgz", uuid::Uuid::new_v4().simple()));
        let restore = crate::deps::restore_tarball(tarball, root, &scratch);
        tokio::select! {
            result = restore => result.map_err(|e| e.to_string())?,
            _ = io.cancellation().cancelled() => {
                let _ = std::fs::remove_file(&scratch);
                return Err("cancelled while restoring the workflow dependencies".into());
            }
        }
        // Only a well-formed key names a cache entry.
        if tarball.sha256.len() == 64 && tarball.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            self.store_cached(tarball.sha256.clone(), kici, io).await;
        }
        Ok(())
    }

    /// Restores cache entry `key` as `.kici/node_modules`; false when there is none (or it
    /// cannot be read: the job then installs as if there were none).
    async fn restore_cached(&self, key: &str, kici: &Path, io: &JobIo) -> bool {
        let cache = self.install_cache.clone();
        let (key_owned, kici_owned) = (key.to_owned(), kici.to_path_buf());
        let restored =
            tokio::task::spawn_blocking(move || cache.restore(&key_owned, &kici_owned)).await;
        match restored {
            Ok(Ok(true)) => {
                io.output(
                    JOB_LOG_INDEX,
                    format!(
                        "[kici] Workflow dependencies restored from the host cache (key {})\n",
                        &key[..12.min(key.len())]
                    ),
                )
                .await;
                true
            }
            Ok(Ok(false)) => false,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not restore workflow dependencies from the host cache");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "the dependency cache restore task failed");
                false
            }
        }
    }

    /// Keeps a copy of the job's fresh `.kici/node_modules` as cache entry `key`. A failure
    /// costs the next job an install, not this one its result: it is logged only.
    async fn store_cached(&self, key: String, kici: &Path, io: &JobIo) {
        let cache = self.install_cache.clone();
        let kici = kici.to_path_buf();
        match tokio::task::spawn_blocking(move || cache.store(&key, &kici)).await {
            Ok(Ok(())) => {
                io.output(
                    JOB_LOG_INDEX,
                    "[kici] Workflow dependencies kept in the host cache for later jobs\n",
                )
                .await
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not keep the workflow dependencies in the host cache")
            }
            Err(e) => tracing::warn!(error = %e, "the dependency cache store task failed"),
        }
    }
}

/// How a process ended, for error messages.
fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Exited(process::ExitStatus::Code(code)) => format!("exit code {code}"),
        Outcome::Exited(process::ExitStatus::Signal(signal)) => {
            format!("killed by signal {signal}")
        }
        Outcome::TimedOut { after, .. } => format!("a timeout after {}ms", after.as_millis()),
        Outcome::Cancelled { .. } => "a cancel".into(),
    }
}

/// Finds Node (`explicit`, else `node` on PATH) and checks its version.
async fn find_node(explicit: Option<&Path>) -> Result<Node, RunnerUnavailable> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => find_on_path("node").ok_or_else(|| RunnerUnavailable::Node {
            reason: "no `node` on PATH".into(),
        })?,
    };
    let output = tokio::process::Command::new(&path)
        .arg("--version")
        .output()
        .await
        .map_err(|e| RunnerUnavailable::Node {
            reason: format!("{} --version: {e}", path.display()),
        })?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match parse_node_version(&version) {
        Some(found) if found >= MIN_NODE_VERSION => Ok(Node { path, version }),
        Some(_) => Err(RunnerUnavailable::Node {
            reason: format!("{} is {version}", path.display()),
        }),
        None => Err(RunnerUnavailable::Node {
            reason: format!(
                "{} --version printed {version:?}, not a Node version",
                path.display()
            ),
        }),
    }
}

/// `v20.6.1` -> (20, 6).
fn parse_node_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.strip_prefix('v')?.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `<temp>/kici-agent-runner-<uid>-<version>`: one directory per user and agent version.
fn runner_dir() -> PathBuf {
    let uid = geteuid().as_raw();
    std::env::temp_dir().join(format!("kici-agent-runner-{uid}-{}", crate::VERSION))
}

/// Writes the runner's files into `dir`, a directory only this user may write: a file that
/// differs from the embedded one (an older build, tampering) is replaced atomically.
fn install_runner(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(
            "the directory exists but is not a private directory of this user",
        ));
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir.join("vendor"))?;
    for (name, content) in RUNNER_FILES {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|existing| existing == content.as_bytes()) {
            continue;
        }
        let staging = dir.join(format!("{name}.{}.tmp", std::process::id()));
        std::fs::write(&staging, content)?;
        std::fs::rename(&staging, &path)?;
    }
    Ok(())
}

// --- the channel protocol (see runner/runner.mjs) ------------------------------------------------

/// Agent -> runner: the job request.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JobRequest<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    workspace: &'a Path,
    runner_dir: &'a Path,
    default_step_timeout_ms: u64,
    secrets: &'a BTreeMap<String, String>,
    job_config: &'a JobConfig,
    /// The outputs of the jobs this one needs, for `ctx.needs` / `ctx.jobOutputs`.
    upstream_job_outputs: &'a serde_json::Map<String, serde_json::Value>,
    /// Why `ctx.setSecretOutput` must fail (`{key}` stands for the output's name); absent when
    /// the run has a key to seal secret outputs with.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_output_error: Option<String>,
}

/// Agent -> runner: list the jobs of a module.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListRequest<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    workspace: &'a Path,
    runner_dir: &'a Path,
    source_file: &'a str,
}

/// Our end (async) and the runner's end (its fd 3) of a fresh channel.
fn channel_pair() -> io::Result<(tokio::net::UnixStream, std::os::unix::net::UnixStream)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    Ok((tokio::net::UnixStream::from_std(ours)?, theirs))
}

/// Agent -> runner: stop.
#[derive(Serialize)]
struct Abort {
    #[serde(rename = "type")]
    kind: &'static str,
    force: bool,
}

/// Runner -> agent.
#[derive(Debug, Deserialize)]
#[serde(tag = "type")]
enum RunnerMessage {
    #[serde(rename = "step.start")]
    StepStart {
        index: u32,
        name: String,
        kind: String,
        #[serde(default)]
        group: Option<String>,
    },
    #[serde(rename = "step.pending")]
    StepPending {
        index: u32,
        name: String,
        group: String,
    },
    #[serde(rename = "log")]
    Log { index: i64, text: String },
    #[serde(rename = "step.complete")]
    StepComplete {
        index: u32,
        name: String,
        kind: String,
        #[serde(default)]
        group: Option<String>,
        status: StepState,
        #[serde(rename = "durationMs")]
        duration_ms: u64,
        #[serde(default)]
        error: Option<RunnerError>,
        #[serde(default)]
        outputs: Option<BTreeMap<String, serde_json::Value>>,
        #[serde(default)]
        retrying: bool,
    },
    #[serde(rename = "secret.output")]
    SecretOutput {
        index: u32,
        key: String,
        value: crate::secret_outputs::SecretValue,
    },
    #[serde(rename = "job.complete")]
    JobComplete {
        status: JobState,
        #[serde(default)]
        error: Option<String>,
    },
    #[serde(rename = "jobs")]
    Jobs { workflows: Vec<WorkflowJobs> },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunnerError {
    message: String,
    #[serde(default)]
    exit_code: Option<i32>,
}

/// `hook:beforeStep` -> [`StepType::HookBeforeStep`]; anything else is a step.
fn step_type(kind: &str) -> StepType {
    serde_json::from_value(serde_json::Value::String(kind.to_owned())).unwrap_or(StepType::Step)
}

impl RunnerMessage {
    /// Forwards one message to the engine; returns the job's outcome on `job.complete`.
    async fn forward(self, io: &JobIo) -> Option<JobOutcome> {
        match self {
            RunnerMessage::StepStart {
                index,
                name,
                kind,
                group,
            } => {
                io.step_started(StepStarted {
                    index,
                    name,
                    kind: step_type(&kind),
                    group,
                })
                .await
            }
            RunnerMessage::StepPending { index, name, group } => {
                io.step_pending(index, name, group).await
            }
            RunnerMessage::Log { index, text } => io.output(index, text).await,
            RunnerMessage::StepComplete {
                index,
                name,
                kind,
                group,
                status,
                duration_ms,
                error,
                outputs,
                retrying,
            } => {
                io.step_finished(StepFinished {
                    index,
                    name,
                    kind: step_type(&kind),
                    group,
                    state: status,
                    duration_ms,
                    error: error.map(|e| StepFailure {
                        message: e.message,
                        exit_code: e.exit_code,
                    }),
                    outputs,
                    retrying,
                })
                .await
            }
            RunnerMessage::SecretOutput { index, key, value } => {
                io.secret_output(index, key, value.0).await
            }
            RunnerMessage::JobComplete { status, error } => {
                return Some(JobOutcome {
                    state: status,
                    error,
                })
            }
            // Only the reply to a list request; a job never gets one.
            RunnerMessage::Jobs { .. } => {}
        }
        None
    }
}

/// The last lines of the runner's own output.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.lines
                .push_back(String::from_utf8_lossy(&line).trim_end().to_owned());
            if self.lines.len() > CRASH_TAIL_LINES {
                self.lines.pop_front();
            }
        }
    }

    fn text(mut self) -> String {
        if !self.partial.is_empty() {
            self.push(b"\n");
        }
        Vec::from(self.lines).join("\n")
    }
}

#[async_trait::async_trait]
impl JobExecutor for TypeScriptExecutor {
    fn name(&self) -> &str {
        "typescript"
    }

    /// Node's install (the directory above its `bin`, for npm and its libraries) and the
    /// runner's files.
    fn sandbox_read_only_paths(&self) -> Vec<PathBuf> {
        let Some(Ok((node, dir))) = self.found.get() else {
            return Vec::new();
        };
        let real = std::fs::canonicalize(&node.path).unwrap_or_else(|_| node.path.clone());
        let install = real
            .parent()
            .and_then(Path::parent)
            .filter(|root| root.parent().is_some())
            .map_or(real.clone(), Path::to_path_buf);
        vec![install, dir.clone()]
    }

    async fn run_job(&self, job: &JobContext, mut env: StepEnv, io: JobIo) -> JobOutcome {
        let root = self.in_place.as_deref().unwrap_or(&job.workspace);
        if self.in_place.is_some() {
            env.set("KICI_WORKSPACE", root.display().to_string());
        }
        let (node, dir) = match self.ready().await {
            Ok(found) => found,
            Err(e) => return JobOutcome::failed(e.to_string()),
        };
        if let Err(error) = self
            .install_dependencies(root, node, &env, &io, job.deps_tarball.as_ref())
            .await
        {
            return JobOutcome::failed(error);
        }
        let (ours, theirs) = match channel_pair() {
            Ok(pair) => pair,
            Err(e) => {
                return JobOutcome::failed(format!(
                    "could not create the TypeScript runner's channel: {e}"
                ))
            }
        };
        let spec = CommandSpec {
            program: node.path.display().to_string(),
            args: vec![dir.join("runner.mjs").display().to_string()],
            cwd: root.to_path_buf(),
            env,
            stdin: None,
        };
        // In the sandbox the group's leader is bwrap, which a SIGTERM ends with the runner in
        // it, before the cancel hooks: there a graceful cancel is the channel's abort alone.
        let sandboxed = crate::containment::current().is_some_and(|p| p.sandbox.is_some());
        let limits = RunLimits {
            timeout: None,
            cancel: if sandboxed {
                tokio_util::sync::CancellationToken::new()
            } else {
                io.cancellation().clone()
            },
            force: io.force().clone(),
            kill: KillPolicy {
                grace: self.kill_grace,
            },
        };
        // What `ctx.secrets` sees: the flat secrets with every context's keys over them.
        let secrets = job.namespaced_secrets.flatten_over(&job.secrets);
        let request = JobRequest {
            kind: "job",
            workspace: root,
            runner_dir: dir,
            default_step_timeout_ms: self.default_step_timeout.as_millis() as u64,
            secrets: &secrets,
            job_config: &job.config,
            upstream_job_outputs: &job.upstream_job_outputs,
            secret_output_error: io.secret_outputs().err().map(|reason| {
                crate::secret_outputs::SecretOutputError::NoRunKey {
                    key: "{key}".into(),
                    reason,
                }
                .to_string()
            }),
        };

        let (output_tx, mut output_rx) = mpsc::channel::<Vec<u8>>(64);
        let runner = process::run_with_channel(spec, limits, output_tx, theirs.into());
        let own_output = async {
            let mut tail = Tail::default();
            while let Some(bytes) = output_rx.recv().await {
                tail.push(&bytes);
                io.output(JOB_LOG_INDEX, bytes).await;
            }
            tail
        };
        let (read_half, mut write_half) = ours.into_split();
        let talk = async {
            let Ok(mut request) = serde_json::to_vec(&request) else {
                return None;
            };
            request.push(b'\n');
            if write_half.write_all(&request).await.is_err() {
                return None;
            }
            let mut lines = BufReader::new(read_half).lines();
            let mut told = (false, false);
            let mut outcome = None;
            loop {
                tokio::select! {
                    line = lines.next_line() => match line {
                        Ok(Some(line)) => match serde_json::from_str::<RunnerMessage>(&line) {
                            Ok(message) => {
                                if let Some(done) = message.forward(&io).await {
                                    outcome = Some(done);
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "unreadable message from the TypeScript runner"),
                        },
                        Ok(None) | Err(_) => return outcome,
                    },
                    _ = io.cancellation().cancelled(), if !told.0 => {
                        told.0 = true;
                        let _ = write_abort(&mut write_half, false).await;
                    }
                    _ = io.force().cancelled(), if !told.1 => {
                        told.1 = true;
                        let _ = write_abort(&mut write_half, true).await;
                    }
                }
            }
        };
        tokio::pin!(talk);
        let exited = async { tokio::join!(runner, own_output) };
        tokio::pin!(exited);
        // The channel usually ends with the runner; a process that escaped the group could hold
        // it open, so after the exit it gets a bounded time to deliver the rest.
        let ((report, tail), completion) = tokio::select! {
            completion = &mut talk => (exited.await, completion),
            exit = &mut exited => {
                let completion = tokio::time::timeout(CHANNEL_DRAIN_LIMIT, &mut talk).await.ok().flatten();
                (exit, completion)
            }
        };
        if let Some(outcome) = completion {
            return outcome;
        }
        if io.cancellation().is_cancelled() {
            return JobOutcome {
                state: JobState::Cancelled,
                error: None,
            };
        }
        let how = match report {
            Ok(report) => format!("with {}", describe(&report.outcome)),
            Err(e) => {
                return JobOutcome::failed(format!("the TypeScript runner could not start: {e}"))
            }
        };
        let tail = tail.text();
        let mut error = format!("the TypeScript runner exited {how} before the job completed");
        if !tail.is_empty() {
            error.push_str(&format!("; its last output:\n{tail}"));
        }
        JobOutcome::failed(error)
    }
}

async fn write_abort(writer: &mut tokio::net::unix::OwnedWriteHalf, force: bool) -> io::Result<()> {
    let mut line = serde_json::to_vec(&Abort {
        kind: "abort",
        force,
    })
    .map_err(io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_versions_parse_and_compare() {
        assert_eq!(parse_node_version("v20.6.0"), Some((20, 6)));
        assert!(parse_node_version("v20.5.1").unwrap() < MIN_NODE_VERSION);
        assert!(parse_node_version("v24.0.0").unwrap() >= MIN_NODE_VERSION);
        assert_eq!(parse_node_version("20.6.0"), None);
        assert_eq!(parse_node_version("garbage"), None);
    }

    #[test]
    fn the_crash_tail_keeps_the_last_lines() {
        let mut tail = Tail::default();
        for i in 0..30 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        tail.push(b"partial");
        let text = tail.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), CRASH_TAIL_LINES);
        assert_eq!(lines[0], "line 11");
        assert_eq!(*lines.last().unwrap(), "partial");
    }

    #[test]
    fn the_runner_is_installed_privately_and_repaired() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("runner");
        install_runner(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(dir.join("runner.mjs"), "tampered").unwrap();
        install_runner(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("runner.mjs")).unwrap(),
            RUNNER_FILES[0].1
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            install_runner(&dir).is_err(),
            "a world-writable directory is refused"
        );
    }

    #[test]
    fn hook_kinds_map_to_step_types() {
        assert_eq!(step_type("hook:afterStep"), StepType::HookAfterStep);
        assert_eq!(step_type("step"), StepType::Step);
    }
}
