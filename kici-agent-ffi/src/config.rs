//! `kici_config`: an agent configuration, built option by option or loaded from the `KICI_*`
//! environment, validated by the core.

use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use kici_agent_core::config::{
    AgentConfig, BackpressureMode, ExecutionMode, LogFormat, LogLevel, ParseEnumError,
    PropertyValue, RateLimits, Role, SandboxNetwork, Secret,
};

use crate::boundary::{guard, guard_infallible, object, object_mut, out, text};
use crate::error::{kici_error, kici_result, Failure, FfiResult};
use crate::string::c_string_lossy;

/// Stands in for the URL while building the defaults; replaced by "" right after, so a
/// configuration whose URL was never set fails validation.
const PLACEHOLDER_URL: &str = "ws://127.0.0.1/ws";

/// An agent configuration: every option of the `KICI_*` environment, with labels as a list.
/// Opaque.
///
/// Create it with `kici_config_new` (defaults) or `kici_config_from_env`, change it with the
/// `kici_config_set_*` functions, pass it to `kici_agent_new` (which copies it) and free it with
/// `kici_config_free`. Setters only store values; `kici_config_validate` and `kici_agent_new`
/// check them all together.
///
/// Thread safety: a configuration may move between threads, but a setter must not run while
/// any other call uses the same configuration. Calls taking `const kici_config *` may overlap
/// each other.
pub struct kici_config {
    config: AgentConfig,
    /// Findings of `kici_config_from_env` that did not stop loading.
    warnings: Vec<CString>,
}

impl kici_config {
    /// The configuration as the core sees it.
    pub(crate) fn agent_config(&self) -> &AgentConfig {
        &self.config
    }
}

fn config_failure(error: kici_agent_core::ConfigError) -> Failure {
    Failure::new(kici_result::InvalidConfig, error.to_string())
}

fn parse_choice<T: FromStr<Err = ParseEnumError>>(option: &str, value: &str) -> FfiResult<T> {
    value
        .parse()
        .map_err(|e: ParseEnumError| Failure::invalid(format!("`{option}`: {e}")))
}

fn optional_text(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

/// Runs `change` on the configuration behind `config`.
///
/// # Safety
/// `config` must be NULL or a live configuration no other thread uses.
unsafe fn update(
    config: *mut kici_config,
    err: *mut *mut kici_error,
    change: impl FnOnce(&mut AgentConfig) -> FfiResult,
) -> kici_result {
    guard(err, || {
        // SAFETY: guaranteed by the caller.
        let config = unsafe { object_mut(config, "config") }?;
        change(&mut config.config)
    })
}

/// Runs `change` with a text argument named `name`.
///
/// # Safety
/// As [`update`]; `value` must be NULL or a NUL-terminated string.
unsafe fn update_text(
    config: *mut kici_config,
    value: *const c_char,
    name: &'static str,
    err: *mut *mut kici_error,
    change: impl FnOnce(&mut AgentConfig, &str) -> FfiResult,
) -> kici_result {
    // SAFETY: guaranteed by the caller.
    unsafe {
        update(config, err, |config| {
            let value = text(value, name)?;
            change(config, value)
        })
    }
}

/// Reads a list of `count` strings; `items` may be NULL only when `count` is 0.
///
/// # Safety
/// `items` must be NULL or point to `count` pointers, each NULL or NUL-terminated.
unsafe fn text_list<'a>(
    items: *const *const c_char,
    count: usize,
    name: &str,
) -> FfiResult<Vec<&'a str>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if items.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: non-NULL and `count` long by contract.
    let pointers = unsafe { std::slice::from_raw_parts(items, count) };
    pointers
        .iter()
        .enumerate()
        // SAFETY: each element is NULL or NUL-terminated by contract.
        .map(|(index, item)| unsafe { text(*item, &format!("{name}[{index}]")) })
        .collect()
}

