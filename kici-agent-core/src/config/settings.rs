//! The table of settings, and setting any of them by name.
//!
//! [`SETTINGS`] is the one list of the agent's settings: each `KICI_*` variable with its key, its
//! default, the kind of value it takes, its documentation and how it is stored. Everything that
//! sets a setting by name goes through it: the environment loader
//! ([`AgentConfig::from_env`](super::AgentConfig::from_env)), [`AgentConfigBuilder::set`] for
//! embedders, the C ABI's `kici_config_set` and Python's keyword arguments. The README table,
//! the C header's key list and the Python stub are generated from it (and tests check that).
//! Adding a setting is one entry here plus its field.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::values::{comma_list, parse_properties};
use super::{var, AgentConfigBuilder, ParseEnumError, PropertyValue, Role, Secret};

/// A value for [`AgentConfigBuilder::set_value`]: the text an environment variable would hold,
/// or a typed value of the setting's [`SettingKind`].
#[derive(Debug, Clone, PartialEq)]
pub enum SettingValue {
    /// Text, read exactly as the environment variable would be.
    Text(String),
    /// On or off ([`SettingKind::Flag`]).
    Flag(bool),
    /// A whole number ([`SettingKind::Integer`], [`SettingKind::Size`] in bytes,
    /// [`SettingKind::Number`]).
    Integer(i64),
    /// A number ([`SettingKind::Number`]).
    Number(f64),
    /// A duration ([`SettingKind::Millis`]).
    Duration(Duration),
    /// Items kept verbatim ([`SettingKind::List`]).
    List(Vec<String>),
    /// Typed host properties in order ([`SettingKind::Properties`]).
    Properties(Vec<(String, PropertyValue)>),
}

impl From<&str> for SettingValue {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

/// What a setting holds, and so which [`SettingValue`]s it takes besides text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingKind {
    /// Free text; empty means unset.
    Text,
    /// A credential; empty means unset. Never shown.
    Secret,
    /// A file-system path; empty means unset.
    Path,
    /// On when the text is exactly the documented spelling; typed: [`SettingValue::Flag`].
    Flag,
    /// A whole number; typed: [`SettingValue::Integer`].
    Integer,
    /// A byte count, with an optional k/m/g suffix in text; typed: [`SettingValue::Integer`].
    Size,
    /// Milliseconds in text; typed: [`SettingValue::Duration`].
    Millis,
    /// A decimal number; typed: [`SettingValue::Number`] or [`SettingValue::Integer`].
    Number,
    /// One of the given spellings, exactly.
    Choice(&'static [&'static str]),
    /// An IPv4 or IPv6 address.
    IpAddress,
    /// A comma-separated list in text; typed: [`SettingValue::List`].
    List,
    /// Comma-separated `key=value` pairs in text; typed: [`SettingValue::Properties`].
    Properties,
    /// Accepted (other KiCI tools use it) and ignored.
    Ignored,
}

impl SettingKind {
    /// Kinds whose blank text (only white space) means "the default", like an unset variable.
    fn blank_is_default(self) -> bool {
        matches!(
            self,
            Self::Integer
                | Self::Size
                | Self::Millis
                | Self::Number
                | Self::Choice(_)
                | Self::IpAddress
        )
    }
}

/// How a setting stores a value in the builder; the message says what is wrong with it.
type Store = fn(&mut AgentConfigBuilder, &SettingValue) -> Result<(), String>;

/// One setting of the agent.
#[derive(Clone, Copy)]
pub struct Setting {
    /// The environment variable (`KICI_PORT`).
    pub name: &'static str,
    /// The short key (`port`): Python's keyword argument, also accepted by `set`. Durations drop
    /// the `_ms` of their variable: their typed value is a duration.
    pub key: &'static str,
    /// A literal value equivalent to leaving the setting unset, or `None` when "unset" has its
    /// own meaning (explained in `description`).
    pub default: Option<&'static str>,
    /// What the setting holds.
    pub kind: SettingKind,
    /// One line for operators.
    pub description: &'static str,
    store: Store,
}

