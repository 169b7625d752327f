//! Traffic after registration: the accepted union, field checks, ownership (§4.2, §5.1, §7).

mod common;

use std::time::{Duration, Instant};

use common::{no_auth_config, Client, PROMPT};
use kici_mock_orchestrator::{sample_dispatch, MockOrchestrator};
use serde_json::{json, Value};

fn job_status(job_id: &str, state: &str, data: Option<Value>) -> Value {
    let mut msg = json!({"type": "job.status", "messageId": format!("st-{state}"), "runId": "run-1",
                         "jobId": job_id, "state": state, "timestamp": common::now_ms()});
    if let Some(data) = data {
        msg["data"] = data;
    }
    msg
}

/// A registered client that owns job `job-1` (dispatched and acknowledged).
async fn client_with_job(mock: &MockOrchestrator) -> Client {
    let mut client = Client::registered(mock, "agent-1").await;
    let dispatch = sample_dispatch(
        "run-1",
        "job-1",
        "file:///repo",
        "main",
        "abc123",
        json!([{"name": "unit", "hasOutputs": false}]),
    );
    mock.dispatch("agent-1", dispatch).await.unwrap();
    assert_eq!(client.recv().await["type"], "job.dispatch");
    client
        .send(
            &json!({"type": "job.ack", "messageId": "ack-1", "runId": "run-1", "jobId": "job-1",
                      "timestamp": common::now_ms()}),
        )
        .await;
    client
}

async fn expect_invalid_message(client: &mut Client) {
    assert_eq!(
        client.recv().await,
        json!({"type": "error", "code": "INVALID_MESSAGE", "message": "Invalid message format"})
    );
    assert_eq!(
        client.expect_close().await,
        (Some(4003), "Invalid message".to_string())
    );
}

#[tokio::test]
async fn unknown_type_after_register_gets_error_frame_and_4003() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = Client::registered(&mock, "agent-1").await;
    client.send(&json!({"type": "ack", "messageId": "m"})).await;
    expect_invalid_message(&mut client).await;
    assert_eq!(mock.violations().len(), 1, "{:?}", mock.violations());
    assert!(mock.registered_agents().is_empty());
}

#[tokio::test]
async fn negative_step_index_in_step_status_is_invalid() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = client_with_job(&mock).await;
    client
        .send(
            &json!({"type": "step.status", "messageId": "s", "runId": "run-1", "jobId": "job-1",
                      "stepIndex": -1, "stepName": "unit", "state": "running",
                      "timestamp": common::now_ms()}),
        )
        .await;
    expect_invalid_message(&mut client).await;
}

#[tokio::test]
async fn a_clean_job_leaves_no_violations() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = client_with_job(&mock).await;
    let now = common::now_ms();
    for msg in [
        json!({"type": "config.ack", "messageId": "c", "agentId": "agent-1"}),
        job_status("job-1", "running", None),
        json!({"type": "step.status", "messageId": "s0", "runId": "run-1", "jobId": "job-1",
               "stepIndex": 0, "stepName": "unit", "state": "running", "timestamp": now}),
        json!({"type": "log.chunk", "messageId": "l", "runId": "run-1", "jobId": "job-1",
               "stepIndex": -1, "lines": ["[kici] hello"], "timestamp": now}),
        json!({"type": "job.heartbeat", "runId": "run-1", "jobId": "job-1", "timestamp": now}),
        json!({"type": "run.event", "runId": "run-1", "eventType": "agent.execution.start",
               "timestampMs": now, "sourceService": "agent", "jobId": "job-1", "durationMs": null}),
        json!({"type": "step.status", "messageId": "s1", "runId": "run-1", "jobId": "job-1",
               "stepIndex": 0, "stepName": "unit", "state": "failed", "timestamp": now,
               "data": {"durationMs": 5, "error": "Command failed with exit code 1", "exitCode": 1},
               "logBytesStreamed": 12}),
        job_status(
            "job-1",
            "failed",
            Some(json!({"error": "Step 'unit' failed"})),
        ),
        json!({"type": "heartbeat", "timestamp": now}),
    ] {
        client.send(&msg).await;
    }
    let last = mock
        .wait_for(|r| r.msg["type"] == "heartbeat", PROMPT)
        .await
        .unwrap();
    assert!(last.accepted);
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    assert!(mock.received().iter().all(|r| r.accepted));
    assert_eq!(mock.messages_of_type("job.status").len(), 2);
    assert!(mock.ack_latency("job-1").is_some());
}

#[tokio::test]
async fn object_data_error_is_accepted_but_recorded_as_a_violation() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = client_with_job(&mock).await;
    client
        .send(&job_status(
            "job-1",
            "failed",
            Some(json!({"error": {"message": "boom"}})),
        ))
        .await;
    let status = mock
        .wait_for(|r| r.msg["type"] == "job.status", PROMPT)
        .await
        .unwrap();
    assert!(
        status.accepted,
        "the real orchestrator stores it as \"[object Object]\""
    );
    let violations = mock.violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].contains("data.error"), "{violations:?}");
}

#[tokio::test]
async fn messages_for_jobs_not_owned_are_dropped_and_five_close_1001() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = client_with_job(&mock).await;
    for _ in 0..5 {
        client
            .send(&job_status("someone-elses-job", "running", None))
            .await;
    }
    assert_eq!(client.expect_close().await.0, Some(1001));
    let foreign: Vec<_> = mock
        .received()
        .into_iter()
        .filter(|r| r.msg["jobId"] == "someone-elses-job")
        .collect();
    assert_eq!(foreign.len(), 5);
    assert!(foreign.iter().all(|r| !r.accepted));
}

#[tokio::test]
async fn feature_requests_get_unavailable_answers() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = client_with_job(&mock).await;
    client
        .send(
            &json!({"type": "job.concurrency.report", "messageId": "cr-1", "runId": "run-1",
                      "jobId": "job-1", "group": "deploy"}),
        )
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "job.concurrency.ack", "requestId": "cr-1", "action": "proceed"})
    );
}

#[tokio::test]
async fn wait_for_wakes_on_arrival() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = Client::registered(&mock, "agent-1").await;
    let waiter = {
        let mock = mock.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let found = mock
                .wait_for(|r| r.msg["type"] == "agent.status", Duration::from_secs(30))
                .await;
            (found, started.elapsed())
        })
    };
    // Let the waiter park first, so it is woken by the arrival rather than finding it on entry.
    tokio::task::yield_now().await;
    client
        .send(&json!({"type": "agent.status", "messageId": "a", "agentId": "agent-1", "activeJobs": 0}))
        .await;
    let (found, waited) = waiter.await.unwrap();
    assert_eq!(found.unwrap().msg["activeJobs"], 0);
    assert!(
        waited < PROMPT,
        "woken promptly, not at the timeout: {waited:?}"
    );
    // Past frames are found too.
    assert!(mock
        .wait_for(|r| r.msg["type"] == "agent.register", Duration::ZERO)
        .await
        .is_some());
}
