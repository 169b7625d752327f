//! HTTP/JSON control API over a [`MockOrchestrator`], for tests written in C or Python that drive
//! the mock through its binary.
//!
//! | route | answer |
//! |---|---|
//! | `GET /received` | `[{conn, atMs, textLen, accepted, msg}]` |
//! | `GET /closes` | `[{conn, byServer, code, reason}]` |
//! | `GET /agents` | registered agent ids |
//! | `GET /registrations` | every accepted `agent.register` |
//! | `GET /stats` | `{rateLimitWarnings, droppedByRateLimit, violations, tlsFailures}` |
//! | `GET /wait?type=T&state=S&jobId=J&timeoutMs=N` | the first matching *accepted* message, or 408 |
//! | `GET /wait_agent?timeoutMs=N` | `{agentId}` of the first registered agent, or 408 |
//! | `GET /wait_close?code=C&timeoutMs=N` | the first close record (with that code), or 408 |
//! | `GET /wait_tls_failures?count=C&timeoutMs=N` | `{tlsFailures}` once there are C (default 1) failed TLS handshakes, or 408 |
//! | `POST /dispatch {agentId, dispatch}` or `{agentId, sample:{runId, jobId, repoUrl, ref, sha, steps}}` | `{ok:true}` |
//! | `POST /cancel {agentId, runId, jobId, force?}` | `{ok:true}` |
//! | `POST /send_raw {agentId, text}` | `{ok:true}` |
//! | `POST /disconnect {agentId, code}` | `{ok:true}` |
//! | `POST /shutdown` | `{ok:true}`; then [`ControlServer::shutdown_requested`] completes |
//!
//! Errors: 400 bad request, 404 unknown route or agent, 409 agent connection already ended.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{sample_dispatch, CloseRecord, MockError, MockOrchestrator, Received};

/// Default `timeoutMs` of the wait routes.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// A running control server.
pub struct ControlServer {
    addr: SocketAddr,
    shutdown: watch::Receiver<bool>,
}

impl ControlServer {
    /// Its base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Completes once a `POST /shutdown` has been answered.
    pub async fn shutdown_requested(&self) {
        let mut shutdown = self.shutdown.clone();
        // An error means the server task is gone, which is as final as a request.
        let _ = shutdown.wait_for(|requested| *requested).await;
    }
}

/// Starts the control API for `mock` on 127.0.0.1 (any free port).
pub async fn start(mock: MockOrchestrator) -> io::Result<ControlServer> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mock = mock.clone();
            let shutdown_tx = Arc::clone(&shutdown_tx);
            tokio::spawn(async move {
                let requested = Arc::new(AtomicBool::new(false));
                let flag = Arc::clone(&requested);
                let service = service_fn(move |request| {
                    let (mock, flag) = (mock.clone(), Arc::clone(&flag));
                    async move { Ok::<_, Infallible>(route(mock, request, &flag).await) }
                });
                // A client that hangs up early is its own problem; nothing to report.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                // Signal only after the connection (and so the answer) is finished.
                if requested.load(Ordering::SeqCst) {
                    shutdown_tx.send_replace(true);
                }
            });
        }
    });
    Ok(ControlServer { addr, shutdown })
}

type HttpResponse = Response<Full<Bytes>>;

