//! Connection, authentication and registration rules (protocol.md §1.1, §2, §3).

mod common;

use common::{auth_request, no_auth_config, register, token_config, Client, PROMPT};
use std::time::Duration;

use kici_mock_orchestrator::{MockConfig, MockOrchestrator, TEST_TOKEN};
use serde_json::json;

#[tokio::test]
async fn token_success_then_register_ack() {
    let mock = MockOrchestrator::start(token_config()).await.unwrap();
    let mut client = Client::connect(&mock.ws_url()).await;
    client.send(&auth_request(TEST_TOKEN)).await;
    let success = client.recv().await;
    assert_eq!(success["type"], "auth.success");
    let connection_id = success["connectionId"].as_str().unwrap();
    assert_eq!(connection_id.len(), 36, "a UUID: {connection_id}");

    client.send(&register("agent-1")).await;
    let ack = client.recv().await;
    assert_eq!(
        ack,
        json!({"type": "register.ack", "agentId": "agent-1",
               "labels": ["linux-ci", "kici:os:linux"], "scalerManaged": false})
    );
    assert_eq!(mock.registered_agents(), vec!["agent-1".to_string()]);
    assert_eq!(mock.registrations().len(), 1);
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());

    // Re-registering on the open socket is allowed and answered again.
    client.send(&register("agent-1")).await;
    assert_eq!(client.recv().await["type"], "register.ack");
    assert_eq!(mock.registrations().len(), 2);
    mock.shutdown().await;
}

#[tokio::test]
async fn wrong_token_gets_auth_failure_and_4010() {
    let mock = MockOrchestrator::start(token_config()).await.unwrap();
    let mut client = Client::connect(&mock.ws_url()).await;
    client.send(&auth_request("kat_wrong")).await;
    assert_eq!(
        client.recv().await,
        json!({"type": "auth.failure", "reason": "Invalid or expired token"})
    );
    assert_eq!(
        client.expect_close().await,
        (Some(4010), "Authentication failed".to_string())
    );
    let closes = mock.closes();
    assert_eq!(closes.len(), 1);
    assert!(closes[0].by_server);
    assert!(mock.registered_agents().is_empty());
}

#[tokio::test]
async fn frame_sent_before_auth_success_closes_4003() {
    let mock = MockOrchestrator::start(token_config()).await.unwrap();
    let mut client = Client::connect(&mock.ws_url()).await;
    client.send(&auth_request(TEST_TOKEN)).await;
    client.send(&register("eager")).await;
    let (code, _) = client.expect_close().await;
    assert_eq!(code, Some(4003));
    assert!(mock.registered_agents().is_empty());
    assert_eq!(mock.violations().len(), 1, "{:?}", mock.violations());
    let register_frame = &mock.received()[1];
    assert_eq!(register_frame.msg["type"], "agent.register");
    assert!(!register_frame.accepted);
}

#[tokio::test]
async fn heartbeat_before_register_in_token_mode_is_4010() {
    let mock = MockOrchestrator::start(token_config()).await.unwrap();
    let mut client = Client::connect(&mock.ws_url()).await;
    client
        .send(&json!({"type": "heartbeat", "timestamp": common::now_ms()}))
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "auth.failure", "reason": "First message must be auth.request"})
    );
    assert_eq!(client.expect_close().await.0, Some(4010));
}

#[tokio::test]
async fn heartbeat_after_auth_but_before_register_is_4003() {
    let mock = MockOrchestrator::start(token_config()).await.unwrap();
    let mut client = Client::connect(&mock.ws_url()).await;
    client.send(&auth_request(TEST_TOKEN)).await;
    assert_eq!(client.recv().await["type"], "auth.success");
    client
        .send(&json!({"type": "heartbeat", "timestamp": common::now_ms()}))
        .await;
    assert_eq!(
        client.expect_close().await,
        (
            Some(4003),
            "First message must be agent.register".to_string()
        )
    );
}