impl std::fmt::Debug for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setting")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("default", &self.default)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Setting {
    /// The setting named `name_or_key`: its variable (`KICI_PORT`) or its key (`port`).
    pub fn find(name_or_key: &str) -> Option<&'static Setting> {
        SETTINGS
            .iter()
            .find(|setting| setting.name == name_or_key || setting.key == name_or_key)
    }

    /// The setting whose variable or key `name_or_key` most likely misspells (within
    /// max(2, len/4) edits), for a did-you-mean hint.
    pub fn closest(name_or_key: &str) -> Option<&'static Setting> {
        let limit = (name_or_key.chars().count() / 4).max(2);
        SETTINGS
            .iter()
            .flat_map(|setting| [(setting.name, setting), (setting.key, setting)])
            .map(|(spelling, setting)| (strsim::levenshtein(name_or_key, spelling), setting))
            .filter(|(distance, _)| *distance <= limit)
            .min_by_key(|(distance, _)| *distance)
            .map(|(_, setting)| setting)
    }

    /// Stores `value`; blank text of a typed setting means its default.
    pub(super) fn store(
        &self,
        builder: &mut AgentConfigBuilder,
        value: &SettingValue,
    ) -> Result<(), String> {
        let blank = matches!(value, SettingValue::Text(text) if text.trim().is_empty());
        if blank {
            builder.explicit.remove(self.name);
        } else {
            builder.explicit.insert(self.name);
        }
        match (blank && self.kind.blank_is_default(), self.default) {
            (true, Some(default)) => (self.store)(builder, &SettingValue::from(default)),
            _ => (self.store)(builder, value),
        }
    }
}

const fn setting(
    name: &'static str,
    key: &'static str,
    default: Option<&'static str>,
    kind: SettingKind,
    description: &'static str,
    store: Store,
) -> Setting {
    Setting {
        name,
        key,
        default,
        kind,
        description,
        store,
    }
}

use SettingKind as K;

