//! Step executors: what a step *does* is decided by the host, per step.
//!
//! A real dispatch carries no command for its steps (KiCI step bodies are TypeScript), so the
//! [`crate::ExecutorRegistry`] picks an [`Executor`] for each step (see [`crate::routing`] for
//! the rule). Built-ins: [`ShellExecutor`] (a `run` field on the step, or an operator step map)
//! and [`ProcessExecutor`] (an operator program that gets the step as JSON on stdin). Hosts add
//! their own in Rust, C (through the FFI) or Python.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::process::{self, CommandSpec, KillPolicy, Outcome, RunLimits, StepEnv};
use crate::protocol::{JobConfig, StepSpec};
use crate::secret_outputs::{RunKeyError, SecretOutputError, SecretValue};

/// The job as executors see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobContext {
    pub run_id: String,
    pub job_id: String,
    /// The job's name (`jobConfig.name`).
    pub name: String,
    /// The whole `jobConfig`.
    pub config: JobConfig,
    /// The job's private workspace (the checkout, if any).
    pub workspace: PathBuf,
    /// The dispatch's flat secrets. Only executors that need them should read them.
    #[serde(skip)]
    pub secrets: BTreeMap<String, String>,
    /// The dispatch's secret contexts (`namespacedSecrets`), in dispatch order.
    #[serde(skip)]
    pub namespaced_secrets: crate::protocol::NamespacedSecrets,
    /// The dispatch's pre-built workflow dependencies (`depsUrl`, `depsHash`), if any.
    #[serde(skip)]
    pub(crate) deps_tarball: Option<crate::deps::DepsTarball>,
    /// The outputs of the jobs this one `needs` (the dispatch's `upstreamJobOutputs`): job name
    /// -> step name -> outputs.
    pub upstream_job_outputs: serde_json::Map<String, serde_json::Value>,
}

impl JobContext {
    /// The dispatch's `upstreamJobOutputs` (protocol.md §4.1); empty when absent or not an
    /// object.
    pub fn upstream_job_outputs_of(
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> serde_json::Map<String, serde_json::Value> {
        match extra.get("upstreamJobOutputs") {
            Some(serde_json::Value::Object(outputs)) => outputs.clone(),
            _ => serde_json::Map::new(),
        }
    }
}

/// One step attempt as executors see it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepContext {
    /// The step's flat index (the wire `stepIndex`).
    pub index: u32,
    pub name: String,
    /// The step as the dispatch describes it.
    pub spec: StepSpec,
    /// 1-based attempt number (retries).
    pub attempt: u32,
    /// The environment the step should run with (sanitised; see `process::StepEnv`).
    #[serde(skip)]
    pub env: StepEnv,
    /// Working directory: the workspace.
    pub workspace: PathBuf,
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepFailure {
    /// Human-readable reason, sent as `data.error`.
    pub message: String,
    /// The exit code, sent as `data.exitCode`.
    pub exit_code: Option<i32>,
}

impl StepFailure {
    /// A failure with a message and no exit code.
    pub fn new(message: impl Into<String>) -> Self {
        StepFailure {
            message: message.into(),
            exit_code: None,
        }
    }

    /// A failed command: `Command failed with exit code N`.
    pub fn exit_code(code: i32) -> Self {
        StepFailure {
            message: format!("Command failed with exit code {code}"),
            exit_code: Some(code),
        }
    }
}

/// What one step attempt returns.
pub type StepResult = Result<(), StepFailure>;

/// Something a step emitted.
#[derive(Debug)]
pub(crate) enum StepEvent {
    /// Raw output bytes (split into lines, masked and capped by the log pipeline).
    Bytes(Vec<u8>),
    /// A step output (`data.outputs[step][key]`).
    Output(String, serde_json::Value),
    /// A secret output (`job.status.secretOutputs[key]`): the engine masks the value from then
    /// on and seals it, or fails the step when the run has no usable key.
    SecretOutput(String, SecretValue),
}

/// The only way a step emits log output and outputs. Cheap to clone; usable from async code
/// and, through the `blocking_*` methods, from threads outside the async runtime.
#[derive(Clone)]
pub struct StepIo {
    events: mpsc::Sender<StepEvent>,
    cancel: CancellationToken,
    force: CancellationToken,
    /// Whether the run has a key to seal secret outputs with, and if not why.
    secret_outputs: Result<(), RunKeyError>,
}

impl StepIo {
    pub(crate) fn new(
        events: mpsc::Sender<StepEvent>,
        cancel: CancellationToken,
        force: CancellationToken,
    ) -> Self {
        StepIo {
            events,
            cancel,
            force,
            secret_outputs: Err(RunKeyError::Missing),
        }
    }

    /// Secret outputs can be sealed (`Ok`), or not and why.
    pub(crate) fn with_secret_outputs(mut self, availability: Result<(), RunKeyError>) -> Self {
        self.secret_outputs = availability;
        self
    }

