//! State shared by the connection tasks and the test-facing handle: the traffic record, the agent
//! registry, job ownership, and an event counter that wakes waiters on every change.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::config::MockConfig;

/// One frame an agent sent, in arrival order.
#[derive(Debug, Clone)]
pub struct Received {
    /// Connection number (1, 2, ... in accept order).
    pub conn: u64,
    /// Arrival time.
    pub at: Instant,
    /// Frame length as a JS string length (UTF-16 code units), the measure the rate limiter uses.
    pub text_len: usize,
    /// The parsed frame; a frame that is not JSON is kept as a JSON string of its text.
    pub msg: Value,
    /// False if the frame was dropped (rate limit, ownership) or rejected (invalid, wrong phase).
    pub accepted: bool,
}

/// How one connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRecord {
    /// Connection number.
    pub conn: u64,
    /// True if the mock closed it, false if the agent did (or the TCP connection dropped).
    pub by_server: bool,
    /// Close code; `None` if the connection ended without a close frame.
    pub code: Option<u16>,
    /// Close reason (empty if none).
    pub reason: String,
}

/// What a test (or the mock itself) asks a connection task to do.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send this text frame as is.
    Send(String),
    /// Send a `job.dispatch` and arm its ack deadline.
    Dispatch {
        run_id: String,
        job_id: String,
        text: String,
    },
    /// Close the socket from the server side.
    Close { code: u16, reason: String },
}

/// A registered agent id and the connection it registered on.
#[derive(Debug, Clone)]
struct Registration {
    agent_id: String,
    conn: u64,
}

#[derive(Debug, Default)]
struct State {
    next_conn: u64,
    received: Vec<Received>,
    closes: Vec<CloseRecord>,
    connections: HashMap<u64, mpsc::UnboundedSender<Command>>,
    registered: Vec<Registration>,
    registrations: Vec<Value>,
    job_owner: HashMap<String, String>,
    dispatched_at: HashMap<String, Instant>,
    ack_latency: HashMap<String, Duration>,
    /// `(jobId, reason)` of jobs the mock took back from an agent, in order.
    requeued: Vec<(String, String)>,
    violations: Vec<String>,
    tls_failures: Vec<String>,
    rate_limit_warnings: usize,
    dropped_by_rate_limit: usize,
    listening: bool,
}

/// Everything the connection tasks and the handle share.
pub(crate) struct Shared {
    /// The configuration the mock was started with.
    pub(crate) config: MockConfig,
    /// When the mock started (origin of the control API's `atMs`).
    pub(crate) started: Instant,
    state: Mutex<State>,
    events: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new(config: MockConfig) -> Self {
        Shared {
            config,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            events: watch::channel(0).0,
        }
    }