/// Creates a configuration with every default (see the `KICI_*` table in the README). The
/// orchestrator URL is empty: set it with `kici_config_set_orchestrator_url`.
///
/// Ownership: on success `*out_config` receives a configuration the caller owns and frees with
/// `kici_config_free`. Thread safety: safe from any thread.
#[no_mangle]
pub unsafe extern "C" fn kici_config_new(
    out_config: *mut *mut kici_config,
    err: *mut *mut kici_error,
) -> kici_result {
    guard(err, || {
        // SAFETY: the caller passes NULL or writable storage.
        let slot = unsafe { out(out_config, "out_config") }?;
        let mut config = AgentConfig::builder(PLACEHOLDER_URL)
            .build()
            .map_err(config_failure)?;
        config.orchestrator_url = String::new();
        let config = Box::new(kici_config {
            config,
            warnings: Vec::new(),
        });
        slot.write(Box::into_raw(config));
        Ok(())
    })
}

/// Loads and validates a configuration from the process environment exactly like the
/// stand-alone agent (`KICI_ORCHESTRATOR_URL`, `KICI_LABELS`, ...). Unknown `KICI_*` variables
/// are refused unless `KICI_DEV=true`, which turns them into warnings (see
/// `kici_config_warning_count`). Setters may still change the result.
///
/// Ownership: on success `*out_config` receives a configuration the caller owns and frees with
/// `kici_config_free`. Thread safety: safe from any thread, but not while another thread changes
/// the environment (`setenv`).
#[no_mangle]
pub unsafe extern "C" fn kici_config_from_env(
    out_config: *mut *mut kici_config,
    err: *mut *mut kici_error,
) -> kici_result {
    guard(err, || {
        // SAFETY: the caller passes NULL or writable storage.
        let slot = unsafe { out(out_config, "out_config") }?;
        let loaded = AgentConfig::from_env().map_err(config_failure)?;
        let config = Box::new(kici_config {
            config: loaded.config,
            warnings: loaded.warnings.into_iter().map(c_string_lossy).collect(),
        });
        slot.write(Box::into_raw(config));
        Ok(())
    })
}

/// Frees a configuration. NULL does nothing. Agents created from it keep their own copy.
///
/// Ownership: takes `config`. Thread safety: any thread, once no other call uses `config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_free(config: *mut kici_config) {
    guard_infallible((), || {
        if !config.is_null() {
            // SAFETY: the caller hands back a configuration from this library, exactly once.
            drop(unsafe { Box::from_raw(config) });
        }
    })
}

/// Checks every option; on failure the error message lists every problem
/// (`KICI_RESULT_INVALID_CONFIG`). `kici_agent_new` runs the same check.
///
/// Ownership: `config` is borrowed. Thread safety: may overlap other `const` calls.
#[no_mangle]
pub unsafe extern "C" fn kici_config_validate(
    config: *const kici_config,
    err: *mut *mut kici_error,
) -> kici_result {
    guard(err, || {
        // SAFETY: the caller passes NULL or a live configuration.
        let config = unsafe { object(config, "config") }?;
        config.config.validate().map_err(config_failure)
    })
}

/// The number of warnings `kici_config_from_env` found (0 for `kici_config_new`).
///
/// Ownership: `config` is borrowed. Thread safety: may overlap other `const` calls.
#[no_mangle]
pub unsafe extern "C" fn kici_config_warning_count(
    config: *const kici_config,
    out_count: *mut usize,
    err: *mut *mut kici_error,
) -> kici_result {
    guard(err, || {
        // SAFETY: the caller passes NULL or live pointers.
        let (config, slot) = unsafe { (object(config, "config")?, out(out_count, "out_count")?) };
        slot.write(config.warnings.len());
        Ok(())
    })
}

/// Warning number `index` (from 0) of `kici_config_from_env`; `KICI_RESULT_NOT_FOUND` past the
/// end.
///
/// Ownership: `*out_warning` is borrowed from `config` and lives until `kici_config_free`.
/// Thread safety: may overlap other `const` calls.
#[no_mangle]
pub unsafe extern "C" fn kici_config_warning(
    config: *const kici_config,
    index: usize,
    out_warning: *mut *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    guard(err, || {
        // SAFETY: the caller passes NULL or live pointers.
        let (config, slot) =
            unsafe { (object(config, "config")?, out(out_warning, "out_warning")?) };
        let warning = config.warnings.get(index).ok_or_else(|| {
            Failure::new(
                kici_result::NotFound,
                format!(
                    "there are {} warnings, no warning {index}",
                    config.warnings.len()
                ),
            )
        })?;
        slot.write(warning.as_ptr());
        Ok(())
    })
}

