//! Running one job: workspace, checkout, the step loop (sequential, parallel groups, retry,
//! timeouts, cancel), statuses in the order of spec protocol.md §5, and cleanup.
//!
//! This file is the job's face: what every job shares (`JobServices`), how the agent stops
//! one (`JobControl`), `run_job` from `running` to the terminal status, and the
//! `JobRunner` state the rooms below work on:
//! - `plan`: the flat step list with its parallel groups; retries, time limits, how an attempt
//!   ended (pure);
//! - `run`: the step loop, parallel groups, retries, the step's terminal status;
//! - `attempt`: one attempt of one step (env, hand-off files, executor, logs, timeouts);
//! - `whole`: the job-level path of a whole-job executor (the TypeScript runner);
//! - `clone`: the checkout and its credentials; `environment`: the job's base environment
//!   and its `job.context`;
//! - `masker`: the job's growing secret masker; `step_secrets`: a step's secret outputs;
//! - `end`: the drop guard that always frees the slot and queues the terminal status;
//!   `resend`: the schedule of repeated `job.status running`.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use tokio_util::sync::CancellationToken;

use crate::containment::JobContainment;
use crate::events::{Event, EventQueue};
use crate::executor::Executor;
use crate::logs::{SecretMasker, MIN_SECRET_CHARS};
use crate::metrics::Metrics;
use crate::outbox::{JobAttempt, Outbox};
use crate::process::StepEnv;
use crate::protocol::{
    new_message_id, now_ms, ConcurrencyKind, JobDispatch, JobRef, JobState, JobStatus,
    JobStatusData, Outbound, SecretOutput, StepState, StepStatus, StepStatusData, StepType,
    JOB_LOG_INDEX,
};
use crate::routing::ExecutorRegistry;
use crate::secret_outputs::{RunKeyError, SecretOutputSealer};
use crate::timeline::Timeline;

mod attempt;
mod clone;
mod end;
mod environment;
mod masker;
mod plan;
mod resend;
mod run;
mod step_secrets;
mod whole;

use end::JobEnd;
use masker::JobMasker;
use plan::StepRef;
use resend::resend_running;

/// What every job of one agent shares.
pub(crate) struct JobServices {
    pub outbox: Arc<Outbox>,
    pub metrics: Metrics,
    /// The host's executors and the agent's built-ins: who runs each job and step.
    pub executors: ExecutorRegistry,
    pub events: Arc<EventQueue>,
    pub settings: JobSettings,
}

/// Job-related settings from the agent configuration.
#[derive(Clone)]
pub(crate) struct JobSettings {
    pub max_log_size_bytes: u64,
    pub default_step_timeout: Duration,
    pub job_heartbeat_interval: Duration,
    /// SIGTERM -> SIGKILL grace of a cancel.
    pub cancel_grace: Duration,
    /// The lowest-priority clone credential (`KICI_GITHUB_TOKEN`).
    pub github_token: Option<String>,
    /// The agent's own environment, filtered into each step's by `StepEnv::from_host`.
    pub host_env: Vec<(String, String)>,
    /// Most processes a job may have at once, where a pids cgroup is available; 0 = no limit.
    pub job_pids_max: u64,
    /// Bare-metal steps run in a bubblewrap sandbox with this network (`KICI_SANDBOX`).
    pub sandbox: Option<crate::config::SandboxNetwork>,
    /// When `job.status running` is sent again after the first one.
    pub running_resends: Vec<Duration>,
    /// The agent's labels as registered, for `job.context`.
    pub labels: Vec<String>,
}

/// How the agent tells a running job to stop.
#[derive(Clone, Default)]
pub(crate) struct JobControl {
    /// Stop gracefully (cancel, shutdown).
    pub cancel: CancellationToken,
    /// Stop at once (forced cancel, or the grace ran out).
    pub force: CancellationToken,
}

/// Cap on how long we wait for an executor that ignores a forced stop.
const ABANDON_AFTER_FORCE: Duration = Duration::from_secs(5);

