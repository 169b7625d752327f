//! One attempt of one step: its environment and hand-off files, the executor in its own task,
//! log forwarding, the step timeout, outputs and secret outputs.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::plan::{Interruption, PlannedStep};
use super::step_secrets::SecretOutputs;
use super::{await_execution, panic_message, JobRunner, ABANDON_AFTER_FORCE};
use crate::executor::{Executor, JobContext, StepContext, StepEvent, StepIo};
use crate::logs::StepLog;
use crate::process::{HandoffFiles, StepEnv};
use crate::protocol::StepState;

impl JobRunner {
    /// One attempt of a step: env and hand-off files, executor, log forwarding, timeout.
    pub(super) async fn attempt(
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

        let timeout = step.timeout(self.services.settings.default_step_timeout);
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
        let interrupted = Interruption {
            job_timeout: self.job_timed_out.is_cancelled(),
            stopped: stop.is_cancelled(),
            step_timeout: timed_out,
        };
        let (state, failure) = step.verdict(result, interrupted, timeout);
        (state, failure, log_bytes)
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
}
