//! # kici-agent-core
//!
//! A KiCI CI agent as a library: the whole agent lifecycle (connect, authenticate, register,
//! heartbeat, dispatch, run steps, stream logs, report, reconnect) behind the [`Agent`] handle,
//! with pluggable step [`Executor`]s. The standalone binary, the C ABI and the Python package
//! are thin shells around this crate.
//!
//! ## Embedding in Rust
//!
//! Implement [`Executor`] for what your steps do, register it on the [`Agent`] before
//! [`Agent::start`] (for a step name, a job name, or as the default; see [`ExecutorRegistry`]
//! for which executor runs what), then start the agent. Everything a step prints goes through
//! its [`StepIo`], where secrets are masked before anything leaves the machine.
//!
//! ```no_run
//! use std::sync::Arc;
//! use kici_agent_core::{Agent, AgentConfig, Executor, JobContext, StepContext, StepIo, StepResult};
//!
//! struct Flash;
//!
//! #[async_trait::async_trait]
//! impl Executor for Flash {
//!     fn name(&self) -> &str {
//!         "flash"
//!     }
//!
//!     async fn run_step(&self, _job: &JobContext, step: &StepContext, io: StepIo) -> StepResult {
//!         io.line(format!("flashing for {}", step.name)).await;
//!         io.set_output("result", "ok".into()).await;
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = AgentConfig::builder("ws://127.0.0.1:4000/ws")
//!     .with_labels(["hil"])
//!     .build()?;
//! let agent = Agent::new(config)?;
//! agent.register_step_executor("flash-firmware", Arc::new(Flash))?;
//! agent.start()?; // runs in the background: drain(), shutdown(grace), wait(timeout)
//! agent.wait(None);
//! # Ok(()) }
//! ```
//!
//! [`AgentConfig::from_env`] reads the same `KICI_*` variables as the binary; every setting is
//! listed in [`config::SETTINGS`] and can be set by name with [`AgentConfigBuilder::set`].
//!
//! ## Embedding in C
//!
//! The `kici-agent-ffi` crate builds `libkici_agent` (`.so` and `.a`); its header is
//! `include/kici_agent.h` at the repository root, generated from the crate and documented there
//! (`kici_config_set`, `kici_agent_new`, `kici_executor_new` with a `kici_executor_vtable`,
//! `kici_agent_register_*_executor`, `kici_agent_start`, ...). Examples: `examples/c/`.
//!
//! ## Embedding in Python
//!
//! The `kici-agent-py` crate is the `kici_agent` package (`pip install ./kici-agent-py`):
//! `kici_agent.Agent(url, token=..., labels=[...])`, executors as decorated functions
//! (`@agent.step("name")`), `agent.run()`. Its README and `.pyi` stubs document it; example:
//! `examples/python/hardware_rig.py`.
//!
//! ## Cargo features
//!
//! All on by default; each can be left out by an embedder that does not want the dependency.
//!
//! | feature | what it brings | without it |
//! |---|---|---|
//! | `container` | container jobs (`jobConfig.container`, `KICI_EXECUTION_MODE=container`) through the Docker Engine API (bollard) | a job that needs a container fails with an error naming the feature (host executors registered for the job or all its steps still take it); container settings still parse; container execution mode stops start-up with the same reason |
//! | `git` | checking out a job's repository with libgit2 (git2, libssh2, OpenSSL), pinned SSH `known_hosts` | a job with a repository fails with an error naming the feature; `KICI_TLS_CA_FILE` still applies to the WebSocket |
//! | `http` | the `/health`, `/ready` and `/metrics` server (hyper), and downloading a TypeScript job's `depsUrl` tarball over `http(s)://` | the agent serves no endpoint: `KICI_PORT` / `KICI_BIND_ADDRESS` are accepted, a warning at start says nothing is served, [`Agent::http_addr`] is `None` ([`Agent::metrics_text`] still works); a `depsUrl` tarball over `http(s)://` is not used: the job's log says so and the dependencies are installed (pnpm / npm) as if none had come |
//!
//! ## What is public
//!
//! The items at the crate root are the API an embedder uses: the [`Agent`] handle and its
//! errors and events, the configuration, the executor trait and what it is handed, the
//! registry. Three modules are public as namespaces because nearly everything in them appears in
//! that API: [`config`] (every setting and its value types), [`protocol`] (the wire types: an
//! executor reads the job's [`protocol::JobConfig`] and steps, and [`local`] hands back the
//! [`protocol::Outbound`] messages a job produces) and [`local`] (running one job without an
//! orchestrator, `kici-agent exec`). Every other module is private, so the engine's internals
//! (outbox, process spawning, log pipeline, checkout, containers, ...) can change in any
//! release.
//!
//! The crate's own integration tests and benchmark need some internals; they reach them
//! through one `#[doc(hidden)]` module, `internals`, item by item, rather than through a cargo
//! feature: a feature would be unified into every build of the workspace that enables it and
//! needs a self dev-dependency to turn on for tests, while the hidden module costs nothing and
//! says at every use site that it is not API.
//!
//! `ARCHITECTURE.md` at the repository root maps the modules and follows one dispatch through
//! them.

