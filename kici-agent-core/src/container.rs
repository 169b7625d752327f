//! Container jobs (spec agent.md §12.3): every step of a job runs inside one job container,
//! driven through the Docker Engine API, so Docker and Podman (through its Docker-compatible
//! socket) share this one code path.
//!
//! How a job runs:
//! * `prepare` makes sure the image is there (pull policy), then creates and starts
//!   `kici-sandbox-<jobId>-<epoch ms>` with the labels `kici-sandbox=true` and
//!   `kici-job-id=<jobId>`, the job workspace bind-mounted read-write at `/workspace` (also the
//!   working directory), a private hand-off directory at `/kici-handoff`, and an idle shell as
//!   PID 1 that reaps orphans and exits on SIGTERM.
//! * `run_step` is one exec per step: `sh -c <run>` under a small wrapper shell, stdout and
//!   stderr streamed live, the exit code read from the exec.
//! * `cleanup` force-removes the container: no step runs any more, so no stop grace is needed.
//!   With `keep_failed`, the container of a job with a failed or cancelled step is kept.
//!
//! Choices made here:
//! * Environment: the step environment, minus the agent's own `PATH`, `HOME`, `USER`, `SHELL`,
//!   `TMPDIR` and `NODE_PATH` (the image's values apply instead; `PATH` entries added through
//!   `$KICI_PATH` stay in front of the image's `PATH`), with host workspace paths rewritten to
//!   `/workspace`. `jobConfig.container.env` sits under the step environment.
//! * `$KICI_ENV`, `$KICI_PATH`, `$KICI_OUTPUT`, `$KICI_SECRET_OUTPUT` work as on the host: each step gets fresh files
//!   under `/kici-handoff/<step>/`, copied back into the agent's hand-off files after the step.
//! * Stopping a step: the engine (runc) makes every exec a session leader, so the wrapper's pid
//!   is its process group. The wrapper records that pid; a cancel runs
//!   `kill -TERM -<pgid>` in the container, then `kill -KILL -<pgid>` after the stop grace (at
//!   once on a forced stop). When the command ends, the wrapper kills what it left behind in its
//!   group, like the host executor does, so nothing of a step outlives it. A parallel sibling in
//!   the same container has its own group and is not touched.
//! * File ownership: the container runs as the image's default user (often root, spec §12.3).
//!   When the agent is not root, a last exec chowns `/workspace` back to the owner the workspace
//!   showed inside the container at start (the agent's uid with rootful engines, 0 with rootless
//!   ones), so the agent can remove the workspace.
//! * A non-root image user cannot write the workspace (mode 0700, owned by the agent): such
//!   images need a root-run step or an agent that runs as the image's uid.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountTypeEnum};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions,
    RemoveContainerOptions, StartContainerOptions,
};
use bollard::Docker;
use futures_util::{Stream, StreamExt};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::executor::{Executor, JobContext, StepContext, StepFailure, StepIo, StepResult};
use crate::process::StepEnv;
use crate::protocol::{ContainerSpec, JobConfig};

/// Where the engine listens when `DOCKER_HOST` is unset.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// The label every job container carries (`kici-sandbox=true`).
pub const SANDBOX_LABEL: &str = "kici-sandbox";

/// The label naming the job of a container.
pub const JOB_ID_LABEL: &str = "kici-job-id";

/// The workspace inside the container (also the working directory of every step).
pub const CONTAINER_WORKSPACE: &str = "/workspace";

/// The per-job hand-off directory inside the container.
const CONTAINER_HANDOFF: &str = "/kici-handoff";

/// Engine requests must answer (headers) within this; streams may then run for as long as the
/// step does.
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// `PATH` for steps of an image that sets none.
const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables the agent copies from its own environment that describe the host, not the image.
const HOST_ONLY_VARS: [&str; 6] = ["PATH", "HOME", "USER", "SHELL", "TMPDIR", "NODE_PATH"];

/// The hand-off files: variable, file name.
const HANDOFF_FILES: [(&str, &str); 4] = [
    ("KICI_ENV", "env"),
    ("KICI_PATH", "path"),
    ("KICI_OUTPUT", "output"),
    ("KICI_SECRET_OUTPUT", "secret_output"),
];

/// PID 1 of a job container: idles, reaps the orphans steps leave, exits on SIGTERM.
const IDLE_SCRIPT: &str = "trap 'exit 0' TERM; while :; do sleep 2147483647 & wait $!; done";

