//! Local execution of a job file, or of a job of a TypeScript workflow, through the same engine,
//! with no orchestrator (`kici-agent exec JOB_FILE`, `kici-agent exec WORKFLOW.ts --job NAME`).
//!
//! The job runs exactly as a dispatched one does; the messages it would send to the
//! orchestrator are handed to the caller instead, in order, so they can be shown live.
//!
//! The job file is JSON:
//!
//! ```json
//! {
//!   "name": "build",
//!   "env": { "GREETING": "hello" },
//!   "secrets": { "API_TOKEN": "masked in every log line" },
//!   "timeout": 600000,
//!   "steps": [
//!     { "name": "greet", "run": "echo \"$GREETING\"", "timeout": 10000 },
//!     { "name": "flaky", "run": "./flaky.sh", "retry": { "maxAttempts": 3, "delayMs": 100 } },
//!     { "kind": "parallel", "name": "checks", "failFast": true, "maxParallel": 2,
//!       "children": [ { "name": "lint", "run": "make lint" }, { "name": "unit", "run": "make test" } ] }
//!   ]
//! }
//! ```
//!
//! Step fields are those of a dispatch's steps (`timeout` in ms, `retry`, `continueOnError`,
//! `env`) plus `run`, the shell command. An optional `repo` `{url, ref, sha}` is checked out
//! into the workspace first.
//!
//! A TypeScript workflow (`.kici/workflows/*.ts`) runs through the TypeScript runner in the
//! working copy itself (the directory holding `.kici`), with its `.kici/node_modules`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::events::EventQueue;
use crate::executor::{Executor, ShellExecutor};
use crate::job::{self, JobControl, JobServices, JobSettings};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, OutboxLimits, Pacer};
use crate::protocol::{ContainerSpec, JobConfig, JobDispatch, JobState, Outbound, StepEntry};
use crate::routing::{Builtins, ExecutorRegistry};
use crate::typescript::TypeScriptExecutor;

/// What [`list_typescript_jobs`] finds: the jobs of one workflow of the file.
pub use crate::typescript::WorkflowJobs;

/// A job file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalJob {
    pub name: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Job timeout in ms.
    #[serde(default)]
    pub timeout: Option<u64>,
    pub steps: Vec<StepEntry>,
    #[serde(default)]
    pub container: Option<ContainerSpec>,
    #[serde(default)]
    pub repo: Option<LocalRepo>,
}

/// A repository to check out before the steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRepo {
    pub url: String,
    #[serde(default, rename = "ref")]
    pub git_ref: String,
    #[serde(default)]
    pub sha: String,
}

/// A job file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalJobError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid job file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: the job has no steps")]
    NoSteps { path: PathBuf },
}

impl LocalJob {
    /// Reads and checks a job file.
    pub fn load(path: &Path) -> Result<LocalJob, LocalJobError> {
        let text = std::fs::read_to_string(path).map_err(|source| LocalJobError::Read {
            path: path.to_owned(),
            source,
        })?;
        let job: LocalJob = serde_json::from_str(&text).map_err(|source| LocalJobError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if job.steps.is_empty() {
            return Err(LocalJobError::NoSteps {
                path: path.to_owned(),
            });
        }
        Ok(job)
    }

    /// The dispatch the orchestrator would have sent for this job.
    pub fn to_dispatch(&self) -> JobDispatch {
        let run_id = uuid::Uuid::new_v4().to_string();
        let job_id = uuid::Uuid::new_v4().to_string();
        let repo = self.repo.clone();
        JobDispatch {
            message_id: uuid::Uuid::new_v4().to_string(),
            run_id,
            job_id,
            repo_url: repo.as_ref().map(|r| r.url.clone()).unwrap_or_default(),
            git_ref: repo.as_ref().map(|r| r.git_ref.clone()).unwrap_or_default(),
            sha: repo.as_ref().map(|r| r.sha.clone()).unwrap_or_default(),
            lock_file_url: String::new(),
            job_config: JobConfig {
                name: self.name.clone(),
                steps: self.steps.clone(),
                timeout: self.timeout,
                checkout: Some(repo.is_some()),
                job_env: (!self.env.is_empty()).then(|| self.env.clone()),
                container: self.container.clone(),
                ..JobConfig::default()
            },
            timestamp: crate::protocol::now_ms(),
            token: None,
            source_auth: None,
            workflow_auth: None,
            secrets: (!self.secrets.is_empty()).then(|| self.secrets.clone()),
            namespaced_secrets: None,
            max_log_size_bytes: None,
            request_id: None,
            run_public_key: None,
            extra: Default::default(),
        }
    }
}

/// Settings of a local run.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub max_log_size_bytes: u64,
    pub default_step_timeout: Duration,
    pub cancel_grace: Duration,
}

