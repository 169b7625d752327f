//! Connection lifecycle against the strict mock orchestrator (loopback only).

mod common;

use std::time::{Duration, Instant};

use common::{start, start_with, Harness, WAIT};
use kici_agent_core::config::ReconnectPolicy;
use kici_agent_core::{ConnectionState, Event, ExecutorRegistry};
use kici_mock_orchestrator::{AuthMode, MockConfig};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_registers_and_heartbeats_only_after_the_ack() {
    let h = start(|c| c).await;
    h.registered().await;
    let first_beat = h
        .mock
        .wait_for(|r| r.msg["type"] == "heartbeat", WAIT)
        .await
        .expect("heartbeat");
    let received = h.mock.received();
    let types: Vec<&str> = received
        .iter()
        .filter_map(|r| r.msg["type"].as_str())
        .collect();
    assert_eq!(&types[..2], ["auth.request", "agent.register"]);
    let register = received
        .iter()
        .find(|r| r.msg["type"] == "agent.register")
        .unwrap();
    assert!(first_beat.at > register.at);
    let msg = &register.msg;
    assert_eq!(msg["maxConcurrency"], 1);
    let labels: Vec<&str> = msg["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(labels.iter().any(|l| l.starts_with("kici:os:")));
    assert!(
        !labels.iter().any(|l| l.starts_with("kici:role:")),
        "{labels:?}"
    );
    assert!(msg.get("inFlightJobs").is_none());
    // Heartbeats keep coming at the configured interval.
    assert!(
        h.mock
            .wait_until(|m| m.messages_of_type("heartbeat").len() >= 3, WAIT)
            .await
    );
    let (status, body) = h.http_get("/ready").await;
    assert_eq!((status, body.contains("\"connected\":true")), (200, true));
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_mode_registers_without_auth() {
    let h = start_with(
        MockConfig {
            auth: AuthMode::None,
            ..MockConfig::default()
        },
        |c| c,
        ExecutorRegistry::new(),
    )
    .await;
    h.registered().await;
    assert!(h.mock.messages_of_type("auth.request").is_empty());
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failure_stops_reconnecting_and_health_says_why() {
    let h = start(|c| c.with_token(format!("kat_{}", "0".repeat(64)))).await;
    let state = common::wait_state(&h.agent, |s| {
        matches!(s.connection, ConnectionState::AuthFailed(_))
    })
    .await;
    assert!(state
        .last_error
        .unwrap()
        .contains("Invalid or expired token"));
    let (status, body) = h.http_get("/health").await;
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        health["stoppedReason"]
            .as_str()
            .unwrap()
            .contains("authentication failed"),
        "{health}"
    );
    assert!(!body.contains(&"0".repeat(64)), "token leaked into /health");
    assert_eq!(h.http_get("/ready").await.0, 503);
    // No second attempt: the connection task ended without scheduling one (it counts a
    // reconnect before it sleeps), and only one token ever reached the mock.
    let metrics = h.http_get("/metrics").await.1;
    assert_eq!(
        metrics_value(&metrics, "kici_agent_reconnects_total"),
        Some(0.0)
    );
    let attempts = h
        .mock
        .received()
        .iter()
        .filter(|r| r.msg["type"] == "auth.request")
        .count();
    assert_eq!(attempts, 1);
}

/// The value of an unlabelled metric in a Prometheus text exposition.
fn metrics_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A reconnect policy with short, exact (jitter-free) delays, so tests never wait on the
/// reference agent's 1 s steps; `stable_after` keeps its default unless a test sets it.
fn quick_reconnects() -> ReconnectPolicy {
    ReconnectPolicy {
        initial_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(200),
        jitter: 0.0,
        ..ReconnectPolicy::default()
    }
}

/// The next `count` reconnects the agent schedules, as `(attempt, delay_ms)`, in order.
async fn scheduled_reconnects(agent: &kici_agent_core::Agent, count: usize) -> Vec<(u32, u64)> {
    let deadline = Instant::now() + WAIT;
    let mut scheduled = Vec::new();
    while scheduled.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "only {scheduled:?} scheduled");
        let event = tokio::task::block_in_place(|| agent.next_event(Some(left)));
        if let Some(Event::ReconnectScheduled { attempt, delay_ms }) = event {
            scheduled.push((attempt, delay_ms));
        }
    }
    scheduled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_until_registered_and_after_a_disconnect_then_reconnects_at_the_first_step() {
    let mock = kici_mock_orchestrator::MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    mock.set_accepting(false);
    let config = common::config_for(&mock)
        .with_reconnect(ReconnectPolicy {
            // Any registration resets: the session below lasts at least three heartbeats.
            stable_after: Duration::from_millis(100),
            ..quick_reconnects()
        })
        .build()
        .unwrap();
    let agent = kici_agent_core::Agent::new(config).unwrap();
    agent.start().unwrap();
    let addr = agent.http_addr().unwrap();
    let (status, body) = common::http_get(addr, "/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("not ready"));
    // Refused connections never register: the delays grow.
    assert_eq!(
        scheduled_reconnects(&agent, 3).await,
        [(0, 10), (1, 15), (2, 22)]
    );
    mock.set_accepting(true);
    let h = Harness { mock, agent };
    common::wait_state(&h.agent, |s| s.registered).await;
    assert_eq!(h.http_get("/ready").await.0, 200);
    assert!(
        h.mock
            .wait_until(|m| m.messages_of_type("heartbeat").len() >= 3, WAIT)
            .await
    );

    // Lose a registration that lasted: not ready until registered again, and the backoff
    // starts over at its first step.
    let registrations_before = h.mock.registrations().len();
    h.mock.set_accepting(false);
    h.mock.disconnect(&h.agent_id(), 1001).await.unwrap();
    // The refused attempts after it climb again from the first step.
    assert_eq!(scheduled_reconnects(&h.agent, 2).await, [(0, 10), (1, 15)]);
    assert!(!h.agent.state().registered);
    assert_eq!(h.http_get("/ready").await.0, 503);
    let metrics = h.http_get("/metrics").await.1;
    assert!(
        metrics.contains("kici_agent_connection_status 0"),
        "{metrics}"
    );
    h.mock.set_accepting(true);
    assert!(
        h.mock
            .wait_until(|m| m.registrations().len() > registrations_before, WAIT)
            .await
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_closing_right_after_register_ack_sees_growing_delays() {
    let h = start_with(
        MockConfig {
            close_after_register_ack: Some(1012),
            ..MockConfig::default()
        },
        |c| c.with_reconnect(quick_reconnects()),
        ExecutorRegistry::new(),
    )
    .await;
    // Each of these sessions registered, but none lasted `stable_after` (30 s): no reset.
    assert_eq!(
        scheduled_reconnects(&h.agent, 6).await,
        [(0, 10), (1, 15), (2, 22), (3, 33), (4, 50), (5, 75)]
    );
    assert!(h.mock.registrations().len() >= 6);
    assert!(h
        .mock
        .closes()
        .iter()
        .all(|c| c.by_server && c.code == Some(1012)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_inbound_types_and_garbage_are_ignored() {
    let h = start(|c| c).await;
    h.registered().await;
    let id = h.agent_id();
    h.mock
        .send_raw(
            &id,
            r#"{"type":"fleet.logs.request","requestId":"x","logWindowHours":1,"maxBytes":10}"#,
        )
        .await
        .unwrap();
    h.mock
        .send_raw(&id, r#"{"type":"something.new"}"#)
        .await
        .unwrap();
    h.mock.send_raw(&id, "this is not json").await.unwrap();
    h.mock
        .send_raw(
            &id,
            r#"{"type":"job.cancel","runId":"r","jobId":"unknown-job","reason":"x"}"#,
        )
        .await
        .unwrap();
    // Still connected: a job still runs end to end on the same connection.
    h.dispatch("after-garbage", json!([{"name": "s", "run": "echo fine"}]))
        .await;
    assert_eq!(h.terminal_status("after-garbage").await["state"], "success");
    assert_eq!(h.mock.registrations().len(), 1, "the agent reconnected");
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_seed_metric() {
    let h = start(|c| c).await;
    h.registered().await;
    let (status, body) = h.http_get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "kici_agent_jobs_total",
        "kici_agent_jobs_active",
        "kici_agent_steps_total",
        "kici_agent_step_duration_seconds",
        "kici_agent_clone_duration_seconds",
        "kici_agent_log_bytes_total",
        "kici_agent_log_backpressure_events_total",
        "kici_agent_log_lines_dropped_total",
        "kici_agent_log_backpressure_active",
        "kici_agent_connection_status",
    ] {
        assert!(body.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    assert!(body.contains("kici_agent_connection_status 1"));
    assert_eq!(h.http_get("/nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_mib_burst_is_split_under_the_limits() {
    let h = start(|c| c).await;
    h.registered().await;
    // 5 MiB of 1000-byte lines written as fast as the shell can.
    let step =
        json!([{"name": "burst", "run": "head -c 5242880 /dev/zero | tr '\\0' x | fold -w 1000"}]);
    h.dispatch("burst", step).await;
    assert_eq!(h.terminal_status("burst").await["state"], "success");
    let lines = h.lines("burst", 0);
    assert_eq!(lines.len(), 5243);
    assert!(lines[..5242].iter().all(|l| l.len() == 1000));
    let biggest = h.mock.received().iter().map(|r| r.text_len).max().unwrap();
    assert!(biggest < 2 * 1024 * 1024, "a frame of {biggest} units");
    assert!(h.mock.closes().iter().all(|c| c.code != Some(4003)));
    h.assert_no_violations();
}
