//! Running one job: workspace, checkout, the step loop (sequential, parallel groups, retry,
//! timeouts, cancel), statuses in the order of spec protocol.md §5, and cleanup.

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::checkout::{self, CheckoutRequest, GitCredentials, HostKeyPolicy};
use crate::containment::JobContainment;
use crate::events::{Event, EventQueue};
use crate::executor::{Executor, JobContext, StepContext, StepEvent, StepIo};
use crate::logs::{MaskerError, SecretMasker, StepLog, MIN_SECRET_CHARS};
use crate::metrics::Metrics;
use crate::outbox::{JobAttempt, Outbox};
use crate::process::{HandoffFiles, StepEnv};
use crate::protocol::{
    new_message_id, now_ms, ConcurrencyKind, GitAuthKind, JobContextDetails, JobDispatch, JobRef,
    JobState, JobStatus, JobStatusData, Outbound, SecretOutput, SshHostKeyPolicy, StepEntry,
    StepSpec, StepState, StepStatus, StepStatusData, StepType,
};
use crate::routing::{Claim, ExecutorRegistry, JobRoute, StepExecutor};
use crate::secret_outputs::{RunKeyError, SecretOutputError, SecretOutputSealer};
use crate::timeline::{ContextFacts, Timeline};

mod whole;

/// Index of job-level log lines (`log.chunk.stepIndex`).
pub const JOB_LOG_INDEX: i64 = -1;

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

/// The end of a job, guaranteed: [`JobEnd::finish`] frees the slot and queues the terminal
/// status; if the runner unwinds or is dropped before that, `Drop` does it with `failed`, so
/// neither the slot nor the orchestrator's view of the job is ever left hanging.
struct JobEnd<R: FnOnce()> {
    services: Arc<JobServices>,
    job_ref: JobRef,
    attempt: JobAttempt,
    name: String,
    started: Instant,
    control: JobControl,
    heartbeat: tokio::task::AbortHandle,
    /// `None` once the terminal status is queued.
    release: Option<R>,
}

impl<R: FnOnce()> JobEnd<R> {
    fn finish(
        &mut self,
        state: JobState,
        data: JobStatusData,
        secret_outputs: Option<BTreeMap<String, SecretOutput>>,
    ) {
        let Some(release) = self.release.take() else {
            return;
        };
        // The slot is free before the orchestrator learns the job ended: it may dispatch the
        // next job the moment the terminal status arrives.
        release();
        let error = data.error.clone();
        let duration_ms = data.duration_ms.unwrap_or_default();
        let mut status = job_status(&self.job_ref, state, Some(data));
        if let Outbound::JobStatus(status) = &mut status {
            status.secret_outputs = secret_outputs;
        }
        self.services
            .outbox
            .push_status(&self.attempt, status, true);
        self.services.metrics.job_finished(state);
        self.services.events.push(Event::JobFinished {
            run_id: self.job_ref.run_id.clone(),
            job_id: self.job_ref.job_id.clone(),
            name: self.name.clone(),
            state,
            duration_ms,
            error,
        });
    }
}

impl<R: FnOnce()> Drop for JobEnd<R> {
    fn drop(&mut self) {
        if self.release.is_none() {
            return;
        }
        self.heartbeat.abort();
        self.control.force.cancel();
        self.control.cancel.cancel();
        let error = if std::thread::panicking() {
            "the job runner panicked (the agent's log has the panic message)"
        } else {
            "the job runner was stopped before the job ended"
        };
        tracing::error!(job_id = %self.job_ref.job_id, error, "job failed");
        let data = JobStatusData {
            duration_ms: Some(self.started.elapsed().as_millis() as u64),
            error: Some(error.to_owned()),
            ..JobStatusData::default()
        };
        self.finish(JobState::Failed, data, None);
    }
}

/// Sends `job.status running` again at each of `delays` after the first one. The orchestrator
/// may arm its ack deadline only after our ack and first `running` arrived, and that `running`
/// erases the ack it had recorded (README, "Orchestrator quirks"); a later `running` resolves
/// the armed deadline. The outbox refuses a resend once `cancelling` or the terminal status
/// was queued, which ends the task.
fn resend_running(
    outbox: Arc<Outbox>,
    attempt: JobAttempt,
    mut delays: Vec<Duration>,
) -> tokio::task::JoinHandle<()> {
    delays.sort();
    tokio::spawn(async move {
        let first_sent = tokio::time::Instant::now();
        for delay in delays {
            tokio::time::sleep_until(first_sent + delay).await;
            let running = job_status(&attempt.job, JobState::Running, None);
            if !outbox.push_running_again(&attempt, running) {
                return;
            }
        }
    })
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

/// A step's place in the flat step list (spec §5.3: children of a group take consecutive
/// indices; the group takes none).
#[derive(Clone)]
struct PlannedStep {
    index: u32,
    spec: StepSpec,
}

impl PlannedStep {
    fn step_ref<'a>(&'a self, group: Option<&'a str>) -> StepRef<'a> {
        StepRef {
            index: self.index,
            name: &self.spec.name,
            kind: StepType::Step,
            group,
        }
    }
}

/// Which step (or hook pseudo-step) a `step.status` is about.
#[derive(Clone, Copy)]
struct StepRef<'a> {
    index: u32,
    name: &'a str,
    kind: StepType,
    /// The parallel group of a parallel child.
    group: Option<&'a str>,
}

enum Planned {
    Single(PlannedStep),
    Group {
        id: String,
        fail_fast: bool,
        max_parallel: Option<u32>,
        children: Vec<PlannedStep>,
    },
}