/// Every setting, in the order of the README table. Any other `KICI_*` variable in the
/// environment stops startup (see [`super::ConfigError::UnknownVariables`]) except names under
/// [`super::ALLOWED_PREFIXES`] and diagnostic `*_ENV_PROBE` / `*_ENV_PROBE_*` names.
#[rustfmt::skip]
pub const SETTINGS: &[Setting] = &[
    setting(var::ORCHESTRATOR_URL, "url", None, K::Text,
        "Required. Orchestrator WebSocket URL, ws:// or wss:// (e.g. ws://orchestrator:4000/ws).",
        |b, v| { b.config.orchestrator_url = v.text()?.to_owned(); Ok(()) }),
    setting(var::AGENT_ID, "agent_id", None, K::Text,
        "Agent id; unset or empty: `<hostname>-<8 hex>`, regenerated on every start (durable hosts should set it).",
        |b, v| { b.agent_id = v.optional_text()?; Ok(()) }),
    setting(var::LABELS, "labels", Some(""), K::List,
        "Comma-separated user labels, verbatim (no trimming, empty items dropped); `kici:*` is reserved unless KICI_SCALER_MANAGED=1.",
        |b, v| { b.config.labels = v.list()?; Ok(()) }),
    setting(var::PROPERTIES, "properties", Some(""), K::Properties,
        "Comma-separated `key=value` host properties; `true`/`false` become booleans, decimal numbers numbers, the rest text; later duplicates win.",
        |b, v| { b.config.properties = v.properties()?; Ok(()) }),
    setting(var::ROLES, "roles", None, K::List,
        "Internal job roles. Unset or empty: none. `builder`/`init-runner`/`all` are refused: KiCI TypeScript builder/init jobs need the Node agent.",
        |b, v| { b.config.roles = roles(&v.list()?)?; Ok(()) }),
    setting(var::PORT, "port", Some("8080"), K::Integer,
        "HTTP port for /health, /ready and /metrics; 0 picks an ephemeral port.",
        |b, v| { b.config.port = v.integer("from 0 to 65535")?; Ok(()) }),
    setting(var::BIND_ADDRESS, "bind_address", Some("::"), K::IpAddress,
        "IP address the HTTP server binds to; `::` = all interfaces.",
        |b, v| {
            let raw = v.text()?.trim();
            b.config.bind_address =
                raw.parse().map_err(|_| format!("expected an IP address, got {raw:?}"))?;
            Ok(())
        }),
    setting(var::LOG_LEVEL, "log_level", Some("info"), K::Choice(super::LogLevel::NAMES),
        "Agent log level: debug | info | warn | error.",
        |b, v| { b.config.log_level = v.choice()?.unwrap_or_default(); Ok(()) }),
    setting(var::LOG_FORMAT, "log_format", Some("auto"), K::Choice(super::LogFormat::NAMES),
        "Agent log format: auto (JSON unless stdout is a TTY) | plain | json.",
        |b, v| { b.config.log_format = v.choice()?.unwrap_or_default(); Ok(()) }),
    setting(var::LOG_DIR, "log_dir", None, K::Path,
        "Directory of an additional JSON log file `agent-<suffix>-YYYY-MM-DD.log`, rotated daily and by size (gzip), old files removed. Unset, empty or `undefined`: stdout only.",
        |b, v| { b.config.log_dir = defined(v.optional_text()?).map(PathBuf::from); Ok(()) }),
    setting(var::LOG_MAX_SIZE, "log_max_size", Some("500m"), K::Size,
        "Size cap per log file: bytes or a k/m/g suffix.",
        |b, v| {
            b.config.log_max_size = match v {
                SettingValue::Text(raw) => crate::file_log::parse_size(raw.trim())?,
                other => other.integer(">= 0")?,
            };
            Ok(())
        }),
    setting(var::LOG_RETENTION_DAYS, "log_retention_days", Some("7"), K::Integer,
        "Days of log files kept in KICI_LOG_DIR (>= 1); older ones are removed at start and at each day change.",
        |b, v| { b.config.log_retention_days = v.integer("from 1 to 4294967295")?; Ok(()) }),
    setting(var::CLUSTER_INSTANCE_ID, "cluster_instance_id", None, K::Text,
        "Log-file suffix shared with other KiCI services; beats KICI_AGENT_ID as the suffix (a generated agent id is never used).",
        |b, v| { b.cluster_instance_id = v.optional_text()?; Ok(()) }),
    setting(var::PLATFORM_INSTANCE_ID, "platform_instance_id", None, K::Ignored,
        "Log-file suffix of other KiCI services; accepted.",
        |_, _| Ok(())),
    setting(var::AGENT_TOKEN, "token", None, K::Secret,
        "Pre-shared agent token (`kat_...`): authenticate before registering. Unset or empty: unauthenticated.",
        |b, v| { b.config.token = v.optional_text()?.map(Secret::new); Ok(()) }),
    setting(var::GITHUB_TOKEN, "github_token", None, K::Secret,
        "Lowest-priority HTTPS clone credential, used when a dispatch carries none.",
        |b, v| { b.config.github_token = v.optional_text()?.map(Secret::new); Ok(()) }),
    setting(var::MAX_LOG_SIZE_BYTES, "max_log_size_bytes", Some("10485760"), K::Integer,
        "Per-step log cap in bytes (> 0; a step log cannot be switched off); a dispatch's maxLogSizeBytes overrides it.",
        |b, v| { b.config.max_log_size_bytes = v.integer("> 0")?; Ok(()) }),
    setting(var::DEFAULT_STEP_TIMEOUT_MS, "default_step_timeout", Some("1800000"), K::Millis,
        "Per-step timeout in ms when the workflow sets none (> 0).",
        |b, v| { b.config.default_step_timeout = v.millis()?; Ok(()) }),
    setting(var::DOCKER_KEEP_FAILED, "docker_keep_failed", Some("false"), K::Flag,
        "Exactly `true`: keep the containers of jobs that did not succeed.",
        |b, v| { b.config.docker_keep_failed = v.flag("true")?; Ok(()) }),
    setting(var::JOB_HEARTBEAT_INTERVAL_MS, "job_heartbeat_interval", Some("60000"), K::Millis,
        "Period of job.heartbeat messages during a job, in ms (> 0).",
        |b, v| { b.config.job_heartbeat_interval = v.millis()?; Ok(()) }),
    setting(var::HEARTBEAT_INTERVAL_MS, "heartbeat_interval", Some("30000"), K::Millis,
        "Period of connection heartbeats after registration, in ms (> 0 and < 180000: the orchestrator drops an agent after 180 s without one).",
        |b, v| { b.config.heartbeat_interval = v.millis()?; Ok(()) }),
    setting(var::BACKPRESSURE_MODE, "backpressure_mode", Some("pause"), K::Choice(super::BackpressureMode::NAMES),
        "Log-streaming backpressure: pause (slow the step) | drop. This agent always pauses; `drop` is accepted with a warning.",
        |b, v| { b.config.backpressure_mode = v.choice()?.unwrap_or_default(); Ok(()) }),
    setting(var::SANDBOX, "sandbox", Some("false"), K::Flag,
        "Exactly `true`: bare-metal steps run inside a bubblewrap sandbox (read-only system, private /tmp, the workspace at /workspace, own pid/ipc namespaces); start-up fails when `bwrap` is missing or cannot run.",
        |b, v| { b.config.sandbox = v.flag("true")?; Ok(()) }),
    setting(var::SANDBOX_NETWORK, "sandbox_network", Some("isolated"), K::Choice(super::SandboxNetwork::NAMES),
        "Network of the bubblewrap sandbox: isolated (loopback only) | host.",
        |b, v| { b.config.sandbox_network = v.choice()?.unwrap_or_default(); Ok(()) }),
    setting(var::SCALER_MANAGED, "scaler_managed", Some("0"), K::Flag,
        "Exactly `1`: ephemeral agent owned by the auto-scaler: `kici:*` labels allowed, and the agent shuts itself down (exit 0) once idle (KICI_SCALER_IDLE_TIMEOUT).",
        |b, v| { b.config.scaler_managed = v.flag("1")?; Ok(()) }),
    setting(var::SCALER_IDLE_TIMEOUT, "scaler_idle_timeout", Some("5000"), K::Millis,
        "Scaler-managed: ms idle (no job, registered) before the agent shuts itself down, at most 7 days; <= 0 = at once.",
        |b, v| { b.config.scaler_idle_timeout = v.millis_or_zero()?; Ok(()) }),
    setting(var::SCALER_PENDING_DISPATCH_TIMEOUT, "scaler_pending_dispatch_timeout", Some("60000"), K::Millis,
        "Scaler-managed: ms to wait for a pre-bound job announced at registration (`pendingDispatch`) before shutting down, at most 7 days; <= 0 = no longer than KICI_SCALER_IDLE_TIMEOUT.",
        |b, v| { b.config.scaler_pending_dispatch_timeout = v.millis_or_zero()?; Ok(()) }),
    setting(var::EXECUTION_MODE, "execution_mode", None, K::Choice(super::ExecutionMode::NAMES),
        "Force the execution backend: container | bare-metal | firecracker. Unset: automatic.",
        |b, v| { b.config.execution_mode = v.choice()?; Ok(()) }),
    setting(var::CONCURRENCY_WAIT_TIMEOUT_MS, "concurrency_wait_timeout", Some("3600000"), K::Millis,
        "Max wait in ms for a concurrency-group `proceed` (>= 1000, at most 7 days).",
        |b, v| { b.config.concurrency_wait_timeout = v.millis()?; Ok(()) }),
    setting(var::AGENT_IS_ORCHESTRATOR_HOST, "is_orchestrator_host", Some("false"), K::Flag,
        "Exactly `true`: this host runs the orchestrator, so refuse workflow-requested reboots.",
        |b, v| { b.config.is_orchestrator_host = v.flag("true")?; Ok(()) }),
    setting(var::MAX_CONCURRENCY, "max_concurrency", Some("1"), K::Integer,
        "Jobs run at the same time (>= 1), advertised at registration.",
        |b, v| { b.config.max_concurrency = v.integer("from 1 to 4294967295")?; Ok(()) }),
    setting(var::MAX_CONCURRENT_JOBS, "max_concurrent_jobs", None, K::Integer,
        "Set by scalers; used as KICI_MAX_CONCURRENCY when that is unset and this is an integer >= 1, otherwise ignored with a warning.",
        |b, v| { b.scaler_job_count(v); Ok(()) }),
    setting(var::CANCEL_GRACE_MS, "cancel_grace", Some("30000"), K::Millis,
        "Longest graceful cancel in ms before the job is force-killed (at most 7 days).",
        |b, v| { b.config.cancel_grace = v.millis()?; Ok(()) }),
    setting(var::SHUTDOWN_GRACE_MS, "shutdown_grace", Some("10000"), K::Millis,
        "Graceful shutdown: ms to wait for the running job before exiting (at most 7 days).",
        |b, v| { b.config.shutdown_grace = v.millis()?; Ok(()) }),
    setting(var::JOB_PIDS_MAX, "job_pids_max", Some("0"), K::Integer,
        "Most processes a job may have at once (a fork bomb stops there), applied through the job's pids cgroup where the agent can make one; 0 = no limit.",
        |b, v| { b.config.job_pids_max = v.integer(">= 0")?; Ok(()) }),
    setting(var::STEP_MAP, "step_map_file", None, K::Path,
        "JSON file mapping step names to shell commands, read by the shell executor; must be readable.",
        |b, v| { b.config.step_map_file = v.optional_text()?.map(PathBuf::from); Ok(()) }),
    setting(var::PROCESS_EXECUTOR, "process_executor", None, K::Text,
        "Program that runs every step instead of the built-in executors.",
        |b, v| { b.config.process_executor = v.optional_text()?; Ok(()) }),
    setting(var::NODE, "node", None, K::Path,
        "Node.js (>= 20.6) that runs TypeScript jobs; unset: `node` on PATH.",
        |b, v| { b.config.node = v.optional_text()?.map(PathBuf::from); Ok(()) }),
    setting(var::CONTAINER_IMAGE, "default_container_image", None, K::Text,
        "Container image for jobs that name none.",
        |b, v| { b.config.default_container_image = v.optional_text()?; Ok(()) }),
    setting(var::DEV, "dev", Some("false"), K::Flag,
        "Exactly `true`: development mode; unknown KICI_* variables only warn.",
        |b, v| { b.config.dev = v.flag("true")?; Ok(()) }),
    setting(var::CACHE, "cache", None, K::Ignored,
        "Used by KiCI's cache tooling; accepted and ignored.",
        |_, _| Ok(())),
    setting(var::RATE_MSGS_PER_SEC, "rate_msgs_per_sec", Some("80"), K::Number,
        "Outbound throttle: messages per second (the orchestrator allows 100/s).",
        |b, v| { b.config.rate_limits.msgs_per_sec = v.number()?; Ok(()) }),
    setting(var::RATE_MSG_BURST, "rate_msg_burst", Some("150"), K::Number,
        "Outbound throttle: message burst (the orchestrator allows 200).",
        |b, v| { b.config.rate_limits.msg_burst = v.number()?; Ok(()) }),
    setting(var::RATE_BYTES_PER_SEC, "rate_bytes_per_sec", Some("450000"), K::Number,
        "Outbound throttle: bytes per second (the orchestrator allows 512000/s).",
        |b, v| { b.config.rate_limits.bytes_per_sec = v.number()?; Ok(()) }),
    setting(var::RATE_BYTE_BURST, "rate_byte_burst", Some("1500000"), K::Number,
        "Outbound throttle: byte burst (the orchestrator allows 2097152).",
        |b, v| { b.config.rate_limits.byte_burst = v.number()?; Ok(()) }),
    setting(var::TLS_CA_FILE, "tls_ca_file", None, K::Path,
        "PEM file of extra CA certificates trusted for wss:// and git HTTPS clones, besides the system's; unset: NODE_EXTRA_CA_CERTS.",
        |b, v| { b.config.tls_ca_file = v.optional_text()?.map(PathBuf::from); Ok(()) }),
];

