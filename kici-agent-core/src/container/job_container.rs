//! The container of one job: created and started before its first step (image, labels,
//! workspace and hand-off mounts, an idle PID 1), found again by its labels for the start-up and
//! shutdown sweeps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountTypeEnum};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, StartContainerOptions,
};
use tracing::info;

use super::executor::lock;
use super::image::image_for;
use super::{ContainerError, ContainerExecutor};
use crate::executor::JobContext;
use crate::protocol::ContainerSpec;

/// The label every job container carries (`kici-sandbox=true`).
pub const SANDBOX_LABEL: &str = "kici-sandbox";

/// The label naming the job of a container.
pub const JOB_ID_LABEL: &str = "kici-job-id";

/// The workspace inside the container (also the working directory of every step).
pub const CONTAINER_WORKSPACE: &str = "/workspace";

/// The per-job hand-off directory inside the container.
pub(super) const CONTAINER_HANDOFF: &str = "/kici-handoff";

/// `PATH` for steps of an image that sets none.
const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// PID 1 of a job container: idles, reaps the orphans steps leave, exits on SIGTERM.
const IDLE_SCRIPT: &str = "trap 'exit 0' TERM; while :; do sleep 2147483647 & wait $!; done";

/// The container of one job.
pub(super) struct JobContainer {
    pub(super) id: String,
    pub(super) name: String,
    /// The job workspace on the host, rewritten to `/workspace` in step envs.
    pub(super) host_workspace: String,
    /// Private (0700) host directory holding `handoff`, which is mounted at `/kici-handoff`.
    pub(super) host_dir: tempfile::TempDir,
    /// `PATH` of the container (image and `container.env`).
    pub(super) path: String,
    /// `uid:gid` the workspace showed inside the container at start, to chown it back to at
    /// cleanup; `None` when the agent is root (it can remove anything).
    pub(super) owner: Option<String>,
    /// Step index -> whether its last attempt failed or was cancelled.
    pub(super) step_failed: Mutex<BTreeMap<u32, bool>>,
}

impl JobContainer {
    pub(super) fn handoff_root(&self) -> PathBuf {
        self.host_dir.path().join("handoff")
    }

    pub(super) fn any_step_failed(&self) -> bool {
        lock(&self.step_failed).values().any(|failed| *failed)
    }
}

/// `kici-sandbox-<jobId>-<epoch ms>`, with characters the engine refuses in names replaced.
fn container_name(job_id: &str, epoch_ms: u128) -> String {
    let job: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("kici-sandbox-{job}-{epoch_ms}")
}

impl ContainerExecutor {
    /// Removes every container labelled `kici-sandbox=true` that belongs to no job this
    /// executor is running (agent start-up and shutdown). Does nothing with `keep_failed`:
    /// leftovers are then containers kept for debugging. Returns how many were removed.
    pub async fn remove_all_sandboxes(&self) -> Result<usize, ContainerError> {
        if self.settings.keep_failed {
            info!("keeping leftover job containers (KICI_DOCKER_KEEP_FAILED)");
            return Ok(0);
        }
        let filters = HashMap::from([("label".to_owned(), vec![format!("{SANDBOX_LABEL}=true")])]);
        let containers = self
            .docker()
            .await?
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(ContainerError::engine("listing job containers"))?;
        let active: HashSet<String> = lock(&self.jobs).keys().cloned().collect();
        let mut removed = 0;
        for container in containers {
            let job = container
                .labels
                .as_ref()
                .and_then(|labels| labels.get(JOB_ID_LABEL));
            if job.is_some_and(|job| active.contains(job)) {
                continue;
            }
            let Some(id) = container.id else { continue };
            if self.remove_container(&id).await {
                removed += 1;
            }
        }
        if removed > 0 {
            info!(removed, "removed leftover job containers");
        }
        Ok(removed)
    }

