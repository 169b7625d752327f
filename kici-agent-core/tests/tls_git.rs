//! git HTTPS clones trust the extra CA file of an agent once it started (`KICI_TLS_CA_FILE`).
//! A test binary of its own: libgit2's trust store is process-wide, so a CA added here would
//! leak into any other test of the same process.

// Cloning needs the `git` feature.
#![cfg(feature = "git")]

use std::path::Path;

use kici_agent_core::internals::checkout::{checkout, CheckoutRequest};
use kici_agent_core::{Agent, AgentConfig};
use kici_mock_orchestrator::MockTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTPS server (certificate from `tls`'s CA) answering every request with 404: reaching
/// it proves the TLS handshake succeeded.
fn serve_404(runtime: &tokio::runtime::Runtime, tls: &MockTls) -> u16 {
    let acceptor = tls.acceptor().clone();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(stream).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buffer = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    port
}

fn clone_error(url: &str, dest: &Path) -> String {
    let request = CheckoutRequest {
        repo_url: url,
        git_ref: "main",
        sha: "",
        credentials: None,
    };
    match checkout(&request, dest, &|| false, &mut |_| {}) {
        Ok(_) => panic!("the 404 server cannot serve a clone"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn git_https_clones_trust_the_agents_extra_ca_once_it_started() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tls = MockTls::generate().unwrap();
    let port = serve_404(&runtime, &tls);
    let url = format!("https://127.0.0.1:{port}/org/repo.git");
    let work = tempfile::tempdir().unwrap();

    let before = clone_error(&url, &work.path().join("before"));
    assert!(before.contains("certificate"), "{before}");

    let ca = work.path().join("ca.pem");
    std::fs::write(&ca, tls.ca_pem()).unwrap();
    let config = AgentConfig::builder("ws://127.0.0.1:9/ws")
        .with_port(0)
        .with_bind_address("127.0.0.1".parse().unwrap())
        .with_tls_ca_file(&ca)
        .build()
        .unwrap();
    let agent = Agent::new(config).unwrap();
    agent.start().unwrap();

    let after = clone_error(&url, &work.path().join("after"));
    assert!(!after.contains("certificate"), "{after}");
    assert!(
        after.contains("404"),
        "the clone did not reach the server: {after}"
    );
    drop(agent);
}
