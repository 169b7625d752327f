//! Agent configuration.
//!
//! [`AgentConfig`] holds every setting of the agent. Embedders (the C and Python hosts) build it in
//! code with [`AgentConfig::builder`]; the stand-alone binary loads it from `KICI_*` environment
//! variables with [`AgentConfig::from_env`], following the Node agent's rules (agent spec §2, §3).
//! Both paths share one validation ([`AgentConfig::validate`]).
//!
//! Every setting is an entry of [`SETTINGS`] (its variable, key, default, kind and
//! documentation); [`AgentConfigBuilder::set`] sets any of them by name, and the environment
//! loader is that setter applied to each variable, then validation.
//!
//! The code is in rooms of one concept each: `values` (the value types: enums with exact
//! spellings, properties, secrets, rate limits), `settings` (the table), `builder` (defaults,
//! typed setters, setting by name, `build`), `env` (the process environment and the unknown
//! variable check), `validate` (the checks both paths share) and `labels` (the wire labels).
//!
//! Deliberate divergences from the Node agent, all documented on the variables in [`SETTINGS`]:
//! * an empty value of a numeric or enum variable means "unset" (the reference coerces `""` to 0);
//! * an empty `KICI_AGENT_ID`, `KICI_AGENT_TOKEN` or `KICI_GITHUB_TOKEN` means "unset";
//! * `KICI_ROLES` unset means **no** roles, and requesting any role is an error: this agent cannot
//!   run KiCI's TypeScript builder/init jobs, and advertising the roles would make the orchestrator
//!   route them here;
//! * `KICI_MAX_CONCURRENT_JOBS` is known (a scaler may set it) and feeds `max_concurrency` when
//!   `KICI_MAX_CONCURRENCY` is unset;
//! * `KICI_TLS_CA_FILE` is this agent's own; when it is unset, `NODE_EXTRA_CA_CERTS` (which the
//!   Node runtime honours for the Node agent) takes its place, and like Node an unreadable file
//!   only warns.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::connection::ReconnectPolicy;
pub use builder::AgentConfigBuilder;
pub use env::{FromEnv, UnknownVariable, ALLOWED_PREFIXES};
pub use settings::{Setting, SettingKind, SettingValue, SETTINGS};
pub use values::{
    BackpressureMode, ExecutionMode, LogFormat, LogLevel, ParseEnumError, PropertyValue,
    RateLimits, Role, SandboxNetwork, Secret,
};

mod builder;
mod env;
mod labels;
mod settings;
#[cfg(test)]
mod testing;
mod validate;
mod values;