    /// Writes raw output (any bytes; lines are split, masked and capped downstream).
    /// Waits while the log backlog is full.
    pub async fn write(&self, bytes: impl Into<Vec<u8>>) {
        let _ = self.events.send(StepEvent::Bytes(bytes.into())).await;
    }

    /// Writes one log line.
    pub async fn line(&self, line: impl AsRef<str>) {
        self.write(with_newline(line.as_ref())).await;
    }

    /// Sets a step output.
    pub async fn set_output(&self, key: impl Into<String>, value: serde_json::Value) {
        let _ = self.events.send(StepEvent::Output(key.into(), value)).await;
    }

    /// Sets a secret output of the job: the value is sealed for the run's key (the dispatch's
    /// `runPublicKey`) and sent only in `secretOutputs` of the job's terminal `job.status`
    /// (a successful job's: the orchestrator reads them from no other), never in plain
    /// outputs; from now on it is masked in every log line of the job. A later value of the
    /// same key replaces the earlier one.
    ///
    /// Fails when the name is empty or the run has no usable key; the step then fails with
    /// the same message (it names the key, never the value), whether or not the executor
    /// returns the error.
    pub async fn set_secret_output(
        &self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), SecretOutputError> {
        let key = key.into();
        let result = self.secret_output_result(&key);
        let event = StepEvent::SecretOutput(key, SecretValue(value.into()));
        let _ = self.events.send(event).await;
        result
    }

    /// [`StepIo::set_secret_output`] for threads outside the async runtime.
    pub fn blocking_set_secret_output(
        &self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), SecretOutputError> {
        let key = key.into();
        let result = self.secret_output_result(&key);
        let event = StepEvent::SecretOutput(key, SecretValue(value.into()));
        let _ = self.events.blocking_send(event);
        result
    }

    fn secret_output_result(&self, key: &str) -> Result<(), SecretOutputError> {
        crate::secret_outputs::check_key(key)?;
        self.secret_outputs
            .clone()
            .map_err(|reason| SecretOutputError::NoRunKey {
                key: key.to_owned(),
                reason,
            })
    }

    /// [`StepIo::write`] for threads outside the async runtime (C and Python executors).
    pub fn blocking_write(&self, bytes: impl Into<Vec<u8>>) {
        let _ = self.events.blocking_send(StepEvent::Bytes(bytes.into()));
    }

    /// [`StepIo::line`] for threads outside the async runtime.
    pub fn blocking_line(&self, line: &str) {
        self.blocking_write(with_newline(line));
    }

    /// [`StepIo::set_output`] for threads outside the async runtime.
    pub fn blocking_set_output(&self, key: impl Into<String>, value: serde_json::Value) {
        let _ = self
            .events
            .blocking_send(StepEvent::Output(key.into(), value));
    }

    /// Fired when the step should stop: cancel, step timeout, job timeout or shutdown.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Fired when the step must stop at once (forced cancel, or the grace ran out).
    pub fn force(&self) -> &CancellationToken {
        &self.force
    }

    /// Whether the step was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

fn with_newline(line: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    bytes
}

/// A step executor. One instance serves many jobs and steps concurrently.
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    /// A short name for logs (`shell`, `process`, `python`, ...).
    fn name(&self) -> &str;

    /// Job-level preparation, before the first step this executor runs in the job.
    async fn prepare(&self, _job: &JobContext) -> Result<(), StepFailure> {
        Ok(())
    }

    /// Runs one step attempt. Output goes through `io`; return `Err` to fail the step. When
    /// `io.cancellation()` fires the step should stop promptly; the agent stops waiting after
    /// the grace period anyway.
    async fn run_step(&self, job: &JobContext, step: &StepContext, io: StepIo) -> StepResult;

    /// Job-level cleanup: always called after the job's steps (also after failure and cancel,
    /// not after a forced cancel), and safe to call more than once.
    async fn cleanup(&self, _job: &JobContext) {}
}

/// What the agent's built-in executor needs from its configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct BuiltinSettings {
    /// An operator program that runs every step (`KICI_PROCESS_EXECUTOR`).
    pub process_executor: Option<String>,
    /// The operator's step map, step name -> shell command (`KICI_STEP_MAP`).
    pub step_map_file: Option<PathBuf>,
    /// SIGTERM -> SIGKILL grace of a cancelled step.
    pub kill_grace: std::time::Duration,
}

impl BuiltinSettings {
    /// Whether the operator chose the built-in executor for every step (a process executor or
    /// a step map), rather than leaving it to run `run` commands only.
    pub fn chosen_by_operator(&self) -> bool {
        self.process_executor.is_some() || self.step_map_file.is_some()
    }

    /// The built-in executor: the process executor, else the shell executor with the step map.
    pub fn executor(&self) -> Result<Arc<dyn Executor>, StepMapError> {
        Ok(match &self.process_executor {
            Some(program) => Arc::new(ProcessExecutor::new(program.clone(), self.kill_grace)),
            None => {
                let step_map = match &self.step_map_file {
                    Some(path) => ShellExecutor::load_step_map(path)?,
                    None => BTreeMap::new(),
                };
                Arc::new(ShellExecutor::new(step_map, self.kill_grace))
            }
        })
    }
}

