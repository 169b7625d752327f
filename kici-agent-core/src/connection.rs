//! The WebSocket connection to the orchestrator: connect, authenticate, register, heartbeat,
//! pump the outbox, and reconnect with backoff (spec protocol.md §1-3, §6).
//!
//! Nothing but `auth.request` (token mode) and `agent.register` is ever sent before
//! `register.ack`: the orchestrator treats any other early frame as fatal (§11.11), so the
//! outbox is only drained by a registered session.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pacer};
use crate::protocol::{
    now_ms, parse_inbound, AgentRegister, AuthRequest, FleetLogsRequest, Heartbeat, Inbound,
    InboundError, JobCancel, JobDispatch, JobRef, Outbound, RegisterAck, PROTOCOL_VERSION,
};
use crate::tls::Socket;

/// How long a shutdown waits for the orchestrator to answer our close frame.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(2);

/// Paced frames (and their bytes) the orchestrator may be handed before it is seen to have read
/// them: half its burst allowance (200 messages, 2 MiB), see [`ReadWindow`].
const READ_WINDOW_FRAMES: u64 = 100;
const READ_WINDOW_BYTES: u64 = 1024 * 1024;
/// A peer that does not answer a ping within this long is taken to have read what it covers,
/// so that an intermediary swallowing pings slows delivery down instead of stopping it.
const PONG_WAIT: Duration = Duration::from_secs(15);
/// A pong this late means the orchestrator read the frames before it only now, in a burst that
/// used up its buckets: the pacer starts again from empty ones.
const LATE_PONG: Duration = Duration::from_secs(1);

/// What the orchestrator has been handed but not yet been seen to read.
///
/// The agent paces its frames to the orchestrator's token buckets, but the buckets count frames
/// when the orchestrator *reads* them. If it stops reading for a while (a pause, a stalled
/// network), everything sent meanwhile waits in socket buffers and arrives at once when it
/// resumes; past its burst it drops the excess (the chaos suite's "reader stops 10 s" lost 15 %
/// of a 200,000-line log that way). A WebSocket pong is sent by the peer when it reads our ping,
/// which is after it has read every frame before it; so the agent pings after sending, counts a
/// frame as read once a later pong is back, and sends nothing more while the unread part is at
/// [`READ_WINDOW_FRAMES`] or [`READ_WINDOW_BYTES`]. The backlog then waits in the outbox, where
/// producers are held back, instead of in the kernel. Pings and pongs are control frames the
/// orchestrator's limits do not count.
#[derive(Default)]
struct ReadWindow {
    sent_frames: u64,
    sent_bytes: u64,
    read_frames: u64,
    read_bytes: u64,
    next_ping: u64,
    /// The ping in flight: its id, what was sent when it went out, when it went out.
    ping: Option<(u64, u64, u64, tokio::time::Instant)>,
}

impl ReadWindow {
    fn has_room(&self) -> bool {
        self.sent_frames - self.read_frames < READ_WINDOW_FRAMES
            && self.sent_bytes - self.read_bytes < READ_WINDOW_BYTES
    }

    fn sent(&mut self, bytes: usize) {
        self.sent_frames += 1;
        self.sent_bytes += bytes as u64;
    }

    /// The payload of a ping to send now: none is in flight and something is unread.
    fn ping_due(&mut self) -> Option<Vec<u8>> {
        if self.ping.is_some() || self.sent_frames == self.read_frames {
            return None;
        }
        let id = self.next_ping;
        self.next_ping += 1;
        let now = tokio::time::Instant::now();
        self.ping = Some((id, self.sent_frames, self.sent_bytes, now));
        Some(id.to_be_bytes().to_vec())
    }

    /// Takes a pong; returns how long its ping took when it is the one in flight.
    fn pong(&mut self, payload: &[u8]) -> Option<Duration> {
        let (id, frames, bytes, sent_at) = self.ping?;
        if payload != id.to_be_bytes() {
            return None;
        }
        (self.read_frames, self.read_bytes) = (frames, bytes);
        self.ping = None;
        Some(sent_at.elapsed())
    }

    /// When to stop waiting for the pong in flight.
    fn pong_deadline(&self) -> Option<tokio::time::Instant> {
        self.ping.map(|(.., sent_at)| sent_at + PONG_WAIT)
    }

    fn pong_overdue(&mut self) {
        if let Some((_, frames, bytes, _)) = self.ping.take() {
            tracing::warn!("the orchestrator did not answer a ping in time; sending on");
            (self.read_frames, self.read_bytes) = (frames, bytes);
        }
    }
}

