//! A strict mock of the KiCI orchestrator's agent WebSocket endpoint, for end-to-end tests of the
//! agent.
//!
//! It enforces the rules of the real orchestrator (protocol.md §1.2 rate limits, §2 auth, §3
//! registration, §4.2 accepted union, §5.1 ack deadline and ownership, §7 validation) with its own
//! hand-written checks on `serde_json::Value`, independent of the agent's types, closes or answers
//! exactly as the real one, and records every frame, close and violation for assertions.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use kici_mock_orchestrator::{MockConfig, MockOrchestrator};
//!
//! let mock = MockOrchestrator::start(MockConfig::default()).await?;
//! // ... start an agent against mock.ws_url() with kici_mock_orchestrator::TEST_TOKEN ...
//! let agent = mock.wait_for_agent(Duration::from_secs(5)).await;
//! assert!(mock.violations().is_empty());
//! mock.shutdown().await;
//! # Ok(()) }
//! ```

mod config;
mod connection;
pub mod control;
mod messages;
pub mod proxy;
mod rate_limit;
pub mod run_keys;
mod server;
mod state;
mod tls;
mod validate;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

pub use config::{AuthMode, MockConfig, RateLimits, TEST_TOKEN};
pub use messages::sample_dispatch;
pub use state::{CloseRecord, Received};
pub use tls::{MockTls, TlsSetupError};

use state::{Command, Shared};

/// How long [`MockOrchestrator::shutdown`] waits for connections to finish their close handshake.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a command to an agent connection could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// No agent with this id is registered.
    #[error("no agent `{0}` is registered")]
    UnknownAgent(String),
    /// The agent's connection ended before the command reached it.
    #[error("the connection of agent `{0}` has already ended")]
    ConnectionClosed(String),
    /// The dispatch lacks what the mock needs to track it.
    #[error("invalid job.dispatch: {0}")]
    InvalidDispatch(String),
}

struct Inner {
    shared: Arc<Shared>,
    ws_addr: SocketAddr,
    accepting: watch::Sender<bool>,
    stop: watch::Sender<bool>,
}

/// A running mock orchestrator. Cheap to clone; every clone controls the same server.
#[derive(Clone)]
pub struct MockOrchestrator {
    inner: Arc<Inner>,
}

