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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

pub use crate::connection::ReconnectPolicy;
pub use settings::{Setting, SettingKind, SettingValue, SETTINGS};

mod settings;

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

/// `KICI_*` name prefixes that are always accepted (test harnesses, step environment pass-through).
pub const ALLOWED_PREFIXES: &[&str] = &["KICI_E2E_", "KICI_AGENT_ENV_"];

const DEFAULT_PORT: u16 = 8080;
const DEFAULT_MAX_LOG_SIZE_BYTES: u64 = 10 * 1024 * 1024;
const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const DEFAULT_JOB_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// With the orchestrator's 10 s default deadline these resolve it for any ack-timeout lookup
/// shorter than 8 s; with its 1 s minimum, for lookups under 0.5 s or between 1 and 2 s.
const DEFAULT_RUNNING_RESENDS: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(8),
];
const DEFAULT_SCALER_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_SCALER_PENDING_DISPATCH_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_CONCURRENCY_WAIT_TIMEOUT: Duration = Duration::from_secs(60 * 60);
const MIN_CONCURRENCY_WAIT_TIMEOUT: Duration = Duration::from_millis(1000);
/// The orchestrator drops an agent that sent no heartbeat for this long.
const ORCHESTRATOR_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(180);
const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const RESERVED_LABEL_PREFIX: &str = "kici:";
/// Used when the OS will not tell us its host name.
const FALLBACK_HOSTNAME: &str = "localhost";

/// The error of parsing one of the configuration enums from its text form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected one of {}, got {got:?}", expected.join(", "))]
pub struct ParseEnumError {
    /// Every accepted spelling.
    pub expected: &'static [&'static str],
    /// The rejected text.
    pub got: String,
}

/// Declares a configuration enum whose values have exact, case-sensitive spellings.
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every accepted spelling, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The exact spelling used in configuration and on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text ),+
                }
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;

            fn from_str(text: &str) -> Result<Self, ParseEnumError> {
                match text {
                    $( $text => Ok(Self::$variant), )+
                    _ => Err(ParseEnumError { expected: Self::NAMES, got: text.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

config_enum! {
    /// Minimum level of the agent's own log (`KICI_LOG_LEVEL`).
    #[derive(Default)]
    LogLevel {
        /// Everything, including protocol traces.
        Debug => "debug",
        /// Normal operation (default).
        #[default]
        Info => "info",
        /// Problems the agent recovers from.
        Warn => "warn",
        /// Failures only.
        Error => "error",
    }
}

impl From<LogLevel> for tracing::Level {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Error => tracing::Level::ERROR,
        }
    }
}

config_enum! {
    /// Format of the agent's own log (`KICI_LOG_FORMAT`).
    #[derive(Default)]
    LogFormat {
        /// JSON when stdout is not a terminal, plain text on a terminal (default).
        #[default]
        Auto => "auto",
        /// Human-readable text.
        Plain => "plain",
        /// One JSON object per line.
        Json => "json",
    }
}

config_enum! {
    /// What log streaming does when the outbound budget is exhausted (`KICI_BACKPRESSURE_MODE`).
    #[derive(Default)]
    BackpressureMode {
        /// Slow the producing step down until the budget recovers (default).
        #[default]
        Pause => "pause",
        /// Discard log lines that do not fit.
        Drop => "drop",
    }
}

config_enum! {
    /// Network of the bubblewrap sandbox (`KICI_SANDBOX_NETWORK`).
    #[derive(Default)]
    SandboxNetwork {
        /// No network inside the sandbox (default).
        #[default]
        Isolated => "isolated",
        /// The host's network.
        Host => "host",
    }
}

config_enum! {
    /// Forced execution backend (`KICI_EXECUTION_MODE`).
    ExecutionMode {
        /// Docker or Podman containers.
        Container => "container",
        /// Directly on the host.
        BareMetal => "bare-metal",
        /// Firecracker micro-VMs.
        Firecracker => "firecracker",
    }
}

config_enum! {
    /// An internal job role (`KICI_ROLES`). This agent serves none of them; the type exists so a
    /// future executor plugin can.
    Role {
        /// Dependency/source cache build jobs (`__build__`).
        Builder => "builder",
        /// Dynamic init / job-function evaluation jobs (`__init__`, `__dynamic__`).
        InitRunner => "init-runner",
    }
}

impl Role {
    /// The label advertising this role at registration (`kici:role:<role>`).
    pub fn label(self) -> String {
        format!("kici:role:{}", self.as_str())
    }
}

/// A typed host property sent at registration; serializes as a bare JSON boolean, number or string.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// Exactly `true` or `false`.
    Bool(bool),
    /// A decimal number (`-?digits(.digits)?`).
    Number(serde_json::Number),
    /// Anything else, verbatim.
    Text(String),
}

impl PropertyValue {
    /// Types a raw `KICI_PROPERTIES` value: `true`/`false` -> boolean, `-?\d+(\.\d+)?` -> number,
    /// anything else (`1.2.3`, `08x`, `""`) -> text.
    pub fn parse(raw: &str) -> Self {
        match raw {
            "true" => Self::Bool(true),
            "false" => Self::Bool(false),
            _ => decimal_number(raw).map_or_else(|| Self::Text(raw.to_owned()), Self::Number),
        }
    }
}

/// Parses `-?\d+(\.\d+)?` into a JSON number the way JavaScript's `Number()` would value it.
fn decimal_number(raw: &str) -> Option<serde_json::Number> {
    let unsigned = raw.strip_prefix('-').unwrap_or(raw);
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (unsigned, None),
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !fraction.map_or(true, all_digits) {
        return None;
    }
    if fraction.is_none() {
        if let Ok(integer) = raw.parse::<i64>() {
            return Some(integer.into());
        }
    }
    let float: f64 = raw.parse().ok()?;
    // JavaScript has one number type: `1.0` is the integer 1 on the wire.
    const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53
    if float.fract() == 0.0 && float.abs() < EXACT_INTEGER_LIMIT {
        return Some((float as i64).into());
    }
    serde_json::Number::from_f64(float)
}

/// A credential. `Debug` and `Display` never show the value: a KiCI agent token prints as
/// `kat_***`, anything else as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.starts_with("kat_") {
            f.write_str("kat_***")
        } else {
            f.write_str("***")
        }
    }
}

/// Client-side token buckets for outbound messages, kept below the orchestrator's inbound limits
/// (100 msg/s burst 200; 512000 B/s burst 2 MiB) so that nothing is dropped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// Message refill rate per second (`KICI_RATE_MSGS_PER_SEC`).
    pub msgs_per_sec: f64,
    /// Message bucket size (`KICI_RATE_MSG_BURST`).
    pub msg_burst: f64,
    /// Byte refill rate per second (`KICI_RATE_BYTES_PER_SEC`).
    pub bytes_per_sec: f64,
    /// Byte bucket size (`KICI_RATE_BYTE_BURST`).
    pub byte_burst: f64,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            msgs_per_sec: 80.0,
            msg_burst: 150.0,
            bytes_per_sec: 450_000.0,
            byte_burst: 1_500_000.0,
        }
    }
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

/// A configuration loaded from the environment, with the warnings to log once logging is up.
#[derive(Debug, Clone)]
pub struct FromEnv {
    /// The validated configuration.
    pub config: AgentConfig,
    /// Non-fatal findings (unknown variables under `KICI_DEV=true`, an ignored
    /// `KICI_MAX_CONCURRENT_JOBS` or `NODE_EXTRA_CA_CERTS`).
    pub warnings: Vec<String>,
}

impl FromEnv {
    fn new((builder, config): (AgentConfigBuilder, AgentConfig)) -> Self {
        Self {
            config,
            warnings: builder.warnings,
        }
    }
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

/// An unknown `KICI_*` variable, with the known name it most likely misspells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVariable {
    /// The variable as found in the environment.
    pub name: String,
    /// The closest known variable, when close enough to be a typo.
    pub suggestion: Option<&'static str>,
}

impl fmt::Display for UnknownVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.suggestion {
            Some(known) => write!(f, "{}: did you mean {known}?", self.name),
            None => write!(f, "{}: no close match", self.name),
        }
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

impl AgentConfig {
    /// A builder with every default, for the given orchestrator URL.
    pub fn builder(orchestrator_url: impl Into<String>) -> AgentConfigBuilder {
        AgentConfigBuilder {
            agent_id: None,
            cluster_instance_id: None,
            scaler_job_count: None,
            explicit: BTreeSet::new(),
            warnings: Vec::new(),
            config: AgentConfig {
                orchestrator_url: orchestrator_url.into(),
                agent_id: String::new(),
                labels: Vec::new(),
                properties: Vec::new(),
                roles: Vec::new(),
                port: DEFAULT_PORT,
                bind_address: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                log_level: LogLevel::default(),
                log_format: LogFormat::default(),
                log_dir: None,
                log_max_size: crate::file_log::DEFAULT_MAX_FILE_BYTES,
                log_retention_days: crate::file_log::DEFAULT_RETENTION_DAYS,
                log_file_suffix: None,
                token: None,
                github_token: None,
                max_log_size_bytes: DEFAULT_MAX_LOG_SIZE_BYTES,
                default_step_timeout: DEFAULT_STEP_TIMEOUT,
                docker_keep_failed: false,
                job_heartbeat_interval: DEFAULT_JOB_HEARTBEAT_INTERVAL,
                heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
                backpressure_mode: BackpressureMode::default(),
                sandbox: false,
                sandbox_network: SandboxNetwork::default(),
                scaler_managed: false,
                scaler_idle_timeout: DEFAULT_SCALER_IDLE_TIMEOUT,
                scaler_pending_dispatch_timeout: DEFAULT_SCALER_PENDING_DISPATCH_TIMEOUT,
                execution_mode: None,
                concurrency_wait_timeout: DEFAULT_CONCURRENCY_WAIT_TIMEOUT,
                is_orchestrator_host: false,
                max_concurrency: 1,
                cancel_grace: DEFAULT_CANCEL_GRACE,
                shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
                job_pids_max: 0,
                step_map_file: None,
                process_executor: None,
                node: None,
                default_container_image: None,
                dev: false,
                rate_limits: RateLimits::default(),
                reconnect: ReconnectPolicy::default(),
                running_resends: DEFAULT_RUNNING_RESENDS.to_vec(),
                tls_ca_file: None,
                hostname: detect_hostname(),
            },
        }
    }

    /// Loads and validates the configuration from the process environment (spec §2).
    pub fn from_env() -> Result<FromEnv, ConfigError> {
        let (vars, issues) = environment();
        load(&vars, issues).map(FromEnv::new)
    }

