//! The [`ContainerExecutor`]: its construction and the [`Executor`] face the job engine calls
//! (prepare the job's container, run a step in it, clean it up).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bollard::Docker;
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use super::engine::{parse_docker_host, EngineAddress};
use super::exec::HOST_ONLY_VARS;
use super::job_container::{JobContainer, CONTAINER_HANDOFF, CONTAINER_WORKSPACE};
use super::{ContainerError, ContainerSettings};
use crate::executor::{Executor, JobContext, StepContext, StepFailure, StepIo, StepResult};

/// Runs every step of a job in one container of the job (see the `container` module). One
/// instance serves many jobs at once.
pub struct ContainerExecutor {
    pub(super) address: EngineAddress,
    /// The client, once the engine answered and the API version was agreed.
    pub(super) client: OnceCell<Docker>,
    pub(super) settings: ContainerSettings,
    /// The agent's own values of [`HOST_ONLY_VARS`], recognised and dropped from step envs.
    pub(super) host_only: BTreeMap<String, String>,
    /// Job id -> its container, set once `prepare` succeeded.
    pub(super) jobs: Mutex<HashMap<String, Arc<OnceCell<JobContainer>>>>,
    /// Makes every step attempt's hand-off directory name unique.
    pub(super) step_counter: AtomicU64,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl ContainerExecutor {
    /// An executor for the engine of `settings.docker_host`, without contacting it yet (for
    /// synchronous start-up code, and an engine that starts later): the first job,
    /// [`ContainerExecutor::check_engine`] or [`ContainerExecutor::remove_all_sandboxes`] does.
    /// Fails only on an address this executor cannot use.
    pub fn new(settings: ContainerSettings) -> Result<Self, ContainerError> {
        let address = parse_docker_host(&settings.docker_host)?;
        let host_only = std::env::vars()
            .filter(|(key, _)| HOST_ONLY_VARS.contains(&key.as_str()))
            .collect();
        Ok(ContainerExecutor {
            address,
            client: OnceCell::new(),
            settings,
            host_only,
            jobs: Mutex::new(HashMap::new()),
            step_counter: AtomicU64::new(0),
        })
    }

    /// [`ContainerExecutor::new`], then [`ContainerExecutor::check_engine`]: fails when nothing
    /// answers at the address.
    pub async fn connect(settings: ContainerSettings) -> Result<Self, ContainerError> {
        let executor = Self::new(settings)?;
        executor.check_engine().await?;
        Ok(executor)
    }

    /// The settings this executor runs with.
    pub fn settings(&self) -> &ContainerSettings {
        &self.settings
    }

    fn job_container(&self, job_id: &str) -> Option<Arc<OnceCell<JobContainer>>> {
        lock(&self.jobs).get(job_id).cloned()
    }
}

#[async_trait::async_trait]
impl Executor for ContainerExecutor {
    fn name(&self) -> &str {
        "container"
    }

    async fn prepare(&self, job: &JobContext) -> Result<(), StepFailure> {
        let cell = lock(&self.jobs)
            .entry(job.job_id.clone())
            .or_default()
            .clone();
        // Parallel first steps may prepare at the same time: one creates, the others wait.
        let result = cell
            .get_or_try_init(|| self.start_job_container(job))
            .await
            .map(|_| ());
        if result.is_err() {
            let mut jobs = lock(&self.jobs);
            // Forget the job unless another caller is still trying (it holds the cell too).
            if Arc::strong_count(&cell) == 2 && cell.get().is_none() {
                jobs.remove(&job.job_id);
            }
        }
        result.map_err(|e| StepFailure::new(format!("Could not start the job container: {e}")))
    }

    async fn run_step(&self, job: &JobContext, step: &StepContext, io: StepIo) -> StepResult {
        let Some(command) = step.spec.run.as_deref() else {
            return Err(StepFailure::new(format!(
                "step '{}' has no `run` command: in a container job every step runs its `run` field with sh",
                step.name
            )));
        };
        let Some(cell) = self.job_container(&job.job_id) else {
            return Err(StepFailure::new(format!(
                "job '{}' has no container: prepare was not called or failed",
                job.name
            )));
        };
        let Some(container) = cell.get() else {
            return Err(StepFailure::new(format!(
                "job '{}' has no container: prepare was not called or failed",
                job.name
            )));
        };
        let result = if io.is_cancelled() {
            Err(StepFailure::new("Command was stopped (cancelled)"))
        } else {
            self.run_step_in(container, step, command, &io).await
        };
        lock(&container.step_failed).insert(step.index, result.is_err());
        result
    }