#[tokio::test]
async fn protocol_version_zero_is_4005() {
    let mock = MockOrchestrator::start(token_config()).await.unwrap();
    let mut client = Client::connect(&mock.ws_url()).await;
    client
        .send(&json!({"type": "auth.request", "token": TEST_TOKEN, "protocolVersion": 0}))
        .await;
    assert_eq!(
        client.recv().await["reason"],
        "Unsupported protocol version"
    );
    assert_eq!(client.expect_close().await.0, Some(4005));
}

#[tokio::test]
async fn auth_and_registration_timeouts_are_4002() {
    let mock = MockOrchestrator::start(MockConfig {
        auth_timeout: Duration::from_millis(300),
        ..token_config()
    })
    .await
    .unwrap();
    let mut silent = Client::connect(&mock.ws_url()).await;
    assert_eq!(
        silent.expect_close().await,
        (Some(4002), "Auth timeout".to_string())
    );

    // Only the registration timer is short here: the auth request need not beat anything.
    let mock = MockOrchestrator::start(MockConfig {
        register_timeout: Duration::from_millis(300),
        ..token_config()
    })
    .await
    .unwrap();
    let mut unregistered = Client::connect(&mock.ws_url()).await;
    unregistered.send(&auth_request(TEST_TOKEN)).await;
    assert_eq!(unregistered.recv().await["type"], "auth.success");
    assert_eq!(
        unregistered.expect_close().await,
        (Some(4002), "Registration timeout".to_string())
    );
}

#[tokio::test]
async fn none_mode_registers_directly_and_rejects_auth_request() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = Client::connect(&mock.ws_url()).await;
    client.send(&register("free-agent")).await;
    assert_eq!(client.recv().await["type"], "register.ack");
    assert!(
        mock.wait_until(|m| m.registered_agents() == ["free-agent"], PROMPT)
            .await
    );

    let mut with_token = Client::connect(&mock.ws_url()).await;
    with_token.send(&auth_request(TEST_TOKEN)).await;
    assert_eq!(
        with_token.expect_close().await,
        (
            Some(4003),
            "First message must be agent.register".to_string()
        )
    );
}

#[tokio::test]
async fn invalid_register_is_4003_without_error_frame() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let mut client = Client::connect(&mock.ws_url()).await;
    let mut bad = register("bad");
    bad["maxConcurrency"] = json!(0);
    client.send(&bad).await;
    assert_eq!(client.expect_close().await.0, Some(4003));
    assert!(mock.registered_agents().is_empty());
}

#[tokio::test]
async fn heartbeat_timeout_is_4004() {
    let mock = MockOrchestrator::start(kici_mock_orchestrator::MockConfig {
        heartbeat_timeout: std::time::Duration::from_millis(300),
        ..no_auth_config()
    })
    .await
    .unwrap();
    let mut client = Client::registered(&mock, "sleepy").await;
    assert_eq!(
        client.expect_close().await,
        (Some(4004), "Heartbeat timeout".to_string())
    );
    assert!(mock.registered_agents().is_empty());
}

#[tokio::test]
async fn malformed_json_is_4003() {
    let mock = MockOrchestrator::start(token_config()).await.unwrap();
    let mut client = Client::connect(&mock.ws_url()).await;
    client.send_text("{not json").await;
    assert_eq!(
        client.expect_close().await,
        (Some(4003), "Malformed JSON".to_string())
    );
    assert!(!mock.received()[0].accepted);
}

#[tokio::test]
async fn refused_while_not_accepting_then_back_on_the_same_port() {
    let mock = MockOrchestrator::start(no_auth_config()).await.unwrap();
    let addr = mock
        .ws_url()
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_string();
    mock.set_accepting(false);
    // Effective at once at the WebSocket level, then at the TCP level.
    assert!(tokio_tungstenite::connect_async(mock.ws_url())
        .await
        .is_err());
    assert!(mock.wait_until(|m| !m.is_listening(), PROMPT).await);
    let refused = tokio::net::TcpStream::connect(&addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    mock.set_accepting(true);
    assert!(mock.wait_until(|m| m.is_listening(), PROMPT).await);
    let mut client = Client::connect(&mock.ws_url()).await;
    client.send(&register("back")).await;
    assert_eq!(client.recv().await["type"], "register.ack");
    mock.shutdown().await;
}