    /// Loads and validates a configuration from the given variables, exactly like
    /// [`AgentConfig::from_env`] (a later duplicate name wins).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<FromEnv, ConfigError> {
        load(&vars.into_iter().collect(), Vec::new()).map(FromEnv::new)
    }

    /// Checks every setting: invalid values (all reported together), then roles, then reserved
    /// labels.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_after(Vec::new())
    }

    /// [`AgentConfig::validate`], reporting `issues` found earlier (while parsing) first.
    fn validate_after(&self, mut issues: Vec<ConfigIssue>) -> Result<(), ConfigError> {
        self.collect_value_issues(&mut issues);
        if !issues.is_empty() {
            return Err(ConfigError::Invalid(issues));
        }
        if !self.roles.is_empty() {
            return Err(ConfigError::UnsupportedRole {
                roles: self.roles.clone(),
            });
        }
        // The scaler writes kici:agent:*, kici:scaler:* and kici:role:* labels itself.
        if !self.scaler_managed {
            let reserved: Vec<String> = self
                .labels
                .iter()
                .filter(|label| label.to_lowercase().starts_with(RESERVED_LABEL_PREFIX))
                .cloned()
                .collect();
            if !reserved.is_empty() {
                return Err(ConfigError::ReservedLabels { labels: reserved });
            }
        }
        Ok(())
    }

    fn collect_value_issues(&self, issues: &mut Vec<ConfigIssue>) {
        let mut issue = |setting: &str, message: String| {
            issues.push(ConfigIssue::new(setting, message));
        };
        if let Err(message) = check_orchestrator_url(&self.orchestrator_url) {
            issue(var::ORCHESTRATOR_URL, message);
        }
        // Longer than any real grace, and small enough that `Instant + duration` cannot overflow.
        const MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
        for (setting, value) in [
            (var::CANCEL_GRACE_MS, self.cancel_grace),
            (var::SHUTDOWN_GRACE_MS, self.shutdown_grace),
            (var::DEFAULT_STEP_TIMEOUT_MS, self.default_step_timeout),
            (var::JOB_HEARTBEAT_INTERVAL_MS, self.job_heartbeat_interval),
            (var::HEARTBEAT_INTERVAL_MS, self.heartbeat_interval),
            (var::SCALER_IDLE_TIMEOUT, self.scaler_idle_timeout),
            (
                var::SCALER_PENDING_DISPATCH_TIMEOUT,
                self.scaler_pending_dispatch_timeout,
            ),
            (
                var::CONCURRENCY_WAIT_TIMEOUT_MS,
                self.concurrency_wait_timeout,
            ),
        ] {
            if value > MAX_GRACE {
                issue(setting, "must be at most 7 days".into());
            }
        }
        if self.agent_id.is_empty() {
            issue(var::AGENT_ID, "must not be empty".into());
        }
        if self.log_max_size == 0 {
            issue(var::LOG_MAX_SIZE, "must be greater than 0".into());
        }
        if self.log_retention_days == 0 {
            issue(var::LOG_RETENTION_DAYS, "must be at least 1 day".into());
        }
        if self.labels.iter().any(String::is_empty) {
            issue(var::LABELS, "labels must not be empty".into());
        }
        let mut keys = std::collections::BTreeSet::new();
        for (key, _) in &self.properties {
            if key.is_empty() {
                issue(var::PROPERTIES, "property keys must not be empty".into());
            } else if !keys.insert(key.as_str()) {
                issue(var::PROPERTIES, format!("duplicate property key {key:?}"));
            }
        }
        for (name, secret) in [
            (var::AGENT_TOKEN, &self.token),
            (var::GITHUB_TOKEN, &self.github_token),
        ] {
            if secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                issue(name, "must not be empty (leave it unset instead)".into());
            }
        }
        for (name, interval) in [
            (var::DEFAULT_STEP_TIMEOUT_MS, self.default_step_timeout),
            (var::JOB_HEARTBEAT_INTERVAL_MS, self.job_heartbeat_interval),
            (var::HEARTBEAT_INTERVAL_MS, self.heartbeat_interval),
        ] {
            if interval.is_zero() {
                issue(name, "must be greater than 0".into());
            }
        }
        if self.heartbeat_interval >= ORCHESTRATOR_HEARTBEAT_TIMEOUT {
            issue(
                var::HEARTBEAT_INTERVAL_MS,
                format!(
                    "must be below 180000 ms: the orchestrator drops an agent that sends no heartbeat for 180 s, got {} ms",
                    self.heartbeat_interval.as_millis()
                ),
            );
        }
        if self.max_log_size_bytes == 0 {
            // Refused rather than read as "no log": a step whose output is all lost is more
            // likely a mistake than a wish, and the orchestrator expects log lines.
            issue(
                var::MAX_LOG_SIZE_BYTES,
                "must be greater than 0: 0 would cut every step's log at its first line (a step log cannot be switched off)".into(),
            );
        }
        if self.concurrency_wait_timeout < MIN_CONCURRENCY_WAIT_TIMEOUT {
            issue(
                var::CONCURRENCY_WAIT_TIMEOUT_MS,
                format!(
                    "must be at least 1000 ms, got {} ms",
                    self.concurrency_wait_timeout.as_millis()
                ),
            );
        }
        if self.max_concurrency == 0 {
            issue(var::MAX_CONCURRENCY, "must be at least 1".into());
        }
        if let Some(path) = &self.step_map_file {
            if let Err(message) = check_readable_file(path) {
                issue(var::STEP_MAP, message);
            }
        }
        if let Some(path) = &self.tls_ca_file {
            if let Err(message) = crate::tls::read_ca_file(path) {
                issue(var::TLS_CA_FILE, message);
            }
        }
        for (name, value) in [
            (var::PROCESS_EXECUTOR, &self.process_executor),
            (var::CONTAINER_IMAGE, &self.default_container_image),
        ] {
            if value.as_ref().is_some_and(String::is_empty) {
                issue(name, "must not be empty (leave it unset instead)".into());
            }
        }
        let limits = &self.rate_limits;
        for (name, value, minimum) in [
            (var::RATE_MSGS_PER_SEC, limits.msgs_per_sec, 0.0),
            (var::RATE_BYTES_PER_SEC, limits.bytes_per_sec, 0.0),
            // A bucket smaller than one message or one byte could never send anything.
            (var::RATE_MSG_BURST, limits.msg_burst, 1.0),
            (var::RATE_BYTE_BURST, limits.byte_burst, 1.0),
        ] {
            let fits = value.is_finite()
                && if minimum == 0.0 {
                    value > 0.0
                } else {
                    value >= minimum
                };
            if !fits {
                let bound = if minimum == 0.0 {
                    "greater than 0"
                } else {
                    "at least 1"
                };
                issue(
                    name,
                    format!("must be a finite number {bound}, got {value}"),
                );
            }
        }
        let reconnect = &self.reconnect;
        if reconnect.initial_delay.is_zero() || reconnect.initial_delay > reconnect.max_delay {
            issue(
                "reconnect",
                "initial_delay must be greater than 0 and at most max_delay".into(),
            );
        }
        if reconnect.max_delay > MAX_GRACE || reconnect.stable_after > MAX_GRACE {
            issue(
                "reconnect",
                "max_delay and stable_after must be at most 7 days".into(),
            );
        }
        if !(0.0..=1.0).contains(&reconnect.jitter) {
            issue(
                "reconnect",
                format!("jitter must be within 0..=1, got {}", reconnect.jitter),
            );
        }
        if self.running_resends.iter().any(|delay| *delay > MAX_GRACE) {
            issue("running_resends", "each must be at most 7 days".into());
        }
        if self.hostname.is_empty() {
            issue("hostname", "must not be empty".into());
        }
    }

    /// The full label set to register: user labels, then the auto-labels (§3.4) and role labels,
    /// de-duplicated.
    pub fn wire_labels(&self) -> Vec<String> {
        labels_for(
            &self.labels,
            &self.roles,
            Self::platform(),
            Self::arch(),
            &self.hostname,
        )
    }

    /// The OS as Node's `os.platform()` names it (`linux`, `darwin`, `win32`, ...).
    pub fn platform() -> &'static str {
        match std::env::consts::OS {
            "macos" => "darwin",
            "windows" => "win32",
            "solaris" | "illumos" => "sunos",
            other => other,
        }
    }

    /// The CPU architecture as Node's `os.arch()` names it (`x64`, `arm64`, ...).
    pub fn arch() -> &'static str {
        match std::env::consts::ARCH {
            "x86_64" => "x64",
            "aarch64" => "arm64",
            "x86" => "ia32",
            "powerpc64" => "ppc64",
            "powerpc" => "ppc",
            "loongarch64" => "loong64",
            other => other,
        }
    }
}

/// The `KICI_*` variables of the process (and Node's extra-CA one), with an issue for each value
/// that is not UTF-8. Anything else may hold any bytes and is not read.
fn environment() -> (BTreeMap<String, String>, Vec<ConfigIssue>) {
    let mut vars = BTreeMap::new();
    let mut issues = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name
            .to_str()
            .filter(|name| name.starts_with("KICI_") || *name == var::NODE_EXTRA_CA_CERTS)
        else {
            continue;
        };
        match value.into_string() {
            Ok(value) => {
                vars.insert(name.to_owned(), value);
            }
            Err(_) => issues.push(ConfigIssue::new(name, "value is not valid UTF-8")),
        }
    }
    (vars, issues)
}

fn check_orchestrator_url(raw: &str) -> Result<(), String> {
    if raw.is_empty() {
        return Err("required (e.g. ws://orchestrator:4000/ws)".into());
    }
    // The URL itself is not echoed: it may carry credentials.
    let url = url::Url::parse(raw).map_err(|error| format!("not a valid URL: {error}"))?;
    match url.scheme() {
        "ws" | "wss" if url.host_str().is_some_and(|host| !host.is_empty()) => Ok(()),
        "ws" | "wss" => Err("the URL has no host".into()),
        scheme => Err(format!(
            "must be a ws:// or wss:// URL, got scheme {scheme:?}"
        )),
    }
}

fn check_readable_file(path: &std::path::Path) -> Result<(), String> {
    let shown = path.display();
    let file =
        std::fs::File::open(path).map_err(|error| format!("cannot read {shown}: {error}"))?;
    let metadata = file
        .metadata()
        .map_err(|error| format!("cannot read {shown}: {error}"))?;
    if metadata.is_file() {
        Ok(())
    } else {
        Err(format!("{shown} is not a regular file"))
    }
}

