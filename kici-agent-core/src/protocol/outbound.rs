//! Agent -> orchestrator messages: every frame this agent sends is an [`Outbound`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::JobRef;

/// Every message this agent sends. Serialises with `type` first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Outbound {
    #[serde(rename = "auth.request")]
    AuthRequest(AuthRequest),
    #[serde(rename = "agent.register")]
    AgentRegister(Box<AgentRegister>),
    #[serde(rename = "config.ack")]
    ConfigAck(ConfigAck),
    #[serde(rename = "heartbeat")]
    Heartbeat(Heartbeat),
    #[serde(rename = "agent.status")]
    AgentStatus(AgentStatus),
    #[serde(rename = "job.ack")]
    JobAck(JobAck),
    #[serde(rename = "job.reject")]
    JobReject(JobReject),
    #[serde(rename = "job.status")]
    JobStatus(JobStatus),
    #[serde(rename = "step.status")]
    StepStatus(StepStatus),
    #[serde(rename = "log.chunk")]
    LogChunk(LogChunk),
    #[serde(rename = "job.heartbeat")]
    JobHeartbeat(JobHeartbeat),
    #[serde(rename = "run.event")]
    RunEvent(RunEvent),
    #[serde(rename = "job.context")]
    JobContext(JobContextReport),
    #[serde(rename = "agent.metrics")]
    AgentMetrics(AgentMetrics),
    #[serde(rename = "agent.log")]
    AgentLog(AgentLog),
    #[serde(rename = "fleet.bundle.chunk")]
    FleetBundleChunk(FleetBundleChunk),
    #[serde(rename = "fleet.bundle.error")]
    FleetBundleError(FleetBundleError),
}

impl Outbound {
    /// The JSON text of one frame.
    pub fn to_frame(&self) -> String {
        // Serialising these plain structs cannot fail: no maps with non-string keys, no
        // fallible Serialize impls.
        serde_json::to_string(self)
            .unwrap_or_else(|e| unreachable!("outbound message failed to serialise: {e}"))
    }

    /// The wire `type` of this message.
    pub fn message_type(&self) -> &'static str {
        match self {
            Outbound::AuthRequest(_) => "auth.request",
            Outbound::AgentRegister(_) => "agent.register",
            Outbound::ConfigAck(_) => "config.ack",
            Outbound::Heartbeat(_) => "heartbeat",
            Outbound::AgentStatus(_) => "agent.status",
            Outbound::JobAck(_) => "job.ack",
            Outbound::JobReject(_) => "job.reject",
            Outbound::JobStatus(_) => "job.status",
            Outbound::StepStatus(_) => "step.status",
            Outbound::LogChunk(_) => "log.chunk",
            Outbound::JobHeartbeat(_) => "job.heartbeat",
            Outbound::RunEvent(_) => "run.event",
            Outbound::JobContext(_) => "job.context",
            Outbound::AgentMetrics(_) => "agent.metrics",
            Outbound::AgentLog(_) => "agent.log",
            Outbound::FleetBundleChunk(_) => "fleet.bundle.chunk",
            Outbound::FleetBundleError(_) => "fleet.bundle.error",
        }
    }
}

/// `auth.request`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthRequest {
    pub token: String,
    pub protocol_version: u32,
}

impl fmt::Debug for AuthRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRequest")
            .field("token", &"kat_***")
            .field("protocol_version", &self.protocol_version)
            .finish()
    }
}

/// `agent.register` (spec §3.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRegister {
    pub message_id: String,
    pub agent_id: String,
    pub labels: Vec<String>,
    pub platform: String,
    pub arch: String,
    pub version: String,
    pub max_concurrency: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_flight_jobs: Vec<JobRef>,
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_as_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_as_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub properties: Map<String, Value>,
}

/// `config.ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigAck {
    pub message_id: String,
    pub agent_id: String,
}

/// `heartbeat`: the connection heartbeat, exempt from rate limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub timestamp: u64,
}

/// `agent.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub message_id: String,
    pub agent_id: String,
    pub active_jobs: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_available_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_seconds: Option<u64>,
}

/// `job.ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobAck {
    pub message_id: String,
    pub run_id: String,
    pub job_id: String,
    pub timestamp: u64,
}

/// `job.reject`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobReject {
    pub message_id: String,
    pub run_id: String,
    pub job_id: String,
    pub reason: RejectReason,
    pub timestamp: u64,
}