    /// Creates and starts the container of a job.
    pub(super) async fn start_job_container(
        &self,
        job: &JobContext,
    ) -> Result<JobContainer, ContainerError> {
        let image =
            image_for(&job.config, self.settings.default_image.as_deref()).ok_or_else(|| {
                ContainerError::NoImage {
                    job: job.name.clone(),
                }
            })?;
        self.ensure_image(&image).await?;

        let host_dir = tempfile::Builder::new()
            .prefix("kici-container-")
            .tempdir()
            .map_err(ContainerError::io("creating the hand-off directory"))?;
        let handoff = host_dir.path().join("handoff");
        // Writable for whatever user the image runs as; the private parent keeps host users out.
        create_shared_dir(&handoff)?;
        let workspace_owner = std::fs::metadata(&job.workspace)
            .map_err(ContainerError::io(format!("{}", job.workspace.display())))?
            .uid();

        let name = container_name(&job.job_id, epoch_ms());
        let mut env = vec![
            "CI=true".to_owned(),
            "KICI=true".to_owned(),
            "FORCE_COLOR=1".to_owned(),
            format!("KICI_RUN_ID={}", job.run_id),
            format!("KICI_JOB_ID={}", job.job_id),
            format!("KICI_JOB_NAME={}", job.name),
            format!("KICI_WORKSPACE={CONTAINER_WORKSPACE}"),
        ];
        if let Some(ContainerSpec::Detailed {
            env: Some(extra), ..
        }) = &job.config.container
        {
            env.extend(extra.iter().map(|(key, value)| format!("{key}={value}")));
        }
        let labels = HashMap::from([
            (SANDBOX_LABEL.to_owned(), "true".to_owned()),
            (JOB_ID_LABEL.to_owned(), job.job_id.clone()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            // The entrypoint is replaced too: an image's entrypoint would get our command as
            // arguments.
            entrypoint: Some(vec!["sh".to_owned(), "-c".to_owned()]),
            cmd: Some(vec![IDLE_SCRIPT.to_owned()]),
            env: Some(env),
            working_dir: Some(CONTAINER_WORKSPACE.to_owned()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                mounts: Some(vec![
                    bind_mount(&job.workspace, CONTAINER_WORKSPACE),
                    bind_mount(&handoff, CONTAINER_HANDOFF),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let created = self
            .docker()
            .await?
            .create_container(Some(options), body)
            .await
            .map_err(ContainerError::engine(format!(
                "creating container {name} from {image}"
            )))?;
        let id = created.id;
        let started = async {
            self.docker()
                .await?
                .start_container(&id, None::<StartContainerOptions>)
                .await
                .map_err(ContainerError::engine(format!("starting container {name}")))?;
            let path = self.container_path(&id).await?;
            let owner = if workspace_owner == 0 {
                None
            } else {
                Some(self.workspace_owner_inside(&id).await?)
            };
            Ok::<_, ContainerError>((path, owner))
        }
        .await;
        match started {
            Ok((path, owner)) => {
                info!(container = %name, id = %id, image = %image, job_id = %job.job_id, "job container started");
                Ok(JobContainer {
                    id,
                    name,
                    host_workspace: job.workspace.to_string_lossy().into_owned(),
                    host_dir,
                    path,
                    owner,
                    step_failed: Mutex::new(BTreeMap::new()),
                })
            }
            Err(e) => {
                self.remove_container(&id).await;
                Err(e)
            }
        }
    }

    /// The container's `PATH` (image `ENV`, then `container.env`).
    async fn container_path(&self, id: &str) -> Result<String, ContainerError> {
        let inspect = self
            .docker()
            .await?
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(ContainerError::engine(format!("inspecting container {id}")))?;
        Ok(inspect
            .config
            .and_then(|config| config.env)
            .unwrap_or_default()
            .iter()
            .find_map(|var| var.strip_prefix("PATH=").map(str::to_owned))
            .unwrap_or_else(|| FALLBACK_PATH.to_owned()))
    }

    /// `uid:gid` of `/workspace` as the container sees it.
    async fn workspace_owner_inside(&self, id: &str) -> Result<String, ContainerError> {
        let (code, output) = self
            .exec_collect(id, &["ls", "-nd", CONTAINER_WORKSPACE], None)
            .await?;
        let fields: Vec<&str> = output.split_whitespace().collect();
        match (code, fields.get(2), fields.get(3)) {
            (0, Some(uid), Some(gid)) => Ok(format!("{uid}:{gid}")),
            _ => Err(ContainerError::Io {
                action: format!("reading the owner of {CONTAINER_WORKSPACE} in the container"),
                source: std::io::Error::other(format!("`ls -nd` said: {}", output.trim())),
            }),
        }
    }
}

fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis())
}

fn bind_mount(source: &Path, target: &str) -> Mount {
    Mount {
        target: Some(target.to_owned()),
        source: Some(source.to_string_lossy().into_owned()),
        typ: Some(MountTypeEnum::BIND),
        read_only: Some(false),
        ..Default::default()
    }
}

/// A directory any container user can write (mode 0777).
pub(super) fn create_shared_dir(dir: &Path) -> Result<(), ContainerError> {
    let action = || format!("creating {}", dir.display());
    std::fs::create_dir(dir).map_err(ContainerError::io(action()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .map_err(ContainerError::io(action()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_follow_the_reference_and_engine_rules() {
        assert_eq!(
            container_name("3f2a-b9", 1700000000000),
            "kici-sandbox-3f2a-b9-1700000000000"
        );
        assert_eq!(container_name("a/b c", 1), "kici-sandbox-a-b-c-1");
    }
}