fn labels_for(
    user: &[String],
    roles: &[Role],
    platform: &str,
    arch: &str,
    hostname: &str,
) -> Vec<String> {
    let mut all: Vec<String> = user.to_vec();
    match platform {
        "darwin" => all.extend(["kici:os:macos".into(), "kici:os:darwin".into()]),
        "win32" => all.extend(["kici:os:windows".into(), "kici:os:win32".into()]),
        other => all.push(format!("kici:os:{other}")),
    }
    match arch {
        "x64" => all.extend(["kici:arch:x64".into(), "kici:arch:amd64".into()]),
        other => all.push(format!("kici:arch:{other}")),
    }
    all.push(format!("kici:host:{hostname}"));
    all.extend(roles.iter().map(|role| role.label()));
    let mut seen = std::collections::HashSet::new();
    all.retain(|label| seen.insert(label.clone()));
    all
}

/// Builds an [`AgentConfig`] from defaults; [`AgentConfigBuilder::build`] validates it.
#[derive(Debug, Clone)]
pub struct AgentConfigBuilder {
    config: AgentConfig,
    /// Kept apart so that a generated id uses the final host name.
    agent_id: Option<String>,
    /// `KICI_CLUSTER_INSTANCE_ID`, the preferred file-log suffix.
    cluster_instance_id: Option<String>,
    /// `KICI_MAX_CONCURRENT_JOBS`, used when `KICI_MAX_CONCURRENCY` was not set.
    scaler_job_count: Option<u32>,
    /// Settings given a value (not blank) by name, so that `build` knows what was left unset.
    explicit: BTreeSet<&'static str>,
    /// Findings that do not stop the agent, in order.
    warnings: Vec<String>,
}

/// No orchestrator URL yet (`build` refuses it until `KICI_ORCHESTRATOR_URL` is set), every
/// other setting at its default.
impl Default for AgentConfigBuilder {
    fn default() -> Self {
        AgentConfig::builder("")
    }
}

/// Setters that store their argument as is.
macro_rules! plain_setters {
    ($( $(#[$doc:meta])* $setter:ident($field:ident: $ty:ty) ),+ $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $setter(mut self, $field: $ty) -> Self {
                self.config.$field = $field;
                self
            }
        )+
    };
}

impl AgentConfigBuilder {
    /// The builder of the process environment's settings, checked exactly like
    /// [`AgentConfig::from_env`] (its warnings are in [`AgentConfigBuilder::warnings`]), for
    /// hosts that change settings before building.
    pub fn from_env() -> Result<Self, ConfigError> {
        let (vars, issues) = environment();
        load(&vars, issues).map(|(builder, _)| builder)
    }

    /// Sets the setting named `name_or_key` (`KICI_PORT` or `port`, see [`SETTINGS`]) from text
    /// read exactly like its environment variable: empty means unset (for numbers and choices
    /// blank means the default), durations are in milliseconds. A value that cannot be read is
    /// refused here and leaves the builder unchanged; cross-field checks wait for `build`.
    pub fn set(&mut self, name_or_key: &str, value: &str) -> Result<(), ConfigError> {
        self.set_value(name_or_key, SettingValue::from(value))
    }

    /// [`AgentConfigBuilder::set`] with text or a typed value of the setting's
    /// [`SettingKind`] (a duration for `KICI_CANCEL_GRACE_MS`, a list for `KICI_LABELS`, ...).
    pub fn set_value(&mut self, name_or_key: &str, value: SettingValue) -> Result<(), ConfigError> {
        let setting = Setting::find(name_or_key).ok_or_else(|| ConfigError::UnknownSetting {
            name: name_or_key.to_owned(),
            suggestion: Setting::closest(name_or_key).map(|setting| setting.name),
        })?;
        let mut changed = self.clone();
        setting.store(&mut changed, &value).map_err(|message| {
            ConfigError::Invalid(vec![ConfigIssue::new(setting.name, message)])
        })?;
        *self = changed;
        Ok(())
    }

    /// Sets host property `key` (`KICI_PROPERTIES`); setting a key again replaces its value and
    /// keeps its position.
    pub fn set_property(&mut self, key: impl Into<String>, value: PropertyValue) {
        upsert_property(&mut self.config.properties, key.into(), value);
    }

    /// Findings that do not stop the agent: an ignored `KICI_MAX_CONCURRENT_JOBS`, and from the
    /// environment an unusable `NODE_EXTRA_CA_CERTS` or unknown variables under `KICI_DEV=true`.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Sets how many jobs run at the same time (>= 1).
    pub fn with_max_concurrency(mut self, max_concurrency: u32) -> Self {
        self.config.max_concurrency = max_concurrency;
        self.explicit.insert(var::MAX_CONCURRENCY);
        self
    }

    /// Sets the agent id (default: `<hostname>-<8 hex>`, generated by `build`).
    pub fn with_agent_id(mut self, agent_id: impl Into<String>) -> Self {
        self.agent_id = Some(agent_id.into());
        self
    }

    /// Sets the user labels (verbatim; `kici:*` is reserved unless scaler-managed).
    pub fn with_labels<I, S>(mut self, labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.labels = labels.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the host properties (keys must be unique and non-empty).
    pub fn with_properties<I, K>(mut self, properties: I) -> Self
    where
        I: IntoIterator<Item = (K, PropertyValue)>,
        K: Into<String>,
    {
        self.config.properties = properties
            .into_iter()
            .map(|(key, value)| (key.into(), value))
            .collect();
        self
    }

    /// Sets the agent token, switching to token authentication.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.config.token = Some(Secret::new(token));
        self
    }

    /// Sets the fallback HTTPS clone token.
    pub fn with_github_token(mut self, token: impl Into<String>) -> Self {
        self.config.github_token = Some(Secret::new(token));
        self
    }

    /// Forces an execution backend (default: automatic).
    pub fn with_execution_mode(mut self, mode: ExecutionMode) -> Self {
        self.config.execution_mode = Some(mode);
        self
    }

    /// Sets the step-map file for the shell executor; it must be readable at `build` time.
    pub fn with_step_map_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.step_map_file = Some(path.into());
        self
    }

    /// Sets a program that runs every step.
    pub fn with_process_executor(mut self, program: impl Into<String>) -> Self {
        self.config.process_executor = Some(program.into());
        self
    }

    /// Trusts the CA certificates of this PEM file for `wss://` and git HTTPS clones, on top of
    /// the platform's roots; the file must hold at least one certificate at `build` time.
    pub fn with_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.tls_ca_file = Some(path.into());
        self
    }

    /// Sets the Node.js (>= 20.6) that runs TypeScript jobs (default: `node` on PATH).
    pub fn with_node(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.node = Some(path.into());
        self
    }

    /// Sets the image for jobs that name none.
    pub fn with_default_container_image(mut self, image: impl Into<String>) -> Self {
        self.config.default_container_image = Some(image.into());
        self
    }

    /// Overrides the detected host name (used by the generated agent id and `kici:host:`).
    pub fn with_hostname(mut self, hostname: impl Into<String>) -> Self {
        self.config.hostname = hostname.into();
        self
    }

    plain_setters! {
        /// Sets the internal job roles. Any role makes `build` fail: this agent cannot serve them.
        with_roles(roles: Vec<Role>),
        /// Sets the HTTP port (0 = ephemeral).
        with_port(port: u16),
        /// Sets the HTTP bind address.
        with_bind_address(bind_address: IpAddr),
        /// Sets the agent log level.
        with_log_level(log_level: LogLevel),
        /// Sets the agent log format.
        with_log_format(log_format: LogFormat),
        /// Sets the per-step log cap in bytes.
        with_max_log_size_bytes(max_log_size_bytes: u64),
        /// Sets the step timeout used when the workflow sets none (> 0).
        with_default_step_timeout(default_step_timeout: Duration),
        /// Keeps the containers of unsuccessful jobs.
        with_docker_keep_failed(docker_keep_failed: bool),
        /// Sets the `job.heartbeat` period (> 0).
        with_job_heartbeat_interval(job_heartbeat_interval: Duration),
        /// Sets the connection `heartbeat` period (> 0).
        with_heartbeat_interval(heartbeat_interval: Duration),
        /// Sets the log-streaming backpressure policy.
        with_backpressure_mode(backpressure_mode: BackpressureMode),
        /// Runs bare-metal steps inside a bubblewrap sandbox.
        with_sandbox(sandbox: bool),
        /// Sets the bubblewrap sandbox network.
        with_sandbox_network(sandbox_network: SandboxNetwork),
        /// Marks the agent as owned by the auto-scaler.
        with_scaler_managed(scaler_managed: bool),
        /// Sets the scaler-managed idle self-shutdown delay (zero = at once).
        with_scaler_idle_timeout(scaler_idle_timeout: Duration),
        /// Sets the wait for a pre-bound job announced at registration.
        with_scaler_pending_dispatch_timeout(scaler_pending_dispatch_timeout: Duration),
        /// Sets the max wait for a concurrency-group `proceed` (>= 1 s).
        with_concurrency_wait_timeout(concurrency_wait_timeout: Duration),
        /// Marks this host as running the orchestrator (reboots are refused).
        with_is_orchestrator_host(is_orchestrator_host: bool),
        /// Sets the longest graceful cancel before force.
        with_cancel_grace(cancel_grace: Duration),
        /// Sets how long graceful shutdown waits for the running job.
        with_shutdown_grace(shutdown_grace: Duration),
        /// Caps the processes a job may have at once (0 = no limit).
        with_job_pids_max(job_pids_max: u64),
        /// Enables development mode.
        with_dev(dev: bool),
        /// Sets the outbound throttle.
        with_rate_limits(rate_limits: RateLimits),
        /// Sets the spacing of reconnect attempts (delays > 0, jitter within 0..=1).
        with_reconnect(reconnect: ReconnectPolicy),
        /// Sets when a running job's `job.status running` is sent again (each at most 7 days).
        with_running_resends(running_resends: Vec<Duration>),
    }

    /// Finishes the configuration and validates it.
    pub fn build(self) -> Result<AgentConfig, ConfigError> {
        let config = self.finish();
        config.validate()?;
        Ok(config)
    }

    /// The configuration, with the agent id generated if none was given; not validated.
    fn finish(self) -> AgentConfig {
        let mut config = self.config;
        if !self.explicit.contains(var::MAX_CONCURRENCY) {
            if let Some(jobs) = self.scaler_job_count {
                config.max_concurrency = jobs;
            }
        }
        // A generated agent id never names the log file.
        config.log_file_suffix = settings::defined(self.cluster_instance_id)
            .or_else(|| settings::defined(self.agent_id.clone()))
            .map(|suffix| crate::file_log::sanitize_suffix(&suffix));
        config.agent_id = self
            .agent_id
            .unwrap_or_else(|| generate_agent_id(&config.hostname));
        config
    }
}