impl Default for LocalSettings {
    fn default() -> Self {
        LocalSettings {
            max_log_size_bytes: 10 * 1024 * 1024,
            default_step_timeout: Duration::from_secs(30 * 60),
            cancel_grace: Duration::from_secs(10),
        }
    }
}

/// A handle to stop a local run (for Ctrl-C).
#[derive(Clone, Default)]
pub struct LocalCancel(JobControl);

impl LocalCancel {
    /// Asks the job to stop gracefully; a second call kills it.
    pub fn cancel(&self) {
        if self.0.cancel.is_cancelled() {
            self.0.force.cancel();
        }
        self.0.cancel.cancel();
    }
}

/// Runs a job through the engine; every message it produces goes to `on_message`, in order.
/// Returns the job's terminal state. Steps no executor of `executors` takes run with the shell
/// executor (their `run` commands), or in the job file's `container` (see [`ExecutorRegistry`]).
pub async fn run(
    job: &LocalJob,
    executors: Option<ExecutorRegistry>,
    settings: LocalSettings,
    cancel: LocalCancel,
    on_message: impl FnMut(&Outbound),
) -> JobState {
    // A job file with `container` runs in it, on the engine of DOCKER_HOST.
    let container = job.container.as_ref().and_then(|_| {
        crate::container::ContainerExecutor::new(crate::container::ContainerSettings::default())
            .map(Arc::new)
            .ok()
    });
    let shell: Arc<dyn Executor> =
        Arc::new(ShellExecutor::new(BTreeMap::new(), settings.cancel_grace));
    let builtins = Builtins {
        executor: Some(shell),
        // A job file's steps are commands: it is no TypeScript job.
        chosen_by_operator: true,
        container,
        default_image: None,
        typescript: None,
    };
    let executors = executors.unwrap_or_default().with_builtins(builtins);
    run_dispatch(job.to_dispatch(), executors, settings, cancel, on_message).await
}

/// A TypeScript workflow file inside a working copy: the directory holding `.kici` and the
/// file's path relative to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowFile {
    pub root: PathBuf,
    pub source_file: String,
}