/// `JobRejectReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectReason {
    Busy,
    Draining,
}

/// `JobState` (the agent sends only running, cancelling, success, failed, cancelled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Queued,
    Running,
    Recovering,
    Cancelling,
    Success,
    Failed,
    Cancelled,
    Skipped,
    TimedOutStale,
    DriftDropped,
}

impl JobState {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Recovering => "recovering",
            JobState::Cancelling => "cancelling",
            JobState::Success => "success",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Skipped => "skipped",
            JobState::TimedOutStale => "timed_out_stale",
            JobState::DriftDropped => "drift_dropped",
        }
    }

    /// Whether this state ends the job.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Success
                | JobState::Failed
                | JobState::Cancelled
                | JobState::Skipped
                | JobState::TimedOutStale
                | JobState::DriftDropped
        )
    }
}

/// `StepState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Running,
    Success,
    Failed,
    Skipped,
    Pending,
    Cancelled,
}

impl StepState {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Running => "running",
            StepState::Success => "success",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::Pending => "pending",
            StepState::Cancelled => "cancelled",
        }
    }

    /// Whether this state ends the step.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepState::Success | StepState::Failed | StepState::Skipped | StepState::Cancelled
        )
    }
}

/// `step_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepType {
    #[serde(rename = "step")]
    Step,
    #[serde(rename = "hook:onCancel")]
    HookOnCancel,
    #[serde(rename = "hook:cleanup")]
    HookCleanup,
    #[serde(rename = "hook:onSuccess")]
    HookOnSuccess,
    #[serde(rename = "hook:onFailure")]
    HookOnFailure,
    #[serde(rename = "hook:beforeStep")]
    HookBeforeStep,
    #[serde(rename = "hook:afterStep")]
    HookAfterStep,
    /// A job `init` command (`init:<n>`). Not a value of the top-level `step_type` (§4.3): it
    /// travels only as `data.stepType`, the field the orchestrator stores.
    #[serde(rename = "init")]
    Init,
}

/// `concurrencyKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConcurrencyKind {
    Sequential,
    ParallelChild,
    ParallelGroup,
}

/// `job.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    pub message_id: String,
    pub run_id: String,
    pub job_id: String,
    pub state: JobState,
    pub timestamp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<JobStatusData>,
    /// Sealed secret outputs by key; the orchestrator reads them only from a `success`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_outputs: Option<BTreeMap<String, SecretOutput>>,
}

/// One sealed value of `job.status.secretOutputs` (see `secret_outputs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretOutput {
    /// Base64 DER SPKI of the job's ephemeral X25519 public key.
    pub agent_public_key: String,
    /// Base64 of IV (12 bytes) ‖ GCM tag (16 bytes) ‖ ciphertext.
    pub encrypted: String,
}

/// `job.status.data`, as the orchestrator reads it (spec §5.5).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatusData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_results: Option<Vec<StepResult>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<BTreeMap<String, BTreeMap<String, Value>>>,
}

/// One entry of `stepResults`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepResult {
    pub name: String,
    pub status: StepState,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `step.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    pub message_id: String,
    pub run_id: String,
    pub job_id: String,
    pub step_index: u32,
    pub step_name: String,
    pub state: StepState,
    pub timestamp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<StepStatusData>,
    #[serde(rename = "step_type", default, skip_serializing_if = "Option::is_none")]
    pub step_type: Option<StepType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_kind: Option<ConcurrencyKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes_streamed: Option<u64>,
}

/// `step.status.data` (spec §5.5): `error` is a string, `exitCode` a number.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepStatusData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_type: Option<StepType>,
}

/// `log.chunk.stepIndex` of job-level lines (the agent's own and a whole-job executor's),
/// which belong to no step.
pub const JOB_LOG_INDEX: i64 = -1;

/// `log.chunk`: `stepIndex` [`JOB_LOG_INDEX`] carries job-level lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogChunk {
    pub message_id: String,
    pub run_id: String,
    pub job_id: String,
    pub step_index: i64,
    pub lines: Vec<String>,
    pub timestamp: u64,
}

/// `job.heartbeat` (no messageId).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobHeartbeat {
    pub run_id: String,
    pub job_id: String,
    pub timestamp: u64,
}

/// `fleet.bundle.chunk`: one piece of a diagnostics bundle (a ZIP), in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetBundleChunk {
    pub request_id: String,
    pub seq: u64,
    pub is_last: bool,
    pub data_b64: String,
}

/// `fleet.bundle.error`: no bundle for this request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetBundleError {
    pub request_id: String,
    pub message: String,
}

/// `agent.log`: the agent's own log lines, one JSON record per line (protocol.md §4.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentLog {
    pub message_id: String,
    pub agent_id: String,
    pub lines: Vec<String>,
    pub timestamp: u64,
}

/// `agent.metrics`: a snapshot of the agent's metric registry (protocol.md §4.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentMetrics {
    pub message_id: String,
    pub agent_id: String,
    pub metrics: Vec<MetricSample>,
    pub timestamp: u64,
}

/// One series of an `agent.metrics` snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSample {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: MetricKind,
    /// Counters and gauges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Histograms: cumulative counts per finite upper bound (`+Inf` is `count`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<MetricBucket>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<f64>,
}

/// The `type` of a [`MetricSample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
    UpDownCounter,
}