mod agent;
mod agent_log;
mod bundle;
mod checkout;
pub mod config;
mod connection;
mod container;
mod containment;
mod deps;
mod events;
mod executor;
mod file_log;
mod host;
mod http;
mod instance;
mod job;
mod job_executor;
pub mod local;
mod logs;
mod metrics;
mod outbox;
mod process;
pub mod protocol;
mod routing;
mod sandbox;
mod scaler;
mod secret_outputs;
mod service_notify;
mod telemetry;
mod timeline;
mod tls;
mod typescript;
mod workspace;

pub use agent::{Agent, AgentError, AgentState, BUILD_COMMIT, VERSION};
pub use config::{AgentConfig, AgentConfigBuilder, ConfigError};
pub use connection::ConnectionState;
pub use events::Event;
pub use executor::{
    Executor, JobContext, ProcessExecutor, ShellExecutor, StepContext, StepFailure, StepIo,
    StepMapError, StepResult,
};
pub use process::StepEnv;
pub use routing::ExecutorRegistry;
pub use secret_outputs::{RunKeyError, SecretOutputError};

// In `AgentError::Container`: an agent whose container engine is unusable fails with it.
pub use container::ContainerError;

// What a standalone agent process adds around the `Agent` (the binary uses all of it).
pub use agent_log::{layer as agent_log_layer, AgentLogLayer};
pub use containment::become_child_subreaper;
pub use file_log::{FileLogError, FileLogSettings, RotatingFileLog};
pub use service_notify::{ServiceNotifier, ServiceNotifyError};

/// Not API: the internals the crate's own integration tests drive directly, item by item.
/// Anything here may change or go away in any release.
#[doc(hidden)]
pub mod internals {
    /// Cloning (`tests/ssh_clone.rs`, `tests/tls_git.rs`).
    pub mod checkout {
        pub use crate::checkout::{
            checkout, CheckoutError, CheckoutReport, CheckoutRequest, GitCredentials, HostKeyPolicy,
        };
    }

    /// The container executor against a real engine (`tests/container.rs`).
    #[cfg(feature = "container")]
    pub mod container {
        pub use crate::container::{
            ContainerError, ContainerExecutor, ContainerSettings, PullPolicy, JOB_ID_LABEL,
            SANDBOX_LABEL,
        };
    }

    /// Secret masking, line splitting and the step log (`tests/masking.rs`,
    /// `benches/log_pipeline.rs`).
    pub mod logs {
        pub use crate::logs::{LineSplitter, SecretMasker, StepLog, MASK, MAX_LINE_BYTES};
    }
}