impl WorkflowFile {
    /// Finds the working copy of `file` (`<root>/.kici/.../*.ts`).
    pub fn locate(file: &Path) -> Result<WorkflowFile, String> {
        let absolute =
            std::fs::canonicalize(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let kici = absolute
            .ancestors()
            .find(|dir| dir.file_name().is_some_and(|name| name == ".kici"))
            .ok_or_else(|| format!("{}: not inside a .kici directory", file.display()))?;
        let root = kici.parent().unwrap_or(kici).to_path_buf();
        let source_file = absolute
            .strip_prefix(&root)
            .map_err(|_| format!("{}: not inside {}", file.display(), root.display()))?
            .display()
            .to_string();
        Ok(WorkflowFile { root, source_file })
    }
}

/// The workflows and jobs of a TypeScript workflow file, as the runner loads them with Node
/// at `node` (else `node` on PATH).
pub async fn list_typescript_jobs(
    file: &WorkflowFile,
    node: Option<PathBuf>,
) -> Result<Vec<WorkflowJobs>, String> {
    let settings = LocalSettings::default();
    TypeScriptExecutor::new(node, settings.cancel_grace, settings.default_step_timeout)
        .list_jobs(&file.root, &file.source_file)
        .await
}

/// Runs job `job` of a TypeScript workflow file in its working copy, like [`run`] does a job
/// file. `Err` when the file has no such job (or several workflows have one by that name).
pub async fn run_typescript(
    file: &WorkflowFile,
    job: &str,
    node: Option<PathBuf>,
    settings: LocalSettings,
    cancel: LocalCancel,
    on_message: impl FnMut(&Outbound),
) -> Result<JobState, String> {
    let typescript =
        TypeScriptExecutor::new(node, settings.cancel_grace, settings.default_step_timeout)
            .in_place(file.root.clone());
    let workflows = typescript.list_jobs(&file.root, &file.source_file).await?;
    let owners: Vec<&WorkflowJobs> = workflows
        .iter()
        .filter(|w| w.jobs.iter().any(|j| j == job))
        .collect();
    let workflow = match owners.as_slice() {
        [one] => one.name.clone(),
        [] => return Err(format!("{}: no job named '{job}'", file.source_file)),
        _ => {
            return Err(format!(
                "{}: several workflows have a job named '{job}'",
                file.source_file
            ))
        }
    };
    let local = LocalJob {
        name: job.to_owned(),
        env: BTreeMap::new(),
        secrets: BTreeMap::new(),
        timeout: None,
        steps: Vec::new(),
        container: None,
        repo: None,
    };
    let mut dispatch = local.to_dispatch();
    dispatch.job_config.workflow_name = Some(workflow);
    dispatch.job_config.base_job_name = Some(job.to_owned());
    dispatch.job_config.extra.insert(
        "source".into(),
        serde_json::json!({ "file": file.source_file }),
    );
    let executors = ExecutorRegistry::new().with_builtins(Builtins {
        typescript: Some(Arc::new(typescript)),
        ..Builtins::default()
    });
    Ok(run_dispatch(dispatch, executors, settings, cancel, on_message).await)
}

async fn run_dispatch(
    dispatch: JobDispatch,
    executors: ExecutorRegistry,
    settings: LocalSettings,
    cancel: LocalCancel,
    mut on_message: impl FnMut(&Outbound),
) -> JobState {
    let metrics = Metrics::new();
    let outbox = Arc::new(Outbox::new(OutboxLimits::default(), metrics.clone()));
    outbox.set_connected(true);
    let services = Arc::new(JobServices {
        outbox: outbox.clone(),
        metrics,
        executors,
        events: Arc::new(EventQueue::new(16)),
        settings: JobSettings {
            max_log_size_bytes: settings.max_log_size_bytes,
            default_step_timeout: settings.default_step_timeout,
            job_heartbeat_interval: Duration::from_secs(3600),
            cancel_grace: settings.cancel_grace,
            github_token: None,
            host_env: std::env::vars().collect(),
            job_pids_max: 0,
            sandbox: None,
            // Nobody arms an ack deadline for a local run.
            running_resends: Vec::new(),
            labels: Vec::new(),
        },
    });
    let dispatch = Box::new(dispatch);
    let attempt = outbox.begin_attempt(&dispatch.job_ref());
    let job_run = tokio::spawn(job::run_job(
        services,
        dispatch,
        attempt,
        cancel.0.clone(),
        || {},
    ));
    let mut pacer = Pacer::new(1e9, 1e9, 1e12, 1e12);
    loop {
        let frame = outbox.next_frame(&mut pacer).await;
        let Ok(message) = serde_json::from_str::<Outbound>(&frame.text) else {
            continue;
        };
        on_message(&message);
        if let Outbound::JobStatus(status) = &message {
            if status.state.is_terminal() {
                break;
            }
        }
    }
    match job_run.await {
        Ok(state) => state,
        Err(_) => JobState::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.json");
        std::fs::write(&path, r#"{"name":"x","steps":[],"nope":1}"#).unwrap();
        let err = LocalJob::load(&path).unwrap_err().to_string();
        assert!(err.contains("job.json") && err.contains("nope"), "{err}");
        std::fs::write(&path, r#"{"name":"x","steps":[]}"#).unwrap();
        assert!(matches!(
            LocalJob::load(&path),
            Err(LocalJobError::NoSteps { .. })
        ));
    }

    #[tokio::test]
    async fn a_job_file_runs_through_the_engine() {
        let job: LocalJob = serde_json::from_value(serde_json::json!({
            "name": "local",
            "env": {"GREETING": "hi there"},
            "secrets": {"TOKEN": "sup3r-s3cret"},
            "steps": [
                {"name": "greet", "run": "echo \"$GREETING\"; echo sup3r-s3cret"},
                {"name": "fail", "run": "exit 4"},
                {"name": "never", "run": "echo never"}
            ]
        }))
        .unwrap();
        let mut messages = Vec::new();
        let state = run(
            &job,
            None,
            LocalSettings::default(),
            LocalCancel::default(),
            |m| messages.push(serde_json::to_value(m).unwrap()),
        )
        .await;
        assert_eq!(state, JobState::Failed);
        let lines: Vec<&str> = messages
            .iter()
            .filter(|m| m["type"] == "log.chunk" && m["stepIndex"] == 0)
            .flat_map(|m| m["lines"].as_array().unwrap())
            .map(|l| l.as_str().unwrap())
            .collect();
        assert_eq!(lines, ["hi there", "***"]);
        let failed = messages
            .iter()
            .find(|m| m["type"] == "step.status" && m["state"] == "failed")
            .unwrap();
        assert_eq!(failed["data"]["exitCode"], 4);
        assert!(!messages.iter().any(|m| m["stepName"] == "never"));
    }
}
