//! The run timeline of one job: `job.context` and the `run.event`s of protocol.md §4.4, sent at
//! the points of §5.2 (`job.context` then `agent.execution.start` before the first step,
//! `agent.clone.start`/`end` around the checkout, `agent.execution.end` before the terminal
//! `job.status`, `agent.teardown` after it).
//!
//! Everything up to `agent.execution.end` goes through the job's ordered lane of the outbox, so
//! the orchestrator sees it in that order among the job's statuses; `agent.teardown` comes after
//! the terminal status and takes the lowest-priority telemetry lane, which only sends once every
//! status and log line that could go has gone.
//!
//! `job.context` lists the step environment's variable *names* with their category; values of
//! secrets and of secret-looking names (`TOKEN`, `SECRET`, `PASSWORD`, `KEY`) are `***`, and any
//! other value passes the job's secret masker (agent spec §18 item 8: the Node agent leaks them).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::logs::SecretMasker;
use crate::outbox::{JobAttempt, Outbox};
use crate::process::StepEnv;
use crate::protocol::{
    now_ms, ContextEnvVar, ContextRuntime, EnvCategory, JobConfig, JobContextDetails,
    JobContextReport, JobRef, JobState, Outbound, RunEvent,
};

/// What is shown instead of a secret value.
pub const REDACTED: &str = "***";

/// Name fragments that make a variable's value secret-looking.
const SECRET_LIKE: [&str; 4] = ["TOKEN", "SECRET", "PASSWORD", "KEY"];

/// The timeline of one job.
pub(crate) struct Timeline {
    outbox: Arc<Outbox>,
    job: JobRef,
    /// The dispatch attempt whose lane the events share.
    attempt: JobAttempt,
    /// When `agent.execution.start` went out; `None` before (nothing to end then).
    execution_started: Mutex<Option<Instant>>,
}

impl Timeline {
    pub(crate) fn new(outbox: Arc<Outbox>, attempt: JobAttempt) -> Self {
        Timeline {
            outbox,
            job: attempt.job.clone(),
            attempt,
            execution_started: Mutex::new(None),
        }
    }

    fn event(
        &self,
        event_type: &str,
        metadata: Option<Map<String, Value>>,
        duration_ms: Option<u64>,
    ) -> Outbound {
        Outbound::RunEvent(RunEvent {
            run_id: self.job.run_id.clone(),
            event_type: event_type.to_owned(),
            timestamp_ms: now_ms(),
            source_service: "agent".to_owned(),
            job_id: Some(self.job.job_id.clone()),
            metadata,
            duration_ms,
        })
    }

    /// Queues in the job's lane, ordered with its statuses and lines.
    fn push_ordered(&self, message: Outbound) {
        self.outbox.push_status(&self.attempt, message, false);
    }

    /// `job.context`, then `agent.execution.start`.
    pub(crate) fn execution_start(&self, context: JobContextDetails) {
        self.push_ordered(Outbound::JobContext(JobContextReport {
            run_id: self.job.run_id.clone(),
            job_id: self.job.job_id.clone(),
            context,
        }));
        self.push_ordered(self.event("agent.execution.start", None, None));
        *self.lock() = Some(Instant::now());
    }

    /// `agent.execution.end` with the duration and `metadata.status`, if execution started.
    pub(crate) fn execution_end(&self, state: JobState) {
        let Some(started) = self.lock().take() else {
            return;
        };
        let mut metadata = Map::new();
        metadata.insert("status".into(), Value::from(state.as_str()));
        let duration = started.elapsed().as_millis() as u64;
        self.push_ordered(self.event("agent.execution.end", Some(metadata), Some(duration)));
    }

    /// `agent.clone.start`; returns the clock for [`Timeline::clone_end`].
    pub(crate) fn clone_start(&self) -> Instant {
        self.push_ordered(self.event("agent.clone.start", None, None));
        Instant::now()
    }

    /// `agent.clone.end` with the duration and `metadata.success`.
    pub(crate) fn clone_end(&self, started: Instant, success: bool) {
        let mut metadata = Map::new();
        metadata.insert("success".into(), Value::Bool(success));
        let duration = started.elapsed().as_millis() as u64;
        self.push_ordered(self.event("agent.clone.end", Some(metadata), Some(duration)));
    }