/// Sets the orchestrator WebSocket URL, `ws://` or `wss://` (`KICI_ORCHESTRATOR_URL`,
/// required).
///
/// Ownership: `config` is borrowed; `url` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_orchestrator_url(
    config: *mut kici_config,
    url: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, url, "url", err, |config, url| {
            config.orchestrator_url = url.to_owned();
            Ok(())
        })
    }
}

/// Sets the agent id (`KICI_AGENT_ID`; default `<hostname>-<8 hex>`, new for every
/// configuration). It must not be empty.
///
/// Ownership: `config` is borrowed; `agent_id` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_agent_id(
    config: *mut kici_config,
    agent_id: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, agent_id, "agent_id", err, |config, agent_id| {
            config.agent_id = agent_id.to_owned();
            Ok(())
        })
    }
}

/// Replaces the user labels with `count` labels (`KICI_LABELS` as a list). Labels are kept
/// verbatim; `kici:*` is reserved unless scaler-managed. `labels` may be NULL when `count` is 0.
/// On failure the labels are unchanged.
///
/// Ownership: `config` is borrowed; the labels are copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_labels(
    config: *mut kici_config,
    labels: *const *const c_char,
    count: usize,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            let labels = text_list(labels, count, "labels")?;
            config.labels = labels.into_iter().map(str::to_owned).collect();
            Ok(())
        })
    }
}

/// Sets host property `key` (`KICI_PROPERTIES`): `value` is typed like the environment's
/// (`true`/`false` become booleans, decimal numbers numbers, the rest text). Setting a key again
/// replaces its value and keeps its position.
///
/// Ownership: `config` is borrowed; `key` and `value` are copied. Thread safety: see
/// `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_property(
    config: *mut kici_config,
    key: *const c_char,
    value: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            let (key, value) = (text(key, "key")?, text(value, "value")?);
            let value = PropertyValue::parse(value);
            match config.properties.iter_mut().find(|(known, _)| known == key) {
                Some(slot) => slot.1 = value,
                None => config.properties.push((key.to_owned(), value)),
            }
            Ok(())
        })
    }
}

/// Replaces the internal job roles (`KICI_ROLES` as a list: `builder`, `init-runner`, `all`).
/// Validation refuses every role: this agent cannot run KiCI's TypeScript builder/init jobs.
///
/// Ownership: `config` is borrowed; the roles are copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_roles(
    config: *mut kici_config,
    roles: *const *const c_char,
    count: usize,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            let mut parsed = Vec::new();
            for role in text_list(roles, count, "roles")? {
                let requested = match role {
                    "all" => vec![Role::Builder, Role::InitRunner],
                    single => vec![parse_choice::<Role>("roles", single)?],
                };
                for role in requested {
                    if !parsed.contains(&role) {
                        parsed.push(role);
                    }
                }
            }
            config.roles = parsed;
            Ok(())
        })
    }
}

/// Sets the HTTP port of `/health`, `/ready` and `/metrics` (`KICI_PORT`, 8080; 0 picks a free
/// port, see `kici_agent_http_port`).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_port(
    config: *mut kici_config,
    port: u16,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.port = port;
            Ok(())
        })
    }
}

/// Sets the IP address the HTTP server binds to (`KICI_BIND_ADDRESS`, `::`).
///
/// Ownership: `config` is borrowed; `address` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_bind_address(
    config: *mut kici_config,
    address: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, address, "address", err, |config, address| {
            config.bind_address = address.parse().map_err(|_| {
                Failure::invalid(format!(
                    "`address`: expected an IP address, got {address:?}"
                ))
            })?;
            Ok(())
        })
    }
}

/// Sets the agent log level, `debug` | `info` | `warn` | `error` (`KICI_LOG_LEVEL`, info). The
/// library installs no logger; the level is kept for hosts that read it back.
///
/// Ownership: `config` is borrowed; `level` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_log_level(
    config: *mut kici_config,
    level: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, level, "level", err, |config, level| {
            config.log_level = parse_choice::<LogLevel>("level", level)?;
            Ok(())
        })
    }
}

