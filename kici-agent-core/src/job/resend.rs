//! The repeated `job.status running` of a job (the orchestrator's late ack deadline).

use std::sync::Arc;
use std::time::Duration;

use super::job_status;
use crate::outbox::{JobAttempt, Outbox};
use crate::protocol::JobState;

/// Sends `job.status running` again at each of `delays` after the first one. The orchestrator
/// may arm its ack deadline only after our ack and first `running` arrived, and that `running`
/// erases the ack it had recorded (README, "Orchestrator quirks"); a later `running` resolves
/// the armed deadline. The outbox refuses a resend once `cancelling` or the terminal status
/// was queued, which ends the task.
pub(super) fn resend_running(
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
