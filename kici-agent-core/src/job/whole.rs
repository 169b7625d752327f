//! The job-level execution path: a [`JobExecutor`] runs every step of the job itself (the
//! TypeScript runner) and the engine turns its reports into statuses, logs, `stepResults` and
//! outputs. Masking, the log cap, pacing, the job timeout, cancel and force stay the engine's.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{await_execution, JobRunner, JOB_LOG_INDEX};
use crate::events::Event;
use crate::executor::JobContext;
use crate::job_executor::{JobEvent, JobExecutor, JobIo, JobOutcome, StepFinished};
use crate::logs::StepLog;
use crate::process::StepEnv;
use crate::protocol::{
    new_message_id, now_ms, ConcurrencyKind, JobState, Outbound, StepEntry, StepState, StepStatus,
    StepStatusData, StepType,
};

/// The flat step names of `jobConfig.steps` (parallel children inline), by index.
fn flat_step_names(steps: &[StepEntry]) -> Vec<&str> {
    steps
        .iter()
        .flat_map(|entry| match entry {
            StepEntry::Step(step) => vec![step.name.as_str()],
            StepEntry::Parallel(group) => group.children.iter().map(|c| c.name.as_str()).collect(),
        })
        .collect()
}

/// A step that started and has not finished yet, with its log.
struct OpenStep {
    name: String,
    kind: StepType,
    group: Option<String>,
    log: StepLog,
}

impl JobRunner {
    /// The whole-job executor for this job, if one takes it: a TypeScript job (its
    /// `jobConfig.source.file` ends in `.ts`) that is not a container job, has no `run`
    /// commands and no host executor registered for it or its steps. `Err` when it should
    /// run through the TypeScript runner but that cannot run here (no Node >= 20.6).
    pub(super) async fn whole_job_executor(
        &self,
        context: &JobContext,
    ) -> Result<Option<Arc<dyn JobExecutor>>, String> {
        let config = &context.config;
        let is_typescript = config
            .extra
            .get("source")
            .and_then(|source| source.get("file"))
            .and_then(serde_json::Value::as_str)
            .is_some_and(|file| file.ends_with(".ts"));
        let default_image = self.services.settings.default_container_image.as_deref();
        let in_container = self.services.container.is_some()
            && crate::container::image_for(config, default_image).is_some();
        let has_commands = config.steps.iter().any(|entry| match entry {
            StepEntry::Step(step) => step.run.is_some(),
            StepEntry::Parallel(group) => group.children.iter().any(|c| c.run.is_some()),
        });
        let names = flat_step_names(&config.steps);
        if !is_typescript
            || in_container
            || has_commands
            || self
                .services
                .executors
                .has_host_executor(&context.name, names.into_iter())
        {
            return Ok(None);
        }
        let typescript = self.services.typescript.clone();
        typescript.available().await.map_err(|e| e.to_string())?;
        Ok(Some(typescript))
    }