/// Close code: agent authentication failed (permanent).
pub const CLOSE_AUTH_FAILED: u16 = 4010;

/// Where the connection is in its life.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum ConnectionState {
    /// Not connected; a reconnect may be scheduled.
    Disconnected,
    /// Opening the socket.
    Connecting,
    /// Waiting for `auth.success`.
    Authenticating,
    /// Waiting for `register.ack`.
    Registering,
    /// Registered: jobs may be dispatched.
    Registered,
    /// The orchestrator refused our credentials: no more reconnects.
    AuthFailed(String),
    /// Closed for good by a shutdown.
    Closed,
}

/// What the connection needs from the agent.
pub(crate) trait SessionHandler: Send + Sync {
    /// The connection state changed.
    fn state_changed(&self, state: ConnectionState);
    /// A socket was lost or could not be opened; the agent will retry.
    fn connection_lost(&self, reason: &str);
    /// A fresh registration message (with the current `inFlightJobs`).
    fn registration(&self) -> AgentRegister;
    /// The orchestrator acknowledged the registration; called just before the state becomes
    /// `Registered`.
    fn registration_acked(&self, _ack: &RegisterAck) {}
    /// A job was dispatched to us.
    fn on_dispatch(self: Arc<Self>, dispatch: Box<JobDispatch>);
    /// A dispatch we could not read, but whose ids we could.
    fn on_unreadable_dispatch(&self, job: JobRef, error: String);
    /// A cancel request.
    fn on_cancel(&self, cancel: JobCancel);
    /// Reconnect attempt `attempt` (0-based since the last stable registration) starts in
    /// `delay`.
    fn reconnect_scheduled(&self, attempt: u32, delay: Duration);

    /// A diagnostics bundle request; ignored unless implemented (the collector times out).
    fn on_fleet_logs_request(&self, _request: FleetLogsRequest) {}
}

/// Settings of the connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionSettings {
    pub url: String,
    pub token: Option<Secret>,
    pub heartbeat_interval: Duration,
    pub pacer: Pacer,
    pub connect_timeout: Duration,
    pub reconnect: ReconnectPolicy,
    /// Extra CA certificates trusted for `wss://`.
    pub tls_ca_file: Option<PathBuf>,
}

/// How reconnect attempts are spaced (spec protocol.md §6.1): attempt `n` (0-based) waits
/// `min(max_delay, initial_delay x 1.5^n x (1 + jitter x U[0, 1)))`.
///
/// The attempt counter goes back to 0 only once a registration has lasted `stable_after`: an
/// orchestrator that accepts the registration and closes at once (as it may while it recovers)
/// then sees the delays grow instead of one reconnect a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconnectPolicy {
    /// Delay before the first retry (1 s).
    pub initial_delay: Duration,
    /// Longest delay (60 s: the orchestrator's recovery window is twice this, §6.3).
    pub max_delay: Duration,
    /// Random extra, as a fraction of the delay, so that agents do not reconnect in lock-step
    /// (0.5; clamped to 0..=1).
    pub jitter: f64,
    /// How long a registration must last before the backoff starts again from 1 s (30 s).
    pub stable_after: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            jitter: 0.5,
            stable_after: Duration::from_secs(30),
        }
    }
}

impl ReconnectPolicy {
    /// The delay before attempt `attempt` (0-based), given a uniform random `unit` in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let jitter = self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0);
        let factor = 1.5f64.powi(attempt.min(64) as i32) * (1.0 + jitter);
        let max = self.max_delay.as_secs_f64();
        Duration::from_secs_f64((self.initial_delay.as_secs_f64() * factor).min(max))
    }

    /// Whether a registration that lasted `registered_for` resets the attempt counter.
    fn resets_after(&self, registered_for: Duration) -> bool {
        registered_for >= self.stable_after
    }
}

enum SessionEnd {
    Shutdown,
    AuthFailed(String),
    /// `registered_at`: when the lost session registered, if it did.
    Lost {
        reason: String,
        registered_at: Option<Instant>,
    },
}

