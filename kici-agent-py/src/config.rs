//! The keyword arguments of `Agent(...)`, turned into the core's [`AgentConfig`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use kici_agent_core::config::ConfigError as CoreConfigError;
use kici_agent_core::config::{PropertyValue, RateLimits};
use kici_agent_core::AgentConfig;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

use crate::convert::{type_name, Seconds};
use crate::ConfigError;

/// Every option of `Agent(...)` but the URL; each field is the keyword argument of the same name
/// (documented in `_native.pyi`). `None` (or `false`) keeps the core's default.
#[derive(Default)]
pub struct Options {
    pub agent_id: Option<String>,
    pub labels: Option<Vec<String>>,
    pub properties: Option<Vec<(String, PropertyValue)>>,
    pub roles: Option<Vec<String>>,
    pub token: Option<String>,
    pub github_token: Option<String>,
    pub port: Option<u16>,
    pub bind_address: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub max_log_size_bytes: Option<u64>,
    pub default_step_timeout: Option<Seconds>,
    pub docker_keep_failed: bool,
    pub job_heartbeat_interval: Option<Seconds>,
    pub heartbeat_interval: Option<Seconds>,
    pub backpressure_mode: Option<String>,
    pub sandbox: bool,
    pub sandbox_network: Option<String>,
    pub scaler_managed: bool,
    pub scaler_idle_timeout: Option<Seconds>,
    pub scaler_pending_dispatch_timeout: Option<Seconds>,
    pub execution_mode: Option<String>,
    pub concurrency_wait_timeout: Option<Seconds>,
    pub is_orchestrator_host: bool,
    pub max_concurrency: Option<u32>,
    pub cancel_grace: Option<Seconds>,
    pub shutdown_grace: Option<Seconds>,
    pub step_map_file: Option<PathBuf>,
    pub process_executor: Option<String>,
    pub default_container_image: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub dev: bool,
    pub rate_msgs_per_sec: Option<f64>,
    pub rate_msg_burst: Option<f64>,
    pub rate_bytes_per_sec: Option<f64>,
    pub rate_byte_burst: Option<f64>,
    pub hostname: Option<String>,
}

/// Parses one of the core's text enums, naming the keyword argument on failure.
fn parse<T>(argument: &str, text: &str) -> PyResult<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    T::from_str(text).map_err(|e| ConfigError::new_err(format!("{argument}: {e}")))
}

impl Options {
    /// The validated configuration (`ConfigError` lists every invalid setting).
    pub fn into_config(self, url: String) -> PyResult<AgentConfig> {
        let mut builder = AgentConfig::builder(url)
            .with_docker_keep_failed(self.docker_keep_failed)
            .with_sandbox(self.sandbox)
            .with_scaler_managed(self.scaler_managed)
            .with_is_orchestrator_host(self.is_orchestrator_host)
            .with_dev(self.dev);
        // The host name first: a generated agent id is derived from it.
        if let Some(hostname) = self.hostname {
            builder = builder.with_hostname(hostname);
        }
        if let Some(agent_id) = self.agent_id {
            builder = builder.with_agent_id(agent_id);
        }
        if let Some(labels) = self.labels {
            builder = builder.with_labels(labels);
        }
        if let Some(properties) = self.properties {
            builder = builder.with_properties(properties);
        }
        if let Some(roles) = self.roles {
            let roles = roles
                .iter()
                .map(|role| parse("roles", role))
                .collect::<PyResult<Vec<_>>>()?;
            builder = builder.with_roles(roles);
        }
        if let Some(token) = self.token {
            builder = builder.with_token(token);
        }
        if let Some(token) = self.github_token {
            builder = builder.with_github_token(token);
        }
        if let Some(port) = self.port {
            builder = builder.with_port(port);
        }
        if let Some(address) = self.bind_address {
            builder = builder.with_bind_address(parse::<IpAddr>("bind_address", &address)?);
        }
        if let Some(level) = self.log_level {
            builder = builder.with_log_level(parse("log_level", &level)?);
        }
        if let Some(format) = self.log_format {
            builder = builder.with_log_format(parse("log_format", &format)?);
        }
        if let Some(bytes) = self.max_log_size_bytes {
            builder = builder.with_max_log_size_bytes(bytes);
        }
        if let Some(Seconds(timeout)) = self.default_step_timeout {
            builder = builder.with_default_step_timeout(timeout);
        }
        if let Some(Seconds(interval)) = self.job_heartbeat_interval {
            builder = builder.with_job_heartbeat_interval(interval);
        }
        if let Some(Seconds(interval)) = self.heartbeat_interval {
            builder = builder.with_heartbeat_interval(interval);
        }
        if let Some(mode) = self.backpressure_mode {
            builder = builder.with_backpressure_mode(parse("backpressure_mode", &mode)?);
        }
        if let Some(network) = self.sandbox_network {
            builder = builder.with_sandbox_network(parse("sandbox_network", &network)?);
        }
        if let Some(Seconds(timeout)) = self.scaler_idle_timeout {
            builder = builder.with_scaler_idle_timeout(timeout);
        }
        if let Some(Seconds(timeout)) = self.scaler_pending_dispatch_timeout {
            builder = builder.with_scaler_pending_dispatch_timeout(timeout);
        }
        if let Some(mode) = self.execution_mode {
            builder = builder.with_execution_mode(parse("execution_mode", &mode)?);
        }
        if let Some(Seconds(timeout)) = self.concurrency_wait_timeout {
            builder = builder.with_concurrency_wait_timeout(timeout);
        }
        if let Some(jobs) = self.max_concurrency {
            builder = builder.with_max_concurrency(jobs);
        }
        if let Some(Seconds(grace)) = self.cancel_grace {
            builder = builder.with_cancel_grace(grace);
        }
        if let Some(Seconds(grace)) = self.shutdown_grace {
            builder = builder.with_shutdown_grace(grace);
        }
        if let Some(path) = self.step_map_file {
            builder = builder.with_step_map_file(path);
        }
        if let Some(program) = self.process_executor {
            builder = builder.with_process_executor(program);
        }
        if let Some(image) = self.default_container_image {
            builder = builder.with_default_container_image(image);
        }
        if let Some(path) = self.tls_ca_file {
            builder = builder.with_tls_ca_file(path);
        }
        let defaults = RateLimits::default();
        builder = builder.with_rate_limits(RateLimits {
            msgs_per_sec: self.rate_msgs_per_sec.unwrap_or(defaults.msgs_per_sec),
            msg_burst: self.rate_msg_burst.unwrap_or(defaults.msg_burst),
            bytes_per_sec: self.rate_bytes_per_sec.unwrap_or(defaults.bytes_per_sec),
            byte_burst: self.rate_byte_burst.unwrap_or(defaults.byte_burst),
        });
        builder.build().map_err(|error| match error {
            CoreConfigError::Invalid(issues) => ConfigError::new_err(format!(
                "invalid agent settings:{}",
                issues
                    .iter()
                    .map(|issue| format!(
                        "\n  - {}: {}",
                        argument_name(&issue.setting),
                        issue.message
                    ))
                    .collect::<String>()
            )),
            other => ConfigError::new_err(other.to_string()),
        })
    }
}