    /// Runs the job through `executor`, reporting what it reports. Returns the terminal state
    /// and `data.error`.
    pub(super) async fn run_whole_job(
        &self,
        context: &JobContext,
        executor: Arc<dyn JobExecutor>,
    ) -> (JobState, Option<String>) {
        let env = self
            .lock()
            .env
            .clone()
            .unwrap_or_else(|| StepEnv::from_host(Vec::new()));
        let (events_tx, mut events_rx) = mpsc::channel::<JobEvent>(256);
        let io = JobIo::new(
            events_tx,
            self.control.cancel.clone(),
            self.control.force.clone(),
        );
        let mut execution = {
            let executor = executor.clone();
            let job = context.clone();
            // The runner and everything it starts join the job's containment.
            // Under KICI_SANDBOX the executor's processes run in the job's sandbox, with what
            // the executor needs of the host (Node, the runner) visible read-only.
            let sandbox = self.lock().sandbox.clone().map(|sandbox| {
                Arc::new(sandbox.with_read_only(executor.sandbox_read_only_paths()))
            });
            let policy = crate::containment::SpawnPolicy {
                containment: self.containment.clone(),
                sandbox,
            };
            tokio::spawn(crate::containment::scope(policy, async move {
                executor.run_job(&job, env, io).await
            }))
        };
        let lock_names: Vec<String> = flat_step_names(&context.config.steps)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut open: HashMap<u32, OpenStep> = HashMap::new();
        let mut job_log = StepLog::new(self.masker.clone(), self.log_cap);
        let joined = loop {
            tokio::select! {
                event = events_rx.recv() => match event {
                    Some(event) => self.on_event(event, &mut open, &mut job_log, &lock_names).await,
                    None => break await_execution(&mut execution, &self.control.force).await,
                },
                result = &mut execution => break Some(result),
            }
        };
        events_rx.close();
        while let Some(event) = events_rx.recv().await {
            self.on_event(event, &mut open, &mut job_log, &lock_names)
                .await;
        }
        let mut lines = Vec::new();
        job_log.finish(&mut lines);
        self.forward(JOB_LOG_INDEX, &mut lines).await;

        let outcome = match joined {
            Some(Ok(outcome)) => outcome,
            Some(Err(e)) if e.is_panic() => JobOutcome::failed(format!(
                "executor '{}' panicked: {}",
                executor.name(),
                super::panic_message(e.into_panic())
            )),
            Some(Err(_)) | None => JobOutcome::failed(format!(
                "executor '{}' did not stop when asked to",
                executor.name()
            )),
        };
        let cancelled = self.control.cancel.is_cancelled();
        let error = outcome
            .error
            .as_ref()
            .map(|e| self.masker.mask(e).into_owned());
        // Steps the executor left open (it crashed or was killed) end with the job.
        let mut left_open: Vec<(u32, OpenStep)> = open.drain().collect();
        left_open.sort_by_key(|(index, _)| *index);
        for (index, step) in left_open {
            let state = if cancelled {
                StepState::Cancelled
            } else {
                StepState::Failed
            };
            let finished = StepFinished {
                index,
                name: step.name.clone(),
                kind: step.kind,
                group: step.group.clone(),
                state,
                duration_ms: 0,
                error: (!cancelled).then(|| crate::executor::StepFailure {
                    message: error.clone().unwrap_or_else(|| "the job ended".into()),
                    exit_code: None,
                }),
                outputs: None,
                retrying: false,
            };
            open.insert(index, step);
            self.finish(finished, &mut open, &lock_names).await;
        }
        if let Some(error) = &error {
            if outcome.state == JobState::Failed {
                self.job_log(format!("[kici] {error}")).await;
            }
        }
        if cancelled {
            // A cancel in flight reports cancelled, with the hooks' compound reason if any.
            return (JobState::Cancelled, error);
        }
        (outcome.state, error)
    }

    async fn on_event(
        &self,
        event: JobEvent,
        open: &mut HashMap<u32, OpenStep>,
        job_log: &mut StepLog,
        lock_names: &[String],
    ) {
        match event {
            JobEvent::Started(step) => {
                self.status(
                    step.index,
                    &step.name,
                    step.kind,
                    StepState::Running,
                    None,
                    None,
                    step.group.as_deref(),
                );
                open.insert(
                    step.index,
                    OpenStep {
                        name: step.name,
                        kind: step.kind,
                        group: step.group,
                        log: StepLog::new(self.masker.clone(), self.log_cap),
                    },
                );
            }
            JobEvent::Pending { index, name, group } => self.status(
                index,
                &name,
                StepType::Step,
                StepState::Pending,
                None,
                None,
                Some(&group),
            ),
            JobEvent::Output { index, bytes } => {
                let mut lines = Vec::new();
                let step = u32::try_from(index).ok().and_then(|i| open.get_mut(&i));
                let index = match step {
                    Some(step) => {
                        step.log.push_bytes(&bytes, &mut lines);
                        index
                    }
                    // Job-level output, and output of a step that is not running (a late
                    // write of a background promise), goes to the job's bucket.
                    None => {
                        job_log.push_bytes(&bytes, &mut lines);
                        JOB_LOG_INDEX
                    }
                };
                self.forward(index, &mut lines).await;
            }
            JobEvent::Finished(step) => self.finish(step, open, lock_names).await,
        }
    }