/// Runs one step: `$1` is the command, `$2` the pid file. Records its pid (= its process group),
/// survives the group SIGTERM so it can report the command's status, then SIGKILLs whatever the
/// command left in the group (found through /proc: no tool beyond `sh` is assumed). Its own
/// stderr goes to /dev/null, and the command gets the real one in a subshell (a redirection on
/// the command itself would still be in force while the wrapper reports a killed command), so
/// the wrapper adds no "Terminated" notice to the step's output.
const STEP_WRAPPER: &str = r#"echo $$ > "$2"
trap : TERM
exec 3>&2 2>/dev/null
(exec sh -c "$1" 2>&3 3>&-)
kici_status=$?
for kici_stat in /proc/[0-9]*/stat; do
  { read -r kici_line < "$kici_stat"; } 2>/dev/null || continue
  set -- ${kici_line##*) }
  kici_pid=${kici_stat#/proc/}
  kici_pid=${kici_pid%/stat}
  [ "$3" = "$$" ] && [ "$kici_pid" != "$$" ] && kill -KILL "$kici_pid" 2>/dev/null
done
exit $kici_status"#;

/// How often a signal whose target has not recorded its pid yet is retried.
const SIGNAL_RETRY: Duration = Duration::from_millis(100);

/// After SIGKILL, stop reading a stream that stays open this long (only a process that left
/// the step's group can hold it).
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(5);

/// How long an exec may still report `running` after its output ended.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(5);

/// When to pull a job's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Pull only when the engine does not have the image (the default).
    #[default]
    IfNotPresent,
    /// Pull before every job.
    Always,
    /// Never pull: a missing image fails the job.
    Never,
}

/// A pull policy name was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pull policy {0:?}: expected if-not-present, always or never")]
pub struct UnknownPullPolicy(pub String);

impl std::str::FromStr for PullPolicy {
    type Err = UnknownPullPolicy;

    /// Parses `if-not-present`, `always` or `never` (case-insensitive).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "if-not-present" | "ifnotpresent" | "missing" => Ok(PullPolicy::IfNotPresent),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            _ => Err(UnknownPullPolicy(text.to_owned())),
        }
    }
}

/// How the container executor reaches the engine and runs jobs.
#[derive(Debug, Clone)]
pub struct ContainerSettings {
    /// The engine: `unix:///path/to/docker.sock`, or `tcp://HOST:PORT` on a loopback address.
    pub docker_host: String,
    /// Image of jobs whose config names none (`KICI_CONTAINER_IMAGE`).
    pub default_image: Option<String>,
    /// When to pull images.
    pub pull_policy: PullPolicy,
    /// Keep the containers of jobs that did not succeed (`KICI_DOCKER_KEEP_FAILED`).
    pub keep_failed: bool,
    /// SIGTERM -> SIGKILL grace when a step is cancelled or times out.
    pub stop_grace: Duration,
}

impl ContainerSettings {
    /// Settings for the engine at `docker_host`: no default image, pull if not present, remove
    /// every container, 10 s stop grace.
    pub fn new(docker_host: impl Into<String>) -> Self {
        ContainerSettings {
            docker_host: docker_host.into(),
            default_image: None,
            pull_policy: PullPolicy::IfNotPresent,
            keep_failed: false,
            stop_grace: Duration::from_secs(10),
        }
    }

    /// `DOCKER_HOST` when set and not empty, else [`DEFAULT_DOCKER_HOST`].
    pub fn docker_host_from_env() -> String {
        std::env::var("DOCKER_HOST")
            .ok()
            .filter(|host| !host.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned())
    }
}

impl Default for ContainerSettings {
    /// [`ContainerSettings::new`] with [`ContainerSettings::docker_host_from_env`].
    fn default() -> Self {
        Self::new(Self::docker_host_from_env())
    }
}

