//! One agent connection: the orchestrator's per-socket state machine (protocol.md §1.1, §1.2, §2,
//! §3, §5.1, §7) and the socket loop that feeds it frames, test commands and timer ticks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::config::AuthMode;
use crate::messages;
use crate::rate_limit::{RateDecision, RateLimiter};
use crate::state::{CloseRecord, Command, Received, Shared};
use crate::validate::{
    check_auth_request, check_register, check_union_member, message_type, quality_findings,
    timeline_findings, JOB_SCOPED_FEATURE_TYPES, JOB_SCOPED_TYPES,
};

/// `WS_MAX_PAYLOAD_BYTES` of the real server (§1).
const WS_MAX_PAYLOAD_BYTES: usize = 26_214_400;
/// The orchestrator's WebSocket path (§1; base path `/`).
const WS_PATH: &str = "/ws";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing socket waits for the peer's close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Ownership violations within this window...
const OWNERSHIP_WINDOW: Duration = Duration::from_secs(60);
/// ...that get the connection closed with 1001 (§5.1).
const OWNERSHIP_STRIKES: usize = 5;

/// What a connection runs over: a TCP stream, or TLS over one.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

/// Accepts the WebSocket handshake on `stream` and runs the connection until it ends.
pub(crate) async fn serve_connection(shared: Arc<Shared>, stream: impl Transport) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(WS_MAX_PAYLOAD_BYTES))
        .max_frame_size(Some(WS_MAX_PAYLOAD_BYTES));
    let check = HandshakeCheck(Arc::clone(&shared));
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config));
    let ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(err)) => {
            shared.record_problem(format!("WebSocket handshake failed: {err}"));
            return;
        }
        Err(_) => {
            shared.record_problem("WebSocket handshake timed out".to_string());
            return;
        }
    };
    run_socket(shared, ws).await;
}

/// Only `GET /ws`, with no subprotocol (§1), is a valid agent handshake.
struct HandshakeCheck(Arc<Shared>);

impl Callback for HandshakeCheck {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        if request.uri().path() != WS_PATH {
            self.0.record_problem(format!(
                "WebSocket upgrade on `{}` instead of `{WS_PATH}`",
                request.uri()
            ));
            let mut not_found = ErrorResponse::new(Some("Not Found".to_string()));
            *not_found.status_mut() = StatusCode::NOT_FOUND;
            return Err(not_found);
        }
        if request.headers().contains_key("sec-websocket-protocol") {
            self.0
                .record_problem("agent asked for a WebSocket subprotocol; the protocol uses none");
        }
        Ok(response)
    }
}

/// How the socket loop ended.
enum Ending {
    /// The mock decided to close.
    ByServer { code: u16, reason: String },
    /// The agent sent a close frame.
    ByPeer(Option<CloseFrame>),
    /// The stream failed or ended without a close frame.
    Failed(Option<WsError>),
}

async fn run_socket(shared: Arc<Shared>, mut ws: WebSocketStream<impl Transport>) {
    let (commands_tx, mut commands) = mpsc::unbounded_channel();
    let conn = shared.open_connection(commands_tx);
    let mut session = Session::new(Arc::clone(&shared), conn, Instant::now());
    let ending = loop {
        let wake = tokio::time::Instant::from_std(session.next_deadline());
        let actions = tokio::select! {
            // Frames first: one already waiting on the socket arrived before a timer that a busy
            // runtime fires late (e.g. a frame sent during the token check must still be caught).
            biased;
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => session.on_text(text.as_str()),
                Some(Ok(Message::Binary(bytes))) => session.on_binary(bytes.len()),
                Some(Ok(Message::Close(frame))) => break Ending::ByPeer(frame),
                // Pings are answered by tungstenite itself; the mock never pings.
                Some(Ok(_)) => Vec::new(),
                Some(Err(err)) => break Ending::Failed(Some(err)),
                None => break Ending::Failed(None),
            },
            Some(command) = commands.recv() => session.on_command(command, Instant::now()),
            () = tokio::time::sleep_until(wake) => session.on_timer(Instant::now()),
        };
        if let Some(ending) = perform(&mut ws, actions).await {
            break ending;
        }
    };
    finish(&shared, conn, ws, ending).await;
}