/// Names of the environment variables, shared by [`SETTINGS`] and the checks.
mod var {
    pub const ORCHESTRATOR_URL: &str = "KICI_ORCHESTRATOR_URL";
    pub const AGENT_ID: &str = "KICI_AGENT_ID";
    pub const LABELS: &str = "KICI_LABELS";
    pub const PROPERTIES: &str = "KICI_PROPERTIES";
    pub const ROLES: &str = "KICI_ROLES";
    pub const PORT: &str = "KICI_PORT";
    pub const BIND_ADDRESS: &str = "KICI_BIND_ADDRESS";
    pub const LOG_LEVEL: &str = "KICI_LOG_LEVEL";
    pub const LOG_FORMAT: &str = "KICI_LOG_FORMAT";
    pub const LOG_DIR: &str = "KICI_LOG_DIR";
    pub const LOG_MAX_SIZE: &str = "KICI_LOG_MAX_SIZE";
    pub const LOG_RETENTION_DAYS: &str = "KICI_LOG_RETENTION_DAYS";
    pub const CLUSTER_INSTANCE_ID: &str = "KICI_CLUSTER_INSTANCE_ID";
    pub const PLATFORM_INSTANCE_ID: &str = "KICI_PLATFORM_INSTANCE_ID";
    pub const AGENT_TOKEN: &str = "KICI_AGENT_TOKEN";
    pub const GITHUB_TOKEN: &str = "KICI_GITHUB_TOKEN";
    pub const MAX_LOG_SIZE_BYTES: &str = "KICI_MAX_LOG_SIZE_BYTES";
    pub const DEFAULT_STEP_TIMEOUT_MS: &str = "KICI_DEFAULT_STEP_TIMEOUT_MS";
    pub const DOCKER_KEEP_FAILED: &str = "KICI_DOCKER_KEEP_FAILED";
    pub const JOB_HEARTBEAT_INTERVAL_MS: &str = "KICI_JOB_HEARTBEAT_INTERVAL_MS";
    pub const HEARTBEAT_INTERVAL_MS: &str = "KICI_HEARTBEAT_INTERVAL_MS";
    pub const BACKPRESSURE_MODE: &str = "KICI_BACKPRESSURE_MODE";
    pub const SANDBOX: &str = "KICI_SANDBOX";
    pub const SANDBOX_NETWORK: &str = "KICI_SANDBOX_NETWORK";
    pub const SCALER_MANAGED: &str = "KICI_SCALER_MANAGED";
    pub const SCALER_IDLE_TIMEOUT: &str = "KICI_SCALER_IDLE_TIMEOUT";
    pub const SCALER_PENDING_DISPATCH_TIMEOUT: &str = "KICI_SCALER_PENDING_DISPATCH_TIMEOUT";
    pub const EXECUTION_MODE: &str = "KICI_EXECUTION_MODE";
    pub const CONCURRENCY_WAIT_TIMEOUT_MS: &str = "KICI_CONCURRENCY_WAIT_TIMEOUT_MS";
    pub const AGENT_IS_ORCHESTRATOR_HOST: &str = "KICI_AGENT_IS_ORCHESTRATOR_HOST";
    pub const MAX_CONCURRENCY: &str = "KICI_MAX_CONCURRENCY";
    pub const MAX_CONCURRENT_JOBS: &str = "KICI_MAX_CONCURRENT_JOBS";
    pub const CANCEL_GRACE_MS: &str = "KICI_CANCEL_GRACE_MS";
    pub const SHUTDOWN_GRACE_MS: &str = "KICI_SHUTDOWN_GRACE_MS";
    pub const JOB_PIDS_MAX: &str = "KICI_JOB_PIDS_MAX";
    pub const STEP_MAP: &str = "KICI_STEP_MAP";
    pub const PROCESS_EXECUTOR: &str = "KICI_PROCESS_EXECUTOR";
    pub const NODE: &str = "KICI_NODE";
    pub const CONTAINER_IMAGE: &str = "KICI_CONTAINER_IMAGE";
    pub const DEV: &str = "KICI_DEV";
    pub const CACHE: &str = "KICI_CACHE";
    pub const RATE_MSGS_PER_SEC: &str = "KICI_RATE_MSGS_PER_SEC";
    pub const RATE_MSG_BURST: &str = "KICI_RATE_MSG_BURST";
    pub const RATE_BYTES_PER_SEC: &str = "KICI_RATE_BYTES_PER_SEC";
    pub const RATE_BYTE_BURST: &str = "KICI_RATE_BYTE_BURST";
    pub const TLS_CA_FILE: &str = "KICI_TLS_CA_FILE";
    /// Node's own extra-CA variable, honoured for operators coming from the Node agent.
    pub const NODE_EXTRA_CA_CERTS: &str = "NODE_EXTRA_CA_CERTS";
}