/// Sets the agent log format, `auto` | `plain` | `json` (`KICI_LOG_FORMAT`, auto).
///
/// Ownership: `config` is borrowed; `format` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_log_format(
    config: *mut kici_config,
    format: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, format, "format", err, |config, format| {
            config.log_format = parse_choice::<LogFormat>("format", format)?;
            Ok(())
        })
    }
}

/// Sets the agent token `kat_...` (`KICI_AGENT_TOKEN`); "" removes it (unauthenticated).
///
/// Ownership: `config` is borrowed; `token` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_token(
    config: *mut kici_config,
    token: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, token, "token", err, |config, token| {
            config.token = optional_text(token).map(Secret::new);
            Ok(())
        })
    }
}

/// Sets the fallback HTTPS clone token (`KICI_GITHUB_TOKEN`); "" removes it.
///
/// Ownership: `config` is borrowed; `token` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_github_token(
    config: *mut kici_config,
    token: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, token, "token", err, |config, token| {
            config.github_token = optional_text(token).map(Secret::new);
            Ok(())
        })
    }
}

/// Sets the per-step log cap in bytes, > 0 (`KICI_MAX_LOG_SIZE_BYTES`, 10485760).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_max_log_size_bytes(
    config: *mut kici_config,
    bytes: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.max_log_size_bytes = bytes;
            Ok(())
        })
    }
}

/// Sets the step timeout used when the workflow sets none, in ms, > 0
/// (`KICI_DEFAULT_STEP_TIMEOUT_MS`, 1800000).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_default_step_timeout_ms(
    config: *mut kici_config,
    millis: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.default_step_timeout = Duration::from_millis(millis);
            Ok(())
        })
    }
}

/// Keeps the containers of jobs that did not succeed (`KICI_DOCKER_KEEP_FAILED`, false).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_docker_keep_failed(
    config: *mut kici_config,
    keep: bool,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.docker_keep_failed = keep;
            Ok(())
        })
    }
}

/// Sets the period of `job.heartbeat` messages in ms, > 0 (`KICI_JOB_HEARTBEAT_INTERVAL_MS`,
/// 60000).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_job_heartbeat_interval_ms(
    config: *mut kici_config,
    millis: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.job_heartbeat_interval = Duration::from_millis(millis);
            Ok(())
        })
    }
}

/// Sets the period of connection heartbeats in ms, > 0 and < 180000: the orchestrator drops
/// an agent after 180 s without one (`KICI_HEARTBEAT_INTERVAL_MS`, 30000).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_heartbeat_interval_ms(
    config: *mut kici_config,
    millis: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.heartbeat_interval = Duration::from_millis(millis);
            Ok(())
        })
    }
}

/// Sets the log-streaming backpressure policy, `pause` | `drop` (`KICI_BACKPRESSURE_MODE`,
/// pause).
///
/// Ownership: `config` is borrowed; `mode` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_backpressure_mode(
    config: *mut kici_config,
    mode: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, mode, "mode", err, |config, mode| {
            config.backpressure_mode = parse_choice::<BackpressureMode>("mode", mode)?;
            Ok(())
        })
    }
}

/// Runs bare-metal steps inside a bubblewrap sandbox (`KICI_SANDBOX`, false): read-only
/// system directories, a private /tmp, the workspace at /workspace, own pid and ipc
/// namespaces. With `true`, `kici_agent_start` fails with `KICI_RESULT_INVALID_CONFIG` when
/// `bwrap` is missing or cannot create the namespaces.
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_sandbox(
    config: *mut kici_config,
    sandbox: bool,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.sandbox = sandbox;
            Ok(())
        })
    }
}

/// Sets the network of the bubblewrap sandbox, `isolated` | `host` (`KICI_SANDBOX_NETWORK`,
/// isolated).
///
/// Ownership: `config` is borrowed; `network` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_sandbox_network(
    config: *mut kici_config,
    network: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, network, "network", err, |config, network| {
            config.sandbox_network = parse_choice::<SandboxNetwork>("network", network)?;
            Ok(())
        })
    }
}

/// Marks the agent as owned by the auto-scaler (`KICI_SCALER_MANAGED=1`, false): idle
/// self-shutdown, `kici:*` labels allowed.
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_scaler_managed(
    config: *mut kici_config,
    managed: bool,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.scaler_managed = managed;
            Ok(())
        })
    }
}