/// Keyword arguments whose name is not their variable's name without `KICI_` and `_MS`.
const RENAMED: &[(&str, &str)] = &[
    ("KICI_ORCHESTRATOR_URL", "url"),
    ("KICI_AGENT_TOKEN", "token"),
    ("KICI_STEP_MAP", "step_map_file"),
    ("KICI_CONTAINER_IMAGE", "default_container_image"),
    ("KICI_AGENT_IS_ORCHESTRATOR_HOST", "is_orchestrator_host"),
];

/// The keyword argument of a setting the core names by its environment variable.
fn argument_name(setting: &str) -> String {
    if let Some((_, argument)) = RENAMED.iter().find(|(variable, _)| *variable == setting) {
        return (*argument).to_owned();
    }
    let name = setting.strip_prefix("KICI_").unwrap_or(setting);
    name.strip_suffix("_MS").unwrap_or(name).to_lowercase()
}

/// `properties={...}`: `bool`, `int`, `float` and `str` values, in the dict's order.
pub fn parse_properties(dict: &Bound<'_, PyDict>) -> PyResult<Vec<(String, PropertyValue)>> {
    dict.iter()
        .map(|(key, value)| {
            let key: String = key.extract().map_err(|_| {
                ConfigError::new_err(format!(
                    "properties: keys must be str, got {}",
                    type_name(&key)
                ))
            })?;
            let value = property_value(&key, &value)?;
            Ok((key, value))
        })
        .collect()
}

fn property_value(key: &str, value: &Bound<'_, PyAny>) -> PyResult<PropertyValue> {
    if let Ok(flag) = value.cast::<PyBool>() {
        return Ok(PropertyValue::Bool(flag.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        let integer: i64 = value.extract().map_err(|_| {
            ConfigError::new_err(format!(
                "properties[{key:?}]: integer does not fit in 64 bits"
            ))
        })?;
        return Ok(PropertyValue::Number(integer.into()));
    }
    if let Ok(float) = value.cast::<PyFloat>() {
        return serde_json::Number::from_f64(float.value())
            .map(PropertyValue::Number)
            .ok_or_else(|| {
                ConfigError::new_err(format!("properties[{key:?}]: {float} is not a JSON number"))
            });
    }
    if let Ok(text) = value.cast::<PyString>() {
        return Ok(PropertyValue::Text(text.to_str()?.to_owned()));
    }
    Err(ConfigError::new_err(format!(
        "properties[{key:?}]: expected bool, int, float or str, got {}",
        type_name(value)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_named_by_their_keyword_argument() {
        assert_eq!(argument_name("KICI_ORCHESTRATOR_URL"), "url");
        assert_eq!(argument_name("KICI_MAX_CONCURRENCY"), "max_concurrency");
        assert_eq!(argument_name("KICI_CANCEL_GRACE_MS"), "cancel_grace");
        assert_eq!(argument_name("KICI_RATE_MSGS_PER_SEC"), "rate_msgs_per_sec");
        assert_eq!(argument_name("hostname"), "hostname");
    }

    #[test]
    fn invalid_settings_are_all_reported_by_argument_name() {
        Python::initialize();
        let options = Options {
            max_concurrency: Some(0),
            ..Options::default()
        };
        let message = options
            .into_config("http://x".into())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("- url: must be a ws:// or wss:// URL"),
            "{message}"
        );
        assert!(message.contains("- max_concurrency: "), "{message}");
    }
}