/// One cumulative histogram bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricBucket {
    pub le: f64,
    pub count: u64,
}

/// `run.event`: one entry of the run timeline (protocol.md §4.4; forwarded unvalidated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunEvent {
    pub run_id: String,
    /// `agent.execution.start`, `agent.execution.end`, `agent.clone.start`, ...
    pub event_type: String,
    pub timestamp_ms: u64,
    /// Always `agent`.
    pub source_service: String,
    /// Sent as `null` when the event is not about one job.
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    /// Sent as `null` for events without a duration.
    pub duration_ms: Option<u64>,
}

/// `job.context`: what a job runs with, for the run timeline (protocol.md §4.4). Never carries
/// a secret value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobContextReport {
    pub run_id: String,
    pub job_id: String,
    pub context: JobContextDetails,
}

/// The `context` of a `job.context`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobContextDetails {
    pub env_vars: Vec<ContextEnvVar>,
    pub runtime: ContextRuntime,
    pub sandbox_type: String,
    pub labels: Vec<String>,
    pub working_directory: String,
    pub git_ref: String,
}

/// One variable of a step's environment; `value` is `***` for secrets and secret-like names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextEnvVar {
    pub name: String,
    pub value: String,
    pub category: EnvCategory,
}

/// Where a step environment variable comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvCategory {
    /// Set by the agent (`CI`, `KICI_*`, ...).
    System,
    /// From the workflow's job configuration.
    User,
    /// Copied from the agent's host environment (allow-listed names only).
    Inherited,
    /// A dispatch secret: name only.
    Secret,
}