    /// The state lock; a panicking test thread must not hide the record from the others.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes every waiter.
    fn bump(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn trace(&self, line: impl FnOnce() -> String) {
        if self.config.trace {
            eprintln!("[mock-orchestrator] {}", line());
        }
    }

    /// Notes whether the listening socket is currently open.
    pub(crate) fn set_listening(&self, listening: bool) {
        self.lock().listening = listening;
        self.bump();
    }

    pub(crate) fn is_listening(&self) -> bool {
        self.lock().listening
    }

    /// A receiver that sees every later state change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    /// Allocates a connection number and keeps the channel used to command it.
    pub(crate) fn open_connection(&self, commands: mpsc::UnboundedSender<Command>) -> u64 {
        let conn = {
            let mut state = self.lock();
            state.next_conn += 1;
            let conn = state.next_conn;
            state.connections.insert(conn, commands);
            conn
        };
        self.trace(|| format!("conn {conn}: open"));
        self.bump();
        conn
    }

    /// Records how a connection ended and forgets it (and any agent registered on it).
    pub(crate) fn end_connection(&self, record: CloseRecord) {
        self.trace(|| format!("conn {}: closed {record:?}", record.conn));
        {
            let mut state = self.lock();
            state.connections.remove(&record.conn);
            state.registered.retain(|r| r.conn != record.conn);
            state.closes.push(record);
        }
        self.bump();
    }

    pub(crate) fn record_frame(&self, received: Received) {
        self.trace(|| {
            format!(
                "conn {} <- {}{}",
                received.conn,
                received.msg,
                if received.accepted { "" } else { " (dropped)" }
            )
        });
        self.lock().received.push(received);
        self.bump();
    }

    pub(crate) fn record_violation(&self, conn: u64, what: impl Into<String>) {
        self.record_problem(format!("conn {conn}: {}", what.into()));
    }

    /// Records a violation that belongs to no connection (e.g. a failed handshake).
    pub(crate) fn record_problem(&self, what: impl Into<String>) {
        let line = what.into();
        self.trace(|| format!("VIOLATION {line}"));
        self.lock().violations.push(line);
        self.bump();
    }

    pub(crate) fn record_rate_limit_drop(&self) {
        {
            let mut state = self.lock();
            state.rate_limit_warnings += 1;
            state.dropped_by_rate_limit += 1;
        }
        self.bump();
    }

    /// Registers (or re-registers) `agent_id` on `conn`, replacing any earlier connection's claim.
    pub(crate) fn register_agent(&self, conn: u64, agent_id: &str, register: &Value) {
        {
            let mut state = self.lock();
            state
                .registered
                .retain(|r| r.conn != conn && r.agent_id != agent_id);
            state.registered.push(Registration {
                agent_id: agent_id.to_string(),
                conn,
            });
            state.registrations.push(register.clone());
        }
        self.bump();
    }

    /// The command channel of the connection `agent_id` is registered on.
    pub(crate) fn agent_channel(&self, agent_id: &str) -> Option<mpsc::UnboundedSender<Command>> {
        let state = self.lock();
        let conn = state
            .registered
            .iter()
            .find(|r| r.agent_id == agent_id)?
            .conn;
        state.connections.get(&conn).cloned()
    }

    /// Command channels of every open connection.
    pub(crate) fn all_channels(&self) -> Vec<mpsc::UnboundedSender<Command>> {
        self.lock().connections.values().cloned().collect()
    }

    pub(crate) fn open_connection_count(&self) -> usize {
        self.lock().connections.len()
    }

    pub(crate) fn set_job_owner(&self, job_id: &str, agent_id: &str) {
        self.lock()
            .job_owner
            .insert(job_id.to_string(), agent_id.to_string());
    }

    pub(crate) fn owns_job(&self, agent_id: &str, job_id: &str) -> bool {
        self.lock()
            .job_owner
            .get(job_id)
            .is_some_and(|owner| owner == agent_id)
    }

    pub(crate) fn mark_dispatched(&self, job_id: &str, at: Instant) {
        let mut state = self.lock();
        state.dispatched_at.insert(job_id.to_string(), at);
        state.ack_latency.remove(job_id);
    }

    /// Records the first acknowledgement of a dispatched job.
    pub(crate) fn mark_acked(&self, job_id: &str, at: Instant) {
        let mut state = self.lock();
        if let Some(sent) = state.dispatched_at.get(job_id).copied() {
            state
                .ack_latency
                .entry(job_id.to_string())
                .or_insert_with(|| at.saturating_duration_since(sent));
        }
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// Frames from index `from` on, for incremental scans by waiters.
    pub(crate) fn received_since(&self, from: usize) -> Vec<Received> {
        self.lock()
            .received
            .get(from..)
            .unwrap_or_default()
            .to_vec()
    }

    pub(crate) fn closes(&self) -> Vec<CloseRecord> {
        self.lock().closes.clone()
    }

    pub(crate) fn registered_agents(&self) -> Vec<String> {
        self.lock()
            .registered
            .iter()
            .map(|r| r.agent_id.clone())
            .collect()
    }

    pub(crate) fn registrations(&self) -> Vec<Value> {
        self.lock().registrations.clone()
    }

    pub(crate) fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// A TLS handshake that failed: the client's choice (e.g. an untrusted CA), not a violation.
    pub(crate) fn record_tls_failure(&self, what: String) {
        self.trace(|| format!("TLS handshake failed: {what}"));
        self.lock().tls_failures.push(what);
        self.bump();
    }

    pub(crate) fn tls_failures(&self) -> Vec<String> {
        self.lock().tls_failures.clone()
    }

    pub(crate) fn rate_limit_warnings(&self) -> usize {
        self.lock().rate_limit_warnings
    }

    pub(crate) fn dropped_by_rate_limit(&self) -> usize {
        self.lock().dropped_by_rate_limit
    }

    /// Records that a job was taken back from its agent to be dispatched again.
    pub(crate) fn record_requeue(&self, job_id: &str, reason: &str) {
        self.lock()
            .requeued
            .push((job_id.to_string(), reason.to_string()));
    }

    pub(crate) fn requeued(&self) -> Vec<(String, String)> {
        self.lock().requeued.clone()
    }

    pub(crate) fn ack_latency(&self, job_id: &str) -> Option<Duration> {
        self.lock().ack_latency.get(job_id).copied()
    }
}
