//! # kici-agent-core
//!
//! A KiCI CI agent as a library: the whole agent lifecycle (connect, authenticate, register,
//! heartbeat, dispatch, run steps, stream logs, report, reconnect) behind the [`Agent`] handle,
//! with pluggable step [`Executor`]s.
//!
//! ```no_run
//! use kici_agent_core::{Agent, AgentConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = AgentConfig::builder("ws://127.0.0.1:4000/ws").build()?;
//! let agent = Agent::new(config)?;
//! agent.start()?;
//! agent.wait(None);
//! # Ok(()) }
//! ```
//!
//! `ARCHITECTURE.md` at the repository root maps the modules and follows one dispatch through
//! them.

pub mod agent;
pub mod agent_log;
pub mod bundle;
pub mod checkout;
pub mod config;
pub mod connection;
pub mod container;
pub mod containment;
pub mod deps;
pub mod events;
pub mod executor;
pub mod file_log;
pub mod host;
pub mod http;
mod instance;
pub mod job;
pub mod job_executor;
pub mod local;
pub mod logs;
pub mod metrics;
pub mod outbox;
pub mod process;
pub mod protocol;
pub mod routing;
mod sandbox;
mod scaler;
pub mod secret_outputs;
pub mod service_notify;
pub mod telemetry;
pub mod timeline;
mod tls;
pub mod typescript;
pub mod workspace;

pub use agent::{Agent, AgentError, AgentState, BUILD_COMMIT, VERSION};
pub use config::{AgentConfig, ConfigError};
pub use connection::ConnectionState;
pub use containment::become_child_subreaper;
pub use events::Event;
pub use executor::{
    Executor, JobContext, ProcessExecutor, ShellExecutor, StepContext, StepFailure, StepIo,
    StepResult,
};
pub use routing::ExecutorRegistry;