/// Sends the session's frames; stops at the first close or send failure.
async fn perform(ws: &mut WebSocketStream<impl Transport>, actions: Vec<Action>) -> Option<Ending> {
    for action in actions {
        match action {
            Action::Send(text) => {
                if let Err(err) = ws.send(Message::text(text)).await {
                    return Some(Ending::Failed(Some(err)));
                }
            }
            Action::Close { code, reason } => return Some(Ending::ByServer { code, reason }),
        }
    }
    None
}

/// Records the end of the connection *before* the close frame goes out, so a test that saw the
/// close can read the record at once, then completes the close handshake.
async fn finish(
    shared: &Shared,
    conn: u64,
    mut ws: WebSocketStream<impl Transport>,
    ending: Ending,
) {
    let record = |by_server, code, reason: String| CloseRecord {
        conn,
        by_server,
        code,
        reason,
    };
    let server_close = match ending {
        Ending::ByServer { code, reason } => Some((code, reason)),
        Ending::ByPeer(frame) => {
            let (code, reason) = frame.map_or((None, String::new()), |frame| {
                (Some(u16::from(frame.code)), frame.reason.to_string())
            });
            shared.end_connection(record(false, code, reason));
            None
        }
        Ending::Failed(Some(WsError::Capacity(err))) => {
            shared.record_violation(conn, format!("frame too large for the transport: {err}"));
            Some((1009, "Max payload size exceeded".to_string()))
        }
        Ending::Failed(Some(WsError::Utf8(err))) => {
            shared.record_violation(conn, format!("text frame is not UTF-8: {err}"));
            Some((1007, "Invalid UTF-8".to_string()))
        }
        Ending::Failed(Some(WsError::Protocol(err))) => {
            shared.record_violation(conn, format!("WebSocket protocol error: {err}"));
            Some((1002, "Protocol error".to_string()))
        }
        Ending::Failed(_) => {
            shared.end_connection(record(false, None, String::new()));
            None
        }
    };
    if let Some((code, reason)) = server_close {
        shared.end_connection(record(true, Some(code), reason.clone()));
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        // The peer may already be gone; the close is recorded either way.
        let _ = ws.send(Message::Close(Some(frame))).await;
    }
    // Reading on flushes tungstenite's close reply and waits for the peer's.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// What the session wants done on the socket, in order.
#[derive(Debug, Clone, PartialEq)]
enum Action {
    Send(String),
    Close { code: u16, reason: String },
}

fn send(msg: Value) -> Action {
    Action::Send(msg.to_string())
}

fn close(code: u16, reason: &str) -> Action {
    Action::Close {
        code,
        reason: reason.to_string(),
    }
}

/// Where the connection is in the handshake (§2 state machine, server side).
#[derive(Debug)]
enum Phase {
    /// Token mode, waiting for `auth.request`.
    AwaitingAuth { deadline: Instant },
    /// Token mode, the (simulated asynchronous) token lookup is in flight.
    CheckingToken {
        ready_at: Instant,
        token_valid: bool,
    },
    /// Waiting for the first `agent.register`.
    AwaitingRegister { deadline: Instant },
    /// Registered as this agent.
    Registered { agent_id: String },
}

/// A dispatch whose acknowledgement is still due.
#[derive(Debug)]
struct PendingAck {
    run_id: String,
    deadline: Instant,
}

/// A dispatch whose ack deadline is not armed yet ([`crate::MockConfig::ack_lookup_delay`]).
#[derive(Debug)]
struct UnarmedAck {
    run_id: String,
    arm_at: Instant,
}

/// Protocol state of one connection. Pure apart from recording into [`Shared`].
struct Session {
    shared: Arc<Shared>,
    conn: u64,
    phase: Phase,
    limiter: RateLimiter,
    last_heartbeat: Instant,
    pending_acks: HashMap<String, PendingAck>,
    /// Dispatches whose deadline is armed later (the orchestrator's ack-timeout lookup).
    unarmed_acks: HashMap<String, UnarmedAck>,
    /// Jobs whose `job.ack` came while no deadline was armed.
    early_acks: HashSet<String>,
    ownership_strikes: VecDeque<Instant>,
}

impl Session {
    fn new(shared: Arc<Shared>, conn: u64, now: Instant) -> Self {
        let config = &shared.config;
        let phase = match config.auth {
            AuthMode::Token(_) => Phase::AwaitingAuth {
                deadline: now + config.auth_timeout,
            },
            AuthMode::None => Phase::AwaitingRegister {
                deadline: now + config.register_timeout,
            },
        };
        Session {
            limiter: RateLimiter::new(config.rate_limits.clone(), now),
            shared,
            conn,
            phase,
            last_heartbeat: now,
            pending_acks: HashMap::new(),
            unarmed_acks: HashMap::new(),
            early_acks: HashSet::new(),
            ownership_strikes: VecDeque::new(),
        }
    }

    /// The earliest moment [`Session::on_timer`] has something to do.
    fn next_deadline(&self) -> Instant {
        let phase_deadline = match &self.phase {
            Phase::AwaitingAuth { deadline } | Phase::AwaitingRegister { deadline } => *deadline,
            Phase::CheckingToken { ready_at, .. } => *ready_at,
            Phase::Registered { .. } => self.last_heartbeat + self.shared.config.heartbeat_timeout,
        };
        let first_ack = self
            .pending_acks
            .values()
            .map(|pending| pending.deadline)
            .chain(self.unarmed_acks.values().map(|unarmed| unarmed.arm_at))
            .min();
        first_ack.map_or(phase_deadline, |ack| ack.min(phase_deadline))
    }

    /// Arms the deadlines whose lookup has finished by `now`, unless an early ack is on
    /// record (the real `armAckDeadline`). Run before anything else at `now`, so a frame that
    /// arrives after the arming time finds the deadline armed even if the timer fires late.
    fn arm_due_deadlines(&mut self, now: Instant) {
        let due: Vec<String> = self
            .unarmed_acks
            .iter()
            .filter(|(_, unarmed)| unarmed.arm_at <= now)
            .map(|(job_id, _)| job_id.clone())
            .collect();
        for job_id in due {
            let Some(unarmed) = self.unarmed_acks.remove(&job_id) else {
                continue;
            };
            if self.early_acks.remove(&job_id) {
                continue;
            }
            let deadline = unarmed.arm_at + self.shared.config.dispatch_ack_timeout;
            self.pending_acks.insert(
                job_id,
                PendingAck {
                    run_id: unarmed.run_id,
                    deadline,
                },
            );
        }
    }

    /// What a job-scoped message does to the ack deadline of its job, as the real dispatcher
    /// handles it: `job.ack` resolves an armed deadline or is remembered as an early ack;
    /// `job.reject`, `job.status running` and a terminal `job.status` resolve an armed deadline
    /// and erase any early ack (`resolvePendingAck`).
    fn settle_ack(&mut self, msg_type: &str, msg: &Value, job_id: &str, now: Instant) {
        let state = msg["state"].as_str().unwrap_or_default();
        let counts_as_ack = matches!(msg_type, "job.ack" | "job.reject")
            || (msg_type == "job.status" && state == "running");
        if counts_as_ack {
            self.shared.mark_acked(job_id, now);
        }
        let resolves = counts_as_ack
            || (msg_type == "job.status" && matches!(state, "success" | "failed" | "cancelled"));
        if !resolves {
            return;
        }
        let was_armed = self.pending_acks.remove(job_id).is_some();
        if msg_type == "job.ack" {
            if !was_armed {
                self.early_acks.insert(job_id.to_string());
            }
        } else {
            self.early_acks.remove(job_id);
        }
    }

    fn record(&self, at: Instant, text_len: usize, msg: Value, accepted: bool) {
        self.shared.record_frame(Received {
            conn: self.conn,
            at,
            text_len,
            msg,
            accepted,
        });
    }

    fn violation(&self, what: impl Into<String>) {
        self.shared.record_violation(self.conn, what);
    }

    fn on_binary(&mut self, len: usize) -> Vec<Action> {
        let placeholder = Value::String(format!("<binary frame of {len} bytes>"));
        self.record(Instant::now(), len, placeholder, false);
        self.violation("binary frame; the protocol uses text frames only");
        vec![close(4003, "Binary frames are not supported")]
    }

    fn on_text(&mut self, text: &str) -> Vec<Action> {
        let now = Instant::now();
        self.arm_due_deadlines(now);
        let text_len = text.encode_utf16().count();
        let msg: Value = match serde_json::from_str(text) {
            Ok(msg) => msg,
            Err(err) => {
                self.record(now, text_len, Value::String(text.to_string()), false);
                self.violation(format!("malformed JSON: {err}"));
                return vec![close(4003, "Malformed JSON")];
            }
        };
        // Heartbeats are exempt from every limit (§1.2).
        if message_type(&msg) != Some("heartbeat") {
            match self.limiter.check(text_len, now) {
                RateDecision::Allow => {}
                RateDecision::Drop { retry_after_ms } => {
                    self.shared.record_rate_limit_drop();
                    self.record(now, text_len, msg, false);
                    return vec![send(messages::rate_limit_warning(retry_after_ms))];
                }
                RateDecision::Close(reason) => {
                    self.record(now, text_len, msg, false);
                    self.violation(format!("rate limiter: {reason} ({text_len} UTF-16 units)"));
                    return vec![close(4003, reason)];
                }
            }
        }
        match &self.phase {
            Phase::AwaitingAuth { .. } => self.on_auth_request(now, text_len, msg),
            Phase::CheckingToken { .. } => {
                let what = format!(
                    "{} sent while the token check was in flight (before auth.success)",
                    describe(&msg)
                );
                self.record(now, text_len, msg, false);
                self.violation(what);
                vec![close(4003, "Not registered")]
            }
            Phase::AwaitingRegister { .. } => self.on_first_register(now, text_len, msg),
            Phase::Registered { agent_id } => {
                let agent_id = agent_id.clone();
                self.on_registered_frame(now, text_len, msg, &agent_id)
            }
        }
    }

    fn on_auth_request(&mut self, now: Instant, text_len: usize, msg: Value) -> Vec<Action> {
        if let Err(problem) = check_auth_request(&msg) {
            self.record(now, text_len, msg, false);
            self.violation(format!(
                "first message is not a valid auth.request: {problem}"
            ));
            return vec![
                send(messages::auth_failure("First message must be auth.request")),
                close(4010, "Authentication failed"),
            ];
        }
        if msg["protocolVersion"].as_f64().unwrap_or_default() < 1.0 {
            let what = format!("unsupported protocolVersion {}", msg["protocolVersion"]);
            self.record(now, text_len, msg, false);
            self.violation(what);
            return vec![
                send(messages::auth_failure("Unsupported protocol version")),
                close(4005, "Unsupported protocol version"),
            ];
        }
        let token_valid = match &self.shared.config.auth {
            AuthMode::Token(expected) => msg["token"].as_str() == Some(expected.as_str()),
            AuthMode::None => false,
        };
        self.record(now, text_len, msg, true);
        self.phase = Phase::CheckingToken {
            ready_at: now + self.shared.config.auth_check_delay,
            token_valid,
        };
        Vec::new()
    }

    fn on_first_register(&mut self, now: Instant, text_len: usize, msg: Value) -> Vec<Action> {
        if let Err(problem) = check_register(&msg) {
            self.record(now, text_len, msg, false);
            self.violation(format!(
                "first message is not a valid agent.register: {problem}"
            ));
            return vec![close(4003, "First message must be agent.register")];
        }
        self.record(now, text_len, msg.clone(), true);
        self.register(now, &msg)
    }

    fn register(&mut self, now: Instant, msg: &Value) -> Vec<Action> {
        let agent_id = msg["agentId"].as_str().unwrap_or_default().to_string();
        self.shared.register_agent(self.conn, &agent_id, msg);
        self.phase = Phase::Registered { agent_id };
        // Registration counts as a heartbeat (§1.1).
        self.last_heartbeat = now;
        let ack = send(messages::register_ack(
            msg,
            self.shared.config.pending_dispatch_on_register,
        ));
        match self.shared.config.close_after_register_ack {
            Some(code) => vec![ack, close(code, "Closing right after registration")],
            None => vec![ack],
        }
    }

    fn on_registered_frame(
        &mut self,
        now: Instant,
        text_len: usize,
        msg: Value,
        agent_id: &str,
    ) -> Vec<Action> {
        let msg_type = message_type(&msg).unwrap_or_default().to_string();
        let problem = match msg_type.as_str() {
            "heartbeat" if msg.get("timestamp").is_some_and(Value::is_number) => {
                self.last_heartbeat = now;
                self.record(now, text_len, msg, true);
                return Vec::new();
            }
            "heartbeat" => Some("heartbeat without a numeric timestamp".to_string()),
            // Forwarded before validation, any shape passes (§4.4).
            "run.event" | "job.context" => {
                for finding in timeline_findings(&msg) {
                    self.violation(finding);
                }
                self.record(now, text_len, msg, true);
                return Vec::new();
            }
            _ => check_union_member(&msg).err(),
        };
        if let Some(problem) = problem {
            self.record(now, text_len, msg, false);
            self.violation(format!("invalid message after registration: {problem}"));
            return vec![
                send(messages::invalid_message_error()),
                close(4003, "Invalid message"),
            ];
        }
        for finding in quality_findings(&msg) {
            self.violation(finding);
        }
        let job_id = msg["jobId"].as_str().unwrap_or_default().to_string();
        if msg_type == "agent.register" {
            self.record(now, text_len, msg.clone(), true);
            return self.register(now, &msg);
        }
        if JOB_SCOPED_TYPES.contains(&msg_type.as_str()) {
            if !self.shared.owns_job(agent_id, &job_id) {
                return self.ownership_violation(now, text_len, msg, agent_id);
            }
            self.settle_ack(&msg_type, &msg, &job_id, now);
            self.record(now, text_len, msg, true);
            return Vec::new();
        }
        if JOB_SCOPED_FEATURE_TYPES.contains(&msg_type.as_str())
            && !self.shared.owns_job(agent_id, &job_id)
        {
            self.violation(format!(
                "{msg_type} for job `{job_id}` not dispatched to `{agent_id}`; dropped silently"
            ));
            self.record(now, text_len, msg, false);
            return Vec::new();
        }
        let response = messages::feature_response(&msg);
        self.record(now, text_len, msg, true);
        response.map(send).into_iter().collect()
    }

    fn ownership_violation(
        &mut self,
        now: Instant,
        text_len: usize,
        msg: Value,
        agent_id: &str,
    ) -> Vec<Action> {
        self.violation(format!(
            "{} for job {} not dispatched to `{agent_id}`; dropped",
            describe(&msg),
            msg["jobId"]
        ));
        self.record(now, text_len, msg, false);
        self.ownership_strikes.push_back(now);
        while self
            .ownership_strikes
            .front()
            .is_some_and(|first| now.duration_since(*first) > OWNERSHIP_WINDOW)
        {
            self.ownership_strikes.pop_front();
        }
        if self.ownership_strikes.len() >= OWNERSHIP_STRIKES {
            return vec![close(1001, "Too many ownership violations")];
        }
        Vec::new()
    }

    fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        self.arm_due_deadlines(now);
        let config = &self.shared.config;
        match &self.phase {
            Phase::AwaitingAuth { deadline } if now >= *deadline => {
                self.violation("no auth.request before the auth timeout");
                return vec![close(4002, "Auth timeout")];
            }
            Phase::CheckingToken {
                ready_at,
                token_valid,
            } if now >= *ready_at => {
                if *token_valid {
                    self.phase = Phase::AwaitingRegister {
                        deadline: now + config.register_timeout,
                    };
                    return vec![send(messages::auth_success())];
                }
                return vec![
                    send(messages::auth_failure("Invalid or expired token")),
                    close(4010, "Authentication failed"),
                ];
            }
            Phase::AwaitingRegister { deadline } if now >= *deadline => {
                self.violation("no agent.register before the registration timeout");
                return vec![close(4002, "Registration timeout")];
            }
            Phase::Registered { .. } if now >= self.last_heartbeat + config.heartbeat_timeout => {
                self.violation(format!(
                    "no heartbeat for {:?} after registration",
                    config.heartbeat_timeout
                ));
                return vec![close(4004, "Heartbeat timeout")];
            }
            _ => {}
        }
        let overdue = self
            .pending_acks
            .iter()
            .find(|(_, pending)| now >= pending.deadline);
        if let Some((job_id, pending)) = overdue {
            self.violation(format!(
                "job {job_id} not acknowledged within {:?} of its dispatch",
                config.dispatch_ack_timeout
            ));
            // The real one requeues the job for another dispatch once the agent is gone.
            self.shared.record_requeue(job_id, "dispatch ack timeout");
            return vec![
                send(messages::job_cancel(
                    &pending.run_id,
                    job_id,
                    "dispatch ack timeout",
                    false,
                )),
                close(4031, "Dispatch ack timeout"),
            ];
        }
        Vec::new()
    }

    fn on_command(&mut self, command: Command, now: Instant) -> Vec<Action> {
        match command {
            Command::Send(text) => vec![Action::Send(text)],
            Command::Dispatch {
                run_id,
                job_id,
                text,
            } => {
                self.shared.mark_dispatched(&job_id, now);
                match self.shared.config.ack_lookup_delay {
                    Some(lookup) => {
                        let arm_at = now + lookup;
                        self.unarmed_acks
                            .insert(job_id, UnarmedAck { run_id, arm_at });
                    }
                    None => {
                        let deadline = now + self.shared.config.dispatch_ack_timeout;
                        self.pending_acks
                            .insert(job_id, PendingAck { run_id, deadline });
                    }
                }
                vec![Action::Send(text)]
            }
            Command::Close { code, reason } => vec![Action::Close { code, reason }],
        }
    }
}

