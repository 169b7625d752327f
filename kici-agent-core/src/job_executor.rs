//! Executors that run a whole job at once: the job engine hands them the job and drives the
//! statuses and logs from what they report.
//!
//! A per-step [`crate::Executor`] is called once per step attempt by the engine's own step
//! loop. Some runtimes own the step loop themselves: the TypeScript runner loads the workflow
//! module and runs every step of the job in one Node process, deciding order, retries, rules
//! and hooks in JavaScript. Such a [`JobExecutor`] reports each step as it goes through
//! [`JobIo`]; the engine turns that into `step.status` and `log.chunk` messages (masking,
//! capping, pacing), `stepResults` and outputs, and keeps the job-level parts it always owns:
//! workspace, checkout, job timeout, cancel and force.

use std::collections::BTreeMap;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::executor::{JobContext, StepFailure};
use crate::process::StepEnv;
use crate::protocol::{JobState, StepState, StepType};
use crate::secret_outputs::{RunKeyError, SecretValue};

/// One step (or hook pseudo-step) starting an attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStarted {
    /// The flat step index; hooks take indices past the steps, unique per job.
    pub index: u32,
    pub name: String,
    pub kind: StepType,
    /// The parallel group of a parallel child.
    pub group: Option<String>,
}

/// One step (or hook pseudo-step) attempt that ended.
#[derive(Debug, Clone, PartialEq)]
pub struct StepFinished {
    pub index: u32,
    pub name: String,
    pub kind: StepType,
    pub group: Option<String>,
    /// `success`, `failed`, `skipped` or `cancelled`.
    pub state: StepState,
    pub duration_ms: u64,
    pub error: Option<StepFailure>,
    /// The step's outputs (`data.outputs[name]`).
    pub outputs: Option<BTreeMap<String, serde_json::Value>>,
    /// Another attempt of the same step follows.
    pub retrying: bool,
}

/// What a whole-job executor reports.
#[derive(Debug)]
pub(crate) enum JobEvent {
    Started(StepStarted),
    /// A parallel child waiting for a slot.
    Pending {
        index: u32,
        name: String,
        group: String,
    },
    /// Raw output of a step (index -1: the job itself).
    Output {
        index: i64,
        bytes: Vec<u8>,
    },
    Finished(StepFinished),
    /// A step set a secret output (see [`JobIo::secret_output`]).
    SecretOutput {
        index: u32,
        key: String,
        value: SecretValue,
    },
}

/// How a whole job ended, as its executor sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub state: JobState,
    /// `job.status.data.error`.
    pub error: Option<String>,
}

impl JobOutcome {
    /// A failed job with `error`.
    pub fn failed(error: impl Into<String>) -> Self {
        JobOutcome {
            state: JobState::Failed,
            error: Some(error.into()),
        }
    }
}

/// The only way a whole-job executor reports. Cheap to clone.
#[derive(Clone)]
pub struct JobIo {
    events: mpsc::Sender<JobEvent>,
    cancel: CancellationToken,
    force: CancellationToken,
    secret_outputs: Result<(), RunKeyError>,
}

impl JobIo {
    pub(crate) fn new(
        events: mpsc::Sender<JobEvent>,
        cancel: CancellationToken,
        force: CancellationToken,
    ) -> Self {
        JobIo {
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

    /// Whether the run has a key for secret outputs (`Err`: why not). An executor should fail
    /// a step that sets one when it has none, naming the key and never the value; the engine
    /// drops such a value (masked, logged by key) anyway.
    pub fn secret_outputs(&self) -> Result<(), RunKeyError> {
        self.secret_outputs.clone()
    }

    /// Step `index` set secret output `key`: the engine masks the value from now on and seals
    /// it into `job.status.secretOutputs` (see [`crate::StepIo::set_secret_output`]).
    pub async fn secret_output(&self, index: u32, key: String, value: String) {
        let value = SecretValue(value);
        let _ = self
            .events
            .send(JobEvent::SecretOutput { index, key, value })
            .await;
    }

    /// A step attempt started (`step.status running`).
    pub async fn step_started(&self, step: StepStarted) {
        let _ = self.events.send(JobEvent::Started(step)).await;
    }

    /// A parallel child waits for a slot (`step.status pending`).
    pub async fn step_pending(&self, index: u32, name: String, group: String) {
        let _ = self
            .events
            .send(JobEvent::Pending { index, name, group })
            .await;
    }

    /// Output of step `index` (-1: job-level). Waits while the log backlog is full.
    pub async fn output(&self, index: i64, bytes: impl Into<Vec<u8>>) {
        let bytes = bytes.into();
        let _ = self.events.send(JobEvent::Output { index, bytes }).await;
    }

    /// A step attempt ended.
    pub async fn step_finished(&self, step: StepFinished) {
        let _ = self.events.send(JobEvent::Finished(step)).await;
    }

    /// Fired when the job should stop gracefully (cancel, shutdown, job timeout).
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Fired when the job must stop at once (forced cancel, grace over, job timeout).
    pub fn force(&self) -> &CancellationToken {
        &self.force
    }
}

/// An executor that runs all steps of a job itself.
#[async_trait::async_trait]
pub trait JobExecutor: Send + Sync {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// Runs the job in its workspace with the job's sanitised environment. Every step attempt
    /// is reported through `io`, with the indices of `jobConfig.steps`.
    async fn run_job(&self, job: &JobContext, env: StepEnv, io: JobIo) -> JobOutcome;

    /// Host paths the executor's processes need to see when the agent sandboxes the job
    /// (`KICI_SANDBOX`): bound read-only at the same path. None by default.
    fn sandbox_read_only_paths(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}