/// The Node agent's logger reads `undefined` (a JS template's unset value) as unset.
pub(super) fn defined(value: Option<String>) -> Option<String> {
    value.filter(|value| value != "undefined")
}

/// Roles from their names; `all` means every role.
fn roles(names: &[String]) -> Result<Vec<Role>, String> {
    let mut roles = Vec::new();
    for name in names {
        let requested = match name.as_str() {
            "all" => vec![Role::Builder, Role::InitRunner],
            single => match single.parse() {
                Ok(role) => vec![role],
                Err(_) => return Err("must contain only: builder, init-runner, all".into()),
            },
        };
        for role in requested {
            if !roles.contains(&role) {
                roles.push(role);
            }
        }
    }
    Ok(roles)
}

/// Readers of a value as each kind; text is read the way the environment loader always has.
impl SettingValue {
    fn describe(&self) -> &'static str {
        match self {
            Self::Text(_) => "text",
            Self::Flag(_) => "a flag",
            Self::Integer(_) => "an integer",
            Self::Number(_) => "a number",
            Self::Duration(_) => "a duration",
            Self::List(_) => "a list",
            Self::Properties(_) => "properties",
        }
    }

    fn mismatch(&self, expected: &str) -> String {
        format!("expected {expected}, got {}", self.describe())
    }

    /// The text as given, empty included.
    fn text(&self) -> Result<&str, String> {
        match self {
            Self::Text(text) => Ok(text),
            other => Err(other.mismatch("text")),
        }
    }

    /// The text, with empty meaning unset.
    fn optional_text(&self) -> Result<Option<String>, String> {
        Ok(Some(self.text()?)
            .filter(|text| !text.is_empty())
            .map(str::to_owned))
    }

    /// True only when the text is exactly `on`.
    fn flag(&self, on: &str) -> Result<bool, String> {
        match self {
            Self::Text(text) => Ok(text == on),
            Self::Flag(flag) => Ok(*flag),
            other => Err(other.mismatch("a flag")),
        }
    }

    /// An integer that fits `T`; `range` describes the accepted values.
    fn integer<T: TryFrom<i128>>(&self, range: &str) -> Result<T, String> {
        let (wide, shown) = match self {
            Self::Text(text) => {
                let raw = text.trim();
                let wide = raw
                    .parse::<i128>()
                    .map_err(|_| format!("expected an integer, got {raw:?}"))?;
                (wide, format!("{raw:?}"))
            }
            Self::Integer(integer) => (i128::from(*integer), integer.to_string()),
            other => return Err(other.mismatch("an integer")),
        };
        T::try_from(wide).map_err(|_| format!("expected an integer {range}, got {shown}"))
    }

    fn millis(&self) -> Result<Duration, String> {
        match self {
            Self::Duration(duration) => Ok(*duration),
            other => other.integer(">= 0").map(Duration::from_millis),
        }
    }

    /// Milliseconds where zero or less all mean "no delay".
    fn millis_or_zero(&self) -> Result<Duration, String> {
        match self {
            Self::Duration(duration) => Ok(*duration),
            other => {
                let millis: i64 = other.integer("in the 64-bit range")?;
                Ok(Duration::from_millis(u64::try_from(millis).unwrap_or(0)))
            }
        }
    }

    fn number(&self) -> Result<f64, String> {
        match self {
            Self::Text(text) => {
                let raw = text.trim();
                raw.parse::<f64>()
                    .ok()
                    .filter(|value| value.is_finite())
                    .ok_or_else(|| format!("expected a number, got {raw:?}"))
            }
            Self::Number(number) => Ok(*number),
            // Rates are far below 2^53: the conversion is exact.
            Self::Integer(integer) => Ok(*integer as f64),
            other => Err(other.mismatch("a number")),
        }
    }

    /// An enum value, spelled exactly; blank text means unset.
    fn choice<T: FromStr<Err = ParseEnumError>>(&self) -> Result<Option<T>, String> {
        let raw = self.text()?;
        if raw.trim().is_empty() {
            return Ok(None);
        }
        raw.parse()
            .map(Some)
            .map_err(|error: ParseEnumError| error.to_string())
    }

    fn list(&self) -> Result<Vec<String>, String> {
        match self {
            Self::Text(text) => Ok(comma_list(text).map(str::to_owned).collect()),
            Self::List(items) => Ok(items.clone()),
            other => Err(other.mismatch("a list")),
        }
    }

    fn properties(&self) -> Result<Vec<(String, PropertyValue)>, String> {
        match self {
            Self::Text(text) => parse_properties(text),
            Self::Properties(properties) => Ok(properties.clone()),
            other => Err(other.mismatch("properties")),
        }
    }
}

