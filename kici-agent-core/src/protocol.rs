//! Wire types of the orchestrator <-> agent WebSocket protocol (spec `protocol.md` §4).
//!
//! Every frame is one JSON object with a `type` tag. Outbound messages are built only from
//! [`Outbound`]; inbound frames are parsed by [`parse_inbound`], which never fails hard: an
//! unknown `type` or a frame that does not parse becomes [`Inbound::Unknown`] /
//! [`InboundError`] for the caller to log and ignore.
//!
//! Inbound structs keep fields this agent does not interpret in an `extra` map, so a dispatch
//! round-trips byte-for-byte-equivalent JSON (the fixture tests rely on that).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The protocol version this agent speaks (`auth.request.protocolVersion`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Unix epoch milliseconds, the unit of every `timestamp` field.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh `messageId`.
pub fn new_message_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

// ---------------------------------------------------------------------------------------------
// Orchestrator -> agent
// ---------------------------------------------------------------------------------------------

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

/// The identifiers of a job, echoed on every job-scoped message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    pub run_id: String,
    pub job_id: String,
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

/// `job.dispatch` (spec §4.1). Secrets live in `token`, `source_auth`, `workflow_auth`,
/// `secrets`, `namespaced_secrets` and some `extra` fields; `Debug` shows only the ids.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobDispatch {
    pub message_id: String,
    pub run_id: String,
    pub job_id: String,
    pub repo_url: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub sha: String,
    pub lock_file_url: String,
    pub job_config: JobConfig,
    pub timestamp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_auth: Option<GitAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_auth: Option<GitAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaced_secrets: Option<NamespacedSecrets>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "number_or_numeric_string"
    )]
    pub max_log_size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Base64 DER SPKI X25519 key that `secretOutputs` are sealed for (see `secret_outputs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_public_key: Option<String>,
    /// Fields this agent does not interpret, kept for round-trips and executors.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `namespacedSecrets`: the secret contexts (name -> key -> value) in the order the dispatch
/// lists them. The order matters: `ctx.secrets` flattens them over the flat `secrets`, a later
/// context winning a key both have, so a sorted map would pick the wrong value.
#[derive(Clone, Default, PartialEq)]
pub struct NamespacedSecrets(pub Vec<(String, BTreeMap<String, String>)>);

impl fmt::Debug for NamespacedSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Context names only: the values are secrets.
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl NamespacedSecrets {
    /// The flat view `ctx.secrets` gives a TypeScript step: `flat`, then each context's keys
    /// over it in dispatch order.
    pub fn flatten_over(&self, flat: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut merged = flat.clone();
        for (_, context) in &self.0 {
            merged.extend(context.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        merged
    }
}

impl Serialize for NamespacedSecrets {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, context) in &self.0 {
            map.serialize_entry(name, context)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for NamespacedSecrets {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> serde::de::Visitor<'de> for InOrder {
            type Value = NamespacedSecrets;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of secret contexts")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut contexts = Vec::new();
                while let Some(entry) = map.next_entry::<String, BTreeMap<String, String>>()? {
                    contexts.push(entry);
                }
                Ok(NamespacedSecrets(contexts))
            }
        }
        deserializer.deserialize_map(InOrder)
    }
}

impl fmt::Debug for JobDispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobDispatch")
            .field("run_id", &self.run_id)
            .field("job_id", &self.job_id)
            .field("job", &self.job_config.name)
            .finish_non_exhaustive()
    }
}

impl JobDispatch {
    /// The ids echoed on every job-scoped message.
    pub fn job_ref(&self) -> JobRef {
        JobRef {
            run_id: self.run_id.clone(),
            job_id: self.job_id.clone(),
        }
    }

    /// Every secret value the dispatch carries, for the log masker.
    pub fn secret_values(&self) -> Vec<&str> {
        let mut values: Vec<&str> = Vec::new();
        values.extend(self.token.as_deref());
        for auth in [&self.source_auth, &self.workflow_auth]
            .into_iter()
            .flatten()
        {
            values.push(&auth.secret);
        }
        if let Some(secrets) = &self.secrets {
            values.extend(secrets.values().map(String::as_str));
        }
        if let Some(namespaced) = &self.namespaced_secrets {
            for (_, context) in &namespaced.0 {
                values.extend(context.values().map(String::as_str));
            }
        }
        if let Some(Value::Object(install)) = self.extra.get("installEnvSecrets") {
            values.extend(install.values().filter_map(Value::as_str));
        }
        if let Some(Value::Array(registries)) = self.extra.get("npmRegistries") {
            values.extend(
                registries
                    .iter()
                    .filter_map(|r| r.get("token").and_then(Value::as_str)),
            );
        }
        values
    }
}

fn number_or_numeric_string<'de, D>(deserializer: D) -> Result<Option<u64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    // The orchestrator's schema coerces string -> number for maxLogSizeBytes.
    match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("maxLogSizeBytes must be non-negative")),
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("maxLogSizeBytes is not a number")),
        Some(other) => Err(serde::de::Error::custom(format!(
            "maxLogSizeBytes has the wrong type: {other}"
        ))),
    }
}

/// Clone credentials (`sourceAuth` / `workflowAuth`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GitAuth {
    pub kind: GitAuthKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_key_policy: Option<SshHostKeyPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_known_hosts_pem: Option<String>,
}

impl fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitAuth")
            .field("kind", &self.kind)
            .field("user", &self.user)
            .field("secret", &"***")
            .finish_non_exhaustive()
    }
}

/// `GitAuth.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GitAuthKind {
    Basic,
    Ssh,
}

/// `GitAuth.sshHostKeyPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SshHostKeyPolicy {
    AcceptNew,
    Pinned,
}