/// Why the container executor could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// `DOCKER_HOST` names something this executor cannot use.
    #[error("container engine address {host:?} is not supported: {reason}")]
    UnsupportedHost { host: String, reason: &'static str },
    /// No engine answers at the address.
    #[error("the container engine at {host} is unreachable (is dockerd or `podman system service` running there, and is DOCKER_HOST right?): {source}")]
    Unreachable {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// The job names no image and there is no default.
    #[error("job '{job}' names no container image and the agent has no default image (KICI_CONTAINER_IMAGE)")]
    NoImage { job: String },
    /// The image is absent and the policy forbids pulling.
    #[error("image {image} is not present on the container engine and the pull policy is `never`")]
    ImageMissing { image: String },
    /// Pulling the image failed.
    #[error("pulling image {image} failed: {message}")]
    PullFailed { image: String, message: String },
    /// An engine request failed.
    #[error("{action}: {source}")]
    Engine {
        action: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// A host file operation failed.
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
}

impl ContainerError {
    fn engine(action: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> Self {
        let action = action.into();
        move |source| ContainerError::Engine { action, source }
    }

    fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let action = action.into();
        move |source| ContainerError::Io { action, source }
    }
}

/// The image a job runs in: `jobConfig.container` (a name or `{image}`), else `default_image`
/// (pass it only when the agent runs every job in a container). `None`: not a container job.
pub fn image_for(config: &JobConfig, default_image: Option<&str>) -> Option<String> {
    let named = match &config.container {
        Some(ContainerSpec::Image(image)) => Some(image.as_str()),
        Some(ContainerSpec::Detailed { image, .. }) => Some(image.as_str()),
        None => None,
    };
    named
        .map(str::trim)
        .filter(|image| !image.is_empty())
        .or_else(|| {
            default_image
                .map(str::trim)
                .filter(|image| !image.is_empty())
        })
        .map(str::to_owned)
}

/// Runs every step of a job in one container of the job (see the module docs). One instance
/// serves many jobs at once.
pub struct ContainerExecutor {
    address: EngineAddress,
    /// The client, once the engine answered and the API version was agreed.
    client: OnceCell<Docker>,
    settings: ContainerSettings,
    /// The agent's own values of [`HOST_ONLY_VARS`], recognised and dropped from step envs.
    host_only: BTreeMap<String, String>,
    /// Job id -> its container, set once `prepare` succeeded.
    jobs: Mutex<HashMap<String, Arc<OnceCell<JobContainer>>>>,
    /// Makes every step attempt's hand-off directory name unique.
    step_counter: AtomicU64,
}

/// The container of one job.
struct JobContainer {
    id: String,
    name: String,
    /// The job workspace on the host, rewritten to `/workspace` in step envs.
    host_workspace: String,
    /// Private (0700) host directory holding `handoff`, which is mounted at `/kici-handoff`.
    host_dir: tempfile::TempDir,
    /// `PATH` of the container (image and `container.env`).
    path: String,
    /// `uid:gid` the workspace showed inside the container at start, to chown it back to at
    /// cleanup; `None` when the agent is root (it can remove anything).
    owner: Option<String>,
    /// Step index -> whether its last attempt failed or was cancelled.
    step_failed: Mutex<BTreeMap<u32, bool>>,
}

impl JobContainer {
    fn handoff_root(&self) -> PathBuf {
        self.host_dir.path().join("handoff")
    }

    fn any_step_failed(&self) -> bool {
        lock(&self.step_failed).values().any(|failed| *failed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the engine listens.
#[derive(Debug, PartialEq, Eq)]
enum EngineAddress {
    Unix(String),
    /// `host:port` for plain HTTP.
    Tcp(String),
}

/// Parses a `DOCKER_HOST` value. TCP must be loopback: the job workspace is bind-mounted, so
/// the engine has to run on this machine, and plain TCP to another one would be unauthenticated.
fn parse_docker_host(host: &str) -> Result<EngineAddress, ContainerError> {
    let unsupported = |reason| ContainerError::UnsupportedHost {
        host: host.to_owned(),
        reason,
    };
    if let Some(path) = host.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(unsupported("a unix socket path must be absolute"));
        }
        return Ok(EngineAddress::Unix(path.to_owned()));
    }
    if !(host.starts_with("tcp://") || host.starts_with("http://")) {
        return Err(unsupported(
            "use unix:///path/to/docker.sock or tcp://127.0.0.1:PORT",
        ));
    }
    let url = url::Url::parse(host).map_err(|_| unsupported("not a valid tcp:// address"))?;
    // `tcp://` is not a special scheme to the URL parser: an IPv4 host comes back as a name.
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback {
        return Err(unsupported(
            "tcp:// must be a loopback address: job workspaces are bind-mounted, so the engine must run on this machine (TLS is not supported)",
        ));
    }
    let host_part = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(other) => other.to_string(),
        None => return Err(unsupported("not a valid tcp:// address")),
    };
    Ok(EngineAddress::Tcp(format!(
        "{host_part}:{}",
        url.port().unwrap_or(2375)
    )))
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

/// Splits an image reference into the `fromImage` and `tag` of a pull. A reference without a
/// tag means `latest` (an empty tag would pull every tag); a digest reference is passed whole.
fn pull_reference(image: &str) -> (String, Option<String>) {
    if image.contains('@') {
        return (image.to_owned(), None);
    }
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_start..].rfind(':') {
        Some(colon) => {
            let split = name_start + colon;
            (
                image[..split].to_owned(),
                Some(image[split + 1..].to_owned()),
            )
        }
        None => (image.to_owned(), Some("latest".to_owned())),
    }
}

/// Rewrites a host workspace path (or a path below it) to the container's `/workspace`.
fn rewrite_workspace(value: &str, host_workspace: &str) -> String {
    if host_workspace.is_empty() {
        return value.to_owned();
    }
    match value.strip_prefix(host_workspace) {
        Some("") => CONTAINER_WORKSPACE.to_owned(),
        Some(rest) if rest.starts_with('/') => format!("{CONTAINER_WORKSPACE}{rest}"),
        _ => value.to_owned(),
    }
}

/// The environment of a step's exec: see the module docs. `handoff_dir` is the step's hand-off
/// directory inside the container.
fn exec_env(
    step_env: &StepEnv,
    host_only: &BTreeMap<String, String>,
    host_workspace: &str,
    container_path: &str,
    handoff_dir: &str,
) -> Vec<String> {
    let mut env = Vec::new();
    for (key, value) in step_env.iter() {
        if HANDOFF_FILES.iter().any(|(name, _)| *name == key) {
            continue;
        }
        let host_value = host_only.get(key).map(String::as_str);
        let value = if key == "PATH" {
            // Entries added in front of the agent's PATH (`$KICI_PATH`) stay; the agent's own
            // part becomes the container's.
            let added = match host_value {
                Some(host_path) if value == host_path => "",
                Some(host_path) => value
                    .strip_suffix(host_path)
                    .and_then(|front| front.strip_suffix(':'))
                    .unwrap_or(value),
                None => value,
            };
            let mut entries: Vec<String> = added
                .split(':')
                .filter(|entry| !entry.is_empty())
                .map(|entry| rewrite_workspace(entry, host_workspace))
                .collect();
            if added.len() < value.len() || added.is_empty() {
                entries.push(container_path.to_owned());
            }
            entries.join(":")
        } else if host_value == Some(value) {
            continue;
        } else {
            rewrite_workspace(value, host_workspace)
        };
        env.push(format!("{key}={value}"));
    }
    for (name, file) in HANDOFF_FILES {
        env.push(format!("{name}={handoff_dir}/{file}"));
    }
    env
}

/// The signal sent to a step's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum StopSignal {
    Term,
    Kill,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "TERM",
            StopSignal::Kill => "KILL",
        }
    }
}

