//! Dispatch acknowledgement and re-dispatch against the mock.
//!
//! The orchestrator's late ack deadline (README, "Orchestrator quirks"): a fast agent's
//! `job.ack` and first `running` can both arrive before the deadline is armed, and the
//! `running` then erases the early ack. The mock reproduces that; the job must survive it.
//! A job id dispatched again after a cancel must not inherit the first attempt's messages.

mod common;

use std::time::Duration;

use common::{start_with, WAIT};
use kici_agent_core::config::RateLimits;
use kici_agent_core::ExecutorRegistry;
use kici_mock_orchestrator::MockConfig;
use serde_json::json;

/// The mock's simulated ack-timeout lookup: the deadline is armed this long after a dispatch.
const LOOKUP: Duration = Duration::from_millis(500);
/// The ack deadline once armed (the real minimum).
const ACK_TIMEOUT: Duration = Duration::from_secs(1);

fn slow_lookup() -> MockConfig {
    MockConfig {
        ack_lookup_delay: Some(LOOKUP),
        dispatch_ack_timeout: ACK_TIMEOUT,
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_an_ack_deadline_armed_after_its_ack_and_running() {
    // Resends at 250 ms and 1 s: the second lands between the arming (500 ms) and the expiry
    // (1.5 s), however late this machine's timers fire, up to 500 ms.
    let h = start_with(
        slow_lookup(),
        |c| {
            c.with_running_resends(vec![
                Duration::from_millis(250),
                Duration::from_millis(1000),
            ])
        },
        ExecutorRegistry::new(),
    )
    .await;
    h.registered().await;
    // Outlasts the armed deadline, so only a resolved deadline lets it finish.
    h.dispatch("late-armed", json!([{"name": "s", "run": "sleep 2.5"}]))
        .await;
    assert_eq!(h.terminal_status("late-armed").await["state"], "success");
    assert!(h.mock.closes().iter().all(|c| c.code != Some(4031)));
    assert!(h.mock.requeued().is_empty(), "{:?}", h.mock.requeued());
    assert!(h.mock.messages_of_type("job.cancel").is_empty());
    // Ack first, then `running` three times; the terminal status last.
    let statuses: Vec<String> = h
        .job_messages("late-armed")
        .iter()
        .filter(|m| m["type"] == "job.ack" || m["type"] == "job.status")
        .map(|m| {
            let text = |key: &str| m[key].as_str().unwrap_or_default().to_owned();
            format!("{} {}", text("type"), text("state"))
                .trim_end()
                .to_owned()
        })
        .collect();
    assert_eq!(
        statuses,
        [
            "job.ack",
            "job.status running",
            "job.status running",
            "job.status running",
            "job.status success"
        ]
    );
    assert_eq!(h.mock.registrations().len(), 1);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_is_not_repeated_once_cancelling_was_queued() {
    // Resends every 200 ms for 4 s, while the job spends its 2 s cancel grace in `cancelling`.
    let resends = (1..=20).map(|i| Duration::from_millis(200 * i)).collect();
    let h = start_with(
        MockConfig::default(),
        |c| c.with_running_resends(resends),
        ExecutorRegistry::new(),
    )
    .await;
    h.registered().await;
    let step = json!([{"name": "s", "run": "trap '' TERM; echo started; sleep 30"}]);
    let run = h.dispatch("cancelled-early", step).await;
    assert!(
        h.mock
            .wait_until(|_| !h.lines("cancelled-early", 0).is_empty(), WAIT)
            .await
    );
    h.mock
        .cancel(&h.agent_id(), &run, "cancelled-early", false)
        .await
        .unwrap();
    assert_eq!(
        h.terminal_status("cancelled-early").await["state"],
        "cancelled"
    );
    let sequence: Vec<String> = h
        .job_messages("cancelled-early")
        .iter()
        .filter(|m| m["type"] == "job.status")
        .map(|m| m["state"].as_str().unwrap_or_default().to_owned())
        .collect();
    let cancelling = sequence
        .iter()
        .position(|s| s == "cancelling")
        .expect("cancelling sent");
    assert!(
        !sequence[cancelling..].contains(&"running".to_string()),
        "{sequence:?}"
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_dispatched_again_after_a_cancel_does_not_inherit_the_first_attempts_messages() {
    // A slow byte budget keeps the first attempt's log (about 160 KB: 8 s) queued, with its
    // `cancelling` and `cancelled` behind it, when the same job id is dispatched again.
    let slow = RateLimits {
        bytes_per_sec: 20_000.0,
        byte_burst: 20_000.0,
        ..RateLimits::default()
    };
    let h = start_with(
        MockConfig::default(),
        |c| c.with_rate_limits(slow),
        ExecutorRegistry::new(),
    )
    .await;
    h.registered().await;
    let log = format!(
        "seq 1 2000 | sed 's/^/old /; s/$/ {}/'; sleep 30",
        "x".repeat(70)
    );
    let step = json!([{"name": "s", "run": log}]);
    let run = h.dispatch("again", step).await;
    // Cancel once the whole log is queued (the step then only sleeps).
    let deadline = std::time::Instant::now() + WAIT;
    while metric(&h, "kici_agent_outbox_backlog_bytes").await < 100_000.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the log never queued up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.mock
        .cancel(&h.agent_id(), &run, "again", false)
        .await
        .unwrap();
    common::wait_state(&h.agent, |s| s.active_jobs == 0).await;
    let statuses = |state: &'static str| {
        h.mock
            .messages_of_type("job.status")
            .iter()
            .filter(|m| m["jobId"] == "again" && m["state"] == state)
            .count()
    };
    assert_eq!(
        statuses("cancelled"),
        0,
        "the first attempt's end was delivered already"
    );
    h.dispatch("again", json!([{"name": "s", "run": "echo new"}]))
        .await;

    assert_eq!(h.terminal_status("again").await["state"], "success");
    let messages = h.job_messages("again");
    let second_ack = messages
        .iter()
        .rposition(|m| m["type"] == "job.ack")
        .unwrap();
    let after: Vec<String> = messages[second_ack..]
        .iter()
        .filter(|m| m["type"] != "job.heartbeat")
        .map(|m| match m["type"].as_str().unwrap_or_default() {
            "log.chunk" => format!("lines {}", m["lines"]),
            other => format!("{other} {}", m["state"].as_str().unwrap_or_default()),
        })
        .collect();
    assert!(
        after
            .iter()
            .all(|m| !m.contains("old") && !m.contains("cancel")),
        "{after:?}"
    );
    assert!(after.contains(&"lines [\"new\"]".to_string()), "{after:?}");
    assert!(metric(&h, "kici_agent_superseded_messages_dropped_total").await > 0.0);
    h.assert_no_violations();
}

/// The value of an unlabelled metric of the agent.
async fn metric(h: &common::Harness, name: &str) -> f64 {
    let text = h.http_get("/metrics").await.1;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}