/// Every setting of the agent. Build it with [`AgentConfig::builder`] or load it with
/// [`AgentConfig::from_env`]; the environment variable named on each field is its env source.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Orchestrator WebSocket URL, `ws://` or `wss://` (`KICI_ORCHESTRATOR_URL`, required).
    pub orchestrator_url: String,
    /// Agent id (`KICI_AGENT_ID`); generated as `<hostname>-<8 hex>` when not given.
    pub agent_id: String,
    /// User labels, verbatim (`KICI_LABELS`). `kici:*` only when `scaler_managed`.
    pub labels: Vec<String>,
    /// Host properties in first-seen key order, keys unique (`KICI_PROPERTIES`).
    pub properties: Vec<(String, PropertyValue)>,
    /// Internal job roles (`KICI_ROLES`); must stay empty, see [`ConfigError::UnsupportedRole`].
    pub roles: Vec<Role>,
    /// HTTP port (`KICI_PORT`, 8080); 0 = ephemeral.
    pub port: u16,
    /// HTTP bind address (`KICI_BIND_ADDRESS`, `::`).
    pub bind_address: IpAddr,
    /// Agent log level (`KICI_LOG_LEVEL`, info).
    pub log_level: LogLevel,
    /// Agent log format (`KICI_LOG_FORMAT`, auto).
    pub log_format: LogFormat,
    /// Directory of the rotated JSON file log (`KICI_LOG_DIR`; `undefined` = unset); `None` = no
    /// file log. See [`crate::FileLogSettings`].
    pub log_dir: Option<PathBuf>,
    /// Size cap per log file in bytes (`KICI_LOG_MAX_SIZE`, 500m).
    pub log_max_size: u64,
    /// Days of log files kept (`KICI_LOG_RETENTION_DAYS`, 7, >= 1).
    pub log_retention_days: u32,
    /// Log-file name suffix, sanitized: `KICI_CLUSTER_INSTANCE_ID`, else a *set* `KICI_AGENT_ID`
    /// (a generated id is never used); `None` = `agent-YYYY-MM-DD.log`.
    pub log_file_suffix: Option<String>,
    /// Agent token (`KICI_AGENT_TOKEN`): `Some` = token auth, `None` = unauthenticated.
    pub token: Option<Secret>,
    /// Fallback HTTPS clone token (`KICI_GITHUB_TOKEN`).
    pub github_token: Option<Secret>,
    /// Per-step log cap in bytes (`KICI_MAX_LOG_SIZE_BYTES`, 10 MiB).
    pub max_log_size_bytes: u64,
    /// Step timeout when the workflow sets none (`KICI_DEFAULT_STEP_TIMEOUT_MS`, 30 min).
    pub default_step_timeout: Duration,
    /// Keep containers of unsuccessful jobs (`KICI_DOCKER_KEEP_FAILED`).
    pub docker_keep_failed: bool,
    /// Period of `job.heartbeat` (`KICI_JOB_HEARTBEAT_INTERVAL_MS`, 60 s).
    pub job_heartbeat_interval: Duration,
    /// Period of the connection `heartbeat` (`KICI_HEARTBEAT_INTERVAL_MS`, 30 s).
    pub heartbeat_interval: Duration,
    /// Log-streaming backpressure policy (`KICI_BACKPRESSURE_MODE`, pause).
    pub backpressure_mode: BackpressureMode,
    /// Bare-metal steps run inside a bubblewrap sandbox (`KICI_SANDBOX`); `Agent::start` fails
    /// when `bwrap` is missing or cannot make the namespaces.
    pub sandbox: bool,
    /// Network of the bubblewrap sandbox (`KICI_SANDBOX_NETWORK`, isolated).
    pub sandbox_network: SandboxNetwork,
    /// Ephemeral agent owned by the auto-scaler (`KICI_SCALER_MANAGED=1`).
    pub scaler_managed: bool,
    /// Scaler-managed idle self-shutdown delay (`KICI_SCALER_IDLE_TIMEOUT`, 5 s; zero = at once).
    pub scaler_idle_timeout: Duration,
    /// Wait for a pre-bound job (`KICI_SCALER_PENDING_DISPATCH_TIMEOUT`, 60 s).
    pub scaler_pending_dispatch_timeout: Duration,
    /// Forced execution backend (`KICI_EXECUTION_MODE`); `None` = automatic.
    pub execution_mode: Option<ExecutionMode>,
    /// Max wait for a concurrency-group `proceed` (`KICI_CONCURRENCY_WAIT_TIMEOUT_MS`, 1 h, >= 1 s).
    pub concurrency_wait_timeout: Duration,
    /// This host runs the orchestrator: refuse reboots (`KICI_AGENT_IS_ORCHESTRATOR_HOST`).
    pub is_orchestrator_host: bool,
    /// Jobs run at the same time, >= 1 (`KICI_MAX_CONCURRENCY`, else `KICI_MAX_CONCURRENT_JOBS`, 1).
    pub max_concurrency: u32,
    /// Longest graceful cancel before force (`KICI_CANCEL_GRACE_MS`, 30 s).
    pub cancel_grace: Duration,
    /// Graceful shutdown wait for the running job (`KICI_SHUTDOWN_GRACE_MS`, 10 s).
    pub shutdown_grace: Duration,
    /// Most processes a job may have at once, through its pids cgroup where one can be made
    /// (`KICI_JOB_PIDS_MAX`); 0 = no limit.
    pub job_pids_max: u64,
    /// Step-name -> shell-command map for the shell executor (`KICI_STEP_MAP`); must be readable.
    pub step_map_file: Option<PathBuf>,
    /// Program that runs every step (`KICI_PROCESS_EXECUTOR`).
    pub process_executor: Option<String>,
    /// Node.js for TypeScript jobs (`KICI_NODE`); `None`: `node` on PATH.
    pub node: Option<PathBuf>,
    /// Image for jobs that name none (`KICI_CONTAINER_IMAGE`).
    pub default_container_image: Option<String>,
    /// Development mode (`KICI_DEV=true`).
    pub dev: bool,
    /// Outbound throttle (`KICI_RATE_*`).
    pub rate_limits: RateLimits,
    /// Spacing of reconnect attempts; code only (the defaults are the reference agent's).
    pub reconnect: ReconnectPolicy,
    /// Times after a job's first `job.status running` at which it is sent again while the job
    /// runs, so that an ack deadline the orchestrator arms late is still resolved (README,
    /// "Orchestrator quirks"); code only. Default 0.5 s, 2 s, 8 s; empty: never.
    pub running_resends: Vec<Duration>,
    /// PEM file of extra CA certificates trusted for `wss://` and git HTTPS clones, on top of the
    /// platform's roots (`KICI_TLS_CA_FILE`; when unset, a readable `NODE_EXTRA_CA_CERTS`). Must
    /// hold at least one certificate. git's copy is process-wide, see the README.
    pub tls_ca_file: Option<PathBuf>,
    /// Host name for the agent id and the `kici:host:` label; detected, overridable in code.
    pub hostname: String,
}

