//! `job.dispatch` and what it carries: the job config and its steps, retry policies, clone
//! credentials, namespaced secrets.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::JobRef;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tests::fixture;
    use crate::protocol::{parse_inbound, Inbound};
    use serde_json::json;

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