/// `<hostname>-<first 8 hex digits of a random UUIDv4>`, like the Node agent.
fn generate_agent_id(hostname: &str) -> String {
    format!("{hostname}-{:08x}", uuid::Uuid::new_v4().as_u128() >> 96)
}

#[cfg(unix)]
fn detect_hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the pointer and length describe `buffer`, which outlives the call.
    let status = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if status != 0 {
        return FALLBACK_HOSTNAME.to_owned();
    }
    // POSIX does not promise a terminator when the name was truncated.
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    let name = String::from_utf8_lossy(&buffer[..end]).into_owned();
    if name.is_empty() {
        FALLBACK_HOSTNAME.to_owned()
    } else {
        name
    }
}

#[cfg(not(unix))]
fn detect_hostname() -> String {
    std::env::var("COMPUTERNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| FALLBACK_HOSTNAME.to_owned())
}

/// Splits a comma list, dropping empty items and keeping everything else verbatim.
fn comma_list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').filter(|item| !item.is_empty())
}

fn parse_properties(raw: &str) -> Result<Vec<(String, PropertyValue)>, String> {
    let mut properties: Vec<(String, PropertyValue)> = Vec::new();
    for entry in comma_list(raw) {
        let Some((key, value)) = entry.split_once('=').filter(|(key, _)| !key.is_empty()) else {
            return Err(format!("Invalid property '{entry}': expected key=value"));
        };
        // Later duplicates win, keeping the key's first position (like a JS object).
        upsert_property(&mut properties, key.to_owned(), PropertyValue::parse(value));
    }
    Ok(properties)
}

/// Replaces the value of `key`, keeping its position, or appends it.
fn upsert_property(
    properties: &mut Vec<(String, PropertyValue)>,
    key: String,
    value: PropertyValue,
) {
    match properties.iter_mut().find(|(known, _)| *known == key) {
        Some(slot) => slot.1 = value,
        None => properties.push((key, value)),
    }
}

/// The environment loader: every known variable through [`Setting::store`] (collecting issues),
/// `NODE_EXTRA_CA_CERTS`, validation, then the check for unknown `KICI_*` names. Returns the
/// builder (for hosts that change settings afterwards) and the validated configuration; all
/// warnings are in the builder.
fn load(
    vars: &BTreeMap<String, String>,
    mut issues: Vec<ConfigIssue>,
) -> Result<(AgentConfigBuilder, AgentConfig), ConfigError> {
    let mut builder = AgentConfigBuilder::default();
    for setting in SETTINGS {
        if let Some(value) = vars.get(setting.name) {
            if let Err(message) = setting.store(&mut builder, &SettingValue::from(value.as_str())) {
                issues.push(ConfigIssue::new(setting.name, message));
            }
        }
    }
    if builder.config.tls_ca_file.is_none() {
        if let Some(raw) = vars
            .get(var::NODE_EXTRA_CA_CERTS)
            .filter(|raw| !raw.is_empty())
        {
            // Node's semantics: a file it cannot load is reported and skipped, not fatal.
            let path = PathBuf::from(raw);
            match crate::tls::read_ca_file(&path) {
                Ok(_) => builder.config.tls_ca_file = Some(path),
                Err(reason) => builder.warnings.push(format!(
                    "{}: ignoring the extra CA certificates: {reason}",
                    var::NODE_EXTRA_CA_CERTS
                )),
            }
        }
    }

    let config = builder.clone().finish();
    config.validate_after(issues)?;

    let unknown = unknown_variables(vars.keys().map(String::as_str));
    if !unknown.is_empty() {
        let error = ConfigError::UnknownVariables { variables: unknown };
        if !config.dev {
            return Err(error);
        }
        builder.warnings.push(error.to_string());
    }
    Ok((builder, config))
}

/// The `KICI_*` names among `names` that are not known, each with its likely intended name.
fn unknown_variables<'a>(names: impl Iterator<Item = &'a str>) -> Vec<UnknownVariable> {
    let mut unknown: Vec<UnknownVariable> = names
        .filter(|name| name.starts_with("KICI_") && !is_known_variable(name))
        .map(|name| UnknownVariable {
            name: name.to_owned(),
            suggestion: Setting::closest(name).map(|setting| setting.name),
        })
        .collect();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    unknown
}

