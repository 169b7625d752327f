//! The end of a job, guaranteed whatever happens to its runner.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::{job_status, JobControl, JobServices};
use crate::events::Event;
use crate::outbox::JobAttempt;
use crate::protocol::{JobRef, JobState, JobStatusData, Outbound, SecretOutput};

/// The end of a job, guaranteed: [`JobEnd::finish`] frees the slot and queues the terminal
/// status; if the runner unwinds or is dropped before that, `Drop` does it with `failed`, so
/// neither the slot nor the orchestrator's view of the job is ever left hanging.
pub(super) struct JobEnd<R: FnOnce()> {
    pub(super) services: Arc<JobServices>,
    pub(super) job_ref: JobRef,
    pub(super) attempt: JobAttempt,
    pub(super) name: String,
    pub(super) started: Instant,
    pub(super) control: JobControl,
    pub(super) heartbeat: tokio::task::AbortHandle,
    /// `None` once the terminal status is queued.
    pub(super) release: Option<R>,
}

impl<R: FnOnce()> JobEnd<R> {
    pub(super) fn finish(
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

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::job::tests::services;

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
