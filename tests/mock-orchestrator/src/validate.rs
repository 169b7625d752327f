//! Hand-written checks of agent→orchestrator messages, derived from the field tables of
//! protocol.md §2.3, §3.1, §4.2 and §7. Deliberately independent of the agent's own types, so an
//! agent bug cannot hide behind a shared definition.
//!
//! Two levels: *schema* failures are what the real orchestrator rejects (4003 close), and *quality*
//! findings are accepted on the wire but are bugs in an agent of ours (e.g. an object `data.error`
//! that the orchestrator would store as "[object Object]").

use serde_json::{Map, Value};

/// JobState (§4.3).
const JOB_STATES: &[&str] = &[
    "pending",
    "queued",
    "running",
    "recovering",
    "cancelling",
    "success",
    "failed",
    "cancelled",
    "skipped",
    "timed_out_stale",
    "drift_dropped",
];
/// The JobState subset an agent should send (§4.3).
const AGENT_JOB_STATES: &[&str] = &["running", "cancelling", "success", "failed", "cancelled"];
/// StepState (§4.3).
const STEP_STATES: &[&str] = &[
    "running",
    "success",
    "failed",
    "skipped",
    "pending",
    "cancelled",
];
/// Top-level `step_type` (§4.3); the cache pseudo-step values are only valid inside `data`.
const STEP_TYPES: &[&str] = &[
    "step",
    "hook:onCancel",
    "hook:cleanup",
    "hook:onSuccess",
    "hook:onFailure",
    "hook:beforeStep",
    "hook:afterStep",
];
const REJECT_REASONS: &[&str] = &["busy", "draining"];
const CONCURRENCY_KINDS: &[&str] = &["sequential", "parallel-child", "parallel-group"];
const CACHE_TYPES: &[&str] = &["source", "deps"];
const METRIC_TYPES: &[&str] = &["counter", "histogram", "gauge", "upDownCounter"];

/// Message types that name a job and are subject to the ownership check (§5.1).
pub(crate) const JOB_SCOPED_TYPES: &[&str] = &[
    "job.ack",
    "job.reject",
    "job.status",
    "step.status",
    "log.chunk",
    "job.heartbeat",
];

/// Feature messages that carry a `jobId`; for a job not owned they are dropped silently (§4.2).
pub(crate) const JOB_SCOPED_FEATURE_TYPES: &[&str] = &[
    "job.concurrency.report",
    "cache.upload.request",
    "cache.upload.complete",
    "cache.user.restore.request",
    "cache.user.save.request",
    "cache.user.save.complete",
    "provenance.upload.request",
    "provenance.upload.complete",
    "event.emit",
    "step.approval-request",
];

/// The type a field must have.
#[derive(Debug, Clone, Copy)]
enum Ty {
    Str,
    NonEmptyStr,
    Num,
    Int,
    NonNegInt,
    PosInt,
    Bool,
    Obj,
    Arr,
    StrArr,
    OneOf(&'static [&'static str]),
}

/// One row of a field table.
struct Field {
    name: &'static str,
    ty: Ty,
    required: bool,
}

/// A required field (a struct literal, so tables of them are promoted to `'static`).
macro_rules! req {
    ($name:literal, $ty:expr) => {
        Field {
            name: $name,
            ty: $ty,
            required: true,
        }
    };
}

/// An optional field.
macro_rules! opt {
    ($name:literal, $ty:expr) => {
        Field {
            name: $name,
            ty: $ty,
            required: false,
        }
    };
}

