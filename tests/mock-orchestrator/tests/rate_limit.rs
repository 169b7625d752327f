//! Inbound rate limiting (§1.2).

mod common;

use std::time::Duration;

use common::{no_auth_config, Client, PROMPT};
use kici_mock_orchestrator::{MockConfig, MockOrchestrator, RateLimits};
use serde_json::json;

fn status(n: u32) -> serde_json::Value {
    json!({"type": "agent.status", "messageId": format!("status-{n}"), "agentId": "agent-1", "activeJobs": 0})
}

#[tokio::test]
async fn over_budget_messages_are_dropped_with_a_warning() {
    let config = MockConfig {
        rate_limits: RateLimits {
            msg_burst: 3.0,
            msgs_per_sec: 0.5,
            ..RateLimits::default()
        },
        ..no_auth_config()
    };
    let mock = MockOrchestrator::start(config).await.unwrap();
    // agent.register takes the first token.
    let mut client = Client::registered(&mock, "agent-1").await;
    for n in 0..3 {
        client.send(&status(n)).await;
    }
    let warning = client.recv().await;
    assert_eq!(warning["type"], "rate.limit.warning");
    let retry_after = warning["retryAfterMs"].as_u64().unwrap();
    assert!((1..=2001).contains(&retry_after), "{retry_after}");

    // Heartbeats are exempt even while over budget.
    client
        .send(&json!({"type": "heartbeat", "timestamp": common::now_ms()}))
        .await;
    let heartbeat = mock
        .wait_for(|r| r.msg["type"] == "heartbeat", PROMPT)
        .await
        .unwrap();
    assert!(heartbeat.accepted);

    let statuses: Vec<bool> = mock
        .received()
        .iter()
        .filter(|r| r.msg["type"] == "agent.status")
        .map(|r| r.accepted)
        .collect();
    assert_eq!(statuses, [true, true, false]);
    assert_eq!(mock.rate_limit_warnings_sent(), 1);
    assert_eq!(mock.dropped_by_rate_limit(), 1);
}

#[tokio::test]
async fn sustained_violation_closes_4003() {
    let config = MockConfig {
        rate_limits: RateLimits {
            msg_burst: 2.0,
            msgs_per_sec: 0.01,
            sustained_violation: Duration::from_millis(100),
            ..RateLimits::default()
        },
        ..no_auth_config()
    };
    let mock = MockOrchestrator::start(config).await.unwrap();
    let mut client = Client::registered(&mock, "agent-1").await;
    client.send(&status(0)).await;
    client.send(&status(1)).await;
    assert_eq!(client.recv().await["type"], "rate.limit.warning");
    // Still over budget once the sustained window has passed.
    let window_over = mock.received().last().unwrap().at + Duration::from_millis(101);
    tokio::time::sleep_until(window_over.into()).await;
    client.send(&status(2)).await;
    assert_eq!(
        client.expect_close().await,
        (Some(4003), "Sustained rate limit violation".to_string())
    );
}

#[tokio::test]
async fn a_3_mib_frame_exceeds_the_byte_burst() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = Client::registered(&mock, "agent-1").await;
    let big_line = "x".repeat(3 * 1024 * 1024);
    client
        .send(
            &json!({"type": "agent.log", "messageId": "big", "agentId": "agent-1",
                      "lines": [big_line], "timestamp": common::now_ms()}),
        )
        .await;
    assert_eq!(
        client.expect_close().await,
        (
            Some(4003),
            "Message exceeds byte burst capacity".to_string()
        )
    );
    let big = mock
        .wait_for(|r| r.msg["messageId"] == "big", PROMPT)
        .await
        .unwrap();
    assert!(!big.accepted);
    assert!(big.text_len > 3 * 1024 * 1024);
}

#[tokio::test]
async fn size_is_measured_in_utf16_code_units() {
    let config = MockConfig {
        rate_limits: RateLimits {
            byte_burst: 1000.0,
            ..RateLimits::default()
        },
        ..no_auth_config()
    };
    let mock = MockOrchestrator::start(config).await.unwrap();
    let mut client = Client::registered(&mock, "agent-1").await;
    // 300 × "é" is 600 UTF-8 bytes but 300 UTF-16 units: under the 1000 burst.
    client
        .send(
            &json!({"type": "agent.log", "messageId": "utf", "agentId": "agent-1",
                      "lines": ["é".repeat(300)], "timestamp": common::now_ms()}),
        )
        .await;
    let frame = mock
        .wait_for(|r| r.msg["messageId"] == "utf", PROMPT)
        .await
        .unwrap();
    assert!(frame.accepted);
    assert!(frame.text_len < 600);
}