/// `jobConfig`: the envelope the orchestrator builds around a lock job (spec §8).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepEntry>,
    /// Job wall-clock limit in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// `false` skips the checkout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_vars: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl JobConfig {
    /// The internal TypeScript job kind this dispatch asks for, if any (spec §8.3).
    pub fn internal_kind(&self) -> Option<&'static str> {
        [
            ("buildOnly", "build"),
            ("initOnly", "init"),
            ("dynamicJobFn", "dynamic job function"),
            ("bringupOnly", "bring-up"),
        ]
        .into_iter()
        .find(|(flag, _)| self.extra.get(*flag).and_then(Value::as_bool) == Some(true))
        .map(|(_, kind)| kind)
    }
}

/// `jobConfig.container`: an image name or an object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ContainerSpec {
    Image(String),
    Detailed {
        image: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        env: Option<BTreeMap<String, String>>,
        #[serde(flatten)]
        extra: Map<String, Value>,
    },
}

/// One entry of `jobConfig.steps`: a step or a parallel group of steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StepEntry {
    Parallel(ParallelGroup),
    Step(StepSpec),
}

/// `LockStep` (spec §8.2), plus our `run` extension (a shell command).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_outputs: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_on_error: Option<bool>,
    /// Step timeout in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Extension: the shell command of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Extension: variables for this step only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `LockParallelStep`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParallelGroup {
    pub kind: ParallelKind,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_fast: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    pub children: Vec<StepSpec>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The `kind: "parallel"` tag of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParallelKind {
    Parallel,
}

/// A step's retry policy: a bare attempt count or the full object (spec agent.md §11.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Retry {
    Attempts(u32),
    Policy(RetryPolicy),
}

/// `retry {maxAttempts, delayMs, backoff, maxDelayMs}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay_ms: Option<u64>,
}

/// Retry backoff kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    Fixed,
    Exponential,
}

impl Retry {
    /// Total attempts (at least 1).
    pub fn max_attempts(&self) -> u32 {
        match self {
            Retry::Attempts(n) => (*n).max(1),
            Retry::Policy(p) => p.max_attempts.max(1),
        }
    }