/// One invalid setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The setting, named by its environment variable (or `hostname`, which has none).
    pub setting: String,
    /// What is wrong; never contains a secret.
    pub message: String,
}

impl ConfigIssue {
    fn new(setting: &str, message: impl Into<String>) -> Self {
        Self {
            setting: setting.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

/// Why a configuration was refused. Checked in this order; the first failing stage is reported.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Settings with invalid values, all of them.
    #[error("Configuration validation failed:{}", bullet_list(.0))]
    Invalid(Vec<ConfigIssue>),
    /// Roles were requested; this agent cannot run KiCI's TypeScript builder/init jobs.
    #[error(
        "KICI_ROLES: this agent cannot serve role {}: KiCI TypeScript builder/init jobs need the \
         Node agent; leave KICI_ROLES unset or empty",
        roles.iter().map(|role| role.as_str()).collect::<Vec<_>>().join(", ")
    )]
    UnsupportedRole {
        /// The requested roles.
        roles: Vec<Role>,
    },
    /// User labels using the reserved `kici:` prefix without `KICI_SCALER_MANAGED=1`.
    #[error(
        "KICI_LABELS: labels starting with the reserved prefix \"kici:\" (any case) are set by \
         the agent, the token or the scaler, not by the user: {}",
        labels.join(", ")
    )]
    ReservedLabels {
        /// The offending labels.
        labels: Vec<String>,
    },
    /// A setting set by a name that is neither a variable nor a key of [`SETTINGS`].
    #[error(
        "unknown setting {name:?}{}",
        suggestion.map(|known| format!(": did you mean {known}?")).unwrap_or_default()
    )]
    UnknownSetting {
        /// The name as given.
        name: String,
        /// The closest known variable, when close enough to be a typo.
        suggestion: Option<&'static str>,
    },
    /// `KICI_*` variables the agent does not know (usually typos).
    #[error(
        "Unknown KICI_* environment variable(s), the agent refuses to start (set KICI_DEV=true \
         to downgrade this check to a warning):{}",
        bullet_list(variables)
    )]
    UnknownVariables {
        /// Every offender, sorted by name.
        variables: Vec<UnknownVariable>,
    },
}

fn bullet_list<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(|item| format!("\n  - {item}")).collect()
}