    /// `agent.teardown`, after the terminal status.
    pub(crate) fn teardown(&self) {
        self.outbox
            .push_telemetry(self.event("agent.teardown", None, None));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.execution_started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// What a job's `job.context` says, built from the step environment it runs with.
pub(crate) struct ContextFacts<'a> {
    pub env: &'a StepEnv,
    pub config: &'a JobConfig,
    /// Names of the dispatch's secrets.
    pub secret_names: Vec<String>,
    /// The agent's host environment (to tell inherited variables from the agent's own).
    pub host_env: &'a [(String, String)],
    pub masker: &'a SecretMasker,
    pub sandbox_type: &'a str,
    pub labels: &'a [String],
    pub working_directory: String,
    pub git_ref: &'a str,
}

/// Variables the agent itself puts in every step's environment (`CI`, `KICI_*`).
fn set_by_the_agent(name: &str) -> bool {
    name == "CI" || name.starts_with("KICI_")
}

impl ContextFacts<'_> {
    pub(crate) fn details(&self) -> JobContextDetails {
        let user: BTreeSet<&str> = [
            &self.config.env,
            &self.config.environment_vars,
            &self.config.job_env,
        ]
        .into_iter()
        .flatten()
        .flat_map(|layer| layer.keys().map(String::as_str))
        .collect();
        let mut env_vars: Vec<ContextEnvVar> = self
            .env
            .iter()
            .map(|(name, value)| {
                let category = if user.contains(name) {
                    EnvCategory::User
                } else if set_by_the_agent(name) {
                    // Before the host check: the agent's `CI=true` is its own even on a host
                    // (a CI machine) that has the same value.
                    EnvCategory::System
                } else if self
                    .host_env
                    .iter()
                    .any(|(host, host_value)| host == name && host_value == value)
                {
                    EnvCategory::Inherited
                } else {
                    EnvCategory::System
                };
                let value = if looks_secret(name) {
                    REDACTED.to_owned()
                } else {
                    self.masker.mask(value).into_owned()
                };
                ContextEnvVar {
                    name: name.to_owned(),
                    value,
                    category,
                }
            })
            .collect();
        env_vars.extend(self.secret_names.iter().map(|name| ContextEnvVar {
            name: name.clone(),
            value: REDACTED.to_owned(),
            category: EnvCategory::Secret,
        }));
        JobContextDetails {
            env_vars,
            runtime: ContextRuntime {
                os: std::env::consts::OS.to_owned(),
                arch: std::env::consts::ARCH.to_owned(),
                agent_version: crate::agent::VERSION.to_owned(),
            },
            sandbox_type: self.sandbox_type.to_owned(),
            labels: self.labels.to_vec(),
            working_directory: self.working_directory.clone(),
            git_ref: self.git_ref.to_owned(),
        }
    }
}

fn looks_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_LIKE.iter().any(|fragment| upper.contains(fragment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_lists_names_by_category_and_never_a_secret_value() {
        let config: JobConfig = serde_json::from_value(serde_json::json!({
            "name": "build",
            "steps": [],
            "env": {"MODE": "release", "API_TOKEN": "t0ken-value", "ECHO": "uses s3cr3t-value"}
        }))
        .unwrap();
        let host = vec![("PATH".to_owned(), "/usr/bin".to_owned())];
        let mut env = StepEnv::from_host(host.clone());
        env.set("KICI_RUN_ID", "r1");
        env.extend(config.env.clone().unwrap_or_default());
        let mut masker = SecretMasker::new();
        masker.add_all(["s3cr3t-value"]).unwrap();
        let labels = vec!["linux".to_owned()];
        let facts = ContextFacts {
            env: &env,
            config: &config,
            secret_names: vec!["DEPLOY_KEY".into()],
            host_env: &host,
            masker: &masker,
            sandbox_type: "bare-metal",
            labels: &labels,
            working_directory: "/tmp/kici-abc".into(),
            git_ref: "refs/heads/main",
        };
        let details = facts.details();
        let find = |name: &str| {
            details
                .env_vars
                .iter()
                .find(|v| v.name == name)
                .unwrap_or_else(|| panic!("{name} missing: {:?}", details.env_vars))
                .clone()
        };
        assert_eq!(find("PATH").category, EnvCategory::Inherited);
        assert_eq!(find("CI").category, EnvCategory::System);
        assert_eq!(find("KICI_RUN_ID").category, EnvCategory::System);
        assert_eq!(find("MODE").category, EnvCategory::User);
        assert_eq!(find("MODE").value, "release");
        assert_eq!(find("API_TOKEN").value, REDACTED);
        let deploy = find("DEPLOY_KEY");
        assert_eq!(
            (deploy.category, deploy.value.as_str()),
            (EnvCategory::Secret, REDACTED)
        );
        let text = serde_json::to_string(&details).unwrap();
        assert!(
            !text.contains("t0ken-value") && !text.contains("s3cr3t-value"),
            "{text}"
        );
        assert_eq!(details.working_directory, "/tmp/kici-abc");
        assert_eq!(details.sandbox_type, "bare-metal");
    }
}