fn respond(status: StatusCode, body: &Value) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn ok(body: &Value) -> HttpResponse {
    respond(StatusCode::OK, body)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> HttpResponse {
    respond(status, &json!({"error": message.to_string()}))
}

fn mock_error(err: MockError) -> HttpResponse {
    let status = match err {
        MockError::UnknownAgent(_) => StatusCode::NOT_FOUND,
        MockError::ConnectionClosed(_) => StatusCode::CONFLICT,
        MockError::InvalidDispatch(_) => StatusCode::BAD_REQUEST,
    };
    error(status, err)
}

fn done(result: Result<(), MockError>) -> HttpResponse {
    match result {
        Ok(()) => ok(&json!({"ok": true})),
        Err(err) => mock_error(err),
    }
}

async fn route(
    mock: MockOrchestrator,
    request: Request<Incoming>,
    shutdown: &AtomicBool,
) -> HttpResponse {
    let (parts, body) = request.into_parts();
    let query = parse_query(parts.uri.query().unwrap_or_default());
    match (&parts.method, parts.uri.path()) {
        (&Method::GET, "/received") => {
            let started = mock.shared().started;
            let frames: Vec<Value> = mock
                .received()
                .iter()
                .map(|r| received_json(r, started))
                .collect();
            ok(&Value::Array(frames))
        }
        (&Method::GET, "/closes") => ok(&Value::Array(
            mock.closes().iter().map(close_json).collect(),
        )),
        (&Method::GET, "/agents") => ok(&json!(mock.registered_agents())),
        (&Method::GET, "/registrations") => ok(&Value::Array(mock.registrations())),
        (&Method::GET, "/stats") => ok(&json!({
            "rateLimitWarnings": mock.rate_limit_warnings_sent(),
            "droppedByRateLimit": mock.dropped_by_rate_limit(),
            "violations": mock.violations(),
            "tlsFailures": mock.tls_failures(),
        })),
        (&Method::GET, "/wait") => wait_message(&mock, &query).await,
        (&Method::GET, "/wait_agent") => match wait_timeout(&query) {
            Ok(timeout) => match mock.wait_for_agent(timeout).await {
                Some(agent_id) => ok(&json!({"agentId": agent_id})),
                None => error(StatusCode::REQUEST_TIMEOUT, "no agent registered"),
            },
            Err(problem) => error(StatusCode::BAD_REQUEST, problem),
        },
        (&Method::GET, "/wait_close") => wait_close(&mock, &query).await,
        (&Method::GET, "/wait_tls_failures") => wait_tls_failures(&mock, &query).await,
        (&Method::POST, path) => {
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(err) => {
                    return error(StatusCode::BAD_REQUEST, format!("cannot read body: {err}"))
                }
            };
            if path == "/shutdown" {
                shutdown.store(true, Ordering::SeqCst);
                let mut response = ok(&json!({"ok": true}));
                response
                    .headers_mut()
                    .insert(CONNECTION, hyper::header::HeaderValue::from_static("close"));
                return response;
            }
            let body: Value = match serde_json::from_slice(&body) {
                Ok(body) => body,
                Err(err) => {
                    return error(StatusCode::BAD_REQUEST, format!("body is not JSON: {err}"))
                }
            };
            post(&mock, path, &body).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route {} {}", parts.method, parts.uri.path()),
        ),
    }
}

async fn post(mock: &MockOrchestrator, path: &str, body: &Value) -> HttpResponse {
    let text = |name: &str| body.get(name).and_then(Value::as_str);
    let Some(agent_id) = text("agentId") else {
        return error(StatusCode::BAD_REQUEST, "missing string `agentId`");
    };
    match path {
        "/dispatch" => {
            let dispatch = match (body.get("dispatch"), body.get("sample")) {
                (Some(dispatch), _) => dispatch.clone(),
                (None, Some(sample)) => {
                    let field =
                        |name: &str| sample.get(name).and_then(Value::as_str).unwrap_or_default();
                    sample_dispatch(
                        field("runId"),
                        field("jobId"),
                        field("repoUrl"),
                        field("ref"),
                        field("sha"),
                        sample.get("steps").cloned().unwrap_or_else(|| json!([])),
                    )
                }
                (None, None) => {
                    return error(StatusCode::BAD_REQUEST, "need `dispatch` or `sample`")
                }
            };
            done(mock.dispatch(agent_id, dispatch).await)
        }
        "/cancel" => match (text("runId"), text("jobId")) {
            (Some(run_id), Some(job_id)) => {
                let force = body.get("force").and_then(Value::as_bool).unwrap_or(false);
                done(mock.cancel(agent_id, run_id, job_id, force).await)
            }
            _ => error(StatusCode::BAD_REQUEST, "need string `runId` and `jobId`"),
        },
        "/send_raw" => match text("text") {
            Some(raw) => done(mock.send_raw(agent_id, raw).await),
            None => error(StatusCode::BAD_REQUEST, "missing string `text`"),
        },
        "/disconnect" => match body
            .get("code")
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok())
        {
            Some(code) => done(mock.disconnect(agent_id, code).await),
            None => error(StatusCode::BAD_REQUEST, "missing close `code`"),
        },
        _ => error(StatusCode::NOT_FOUND, format!("no route POST {path}")),
    }
}