/// How a step's exec ended.
struct ExecEnd {
    /// The stop that was asked for, if any.
    stopped: Option<StopSignal>,
    /// `None` when the output was abandoned after a kill (an escaped process held it open).
    exit_code: Option<i64>,
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

    /// Checks that the engine answers, and agrees on an API version it speaks (dockerd 20.10
    /// only accepts up to 1.41). Cheap once it succeeded; an error names the address.
    pub async fn check_engine(&self) -> Result<(), ContainerError> {
        self.docker().await.map(|_| ())
    }

    /// The client; the first successful call connects and negotiates the API version.
    async fn docker(&self) -> Result<&Docker, ContainerError> {
        self.client
            .get_or_try_init(|| async {
                let host = &self.settings.docker_host;
                let unreachable = |source| ContainerError::Unreachable {
                    host: host.clone(),
                    source,
                };
                let docker = match &self.address {
                    EngineAddress::Unix(path) => Docker::connect_with_unix(
                        path,
                        REQUEST_TIMEOUT_SECS,
                        bollard::API_DEFAULT_VERSION,
                    ),
                    EngineAddress::Tcp(address) => Docker::connect_with_http(
                        address,
                        REQUEST_TIMEOUT_SECS,
                        bollard::API_DEFAULT_VERSION,
                    ),
                }
                .map_err(unreachable)?;
                let docker = docker.negotiate_version().await.map_err(unreachable)?;
                let version = docker.client_version();
                info!(
                    host = %host,
                    api = %format!("{}.{}", version.major_version, version.minor_version),
                    "connected to the container engine"
                );
                Ok(docker)
            })
            .await
    }

    /// The settings this executor runs with.
    pub fn settings(&self) -> &ContainerSettings {
        &self.settings
    }

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