/// The field table of every member of the accepted union (§4.2), keyed by `type`.
fn fields_of(msg_type: &str) -> Option<&'static [Field]> {
    use Ty::*;
    let table: &'static [Field] = match msg_type {
        "auth.request" => &[req!("token", NonEmptyStr), req!("protocolVersion", Int)],
        "agent.register" => &[
            req!("messageId", Str),
            req!("agentId", Str),
            req!("labels", StrArr),
            opt!("platform", Str),
            opt!("arch", Str),
            opt!("version", Str),
            opt!("maxConcurrency", PosInt),
            opt!("inFlightJobs", Arr),
            opt!("hostname", Str),
            opt!("osRelease", Str),
            opt!("osVersion", Str),
            opt!("totalMemoryMb", Num),
            opt!("cpuCount", Num),
            opt!("nodeVersion", Str),
            opt!("runningAsUser", Str),
            opt!("runningAsUid", Num),
            opt!("properties", Obj),
        ],
        "agent.status" => &[
            req!("messageId", Str),
            req!("agentId", Str),
            req!("activeJobs", Num),
            opt!("memoryUsedMb", Num),
            opt!("memoryAvailableMb", Num),
            opt!("uptimeSeconds", Num),
        ],
        "config.ack" => &[req!("messageId", Str), req!("agentId", Str)],
        "job.ack" => &[
            req!("messageId", Str),
            req!("runId", Str),
            req!("jobId", Str),
            req!("timestamp", Num),
        ],
        "job.reject" => &[
            req!("messageId", Str),
            req!("runId", Str),
            req!("jobId", Str),
            req!("reason", OneOf(REJECT_REASONS)),
            req!("timestamp", Num),
        ],
        "job.status" => &[
            req!("messageId", Str),
            req!("runId", Str),
            req!("jobId", Str),
            req!("state", OneOf(JOB_STATES)),
            req!("timestamp", Num),
            opt!("data", Obj),
            opt!("droppedJobs", StrArr),
            opt!("secretOutputs", Obj),
        ],
        "step.status" => &[
            req!("messageId", Str),
            req!("runId", Str),
            req!("jobId", Str),
            req!("stepIndex", NonNegInt),
            req!("stepName", Str),
            req!("state", OneOf(STEP_STATES)),
            req!("timestamp", Num),
            opt!("data", Obj),
            opt!("step_type", OneOf(STEP_TYPES)),
            opt!("secretsAccessed", StrArr),
            opt!("concurrencyKind", OneOf(CONCURRENCY_KINDS)),
            opt!("groupId", Str),
            opt!("logBytesStreamed", NonNegInt),
        ],
        // The orchestrator's manual fast-path check (§7); line contents are not type-checked.
        "log.chunk" => &[
            req!("messageId", Str),
            req!("runId", Str),
            req!("jobId", Str),
            req!("stepIndex", Num),
            req!("lines", Arr),
            req!("timestamp", Num),
        ],
        "job.heartbeat" => &[
            req!("runId", Str),
            req!("jobId", Str),
            req!("timestamp", Num),
        ],
        "agent.log" => &[
            req!("messageId", Str),
            req!("agentId", Str),
            req!("lines", StrArr),
            req!("timestamp", Num),
        ],
        "agent.metrics" => &[
            req!("messageId", Str),
            req!("agentId", Str),
            req!("metrics", Arr),
            req!("timestamp", Num),
        ],
        "job.concurrency.report" => &[
            req!("messageId", Str),
            req!("runId", Str),
            req!("jobId", Str),
            req!("group", Str),
        ],
        "cache.upload.request" => &[
            req!("messageId", Str),
            req!("jobId", Str),
            req!("cacheType", OneOf(CACHE_TYPES)),
            opt!("contentHash", Str),
            opt!("lockfileHash", Str),
            req!("platform", Str),
            req!("arch", Str),
        ],
        "cache.upload.complete" => &[
            req!("messageId", Str),
            req!("jobId", Str),
            req!("cacheType", OneOf(CACHE_TYPES)),
            opt!("contentHash", Str),
            opt!("lockfileHash", Str),
            req!("platform", Str),
            req!("arch", Str),
            opt!("depsHash", Str),
        ],
        "cache.user.restore.request" => &[
            req!("messageId", Str),
            req!("jobId", Str),
            req!("key", Str),
            opt!("restoreKeys", StrArr),
        ],
        "cache.user.save.request" => {
            &[req!("messageId", Str), req!("jobId", Str), req!("key", Str)]
        }
        "cache.user.save.complete" => &[
            req!("messageId", Str),
            req!("jobId", Str),
            req!("key", Str),
            req!("tarHash", Str),
            req!("sizeBytes", NonNegInt),
        ],
        "provenance.upload.request" => &[
            req!("messageId", Str),
            req!("jobId", Str),
            req!("subjectDigest", Str),
        ],
        "provenance.upload.complete" => &[
            req!("messageId", Str),
            req!("jobId", Str),
            req!("subjectName", Str),
            req!("subjectDigest", Str),
            req!("mediaType", Str),
        ],
        "event.emit" => &[
            req!("jobId", Str),
            req!("requestId", Str),
            req!("eventName", Str),
            req!("payload", Obj),
            opt!("target", Obj),
        ],
        "agent.api.request" => &[
            req!("requestId", Str),
            req!("method", Str),
            req!("params", Obj),
        ],
        "fleet.bundle.chunk" => &[
            req!("requestId", Str),
            req!("seq", NonNegInt),
            req!("isLast", Bool),
            req!("dataB64", Str),
        ],
        "fleet.bundle.error" => &[req!("requestId", Str), req!("message", Str)],
        "step.approval-request" => &[
            req!("messageId", Str),
            req!("runId", Str),
            req!("jobId", Str),
            req!("stepIndex", NonNegInt),
            req!("stepName", Str),
            req!("clauses", Arr),
            req!("reason", Str),
            opt!("timeoutSeconds", PosInt),
            opt!("payload", Obj),
        ],
        _ => return None,
    };
    Some(table)
}

