//! The step loop of a job: sequential steps, parallel groups, retries, each step's terminal
//! status and result, the executors' cleanup.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::plan::{plan_steps, Planned, PlannedStep};
use super::{JobRunner, ABANDON_AFTER_FORCE};
use crate::executor::JobContext;
use crate::protocol::{JobDispatch, JobState, StepState, StepStatusData};
use crate::routing::{Claim, JobRoute, StepExecutor};

/// How a step ended, for the loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StepEnd {
    Success,
    Failed { continue_on_error: bool },
    Cancelled,
}

impl JobRunner {
    /// Everything between `running` and the terminal status. Returns the terminal state and
    /// `data.error`.
    pub(super) async fn execute(&self, dispatch: &JobDispatch) -> (JobState, Option<String>) {
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
        let max_attempts = step.max_attempts();
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
            let retry = match state {
                StepState::Failed => step.retry_delay(attempt, stop.is_cancelled()),
                _ => None,
            };
            if retry.is_none() {
                // Live, once per step: its final attempt is its result.
                self.services
                    .metrics
                    .step_finished(state, duration_ms as f64 / 1000.0);
            }
            match (state, retry) {
                (StepState::Success, _) => return StepEnd::Success,
                (StepState::Failed, Some(delay)) => {
                    self.job_log(format!(
                        "[kici] Step '{name}' attempt {attempt}/{max_attempts} failed: {}; retrying in {}ms",
                        error.unwrap_or_default(),
                        delay.as_millis()
                    ))
                    .await;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => {}
                    }
                    attempt += 1;
                }
                (StepState::Failed, None) => return StepEnd::Failed { continue_on_error },
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
        self.step_finished(step.index, &step.spec.name, state, duration_ms, error);
    }
}
