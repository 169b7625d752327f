//! Scaler-managed self-shutdown (spec agent.md §6.5) against the strict mock: the agent ends
//! itself once idle, a dispatch cancels the window, a registration announcing a job arms the
//! longer one, and an agent that is not scaler-managed never idles out.
//!
//! Timings are asserted only as lower bounds (an agent that stops too early is the bug a
//! slow machine cannot fake); upper bounds are the harness's generous `WAIT`.

mod common;

use std::time::{Duration, Instant};

use common::{start_with, Harness, WAIT};
use kici_agent_core::{Event, ExecutorRegistry};
use kici_mock_orchestrator::MockConfig;
use serde_json::json;

fn scaler(
    idle: Duration,
    pending_dispatch: Duration,
) -> impl FnOnce(
    kici_agent_core::config::AgentConfigBuilder,
) -> kici_agent_core::config::AgentConfigBuilder {
    move |b| {
        b.with_scaler_managed(true)
            .with_scaler_idle_timeout(idle)
            .with_scaler_pending_dispatch_timeout(pending_dispatch)
    }
}

/// A scaler-managed agent with these windows, against a mock with `mock_config`.
async fn start_scaler(
    mock_config: MockConfig,
    idle: Duration,
    pending_dispatch: Duration,
) -> Harness {
    start_with(
        mock_config,
        scaler(idle, pending_dispatch),
        ExecutorRegistry::new(),
    )
    .await
}

/// A mock whose `register.ack` announces a job on its way (`pendingDispatch`).
fn announcing() -> MockConfig {
    MockConfig {
        pending_dispatch_on_register: true,
        ..MockConfig::default()
    }
}

/// Reads events until `stopped`, noting when each kind first came.
fn events_until_stopped(harness: &Harness) -> Vec<(Event, Instant)> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "agent never stopped; events: {seen:?}");
        if let Some(event) = harness.agent.next_event(Some(left)) {
            let stopped = event == Event::Stopped;
            seen.push((event, Instant::now()));
            if stopped {
                return seen;
            }
        }
    }
}

fn when(events: &[(Event, Instant)], pred: impl Fn(&Event) -> bool) -> Instant {
    events
        .iter()
        .find(|(e, _)| pred(e))
        .map(|(_, at)| *at)
        .unwrap_or_else(|| panic!("no such event in {events:?}"))
}

fn self_shutdown_reason(events: &[(Event, Instant)]) -> String {
    events
        .iter()
        .find_map(|(e, _)| match e {
            Event::SelfShutdown { reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no self_shutdown event in {events:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_scaler_managed_agent_shuts_itself_down_after_the_idle_window() {
    let idle = Duration::from_millis(600);
    let harness = start_scaler(MockConfig::default(), idle, Duration::from_secs(60)).await;
    let events = tokio::task::block_in_place(|| events_until_stopped(&harness));
    let registered = when(&events, |e| matches!(e, Event::Registered { .. }));
    let stopped = when(&events, |e| *e == Event::Stopped);
    assert_eq!(self_shutdown_reason(&events), "scaler-idle");
    assert!(
        stopped - registered >= idle,
        "stopped {:?} after registering, before the idle window",
        stopped - registered
    );
    // A graceful end: the agent closed the socket normally, not dropped it.
    assert!(
        harness
            .mock
            .wait_for_close(|c| !c.by_server, WAIT)
            .await
            .is_some_and(|c| c.code == Some(1000)),
        "closes: {:?}",
        harness.mock.closes()
    );
    harness.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dispatch_cancels_the_window_and_a_new_one_starts_when_the_job_ends() {
    let idle = Duration::from_millis(1500);
    let harness = start_scaler(MockConfig::default(), idle, Duration::from_secs(60)).await;
    harness.registered().await;
    // Well inside the first window; the job outlives it.
    harness
        .dispatch("job-1", json!([{"name": "a", "run": "sleep 2"}]))
        .await;
    assert_eq!(harness.terminal_status("job-1").await["state"], "success");
    let events = tokio::task::block_in_place(|| events_until_stopped(&harness));
    let finished = when(&events, |e| matches!(e, Event::JobFinished { .. }));
    let stopped = when(&events, |e| *e == Event::Stopped);
    assert_eq!(self_shutdown_reason(&events), "scaler-idle");
    assert!(
        stopped - finished >= idle,
        "stopped {:?} after the job ended, inside the window its end starts",
        stopped - finished
    );
    harness.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zero_idle_window_shuts_down_as_soon_as_the_job_ends() {
    // Announcing the job keeps the zero idle window from ending the agent at registration.
    let harness = start_scaler(announcing(), Duration::ZERO, Duration::from_secs(30)).await;
    harness.registered().await;
    harness
        .dispatch("job-1", json!([{"name": "a", "run": "echo hi"}]))
        .await;
    let events = tokio::task::block_in_place(|| events_until_stopped(&harness));
    assert_eq!(self_shutdown_reason(&events), "scaler-idle");
    assert_eq!(harness.terminal_status("job-1").await["state"], "success");
    harness.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_announcing_a_job_waits_the_pending_dispatch_window() {
    let pending = Duration::from_millis(1500);
    let harness = start_scaler(announcing(), Duration::from_millis(50), pending).await;
    let events = tokio::task::block_in_place(|| events_until_stopped(&harness));
    let registered = when(&events, |e| matches!(e, Event::Registered { .. }));
    let stopped = when(&events, |e| *e == Event::Stopped);
    assert_eq!(
        self_shutdown_reason(&events),
        "scaler-pending-dispatch-timeout"
    );
    assert!(
        stopped - registered >= pending,
        "stopped {:?} after registering, inside the pending-dispatch window",
        stopped - registered
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_announced_job_runs_and_the_normal_window_follows_it() {
    let harness = start_scaler(
        announcing(),
        Duration::from_millis(100),
        Duration::from_secs(30),
    )
    .await;
    harness.registered().await;
    harness
        .dispatch("job-1", json!([{"name": "a", "run": "echo hi"}]))
        .await;
    let events = tokio::task::block_in_place(|| events_until_stopped(&harness));
    assert_eq!(self_shutdown_reason(&events), "scaler-idle");
    assert_eq!(harness.terminal_status("job-1").await["state"], "success");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_is_not_scaler_managed_never_idles_out() {
    let harness = start_with(
        MockConfig::default(),
        |b| b.with_scaler_idle_timeout(Duration::ZERO),
        ExecutorRegistry::new(),
    )
    .await;
    harness.registered().await;
    harness
        .dispatch("job-1", json!([{"name": "a", "run": "true"}]))
        .await;
    assert_eq!(harness.terminal_status("job-1").await["state"], "success");
    let stopped = tokio::task::block_in_place(|| harness.agent.wait(Some(Duration::from_secs(1))));
    assert!(!stopped, "a static agent stopped by itself");
    assert!(harness.agent.state().registered);
}
