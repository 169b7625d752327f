//! The job-level execution path: a [`JobExecutor`] runs every step of the job itself (the
//! TypeScript runner) and the engine turns its reports into statuses, logs, `stepResults` and
//! outputs. Masking, the log cap, pacing, the job timeout, cancel and force stay the engine's.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::plan::StepRef;
use super::step_secrets::SecretOutputs;
use super::{await_execution, JobRunner};
use crate::executor::JobContext;
use crate::job_executor::{JobEvent, JobExecutor, JobIo, JobOutcome, StepFinished};
use crate::logs::StepLog;
use crate::process::StepEnv;
use crate::protocol::{JobState, StepState, StepStatusData, StepType, JOB_LOG_INDEX};
use crate::routing::flat_steps;

/// A step that started and has not finished yet, with its log.
struct OpenStep {
    name: String,
    kind: StepType,
    group: Option<String>,
    log: StepLog,
}

impl JobRunner {
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
        )
        .with_secret_outputs(self.sealer.as_ref().map(|_| ()).map_err(Clone::clone));
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
        let lock_names: Vec<String> = flat_steps(&context.config.steps)
            .into_iter()
            .map(|step| step.name.clone())
            .collect();
        let mut open: HashMap<u32, OpenStep> = HashMap::new();
        let mut job_log = StepLog::new(self.masker.current(), self.log_cap);
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
                let started = StepRef {
                    index: step.index,
                    name: &step.name,
                    kind: step.kind,
                    group: step.group.as_deref(),
                };
                self.send_step_status(started, StepState::Running, None, None);
                open.insert(
                    step.index,
                    OpenStep {
                        name: step.name,
                        kind: step.kind,
                        group: step.group,
                        log: StepLog::new(self.masker.current(), self.log_cap),
                    },
                );
            }
            JobEvent::Pending { index, name, group } => {
                let pending = StepRef {
                    index,
                    name: &name,
                    kind: StepType::Step,
                    group: Some(&group),
                };
                self.send_step_status(pending, StepState::Pending, None, None);
            }
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
            JobEvent::SecretOutput { index, key, value } => {
                let mut outputs = SecretOutputs::default();
                outputs.push(key, value.0, &self.masker);
                // Output not sent yet, of every step, is masked with the value too.
                let masker = self.masker.current();
                job_log.set_masker(masker.clone());
                for step in open.values_mut() {
                    step.log.set_masker(masker.clone());
                }
                if let Some(refusal) = self.seal_secret_outputs(outputs) {
                    // The runner refuses these itself (it is told whether the run has a key).
                    self.job_log(format!("[kici] Step {index}: {refusal}"))
                        .await;
                }
            }
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
        let finished = StepRef {
            index: step.index,
            name: &step.name,
            kind: step.kind,
            group: step.group.as_deref(),
        };
        self.send_step_status(finished, step.state, Some(data), Some(log_bytes));
        if step.kind != StepType::Step {
            return;
        }
        if !step.retrying {
            self.services
                .metrics
                .step_finished(step.state, step.duration_ms as f64 / 1000.0);
        }
        self.step_finished(step.index, &step.name, step.state, step.duration_ms, error);
        if let Some(outputs) = step.outputs.filter(|o| !o.is_empty()) {
            let mut outputs: Vec<(String, serde_json::Value)> = outputs.into_iter().collect();
            for key in self.masker.current().mask_outputs(&mut outputs) {
                self.job_log(format!(
                    "[kici] Output '{key}' of step '{}' holds a secret; it is sent masked",
                    step.name
                ))
                .await;
            }
            self.lock()
                .outputs
                .insert(step.name, outputs.into_iter().collect());
        }
    }
}