/// `context.runtime` of a `job.context`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContextRuntime {
    pub os: String,
    pub arch: String,
    /// This agent's version (the Node agent sends `nodeVersion` here instead).
    pub agent_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tests::fixture;
    use crate::protocol::PROTOCOL_VERSION;
    use serde_json::json;

    /// Every agent->orchestrator message the real orchestrator accepted parses into our
    /// outbound types and serialises back to the same JSON.
    #[test]
    fn accepted_agent_traffic_round_trips_through_outbound_types() {
        let mut seen = 0;
        for name in [
            "agent-to-orchestrator.hello.jsonl",
            "agent-to-orchestrator.fails.jsonl",
        ] {
            for line in fixture(name).lines().filter(|l| !l.trim().is_empty()) {
                let mut original: Value = serde_json::from_str(line).unwrap();
                // nodeVersion is the Node agent's own fact; a Rust agent omits it (spec §3.1).
                if let Some(register) = original.as_object_mut() {
                    register.remove("nodeVersion");
                }
                let parsed: Outbound = serde_json::from_value(original.clone())
                    .unwrap_or_else(|e| panic!("{name}: {line}: {e}"));
                let back = serde_json::to_value(&parsed).unwrap();
                assert_eq!(back, original, "{name}: {line} changed in a round trip");
                seen += 1;
            }
        }
        assert!(seen >= 14, "only {seen} fixture messages read");
    }

    /// The JSON we emit per message type carries exactly the spec's field names (§4.2).
    #[test]
    fn outbound_field_names_match_the_spec_tables() {
        fn keys(m: &Outbound) -> Vec<String> {
            let mut k: Vec<String> = serde_json::to_value(m)
                .unwrap()
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            k.sort();
            k
        }
        fn sorted(v: &[&str]) -> Vec<String> {
            let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            v.sort();
            v
        }
        let ids = || ("m".to_string(), "r".to_string(), "j".to_string());
        let (m, r, j) = ids();
        let cases: Vec<(Outbound, Vec<&str>)> = vec![
            (
                Outbound::AuthRequest(AuthRequest {
                    token: "t".into(),
                    protocol_version: PROTOCOL_VERSION,
                }),
                vec!["type", "token", "protocolVersion"],
            ),
            (
                Outbound::ConfigAck(ConfigAck {
                    message_id: m.clone(),
                    agent_id: "a".into(),
                }),
                vec!["type", "messageId", "agentId"],
            ),
            (
                Outbound::Heartbeat(Heartbeat { timestamp: 1 }),
                vec!["type", "timestamp"],
            ),
            (
                Outbound::AgentStatus(AgentStatus {
                    message_id: m.clone(),
                    agent_id: "a".into(),
                    active_jobs: 0,
                    memory_used_mb: None,
                    memory_available_mb: None,
                    uptime_seconds: None,
                }),
                vec!["type", "messageId", "agentId", "activeJobs"],
            ),
            (
                Outbound::JobAck(JobAck {
                    message_id: m.clone(),
                    run_id: r.clone(),
                    job_id: j.clone(),
                    timestamp: 1,
                }),
                vec!["type", "messageId", "runId", "jobId", "timestamp"],
            ),
            (
                Outbound::JobReject(JobReject {
                    message_id: m.clone(),
                    run_id: r.clone(),
                    job_id: j.clone(),
                    reason: RejectReason::Busy,
                    timestamp: 1,
                }),
                vec!["type", "messageId", "runId", "jobId", "reason", "timestamp"],
            ),
            (
                Outbound::JobStatus(JobStatus {
                    message_id: m.clone(),
                    run_id: r.clone(),
                    job_id: j.clone(),
                    state: JobState::Running,
                    timestamp: 1,
                    data: None,
                    secret_outputs: None,
                }),
                vec!["type", "messageId", "runId", "jobId", "state", "timestamp"],
            ),
            (
                Outbound::StepStatus(StepStatus {
                    message_id: m.clone(),
                    run_id: r.clone(),
                    job_id: j.clone(),
                    step_index: 0,
                    step_name: "s".into(),
                    state: StepState::Failed,
                    timestamp: 1,
                    data: Some(StepStatusData {
                        duration_ms: Some(1),
                        error: Some("e".into()),
                        exit_code: Some(3),
                        step_type: None,
                    }),
                    step_type: Some(StepType::Step),
                    concurrency_kind: None,
                    group_id: None,
                    log_bytes_streamed: Some(0),
                }),
                vec![
                    "type",
                    "messageId",
                    "runId",
                    "jobId",
                    "stepIndex",
                    "stepName",
                    "state",
                    "timestamp",
                    "data",
                    "step_type",
                    "logBytesStreamed",
                ],
            ),
            (
                Outbound::LogChunk(LogChunk {
                    message_id: m.clone(),
                    run_id: r.clone(),
                    job_id: j.clone(),
                    step_index: -1,
                    lines: vec!["x".into()],
                    timestamp: 1,
                }),
                vec![
                    "type",
                    "messageId",
                    "runId",
                    "jobId",
                    "stepIndex",
                    "lines",
                    "timestamp",
                ],
            ),
            (
                Outbound::JobHeartbeat(JobHeartbeat {
                    run_id: r,
                    job_id: j,
                    timestamp: 1,
                }),
                vec!["type", "runId", "jobId", "timestamp"],
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(
                keys(&message),
                sorted(&expected),
                "{}",
                message.message_type()
            );
            let frame = message.to_frame();
            assert!(
                frame.starts_with(&format!("{{\"type\":\"{}\"", message.message_type())),
                "{frame}"
            );
        }
        let data = serde_json::to_value(StepStatusData {
            duration_ms: Some(5),
            error: Some("boom".into()),
            exit_code: Some(3),
            step_type: Some(StepType::HookCleanup),
        })
        .unwrap();
        assert_eq!(
            data,
            json!({"durationMs":5,"error":"boom","exitCode":3,"stepType":"hook:cleanup"})
        );
    }
}