/// Runs a step's shell command with bash in the workspace. The command is the step's `run`
/// field, else the operator's step map entry for the step name.
#[derive(Debug, Clone, Default)]
pub struct ShellExecutor {
    step_map: BTreeMap<String, String>,
    kill_grace: std::time::Duration,
}

/// A step map file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StepMapError {
    #[error("step map {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("step map {path}: expected a JSON object of step name -> shell command: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl ShellExecutor {
    /// A shell executor with a step map (step name -> command) and the SIGTERM->SIGKILL grace.
    pub fn new(step_map: BTreeMap<String, String>, kill_grace: std::time::Duration) -> Self {
        ShellExecutor {
            step_map,
            kill_grace,
        }
    }

    /// Reads a step map file: a JSON object of step name -> shell command.
    pub fn load_step_map(path: &Path) -> Result<BTreeMap<String, String>, StepMapError> {
        let text = std::fs::read_to_string(path).map_err(|source| StepMapError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| StepMapError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    fn command_for<'a>(&'a self, step: &'a StepContext) -> Option<&'a str> {
        step.spec
            .run
            .as_deref()
            .or_else(|| self.step_map.get(&step.name).map(String::as_str))
    }
}

#[async_trait::async_trait]
impl Executor for ShellExecutor {
    fn name(&self) -> &str {
        "shell"
    }

    async fn run_step(&self, _job: &JobContext, step: &StepContext, io: StepIo) -> StepResult {
        let Some(command) = self.command_for(step) else {
            return Err(StepFailure::new(format!(
                "no command for step '{}': give it a `run` field or map it in the step map (KICI_STEP_MAP)",
                step.name
            )));
        };
        let spec = CommandSpec::bash(command, step.workspace.clone(), step.env.clone());
        run_command(spec, &io, self.kill_grace).await
    }
}

/// Runs every step with an operator program: the step and job context as JSON on stdin, its
/// stdout and stderr as the step log, its exit code as the result. Any language can supply steps
/// this way without linking the agent.
#[derive(Debug, Clone)]
pub struct ProcessExecutor {
    program: String,
    kill_grace: std::time::Duration,
}

impl ProcessExecutor {
    /// An executor that runs `program` (resolved on the step's PATH) for each step.
    pub fn new(program: impl Into<String>, kill_grace: std::time::Duration) -> Self {
        ProcessExecutor {
            program: program.into(),
            kill_grace,
        }
    }
}

#[async_trait::async_trait]
impl Executor for ProcessExecutor {
    fn name(&self) -> &str {
        "process"
    }

    async fn run_step(&self, job: &JobContext, step: &StepContext, io: StepIo) -> StepResult {
        let input = serde_json::json!({ "job": job, "step": step });
        let spec = CommandSpec {
            program: self.program.clone(),
            args: Vec::new(),
            cwd: step.workspace.clone(),
            env: step.env.clone(),
            stdin: Some(input.to_string().into_bytes()),
        };
        run_command(spec, &io, self.kill_grace).await
    }
}

/// Runs a command for a step, streaming its output into `io`.
pub(crate) async fn run_command(
    spec: CommandSpec,
    io: &StepIo,
    grace: std::time::Duration,
) -> StepResult {
    let (output_tx, mut output_rx) = mpsc::channel::<Vec<u8>>(64);
    let limits = RunLimits {
        timeout: None,
        cancel: io.cancellation().clone(),
        force: io.force().clone(),
        kill: KillPolicy { grace },
    };
    let program = spec.program.clone();
    let run = process::run(spec, limits, output_tx);
    let forward = async {
        while let Some(bytes) = output_rx.recv().await {
            io.write(bytes).await;
        }
    };
    let (report, ()) = tokio::join!(run, forward);
    let report = report.map_err(|e| StepFailure::new(format!("{program}: {e}")))?;
    match report.outcome {
        Outcome::Exited(process::ExitStatus::Code(0)) => Ok(()),
        Outcome::Exited(process::ExitStatus::Code(code)) => Err(StepFailure::exit_code(code)),
        Outcome::Exited(process::ExitStatus::Signal(signal)) => Err(StepFailure::new(format!(
            "Command was killed by signal {signal}"
        ))),
        Outcome::TimedOut { after, .. } => Err(StepFailure::new(format!(
            "Command timed out after {}ms",
            after.as_millis()
        ))),
        Outcome::Cancelled { forced, .. } => Err(StepFailure::new(if forced {
            "Command was killed (forced cancel)"
        } else {
            "Command was stopped (cancelled)"
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_map_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.json");
        std::fs::write(&path, "[1]").unwrap();
        let err = ShellExecutor::load_step_map(&path).unwrap_err().to_string();
        assert!(
            err.contains("map.json") && err.contains("step name"),
            "{err}"
        );
        std::fs::write(&path, r#"{"say-hello":"echo hi"}"#).unwrap();
        assert_eq!(
            ShellExecutor::load_step_map(&path).unwrap()["say-hello"],
            "echo hi"
        );
    }
}
