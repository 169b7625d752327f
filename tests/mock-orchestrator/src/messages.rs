//! Orchestrator→agent messages, shaped like the real orchestrator's (protocol.md §2.3, §3.3, §4.1
//! and fixtures/real-orchestrator/).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// The `runPublicKey` of fixtures/real-orchestrator/job.dispatch.json (a valid X25519 SPKI key).
const FIXTURE_RUN_PUBLIC_KEY: &str = "MCowBQYDK2VuAyEARa2aY9Tb+zXaoT7ReEfCUDr739N8qZeC3ygBFTVHEnw=";

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

pub(crate) fn auth_success() -> Value {
    json!({"type": "auth.success", "connectionId": new_id()})
}

pub(crate) fn auth_failure(reason: &str) -> Value {
    json!({"type": "auth.failure", "reason": reason})
}

/// `register.ack`, echoing the wire agentId and labels.
pub(crate) fn register_ack(register: &Value, pending_dispatch: bool) -> Value {
    let mut ack = json!({
        "type": "register.ack",
        "agentId": register["agentId"],
        "labels": register["labels"],
        "scalerManaged": false,
    });
    if pending_dispatch {
        ack["pendingDispatch"] = json!(true);
    }
    ack
}

pub(crate) fn invalid_message_error() -> Value {
    json!({"type": "error", "code": "INVALID_MESSAGE", "message": "Invalid message format"})
}

pub(crate) fn rate_limit_warning(retry_after_ms: u64) -> Value {
    json!({"type": "rate.limit.warning", "retryAfterMs": retry_after_ms})
}

/// `job.cancel`; like the real one, `force` is present only when true.
pub(crate) fn job_cancel(run_id: &str, job_id: &str, reason: &str, force: bool) -> Value {
    let mut cancel = json!({
        "type": "job.cancel",
        "messageId": new_id(),
        "runId": run_id,
        "jobId": job_id,
        "reason": reason,
    });
    if force {
        cancel["force"] = Value::Bool(true);
    }
    cancel
}

/// The answer a mock without caches, concurrency groups or APIs gives to a feature request, if
/// that request gets one (§4.2: responses correlate by the request's `messageId`).
pub(crate) fn feature_response(request: &Value) -> Option<Value> {
    let message_id = request.get("messageId").cloned().unwrap_or(Value::Null);
    let request_id = request.get("requestId").cloned().unwrap_or(Value::Null);
    let response = match request.get("type").and_then(Value::as_str)? {
        "job.concurrency.report" => json!({
            "type": "job.concurrency.ack", "requestId": message_id, "action": "proceed",
        }),
        "cache.upload.request" => json!({
            "type": "cache.upload.response", "requestId": message_id, "uploadUrl": "",
        }),
        "cache.user.restore.request" => json!({
            "type": "cache.user.restore.response", "requestId": message_id, "hit": false,
        }),
        "cache.user.save.request" => json!({
            "type": "cache.user.save.response", "requestId": message_id, "skip": true,
        }),
        "provenance.upload.request" => json!({
            "type": "provenance.upload.response", "requestId": message_id, "uploadUrl": "",
        }),
        "event.emit" => json!({
            "type": "event.emit.response", "requestId": request_id,
            "error": "event.emit is not supported by the mock orchestrator",
        }),
        "agent.api.request" => json!({
            "type": "agent.api.response", "requestId": request_id,
            "error": "agent.api is not supported by the mock orchestrator",
        }),
        _ => return None,
    };
    Some(response)
}

/// A realistic `job.dispatch`, shaped like fixtures/real-orchestrator/job.dispatch.json: one
/// workflow `ci`, job `test`, with the given lock `steps` (e.g. `[{"name":"unit","hasOutputs":false}]`).
pub fn sample_dispatch(
    run_id: &str,
    job_id: &str,
    repo_url: &str,
    git_ref: &str,
    sha: &str,
    steps: Value,
) -> Value {
    json!({
        "type": "job.dispatch",
        "messageId": new_id(),
        "runId": run_id,
        "jobId": job_id,
        "repoUrl": repo_url,
        "ref": git_ref,
        "sha": sha,
        "lockFileUrl": "",
        "jobConfig": {
            "source": {"file": ".kici/workflows/ci.ts", "export": "#default"},
            "workflowName": "ci",
            "name": "test",
            "baseJobName": "test",
            "runsOnPick": "deterministic",
            "steps": steps,
            "needs": [],
            "cacheOrgId": "org_mock",
            "cacheRepoId": "mock/repo",
            "cacheRefScope": "shared",
            "event": {
                "type": "push",
                "targetBranch": git_ref,
                "payload": {
                    "ref": format!("refs/heads/{git_ref}"),
                    "after": sha,
                    "repository": {"full_name": "mock/repo", "default_branch": git_ref},
                },
                "provider": "local",
            },
            "provider": "local",
        },
        "timestamp": now_ms(),
        "orgId": "org_mock",
        "repoId": "mock/repo",
        "cacheRefScope": "shared",
        "requestId": new_id(),
        "runPublicKey": FIXTURE_RUN_PUBLIC_KEY,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_dispatch_carries_every_required_field() {
        let dispatch = sample_dispatch("r", "j", "file:///repo", "main", "abc", json!([]));
        for field in [
            "messageId",
            "runId",
            "jobId",
            "repoUrl",
            "ref",
            "sha",
            "lockFileUrl",
        ] {
            assert!(dispatch[field].is_string(), "{field}");
        }
        assert!(dispatch["jobConfig"].is_object());
        assert!(dispatch["timestamp"].is_u64());
        assert_eq!(dispatch["jobConfig"]["steps"], json!([]));
    }

    #[test]
    fn cancel_omits_force_unless_set() {
        assert!(job_cancel("r", "j", "x", false).get("force").is_none());
        assert_eq!(job_cancel("r", "j", "x", true)["force"], json!(true));
    }
}
