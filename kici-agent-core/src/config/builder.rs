//! [`AgentConfigBuilder`]: the defaults, the typed setters for embedders, setting by name
//! through [`SETTINGS`](super::SETTINGS), and `build` (the generated agent id, then validation).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use super::settings::{self, Setting, SettingValue};
use super::values::{
    upsert_property, BackpressureMode, ExecutionMode, LogFormat, LogLevel, PropertyValue,
    RateLimits, Role, SandboxNetwork, Secret,
};
use super::{var, AgentConfig, ConfigError, ConfigIssue, ReconnectPolicy};

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
const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Used when the OS will not tell us its host name.
const FALLBACK_HOSTNAME: &str = "localhost";

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
}

/// Builds an [`AgentConfig`] from defaults; [`AgentConfigBuilder::build`] validates it.
#[derive(Debug, Clone)]
pub struct AgentConfigBuilder {
    pub(super) config: AgentConfig,
    /// Kept apart so that a generated id uses the final host name.
    pub(super) agent_id: Option<String>,
    /// `KICI_CLUSTER_INSTANCE_ID`, the preferred file-log suffix.
    pub(super) cluster_instance_id: Option<String>,
    /// `KICI_MAX_CONCURRENT_JOBS`, used when `KICI_MAX_CONCURRENCY` was not set.
    pub(super) scaler_job_count: Option<u32>,
    /// Settings given a value (not blank) by name, so that `build` knows what was left unset.
    pub(super) explicit: BTreeSet<&'static str>,
    /// Findings that do not stop the agent, in order.
    pub(super) warnings: Vec<String>,
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
    /// Sets the setting named `name_or_key` (`KICI_PORT` or `port`, see [`SETTINGS`](super::SETTINGS)) from text
    /// read exactly like its environment variable: empty means unset (for numbers and choices
    /// blank means the default), durations are in milliseconds. A value that cannot be read is
    /// refused here and leaves the builder unchanged; cross-field checks wait for `build`.
    pub fn set(&mut self, name_or_key: &str, value: &str) -> Result<(), ConfigError> {
        self.set_value(name_or_key, SettingValue::from(value))
    }

    /// [`AgentConfigBuilder::set`] with text or a typed value of the setting's
    /// [`SettingKind`](super::SettingKind) (a duration for `KICI_CANCEL_GRACE_MS`, a list for
    /// `KICI_LABELS`, ...).
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
    pub(super) fn finish(self) -> AgentConfig {
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
    nix::unistd::gethostname()
        .ok()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| FALLBACK_HOSTNAME.to_owned())
}

#[cfg(not(unix))]
fn detect_hostname() -> String {
    std::env::var("COMPUTERNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| FALLBACK_HOSTNAME.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

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

    #[cfg(target_os = "linux")]
    #[test]
    fn the_detected_host_name_is_the_kernels() {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(config(&[]).hostname, kernel.trim_end());
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
}