/// A short name for a frame in violation messages.
fn describe(msg: &Value) -> String {
    match message_type(msg) {
        Some(msg_type) => format!("`{msg_type}`"),
        None => "a frame without a string `type`".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::MockConfig;

    fn session(auth: AuthMode) -> Session {
        let config = MockConfig {
            auth,
            ..MockConfig::default()
        };
        Session::new(Arc::new(Shared::new(config)), 1, Instant::now())
    }

    fn register_text(agent_id: &str) -> String {
        json!({"type":"agent.register","messageId":"m","agentId":agent_id,"labels":[]}).to_string()
    }

    fn close_code(actions: &[Action]) -> Option<u16> {
        actions.iter().find_map(|action| match action {
            Action::Close { code, .. } => Some(*code),
            Action::Send(_) => None,
        })
    }

    #[test]
    fn token_check_answers_only_after_its_delay() {
        let mut session = session(AuthMode::Token("t".into()));
        let request = json!({"type":"auth.request","token":"t","protocolVersion":1}).to_string();
        assert!(session.on_text(&request).is_empty());
        let ready = session.next_deadline();
        assert!(session
            .on_timer(ready - Duration::from_millis(1))
            .is_empty());
        let actions = session.on_timer(ready);
        assert!(matches!(&actions[..], [Action::Send(text)] if text.contains("auth.success")));
        assert!(matches!(session.phase, Phase::AwaitingRegister { .. }));
    }

    #[test]
    fn none_mode_rejects_auth_request_and_accepts_register() {
        let mut session = session(AuthMode::None);
        let request = json!({"type":"auth.request","token":"t","protocolVersion":1}).to_string();
        assert_eq!(close_code(&session.on_text(&request)), Some(4003));

        let mut session = self::session(AuthMode::None);
        let actions = session.on_text(&register_text("a"));
        assert!(matches!(&actions[..], [Action::Send(text)] if text.contains("register.ack")));
        assert_eq!(session.shared.registered_agents(), vec!["a".to_string()]);
    }

    #[test]
    fn five_ownership_violations_close_with_1001() {
        let mut session = session(AuthMode::None);
        session.on_text(&register_text("a"));
        let ack =
            json!({"type":"job.ack","messageId":"m","runId":"r","jobId":"nope","timestamp":1})
                .to_string();
        for _ in 0..4 {
            assert!(session.on_text(&ack).is_empty());
        }
        assert_eq!(close_code(&session.on_text(&ack)), Some(1001));
        assert_eq!(session.shared.violations().len(), 5);
    }

    /// A registered session of agent `a` whose ack deadlines are armed a minute after the
    /// dispatch, with job `j` just dispatched to it; returns the arming moment.
    fn session_with_late_arming() -> (Session, Instant) {
        let config = MockConfig {
            auth: AuthMode::None,
            ack_lookup_delay: Some(Duration::from_secs(60)),
            ..MockConfig::default()
        };
        let mut session = Session::new(Arc::new(Shared::new(config)), 1, Instant::now());
        session.on_text(&register_text("a"));
        session.shared.set_job_owner("j", "a");
        let sent = Instant::now();
        let dispatch = Command::Dispatch {
            run_id: "r".into(),
            job_id: "j".into(),
            text: "{}".into(),
        };
        assert_eq!(session.on_command(dispatch, sent).len(), 1);
        (session, sent + Duration::from_secs(60))
    }

    fn job_text(msg_type: &str, state: Option<&str>) -> String {
        let mut msg = json!({"type": msg_type, "messageId": "m", "runId": "r", "jobId": "j",
                             "timestamp": 1});
        if let Some(state) = state {
            msg["state"] = json!(state);
        }
        msg.to_string()
    }

    #[test]
    fn an_early_ack_keeps_a_late_deadline_from_being_armed() {
        let (mut session, arm_at) = session_with_late_arming();
        assert!(session.on_text(&job_text("job.ack", None)).is_empty());
        assert!(session.on_timer(arm_at).is_empty());
        assert!(session.pending_acks.is_empty());
        let long_after = arm_at + session.shared.config.dispatch_ack_timeout * 2;
        assert_eq!(close_code(&session.on_timer(long_after)), None);
    }

    #[test]
    fn running_before_the_late_arming_erases_the_early_ack_and_the_deadline_fires() {
        let (mut session, arm_at) = session_with_late_arming();
        session.on_text(&job_text("job.ack", None));
        session.on_text(&job_text("job.status", Some("running")));
        assert!(session.on_timer(arm_at).is_empty());
        let expiry = session.next_deadline();
        assert_eq!(expiry, arm_at + session.shared.config.dispatch_ack_timeout);
        let actions = session.on_timer(expiry);
        assert!(matches!(&actions[0], Action::Send(text) if text.contains("dispatch ack timeout")));
        assert_eq!(close_code(&actions), Some(4031));
        assert_eq!(
            session.shared.requeued(),
            [("j".to_string(), "dispatch ack timeout".to_string())]
        );
    }

    #[test]
    fn running_after_the_late_arming_resolves_the_deadline() {
        let (mut session, arm_at) = session_with_late_arming();
        session.on_text(&job_text("job.ack", None));
        session.on_text(&job_text("job.status", Some("running")));
        session.on_timer(arm_at);
        assert_eq!(session.pending_acks.len(), 1);
        session.on_text(&job_text("job.status", Some("running")));
        assert!(session.pending_acks.is_empty());
        let long_after = arm_at + session.shared.config.dispatch_ack_timeout * 2;
        assert_eq!(close_code(&session.on_timer(long_after)), None);
    }

    #[test]
    fn heartbeat_refreshes_the_heartbeat_deadline() {
        let mut session = session(AuthMode::None);
        session.on_text(&register_text("a"));
        let before = session.next_deadline();
        session.on_text(&json!({"type":"heartbeat","timestamp":1}).to_string());
        assert!(session.next_deadline() >= before);
        let expiry = session.next_deadline();
        assert_eq!(close_code(&session.on_timer(expiry)), Some(4004));
    }
}