/// Runs one accepted job to its terminal status, queueing its messages as `attempt`. Returns
/// the terminal state.
pub(crate) async fn run_job(
    services: Arc<JobServices>,
    dispatch: Box<JobDispatch>,
    attempt: JobAttempt,
    control: JobControl,
    release: impl FnOnce() + Send,
) -> JobState {
    let started = Instant::now();
    let job_ref = dispatch.job_ref();
    let outbox = services.outbox.clone();
    outbox.push_status(
        &attempt,
        job_status(&job_ref, JobState::Running, None),
        false,
    );

    let heartbeat = {
        let outbox = outbox.clone();
        let attempt = attempt.clone();
        let period = services.settings.job_heartbeat_interval;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                ticks.tick().await;
                outbox.job_heartbeat_due(&attempt);
            }
        })
    };
    let mut end = JobEnd {
        services: services.clone(),
        job_ref: job_ref.clone(),
        attempt: attempt.clone(),
        name: dispatch.job_config.name.clone(),
        started,
        control: control.clone(),
        heartbeat: heartbeat.abort_handle(),
        release: Some(release),
    };

    let running_resends = resend_running(
        outbox.clone(),
        attempt.clone(),
        services.settings.running_resends.clone(),
    );

    let mut masker = SecretMasker::new();
    let mut secrets = dispatch.secret_values();
    secrets.extend(services.settings.github_token.as_deref());
    if let Err(e) = masker.add_all(secrets) {
        tracing::error!(error = %e, job_id = %job_ref.job_id, "secret masking is incomplete for this job");
    }
    let run = JobRunner {
        log_cap: dispatch
            .max_log_size_bytes
            .unwrap_or(services.settings.max_log_size_bytes),
        services: services.clone(),
        job_ref: job_ref.clone(),
        attempt: attempt.clone(),
        masker: JobMasker::new(masker),
        sealer: SecretOutputSealer::new(dispatch.run_public_key.as_deref()),
        control,
        state: Arc::new(Mutex::new(RunState::default())),
        job_timed_out: CancellationToken::new(),
        containment: Arc::new(JobContainment::create(services.settings.job_pids_max)),
        timeline: Timeline::new(outbox.clone(), attempt.clone()),
    };
    let outcome = match AssertUnwindSafe(run.execute(&dispatch))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(panic) => {
            // Steps it started run in their own tasks: stop them with the job.
            run.control.force.cancel();
            run.control.cancel.cancel();
            let error = format!("the job runner panicked: {}", panic_message(panic));
            tracing::error!(job_id = %job_ref.job_id, %error, "job failed");
            run.job_log(format!("[kici] {error}")).await;
            (JobState::Failed, Some(error))
        }
    };
    run.timeline.execution_end(outcome.0);
    let too_short = run.masker.current().too_short();
    if too_short > 0 {
        // Once per job, never the value.
        tracing::warn!(job_id = %job_ref.job_id, count = too_short, "secret values shorter than {MIN_SECRET_CHARS} characters are not masked");
        run.job_log(format!(
            "[kici] {too_short} secret value(s) shorter than {MIN_SECRET_CHARS} characters cannot be masked in this job's output"
        ))
        .await;
    }

    // Stopped before the terminal status is queued, so no `running` can follow it.
    for task in [heartbeat, running_resends] {
        task.abort();
        let _ = task.await;
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    let (state, error) = outcome;
    let error = error.map(|error| run.masker.mask(&error).into_owned());
    let (step_results, outputs, secret_outputs) = {
        let mut run_state = run.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut results = std::mem::take(&mut run_state.results);
        results.sort_by_key(|(index, _)| *index);
        (
            results.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
            std::mem::take(&mut run_state.outputs),
            std::mem::take(&mut run_state.secret_outputs),
        )
    };
    // The orchestrator reads secret outputs only from a successful job.
    let secret_outputs = if secret_outputs.is_empty() {
        None
    } else if state == JobState::Success {
        Some(secret_outputs)
    } else {
        run.job_log(format!(
            "[kici] {} secret output(s) not sent: the orchestrator takes them only from a successful job",
            secret_outputs.len()
        ))
        .await;
        None
    };
    let data = JobStatusData {
        duration_ms: Some(duration_ms),
        error,
        step_results: Some(step_results),
        outputs: (!outputs.is_empty()).then_some(outputs),
    };
    run.job_log(format!(
        "[kici] Job '{}' finished: {} in {duration_ms}ms",
        dispatch.job_config.name,
        state.as_str()
    ))
    .await;
    end.finish(state, data, secret_outputs);
    run.timeline.teardown();
    state
}

/// A `job.status` message of `job`.
pub(crate) fn job_status(job: &JobRef, state: JobState, data: Option<JobStatusData>) -> Outbound {
    Outbound::JobStatus(JobStatus {
        message_id: new_message_id(),
        run_id: job.run_id.clone(),
        job_id: job.job_id.clone(),
        state,
        timestamp: now_ms(),
        data,
        secret_outputs: None,
    })
}

#[derive(Default)]
struct RunState {
    results: Vec<(u32, crate::protocol::StepResult)>,
    outputs: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
    /// Sealed secret outputs by key (`job.status.secretOutputs`); a later value replaces one.
    secret_outputs: BTreeMap<String, SecretOutput>,
    env: Option<StepEnv>,
    /// Where bare-metal steps run when the agent sandboxes them (needs the workspace).
    sandbox: Option<Arc<crate::sandbox::Sandbox>>,
    prepared: Vec<Arc<dyn Executor>>,
}