    /// Delay in ms after failed attempt `attempt` (1-based): fixed = `delayMs`, exponential =
    /// `min(delayMs * 2^(n-1), maxDelayMs)`; defaults 1000 ms, exponential, 30000 ms.
    pub fn delay_after(&self, attempt: u32) -> u64 {
        let (delay, backoff, max) = match self {
            Retry::Attempts(_) => (1000, Backoff::Exponential, 30_000),
            Retry::Policy(p) => (
                p.delay_ms.unwrap_or(1000),
                p.backoff.unwrap_or(Backoff::Exponential),
                p.max_delay_ms.unwrap_or(30_000),
            ),
        };
        match backoff {
            Backoff::Fixed => delay,
            Backoff::Exponential => delay
                .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
                .min(max),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agent -> orchestrator
// ---------------------------------------------------------------------------------------------

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

/// `log.chunk`: `stepIndex` -1 carries job-level lines.
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

/// The exact number of bytes `s` takes as a JSON string literal in serde_json's output,
/// quotes included. Used to pack log chunks under a byte budget without serialising twice.
pub fn json_string_len(s: &str) -> usize {
    let escapes: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0x00..=0x1f => 5,
            _ => 0,
        })
        .sum();
    s.len() + escapes + 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/real-orchestrator"
    );

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}/{name}"))
            .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
    }

    #[test]
    fn every_fixture_dispatch_round_trips_exactly() {
        for name in [
            "job.dispatch.json",
            "job.dispatch.pair-second.json",
            "job.dispatch.build.json",
            "job.dispatch.cached.json",
        ] {
            let text = fixture(name);
            let original: Value = serde_json::from_str(&text).unwrap();
            let Inbound::JobDispatch(dispatch) = parse_inbound(&text).unwrap() else {
                panic!("{name} did not parse as a dispatch");
            };
            let back = serde_json::to_value(&*dispatch).unwrap();
            assert_eq!(back, original, "{name} changed in a round trip");
        }
    }

    #[test]
    fn build_dispatch_is_recognised_as_internal_kind() {
        let Inbound::JobDispatch(d) = parse_inbound(&fixture("job.dispatch.build.json")).unwrap()
        else {
            panic!("not a dispatch")
        };
        assert_eq!(d.job_config.internal_kind(), Some("build"));
        let Inbound::JobDispatch(d) = parse_inbound(&fixture("job.dispatch.json")).unwrap() else {
            panic!("not a dispatch")
        };
        assert_eq!(d.job_config.internal_kind(), None);
        assert!(matches!(&d.job_config.steps[0], StepEntry::Step(s) if s.name == "say-hello"));
    }

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

    #[test]
    fn max_log_size_is_coerced_from_a_string() {
        let mut d: Value = serde_json::from_str(&fixture("job.dispatch.json")).unwrap();
        d["maxLogSizeBytes"] = json!("2048");
        let Inbound::JobDispatch(d) = parse_inbound(&d.to_string()).unwrap() else {
            panic!()
        };
        assert_eq!(d.max_log_size_bytes, Some(2048));
    }

    #[test]
    fn dispatch_debug_hides_secrets() {
        let mut d: Value = serde_json::from_str(&fixture("job.dispatch.json")).unwrap();
        d["token"] = json!("ghs_supersecret");
        d["sourceAuth"] =
            json!({"kind":"basic","user":"x-access-token","secret":"ghs_supersecret"});
        d["secrets"] = json!({"API_KEY":"hunter2hunter2"});
        let Inbound::JobDispatch(d) = parse_inbound(&d.to_string()).unwrap() else {
            panic!()
        };
        let debug = format!("{d:?} {:?}", d.source_auth);
        assert!(!debug.contains("ghs_supersecret") && !debug.contains("hunter2"));
        let secrets = d.secret_values();
        assert!(secrets.contains(&"ghs_supersecret") && secrets.contains(&"hunter2hunter2"));
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

    #[test]
    fn json_string_len_matches_serde_json() {
        for s in [
            "plain",
            "quo\"te",
            "back\\slash",
            "ctl\u{1}\u{1f}",
            "tab\t\r\n",
            "ünï©ødé 😀",
            "",
        ] {
            assert_eq!(
                json_string_len(s),
                serde_json::to_string(s).unwrap().len(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn retry_delays_follow_the_policy() {
        let exp = Retry::Policy(RetryPolicy {
            max_attempts: 4,
            delay_ms: Some(100),
            backoff: None,
            max_delay_ms: Some(250),
        });
        assert_eq!(
            (exp.delay_after(1), exp.delay_after(2), exp.delay_after(3)),
            (100, 200, 250)
        );
        assert_eq!(Retry::Attempts(3).max_attempts(), 3);
        assert_eq!(Retry::Attempts(0).max_attempts(), 1);
    }
}
