//! Dispatch, ack deadline and cancel (§4.1, §5.1).

mod common;

use common::{no_auth_config, Client, PROMPT};
use std::time::Duration;

use kici_mock_orchestrator::{sample_dispatch, MockConfig, MockError, MockOrchestrator};
use serde_json::json;

fn dispatch(job_id: &str) -> serde_json::Value {
    sample_dispatch(
        "run-1",
        job_id,
        "file:///repo",
        "main",
        "abc123",
        json!([{"name": "unit", "hasOutputs": false}]),
    )
}

#[tokio::test]
async fn dispatch_without_ack_gets_cancel_and_4031() {
    let mock = MockOrchestrator::start(MockConfig {
        dispatch_ack_timeout: Duration::from_millis(300),
        ..no_auth_config()
    })
    .await
    .unwrap();
    let mut client = Client::registered(&mock, "agent-1").await;
    mock.dispatch("agent-1", dispatch("job-1")).await.unwrap();
    let sent = client.recv().await;
    assert_eq!(sent["type"], "job.dispatch");
    assert_eq!(sent["jobId"], "job-1");

    let cancel = client.recv().await;
    assert_eq!(cancel["type"], "job.cancel");
    assert_eq!(cancel["jobId"], "job-1");
    assert_eq!(cancel["runId"], "run-1");
    assert_eq!(cancel["reason"], "dispatch ack timeout");
    assert!(cancel.get("force").is_none());
    assert_eq!(client.expect_close().await.0, Some(4031));
    assert!(mock.registered_agents().is_empty());
    assert_eq!(mock.ack_latency("job-1"), None);
    assert_eq!(mock.violations().len(), 1, "{:?}", mock.violations());
}

#[tokio::test]
async fn running_status_counts_as_ack_and_latency_is_recorded() {
    // Long enough that the status beats it on a loaded machine, short enough to wait past.
    let mock = MockOrchestrator::start(MockConfig {
        dispatch_ack_timeout: Duration::from_secs(2),
        ..no_auth_config()
    })
    .await
    .unwrap();
    let mut client = Client::registered(&mock, "agent-1").await;
    mock.dispatch("agent-1", dispatch("job-2")).await.unwrap();
    assert_eq!(client.recv().await["type"], "job.dispatch");
    client
        .send(
            &json!({"type": "job.status", "messageId": "s", "runId": "run-1", "jobId": "job-2",
                      "state": "running", "timestamp": common::now_ms()}),
        )
        .await;
    assert!(
        mock.wait_until(|m| m.ack_latency("job-2").is_some(), PROMPT)
            .await
    );
    // Past the deadline, the connection must still be open.
    let closed = mock
        .wait_for_close(|_| true, mock.config().dispatch_ack_timeout * 3 / 2)
        .await;
    assert_eq!(closed, None);
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
}

#[tokio::test]
async fn cancel_carries_force_only_when_set() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = Client::registered(&mock, "agent-1").await;
    mock.cancel("agent-1", "run-1", "job-1", false)
        .await
        .unwrap();
    let graceful = client.recv().await;
    assert_eq!(graceful["type"], "job.cancel");
    assert!(graceful["messageId"].is_string());
    assert!(graceful.get("force").is_none());
    mock.cancel("agent-1", "run-1", "job-1", true)
        .await
        .unwrap();
    assert_eq!(client.recv().await["force"], true);
}

#[tokio::test]
async fn commands_to_unknown_agents_fail() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    assert!(matches!(
        mock.dispatch("ghost", dispatch("job-1")).await,
        Err(MockError::UnknownAgent(_))
    ));
    let _client = Client::registered(&mock, "agent-1").await;
    assert!(matches!(
        mock.dispatch("agent-1", json!({"type": "job.dispatch"}))
            .await,
        Err(MockError::InvalidDispatch(_))
    ));
}

#[tokio::test]
async fn send_raw_and_server_disconnect() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = Client::registered(&mock, "agent-1").await;
    mock.send_raw("agent-1", r#"{"type":"future.thing","x":1}"#)
        .await
        .unwrap();
    assert_eq!(client.recv().await["type"], "future.thing");
    mock.disconnect("agent-1", 1001).await.unwrap();
    assert_eq!(client.expect_close().await.0, Some(1001));
    let close = mock.closes().pop().unwrap();
    assert!(close.by_server);
    assert_eq!(close.code, Some(1001));
}

#[tokio::test]
async fn agent_close_is_recorded() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let client = Client::registered(&mock, "agent-1").await;
    client.close(1000, "Auth failed").await;
    let close = mock.wait_for_close(|_| true, PROMPT).await.unwrap();
    assert!(!close.by_server);
    assert_eq!(close.code, Some(1000));
    assert_eq!(close.reason, "Auth failed");
    assert!(mock.registered_agents().is_empty());
}