fn is_known_variable(name: &str) -> bool {
    SETTINGS.iter().any(|known| known.name == name)
        || ALLOWED_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        || name.ends_with("_ENV_PROBE")
        || name.contains("_ENV_PROBE_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "ws://orchestrator:4000/ws";
    // In pieces so no token-shaped literal sits in the source (secret scanners flag them).
    const TOKEN: &str = concat!(
        "kat_",
        "0123456789abcdef0123456789abcdef",
        "0123456789abcdef0123456789abcdef"
    );

    /// Loads from `pairs` plus a valid orchestrator URL (which `pairs` may override).
    fn load_vars(pairs: &[(&str, &str)]) -> Result<FromEnv, ConfigError> {
        let url = [(var::ORCHESTRATOR_URL, URL)];
        AgentConfig::from_vars(
            url.iter()
                .chain(pairs)
                .map(|(name, value)| (name.to_string(), value.to_string())),
        )
    }

    fn config(pairs: &[(&str, &str)]) -> AgentConfig {
        match load_vars(pairs) {
            Ok(loaded) => loaded.config,
            Err(error) => panic!("unexpected error: {error}"),
        }
    }

    fn issues(pairs: &[(&str, &str)]) -> Vec<ConfigIssue> {
        match load_vars(pairs) {
            Err(ConfigError::Invalid(issues)) => issues,
            other => panic!("expected invalid values, got {other:?}"),
        }
    }

    /// The defaults, with a fixed agent id so that configurations compare equal.
    fn default_config() -> AgentConfig {
        config(&[(var::AGENT_ID, "agent-1")])
    }

    const INTEGER_VARIABLES: &[&str] = &[
        var::PORT,
        var::MAX_LOG_SIZE_BYTES,
        var::DEFAULT_STEP_TIMEOUT_MS,
        var::JOB_HEARTBEAT_INTERVAL_MS,
        var::HEARTBEAT_INTERVAL_MS,
        var::SCALER_IDLE_TIMEOUT,
        var::SCALER_PENDING_DISPATCH_TIMEOUT,
        var::CONCURRENCY_WAIT_TIMEOUT_MS,
        var::MAX_CONCURRENCY,
        var::CANCEL_GRACE_MS,
        var::SHUTDOWN_GRACE_MS,
        var::JOB_PIDS_MAX,
    ];
    const NUMBER_VARIABLES: &[&str] = &[
        var::RATE_MSGS_PER_SEC,
        var::RATE_MSG_BURST,
        var::RATE_BYTES_PER_SEC,
        var::RATE_BYTE_BURST,
    ];

    #[test]
    fn defaults_follow_the_spec() {
        let c = config(&[]);
        assert_eq!(c.orchestrator_url, URL);
        assert!(c.labels.is_empty() && c.properties.is_empty() && c.roles.is_empty());
        assert_eq!(c.port, 8080);
        assert_eq!(c.bind_address, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.log_format, LogFormat::Auto);
        assert!(c.token.is_none() && c.github_token.is_none());
        assert_eq!(c.max_log_size_bytes, 10_485_760);
        assert_eq!(c.default_step_timeout, Duration::from_millis(1_800_000));
        assert!(!c.docker_keep_failed);
        assert_eq!(c.job_heartbeat_interval, Duration::from_millis(60_000));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(30_000));
        assert_eq!(c.backpressure_mode, BackpressureMode::Pause);
        assert!(!c.sandbox);
        assert_eq!(c.sandbox_network, SandboxNetwork::Isolated);
        assert!(!c.scaler_managed);
        assert_eq!(c.scaler_idle_timeout, Duration::from_millis(5000));
        assert_eq!(
            c.scaler_pending_dispatch_timeout,
            Duration::from_millis(60_000)
        );
        assert_eq!(c.execution_mode, None);
        assert_eq!(c.concurrency_wait_timeout, Duration::from_millis(3_600_000));
        assert!(!c.is_orchestrator_host);
        assert_eq!(c.max_concurrency, 1);
        assert_eq!(c.cancel_grace, Duration::from_millis(30_000));
        assert_eq!(c.shutdown_grace, Duration::from_millis(10_000));
        assert!(c.step_map_file.is_none() && c.process_executor.is_none());
        assert!(c.default_container_image.is_none());
        assert!(!c.dev);
        assert_eq!(c.rate_limits, RateLimits::default());
        assert_eq!(c.rate_limits.msgs_per_sec, 80.0);
        assert_eq!(c.rate_limits.byte_burst, 1_500_000.0);
        assert!(!c.hostname.is_empty());
        let built = AgentConfig::builder(URL).with_agent_id("agent-1").build();
        assert_eq!(built.ok(), Some(default_config()));
    }

    #[test]
    fn documented_defaults_equal_the_real_defaults() {
        let mut pairs = vec![(var::AGENT_ID, "agent-1")];
        pairs.extend(
            SETTINGS
                .iter()
                .filter_map(|setting| setting.default.map(|value| (setting.name, value))),
        );
        assert_eq!(config(&pairs), default_config());
    }

    #[test]
    fn every_numeric_variable_is_parsed() {
        let c = config(&[
            (var::PORT, "0"),
            (var::MAX_LOG_SIZE_BYTES, "1024"),
            (var::DEFAULT_STEP_TIMEOUT_MS, " 5000 "),
            (var::JOB_HEARTBEAT_INTERVAL_MS, "1500"),
            (var::HEARTBEAT_INTERVAL_MS, "250"),
            (var::SCALER_IDLE_TIMEOUT, "7000"),
            (var::SCALER_PENDING_DISPATCH_TIMEOUT, "8000"),
            (var::CONCURRENCY_WAIT_TIMEOUT_MS, "1000"),
            (var::MAX_CONCURRENCY, "4"),
            (var::CANCEL_GRACE_MS, "0"),
            (var::SHUTDOWN_GRACE_MS, "2500"),
            (var::RATE_MSGS_PER_SEC, "12.5"),
            (var::RATE_MSG_BURST, "20"),
            (var::RATE_BYTES_PER_SEC, "1000"),
            (var::RATE_BYTE_BURST, "4096"),
        ]);
        assert_eq!(c.port, 0);
        assert_eq!(c.max_log_size_bytes, 1024);
        assert_eq!(c.default_step_timeout, Duration::from_millis(5000));
        assert_eq!(c.job_heartbeat_interval, Duration::from_millis(1500));
        assert_eq!(c.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(c.scaler_idle_timeout, Duration::from_millis(7000));
        assert_eq!(
            c.scaler_pending_dispatch_timeout,
            Duration::from_millis(8000)
        );
        assert_eq!(c.concurrency_wait_timeout, Duration::from_millis(1000));
        assert_eq!(c.max_concurrency, 4);
        assert_eq!(c.cancel_grace, Duration::ZERO);
        assert_eq!(c.shutdown_grace, Duration::from_millis(2500));
        let expected = RateLimits {
            msgs_per_sec: 12.5,
            msg_burst: 20.0,
            bytes_per_sec: 1000.0,
            byte_burst: 4096.0,
        };
        assert_eq!(c.rate_limits, expected);
    }

    #[test]
    fn a_non_numeric_value_is_reported_against_its_variable() {
        for name in INTEGER_VARIABLES {
            let found = issues(&[(name, "abc")]);
            let expected = ConfigIssue::new(name, "expected an integer, got \"abc\"");
            assert_eq!(found, vec![expected], "{name}");
        }
        for name in NUMBER_VARIABLES {
            let found = issues(&[(name, "abc")]);
            let expected = ConfigIssue::new(name, "expected a number, got \"abc\"");
            assert_eq!(found, vec![expected], "{name}");
        }
        let error = load_vars(&[(var::PORT, "abc")]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Configuration validation failed:\n  - KICI_PORT: expected an integer, got \"abc\""
        );
    }

    #[test]
    fn all_issues_are_reported_together() {
        let bad: Vec<(&str, &str)> = INTEGER_VARIABLES
            .iter()
            .chain(NUMBER_VARIABLES)
            .map(|name| (*name, "x"))
            .chain([(var::LOG_LEVEL, "loud"), (var::ORCHESTRATOR_URL, "")])
            .collect();
        let found = issues(&bad);
        assert_eq!(found.len(), bad.len());
        let text = ConfigError::Invalid(found).to_string();
        for (name, _) in &bad {
            assert!(
                text.contains(&format!("\n  - {name}: ")),
                "{name} missing in {text}"
            );
        }
    }

    #[test]
    fn an_empty_or_blank_numeric_or_enum_value_means_default() {
        for name in INTEGER_VARIABLES.iter().chain(NUMBER_VARIABLES).chain(&[
            var::LOG_LEVEL,
            var::LOG_FORMAT,
            var::BACKPRESSURE_MODE,
            var::SANDBOX_NETWORK,
            var::EXECUTION_MODE,
            var::BIND_ADDRESS,
        ]) {
            for blank in ["", "  "] {
                let c = config(&[(var::AGENT_ID, "agent-1"), (name, blank)]);
                assert_eq!(c, default_config(), "{name}={blank:?}");
            }
        }
    }

    #[test]
    fn integers_outside_their_range_are_refused() {
        assert_eq!(
            issues(&[(var::PORT, "70000")]),
            vec![ConfigIssue::new(
                var::PORT,
                "expected an integer from 0 to 65535, got \"70000\""
            )]
        );
        assert_eq!(
            issues(&[(var::CANCEL_GRACE_MS, "-1")]),
            vec![ConfigIssue::new(
                var::CANCEL_GRACE_MS,
                "expected an integer >= 0, got \"-1\""
            )]
        );
        assert_eq!(
            issues(&[(var::MAX_CONCURRENCY, "-1")])[0].setting,
            var::MAX_CONCURRENCY
        );
        assert_eq!(issues(&[(var::PORT, "80.5")])[0].setting, var::PORT);
    }

    #[test]
    fn log_file_size_must_be_bytes_with_an_optional_suffix() {
        assert_eq!(
            issues(&[(var::LOG_MAX_SIZE, "12q")]),
            vec![ConfigIssue::new(
                var::LOG_MAX_SIZE,
                "expected a number of bytes, optionally with a k/m/g suffix (e.g. 500m), got \"12q\""
            )]
        );
        for bad in ["m", "-5", "1.5g", "5 m", "5mb", "0x10", "+5"] {
            let found = issues(&[(var::LOG_MAX_SIZE, bad)]);
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert!(
                found[0].message.starts_with("expected a number of bytes"),
                "{bad}: {found:?}"
            );
        }
        for zero in ["0", "0k", "000G"] {
            let found = issues(&[(var::LOG_MAX_SIZE, zero)]);
            assert_eq!(
                found,
                vec![ConfigIssue::new(
                    var::LOG_MAX_SIZE,
                    format!("must be greater than 0, got {zero:?}")
                )]
            );
        }
        let found = issues(&[(var::LOG_MAX_SIZE, "17179869184g")]);
        assert_eq!(
            found[0].message,
            "\"17179869184g\" is more bytes than a 64-bit size can hold"
        );
        for good in ["1", "500m", "500M", "64k", "1G", "1048576", ""] {
            config(&[(var::LOG_MAX_SIZE, good)]);
        }
        assert_eq!(crate::file_log::parse_size("500m"), Ok(500 << 20));
        assert_eq!(crate::file_log::parse_size("2K"), Ok(2048));
    }

    #[test]
    fn log_retention_must_keep_at_least_a_day() {
        for bad in ["0", "-1", "seven", "1.5"] {
            let found = issues(&[(var::LOG_RETENTION_DAYS, bad)]);
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert_eq!(found[0].setting, var::LOG_RETENTION_DAYS);
        }
        assert_eq!(
            issues(&[(var::LOG_RETENTION_DAYS, "0")])[0].message,
            "must be at least 1 day"
        );
        config(&[(var::LOG_RETENTION_DAYS, "7")]);
    }

    #[test]
    fn a_zero_step_log_cap_is_refused() {
        let expected = vec![ConfigIssue::new(
            var::MAX_LOG_SIZE_BYTES,
            "must be greater than 0: 0 would cut every step's log at its first line (a step log cannot be switched off)",
        )];
        assert_eq!(issues(&[(var::MAX_LOG_SIZE_BYTES, "0")]), expected);
        let built = AgentConfig::builder(URL).with_max_log_size_bytes(0).build();
        assert!(
            matches!(&built, Err(ConfigError::Invalid(found)) if *found == expected),
            "{built:?}"
        );
        assert_eq!(
            config(&[(var::MAX_LOG_SIZE_BYTES, "1")]).max_log_size_bytes,
            1
        );
    }

    #[test]
    fn the_heartbeat_must_come_before_the_orchestrator_gives_up() {
        assert_eq!(
            issues(&[(var::HEARTBEAT_INTERVAL_MS, "180000")]),
            vec![ConfigIssue::new(
                var::HEARTBEAT_INTERVAL_MS,
                "must be below 180000 ms: the orchestrator drops an agent that sends no heartbeat for 180 s, got 180000 ms"
            )]
        );
        config(&[(var::HEARTBEAT_INTERVAL_MS, "179999")]);
    }

    #[test]
    fn scaler_and_concurrency_waits_are_capped_at_seven_days() {
        for name in [
            var::SCALER_IDLE_TIMEOUT,
            var::SCALER_PENDING_DISPATCH_TIMEOUT,
            var::CONCURRENCY_WAIT_TIMEOUT_MS,
        ] {
            assert_eq!(
                issues(&[(name, "9223372036854775807")]),
                vec![ConfigIssue::new(name, "must be at most 7 days")],
                "{name}"
            );
            config(&[(name, "604800000")]);
        }
    }

    #[test]
    fn range_rules_apply_after_parsing() {
        for (name, value) in [
            (var::MAX_CONCURRENCY, "0"),
            (var::CONCURRENCY_WAIT_TIMEOUT_MS, "999"),
            (var::DEFAULT_STEP_TIMEOUT_MS, "0"),
            (var::JOB_HEARTBEAT_INTERVAL_MS, "0"),
            (var::HEARTBEAT_INTERVAL_MS, "0"),
            (var::RATE_MSGS_PER_SEC, "0"),
            (var::RATE_BYTE_BURST, "0.5"),
            (var::RATE_BYTES_PER_SEC, "inf"),
        ] {
            let found = issues(&[(name, value)]);
            assert_eq!(found.len(), 1, "{name}={value}: {found:?}");
            assert_eq!(found[0].setting, name);
        }
    }

    #[test]
    fn scaler_timeouts_at_or_below_zero_mean_no_delay() {
        let c = config(&[
            (var::SCALER_IDLE_TIMEOUT, "-5"),
            (var::SCALER_PENDING_DISPATCH_TIMEOUT, "0"),
        ]);
        assert_eq!(c.scaler_idle_timeout, Duration::ZERO);
        assert_eq!(c.scaler_pending_dispatch_timeout, Duration::ZERO);
    }

    #[test]
    fn booleans_need_the_exact_string() {
        let on = config(&[
            (var::DOCKER_KEEP_FAILED, "true"),
            (var::SCALER_MANAGED, "1"),
            (var::AGENT_IS_ORCHESTRATOR_HOST, "true"),
            (var::DEV, "true"),
        ]);
        assert!(on.docker_keep_failed && on.scaler_managed);
        assert!(on.is_orchestrator_host && on.dev);
        let off = config(&[
            (var::DOCKER_KEEP_FAILED, "TRUE"),
            (var::SANDBOX, "1"),
            (var::SCALER_MANAGED, "true"),
            (var::AGENT_IS_ORCHESTRATOR_HOST, "yes"),
            (var::DEV, "True"),
        ]);
        assert!(!off.docker_keep_failed && !off.sandbox && !off.scaler_managed);
        assert!(!off.is_orchestrator_host && !off.dev);
    }

    #[test]
    fn sandbox_is_a_setting_like_any_other() {
        let c = config(&[(var::SANDBOX, "true"), (var::SANDBOX_NETWORK, "host")]);
        assert!(c.sandbox);
        assert_eq!(c.sandbox_network, SandboxNetwork::Host);
    }

    #[test]
    fn enums_are_case_sensitive() {
        let c = config(&[
            (var::LOG_LEVEL, "warn"),
            (var::LOG_FORMAT, "json"),
            (var::BACKPRESSURE_MODE, "drop"),
            (var::SANDBOX_NETWORK, "host"),
            (var::EXECUTION_MODE, "bare-metal"),
        ]);
        assert_eq!(c.log_level, LogLevel::Warn);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.backpressure_mode, BackpressureMode::Drop);
        assert_eq!(c.sandbox_network, SandboxNetwork::Host);
        assert_eq!(c.execution_mode, Some(ExecutionMode::BareMetal));
        assert_eq!(
            issues(&[(var::LOG_LEVEL, "INFO")]),
            vec![ConfigIssue::new(
                var::LOG_LEVEL,
                "expected one of debug, info, warn, error, got \"INFO\""
            )]
        );
        assert_eq!(
            issues(&[(var::EXECUTION_MODE, "vm")])[0].setting,
            var::EXECUTION_MODE
        );
        assert_eq!(
            issues(&[(var::SANDBOX_NETWORK, "Host")])[0].setting,
            var::SANDBOX_NETWORK
        );
        assert_eq!(
            issues(&[(var::LOG_LEVEL, " info")])[0].setting,
            var::LOG_LEVEL
        );
        assert_eq!(tracing::Level::from(LogLevel::Warn), tracing::Level::WARN);
    }

    #[test]
    fn the_bind_address_must_be_an_ip_address() {
        let c = config(&[(var::BIND_ADDRESS, "127.0.0.1")]);
        assert_eq!(c.bind_address, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(
            issues(&[(var::BIND_ADDRESS, "localhost")]),
            vec![ConfigIssue::new(
                var::BIND_ADDRESS,
                "expected an IP address, got \"localhost\""
            )]
        );
    }

    #[test]
    fn an_unknown_variable_stops_startup_with_a_hint() {
        let error = load_vars(&[
            ("KICI_PROT", "8080"),
            ("KICI_QQQQQQQQQQQQQQQQQQQQ", "1"),
            ("NOT_KICI_PROT", "1"),
        ])
        .unwrap_err();
        let ConfigError::UnknownVariables { variables } = &error else {
            panic!("expected unknown variables, got {error:?}");
        };
        assert_eq!(
            variables,
            &vec![
                UnknownVariable {
                    name: "KICI_PROT".into(),
                    suggestion: Some("KICI_PORT"),
                },
                UnknownVariable {
                    name: "KICI_QQQQQQQQQQQQQQQQQQQQ".into(),
                    suggestion: None,
                },
            ]
        );
        let text = error.to_string();
        assert!(text.contains("refuses to start"), "{text}");
        assert!(text.contains("KICI_DEV=true"), "{text}");
        assert!(
            text.contains("\n  - KICI_PROT: did you mean KICI_PORT?"),
            "{text}"
        );
        assert!(
            text.contains("\n  - KICI_QQQQQQQQQQQQQQQQQQQQ: no close match"),
            "{text}"
        );
    }

    #[test]
    fn allowed_and_known_names_pass_the_unknown_check() {
        let loaded = load_vars(&[
            ("KICI_E2E_SCENARIO", "x"),
            ("KICI_AGENT_ENV_FOO", "x"),
            ("KICI_STARTUP_ENV_PROBE", "x"),
            ("KICI_X_ENV_PROBE_Y", "x"),
            (var::CACHE, "x"),
            (var::LOG_DIR, "/var/log/kici"),
            (var::LOG_MAX_SIZE, "1g"),
            (var::LOG_RETENTION_DAYS, "3"),
            (var::CLUSTER_INSTANCE_ID, "a"),
            (var::PLATFORM_INSTANCE_ID, "b"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector"),
            ("PATH", "/usr/bin"),
        ]);
        assert!(loaded.is_ok_and(|loaded| loaded.warnings.is_empty()));
    }

    #[test]
    fn file_log_settings_follow_the_node_agents_rules() {
        let c = config(&[
            (var::LOG_DIR, "/var/log/kici"),
            (var::LOG_MAX_SIZE, "2k"),
            (var::LOG_RETENTION_DAYS, "3"),
            (var::AGENT_ID, "my agent/1"),
        ]);
        assert_eq!(c.log_dir, Some(PathBuf::from("/var/log/kici")));
        assert_eq!((c.log_max_size, c.log_retention_days), (2048, 3));
        assert_eq!(c.log_file_suffix.as_deref(), Some("my_agent_1"));
        let c = config(&[(var::AGENT_ID, "a"), (var::CLUSTER_INSTANCE_ID, "c:1")]);
        assert_eq!(c.log_file_suffix.as_deref(), Some("c_1"));
        // A generated id is never a suffix; `undefined` means unset.
        let c = config(&[
            (var::LOG_DIR, "undefined"),
            (var::CLUSTER_INSTANCE_ID, "undefined"),
        ]);
        assert_eq!((c.log_dir, c.log_file_suffix), (None, None));
        let c = default_config();
        assert_eq!((c.log_max_size, c.log_retention_days), (500 << 20, 7));
        assert_eq!(
            issues(&[(var::LOG_MAX_SIZE, "5mb"), (var::LOG_RETENTION_DAYS, "0")]),
            vec![
                ConfigIssue::new(
                    var::LOG_MAX_SIZE,
                    "expected a number of bytes, optionally with a k/m/g suffix (e.g. 500m), got \"5mb\""
                ),
                ConfigIssue::new(var::LOG_RETENTION_DAYS, "must be at least 1 day"),
            ]
        );
    }

    #[test]
    fn dev_mode_downgrades_unknown_variables_to_a_warning() {
        let loaded = load_vars(&[("KICI_PROT", "1"), (var::DEV, "true")]);
        let Ok(loaded) = loaded else {
            panic!("dev mode must not refuse: {loaded:?}");
        };
        assert_eq!(loaded.warnings.len(), 1);
        assert!(loaded.warnings[0].contains("KICI_PROT: did you mean KICI_PORT?"));
    }

    #[test]
    fn labels_are_split_verbatim() {
        let c = config(&[(var::LABELS, "gpu,, Linux ,x,")]);
        assert_eq!(c.labels, vec!["gpu", " Linux ", "x"]);
        assert!(config(&[(var::LABELS, "")]).labels.is_empty());
    }

    #[test]
    fn reserved_labels_are_refused_unless_scaler_managed() {
        let error = load_vars(&[(var::LABELS, "gpu,kici:os:linux,KICI:Foo,kicix")]).unwrap_err();
        let ConfigError::ReservedLabels { labels } = &error else {
            panic!("expected reserved labels, got {error:?}");
        };
        assert_eq!(labels, &vec!["kici:os:linux", "KICI:Foo"]);
        let text = error.to_string();
        assert!(text.contains("KICI_LABELS") && text.contains("kici:os:linux, KICI:Foo"));
        let c = config(&[
            (var::LABELS, "kici:scaler:pool-a,kici:agent:x"),
            (var::SCALER_MANAGED, "1"),
        ]);
        assert_eq!(c.labels, vec!["kici:scaler:pool-a", "kici:agent:x"]);
    }

    #[test]
    fn requesting_a_role_is_refused() {
        for (raw, expected) in [
            ("builder", vec![Role::Builder]),
            ("init-runner", vec![Role::InitRunner]),
            ("all", vec![Role::Builder, Role::InitRunner]),
            (
                "init-runner,builder,all",
                vec![Role::InitRunner, Role::Builder],
            ),
        ] {
            let error = load_vars(&[(var::ROLES, raw)]).unwrap_err();
            let ConfigError::UnsupportedRole { roles } = &error else {
                panic!("expected unsupported role for {raw}, got {error:?}");
            };
            assert_eq!(roles, &expected);
            let text = error.to_string();
            assert!(
                text.contains("cannot serve role") && text.contains("Node agent"),
                "{text}"
            );
        }
        assert!(config(&[(var::ROLES, "")]).roles.is_empty());
        assert_eq!(
            issues(&[(var::ROLES, "builder,cook")]),
            vec![ConfigIssue::new(
                var::ROLES,
                "must contain only: builder, init-runner, all"
            )]
        );
        let built = AgentConfig::builder(URL)
            .with_roles(vec![Role::Builder])
            .build();
        assert!(matches!(built, Err(ConfigError::UnsupportedRole { .. })));
    }

    #[test]
    fn failures_are_reported_in_spec_order() {
        let all = [
            (var::PORT, "abc"),
            (var::ROLES, "builder"),
            (var::LABELS, "kici:x"),
            ("KICI_PROT", "1"),
        ];
        let stage = |pairs: &[(&str, &str)]| match load_vars(pairs) {
            Err(ConfigError::Invalid(_)) => "invalid",
            Err(ConfigError::UnsupportedRole { .. }) => "role",
            Err(ConfigError::ReservedLabels { .. }) => "labels",
            Err(ConfigError::UnknownVariables { .. }) => "unknown",
            Err(ConfigError::UnknownSetting { .. }) => "setting",
            Ok(_) => "ok",
        };
        assert_eq!(stage(&all), "invalid");
        assert_eq!(stage(&all[1..]), "role");
        assert_eq!(stage(&all[2..]), "labels");
        assert_eq!(stage(&all[3..]), "unknown");
    }

    #[test]
    fn properties_are_typed() {
        let c = config(&[(
            var::PROPERTIES,
            "region=eu,cores=8,gpu=true,ssd=false,ratio=-1.25,ver=1.2.3,code=08x,eq=a=b,empty=,cores=16,,one=1.0",
        )]);
        let number = |n: serde_json::Number| PropertyValue::Number(n);
        assert_eq!(
            c.properties,
            vec![
                ("region".to_string(), PropertyValue::Text("eu".into())),
                ("cores".to_string(), number(16.into())),
                ("gpu".to_string(), PropertyValue::Bool(true)),
                ("ssd".to_string(), PropertyValue::Bool(false)),
                (
                    "ratio".to_string(),
                    number(serde_json::Number::from_f64(-1.25).unwrap())
                ),
                ("ver".to_string(), PropertyValue::Text("1.2.3".into())),
                ("code".to_string(), PropertyValue::Text("08x".into())),
                ("eq".to_string(), PropertyValue::Text("a=b".into())),
                ("empty".to_string(), PropertyValue::Text(String::new())),
                ("one".to_string(), number(1.into())),
            ]
        );
        let json = serde_json::to_string(&c.properties.iter().cloned().collect::<BTreeMap<_, _>>())
            .unwrap();
        assert!(json.contains(r#""cores":16"#) && json.contains(r#""gpu":true"#));
        assert!(json.contains(r#""ver":"1.2.3""#) && json.contains(r#""ratio":-1.25"#));
        for bad in ["novalue", "=x"] {
            assert_eq!(
                issues(&[(var::PROPERTIES, bad)]),
                vec![ConfigIssue::new(
                    var::PROPERTIES,
                    format!("Invalid property '{bad}': expected key=value")
                )]
            );
        }
        for numeric in ["0", "-7", "08", "3.14", "99999999999999999999"] {
            assert!(
                matches!(PropertyValue::parse(numeric), PropertyValue::Number(_)),
                "{numeric}"
            );
        }
        for text in ["1.", ".5", "-", "1e3", "+1", " 1", "TRUE"] {
            assert!(
                matches!(PropertyValue::parse(text), PropertyValue::Text(_)),
                "{text}"
            );
        }
    }

    #[test]
    fn builder_refuses_duplicate_or_empty_property_keys() {
        let duplicate = AgentConfig::builder(URL)
            .with_properties([
                ("a", PropertyValue::Bool(true)),
                ("a", PropertyValue::Bool(false)),
            ])
            .build();
        assert!(
            matches!(duplicate, Err(ConfigError::Invalid(ref i)) if i[0].setting == var::PROPERTIES)
        );
        let empty = AgentConfig::builder(URL)
            .with_properties([("", PropertyValue::Bool(true))])
            .build();
        assert!(matches!(empty, Err(ConfigError::Invalid(_))));
    }

    fn assert_generated_id(id: &str, hostname: &str) {
        let Some((host, suffix)) = id.rsplit_once('-') else {
            panic!("no dash in {id}");
        };
        assert_eq!(host, hostname);
        assert_eq!(suffix.len(), 8, "{id}");
        assert!(
            suffix
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{id}"
        );
    }

    #[test]
    fn agent_id_is_generated_from_the_host_name() {
        let c = config(&[]);
        assert_generated_id(&c.agent_id, &c.hostname);
        assert_ne!(config(&[]).agent_id, c.agent_id, "ids are random per start");
        let empty = config(&[(var::AGENT_ID, "")]);
        assert_generated_id(&empty.agent_id, &empty.hostname);
        assert_eq!(config(&[(var::AGENT_ID, "runner-7")]).agent_id, "runner-7");
        let built = AgentConfig::builder(URL).with_hostname("box").build();
        assert_generated_id(&built.map(|c| c.agent_id).unwrap_or_default(), "box");
    }

    #[test]
    fn wire_labels_put_user_labels_first_and_add_facts() {
        let user = vec!["gpu".to_string(), "kici:os:linux".to_string()];
        assert_eq!(
            labels_for(&user, &[], "linux", "x64", "box"),
            vec![
                "gpu",
                "kici:os:linux",
                "kici:arch:x64",
                "kici:arch:amd64",
                "kici:host:box"
            ]
        );
        assert_eq!(
            labels_for(&[], &[], "darwin", "arm64", "mac"),
            vec![
                "kici:os:macos",
                "kici:os:darwin",
                "kici:arch:arm64",
                "kici:host:mac"
            ]
        );
        assert_eq!(
            labels_for(&[], &[], "win32", "ia32", "pc"),
            vec![
                "kici:os:windows",
                "kici:os:win32",
                "kici:arch:ia32",
                "kici:host:pc"
            ]
        );
        assert_eq!(
            labels_for(&[], &[], "freebsd", "riscv64", "b"),
            vec!["kici:os:freebsd", "kici:arch:riscv64", "kici:host:b"]
        );
        let c = config(&[(var::LABELS, "gpu")]);
        let wire = c.wire_labels();
        assert_eq!(wire[0], "gpu");
        assert!(wire.contains(&format!("kici:host:{}", c.hostname)));
        assert!(wire.contains(&format!("kici:os:{}", AgentConfig::platform())));
        assert!(!wire.iter().any(|label| label.starts_with("kici:role:")));
    }

    #[test]
    fn node_style_platform_and_arch() {
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert_eq!(
                (AgentConfig::platform(), AgentConfig::arch()),
                ("linux", "x64")
            );
        }
        assert!(!AgentConfig::platform().is_empty() && !AgentConfig::arch().is_empty());
    }

    #[test]
    fn secrets_never_leak() {
        let c = config(&[
            (var::AGENT_TOKEN, TOKEN),
            (var::GITHUB_TOKEN, "ghp_secretvalue"),
        ]);
        assert_eq!(c.token.as_ref().map(Secret::expose), Some(TOKEN));
        assert_eq!(
            c.github_token.as_ref().map(Secret::expose),
            Some("ghp_secretvalue")
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains(TOKEN) && !debug.contains("secretvalue"),
            "{debug}"
        );
        assert!(debug.contains("kat_***"));
        assert_eq!(Secret::new("ghp_secretvalue").to_string(), "***");

        let errors = [
            load_vars(&[(var::AGENT_TOKEN, TOKEN), (var::PORT, "x")]),
            load_vars(&[(var::AGENT_TOKEN, TOKEN), (var::LABELS, "kici:x")]),
            load_vars(&[("KICI_AGENT_TOKN", TOKEN)]),
        ];
        for error in errors {
            let error = error.unwrap_err();
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains(TOKEN), "{shown}");
        }
        assert!(config(&[(var::AGENT_TOKEN, "")]).token.is_none());
    }

    #[test]
    fn builder_validates_the_url() {
        for (url, needle) in [
            ("", "required"),
            ("http://orchestrator:4000/ws", "ws:// or wss://"),
            ("not a url", "not a valid URL"),
        ] {
            let error = AgentConfig::builder(url).build().unwrap_err();
            let ConfigError::Invalid(found) = &error else {
                panic!("expected invalid URL for {url:?}, got {error:?}");
            };
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].setting, var::ORCHESTRATOR_URL);
            assert!(
                found[0].message.contains(needle),
                "{url:?}: {}",
                found[0].message
            );
        }
        let with_password = AgentConfig::builder("https://user:hunter2@host/").build();
        assert!(!with_password.unwrap_err().to_string().contains("hunter2"));
        assert!(AgentConfig::builder("wss://orchestrator.example/ws")
            .build()
            .is_ok());
        assert_eq!(
            issues(&[(var::ORCHESTRATOR_URL, "")])[0].setting,
            var::ORCHESTRATOR_URL
        );
    }

    #[test]
    fn builder_validates_values() {
        let built = AgentConfig::builder(URL)
            .with_max_concurrency(0)
            .with_concurrency_wait_timeout(Duration::from_millis(10))
            .with_token("")
            .with_agent_id("")
            .build();
        let Err(ConfigError::Invalid(found)) = built else {
            panic!("expected invalid values, got {built:?}");
        };
        let settings: Vec<&str> = found.iter().map(|issue| issue.setting.as_str()).collect();
        assert_eq!(
            settings,
            vec![
                var::AGENT_ID,
                var::AGENT_TOKEN,
                var::CONCURRENCY_WAIT_TIMEOUT_MS,
                var::MAX_CONCURRENCY
            ]
        );
        let good = AgentConfig::builder(URL)
            .with_port(0)
            .with_labels(["a", "b"])
            .with_max_concurrency(3)
            .with_token(TOKEN)
            .with_log_format(LogFormat::Json)
            .build();
        assert!(good.is_ok_and(|c| c.port == 0 && c.max_concurrency == 3 && c.token.is_some()));
    }

    #[test]
    fn builder_validates_the_reconnect_policy_and_running_resends() {
        let messages = |builder: AgentConfigBuilder| match builder.build() {
            Err(ConfigError::Invalid(found)) => found
                .into_iter()
                .map(|issue| format!("{}: {}", issue.setting, issue.message))
                .collect::<Vec<_>>(),
            other => panic!("expected invalid values, got {other:?}"),
        };
        let policy = ReconnectPolicy::default();
        let found = messages(
            AgentConfig::builder(URL)
                .with_reconnect(ReconnectPolicy {
                    initial_delay: Duration::ZERO,
                    jitter: 1.5,
                    ..policy
                })
                .with_running_resends(vec![Duration::from_secs(8 * 24 * 3600)]),
        );
        assert_eq!(
            found,
            [
                "reconnect: initial_delay must be greater than 0 and at most max_delay",
                "reconnect: jitter must be within 0..=1, got 1.5",
                "running_resends: each must be at most 7 days"
            ]
        );
        let found = messages(AgentConfig::builder(URL).with_reconnect(ReconnectPolicy {
            initial_delay: Duration::from_secs(61),
            stable_after: Duration::from_secs(8 * 24 * 3600),
            ..policy
        }));
        assert_eq!(found.len(), 2, "{found:?}");
        let built = AgentConfig::builder(URL)
            .with_reconnect(policy)
            .with_running_resends(Vec::new())
            .build();
        assert!(built.is_ok_and(|c| c.reconnect == policy && c.running_resends.is_empty()));
    }

    #[test]
    fn the_step_map_must_be_a_readable_file() {
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let c = config(&[(var::STEP_MAP, manifest)]);
        assert_eq!(c.step_map_file, Some(PathBuf::from(manifest)));
        for path in [
            "/nonexistent/kici-step-map.json",
            env!("CARGO_MANIFEST_DIR"),
        ] {
            let found = issues(&[(var::STEP_MAP, path)]);
            assert_eq!(found.len(), 1, "{path}");
            assert_eq!(found[0].setting, var::STEP_MAP);
            assert!(found[0].message.contains(path), "{}", found[0].message);
        }
    }

    #[test]
    fn scaler_job_count_feeds_max_concurrency_only_when_unset() {
        assert_eq!(
            config(&[(var::MAX_CONCURRENT_JOBS, "4")]).max_concurrency,
            4
        );
        let both = config(&[(var::MAX_CONCURRENT_JOBS, "4"), (var::MAX_CONCURRENCY, "2")]);
        assert_eq!(both.max_concurrency, 2);
        for ignored in ["0", "many", "-3"] {
            let loaded = load_vars(&[(var::MAX_CONCURRENT_JOBS, ignored)]);
            let Ok(loaded) = loaded else {
                panic!("{ignored} must only warn: {loaded:?}");
            };
            assert_eq!(loaded.config.max_concurrency, 1);
            assert_eq!(loaded.warnings.len(), 1);
            assert!(loaded.warnings[0].starts_with(var::MAX_CONCURRENT_JOBS));
        }
    }

    #[test]
    fn carried_strings_are_read() {
        let c = config(&[
            (var::PROCESS_EXECUTOR, "/usr/local/bin/run-step"),
            (var::CONTAINER_IMAGE, "alpine:3"),
            (var::LOG_FORMAT, "plain"),
        ]);
        assert_eq!(
            c.process_executor.as_deref(),
            Some("/usr/local/bin/run-step")
        );
        assert_eq!(c.default_container_image.as_deref(), Some("alpine:3"));
        assert_eq!(c.log_format, LogFormat::Plain);
        let empty = config(&[(var::PROCESS_EXECUTOR, ""), (var::CONTAINER_IMAGE, "")]);
        assert!(empty.process_executor.is_none() && empty.default_container_image.is_none());
    }

    #[test]
    fn misspelt_names_get_the_closest_setting() {
        let closest = |name| Setting::closest(name).map(|setting| setting.name);
        assert_eq!(closest("KICI_PROT"), Some(var::PORT));
        assert_eq!(closest("KICI_LABEL"), Some(var::LABELS));
        assert_eq!(closest("job_pid_max"), Some(var::JOB_PIDS_MAX));
        assert_eq!(closest("KICI_COMPLETELY_DIFFERENT"), None);
    }

    #[test]
    fn the_setting_table_has_unique_documented_names_and_keys() {
        let mut spellings = std::collections::HashSet::new();
        for setting in SETTINGS {
            assert!(setting.name.starts_with("KICI_"), "{}", setting.name);
            assert!(
                setting
                    .key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                setting.key
            );
            assert!(spellings.insert(setting.name), "duplicate {}", setting.name);
            assert!(spellings.insert(setting.key), "duplicate {}", setting.key);
            assert!(!setting.description.is_empty(), "{}", setting.name);
        }
    }

    /// A builder with a valid URL and a fixed agent id.
    fn builder() -> AgentConfigBuilder {
        AgentConfig::builder(URL).with_agent_id("agent-1")
    }

    #[test]
    fn set_by_name_or_key_reads_text_like_the_environment() {
        let pairs = [
            (var::PORT, "0"),
            (var::LABELS, "gpu,,x y"),
            (var::PROPERTIES, "cores=8,ssd=true"),
            (var::LOG_LEVEL, "debug"),
            (var::LOG_MAX_SIZE, "2m"),
            (var::CANCEL_GRACE_MS, " 250 "),
            (var::SCALER_MANAGED, "1"),
            (var::EXECUTION_MODE, "bare-metal"),
            (var::JOB_PIDS_MAX, "64"),
            (var::NODE, "/opt/node/bin/node"),
            (var::LOG_DIR, "/var/log/kici"),
            (var::RATE_MSG_BURST, "20.5"),
            (var::AGENT_TOKEN, TOKEN),
        ];
        let mut by_name = builder();
        let mut by_key = builder();
        for (name, value) in pairs {
            by_name.set(name, value).unwrap();
            let key = Setting::find(name).map(|setting| setting.key).unwrap();
            by_key.set(key, value).unwrap();
        }
        let from_env = config(
            &[(var::AGENT_ID, "agent-1")]
                .into_iter()
                .chain(pairs)
                .collect::<Vec<_>>(),
        );
        assert_eq!(by_name.build().unwrap(), from_env);
        assert_eq!(by_key.build().unwrap(), from_env);
        assert_eq!(from_env.job_pids_max, 64);
        assert_eq!(from_env.log_max_size, 2 << 20);
    }

    #[test]
    fn set_refuses_unknown_names_and_bad_values_and_changes_nothing_then() {
        let mut b = builder();
        b.set(var::PORT, "9000").unwrap();
        let error = b.set("KICI_PROT", "1").unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown setting \"KICI_PROT\": did you mean KICI_PORT?"
        );
        let error = b.set(var::PORT, "70000").unwrap_err();
        assert_eq!(
            error.to_string(),
            "Configuration validation failed:\n  - KICI_PORT: expected an integer from 0 to 65535, got \"70000\""
        );
        let error = b.set(var::LOG_FORMAT, "yaml").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("expected one of auto, plain, json"),
            "{error}"
        );
        let error = b
            .set_value(var::LABELS, SettingValue::Flag(true))
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("KICI_LABELS: expected a list, got a flag"),
            "{error}"
        );
        assert!(b.set(var::PROPERTIES, "novalue").is_err());
        let c = b.build().unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.log_format, LogFormat::Auto);
        assert!(c.labels.is_empty() && c.properties.is_empty());
    }

    #[test]
    fn blank_text_puts_a_setting_back_to_its_default() {
        let mut b = builder();
        for (name, value) in [
            (var::PORT, "1"),
            (var::LOG_LEVEL, "error"),
            (var::CANCEL_GRACE_MS, "5"),
            (var::EXECUTION_MODE, "container"),
            (var::NODE, "/usr/bin/node"),
            (var::AGENT_TOKEN, TOKEN),
            (var::DEV, "true"),
        ] {
            b.set(name, value).unwrap();
            b.set(name, if name == var::PORT { " " } else { "" })
                .unwrap();
        }
        assert_eq!(b.build().unwrap(), default_config());
    }

    #[test]
    fn every_setting_takes_a_typed_value_of_its_kind() {
        let ca = ca_file();
        let ca_path = ca.path().to_str().unwrap().to_owned();
        for setting in SETTINGS {
            let value = match setting.kind {
                SettingKind::Text if setting.name == var::ORCHESTRATOR_URL => {
                    SettingValue::from(URL)
                }
                SettingKind::Text | SettingKind::Secret | SettingKind::Ignored => {
                    SettingValue::from("x")
                }
                SettingKind::Path if setting.name == var::LOG_DIR || setting.name == var::NODE => {
                    SettingValue::from("/tmp")
                }
                SettingKind::Path => SettingValue::Text(ca_path.clone()),
                SettingKind::Flag => SettingValue::Flag(true),
                SettingKind::Integer | SettingKind::Size => SettingValue::Integer(2),
                SettingKind::Millis => SettingValue::Duration(Duration::from_secs(2)),
                SettingKind::Number => SettingValue::Number(2.5),
                SettingKind::Choice(names) => SettingValue::from(names[0]),
                SettingKind::IpAddress => SettingValue::from("127.0.0.1"),
                SettingKind::List if setting.name == var::ROLES => SettingValue::List(Vec::new()),
                SettingKind::List => SettingValue::List(vec!["a,b".into(), "c".into()]),
                SettingKind::Properties => {
                    SettingValue::Properties(vec![("v".into(), PropertyValue::Text("1".into()))])
                }
            };
            let mut b = builder();
            b.set_value(setting.key, value)
                .unwrap_or_else(|e| panic!("{}: {e}", setting.name));
        }
        let mut b = builder();
        b.set_value(
            var::CANCEL_GRACE_MS,
            SettingValue::Duration(Duration::from_micros(1500)),
        )
        .unwrap();
        b.set_value(var::LABELS, SettingValue::List(vec!["a,b".into()]))
            .unwrap();
        b.set_value(var::SCALER_MANAGED, SettingValue::Flag(true))
            .unwrap();
        let c = b.build().unwrap();
        assert_eq!(c.cancel_grace, Duration::from_micros(1500));
        assert_eq!(c.labels, ["a,b"], "a typed list is kept verbatim");
        assert!(c.scaler_managed);
    }

    #[test]
    fn the_scaler_job_count_applies_whatever_the_order_of_setting() {
        let mut first = builder();
        first.set(var::MAX_CONCURRENCY, "2").unwrap();
        first.set(var::MAX_CONCURRENT_JOBS, "4").unwrap();
        assert_eq!(first.build().unwrap().max_concurrency, 2);
        let mut unset_again = builder();
        unset_again.set(var::MAX_CONCURRENT_JOBS, "4").unwrap();
        unset_again.set(var::MAX_CONCURRENCY, "2").unwrap();
        unset_again.set(var::MAX_CONCURRENCY, "").unwrap();
        assert_eq!(unset_again.build().unwrap().max_concurrency, 4);
        let mut bad = builder();
        bad.set(var::MAX_CONCURRENT_JOBS, "many").unwrap();
        assert_eq!(bad.warnings().len(), 1);
        assert_eq!(bad.build().unwrap().max_concurrency, 1);
    }

    /// The README's configuration table, as generated from [`SETTINGS`].
    fn readme_table() -> String {
        let mut table = String::from("| variable | default | meaning |\n|---|---|---|\n");
        for setting in SETTINGS {
            let default = match setting.default {
                None => "—".to_owned(),
                Some("") => "(empty)".to_owned(),
                Some(value) => format!("`{value}`"),
            };
            let meaning = setting.description.replace('|', "\\|");
            table.push_str(&format!("| `{}` | {default} | {meaning} |\n", setting.name));
        }
        table
    }

    /// The README's table is the setting table; `KICI_UPDATE_DOCS=1` rewrites it.
    #[test]
    fn the_readme_configuration_table_is_generated_from_the_settings() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let start = readme
            .find("| variable | default | meaning |")
            .expect("the table header");
        let end = readme[start..]
            .find("\n\n")
            .map_or(readme.len(), |offset| start + offset + 1);
        let expected = readme_table();
        if std::env::var_os("KICI_UPDATE_DOCS").is_some() {
            let updated = format!("{}{expected}{}", &readme[..start], &readme[end..]);
            std::fs::write(path, updated).unwrap();
            return;
        }
        assert!(
            readme[start..end] == expected,
            "README.md's configuration table differs from SETTINGS; regenerate it with \
             KICI_UPDATE_DOCS=1 cargo test -p kici-agent-core --lib readme"
        );
    }

    /// A PEM file holding the certificate of a freshly generated test CA.
    fn ca_file() -> tempfile::NamedTempFile {
        let tls = kici_mock_orchestrator::MockTls::generate().expect("test certificates");
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), tls.ca_pem()).expect("write the CA");
        file
    }

    #[test]
    fn the_tls_ca_file_comes_from_kici_tls_ca_file_else_node_extra_ca_certs() {
        let (ours, node) = (ca_file(), ca_file());
        let ours_path = ours.path().to_str().unwrap();
        let node_path = node.path().to_str().unwrap();
        assert_eq!(
            config(&[
                (var::TLS_CA_FILE, ours_path),
                (var::NODE_EXTRA_CA_CERTS, node_path)
            ])
            .tls_ca_file,
            Some(ours.path().to_owned())
        );
        assert_eq!(
            config(&[(var::NODE_EXTRA_CA_CERTS, node_path)]).tls_ca_file,
            Some(node.path().to_owned())
        );
        assert_eq!(config(&[]).tls_ca_file, None);
    }

    #[test]
    fn an_unusable_node_extra_ca_certs_is_a_warning_but_an_unusable_kici_tls_ca_file_an_error() {
        let loaded = load_vars(&[(var::NODE_EXTRA_CA_CERTS, "/nonexistent/ca.pem")]).unwrap();
        assert_eq!(loaded.config.tls_ca_file, None);
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(
            loaded.warnings[0].starts_with("NODE_EXTRA_CA_CERTS: ignoring the extra CA certificates: cannot read /nonexistent/ca.pem"),
            "{:?}",
            loaded.warnings
        );
        let found = issues(&[(var::TLS_CA_FILE, "/nonexistent/ca.pem")]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].setting, "KICI_TLS_CA_FILE");
        assert!(
            found[0]
                .message
                .starts_with("cannot read /nonexistent/ca.pem"),
            "{found:?}"
        );
    }
}