/// Sets the scaler-managed idle self-shutdown delay in ms, 0 = at once, at most 7 days
/// (`KICI_SCALER_IDLE_TIMEOUT`, 5000).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_scaler_idle_timeout_ms(
    config: *mut kici_config,
    millis: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.scaler_idle_timeout = Duration::from_millis(millis);
            Ok(())
        })
    }
}

/// Sets how long a scaler-managed agent waits for a pre-bound job, in ms, 0 = no wait, at
/// most 7 days (`KICI_SCALER_PENDING_DISPATCH_TIMEOUT`, 60000).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_scaler_pending_dispatch_timeout_ms(
    config: *mut kici_config,
    millis: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.scaler_pending_dispatch_timeout = Duration::from_millis(millis);
            Ok(())
        })
    }
}

/// Forces the execution backend, `container` | `bare-metal` | `firecracker`
/// (`KICI_EXECUTION_MODE`); "" means automatic (the default).
///
/// Ownership: `config` is borrowed; `mode` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_execution_mode(
    config: *mut kici_config,
    mode: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, mode, "mode", err, |config, mode| {
            config.execution_mode = match mode {
                "" => None,
                mode => Some(parse_choice::<ExecutionMode>("mode", mode)?),
            };
            Ok(())
        })
    }
}

/// Sets the longest wait for a concurrency-group `proceed` in ms, >= 1000 and at most 7 days
/// (`KICI_CONCURRENCY_WAIT_TIMEOUT_MS`, 3600000).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_concurrency_wait_timeout_ms(
    config: *mut kici_config,
    millis: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.concurrency_wait_timeout = Duration::from_millis(millis);
            Ok(())
        })
    }
}

/// Marks this host as running the orchestrator, so workflow reboots are refused
/// (`KICI_AGENT_IS_ORCHESTRATOR_HOST`, false).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_is_orchestrator_host(
    config: *mut kici_config,
    is_orchestrator_host: bool,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.is_orchestrator_host = is_orchestrator_host;
            Ok(())
        })
    }
}

/// Sets how many jobs run at the same time, >= 1 (`KICI_MAX_CONCURRENCY`, 1). Above 1, C
/// executor callbacks run concurrently.
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_max_concurrency(
    config: *mut kici_config,
    jobs: u32,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.max_concurrency = jobs;
            Ok(())
        })
    }
}

/// Sets the longest graceful cancel before the job is force-stopped, in ms
/// (`KICI_CANCEL_GRACE_MS`, 30000).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_cancel_grace_ms(
    config: *mut kici_config,
    millis: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.cancel_grace = Duration::from_millis(millis);
            Ok(())
        })
    }
}

/// Sets how long a shutdown without an explicit grace (and `kici_agent_free`) waits for the
/// running job, in ms (`KICI_SHUTDOWN_GRACE_MS`, 10000).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_shutdown_grace_ms(
    config: *mut kici_config,
    millis: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.shutdown_grace = Duration::from_millis(millis);
            Ok(())
        })
    }
}

/// Sets the JSON step map (step name -> shell command) of the built-in shell executor
/// (`KICI_STEP_MAP`); "" removes it. The file must be readable when validated.
///
/// Ownership: `config` is borrowed; `path` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_step_map_file(
    config: *mut kici_config,
    path: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, path, "path", err, |config, path| {
            config.step_map_file = optional_text(path).map(PathBuf::from);
            Ok(())
        })
    }
}

/// Sets a PEM file of extra CA certificates trusted for `wss://` and git HTTPS clones, on top of
/// the platform's roots (`KICI_TLS_CA_FILE`; `kici_config_from_env` falls back to a readable
/// `NODE_EXTRA_CA_CERTS`); "" removes it. The file must hold a certificate when validated. git's
/// trust is process-wide: once an agent started with it, every agent in the process trusts it
/// for clones.
///
/// Ownership: `config` is borrowed; `path` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_tls_ca_file(
    config: *mut kici_config,
    path: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, path, "path", err, |config, path| {
            config.tls_ca_file = optional_text(path).map(PathBuf::from);
            Ok(())
        })
    }
}