async fn wait_tls_failures(mock: &MockOrchestrator, query: &[(String, String)]) -> HttpResponse {
    let timeout = match wait_timeout(query) {
        Ok(timeout) => timeout,
        Err(problem) => return error(StatusCode::BAD_REQUEST, problem),
    };
    let count = match query_value(query, "count").map(str::parse::<usize>) {
        None => 1,
        Some(Ok(count)) => count,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "`count` must be a number"),
    };
    if mock
        .wait_until(|m| m.tls_failures().len() >= count, timeout)
        .await
    {
        ok(&json!({"tlsFailures": mock.tls_failures()}))
    } else {
        error(
            StatusCode::REQUEST_TIMEOUT,
            format!("fewer than {count} failed TLS handshakes"),
        )
    }
}

async fn wait_message(mock: &MockOrchestrator, query: &[(String, String)]) -> HttpResponse {
    let timeout = match wait_timeout(query) {
        Ok(timeout) => timeout,
        Err(problem) => return error(StatusCode::BAD_REQUEST, problem),
    };
    let Some(msg_type) = query_value(query, "type") else {
        return error(StatusCode::BAD_REQUEST, "missing query parameter `type`");
    };
    let state = query_value(query, "state");
    let job_id = query_value(query, "jobId");
    let matches_field = |msg: &Value, name: &str, wanted: Option<&str>| {
        wanted.is_none_or(|wanted| msg.get(name).and_then(Value::as_str) == Some(wanted))
    };
    let found = mock
        .wait_for_message(
            msg_type,
            |msg| matches_field(msg, "state", state) && matches_field(msg, "jobId", job_id),
            timeout,
        )
        .await;
    match found {
        Some(msg) => ok(&msg),
        None => error(
            StatusCode::REQUEST_TIMEOUT,
            format!("no accepted `{msg_type}` matched"),
        ),
    }
}

async fn wait_close(mock: &MockOrchestrator, query: &[(String, String)]) -> HttpResponse {
    let timeout = match wait_timeout(query) {
        Ok(timeout) => timeout,
        Err(problem) => return error(StatusCode::BAD_REQUEST, problem),
    };
    let code = match query_value(query, "code").map(str::parse::<u16>) {
        None => None,
        Some(Ok(code)) => Some(code),
        Some(Err(err)) => return error(StatusCode::BAD_REQUEST, format!("bad `code`: {err}")),
    };
    match mock
        .wait_for_close(
            |close| code.is_none_or(|code| close.code == Some(code)),
            timeout,
        )
        .await
    {
        Some(close) => ok(&close_json(&close)),
        None => error(StatusCode::REQUEST_TIMEOUT, "no matching close"),
    }
}

fn wait_timeout(query: &[(String, String)]) -> Result<Duration, String> {
    match query_value(query, "timeoutMs").map(str::parse::<u64>) {
        None => Ok(DEFAULT_WAIT),
        Some(Ok(ms)) => Ok(Duration::from_millis(ms)),
        Some(Err(err)) => Err(format!("bad `timeoutMs`: {err}")),
    }
}

fn received_json(received: &Received, started: std::time::Instant) -> Value {
    json!({
        "conn": received.conn,
        "atMs": received.at.saturating_duration_since(started).as_millis() as u64,
        "textLen": received.text_len,
        "accepted": received.accepted,
        "msg": received.msg,
    })
}

fn close_json(close: &CloseRecord) -> Value {
    json!({
        "conn": close.conn,
        "byServer": close.by_server,
        "code": close.code,
        "reason": close.reason,
    })
}

fn query_value<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Splits `a=1&b=x%2Fy` into decoded pairs (`application/x-www-form-urlencoded`: `+` is a
/// space, malformed escapes stay as written).
fn parse_query(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        let query = parse_query("type=job.status&state=run%2Bning&jobId=a+b&flag");
        assert_eq!(query_value(&query, "type"), Some("job.status"));
        assert_eq!(query_value(&query, "state"), Some("run+ning"));
        assert_eq!(query_value(&query, "jobId"), Some("a b"));
        assert_eq!(query_value(&query, "flag"), Some(""));
        assert_eq!(query_value(&parse_query("p=100%"), "p"), Some("100%"));
    }
}