impl AgentConfigBuilder {
    /// `KICI_MAX_CONCURRENT_JOBS`: a scaler's job count is a hint, never a reason to refuse
    /// starting; a value that is not an integer >= 1 is ignored with a warning.
    fn scaler_job_count(&mut self, value: &SettingValue) {
        let parsed = match value {
            SettingValue::Text(text) if text.trim().is_empty() => {
                self.scaler_job_count = None;
                return;
            }
            SettingValue::Text(text) => text.parse::<u32>().ok(),
            SettingValue::Integer(integer) => u32::try_from(*integer).ok(),
            _ => None,
        };
        self.scaler_job_count = parsed.filter(|jobs| *jobs >= 1);
        if self.scaler_job_count.is_none() {
            let shown = match value {
                SettingValue::Text(text) => format!("{text:?}"),
                SettingValue::Integer(integer) => integer.to_string(),
                other => other.describe().to_owned(),
            };
            self.warnings.push(format!(
                "{}={shown} is not an integer >= 1; ignored, max concurrency stays {}",
                var::MAX_CONCURRENT_JOBS,
                self.config.max_concurrency
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

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
    fn labels_are_split_verbatim() {
        let c = config(&[(var::LABELS, "gpu,, Linux ,x,")]);
        assert_eq!(c.labels, vec!["gpu", " Linux ", "x"]);
        assert!(config(&[(var::LABELS, "")]).labels.is_empty());
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
}