/// Sets a program that runs every step not taken by a registered executor
/// (`KICI_PROCESS_EXECUTOR`); "" removes it.
///
/// Ownership: `config` is borrowed; `program` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_process_executor(
    config: *mut kici_config,
    program: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, program, "program", err, |config, program| {
            config.process_executor = optional_text(program);
            Ok(())
        })
    }
}

/// Sets the Node.js (>= 20.6) that runs TypeScript jobs (`KICI_NODE`); "" removes it (then
/// `node` on PATH is used).
///
/// Ownership: `config` is borrowed; `path` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_node(
    config: *mut kici_config,
    path: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, path, "path", err, |config, path| {
            config.node = optional_text(path).map(PathBuf::from);
            Ok(())
        })
    }
}

/// Sets the container image for jobs that name none (`KICI_CONTAINER_IMAGE`); "" removes it.
///
/// Ownership: `config` is borrowed; `image` is copied. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_default_container_image(
    config: *mut kici_config,
    image: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update_text(config, image, "image", err, |config, image| {
            config.default_container_image = optional_text(image);
            Ok(())
        })
    }
}

/// Enables development mode (`KICI_DEV=true`, false).
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_dev(
    config: *mut kici_config,
    dev: bool,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.dev = dev;
            Ok(())
        })
    }
}