/// Runs the connection until `shutdown` fires or authentication fails for good.
pub(crate) async fn run(
    settings: ConnectionSettings,
    outbox: Arc<Outbox>,
    handler: Arc<dyn SessionHandler>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut attempt: u32 = 0;
    let mut pacer = settings.pacer.clone();
    loop {
        handler.state_changed(ConnectionState::Connecting);
        let end = session(
            &settings, &outbox, &handler, &metrics, &mut pacer, &shutdown,
        )
        .await;
        outbox.set_connected(false);
        metrics.connection_status.set(0);
        match end {
            SessionEnd::Shutdown => {
                handler.state_changed(ConnectionState::Closed);
                return;
            }
            SessionEnd::AuthFailed(reason) => {
                tracing::error!(%reason, "authentication failed; not reconnecting (fix the token and restart)");
                handler.state_changed(ConnectionState::AuthFailed(reason));
                return;
            }
            SessionEnd::Lost {
                reason,
                registered_at,
            } => {
                let policy = &settings.reconnect;
                if registered_at.is_some_and(|at| policy.resets_after(at.elapsed())) {
                    attempt = 0;
                }
                let delay = policy.delay(attempt, rand::random::<f64>());
                tracing::warn!(%reason, attempt, delay_ms = delay.as_millis() as u64, "Scheduling reconnect");
                handler.connection_lost(&reason);
                handler.state_changed(ConnectionState::Disconnected);
                handler.reconnect_scheduled(attempt, delay);
                attempt = attempt.saturating_add(1);
                metrics.reconnects_total.inc();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {
                        handler.state_changed(ConnectionState::Closed);
                        return;
                    }
                }
            }
        }
    }
}

/// One socket's life.
async fn session(
    settings: &ConnectionSettings,
    outbox: &Outbox,
    handler: &Arc<dyn SessionHandler>,
    metrics: &Metrics,
    pacer: &mut Pacer,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let lost = |reason: String| SessionEnd::Lost {
        reason,
        registered_at: None,
    };
    let connect = tokio::time::timeout(
        settings.connect_timeout,
        crate::tls::connect(&settings.url, settings.tls_ca_file.as_deref()),
    );
    let mut socket = tokio::select! {
        result = connect => match result {
            Ok(Ok(socket)) => socket,
            Ok(Err(e)) => return lost(e.to_string()),
            Err(_) => return lost("connect timed out".into()),
        },
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
    };

    if let Some(token) = &settings.token {
        handler.state_changed(ConnectionState::Authenticating);
        let request = Outbound::AuthRequest(AuthRequest {
            token: token.expose().to_owned(),
            protocol_version: PROTOCOL_VERSION,
        });
        if let Err(e) = socket.send(Message::text(request.to_frame())).await {
            return lost(format!("send failed: {e}"));
        }
        // Send nothing else until the verdict (spec §2.1 point 4).
        loop {
            match next_inbound(&mut socket, shutdown).await {
                Received::Message(Inbound::AuthSuccess(_)) => break,
                Received::Message(Inbound::AuthFailure(f)) => {
                    close(&mut socket, "Auth failed").await;
                    return SessionEnd::AuthFailed(f.reason);
                }
                Received::Message(_) | Received::Ignored => continue,
                Received::Closed(code, reason) => return closed_end(code, reason, None),
                Received::Shutdown => {
                    close(&mut socket, "Agent disconnect").await;
                    return SessionEnd::Shutdown;
                }
            }
        }
    }

    handler.state_changed(ConnectionState::Registering);
    let register = Outbound::AgentRegister(Box::new(handler.registration()));
    if let Err(e) = socket.send(Message::text(register.to_frame())).await {
        return lost(format!("send failed: {e}"));
    }
    loop {
        match next_inbound(&mut socket, shutdown).await {
            Received::Message(Inbound::RegisterAck(ack)) => {
                tracing::info!(agent_id = %ack.agent_id, "registered with the orchestrator");
                handler.registration_acked(&ack);
                break;
            }
            Received::Message(Inbound::AuthFailure(f)) => {
                close(&mut socket, "Auth failed").await;
                return SessionEnd::AuthFailed(f.reason);
            }
            Received::Message(_) | Received::Ignored => continue,
            Received::Closed(code, reason) => return closed_end(code, reason, None),
            Received::Shutdown => {
                close(&mut socket, "Agent disconnect").await;
                return SessionEnd::Shutdown;
            }
        }
    }

    metrics.connection_status.set(1);
    outbox.set_connected(true);
    handler.state_changed(ConnectionState::Registered);
    registered_loop(settings, socket, outbox, handler, metrics, pacer, shutdown).await
}