    /// Ends a step attempt: the rest of its log, its terminal status, its result and outputs.
    async fn finish(
        &self,
        step: StepFinished,
        open: &mut HashMap<u32, OpenStep>,
        lock_names: &[String],
    ) {
        let mut log_bytes = 0;
        if let Some(mut opened) = open.remove(&step.index) {
            let mut lines = Vec::new();
            opened.log.finish(&mut lines);
            self.forward(i64::from(step.index), &mut lines).await;
            log_bytes = opened.log.bytes_streamed();
        }
        // A local run of a workflow file has no lock description to compare with.
        if step.kind == StepType::Step && !lock_names.is_empty() {
            let expected = lock_names.get(step.index as usize);
            if expected != Some(&step.name) {
                self.job_log(format!(
                    "[kici] step {} '{}' of the runner does not match jobConfig.steps ({})",
                    step.index,
                    step.name,
                    expected.map_or("no such index", String::as_str)
                ))
                .await;
            }
        }
        let error = step
            .error
            .as_ref()
            .map(|f| self.masker.mask(&f.message).into_owned());
        let exit_code = step.error.as_ref().and_then(|f| f.exit_code);
        let data = StepStatusData {
            duration_ms: Some(step.duration_ms),
            error: error.clone(),
            exit_code,
            step_type: (step.kind == StepType::Init).then_some(StepType::Init),
        };
        self.status(
            step.index,
            &step.name,
            step.kind,
            step.state,
            Some(data),
            Some(log_bytes),
            step.group.as_deref(),
        );
        if step.kind != StepType::Step {
            return;
        }
        if !step.retrying {
            self.services
                .metrics
                .step_finished(step.state, step.duration_ms as f64 / 1000.0);
        }
        self.services.events.push(Event::StepFinished {
            run_id: self.job_ref.run_id.clone(),
            job_id: self.job_ref.job_id.clone(),
            step_index: step.index,
            step_name: step.name.clone(),
            state: step.state,
            duration_ms: step.duration_ms,
            error: error.clone(),
        });
        let mut run_state = self.lock();
        run_state.results.retain(|(index, _)| *index != step.index);
        run_state.results.push((
            step.index,
            crate::protocol::StepResult {
                name: step.name.clone(),
                status: step.state,
                duration_ms: step.duration_ms,
                error,
            },
        ));
        if let Some(outputs) = step.outputs.filter(|o| !o.is_empty()) {
            run_state.outputs.insert(step.name, outputs);
        }
    }

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

    #[allow(clippy::too_many_arguments)]
    fn status(
        &self,
        index: u32,
        name: &str,
        kind: StepType,
        state: StepState,
        data: Option<StepStatusData>,
        log_bytes: Option<u64>,
        group: Option<&str>,
    ) {
        let message = Outbound::StepStatus(StepStatus {
            message_id: new_message_id(),
            run_id: self.job_ref.run_id.clone(),
            job_id: self.job_ref.job_id.clone(),
            step_index: index,
            step_name: name.to_owned(),
            state,
            timestamp: now_ms(),
            data,
            step_type: (kind != StepType::Init).then_some(kind),
            concurrency_kind: group.map(|_| ConcurrencyKind::ParallelChild),
            group_id: group.map(str::to_owned),
            log_bytes_streamed: log_bytes,
        });
        self.services
            .outbox
            .push_status(&self.attempt, message, false);
    }
}
