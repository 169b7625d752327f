//! A tiny raw WebSocket agent for exercising the mock, plus fast test configurations.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kici_mock_orchestrator::{AuthMode, MockConfig, MockOrchestrator, TEST_TOKEN};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for anything a test awaits that should happen promptly.
pub const PROMPT: Duration = Duration::from_secs(5);

/// Token mode with the real orchestrator's timers: no test races them on a loaded machine. A
/// test of a timer shortens that one only, where nothing has to beat it.
pub fn token_config() -> MockConfig {
    MockConfig::default()
}

/// None mode with the real orchestrator's timers.
pub fn no_auth_config() -> MockConfig {
    MockConfig {
        auth: AuthMode::None,
        ..token_config()
    }
}

pub fn auth_request(token: &str) -> Value {
    json!({"type": "auth.request", "token": token, "protocolVersion": 1})
}

pub fn register(agent_id: &str) -> Value {
    json!({
        "type": "agent.register",
        "messageId": format!("register-{agent_id}-1"),
        "agentId": agent_id,
        "labels": ["linux-ci", "kici:os:linux"],
        "platform": "linux",
        "arch": "x64",
        "version": "0.1.0",
        "runningAsUid": 1001,
    })
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// What the server sent next.
#[derive(Debug)]
pub enum Event {
    Text(Value),
    Closed { code: Option<u16>, reason: String },
}

/// A raw agent connection.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        // No Nagle: back-to-back frames must reach the mock back to back.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .expect("connect to the mock");
        Client { ws }
    }

    /// Token mode: authenticates with TEST_TOKEN and registers as `agent_id`.
    pub async fn registered(mock: &MockOrchestrator, agent_id: &str) -> Client {
        let mut client = Client::connect(&mock.ws_url()).await;
        if matches!(mock.config().auth, AuthMode::Token(_)) {
            client.send(&auth_request(TEST_TOKEN)).await;
            assert_eq!(client.recv().await["type"], "auth.success");
        }
        client.send(&register(agent_id)).await;
        let ack = client.recv().await;
        assert_eq!(ack["type"], "register.ack");
        client
    }

    pub async fn send(&mut self, msg: &Value) {
        self.send_text(&msg.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .expect("send a frame");
    }

    pub async fn next_event(&mut self) -> Event {
        loop {
            let frame = tokio::time::timeout(PROMPT, self.ws.next())
                .await
                .expect("the mock answers in time");
            match frame {
                Some(Ok(Message::Text(text))) => {
                    return Event::Text(serde_json::from_str(text.as_str()).expect("JSON"))
                }
                Some(Ok(Message::Close(frame))) => {
                    return Event::Closed {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    return Event::Closed {
                        code: None,
                        reason: String::new(),
                    }
                }
            }
        }
    }

    /// The next text frame; panics on a close.
    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Text(msg) => msg,
            closed => panic!("expected a message, got {closed:?}"),
        }
    }

    /// The close that must come next; panics on a text frame.
    pub async fn expect_close(&mut self) -> (Option<u16>, String) {
        match self.next_event().await {
            Event::Closed { code, reason } => (code, reason),
            Event::Text(msg) => panic!("expected a close, got {msg}"),
        }
    }
}

impl Client {
    /// Closes from the agent side and waits for the server's close reply.
    pub async fn close(mut self, code: u16, reason: &str) {
        use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        self.ws.close(Some(frame)).await.expect("send close");
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PROMPT, self.ws.next()).await {}
    }
}