async fn registered_loop(
    settings: &ConnectionSettings,
    socket: Socket,
    outbox: &Outbox,
    handler: &Arc<dyn SessionHandler>,
    metrics: &Metrics,
    pacer: &mut Pacer,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let (mut sink, mut stream) = socket.split();
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.heartbeat_interval,
        settings.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let registered_at = Some(Instant::now());
    let lost = |reason: String| SessionEnd::Lost {
        reason,
        registered_at,
    };
    let mut window = ReadWindow::default();
    loop {
        let pong_deadline = window.pong_deadline();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let _ = sink.send(Message::Close(Some(close_frame(1000, "Agent disconnect")))).await;
                // Wait (bounded) for the orchestrator's close reply: a socket closed with unread
                // data is reset, and a reset makes the peer discard frames it has not read yet.
                let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
                    while let Some(Ok(_)) = stream.next().await {}
                })
                .await;
                let _ = sink.close().await;
                return SessionEnd::Shutdown;
            }
            frame = stream.next() => {
                let text = match frame {
                    None => return lost("connection closed".into()),
                    Some(Err(e)) => return lost(format!("read failed: {e}")),
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = close_parts(frame);
                        return closed_end(code, reason, registered_at);
                    }
                    Some(Ok(Message::Pong(payload))) => {
                        if window.pong(&payload).is_some_and(|took| took > LATE_PONG) {
                            pacer.back_off(Duration::ZERO, Instant::now());
                        }
                        if let Some(ping) = window.ping_due() {
                            if let Err(e) = sink.send(Message::Ping(ping.into())).await {
                                return lost(format!("send failed: {e}"));
                            }
                        }
                        continue;
                    }
                    // Pings are answered by tungstenite; binary frames are not part of the protocol.
                    Some(Ok(_)) => continue,
                };
                match parse_inbound(&text) {
                    Ok(Inbound::JobDispatch(dispatch)) => handler.clone().on_dispatch(dispatch),
                    Ok(Inbound::JobCancel(cancel)) => handler.on_cancel(cancel),
                    Ok(Inbound::FleetLogsRequest(request)) => handler.on_fleet_logs_request(request),
                    Ok(Inbound::RateLimitWarning(w)) => {
                        metrics.rate_limit_warnings_total.inc();
                        tracing::warn!(retry_after_ms = w.retry_after_ms, "orchestrator dropped a message (rate limit); backing off");
                        pacer.back_off(Duration::from_millis(w.retry_after_ms), Instant::now());
                    }
                    Ok(Inbound::Error(e)) => {
                        tracing::error!(code = %e.code, message = %e.message, "orchestrator reported an error");
                    }
                    Ok(Inbound::AuthFailure(f)) => {
                        let _ = sink.close().await;
                        return SessionEnd::AuthFailed(f.reason);
                    }
                    Ok(Inbound::RegisterAck(_)) | Ok(Inbound::AuthSuccess(_)) => {}
                    Ok(Inbound::Unknown { message_type }) => {
                        tracing::debug!(%message_type, "ignoring unhandled message type");
                    }
                    Err(InboundError::Schema { message_type, job: Some(job), source })
                        if message_type == "job.dispatch" =>
                    {
                        handler.on_unreadable_dispatch(job, source.to_string());
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring unreadable message"),
                }
            }
            _ = heartbeat.tick() => {
                let beat = Outbound::Heartbeat(Heartbeat { timestamp: now_ms() });
                if let Err(e) = sink.send(Message::text(beat.to_frame())).await {
                    return lost(format!("send failed: {e}"));
                }
            }
            () = async { tokio::time::sleep_until(pong_deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if pong_deadline.is_some() => {
                window.pong_overdue();
            }
            frame = outbox.next_frame(pacer), if window.has_room() => {
                tracing::trace!(message_type = frame.message_type, bytes = frame.text.len(), "send");
                window.sent(frame.text.len());
                if let Err(e) = sink.send(Message::text(frame.text)).await {
                    return lost(format!("send failed: {e}"));
                }
                if let Some(ping) = window.ping_due() {
                    if let Err(e) = sink.send(Message::Ping(ping.into())).await {
                        return lost(format!("send failed: {e}"));
                    }
                }
            }
        }
    }
}

enum Received {
    Message(Inbound),
    Ignored,
    Closed(Option<u16>, String),
    Shutdown,
}