struct JobRunner {
    services: Arc<JobServices>,
    /// Per-step log cap: the dispatch's `maxLogSizeBytes`, else the agent's.
    log_cap: u64,
    job_ref: JobRef,
    /// What the outbox files this job's messages under.
    attempt: JobAttempt,
    masker: JobMasker,
    /// Seals secret outputs for the run's key; `Err`: the run has none usable, and a step
    /// that sets one fails.
    sealer: Result<SecretOutputSealer, RunKeyError>,
    control: JobControl,
    state: Arc<Mutex<RunState>>,
    job_timed_out: CancellationToken,
    /// Holds every process the job's steps start, so none outlives the job.
    containment: Arc<JobContainment>,
    timeline: Timeline,
}

impl JobRunner {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn job_log(&self, line: String) {
        let line = self.masker.mask(&line).into_owned();
        self.services
            .outbox
            .push_lines(&self.attempt, JOB_LOG_INDEX, vec![line])
            .await;
    }

    /// Queues a `step.status` of `step` (the step loop's and whole-job executors' alike).
    fn send_step_status(
        &self,
        step: StepRef<'_>,
        state: StepState,
        data: Option<StepStatusData>,
        log_bytes: Option<u64>,
    ) {
        let message = Outbound::StepStatus(StepStatus {
            message_id: new_message_id(),
            run_id: self.job_ref.run_id.clone(),
            job_id: self.job_ref.job_id.clone(),
            step_index: step.index,
            step_name: step.name.to_owned(),
            state,
            timestamp: now_ms(),
            data,
            // `init` is no top-level step type (protocol.md): an init pseudo-step says so in
            // `data.stepType` alone.
            step_type: (step.kind != StepType::Init).then_some(step.kind),
            concurrency_kind: step.group.map(|_| ConcurrencyKind::ParallelChild),
            group_id: step.group.map(str::to_owned),
            log_bytes_streamed: log_bytes,
        });
        self.services
            .outbox
            .push_status(&self.attempt, message, false);
    }

    /// Tells the host a step finished (`Event::StepFinished`) and records its result for the
    /// job's `stepResults`, where a retried step keeps only its last attempt (the step loop's
    /// and whole-job executors' steps alike).
    fn step_finished(
        &self,
        index: u32,
        name: &str,
        state: StepState,
        duration_ms: u64,
        error: Option<String>,
    ) {
        self.services.events.push(Event::StepFinished {
            run_id: self.job_ref.run_id.clone(),
            job_id: self.job_ref.job_id.clone(),
            step_index: index,
            step_name: name.to_owned(),
            state,
            duration_ms,
            error: error.clone(),
        });
        let mut run_state = self.lock();
        run_state.results.retain(|(recorded, _)| *recorded != index);
        run_state.results.push((
            index,
            crate::protocol::StepResult {
                name: name.to_owned(),
                status: state,
                duration_ms,
                error,
            },
        ));
    }

    /// Queues log lines of step `index` (-1: the job), counting their bytes.
    async fn forward(&self, index: i64, lines: &mut Vec<String>) {
        if lines.is_empty() {
            return;
        }
        let bytes: usize = lines.iter().map(String::len).sum();
        self.services.metrics.log_bytes_total.inc_by(bytes as u64);
        self.services
            .outbox
            .push_lines(&self.attempt, index, std::mem::take(lines))
            .await;
    }
}

/// Waits for an executor whose output channel closed; gives up [`ABANDON_AFTER_FORCE`] after a
/// forced stop.
async fn await_execution<T>(
    execution: &mut tokio::task::JoinHandle<T>,
    force: &CancellationToken,
) -> Option<Result<T, tokio::task::JoinError>> {
    tokio::select! {
        result = &mut *execution => Some(result),
        _ = async {
            force.cancelled().await;
            tokio::time::sleep(ABANDON_AFTER_FORCE).await;
        } => {
            execution.abort();
            None
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn services() -> Arc<JobServices> {
        let metrics = Metrics::new();
        Arc::new(JobServices {
            outbox: Arc::new(Outbox::new(
                crate::outbox::OutboxLimits::default(),
                metrics.clone(),
            )),
            metrics,
            executors: ExecutorRegistry::new(),
            events: Arc::new(EventQueue::new(10)),
            settings: JobSettings {
                max_log_size_bytes: 1024,
                default_step_timeout: Duration::from_secs(60),
                job_heartbeat_interval: Duration::from_secs(30),
                cancel_grace: Duration::from_secs(1),
                github_token: None,
                host_env: Vec::new(),
                job_pids_max: 0,
                sandbox: None,
                running_resends: Vec::new(),
                labels: Vec::new(),
            },
        })
    }

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        assert_eq!(panic_message(Box::new("static")), "static");
        assert_eq!(panic_message(Box::new(String::from("owned"))), "owned");
        assert_eq!(panic_message(Box::new(42)), "unknown panic");
    }
}
