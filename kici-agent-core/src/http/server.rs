//! The hyper server of `/health`, `/ready` and `/metrics` (the cargo feature `http`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The `Content-Type` of `/metrics` (the Prometheus text exposition format 0.0.4, which
/// `Metrics::render` writes).
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoints show; implemented by the agent.
pub(crate) trait HealthView: Send + Sync {
    /// The `/health` body.
    fn health(&self) -> serde_json::Value;
    /// What `/ready` answers from.
    fn readiness(&self) -> Readiness;
    /// The `/metrics` body.
    fn metrics_text(&self) -> String;
}

/// The agent's readiness: `/ready` answers 200 only when registered and not draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Readiness {
    /// Registered with the orchestrator.
    pub connected: bool,
    /// Draining or shutting down: the agent takes no new jobs, so it is not ready for them.
    pub draining: bool,
}

/// The endpoints' socket: bound when the agent starts (so a port conflict is an error of
/// `Agent::start`, not a log line), served by the agent's supervisor until it stops.
pub(crate) struct Endpoints {
    listener: TcpListener,
}

impl Endpoints {
    /// Binds the listener (falling back from `::` to `0.0.0.0` where IPv6 is unavailable).
    /// Synchronous so callers outside the runtime get the error at once; must run inside the
    /// runtime's context.
    pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<Endpoints> {
        let listener = match std::net::TcpListener::bind(addr) {
            Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() => {
                std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], addr.port())))
                    .map_err(|_| e)?
            }
            other => other?,
        };
        listener.set_nonblocking(true)?;
        Ok(Endpoints {
            listener: TcpListener::from_std(listener)?,
        })
    }

    /// Where the endpoints are served.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves the endpoints until `shutdown` fires.
    pub(crate) async fn serve(self, view: Arc<dyn HealthView>, shutdown: CancellationToken) {
        let listener = self.listener;
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "http accept failed");
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let view = view.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let view = view.clone();
                    async move { Ok::<_, Infallible>(respond(&*view, &request)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "http connection ended with an error");
                        }
                    }
                    _ = shutdown.cancelled() => connection.as_mut().graceful_shutdown(),
                }
            });
        }
    }
}

fn respond(view: &dyn HealthView, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match request.uri().path() {
        "/health" => json(StatusCode::OK, &view.health()),
        "/ready" => {
            let Readiness {
                connected,
                draining,
            } = view.readiness();
            // The reference's bodies, plus a `draining` check only while draining (the
            // reference stays ready while draining; a load balancer should not send work to an
            // agent that refuses it).
            let mut checks = serde_json::json!({"connected": connected});
            if draining {
                checks["draining"] = serde_json::Value::Bool(true);
            }
            let (status, word) = if connected && !draining {
                (StatusCode::OK, "ready")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready")
            };
            json(
                status,
                &serde_json::json!({"status": word, "checks": checks}),
            )
        }
        "/metrics" => text(StatusCode::OK, METRICS_CONTENT_TYPE, view.metrics_text()),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    text(status, "application/json", body.to_string())
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// ISO-8601 UTC with milliseconds, e.g. `2026-11-28T19:26:08.123Z`; an instant past chrono's
/// range (year 262,143) shows as its last instant.
pub(crate) fn iso8601_utc(epoch_ms: u64) -> String {
    i64::try_from(epoch_ms)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_formats_known_instants() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601_utc(1_795_891_347_190), "2026-11-28T18:42:27.190Z");
        assert_eq!(iso8601_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601_utc(u64::MAX), "+262142-12-31T23:59:59.999Z");
    }
}