fn is_integer(value: &Value) -> bool {
    value
        .as_f64()
        .is_some_and(|n| n.is_finite() && n.fract() == 0.0)
}

fn has_type(value: &Value, ty: Ty) -> bool {
    match ty {
        Ty::Str => value.is_string(),
        Ty::NonEmptyStr => value.as_str().is_some_and(|s| !s.is_empty()),
        Ty::Num => value.is_number(),
        Ty::Int => is_integer(value),
        Ty::NonNegInt => is_integer(value) && value.as_f64().is_some_and(|n| n >= 0.0),
        Ty::PosInt => is_integer(value) && value.as_f64().is_some_and(|n| n > 0.0),
        Ty::Bool => value.is_boolean(),
        Ty::Obj => value.is_object(),
        Ty::Arr => value.is_array(),
        Ty::StrArr => value
            .as_array()
            .is_some_and(|items| items.iter().all(Value::is_string)),
        Ty::OneOf(allowed) => value.as_str().is_some_and(|s| allowed.contains(&s)),
    }
}

/// Checks `object` against a field table. A present `null` is a type error, as with Zod's
/// `.optional()`.
fn check_fields(object: &Map<String, Value>, fields: &[Field], what: &str) -> Result<(), String> {
    for field in fields {
        match object.get(field.name) {
            None if field.required => {
                return Err(format!("{what}: missing required field `{}`", field.name))
            }
            None => {}
            Some(value) if !has_type(value, field.ty) => {
                return Err(format!(
                    "{what}: field `{}` must be {:?}, got {value}",
                    field.name, field.ty
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn as_object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{what}: not a JSON object"))
}

/// The `type` of a message, if it is an object with a string `type`.
pub(crate) fn message_type(msg: &Value) -> Option<&str> {
    msg.get("type").and_then(Value::as_str)
}

/// Validates a message against the accepted union (§4.2), including nested shapes. The unvalidated
/// extras `run.event`/`job.context` and the `heartbeat` fast path are handled by the caller.
pub(crate) fn check_union_member(msg: &Value) -> Result<(), String> {
    let object = as_object(msg, "message")?;
    let msg_type = message_type(msg).ok_or("message: missing string field `type`")?;
    let fields = fields_of(msg_type).ok_or_else(|| format!("unknown message type `{msg_type}`"))?;
    check_fields(object, fields, msg_type)?;
    check_nested(msg_type, object)
}

/// Validates an `auth.request` (§2.3). The protocol version floor is checked by the caller.
pub(crate) fn check_auth_request(msg: &Value) -> Result<(), String> {
    match message_type(msg) {
        Some("auth.request") => check_union_member(msg),
        other => Err(format!("expected auth.request, got type {other:?}")),
    }
}

/// Validates an `agent.register` (§3.1).
pub(crate) fn check_register(msg: &Value) -> Result<(), String> {
    match message_type(msg) {
        Some("agent.register") => check_union_member(msg),
        other => Err(format!("expected agent.register, got type {other:?}")),
    }
}

fn check_each<F>(items: &[Value], what: &str, check: F) -> Result<(), String>
where
    F: Fn(&Map<String, Value>, &str) -> Result<(), String>,
{
    for (index, item) in items.iter().enumerate() {
        let what = format!("{what}[{index}]");
        check(as_object(item, &what)?, &what)?;
    }
    Ok(())
}

fn array_field<'a>(object: &'a Map<String, Value>, name: &str) -> &'a [Value] {
    object
        .get(name)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Shapes inside arrays and records that a flat field table cannot express.
fn check_nested(msg_type: &str, object: &Map<String, Value>) -> Result<(), String> {
    use Ty::*;
    match msg_type {
        "agent.register" => {
            check_each(
                array_field(object, "inFlightJobs"),
                "agent.register.inFlightJobs",
                |job, what| check_fields(job, &[req!("jobId", Str), req!("runId", Str)], what),
            )?;
            if let Some(properties) = object.get("properties").and_then(Value::as_object) {
                for (key, value) in properties {
                    if !(value.is_string() || value.is_number() || value.is_boolean()) {
                        return Err(format!(
                            "agent.register.properties.{key} must be a string, number or boolean"
                        ));
                    }
                }
            }
        }
        "job.status" => {
            if let Some(outputs) = object.get("secretOutputs").and_then(Value::as_object) {
                for (key, value) in outputs {
                    let what = format!("job.status.secretOutputs.{key}");
                    check_fields(
                        as_object(value, &what)?,
                        &[req!("agentPublicKey", Str), req!("encrypted", Str)],
                        &what,
                    )?;
                }
            }
        }
        "agent.metrics" => check_each(
            array_field(object, "metrics"),
            "agent.metrics.metrics",
            |metric, what| {
                check_fields(
                    metric,
                    &[
                        req!("name", Str),
                        req!("type", OneOf(METRIC_TYPES)),
                        opt!("value", Num),
                        opt!("labels", Obj),
                        opt!("buckets", Arr),
                        opt!("count", Num),
                        opt!("sum", Num),
                    ],
                    what,
                )?;
                if let Some(labels) = metric.get("labels").and_then(Value::as_object) {
                    if !labels.values().all(Value::is_string) {
                        return Err(format!("{what}.labels values must be strings"));
                    }
                }
                check_each(array_field(metric, "buckets"), what, |bucket, what| {
                    check_fields(bucket, &[req!("le", Num), req!("count", Num)], what)
                })
            },
        )?,
        "event.emit" => {
            if let Some(target) = object.get("target").and_then(Value::as_object) {
                check_fields(target, &[opt!("repos", StrArr)], "event.emit.target")?;
            }
        }
        "step.approval-request" => check_each(
            array_field(object, "clauses"),
            "step.approval-request.clauses",
            |clause, what| {
                let is_team = clause.get("team").is_some_and(Value::is_string);
                let is_user = clause.get("user").is_some_and(Value::is_string);
                if is_team || is_user {
                    Ok(())
                } else {
                    Err(format!("{what} must be {{team}} or {{user}}"))
                }
            },
        )?,
        _ => {}
    }
    Ok(())
}

/// `run.event` eventTypes the REF agent sends (§4.4).
const RUN_EVENT_TYPES: &[&str] = &[
    "agent.execution.start",
    "agent.execution.end",
    "agent.teardown",
    "agent.clone.start",
    "agent.clone.end",
    "step.secret_mount",
    "cache.restore",
    "cache.save",
];
const ENV_CATEGORIES: &[&str] = &["system", "user", "inherited", "secret"];

/// Checks a `run.event` or `job.context` against its §4.4 shape. The orchestrator forwards them
/// unvalidated, so a mismatch is not a 4003 but a bug of ours: the Platform timeline reads these
/// fields.
pub(crate) fn timeline_findings(msg: &Value) -> Vec<String> {
    use Ty::*;
    let Some(object) = msg.as_object() else {
        return vec!["timeline message is not an object".into()];
    };
    let result = match message_type(msg) {
        Some("run.event") => check_fields(
            object,
            &[
                req!("runId", Str),
                req!("eventType", OneOf(RUN_EVENT_TYPES)),
                req!("timestampMs", Num),
                req!("sourceService", OneOf(&["agent"])),
                opt!("metadata", Obj),
            ],
            "run.event",
        )
        .and_then(|()| {
            // Required keys whose value may be null.
            for (name, ty) in [("jobId", Str), ("durationMs", Num)] {
                match object.get(name) {
                    Some(Value::Null) => {}
                    Some(value) if has_type(value, ty) => {}
                    _ => return Err(format!("run.event.{name} must be {ty:?} or null")),
                }
            }
            let event = object.get("eventType").and_then(Value::as_str);
            if event == Some("agent.execution.end")
                && !(object.get("durationMs").is_some_and(Value::is_number)
                    && object
                        .get("metadata")
                        .and_then(|m| m.get("status"))
                        .is_some_and(Value::is_string))
            {
                return Err(
                    "run.event agent.execution.end needs durationMs and metadata.status".into(),
                );
            }
            Ok(())
        }),
        Some("job.context") => check_fields(
            object,
            &[req!("runId", Str), req!("jobId", Str), req!("context", Obj)],
            "job.context",
        )
        .and_then(|()| {
            let context = as_object(&object["context"], "job.context.context")?;
            check_fields(
                context,
                &[
                    opt!("envVars", Arr),
                    opt!("runtime", Obj),
                    opt!("sandboxType", Str),
                    opt!("labels", StrArr),
                    opt!("workingDirectory", Str),
                    opt!("gitRef", Str),
                ],
                "job.context.context",
            )?;
            if let Some(runtime) = context.get("runtime").and_then(Value::as_object) {
                check_fields(
                    runtime,
                    &[opt!("nodeVersion", Str), opt!("os", Str), opt!("arch", Str)],
                    "job.context.context.runtime",
                )?;
            }
            check_each(
                array_field(context, "envVars"),
                "job.context.context.envVars",
                |var, what| {
                    check_fields(
                        var,
                        &[
                            req!("name", Str),
                            req!("value", Str),
                            req!("category", OneOf(ENV_CATEGORIES)),
                        ],
                        what,
                    )
                },
            )
        }),
        other => Err(format!("not a timeline message: {other:?}")),
    };
    result.err().into_iter().collect()
}

/// Findings that the orchestrator accepts but that are bugs in an agent of ours: things the real
/// orchestrator would mis-store or silently ignore. Call only on messages that passed the schema,
/// after registration.
pub(crate) fn quality_findings(msg: &Value) -> Vec<String> {
    let mut findings = Vec::new();
    let data_error_is_not_string = msg
        .get("data")
        .and_then(|data| data.get("error"))
        .is_some_and(|error| !error.is_string());
    match message_type(msg) {
        Some("job.status") => {
            if data_error_is_not_string {
                findings.push(
                    "job.status data.error is not a string (stored as \"[object Object]\")".into(),
                );
            }
            let state = msg.get("state").and_then(Value::as_str).unwrap_or_default();
            if !AGENT_JOB_STATES.contains(&state) {
                findings.push(format!(
                    "job.status state `{state}` is not one an agent should send (ignored or only logged)"
                ));
            }
            if let Some(outputs) = msg.get("secretOutputs").and_then(Value::as_object) {
                if state != "success" {
                    findings.push(format!(
                        "job.status secretOutputs on state `{state}` (the orchestrator reads them only from `success`)"
                    ));
                }
                for (key, envelope) in outputs {
                    if let Err(e) = crate::run_keys::envelope_shape(envelope) {
                        findings.push(format!("job.status secretOutputs.{key}: {e}"));
                    }
                }
            }
        }
        Some("auth.request") => {
            findings.push("auth.request after registration (the orchestrator ignores it)".into());
        }
        Some("step.status") if data_error_is_not_string => findings
            .push("step.status data.error is not a string (stored as \"[object Object]\")".into()),
        Some("log.chunk") => {
            let lines = msg.get("lines").and_then(Value::as_array);
            if !lines.is_some_and(|lines| lines.iter().all(Value::is_string)) {
                findings.push("log.chunk lines must all be strings".into());
            }
            let step_index = msg.get("stepIndex").unwrap_or(&Value::Null);
            if !(is_integer(step_index) && step_index.as_f64().is_some_and(|n| n >= -1.0)) {
                findings.push(format!(
                    "log.chunk stepIndex must be an integer >= -1, got {step_index}"
                ));
            }
        }
        _ => {}
    }
    findings
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn register() -> Value {
        json!({"type":"agent.register","messageId":"m1","agentId":"a1","labels":["x"],
               "maxConcurrency":1,"platform":"linux","runningAsUid":0,
               "inFlightJobs":[{"jobId":"j","runId":"r"}],"properties":{"k":"v","n":1,"b":true}})
    }

    #[test]
    fn fixture_traffic_passes() {
        // One line of each kind from fixtures/real-orchestrator/agent-to-orchestrator.*.jsonl.
        let lines = [
            r#"{"type":"config.ack","messageId":"ea33","agentId":"peer-agent-1"}"#,
            r#"{"type":"agent.status","messageId":"3fe0","agentId":"peer-agent-1","activeJobs":0}"#,
            r#"{"type":"job.ack","messageId":"c2cc","runId":"910a","jobId":"5f78","timestamp":1795891350099}"#,
            r#"{"type":"job.status","messageId":"fd6c","runId":"910a","jobId":"5f78","state":"running","timestamp":1795891350350}"#,
            r#"{"type":"step.status","messageId":"f4c9","runId":"910a","jobId":"5f78","stepIndex":0,"stepName":"say-hello","state":"running","timestamp":1795891350350,"step_type":"step"}"#,
            r#"{"type":"log.chunk","messageId":"b8c6","runId":"910a","jobId":"5f78","stepIndex":0,"lines":["hello"],"timestamp":1795891350551}"#,
            r#"{"type":"step.status","messageId":"3451","runId":"16e1","jobId":"48e5","stepIndex":0,"stepName":"boom","state":"failed","timestamp":1795891356151,"step_type":"step","data":{"error":"Command failed with exit code 3","exitCode":3,"durationMs":402},"logBytesStreamed":54}"#,
            r#"{"type":"cache.upload.complete","messageId":"20e3","jobId":"36ad","cacheType":"source","contentHash":"f1ac","platform":"linux","arch":"x64"}"#,
        ];
        for line in lines {
            let msg: Value = serde_json::from_str(line).unwrap();
            assert_eq!(check_union_member(&msg), Ok(()), "{line}");
            assert!(quality_findings(&msg).is_empty(), "{line}");
        }
        assert_eq!(check_register(&register()), Ok(()));
    }

    #[test]
    fn register_shape_errors_are_rejected() {
        let mut bad = register();
        bad["labels"] = json!(["ok", 3]);
        assert!(check_register(&bad).is_err());
        let mut bad = register();
        bad["maxConcurrency"] = json!(0);
        assert!(check_register(&bad).is_err());
        let mut bad = register();
        bad["inFlightJobs"] = json!([{"jobId":"j"}]);
        assert!(check_register(&bad).is_err());
        let mut bad = register();
        bad["properties"] = json!({"nested":{"x":1}});
        assert!(check_register(&bad).is_err());
        let mut bad = register();
        bad["hostname"] = Value::Null;
        assert!(check_register(&bad).is_err());
        let mut bad = register();
        bad.as_object_mut().unwrap().remove("messageId");
        assert!(check_register(&bad).is_err());
    }

    #[test]
    fn union_rejects_unknown_types_and_bad_enums() {
        for msg in [
            json!({"type":"ack","messageId":"m"}),
            json!({"type":"error","code":"X","message":"m"}),
            json!({"type":"job.reject","messageId":"m","runId":"r","jobId":"j","reason":"tired","timestamp":1}),
            json!({"type":"step.status","messageId":"m","runId":"r","jobId":"j","stepIndex":-1,"stepName":"s","state":"running","timestamp":1}),
            json!({"type":"step.status","messageId":"m","runId":"r","jobId":"j","stepIndex":0,"stepName":"s","state":"done","timestamp":1}),
            json!({"type":"step.status","messageId":"m","runId":"r","jobId":"j","stepIndex":0,"stepName":"s","state":"running","timestamp":1,"step_type":"cache:restore"}),
            json!({"type":"job.status","messageId":"m","runId":"r","jobId":"j","state":"success","timestamp":"now"}),
            json!({"type":"job.heartbeat","runId":"r","timestamp":1}),
            json!(["not", "an", "object"]),
        ] {
            assert!(check_union_member(&msg).is_err(), "{msg}");
        }
        assert_eq!(
            check_union_member(
                &json!({"type":"job.heartbeat","runId":"r","jobId":"j","timestamp":1})
            ),
            Ok(())
        );
    }

    #[test]
    fn timeline_messages_are_held_to_their_spec_shape() {
        let start = json!({"type":"run.event","runId":"r","eventType":"agent.execution.start",
                           "timestampMs":1,"sourceService":"agent","jobId":"j","durationMs":null});
        assert_eq!(timeline_findings(&start), Vec::<String>::new());
        let mut no_job = start.clone();
        no_job.as_object_mut().unwrap().remove("jobId");
        assert_eq!(timeline_findings(&no_job).len(), 1);
        let end = json!({"type":"run.event","runId":"r","eventType":"agent.execution.end",
                         "timestampMs":1,"sourceService":"agent","jobId":"j","durationMs":null});
        assert_eq!(timeline_findings(&end).len(), 1, "end without a duration");
        let context = json!({"type":"job.context","runId":"r","jobId":"j","context":{
            "envVars":[{"name":"CI","value":"true","category":"system"}],
            "runtime":{"os":"linux"},"sandboxType":"bare-metal","labels":["x"],
            "workingDirectory":"/w","gitRef":"main"}});
        assert_eq!(timeline_findings(&context), Vec::<String>::new());
        let mut bad = context.clone();
        bad["context"]["envVars"][0]["category"] = json!("host");
        assert_eq!(timeline_findings(&bad).len(), 1);
    }

    #[test]
    fn quality_findings_flag_object_errors_and_odd_states() {
        let msg = json!({"type":"job.status","messageId":"m","runId":"r","jobId":"j","state":"failed",
                         "timestamp":1,"data":{"error":{"message":"boom"}}});
        assert_eq!(check_union_member(&msg), Ok(()));
        assert_eq!(quality_findings(&msg).len(), 1);
        let msg = json!({"type":"job.status","messageId":"m","runId":"r","jobId":"j","state":"queued","timestamp":1});
        assert_eq!(quality_findings(&msg).len(), 1);
        let msg = json!({"type":"auth.request","token":"t","protocolVersion":1});
        assert_eq!(quality_findings(&msg).len(), 1);
        let pair = crate::run_keys::RunKeyPair::generate();
        let envelope = json!({"agentPublicKey": pair.public_key_base64(),
                              "encrypted": "MzMzMzMzMzMzMzMzS/h69nx9a+wUMKB1A1Noy6FaANKoFa22cRuBbw=="});
        let msg = json!({"type":"job.status","messageId":"m","runId":"r","jobId":"j","state":"success",
                         "timestamp":1,"secretOutputs":{"TOKEN": envelope.clone()}});
        assert_eq!(quality_findings(&msg), Vec::<String>::new());
        let mut failed = msg.clone();
        failed["state"] = json!("failed");
        assert_eq!(quality_findings(&failed).len(), 1);
        let mut short = msg.clone();
        short["secretOutputs"]["TOKEN"]["encrypted"] = json!("AAAA");
        assert_eq!(quality_findings(&short).len(), 1);
        let mut ed25519 = msg.clone();
        ed25519["secretOutputs"]["TOKEN"]["agentPublicKey"] =
            json!("MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=");
        assert_eq!(quality_findings(&ed25519).len(), 1);
        let msg = json!({"type":"log.chunk","messageId":"m","runId":"r","jobId":"j","stepIndex":-1,"lines":[1],"timestamp":1});
        assert_eq!(check_union_member(&msg), Ok(()));
        assert_eq!(quality_findings(&msg).len(), 1);
    }
}
