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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::outbox::{OutboxLimits, Pacer};
    use crate::protocol::JobRef;

    /// A connected outbox with one running job whose first `running` is already sent.
    async fn running_job() -> (Arc<Outbox>, JobAttempt, Pacer) {
        let outbox = Arc::new(Outbox::new(OutboxLimits::default(), Metrics::new()));
        outbox.set_connected(true);
        let attempt = outbox.begin_attempt(&JobRef {
            run_id: "run".into(),
            job_id: "job".into(),
        });
        let running = job_status(&attempt.job, JobState::Running, None);
        outbox.push_status(&attempt, running, false);
        let mut pacer = Pacer::new(1000.0, 1000.0, 1e9, 1e9);
        let first = outbox.next_frame(&mut pacer).await;
        assert!(
            first.text.contains(r#""state":"running""#),
            "{}",
            first.text
        );
        (outbox, attempt, pacer)
    }

    #[tokio::test(start_paused = true)]
    async fn running_is_sent_again_at_each_delay_after_the_first() {
        let (outbox, attempt, mut pacer) = running_job().await;
        let first_sent = tokio::time::Instant::now();
        let delays = vec![Duration::from_secs(2), Duration::from_millis(500)];
        let resends = resend_running(outbox.clone(), attempt, delays);
        for due in [Duration::from_millis(500), Duration::from_secs(2)] {
            let frame = outbox.next_frame(&mut pacer).await;
            assert_eq!(frame.message_type, "job.status");
            assert!(
                frame.text.contains(r#""state":"running""#),
                "{}",
                frame.text
            );
            assert_eq!(first_sent.elapsed(), due);
        }
        resends.await.unwrap();
        assert!(outbox.is_empty(), "more than one running per delay");
    }

    #[tokio::test(start_paused = true)]
    async fn no_running_follows_the_terminal_status_and_the_schedule_ends() {
        let (outbox, attempt, mut pacer) = running_job().await;
        let first_sent = tokio::time::Instant::now();
        let delays = vec![Duration::from_millis(500), Duration::from_secs(2)];
        let resends = resend_running(outbox.clone(), attempt.clone(), delays);
        let success = job_status(&attempt.job, JobState::Success, None);
        outbox.push_status(&attempt, success, true);
        let end = outbox.next_frame(&mut pacer).await;
        assert!(end.text.contains(r#""state":"success""#), "{}", end.text);
        resends.await.unwrap();
        // Refused at the first delay, the task ended there instead of waiting out the rest.
        assert_eq!(first_sent.elapsed(), Duration::from_millis(500));
        assert!(
            outbox.is_empty(),
            "a running was queued after the terminal status"
        );
    }
}