/// Sets the outbound throttle (`KICI_RATE_MSGS_PER_SEC` 80, `KICI_RATE_MSG_BURST` 150,
/// `KICI_RATE_BYTES_PER_SEC` 450000, `KICI_RATE_BYTE_BURST` 1500000). Rates must be finite and
/// > 0, bursts finite and >= 1.
///
/// Ownership: `config` is borrowed. Thread safety: see `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set_rate_limits(
    config: *mut kici_config,
    msgs_per_sec: f64,
    msg_burst: f64,
    bytes_per_sec: f64,
    byte_burst: f64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |config| {
            config.rate_limits = RateLimits {
                msgs_per_sec,
                msg_burst,
                bytes_per_sec,
                byte_burst,
            };
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    fn new_config() -> *mut kici_config {
        let mut config = ptr::null_mut();
        // SAFETY: `config` is writable local storage.
        let code = unsafe { kici_config_new(&mut config, ptr::null_mut()) };
        assert_eq!(code, kici_result::Ok);
        config
    }

    #[test]
    fn a_new_configuration_needs_a_url_and_setters_reach_the_core_config() {
        let config = new_config();
        // SAFETY: `config` is live until the free at the end; every other pointer is a live
        // local or a C string literal.
        unsafe {
            assert_eq!(
                kici_config_validate(config, ptr::null_mut()),
                kici_result::InvalidConfig
            );
            let set = |code: kici_result| assert_eq!(code, kici_result::Ok);
            set(kici_config_set_orchestrator_url(
                config,
                c"ws://127.0.0.1:9/ws".as_ptr(),
                ptr::null_mut(),
            ));
            set(kici_config_set_agent_id(
                config,
                c"runner-7".as_ptr(),
                ptr::null_mut(),
            ));
            let labels = [c"gpu".as_ptr(), c" Linux ".as_ptr()];
            set(kici_config_set_labels(
                config,
                labels.as_ptr(),
                labels.len(),
                ptr::null_mut(),
            ));
            set(kici_config_set_property(
                config,
                c"cores".as_ptr(),
                c"8".as_ptr(),
                ptr::null_mut(),
            ));
            set(kici_config_set_property(
                config,
                c"cores".as_ptr(),
                c"16".as_ptr(),
                ptr::null_mut(),
            ));
            set(kici_config_set_port(config, 0, ptr::null_mut()));
            set(kici_config_set_log_level(
                config,
                c"debug".as_ptr(),
                ptr::null_mut(),
            ));
            set(kici_config_set_token(
                config,
                c"kat_x".as_ptr(),
                ptr::null_mut(),
            ));
            set(kici_config_set_execution_mode(
                config,
                c"bare-metal".as_ptr(),
                ptr::null_mut(),
            ));
            set(kici_config_set_max_concurrency(config, 3, ptr::null_mut()));
            set(kici_config_set_cancel_grace_ms(
                config,
                250,
                ptr::null_mut(),
            ));
            set(kici_config_set_node(
                config,
                c"/opt/node/bin/node".as_ptr(),
                ptr::null_mut(),
            ));
            assert_eq!(
                kici_config_validate(config, ptr::null_mut()),
                kici_result::Ok
            );
            let core = (*config).agent_config();
            assert_eq!(core.agent_id, "runner-7");
            assert_eq!(core.labels, vec!["gpu", " Linux "]);
            assert_eq!(
                core.properties,
                vec![("cores".to_string(), PropertyValue::Number(16.into()))]
            );
            assert_eq!((core.port, core.max_concurrency), (0, 3));
            assert_eq!(core.log_level, LogLevel::Debug);
            assert_eq!(core.execution_mode, Some(ExecutionMode::BareMetal));
            assert_eq!(core.cancel_grace, Duration::from_millis(250));
            assert_eq!(
                core.node.as_deref(),
                Some(std::path::Path::new("/opt/node/bin/node"))
            );
            set(kici_config_set_token(config, c"".as_ptr(), ptr::null_mut()));
            set(kici_config_set_node(config, c"".as_ptr(), ptr::null_mut()));
            set(kici_config_set_execution_mode(
                config,
                c"".as_ptr(),
                ptr::null_mut(),
            ));
            let core = (*config).agent_config();
            assert!(core.token.is_none() && core.execution_mode.is_none() && core.node.is_none());
            kici_config_free(config);
        }
    }

    #[test]
    fn bad_values_are_refused_without_changing_the_configuration() {
        let config = new_config();
        // SAFETY: `config` is live until the free at the end.
        unsafe {
            let mut error = ptr::null_mut();
            let code = kici_config_set_log_format(config, c"yaml".as_ptr(), &mut error);
            assert_eq!(code, kici_result::InvalidArgument);
            let message = std::ffi::CStr::from_ptr(crate::error::kici_error_message(error));
            assert!(message.to_string_lossy().contains("plain"), "{message:?}");
            crate::error::kici_error_free(error);
            let labels = [c"ok".as_ptr(), ptr::null()];
            let code = kici_config_set_labels(config, labels.as_ptr(), 2, ptr::null_mut());
            assert_eq!(code, kici_result::NullArgument);
            assert!((*config).agent_config().labels.is_empty());
            let code = kici_config_set_bind_address(config, c"not-an-ip".as_ptr(), ptr::null_mut());
            assert_eq!(code, kici_result::InvalidArgument);
            let roles = [c"all".as_ptr()];
            assert_eq!(
                kici_config_set_roles(config, roles.as_ptr(), 1, ptr::null_mut()),
                kici_result::Ok
            );
            assert_eq!(
                (*config).agent_config().roles,
                vec![Role::Builder, Role::InitRunner]
            );
            set_url_and_expect(config, kici_result::InvalidConfig);
            assert_eq!(
                kici_config_set_port(ptr::null_mut(), 1, ptr::null_mut()),
                kici_result::NullArgument
            );
            assert_eq!(
                kici_config_new(ptr::null_mut(), ptr::null_mut()),
                kici_result::NullArgument
            );
            assert_eq!(
                kici_config_from_env(ptr::null_mut(), ptr::null_mut()),
                kici_result::NullArgument
            );
            let mut count = 9;
            assert_eq!(
                kici_config_warning_count(config, &mut count, ptr::null_mut()),
                kici_result::Ok
            );
            assert_eq!(count, 0);
            let mut warning = ptr::null();
            assert_eq!(
                kici_config_warning(config, 0, &mut warning, ptr::null_mut()),
                kici_result::NotFound
            );
            assert!(warning.is_null());
            kici_config_free(config);
        }
    }

    /// Sets a valid URL and checks what validation says then.
    unsafe fn set_url_and_expect(config: *mut kici_config, expected: kici_result) {
        // SAFETY: forwarded caller contract.
        unsafe {
            kici_config_set_orchestrator_url(
                config,
                c"ws://127.0.0.1:9/ws".as_ptr(),
                ptr::null_mut(),
            );
            assert_eq!(kici_config_validate(config, ptr::null_mut()), expected);
        }
    }
}
