//! The WebSocket connection to the orchestrator: connect, authenticate, register, heartbeat,
//! pump the outbox, and reconnect with backoff (spec protocol.md §1-3, §6).
//!
//! Nothing but `auth.request` (token mode) and `agent.register` is ever sent before
//! `register.ack`: the orchestrator treats any other early frame as fatal (§11.11), so the
//! outbox is only drained by a registered session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pacer};
use crate::protocol::{
    now_ms, parse_inbound, AgentRegister, AuthRequest, FleetLogsRequest, Heartbeat, Inbound,
    InboundError, JobCancel, JobDispatch, JobRef, Outbound, PROTOCOL_VERSION,
};

/// How long a shutdown waits for the orchestrator to answer our close frame.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(2);

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
    /// A fresh registration message (with the current `inFlightJobs`).
    fn registration(&self) -> AgentRegister;
    /// A job was dispatched to us.
    fn on_dispatch(self: Arc<Self>, dispatch: Box<JobDispatch>);
    /// A dispatch we could not read, but whose ids we could.
    fn on_unreadable_dispatch(&self, job: JobRef, error: String);
    /// A cancel request.
    fn on_cancel(&self, cancel: JobCancel);
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
}

/// The reconnect delay before attempt `attempt` (0-based): min(60 s, 1 s x 1.5^n x U[1, 1.5)).
pub fn reconnect_delay(attempt: u32, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 0.5);
    let millis = 1000.0 * 1.5f64.powi(attempt.min(64) as i32) * (1.0 + jitter);
    Duration::from_millis(millis.min(60_000.0) as u64)
}

enum SessionEnd {
    Shutdown,
    AuthFailed(String),
    Lost { reason: String, registered: bool },
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
            SessionEnd::Lost { reason, registered } => {
                if registered {
                    attempt = 0;
                }
                let delay = reconnect_delay(attempt, rand::random::<f64>() * 0.5);
                tracing::warn!(%reason, attempt, delay_ms = delay.as_millis() as u64, "Scheduling reconnect");
                attempt = attempt.saturating_add(1);
                handler.state_changed(ConnectionState::Disconnected);
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
        registered: false,
    };
    let connect = tokio::time::timeout(
        settings.connect_timeout,
        // Nagle off: a heartbeat or status should not wait behind a delayed ACK.
        tokio_tungstenite::connect_async_with_config(settings.url.as_str(), None, true),
    );
    let mut socket = tokio::select! {
        result = connect => match result {
            Ok(Ok((socket, _response))) => socket,
            Ok(Err(e)) => return lost(format!("connect failed: {e}")),
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
                Received::Closed(code, reason) => return closed_end(code, reason, false),
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
                break;
            }
            Received::Message(Inbound::AuthFailure(f)) => {
                close(&mut socket, "Auth failed").await;
                return SessionEnd::AuthFailed(f.reason);
            }
            Received::Message(_) | Received::Ignored => continue,
            Received::Closed(code, reason) => return closed_end(code, reason, false),
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
    let lost = |reason: String| SessionEnd::Lost {
        reason,
        registered: true,
    };
    loop {
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
                        return closed_end(code, reason, true);
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
            frame = outbox.next_frame(pacer) => {
                tracing::trace!(message_type = frame.message_type, bytes = frame.text.len(), "send");
                if let Err(e) = sink.send(Message::text(frame.text)).await {
                    return lost(format!("send failed: {e}"));
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

fn closed_end(code: Option<u16>, reason: String, registered: bool) -> SessionEnd {
    match code {
        Some(CLOSE_AUTH_FAILED) => SessionEnd::AuthFailed(if reason.is_empty() {
            "connection closed with 4010 (agent authentication failed)".into()
        } else {
            format!("{reason} (close 4010)")
        }),
        Some(code) => SessionEnd::Lost {
            reason: format!("closed by the orchestrator: {code} {reason}"),
            registered,
        },
        None => SessionEnd::Lost { reason, registered },
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
    use super::*;

    #[test]
    fn reconnect_delay_stays_within_the_formula() {
        for attempt in 0..20 {
            let low = reconnect_delay(attempt, 0.0);
            let high = reconnect_delay(attempt, 0.5);
            let base = 1000.0 * 1.5f64.powi(attempt as i32);
            assert_eq!(low.as_millis() as u64, base.min(60_000.0) as u64);
            assert_eq!(high.as_millis() as u64, (base * 1.5).min(60_000.0) as u64);
            assert!(high <= Duration::from_secs(60));
        }
        assert_eq!(reconnect_delay(0, 0.2), Duration::from_millis(1200));
        assert_eq!(reconnect_delay(1, 0.0), Duration::from_millis(1500));
    }
}