    /// Force-removes a container; `false` (logged) when the engine refused.
    async fn remove_container(&self, id: &str) -> bool {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        let removed = match self.docker().await {
            Ok(docker) => docker.remove_container(id, Some(options)).await,
            Err(e) => {
                warn!(container = %id, error = %e, "could not remove a job container");
                return false;
            }
        };
        match removed {
            Ok(()) => true,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => false,
            Err(e) => {
                warn!(container = %id, error = %e, "could not remove a job container");
                false
            }
        }
    }

    async fn ensure_image(&self, image: &str) -> Result<(), ContainerError> {
        let present = match self.docker().await?.inspect_image(image).await {
            Ok(_) => true,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => false,
            Err(source) => {
                return Err(ContainerError::Engine {
                    action: format!("looking up image {image}"),
                    source,
                })
            }
        };
        match (self.settings.pull_policy, present) {
            (PullPolicy::Never, false) => Err(ContainerError::ImageMissing {
                image: image.to_owned(),
            }),
            (PullPolicy::Never | PullPolicy::IfNotPresent, true) => Ok(()),
            (PullPolicy::IfNotPresent | PullPolicy::Always, _) => self.pull(image).await,
        }
    }

    async fn pull(&self, image: &str) -> Result<(), ContainerError> {
        let (from_image, tag) = pull_reference(image);
        let options = CreateImageOptions {
            from_image: Some(from_image),
            tag,
            ..Default::default()
        };
        info!(image, "pulling image");
        let mut progress = self.docker().await?.create_image(Some(options), None, None);
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => debug!(image, status = ?info.status, progress = ?info.progress, "pull"),
                Err(e) => {
                    let message = match e {
                        bollard::errors::Error::DockerStreamError { error } => error,
                        bollard::errors::Error::DockerResponseServerError { message, .. } => {
                            message
                        }
                        other => other.to_string(),
                    };
                    return Err(ContainerError::PullFailed {
                        image: image.to_owned(),
                        message,
                    });
                }
            }
        }
        Ok(())
    }

    /// Creates and starts the container of a job.
    async fn start_job_container(&self, job: &JobContext) -> Result<JobContainer, ContainerError> {
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

    /// Runs a short command in the container; returns its exit code and output.
    async fn exec_collect(
        &self,
        id: &str,
        cmd: &[&str],
        user: Option<&str>,
    ) -> Result<(i64, String), ContainerError> {
        let action = || format!("running `{}` in container {id}", cmd.join(" "));
        let exec = self
            .docker()
            .await?
            .create_exec(
                id,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(cmd.iter().map(|arg| arg.to_string()).collect()),
                    user: user.map(str::to_owned),
                    ..Default::default()
                },
            )
            .await
            .map_err(ContainerError::engine(action()))?;
        let mut output = Vec::new();
        if let StartExecResults::Attached {
            output: mut stream, ..
        } = self
            .docker()
            .await?
            .start_exec(&exec.id, Some(StartExecOptions::default()))
            .await
            .map_err(ContainerError::engine(action()))?
        {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(ContainerError::engine(action()))?;
                output.extend_from_slice(&chunk.into_bytes());
            }
        }
        let code = self.exit_code(&exec.id).await?;
        Ok((code, String::from_utf8_lossy(&output).into_owned()))
    }

    /// The exit code of a finished exec (the engine may flag it finished shortly after its
    /// output ended).
    async fn exit_code(&self, exec_id: &str) -> Result<i64, ContainerError> {
        let give_up = Instant::now() + EXIT_CODE_WAIT;
        loop {
            let inspect = self
                .docker()
                .await?
                .inspect_exec(exec_id)
                .await
                .map_err(ContainerError::engine(format!("inspecting exec {exec_id}")))?;
            match (inspect.running, inspect.exit_code) {
                (Some(false) | None, Some(code)) => return Ok(code),
                _ if Instant::now() >= give_up => {
                    return Err(ContainerError::Io {
                        action: format!("reading the exit code of exec {exec_id}"),
                        source: std::io::Error::other("the engine still reports it running"),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Sends a signal to a step's process group; `false` when the step has not recorded its pid
    /// yet (try again).
    async fn signal_step(
        &self,
        container: &JobContainer,
        pid_file: &Path,
        signal: StopSignal,
    ) -> bool {
        let Ok(pid) = std::fs::read_to_string(pid_file) else {
            return false;
        };
        let pid = pid.trim();
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let script = format!(
            "kill -{} -{pid} 2>/dev/null || kill -{} {pid} 2>/dev/null; true",
            signal.name(),
            signal.name()
        );
        // As root: the step may have changed user.
        if let Err(e) = self
            .exec_collect(&container.id, &["sh", "-c", &script], Some("0"))
            .await
        {
            warn!(container = %container.name, error = %e, "could not signal a step");
        }
        true
    }

    /// Runs one step's exec to its end, streaming its output and stopping it when asked.
    async fn run_exec(
        &self,
        container: &JobContainer,
        command: &str,
        env: Vec<String>,
        pid_file: &Path,
        pid_file_inside: &str,
        io: &StepIo,
    ) -> Result<ExecEnd, ContainerError> {
        let cmd = [
            "sh",
            "-c",
            STEP_WRAPPER,
            "kici-step",
            command,
            pid_file_inside,
        ];
        let exec = self
            .docker()
            .await?
            .create_exec(
                &container.id,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(cmd.iter().map(|arg| arg.to_string()).collect()),
                    env: Some(env),
                    working_dir: Some(CONTAINER_WORKSPACE.to_owned()),
                    ..Default::default()
                },
            )
            .await
            .map_err(ContainerError::engine(format!(
                "creating the step exec in container {}",
                container.name
            )))?;
        let started = self
            .docker()
            .await?
            .start_exec(&exec.id, Some(StartExecOptions::default()))
            .await
            .map_err(ContainerError::engine(format!(
                "starting the step exec in container {}",
                container.name
            )))?;
        let StartExecResults::Attached { output, .. } = started else {
            return Err(ContainerError::Io {
                action: "starting the step exec".to_owned(),
                source: std::io::Error::other("the engine detached the exec"),
            });
        };
        let ended = self.stream_output(container, output, pid_file, io).await;
        let exit_code = if ended.drained {
            Some(self.exit_code(&exec.id).await?)
        } else {
            None
        };
        Ok(ExecEnd {
            stopped: ended.signal,
            exit_code,
        })
    }

    /// Forwards the exec's output until it ends; on cancel SIGTERM, then SIGKILL after the stop
    /// grace (at once on force).
    async fn stream_output(
        &self,
        container: &JobContainer,
        mut output: ExecOutput,
        pid_file: &Path,
        io: &StepIo,
    ) -> StreamEnd {
        let cancel = io.cancellation().clone();
        let force = io.force().clone();
        let mut wanted: Option<StopSignal> = None;
        let mut sent: Option<StopSignal> = None;
        let mut kill_at: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut abandon_at: Option<Instant> = None;
        loop {
            if let Some(signal) = wanted.filter(|signal| sent != Some(*signal)) {
                retry_at = None;
                if self.signal_step(container, pid_file, signal).await {
                    sent = Some(signal);
                    if signal == StopSignal::Kill {
                        abandon_at = Some(Instant::now() + DRAIN_AFTER_KILL);
                    }
                } else {
                    // The wrapper has not recorded its pid yet: the exec is just starting.
                    retry_at = Some(Instant::now() + SIGNAL_RETRY);
                }
            }
            tokio::select! {
                chunk = output.next() => match chunk {
                    Some(Ok(chunk)) => io.write(chunk.into_bytes().to_vec()).await,
                    Some(Err(e)) => {
                        io.line(format!("[kici] lost the output of the step: {e}")).await;
                        return StreamEnd { signal: wanted, drained: true };
                    }
                    None => return StreamEnd { signal: wanted, drained: true },
                },
                _ = cancel.cancelled(), if wanted.is_none() => {
                    wanted = Some(StopSignal::Term);
                    kill_at = Some(Instant::now() + self.settings.stop_grace);
                }
                _ = force.cancelled(), if wanted != Some(StopSignal::Kill) => {
                    wanted = Some(StopSignal::Kill);
                }
                _ = sleep_until_some(kill_at), if wanted == Some(StopSignal::Term) => {
                    wanted = Some(StopSignal::Kill);
                }
                _ = sleep_until_some(retry_at) => {}
                _ = sleep_until_some(abandon_at) => {
                    io.line("[kici] the step's output stayed open after it was killed: a process of it left its process group").await;
                    return StreamEnd { signal: wanted, drained: false };
                }
            }
        }
    }

    /// Copies what the step wrote to its container-side hand-off files into the agent's.
    fn copy_handoff_back(step_env: &StepEnv, step_dir: &Path) -> Result<(), ContainerError> {
        for (name, file) in HANDOFF_FILES {
            let Some(target) = step_env.get(name) else {
                continue;
            };
            let written = match std::fs::read(step_dir.join(file)) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => {
                    return Err(ContainerError::Io {
                        action: format!("reading ${name} of the step"),
                        source: e,
                    })
                }
            };
            std::fs::write(target, written)
                .map_err(ContainerError::io(format!("writing ${name} to {target}")))?;
        }
        Ok(())
    }

    async fn run_step_in(
        &self,
        container: &JobContainer,
        step: &StepContext,
        command: &str,
        io: &StepIo,
    ) -> StepResult {
        let key = format!(
            "step-{}-{}-{}",
            step.index,
            step.attempt,
            self.step_counter.fetch_add(1, Ordering::Relaxed)
        );
        let step_dir = container.handoff_root().join(&key);
        let inside = format!("{CONTAINER_HANDOFF}/{key}");
        create_step_files(&step_dir).map_err(|e| StepFailure::new(e.to_string()))?;
        let env = exec_env(
            &step.env,
            &self.host_only,
            &container.host_workspace,
            &container.path,
            &inside,
        );
        let ended = self
            .run_exec(
                container,
                command,
                env,
                &step_dir.join("pid"),
                &format!("{inside}/pid"),
                io,
            )
            .await;
        if let Err(e) = Self::copy_handoff_back(&step.env, &step_dir) {
            io.line(format!("[kici] {e}")).await;
        }
        if let Err(e) = std::fs::remove_dir_all(&step_dir) {
            debug!(dir = %step_dir.display(), error = %e, "could not remove a step hand-off directory");
        }
        let ended = ended.map_err(|e| StepFailure::new(e.to_string()))?;
        match (ended.stopped, ended.exit_code) {
            (None, Some(0)) => Ok(()),
            (None, Some(code)) => Err(StepFailure::exit_code(
                i32::try_from(code).unwrap_or(i32::MAX),
            )),
            (Some(StopSignal::Kill), _) => {
                Err(StepFailure::new("Command was killed (forced cancel)"))
            }
            (Some(StopSignal::Term), _) => Err(StepFailure::new("Command was stopped (cancelled)")),
            (None, None) => Err(StepFailure::new("the step's exit code is unknown")),
        }
    }

    fn job_container(&self, job_id: &str) -> Option<Arc<OnceCell<JobContainer>>> {
        lock(&self.jobs).get(job_id).cloned()
    }
}

/// The live output of an exec.
type ExecOutput = std::pin::Pin<
    Box<dyn Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>> + Send>,
>;

/// How reading a step's output ended.
struct StreamEnd {
    signal: Option<StopSignal>,
    /// Whether the output ended (else it was abandoned after a kill).
    drained: bool,
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
fn create_shared_dir(dir: &Path) -> Result<(), ContainerError> {
    let action = || format!("creating {}", dir.display());
    std::fs::create_dir(dir).map_err(ContainerError::io(action()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .map_err(ContainerError::io(action()))
}

/// A step's hand-off directory with its empty files, writable by any container user.
fn create_step_files(dir: &Path) -> Result<(), ContainerError> {
    create_shared_dir(dir)?;
    for (_, file) in HANDOFF_FILES {
        let path = dir.join(file);
        std::fs::File::create(&path)
            .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)))
            .map_err(ContainerError::io(format!("creating {}", path.display())))?;
    }
    Ok(())
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

    #[test]
    fn the_image_comes_from_the_job_then_the_default() {
        let mut config = JobConfig::default();
        assert_eq!(image_for(&config, None), None);
        assert_eq!(
            image_for(&config, Some("debian:12")).as_deref(),
            Some("debian:12")
        );
        config.container = Some(ContainerSpec::Image("alpine:3".into()));
        assert_eq!(
            image_for(&config, Some("debian:12")).as_deref(),
            Some("alpine:3")
        );
        config.container = Some(
            serde_json::from_value(serde_json::json!({"image": "node:20", "env": {"A": "1"}}))
                .unwrap(),
        );
        assert_eq!(image_for(&config, None).as_deref(), Some("node:20"));
        config.container = Some(ContainerSpec::Image(" ".into()));
        assert_eq!(
            image_for(&config, Some("debian:12")).as_deref(),
            Some("debian:12")
        );
    }

    #[test]
    fn docker_hosts_are_unix_sockets_or_loopback_tcp() {
        assert_eq!(
            parse_docker_host("unix:///run/docker.sock").unwrap(),
            EngineAddress::Unix("/run/docker.sock".into())
        );
        assert_eq!(
            parse_docker_host("tcp://127.0.0.1:2375").unwrap(),
            EngineAddress::Tcp("127.0.0.1:2375".into())
        );
        assert_eq!(
            parse_docker_host("tcp://localhost").unwrap(),
            EngineAddress::Tcp("localhost:2375".into())
        );
        assert_eq!(
            parse_docker_host("tcp://[::1]:2376").unwrap(),
            EngineAddress::Tcp("[::1]:2376".into())
        );
        for bad in [
            "tcp://10.0.0.5:2375",
            "ssh://host",
            "unix://relative.sock",
            "/x.sock",
        ] {
            let err = parse_docker_host(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        let remote = parse_docker_host("tcp://192.168.1.2:2375")
            .unwrap_err()
            .to_string();
        assert!(remote.contains("loopback"), "{remote}");
    }

    #[test]
    fn pull_references_always_name_a_tag() {
        let split = |image| pull_reference(image);
        assert_eq!(split("busybox"), ("busybox".into(), Some("latest".into())));
        assert_eq!(
            split("node:20-alpine"),
            ("node".into(), Some("20-alpine".into()))
        );
        assert_eq!(
            split("localhost:5000/team/app"),
            ("localhost:5000/team/app".into(), Some("latest".into()))
        );
        assert_eq!(
            split("localhost:5000/team/app:v1"),
            ("localhost:5000/team/app".into(), Some("v1".into()))
        );
        assert_eq!(
            split("alpine@sha256:abc"),
            ("alpine@sha256:abc".into(), None)
        );
    }

    #[test]
    fn pull_policies_parse() {
        assert_eq!("never".parse(), Ok(PullPolicy::Never));
        assert_eq!("Always".parse(), Ok(PullPolicy::Always));
        assert_eq!("if-not-present".parse(), Ok(PullPolicy::IfNotPresent));
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }

    #[test]
    fn container_names_follow_the_reference_and_engine_rules() {
        assert_eq!(
            container_name("3f2a-b9", 1700000000000),
            "kici-sandbox-3f2a-b9-1700000000000"
        );
        assert_eq!(container_name("a/b c", 1), "kici-sandbox-a-b-c-1");
    }

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

    fn env_of(pairs: &[(&str, &str)]) -> StepEnv {
        let mut env = StepEnv::default();
        env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    #[test]
    fn step_envs_lose_host_values_and_point_inside_the_container() {
        let host_only: BTreeMap<String, String> = [
            ("PATH", "/usr/local/cargo/bin:/usr/bin:/bin"),
            ("HOME", "/home/agent"),
            ("USER", "agent"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let step = env_of(&[
            (
                "PATH",
                "/tmp/kici-ab12/bin:/opt/tool/bin:/usr/local/cargo/bin:/usr/bin:/bin",
            ),
            ("HOME", "/home/agent"),
            ("USER", "builder"),
            ("KICI_WORKSPACE", "/tmp/kici-ab12"),
            ("OUT", "/tmp/kici-ab12/out/x"),
            ("OTHER", "/tmp/kici-ab123"),
            ("KICI_ENV", "/tmp/kici-env-1/env"),
            ("LANG", "C.UTF-8"),
        ]);
        let env = exec_env(
            &step,
            &host_only,
            "/tmp/kici-ab12",
            "/bin",
            "/kici-handoff/s1",
        );
        assert_eq!(
            env,
            [
                "KICI_WORKSPACE=/workspace",
                "LANG=C.UTF-8",
                "OTHER=/tmp/kici-ab123",
                "OUT=/workspace/out/x",
                "PATH=/workspace/bin:/opt/tool/bin:/bin",
                "USER=builder",
                "KICI_ENV=/kici-handoff/s1/env",
                "KICI_PATH=/kici-handoff/s1/path",
                "KICI_OUTPUT=/kici-handoff/s1/output",
                "KICI_SECRET_OUTPUT=/kici-handoff/s1/secret_output",
            ]
        );
        let unchanged = env_of(&[("PATH", "/usr/local/cargo/bin:/usr/bin:/bin")]);
        let env = exec_env(&unchanged, &host_only, "/w", "/usr/bin:/bin", "/h");
        assert_eq!(env[0], "PATH=/usr/bin:/bin");
        let own = env_of(&[("PATH", "/only/mine")]);
        let env = exec_env(&own, &host_only, "/w", "/bin", "/h");
        assert_eq!(env[0], "PATH=/only/mine");
    }
}
