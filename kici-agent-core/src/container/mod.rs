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
//!
//! Where it lives: this file holds the settings and errors; `image` which image a job runs in
//! and the pull policy; `engine` the engine address (`DOCKER_HOST`), connection and shared
//! engine calls; `pull` getting the image; `job_container` the job's container (create, start,
//! sweep); `exec` one step as one exec (environment, hand-off files, stopping);
//! `executor` the [`ContainerExecutor`] and its [`Executor`](crate::executor::Executor) face;
//! `unavailable` the executor of a build without the feature (below).
//!
//! # Cargo feature `container`
//!
//! On by default; it brings in the engine client (bollard). Without it the settings, the pull
//! policy and [`image_for`] stay (configuration such as `KICI_CONTAINER_IMAGE` or
//! `KICI_EXECUTION_MODE=container` still parses, so one configuration serves every build), but
//! [`ContainerExecutor::new`] fails with an error naming the feature. The agent then has no
//! container executor: a job that names an image (or gets the default image in container
//! execution mode) fails with that reason unless host executors registered for the job or its
//! steps take every step (see [`crate::routing`]), and container execution mode stops start-up.

#[cfg(feature = "container")]
mod engine;
#[cfg(feature = "container")]
mod exec;
#[cfg(feature = "container")]
mod executor;
mod image;
#[cfg(feature = "container")]
mod job_container;
#[cfg(feature = "container")]
mod pull;
#[cfg(not(feature = "container"))]
mod unavailable;

use std::time::Duration;

#[cfg(feature = "container")]
pub use executor::ContainerExecutor;
pub use image::{image_for, PullPolicy};
#[cfg(feature = "container")]
pub use job_container::{JOB_ID_LABEL, SANDBOX_LABEL};
#[cfg(not(feature = "container"))]
pub use unavailable::ContainerExecutor;

/// Why the agent has no container executor, as a job that needs one is told.
#[cfg(feature = "container")]
pub(crate) const NO_EXECUTOR: &str = "this agent has no container engine (DOCKER_HOST)";
/// Why the agent has no container executor, as a job that needs one is told.
#[cfg(not(feature = "container"))]
pub(crate) const NO_EXECUTOR: &str = NOT_BUILT;

/// What a build without the `container` feature says about container jobs.
#[cfg(not(feature = "container"))]
const NOT_BUILT: &str = "this build of kici-agent-core has no container support (it was compiled without the cargo feature `container`)";

/// Where the engine listens when `DOCKER_HOST` is unset.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// How the container executor reaches the engine and runs jobs.
#[derive(Debug, Clone)]
// Without the feature the settings are still parsed and carried (one configuration works for
// every build), but nothing reads them.
#[cfg_attr(not(feature = "container"), allow(dead_code))]
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

/// Why the container executor could not do something. The variants depend on the cargo feature
/// `container` (the engine errors with it, `NotBuilt` without), hence `non_exhaustive`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContainerError {
    /// This build has no container support (cargo feature `container` off).
    #[cfg(not(feature = "container"))]
    #[error("{}", NOT_BUILT)]
    NotBuilt,
    /// `DOCKER_HOST` names something this executor cannot use.
    #[error("container engine address {host:?} is not supported: {reason}")]
    UnsupportedHost { host: String, reason: &'static str },
    /// No engine answers at the address.
    #[cfg(feature = "container")]
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
    #[cfg(feature = "container")]
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

#[cfg(feature = "container")]
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