async fn next_inbound(socket: &mut Socket, shutdown: &CancellationToken) -> Received {
    let frame = tokio::select! {
        frame = socket.next() => frame,
        _ = shutdown.cancelled() => return Received::Shutdown,
    };
    match frame {
        None => Received::Closed(None, "connection closed".into()),
        Some(Err(e)) => Received::Closed(None, format!("read failed: {e}")),
        Some(Ok(Message::Close(frame))) => {
            let (code, reason) = close_parts(frame);
            Received::Closed(code, reason)
        }
        Some(Ok(Message::Text(text))) => match parse_inbound(&text) {
            Ok(message) => Received::Message(message),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring unreadable message");
                Received::Ignored
            }
        },
        Some(Ok(_)) => Received::Ignored,
    }
}

fn close_parts(frame: Option<CloseFrame>) -> (Option<u16>, String) {
    match frame {
        Some(frame) => (Some(u16::from(frame.code)), frame.reason.to_string()),
        None => (None, String::new()),
    }
}

fn closed_end(code: Option<u16>, reason: String, registered_at: Option<Instant>) -> SessionEnd {
    match code {
        Some(CLOSE_AUTH_FAILED) => SessionEnd::AuthFailed(if reason.is_empty() {
            "connection closed with 4010 (agent authentication failed)".into()
        } else {
            format!("{reason} (close 4010)")
        }),
        Some(code) => SessionEnd::Lost {
            reason: format!("closed by the orchestrator: {code} {reason}"),
            registered_at,
        },
        None => SessionEnd::Lost {
            reason,
            registered_at,
        },
    }
}

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    }
}

async fn close(socket: &mut Socket, reason: &str) {
    let _ = socket.close(Some(close_frame(1000, reason))).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_read_window_closes_at_its_bounds_and_opens_with_the_pong() {
        let mut window = super::ReadWindow::default();
        assert!(
            window.ping_due().is_none(),
            "nothing sent, nothing to confirm"
        );
        window.sent(600 * 1024);
        let ping = window.ping_due().expect("a ping after the first frame");
        assert!(window.ping_due().is_none(), "one ping in flight at a time");
        window.sent(600 * 1024);
        assert!(!window.has_room(), "1.2 MiB unread is over the byte bound");
        window.pong(b"not ours");
        assert!(!window.has_room());
        window.pong(&ping);
        // The pong covers the first frame only: 600 KiB unread remain, and a new ping covers them.
        assert!(window.has_room());
        let second = window
            .ping_due()
            .expect("the second frame is still unconfirmed");
        window.pong(&second);
        assert!(window.ping_due().is_none());
        for _ in 0..super::READ_WINDOW_FRAMES {
            window.sent(10);
        }
        assert!(!window.has_room(), "the frame bound holds too");
        window.ping_due();
        window.pong_overdue();
        assert!(
            window.has_room(),
            "an unanswered ping does not stop delivery for good"
        );
    }

    use super::*;

    #[test]
    fn default_delays_follow_the_reference_formula() {
        let policy = ReconnectPolicy::default();
        for attempt in 0..20 {
            let base = 1000.0 * 1.5f64.powi(attempt as i32);
            let low = policy.delay(attempt, 0.0);
            let high = policy.delay(attempt, 0.999_999);
            assert_eq!(low.as_millis() as u64, base.min(60_000.0) as u64);
            assert!(high >= low && high <= Duration::from_secs(60));
            assert!(high.as_secs_f64() * 1000.0 <= (base * 1.5).min(60_000.0) + 1.0);
        }
        assert_eq!(policy.delay(0, 0.4), Duration::from_millis(1200));
        assert_eq!(policy.delay(1, 0.0), Duration::from_millis(1500));
        assert_eq!(policy.delay(u32::MAX, 1.0), Duration::from_secs(60));
    }

    #[test]
    fn only_a_registration_that_lasted_resets_the_backoff() {
        let policy = ReconnectPolicy::default();
        assert!(!policy.resets_after(Duration::from_millis(200)));
        assert!(!policy.resets_after(Duration::from_secs(29)));
        assert!(policy.resets_after(Duration::from_secs(30)));
    }

    #[test]
    fn a_small_policy_scales_the_same_curve() {
        let policy = ReconnectPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            jitter: 0.0,
            stable_after: Duration::from_secs(30),
        };
        let delays: Vec<u128> = (0..5)
            .map(|attempt| policy.delay(attempt, 0.9).as_millis())
            .collect();
        assert_eq!(delays, [10, 15, 22, 33, 40]);
    }
}