fn plan_steps(entries: &[StepEntry]) -> Vec<Planned> {
    let mut index = 0u32;
    let mut groups = 0;
    let mut next = |spec: &StepSpec| {
        let step = PlannedStep {
            index,
            spec: spec.clone(),
        };
        index += 1;
        step
    };
    entries
        .iter()
        .map(|entry| match entry {
            StepEntry::Step(spec) => Planned::Single(next(spec)),
            StepEntry::Parallel(group) => {
                let id = format!("g{groups}");
                groups += 1;
                Planned::Group {
                    id,
                    fail_fast: group.fail_fast.unwrap_or(true),
                    max_parallel: group.max_parallel.filter(|m| *m > 0),
                    children: group.children.iter().map(&mut next).collect(),
                }
            }
        })
        .collect()
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

/// The job's secret masker. It grows while the job runs (a step sets a secret output), so a
/// holder of a snapshot, such as a step's [`StepLog`], compares generations and takes the newer
/// one ([`JobMasker::refresh`]).
#[derive(Clone)]
struct JobMasker {
    inner: Arc<Mutex<(u64, SecretMasker)>>,
}

impl JobMasker {
    fn new(masker: SecretMasker) -> Self {
        JobMasker {
            inner: Arc::new(Mutex::new((0, masker))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, SecretMasker)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the masker as it is now.
    fn current(&self) -> SecretMasker {
        self.lock().1.clone()
    }

    /// The current masker and its generation, for [`JobMasker::refresh`].
    fn snapshot(&self) -> (u64, SecretMasker) {
        self.lock().clone()
    }

    /// `text` masked with every secret known so far.
    fn mask<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        self.current().mask(text)
    }

    /// Adds a secret value for the rest of the job.
    fn add(&self, value: &str) -> Result<(), MaskerError> {
        let mut guard = self.lock();
        let before = guard.1.clone();
        guard.1.add(value)?;
        if !before.is_same(&guard.1) {
            guard.0 += 1;
        }
        Ok(())
    }

    /// Gives `log` the current masker when it changed since generation `seen`.
    fn refresh(&self, log: &mut StepLog, seen: &mut u64) {
        let guard = self.lock();
        if guard.0 != *seen {
            *seen = guard.0;
            log.set_masker(guard.1.clone());
        }
    }
}

/// The secret outputs one step attempt set, not sealed yet.
#[derive(Default)]
struct SecretOutputs {
    /// By key, the last value winning.
    values: BTreeMap<String, String>,
    /// The first that cannot be sent for its own fault (an empty name).
    refused: Option<SecretOutputError>,
    /// Size of `$KICI_SECRET_OUTPUT` when last read.
    file_len: u64,
    /// Values already given to the masker (a short value would be counted again).
    masked: HashSet<String>,
}

impl SecretOutputs {
    /// Takes one secret output; its value is masked in the job's logs from now on.
    fn push(&mut self, key: String, value: String, masker: &JobMasker) {
        self.mask(&value, masker);
        match crate::secret_outputs::check_key(&key) {
            Ok(()) => {
                self.values.insert(key, value);
            }
            Err(refusal) => {
                self.refused.get_or_insert(refusal);
            }
        }
    }

    /// Masks the values the step wrote to `$KICI_SECRET_OUTPUT` so far (the file is read
    /// again only when it grew or shrank); they are collected at the end of the step.
    fn watch_file(&mut self, handoff: &HandoffFiles, masker: &JobMasker) {
        let len = std::fs::metadata(handoff.secret_output_file()).map_or(0, |m| m.len());
        if len == self.file_len {
            return;
        }
        self.file_len = len;
        if let Ok(values) = handoff.read_secret_outputs() {
            for (_, value) in values {
                self.mask(&value, masker);
            }
        }
    }

    fn mask(&mut self, value: &str, masker: &JobMasker) {
        if !self.masked.insert(value.to_owned()) {
            return;
        }
        if let Err(e) = masker.add(value) {
            tracing::error!(error = %e, "a secret output's value cannot be masked");
        }
    }
}

/// How a step ended, for the loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StepEnd {
    Success,
    Failed { continue_on_error: bool },
    Cancelled,
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

    /// Everything between `running` and the terminal status. Returns the terminal state and
    /// `data.error`.
    async fn execute(&self, dispatch: &JobDispatch) -> (JobState, Option<String>) {
        let config = &dispatch.job_config;
        if let Some(kind) = config.internal_kind() {
            let error = format!(
                "this agent cannot run KiCI {kind} jobs: they need the Node agent's TypeScript runtime (advertise no kici:role:* label on this agent)"
            );
            self.job_log(format!("[kici] {error}")).await;
            return (JobState::Failed, Some(error));
        }
        if let Some(request) = &dispatch.request_id {
            self.job_log(format!("Run: {} | Trace: {request}", dispatch.run_id))
                .await;
        }
        let workspace = match crate::workspace::create() {
            Ok(dir) => dir,
            Err(e) => {
                let error = format!("could not create the job workspace: {e}");
                self.job_log(format!("[kici] {error}")).await;
                return (JobState::Failed, Some(error));
            }
        };
        self.timeline
            .execution_start(self.job_context(dispatch, workspace.path()));
        let deadline = config.timeout.filter(|ms| *ms > 0).map(|ms| {
            let token = self.job_timed_out.clone();
            let control = self.control.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                token.cancel();
                control.force.cancel();
                control.cancel.cancel();
            })
        });

        let outcome = self
            .execute_in(dispatch, workspace.path().to_path_buf())
            .await;

        if let Some(deadline) = deadline {
            deadline.abort();
        }
        // Before the workspace goes: what the job left running may still write into it.
        let containment = self.containment.clone();
        match tokio::task::spawn_blocking(move || containment.kill_all()).await {
            Ok(0) => {}
            Ok(killed) => {
                self.job_log(format!(
                    "[kici] Killed {killed} process(es) the job left running"
                ))
                .await
            }
            Err(error) => tracing::error!(%error, "the job's leftover-process cleanup failed"),
        }
        let workspace_path = workspace.path().to_path_buf();
        let removal = tokio::task::spawn_blocking(move || workspace.close()).await;
        if !matches!(removal, Ok(Ok(()))) {
            tracing::warn!(path = %workspace_path.display(), "could not remove the job workspace");
        }
        if self.job_timed_out.is_cancelled() {
            let ms = config.timeout.unwrap_or_default();
            let error = format!("job_timeout: job exceeded its timeout of {ms}ms");
            self.job_log(format!(
                "[kici] Job exceeded its timeout of {ms}ms (job_timeout); aborting."
            ))
            .await;
            return (JobState::Failed, Some(error));
        }
        outcome
    }

    async fn execute_in(
        &self,
        dispatch: &JobDispatch,
        workspace: PathBuf,
    ) -> (JobState, Option<String>) {
        let config = &dispatch.job_config;
        let wants_checkout = config.checkout != Some(false) && !dispatch.repo_url.is_empty();
        if wants_checkout {
            let clone_started = self.timeline.clone_start();
            let cloned = self.checkout(dispatch, &workspace).await;
            self.timeline.clone_end(clone_started, cloned.is_ok());
            if let Err(error) = cloned {
                let error = self.masker.mask(&error).into_owned();
                self.job_log(format!("[kici] {error}")).await;
                return if self.control.cancel.is_cancelled() {
                    (JobState::Cancelled, None)
                } else {
                    (JobState::Failed, Some(error))
                };
            }
        }
        if self.control.cancel.is_cancelled() {
            return (JobState::Cancelled, None);
        }

        let route = match self.services.executors.route_job(config) {
            Ok(route) => route,
            Err(error) => {
                self.job_log(format!("[kici] {error}")).await;
                return (JobState::Failed, Some(error));
            }
        };
        {
            let mut state = self.lock();
            state.env = Some(self.base_env(dispatch, &workspace));
            state.sandbox =
                self.services.settings.sandbox.map(|network| {
                    Arc::new(crate::sandbox::Sandbox::new(network, workspace.clone()))
                });
        }
        let context = JobContext {
            run_id: dispatch.run_id.clone(),
            job_id: dispatch.job_id.clone(),
            name: config.name.clone(),
            config: config.clone(),
            workspace,
            secrets: dispatch.secrets.clone().unwrap_or_default(),
            namespaced_secrets: dispatch.namespaced_secrets.clone().unwrap_or_default(),
            deps_tarball: crate::deps::DepsTarball::from_dispatch(&dispatch.extra),
            upstream_job_outputs: JobContext::upstream_job_outputs_of(&dispatch.extra),
        };
        let in_container = match route {
            JobRoute::Steps { image } => image.is_some(),
            JobRoute::TypeScript(runner) => {
                if let Err(unavailable) = runner.available().await {
                    let error = unavailable.to_string();
                    self.job_log(format!("[kici] {error}")).await;
                    return (JobState::Failed, Some(error));
                }
                return self.run_whole_job(&context, runner).await;
            }
        };

        let mut failed_step: Option<String> = None;
        let mut stopped = false;
        for planned in plan_steps(&config.steps) {
            if stopped {
                break;
            }
            match planned {
                Planned::Single(step) => {
                    let name = step.spec.name.clone();
                    match self
                        .run_step(&context, in_container, step, None, &self.control.cancel)
                        .await
                    {
                        StepEnd::Success => {}
                        StepEnd::Failed { continue_on_error } => {
                            // The step that stopped the job names the error; else the first.
                            if !continue_on_error || failed_step.is_none() {
                                failed_step = Some(name);
                            }
                            stopped = !continue_on_error;
                        }
                        StepEnd::Cancelled => stopped = true,
                    }
                }
                Planned::Group {
                    id,
                    fail_fast,
                    max_parallel,
                    children,
                } => {
                    if let Some(name) = self
                        .run_group(
                            &context,
                            in_container,
                            &id,
                            fail_fast,
                            max_parallel,
                            children,
                        )
                        .await
                    {
                        failed_step = Some(name);
                        stopped = true;
                    }
                }
            }
        }

        // After a forced stop cleanup still runs, bounded: a job container must not outlive
        // its job.
        let forced = self.control.force.is_cancelled();
        let prepared = std::mem::take(&mut self.lock().prepared);
        for executor in prepared {
            if !forced {
                executor.cleanup(&context).await;
            } else if tokio::time::timeout(ABANDON_AFTER_FORCE, executor.cleanup(&context))
                .await
                .is_err()
            {
                tracing::warn!(
                    executor = executor.name(),
                    "cleanup after a forced stop did not finish in time"
                );
            }
        }
        if self.control.cancel.is_cancelled() && !self.job_timed_out.is_cancelled() {
            return (JobState::Cancelled, None);
        }
        match failed_step {
            Some(name) => (JobState::Failed, Some(format!("Step '{name}' failed"))),
            None => (JobState::Success, None),
        }
    }

    /// Runs a parallel group; returns the name of the child that failed the group, if any.
    async fn run_group(
        &self,
        context: &JobContext,
        in_container: bool,
        group_id: &str,
        fail_fast: bool,
        max_parallel: Option<u32>,
        children: Vec<PlannedStep>,
    ) -> Option<String> {
        let window = max_parallel.map_or(children.len(), |m| m as usize).max(1);
        let slots = Arc::new(Semaphore::new(window));
        let stop = self.control.cancel.child_token();
        for child in children.iter().skip(window) {
            self.send_step_status(
                child.step_ref(Some(group_id)),
                StepState::Pending,
                None,
                None,
            );
        }
        let runs = children.into_iter().map(|child| {
            let slots = slots.clone();
            let stop = stop.clone();
            async move {
                let name = child.spec.name.clone();
                let _slot = slots.acquire().await;
                let end = self
                    .run_step(context, in_container, child, Some(group_id), &stop)
                    .await;
                if fail_fast
                    && matches!(
                        end,
                        StepEnd::Failed {
                            continue_on_error: false
                        }
                    )
                {
                    stop.cancel();
                }
                (name, end)
            }
        });
        let ends = futures_util::future::join_all(runs).await;
        ends.into_iter()
            .find(|(_, end)| {
                matches!(
                    end,
                    StepEnd::Failed {
                        continue_on_error: false
                    }
                )
            })
            .map(|(name, _)| name)
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

    /// The executor of a step, from the registry's rule; says so in the job log when a host
    /// executor takes a step out of the job's container.
    async fn executor_for(
        &self,
        context: &JobContext,
        in_container: bool,
        step: &str,
    ) -> Option<StepExecutor> {
        let picked = self
            .services
            .executors
            .step_executor(&context.name, in_container, step)?;
        if in_container && matches!(picked.claim, Claim::Step | Claim::Job) {
            self.job_log(format!(
                "[kici] Step '{step}' runs on this host with executor '{}' ({}), not in the job's container",
                picked.executor.name(),
                picked.claim.describe()
            ))
            .await;
        }
        Some(picked)
    }

    /// Runs one step with its retries; reports every attempt.
    async fn run_step(
        &self,
        context: &JobContext,
        in_container: bool,
        step: PlannedStep,
        group: Option<&str>,
        stop: &CancellationToken,
    ) -> StepEnd {
        let name = step.spec.name.clone();
        let continue_on_error = step.spec.continue_on_error == Some(true);
        let max_attempts = step.spec.retry.as_ref().map_or(1, |r| r.max_attempts());
        let executor = self
            .executor_for(context, in_container, &name)
            .await
            .map(|picked| picked.executor);
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            if stop.is_cancelled() {
                // Never launched (fail-fast sibling or cancel): running then cancelled, 0 ms.
                self.send_step_status(step.step_ref(group), StepState::Running, None, None);
                self.finish_step(&step, group, StepState::Cancelled, None, None, 0, 0);
                self.services
                    .metrics
                    .step_finished(StepState::Cancelled, 0.0);
                return StepEnd::Cancelled;
            }
            self.send_step_status(step.step_ref(group), StepState::Running, None, None);
            let (state, failure, log_bytes) = match &executor {
                None => (
                    StepState::Failed,
                    Some(crate::executor::StepFailure::new(format!(
                        "no executor for step '{name}' of job '{}': register one for the step, the job, or a default",
                        context.name
                    ))),
                    0,
                ),
                Some(executor) => self.attempt(context, &step, executor, attempt, stop).await,
            };
            let duration_ms = started.elapsed().as_millis() as u64;
            let error = failure
                .as_ref()
                .map(|f| self.masker.mask(&f.message).into_owned());
            let exit_code = failure.as_ref().and_then(|f| f.exit_code);
            self.finish_step(
                &step,
                group,
                state,
                error.clone(),
                exit_code,
                duration_ms,
                log_bytes,
            );
            let retrying =
                state == StepState::Failed && attempt < max_attempts && !stop.is_cancelled();
            if !retrying {
                // Live, once per step: its final attempt is its result.
                self.services
                    .metrics
                    .step_finished(state, duration_ms as f64 / 1000.0);
            }
            match state {
                StepState::Success => return StepEnd::Success,
                StepState::Failed if retrying => {
                    let delay = step
                        .spec
                        .retry
                        .as_ref()
                        .map_or(0, |r| r.delay_after(attempt));
                    self.job_log(format!(
                        "[kici] Step '{name}' attempt {attempt}/{max_attempts} failed: {}; retrying in {delay}ms",
                        error.unwrap_or_default()
                    ))
                    .await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                        _ = stop.cancelled() => {}
                    }
                    attempt += 1;
                }
                StepState::Failed => return StepEnd::Failed { continue_on_error },
                _ => return StepEnd::Cancelled,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &self,
        step: &PlannedStep,
        group: Option<&str>,
        state: StepState,
        error: Option<String>,
        exit_code: Option<i32>,
        duration_ms: u64,
        log_bytes: u64,
    ) {
        let data = StepStatusData {
            duration_ms: Some(duration_ms),
            error: error.clone(),
            exit_code,
            step_type: None,
        };
        self.send_step_status(step.step_ref(group), state, Some(data), Some(log_bytes));
        self.services.events.push(Event::StepFinished {
            run_id: self.job_ref.run_id.clone(),
            job_id: self.job_ref.job_id.clone(),
            step_index: step.index,
            step_name: step.spec.name.clone(),
            state,
            duration_ms,
            error: error.clone(),
        });
        let mut run_state = self.lock();
        // A retried step keeps only its last attempt in stepResults.
        run_state.results.retain(|(index, _)| *index != step.index);
        run_state.results.push((
            step.index,
            crate::protocol::StepResult {
                name: step.spec.name.clone(),
                status: state,
                duration_ms,
                error,
            },
        ));
    }

    /// One attempt of a step: env and hand-off files, executor, log forwarding, timeout.
    async fn attempt(
        &self,
        context: &JobContext,
        step: &PlannedStep,
        executor: &Arc<dyn Executor>,
        attempt: u32,
        stop: &CancellationToken,
    ) -> (StepState, Option<crate::executor::StepFailure>, u64) {
        use crate::executor::StepFailure;
        let name = &step.spec.name;
        if let Err(failure) = self.prepare_once(context, executor).await {
            return (StepState::Failed, Some(failure), 0);
        }
        let handoff = match HandoffFiles::create(None) {
            Ok(files) => files,
            Err(e) => {
                return (
                    StepState::Failed,
                    Some(StepFailure::new(format!(
                        "could not create $KICI_ENV files: {e}"
                    ))),
                    0,
                )
            }
        };
        let mut env = self
            .lock()
            .env
            .clone()
            .unwrap_or_else(|| StepEnv::from_host(Vec::new()));
        if let Some(step_env) = &step.spec.env {
            env.extend(step_env.clone());
        }
        env.set("KICI_STEP_NAME", name.clone());
        handoff.apply_to(&mut env);
        let step_context = StepContext {
            index: step.index,
            name: name.clone(),
            spec: step.spec.clone(),
            attempt,
            env,
            workspace: context.workspace.clone(),
        };

        let cancel = stop.child_token();
        let force = self.control.force.child_token();
        let (events_tx, mut events_rx) = mpsc::channel::<StepEvent>(64);
        let io = StepIo::new(events_tx, cancel.clone(), force.clone())
            .with_secret_outputs(self.sealer.as_ref().map(|_| ()).map_err(Clone::clone));
        let mut execution = {
            let executor = executor.clone();
            let job = context.clone();
            let step_context = step_context.clone();
            let policy = crate::containment::SpawnPolicy {
                containment: self.containment.clone(),
                sandbox: self.lock().sandbox.clone(),
            };
            tokio::spawn(crate::containment::scope(policy, async move {
                executor.run_step(&job, &step_context, io).await
            }))
        };

        let timeout = Duration::from_millis(
            step.spec
                .timeout
                .unwrap_or(self.services.settings.default_step_timeout.as_millis() as u64),
        );
        let timeout_grace = self
            .services
            .settings
            .cancel_grace
            .min(Duration::from_secs(10));
        let timer = tokio::time::sleep(timeout);
        tokio::pin!(timer);
        let mut timed_out = false;
        let mut abandon_at: Option<tokio::time::Instant> = None;
        let (mut masker_seen, masker) = self.masker.snapshot();
        let mut log = StepLog::new(masker, self.log_cap);
        let mut outputs: Vec<(String, serde_json::Value)> = Vec::new();
        let mut secret_outputs = SecretOutputs::default();
        let mut lines = Vec::new();
        let joined = loop {
            tokio::select! {
                event = events_rx.recv() => match event {
                    Some(StepEvent::Bytes(bytes)) => {
                        // A value the step wrote to $KICI_SECRET_OUTPUT before this output is
                        // masked in it.
                        secret_outputs.watch_file(&handoff, &self.masker);
                        self.masker.refresh(&mut log, &mut masker_seen);
                        log.push_bytes(&bytes, &mut lines);
                        self.forward(i64::from(step.index), &mut lines).await;
                    }
                    Some(StepEvent::Output(key, value)) => outputs.push((key, value)),
                    Some(StepEvent::SecretOutput(key, value)) => {
                        secret_outputs.push(key, value.0, &self.masker);
                    }
                    // Every sender is gone: only the join is left to wait for.
                    None => {
                        break await_execution(&mut execution, &force).await;
                    }
                },
                result = &mut execution => break Some(result),
                _ = &mut timer, if !timed_out => {
                    timed_out = true;
                    cancel.cancel();
                    let force = force.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(timeout_grace).await;
                        force.cancel();
                    });
                }
                _ = force.cancelled(), if abandon_at.is_none() => {
                    abandon_at = Some(tokio::time::Instant::now() + ABANDON_AFTER_FORCE);
                }
                _ = tokio::time::sleep_until(abandon_at.unwrap_or_else(tokio::time::Instant::now)), if abandon_at.is_some() => {
                    execution.abort();
                    break None;
                }
            }
        };
        // Whatever the executor wrote before it returned is still in the channel.
        events_rx.close();
        while let Some(event) = events_rx.recv().await {
            match event {
                StepEvent::Bytes(bytes) => {
                    secret_outputs.watch_file(&handoff, &self.masker);
                    self.masker.refresh(&mut log, &mut masker_seen);
                    log.push_bytes(&bytes, &mut lines);
                }
                StepEvent::Output(key, value) => outputs.push((key, value)),
                StepEvent::SecretOutput(key, value) => {
                    secret_outputs.push(key, value.0, &self.masker)
                }
            }
        }
        log.finish(&mut lines);
        self.forward(i64::from(step.index), &mut lines).await;
        let log_bytes = log.bytes_streamed();

        self.apply_handoff(&handoff, name, &mut outputs, &mut secret_outputs)
            .await;
        let refused = self.seal_secret_outputs(secret_outputs);
        for key in self.masker.current().mask_outputs(&mut outputs) {
            self.job_log(format!(
                "[kici] Output '{key}' of step '{name}' holds a secret; it is sent masked"
            ))
            .await;
        }
        if !outputs.is_empty() {
            let mut run_state = self.lock();
            let entry = run_state.outputs.entry(name.clone()).or_default();
            entry.extend(outputs);
        }

        let result = match joined {
            Some(Ok(result)) => result,
            Some(Err(e)) if e.is_panic() => Err(StepFailure::new(format!(
                "executor '{}' panicked: {}",
                executor.name(),
                panic_message(e.into_panic())
            ))),
            Some(Err(_)) | None => Err(StepFailure::new(format!(
                "executor '{}' did not stop when asked to",
                executor.name()
            ))),
        };
        // A secret output that cannot be sent fails a step that would have succeeded; a step
        // that failed anyway keeps its own error and the refusal goes to the job log.
        let result = match (result, refused) {
            (Ok(()), Some(refusal)) => Err(StepFailure::new(refusal.to_string())),
            (Err(failure), Some(refusal)) => {
                self.job_log(format!("[kici] Step '{name}': {refusal}"))
                    .await;
                Err(failure)
            }
            (result, None) => result,
        };
        if self.job_timed_out.is_cancelled() {
            return (
                StepState::Failed,
                Some(StepFailure::new(format!(
                    "Step '{name}' aborted: job timeout exceeded"
                ))),
                log_bytes,
            );
        }
        if stop.is_cancelled() {
            return (StepState::Cancelled, None, log_bytes);
        }
        if timed_out {
            return (
                StepState::Failed,
                Some(StepFailure::new(format!(
                    "Step '{name}' timed out after {}ms",
                    timeout.as_millis()
                ))),
                log_bytes,
            );
        }
        match result {
            Ok(()) => (StepState::Success, None, log_bytes),
            Err(failure) => (StepState::Failed, Some(failure), log_bytes),
        }
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

    async fn prepare_once(
        &self,
        context: &JobContext,
        executor: &Arc<dyn Executor>,
    ) -> Result<(), crate::executor::StepFailure> {
        let already = self
            .lock()
            .prepared
            .iter()
            .any(|e| Arc::ptr_eq(e, executor));
        if already {
            return Ok(());
        }
        executor.prepare(context).await?;
        self.lock().prepared.push(executor.clone());
        Ok(())
    }

    /// Applies `$KICI_ENV` / `$KICI_PATH` to later steps and collects `$KICI_OUTPUT` and
    /// `$KICI_SECRET_OUTPUT`.
    async fn apply_handoff(
        &self,
        handoff: &HandoffFiles,
        step: &str,
        outputs: &mut Vec<(String, serde_json::Value)>,
        secret_outputs: &mut SecretOutputs,
    ) {
        let mut delta = match handoff.read_delta() {
            Ok(delta) => delta,
            Err(e) => {
                self.job_log(format!(
                    "[kici] Failed to apply $KICI_ENV/$KICI_PATH delta of step '{step}': {e}"
                ))
                .await;
                return;
            }
        };
        outputs.extend(
            delta
                .outputs
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))),
        );
        for (key, value) in std::mem::take(&mut delta.secret_outputs) {
            secret_outputs.push(key, value, &self.masker);
        }
        let refused = {
            let mut run_state = self.lock();
            let protected: HashSet<&str> =
                ["KICI_ENV", "KICI_PATH", "KICI_OUTPUT", "KICI_SECRET_OUTPUT"].into();
            match run_state.env.as_mut() {
                Some(env) => delta.apply(env, &|key| protected.contains(key)),
                None => Vec::new(),
            }
        };
        for key in refused {
            self.job_log(format!(
                "[kici] Cannot override operator secret \"{key}\" via $KICI_ENV — value preserved"
            ))
            .await;
        }
    }

    /// Seals a step's secret outputs into the job's; returns why they cannot be sent, if so.
    fn seal_secret_outputs(&self, outputs: SecretOutputs) -> Option<SecretOutputError> {
        let sealer = match &self.sealer {
            Ok(sealer) => sealer,
            Err(reason) => {
                return outputs
                    .values
                    .into_iter()
                    .next()
                    .map(|(key, _)| SecretOutputError::NoRunKey {
                        key,
                        reason: reason.clone(),
                    })
                    .or(outputs.refused)
            }
        };
        if !outputs.values.is_empty() {
            let mut run_state = self.lock();
            for (key, value) in outputs.values {
                run_state.secret_outputs.insert(key, sealer.seal(&value));
            }
        }
        outputs.refused
    }

    /// The `context` of the job's `job.context`.
    fn job_context(
        &self,
        dispatch: &JobDispatch,
        workspace: &std::path::Path,
    ) -> JobContextDetails {
        let env = self.base_env(dispatch, workspace);
        let in_container = self
            .services
            .executors
            .container_image(&dispatch.job_config)
            .is_some();
        ContextFacts {
            env: &env,
            config: &dispatch.job_config,
            secret_names: dispatch
                .secrets
                .iter()
                .flat_map(|s| s.keys().cloned())
                .collect(),
            host_env: &self.services.settings.host_env,
            masker: &self.masker.current(),
            sandbox_type: if in_container {
                "container"
            } else {
                "bare-metal"
            },
            labels: &self.services.settings.labels,
            working_directory: workspace.display().to_string(),
            git_ref: &dispatch.git_ref,
        }
        .details()
    }

    fn base_env(&self, dispatch: &JobDispatch, workspace: &std::path::Path) -> StepEnv {
        let config = &dispatch.job_config;
        let mut env = StepEnv::from_host(self.services.settings.host_env.clone());
        // Our documented extension, lowest precedence: the layers below may override it.
        env.set("KICI_RUN_ID", dispatch.run_id.clone());
        env.set("KICI_JOB_ID", dispatch.job_id.clone());
        env.set("KICI_JOB_NAME", config.name.clone());
        if let Some(workflow) = &config.workflow_name {
            env.set("KICI_WORKFLOW_NAME", workflow.clone());
        }
        env.set("KICI_REF", dispatch.git_ref.clone());
        env.set("KICI_SHA", dispatch.sha.clone());
        env.set("KICI_WORKSPACE", workspace.display().to_string());
        for layer in [&config.env, &config.environment_vars, &config.job_env]
            .into_iter()
            .flatten()
        {
            env.extend(layer.clone());
        }
        env
    }

    async fn checkout(
        &self,
        dispatch: &JobDispatch,
        workspace: &std::path::Path,
    ) -> Result<(), String> {
        let credentials =
            clone_credentials(dispatch, self.services.settings.github_token.as_deref());
        let repo_url = dispatch.repo_url.clone();
        let git_ref = dispatch.git_ref.clone();
        let sha = dispatch.sha.clone();
        let dest = workspace.to_path_buf();
        let cancel = self.control.cancel.clone();
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<String>();
        let clone = tokio::task::spawn_blocking(move || {
            let request = CheckoutRequest {
                repo_url: &repo_url,
                git_ref: &git_ref,
                sha: &sha,
                credentials: credentials.as_ref(),
            };
            let is_cancelled = || cancel.is_cancelled();
            let mut progress = |line: &str| {
                let _ = progress_tx.send(line.to_owned());
            };
            checkout::checkout(&request, &dest, &is_cancelled, &mut progress)
        });
        tokio::pin!(clone);
        let result = loop {
            tokio::select! {
                Some(line) = progress_rx.recv() => self.job_log(format!("[kici] {line}")).await,
                result = &mut clone => break result,
            }
        };
        while let Ok(line) = progress_rx.try_recv() {
            self.job_log(format!("[kici] {line}")).await;
        }
        match result {
            Ok(Ok(report)) => {
                self.services
                    .metrics
                    .clone_duration_seconds
                    .observe(report.duration.as_secs_f64());
                Ok(())
            }
            Ok(Err(e)) => Err(format!("Checkout failed: {e}")),
            Err(e) => Err(format!(
                "Checkout failed: the clone task ended abnormally: {e}"
            )),
        }
    }
}