    async fn cleanup(&self, job: &JobContext) {
        let Some(cell) = lock(&self.jobs).remove(&job.job_id) else {
            return;
        };
        let Some(container) = cell.get() else {
            return;
        };
        if let Some(owner) = &container.owner {
            let chown = [
                "chown",
                "-R",
                owner.as_str(),
                CONTAINER_WORKSPACE,
                CONTAINER_HANDOFF,
            ];
            match self.exec_collect(&container.id, &chown, Some("0")).await {
                Ok((0, _)) => {}
                Ok((code, output)) => {
                    warn!(container = %container.name, code, output = %output.trim(), "could not give the workspace back to the agent")
                }
                Err(e) => {
                    warn!(container = %container.name, error = %e, "could not give the workspace back to the agent")
                }
            }
        }
        if self.settings.keep_failed && container.any_step_failed() {
            warn!(container = %container.name, id = %container.id, job_id = %job.job_id, "Keeping failed container for debugging");
            return;
        }
        if self.remove_container(&container.id).await {
            debug!(container = %container.name, "job container removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    use super::super::PullPolicy;
    use crate::process::StepEnv;
    use crate::protocol::JobConfig;

    /// With an agent that is not root, files a root container step made are given back.
    #[tokio::test]
    #[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
    async fn a_non_root_agent_gets_its_workspace_back() {
        use crate::executor::StepEvent;
        use crate::protocol::StepSpec;
        use tokio_util::sync::CancellationToken;

        let host = std::env::var("KICI_TEST_DOCKER_HOST").unwrap_or_else(|_| {
            panic!("KICI_TEST_DOCKER_HOST is not set: this test needs a real container engine (sh scripts/container-engine.sh start DIR)")
        });
        let mut settings = ContainerSettings::new(host);
        settings.default_image = Some(
            std::env::var("KICI_TEST_IMAGE").unwrap_or_else(|_| "kici-test/busybox:latest".into()),
        );
        settings.pull_policy = PullPolicy::Never;
        let executor = ContainerExecutor::connect(settings).await.unwrap();
        let workspace = tempfile::tempdir().unwrap();
        // The test runs as root; a workspace owned by 4321 stands for a non-root agent's.
        std::os::unix::fs::chown(workspace.path(), Some(4321), Some(4321)).unwrap();
        let job = JobContext {
            run_id: "run".into(),
            job_id: format!("chown-{}", std::process::id()),
            name: "chown".into(),
            config: JobConfig::default(),
            workspace: workspace.path().to_owned(),
            secrets: BTreeMap::new(),
            namespaced_secrets: Default::default(),
            deps_tarball: None,
            upstream_job_outputs: Default::default(),
        };
        executor.prepare(&job).await.unwrap();
        let step = StepContext {
            index: 0,
            name: "make".into(),
            spec: StepSpec {
                name: "make".into(),
                run: Some("mkdir -p d/e && echo x > d/e/f".into()),
                ..StepSpec::default()
            },
            attempt: 1,
            env: StepEnv::default(),
            workspace: workspace.path().to_owned(),
        };
        let (events, mut received) = tokio::sync::mpsc::channel::<StepEvent>(16);
        let drain = tokio::spawn(async move { while received.recv().await.is_some() {} });
        let io = StepIo::new(events, CancellationToken::new(), CancellationToken::new());
        executor.run_step(&job, &step, io).await.unwrap();
        drain.await.unwrap();
        let made = workspace.path().join("d/e/f");
        assert_eq!(std::fs::metadata(&made).unwrap().uid(), 0, "made by root");
        executor.cleanup(&job).await;
        for path in ["d", "d/e", "d/e/f"] {
            let meta = std::fs::metadata(workspace.path().join(path)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4321, 4321), "{path}");
        }
    }
}
