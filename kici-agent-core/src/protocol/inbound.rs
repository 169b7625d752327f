//! Orchestrator -> agent messages and [`parse_inbound`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::job_config::JobDispatch;
use super::JobRef;

/// A message from the orchestrator that this agent understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    AuthSuccess(AuthSuccess),
    AuthFailure(AuthFailure),
    RegisterAck(RegisterAck),
    JobDispatch(Box<JobDispatch>),
    JobCancel(JobCancel),
    /// Sent just before a 4003 close.
    Error(ErrorMessage),
    /// The message we just sent was dropped by the orchestrator's rate limiter.
    RateLimitWarning(RateLimitWarning),
    /// A diagnostics bundle request.
    FleetLogsRequest(FleetLogsRequest),
    /// A valid JSON object whose `type` this agent does not handle. Ignored.
    Unknown {
        message_type: String,
    },
}

/// Why an inbound frame could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("frame is not a JSON object with a string `type`: {0}")]
    NotAMessage(String),
    #[error("`{message_type}` message does not match its schema: {source}")]
    Schema {
        message_type: String,
        /// For a dispatch whose ids could still be read: so it can be answered (spec §4.1 REC).
        job: Option<JobRef>,
        #[source]
        source: serde_json::Error,
    },
}

/// Parses one text frame from the orchestrator.
pub fn parse_inbound(text: &str) -> Result<Inbound, InboundError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| InboundError::NotAMessage(e.to_string()))?;
    let Some(message_type) = value.get("type").and_then(Value::as_str).map(str::to_owned) else {
        return Err(InboundError::NotAMessage("missing `type`".into()));
    };
    // Typed from the text, not from `value`: a `Value` object is sorted by key, and the order
    // of `namespacedSecrets` decides which context wins a key.
    fn typed<T: serde::de::DeserializeOwned>(
        text: &str,
        value: &Value,
        message_type: &str,
    ) -> Result<T, InboundError> {
        serde_json::from_str(text).map_err(|source| InboundError::Schema {
            message_type: message_type.to_owned(),
            job: serde_json::from_value::<JobRef>(value.clone()).ok(),
            source,
        })
    }
    Ok(match message_type.as_str() {
        "auth.success" => Inbound::AuthSuccess(typed(text, &value, &message_type)?),
        "auth.failure" => Inbound::AuthFailure(typed(text, &value, &message_type)?),
        "register.ack" => Inbound::RegisterAck(typed(text, &value, &message_type)?),
        "job.dispatch" => Inbound::JobDispatch(Box::new(typed(text, &value, &message_type)?)),
        "job.cancel" => Inbound::JobCancel(typed(text, &value, &message_type)?),
        "error" => Inbound::Error(typed(text, &value, &message_type)?),
        "rate.limit.warning" => Inbound::RateLimitWarning(typed(text, &value, &message_type)?),
        "fleet.logs.request" => Inbound::FleetLogsRequest(typed(text, &value, &message_type)?),
        _ => Inbound::Unknown { message_type },
    })
}

/// `auth.success`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthSuccess {
    pub connection_id: String,
}

/// `auth.failure`: permanent, the agent stops reconnecting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthFailure {
    pub reason: String,
}

/// `register.ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterAck {
    pub agent_id: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler_managed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_dispatch: Option<bool>,
}

/// `job.cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobCancel {
    #[serde(default)]
    pub message_id: String,
    pub run_id: String,
    pub job_id: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

/// `error` `{code, message}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// `rate.limit.warning` `{retryAfterMs}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitWarning {
    #[serde(default)]
    pub retry_after_ms: u64,
}

/// `fleet.logs.request` (protocol.md §4.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetLogsRequest {
    pub request_id: String,
    /// How far back log files are wanted.
    pub log_window_hours: f64,
    /// The largest bundle wanted, in bytes.
    pub max_bytes: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tests::fixture;

    #[test]
    fn session_inbound_messages_parse() {
        for name in [
            "session.hello.jsonl",
            "session.fails.jsonl",
            "session.cache-build.jsonl",
        ] {
            for line in fixture(name).lines().filter(|l| !l.trim().is_empty()) {
                let record: Value = serde_json::from_str(line).unwrap();
                if record["dir"] == "in" {
                    let text = record["msg"].to_string();
                    let parsed = parse_inbound(&text).unwrap();
                    // Feature responses (cache, provenance, ...) are not handled: Unknown.
                    let handled = matches!(
                        record["msg"]["type"].as_str(),
                        Some("auth.success" | "register.ack" | "job.dispatch" | "job.cancel")
                    );
                    assert_eq!(
                        handled,
                        !matches!(parsed, Inbound::Unknown { .. }),
                        "{name}: {text}"
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_type_and_garbage_do_not_fail_hard() {
        assert!(matches!(
            parse_inbound(r#"{"type":"step.approval-resolved","requestId":"x"}"#),
            Ok(Inbound::Unknown { message_type }) if message_type == "step.approval-resolved"
        ));
        assert!(matches!(
            parse_inbound(
                r#"{"type":"fleet.logs.request","requestId":"x","logWindowHours":24,"maxBytes":1000}"#
            ),
            Ok(Inbound::FleetLogsRequest(request)) if request.request_id == "x"
        ));
        assert!(matches!(
            parse_inbound("not json"),
            Err(InboundError::NotAMessage(_))
        ));
        assert!(matches!(
            parse_inbound("[1,2]"),
            Err(InboundError::NotAMessage(_))
        ));
    }

    #[test]
    fn malformed_dispatch_keeps_ids_so_it_can_be_answered() {
        let err =
            parse_inbound(r#"{"type":"job.dispatch","runId":"r1","jobId":"j1"}"#).unwrap_err();
        match err {
            InboundError::Schema { job: Some(job), .. } => {
                assert_eq!(job.run_id, "r1");
                assert_eq!(job.job_id, "j1");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rate_limit_warning_is_understood() {
        assert_eq!(
            parse_inbound(r#"{"type":"rate.limit.warning","retryAfterMs":250}"#).unwrap(),
            Inbound::RateLimitWarning(RateLimitWarning {
                retry_after_ms: 250
            })
        );
    }
}