/// Clone credentials in priority order: `sourceAuth`, the legacy `token`, then the agent's
/// `KICI_GITHUB_TOKEN` (spec agent.md §9.2).
fn clone_credentials(dispatch: &JobDispatch, github_token: Option<&str>) -> Option<GitCredentials> {
    if let Some(auth) = &dispatch.source_auth {
        return Some(match auth.kind {
            GitAuthKind::Basic => GitCredentials::Basic {
                user: auth.user.clone().unwrap_or_else(|| "x-access-token".into()),
                secret: auth.secret.clone(),
            },
            GitAuthKind::Ssh => GitCredentials::Ssh {
                user: auth.user.clone(),
                private_key: auth.secret.clone(),
                host_key: match (auth.ssh_host_key_policy, &auth.ssh_known_hosts_pem) {
                    (Some(SshHostKeyPolicy::Pinned), Some(known)) => HostKeyPolicy::Pinned {
                        known_hosts: known.clone(),
                    },
                    (Some(SshHostKeyPolicy::Pinned), None) => HostKeyPolicy::Pinned {
                        known_hosts: String::new(),
                    },
                    _ => HostKeyPolicy::AcceptNew,
                },
            },
        });
    }
    dispatch
        .token
        .as_deref()
        .or(github_token)
        .map(|secret| GitCredentials::Basic {
            user: "x-access-token".into(),
            secret: secret.to_owned(),
        })
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
    use std::sync::atomic::{AtomicBool, Ordering};

    fn services() -> Arc<JobServices> {
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

    fn entries(steps: serde_json::Value) -> Vec<StepEntry> {
        serde_json::from_value(steps).unwrap()
    }

    /// `(index, name)` of a planned single step, or the group's id, flags and children.
    fn described(planned: &[Planned]) -> Vec<String> {
        planned
            .iter()
            .map(|p| match p {
                Planned::Single(step) => format!("{} {}", step.index, step.spec.name),
                Planned::Group {
                    id,
                    fail_fast,
                    max_parallel,
                    children,
                } => format!(
                    "{id} failFast={fail_fast} maxParallel={max_parallel:?} [{}]",
                    children
                        .iter()
                        .map(|c| format!("{} {}", c.index, c.spec.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect()
    }

    #[test]
    fn plan_steps_numbers_parallel_children_inline_and_groups_take_no_index() {
        let planned = plan_steps(&entries(serde_json::json!([
            {"name": "checkout"},
            {"kind": "parallel", "name": "checks", "children": [{"name": "lint"}, {"name": "unit"}]},
            {"name": "package"},
            {"kind": "parallel", "name": "deploy", "failFast": false, "maxParallel": 1,
             "children": [{"name": "eu"}, {"name": "us"}]}
        ])));
        assert_eq!(
            described(&planned),
            [
                "0 checkout",
                "g0 failFast=true maxParallel=None [1 lint, 2 unit]",
                "3 package",
                "g1 failFast=false maxParallel=Some(1) [4 eu, 5 us]",
            ]
        );
    }

    #[test]
    fn plan_steps_treats_max_parallel_zero_as_no_limit() {
        let planned = plan_steps(&entries(serde_json::json!([
            {"kind": "parallel", "name": "g", "maxParallel": 0, "children": [{"name": "a"}]}
        ])));
        assert_eq!(
            described(&planned),
            ["g0 failFast=true maxParallel=None [0 a]"]
        );
        assert!(plan_steps(&[]).is_empty());
    }

    #[test]
    fn a_planned_step_reports_as_a_step_of_its_group() {
        let planned = plan_steps(&entries(serde_json::json!([{"name": "a"}])));
        let Planned::Single(step) = &planned[0] else {
            panic!("a single step");
        };
        let reported = step.step_ref(Some("g3"));
        assert_eq!(
            (reported.index, reported.name, reported.kind, reported.group),
            (0, "a", StepType::Step, Some("g3"))
        );
    }

    fn dispatch(extra: serde_json::Value) -> JobDispatch {
        let mut value: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/real-orchestrator/job.dispatch.json"
        ))
        .unwrap();
        for (key, field) in extra.as_object().unwrap() {
            value[key] = field.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    fn basic(user: &str, secret: &str) -> Option<GitCredentials> {
        Some(GitCredentials::Basic {
            user: user.into(),
            secret: secret.into(),
        })
    }

    #[test]
    fn clone_credentials_prefer_source_auth_then_the_token_then_the_agents_github_token() {
        let none = dispatch(serde_json::json!({}));
        assert!(clone_credentials(&none, None).is_none());
        assert!(
            clone_credentials(&none, Some("ghp_agent")) == basic("x-access-token", "ghp_agent")
        );
        let token = dispatch(serde_json::json!({"token": "ghs_dispatch"}));
        assert!(
            clone_credentials(&token, Some("ghp_agent")) == basic("x-access-token", "ghs_dispatch")
        );
        let source_auth = dispatch(serde_json::json!({
            "token": "ghs_dispatch",
            "sourceAuth": {"kind": "basic", "secret": "from-source-auth"}
        }));
        assert!(
            clone_credentials(&source_auth, Some("ghp_agent"))
                == basic("x-access-token", "from-source-auth")
        );
        let with_user = dispatch(serde_json::json!({
            "sourceAuth": {"kind": "basic", "user": "bot", "secret": "s3cret"}
        }));
        assert!(clone_credentials(&with_user, None) == basic("bot", "s3cret"));
    }

    #[test]
    fn ssh_clone_credentials_pin_host_keys_only_when_asked() {
        let ssh = |policy: serde_json::Value| {
            let d = dispatch(serde_json::json!({"sourceAuth": {
                "kind": "ssh", "secret": "KEY", "sshHostKeyPolicy": policy,
                "sshKnownHostsPem": "example.com ssh-ed25519 AAAA"
            }}));
            match clone_credentials(&d, None) {
                Some(GitCredentials::Ssh { host_key, .. }) => host_key,
                _ => panic!("SSH credentials"),
            }
        };
        assert_eq!(
            ssh(serde_json::json!("pinned")),
            HostKeyPolicy::Pinned {
                known_hosts: "example.com ssh-ed25519 AAAA".into()
            }
        );
        assert_eq!(
            ssh(serde_json::json!("accept-new")),
            HostKeyPolicy::AcceptNew
        );
        // Pinned with nothing listed refuses every host rather than trusting any.
        let unlisted = dispatch(serde_json::json!({"sourceAuth": {
            "kind": "ssh", "secret": "KEY", "sshHostKeyPolicy": "pinned"
        }}));
        match clone_credentials(&unlisted, None) {
            Some(GitCredentials::Ssh { host_key, .. }) => assert_eq!(
                host_key,
                HostKeyPolicy::Pinned {
                    known_hosts: String::new()
                }
            ),
            _ => panic!("SSH credentials"),
        }
    }

    #[test]
    fn panic_messages_are_read_from_str_and_string_payloads() {
        assert_eq!(panic_message(Box::new("static")), "static");
        assert_eq!(panic_message(Box::new(String::from("owned"))), "owned");
        assert_eq!(panic_message(Box::new(42)), "unknown panic");
    }

    #[tokio::test]
    async fn a_runner_that_unwinds_still_frees_its_slot_and_reports_the_job_failed() {
        let services = services();
        let released = Arc::new(AtomicBool::new(false));
        let control = JobControl::default();
        let heartbeat = tokio::spawn(std::future::pending::<()>());
        let unwound = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let released = released.clone();
            let job_ref = JobRef {
                run_id: "run".into(),
                job_id: "job".into(),
            };
            let _end = JobEnd {
                services: services.clone(),
                attempt: services.outbox.begin_attempt(&job_ref),
                job_ref,
                name: "build".into(),
                started: Instant::now(),
                control: control.clone(),
                heartbeat: heartbeat.abort_handle(),
                release: Some(move || released.store(true, Ordering::SeqCst)),
            };
            panic!("a bug in the runner");
        }));
        assert!(unwound.is_err());
        assert!(released.load(Ordering::SeqCst), "the slot was not freed");
        assert!(control.cancel.is_cancelled() && control.force.is_cancelled());
        assert!(heartbeat.await.unwrap_err().is_cancelled());
        assert_eq!(
            services.outbox.undelivered_jobs(),
            vec![JobRef {
                run_id: "run".into(),
                job_id: "job".into(),
            }]
        );
        match services.events.next(Some(Duration::ZERO)) {
            Some(Event::JobFinished { state, error, .. }) => {
                assert_eq!(state, JobState::Failed);
                assert!(error.unwrap_or_default().contains("panicked"));
            }
            other => panic!("no job_finished event: {other:?}"),
        }
    }
}
