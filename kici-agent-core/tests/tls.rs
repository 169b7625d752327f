//! `wss://` against the mock orchestrator in TLS mode, its certificate signed by a CA generated
//! for the test (loopback only). The environment-variable paths (`SSL_CERT_FILE`,
//! `NODE_EXTRA_CA_CERTS`) are tested through the binary, where each agent has its own environment.

mod common;

use common::{start_with, WAIT};
use kici_agent_core::{AgentConfig, ConfigError, ConnectionState, ExecutorRegistry};
use kici_mock_orchestrator::{MockConfig, MockTls, TEST_TOKEN};

fn tls_mock() -> (MockConfig, MockTls) {
    let tls = MockTls::generate().expect("test certificates");
    let config = MockConfig {
        tls: Some(tls.clone()),
        ..MockConfig::default()
    };
    (config, tls)
}

fn ca_file(tls: &MockTls) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), tls.ca_pem()).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_registers_when_the_ca_is_trusted_through_the_setting() {
    let (mock_config, tls) = tls_mock();
    let ca = ca_file(&tls);
    let h = start_with(
        mock_config,
        |c| c.with_tls_ca_file(ca.path()),
        ExecutorRegistry::new(),
    )
    .await;
    assert!(h.mock.ws_url().starts_with("wss://127.0.0.1:"));
    h.registered().await;
    assert!(h.mock.tls_failures().is_empty());
    // The whole session runs over TLS: heartbeats follow the registration.
    assert!(
        h.mock
            .wait_until(|m| !m.messages_of_type("heartbeat").is_empty(), WAIT)
            .await
    );
    assert_eq!(h.agent.state().last_error, None);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_a_clear_error_and_the_agent_keeps_retrying() {
    let (mock_config, _tls) = tls_mock();
    let h = start_with(mock_config, |c| c, ExecutorRegistry::new()).await;
    // Two refused handshakes: the failure is not treated as permanent.
    assert!(
        h.mock
            .wait_until(|m| m.tls_failures().len() >= 2, WAIT)
            .await,
        "the agent did not retry: {:?}",
        h.mock.tls_failures()
    );
    let port = h
        .mock
        .ws_url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/ws")
        .to_owned();
    let expected = format!(
        "TLS handshake with 127.0.0.1:{port} failed: invalid peer certificate: UnknownIssuer"
    );
    let state = h.agent.state();
    assert_eq!(state.last_error.as_deref(), Some(expected.as_str()));
    assert!(!matches!(
        state.connection,
        ConnectionState::AuthFailed(_) | ConnectionState::Closed
    ));
    let (status, body) = h.http_get("/health").await;
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["lastError"], expected.as_str(), "{health}");
    assert!(health.get("stoppedReason").is_none(), "{health}");
    assert!(!body.contains(TEST_TOKEN), "token leaked into /health");
    assert_eq!(h.http_get("/ready").await.0, 503);
    // Nothing got past TLS, so the token never left the agent.
    assert!(h.mock.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_without_certificates_is_refused_at_build() {
    let empty = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(empty.path(), "not a certificate\n").unwrap();
    let missing = empty.path().with_extension("missing");
    for (path, expected) in [
        (empty.path().to_owned(), "contains no PEM certificate"),
        (missing, "cannot read"),
    ] {
        let error = AgentConfig::builder("wss://orchestrator.example/ws")
            .with_tls_ca_file(&path)
            .build()
            .unwrap_err();
        let ConfigError::Invalid(issues) = &error else {
            panic!("expected invalid values, got {error}");
        };
        assert_eq!(issues.len(), 1, "{error}");
        assert_eq!(issues[0].setting, "KICI_TLS_CA_FILE");
        assert!(issues[0].message.contains(expected), "{error}");
    }
}