impl MockOrchestrator {
    /// Starts listening on 127.0.0.1 (port `config.port`, 0 for any free one).
    pub async fn start(config: MockConfig) -> io::Result<MockOrchestrator> {
        let listener = server::bind(SocketAddr::from(([127, 0, 0, 1], config.port)))?;
        let ws_addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let (accepting, accepting_rx) = watch::channel(true);
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(server::accept_loop(
            Arc::clone(&shared),
            listener,
            accepting_rx,
            stop_rx,
        ));
        Ok(MockOrchestrator {
            inner: Arc::new(Inner {
                shared,
                ws_addr,
                accepting,
                stop,
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The address the mock listens on (for a proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        self.inner.ws_addr
    }

    /// The agent endpoint: `ws://127.0.0.1:<port>/ws`, or `wss://` when [`MockConfig::tls`] is set.
    pub fn ws_url(&self) -> String {
        let scheme = if self.config().tls.is_some() {
            "wss"
        } else {
            "ws"
        };
        format!("{scheme}://{}/ws", self.inner.ws_addr)
    }

    /// The configuration the mock runs with.
    pub fn config(&self) -> &MockConfig {
        &self.shared().config
    }

    /// Every frame any agent sent, in arrival order, accepted or not.
    pub fn received(&self) -> Vec<Received> {
        self.shared().received()
    }

    /// The accepted messages of one `type`, in arrival order.
    pub fn messages_of_type(&self, msg_type: &str) -> Vec<Value> {
        self.received()
            .into_iter()
            .filter(|r| r.accepted && r.msg.get("type").and_then(Value::as_str) == Some(msg_type))
            .map(|r| r.msg)
            .collect()
    }

    /// The first frame (past or future) matching `pred`, or `None` after `timeout`.
    pub async fn wait_for<F: Fn(&Received) -> bool>(
        &self,
        pred: F,
        timeout: Duration,
    ) -> Option<Received> {
        let mut scanned = 0;
        self.wait_with(timeout, || {
            let fresh = self.shared().received_since(scanned);
            scanned += fresh.len();
            fresh.into_iter().find(|r| pred(r))
        })
        .await
    }

    /// The first accepted message of `msg_type` for which `pred` holds.
    pub async fn wait_for_message<F: Fn(&Value) -> bool>(
        &self,
        msg_type: &str,
        pred: F,
        timeout: Duration,
    ) -> Option<Value> {
        self.wait_for(
            |r| {
                r.accepted
                    && r.msg.get("type").and_then(Value::as_str) == Some(msg_type)
                    && pred(&r.msg)
            },
            timeout,
        )
        .await
        .map(|r| r.msg)
    }

    /// Waits until `pred` holds, re-checking on every event (frame, close, registration, ...).
    pub async fn wait_until<F: Fn(&MockOrchestrator) -> bool>(
        &self,
        pred: F,
        timeout: Duration,
    ) -> bool {
        self.wait_with(timeout, || pred(self).then_some(()))
            .await
            .is_some()
    }

    /// The first registered agent id, once there is one.
    pub async fn wait_for_agent(&self, timeout: Duration) -> Option<String> {
        self.wait_with(timeout, || self.registered_agents().into_iter().next())
            .await
    }

    /// The first connection end (past or future) matching `pred`.
    pub async fn wait_for_close<F: Fn(&CloseRecord) -> bool>(
        &self,
        pred: F,
        timeout: Duration,
    ) -> Option<CloseRecord> {
        self.wait_with(timeout, || self.closes().into_iter().find(|c| pred(c)))
            .await
    }

    /// Runs `probe` now and after every event until it yields something or `timeout` passes.
    async fn wait_with<T>(
        &self,
        timeout: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.shared().subscribe();
        loop {
            // Mark the current state as seen *before* probing, so no event is missed.
            events.borrow_and_update();
            if let Some(found) = probe() {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, events.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return probe(),
            }
        }
    }

    /// Every connection end: who closed, code and reason.
    pub fn closes(&self) -> Vec<CloseRecord> {
        self.shared().closes()
    }

    /// Agent ids currently registered, in registration order.
    pub fn registered_agents(&self) -> Vec<String> {
        self.shared().registered_agents()
    }

    /// Every accepted `agent.register` (first and re-registrations), with its `inFlightJobs`.
    pub fn registrations(&self) -> Vec<Value> {
        self.shared().registrations()
    }

    /// Everything an agent did wrong: closes it caused, dropped or mis-typed messages, ownership
    /// violations, quality findings (e.g. an object `data.error`). Empty for a correct agent.
    pub fn violations(&self) -> Vec<String> {
        self.shared().violations()
    }

    /// Every failed TLS handshake (TLS mode), as the server saw it: an agent that does not trust
    /// the certificate shows up here, not in [`MockOrchestrator::violations`].
    pub fn tls_failures(&self) -> Vec<String> {
        self.shared().tls_failures()
    }

    /// How many `rate.limit.warning` frames were sent.
    pub fn rate_limit_warnings_sent(&self) -> usize {
        self.shared().rate_limit_warnings()
    }

    /// How many messages the rate limiter dropped.
    pub fn dropped_by_rate_limit(&self) -> usize {
        self.shared().dropped_by_rate_limit()
    }

    /// Time from sending a dispatch to its first `job.ack`/`job.reject`/`job.status running`.
    pub fn ack_latency(&self, job_id: &str) -> Option<Duration> {
        self.shared().ack_latency(job_id)
    }

    /// `(jobId, reason)` of every job taken back from its agent (a missed ack deadline), to be
    /// dispatched again by the test as the real orchestrator would; in order.
    pub fn requeued(&self) -> Vec<(String, String)> {
        self.shared().requeued()
    }

    fn channel(
        &self,
        agent_id: &str,
    ) -> Result<tokio::sync::mpsc::UnboundedSender<Command>, MockError> {
        self.shared()
            .agent_channel(agent_id)
            .ok_or_else(|| MockError::UnknownAgent(agent_id.to_string()))
    }

    fn command(&self, agent_id: &str, command: Command) -> Result<(), MockError> {
        self.channel(agent_id)?
            .send(command)
            .map_err(|_| MockError::ConnectionClosed(agent_id.to_string()))
    }

    /// Sends a `job.dispatch` to the agent's connection, records the job as owned by that agent
    /// and arms the ack deadline (job.cancel + 4031 when it passes).
    pub async fn dispatch(&self, agent_id: &str, dispatch: Value) -> Result<(), MockError> {
        self.dispatch_text(agent_id, &dispatch.to_string()).await
    }

    /// [`dispatch`](Self::dispatch) of a frame exactly as written: a `Value` sorts object keys,
    /// and some fields' order matters (the contexts of `namespacedSecrets`).
    pub async fn dispatch_text(&self, agent_id: &str, text: &str) -> Result<(), MockError> {
        let dispatch: Value = serde_json::from_str(text)
            .map_err(|e| MockError::InvalidDispatch(format!("not JSON: {e}")))?;
        if dispatch.get("type").and_then(Value::as_str) != Some("job.dispatch") {
            return Err(MockError::InvalidDispatch(
                "`type` must be \"job.dispatch\"".into(),
            ));
        }
        let field = |name: &str| {
            dispatch
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| MockError::InvalidDispatch(format!("missing string `{name}`")))
        };
        let (run_id, job_id) = (field("runId")?, field("jobId")?);
        let channel = self.channel(agent_id)?;
        self.shared().set_job_owner(&job_id, agent_id);
        channel
            .send(Command::Dispatch {
                run_id,
                job_id,
                text: text.to_owned(),
            })
            .map_err(|_| MockError::ConnectionClosed(agent_id.to_string()))
    }

    /// Sends `job.cancel` (reason "Cancelled by user"; `force` only when true, like the real one).
    pub async fn cancel(
        &self,
        agent_id: &str,
        run_id: &str,
        job_id: &str,
        force: bool,
    ) -> Result<(), MockError> {
        let cancel = messages::job_cancel(run_id, job_id, "Cancelled by user", force);
        self.command(agent_id, Command::Send(cancel.to_string()))
    }

    /// Sends `text` verbatim as one text frame (an unknown type, garbage, ...).
    pub async fn send_raw(&self, agent_id: &str, text: &str) -> Result<(), MockError> {
        self.command(agent_id, Command::Send(text.to_string()))
    }

    /// Closes the agent's socket from the server side with `code`.
    pub async fn disconnect(&self, agent_id: &str, code: u16) -> Result<(), MockError> {
        let reason = "Disconnected by mock orchestrator".to_string();
        self.command(agent_id, Command::Close { code, reason })
    }

    /// `false` closes the listening socket, so new connections are refused (an outage); `true`
    /// listens on the same port again. Open connections are not touched. Takes effect at once for
    /// connections the mock would accept (they are dropped unanswered); the kernel-level refusal
    /// follows shortly, see [`MockOrchestrator::is_listening`].
    pub fn set_accepting(&self, accepting: bool) {
        self.inner.accepting.send_replace(accepting);
    }

    /// Whether the listening socket is open right now ([`MockOrchestrator::set_accepting`] takes
    /// effect asynchronously; await it with [`MockOrchestrator::wait_until`]).
    pub fn is_listening(&self) -> bool {
        self.shared().is_listening()
    }

    /// Stops listening, closes every connection with 1001 and waits for them to end.
    pub async fn shutdown(self) {
        self.inner.stop.send_replace(true);
        for channel in self.shared().all_channels() {
            let _ = channel.send(Command::Close {
                code: 1001,
                reason: "Server shutting down".to_string(),
            });
        }
        self.wait_until(
            |mock| mock.shared().open_connection_count() == 0,
            SHUTDOWN_GRACE,
        )
        .await;
    }
}
