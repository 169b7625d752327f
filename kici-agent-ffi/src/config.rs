//! `kici_config`: an agent configuration, built setting by setting (`kici_config_set`, by the
//! names of the core's setting table) or loaded from the `KICI_*` environment, validated by the
//! core. Only conversions live here.

use std::ffi::{c_char, CString};

use kici_agent_core::config::{AgentConfigBuilder, ConfigError, PropertyValue, SettingValue};
use kici_agent_core::AgentConfig;

use crate::boundary::{guard, guard_infallible, object, object_mut, out, text};
use crate::error::{kici_error, kici_result, Failure, FfiResult};
use crate::string::c_string_lossy;

/// An agent configuration: every setting of the `KICI_*` environment. Opaque.
///
/// Create it with `kici_config_new` (defaults, no orchestrator URL) or `kici_config_from_env`,
/// change it with `kici_config_set` (any setting by name) and the list helpers
/// `kici_config_set_labels` and `kici_config_set_property`, pass it to `kici_agent_new` (which
/// copies it) and free it with `kici_config_free`. Setters refuse values they cannot read;
/// `kici_config_validate` and `kici_agent_new` check the settings together.
///
/// Thread safety: a configuration may move between threads, but a setter must not run while
/// any other call uses the same configuration. Calls taking `const kici_config *` may overlap
/// each other.
pub struct kici_config {
    builder: AgentConfigBuilder,
    /// The builder's warnings as C strings; only ever appended to, so that pointers handed out
    /// stay valid until `kici_config_free`.
    warnings: Vec<CString>,
}

impl kici_config {
    fn new(builder: AgentConfigBuilder) -> Self {
        let mut config = Self {
            builder,
            warnings: Vec::new(),
        };
        config.sync_warnings();
        config
    }

    /// The validated configuration as the core sees it (`KICI_RESULT_INVALID_CONFIG` lists
    /// every problem).
    pub(crate) fn agent_config(&self) -> FfiResult<AgentConfig> {
        self.builder.clone().build().map_err(config_failure)
    }

    fn sync_warnings(&mut self) {
        let new = &self.builder.warnings()[self.warnings.len()..];
        self.warnings
            .extend(new.iter().map(|warning| c_string_lossy(warning.as_str())));
    }
}

fn config_failure(error: ConfigError) -> Failure {
    Failure::new(kici_result::InvalidConfig, error.to_string())
}

/// A value a setter refused: `KICI_RESULT_INVALID_ARGUMENT`, one line per problem.
fn setter_failure(error: ConfigError) -> Failure {
    match error {
        ConfigError::Invalid(issues) => Failure::invalid(
            issues
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ),
        other => Failure::invalid(other.to_string()),
    }
}

/// Runs `change` on the builder behind `config`.
///
/// # Safety
/// `config` must be NULL or a live configuration no other thread uses.
unsafe fn update(
    config: *mut kici_config,
    err: *mut *mut kici_error,
    change: impl FnOnce(&mut AgentConfigBuilder) -> FfiResult,
) -> kici_result {
    guard(err, || {
        // SAFETY: guaranteed by the caller.
        let config = unsafe { object_mut(config, "config") }?;
        change(&mut config.builder)?;
        config.sync_warnings();
        Ok(())
    })
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

/// Creates a configuration with every default and no orchestrator URL: set
/// `KICI_ORCHESTRATOR_URL` with `kici_config_set`.
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
        let config = Box::new(kici_config::new(AgentConfigBuilder::default()));
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
        let builder = AgentConfigBuilder::from_env().map_err(config_failure)?;
        slot.write(Box::into_raw(Box::new(kici_config::new(builder))));
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
        config.agent_config().map(drop)
    })
}

/// The number of warnings: findings of `kici_config_from_env` and of setters that did not stop
/// them (an ignored `KICI_MAX_CONCURRENT_JOBS`).
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

/// Warning number `index` (from 0), oldest first; `KICI_RESULT_NOT_FOUND` past the end.
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

/// Sets the setting `name`: its `KICI_*` variable or its key (listed below) to `value`, text
/// read exactly like the environment variable: "" means unset (the default), durations are in
/// milliseconds, flags are on only when spelt as documented. A value that cannot be read gives
/// `KICI_RESULT_INVALID_ARGUMENT` and changes nothing; an unknown name gives
/// `KICI_RESULT_INVALID_ARGUMENT` with the closest known name. Checks across settings (a
/// readable file, a URL, reserved labels, ...) wait for `kici_config_validate` and
/// `kici_agent_new`.
///
/// Keys (variable, key, default: meaning), generated from the core's setting table:
/// - `KICI_ORCHESTRATOR_URL` (`url`), no default: Required. Orchestrator WebSocket URL, ws:// or
///   wss:// (e.g. ws://orchestrator:4000/ws).
/// - `KICI_AGENT_ID` (`agent_id`), no default: Agent id; unset or empty: `<hostname>-<8 hex>`,
///   regenerated on every start (durable hosts should set it).
/// - `KICI_LABELS` (`labels`), default empty: Comma-separated user labels, verbatim (no trimming,
///   empty items dropped); `kici:*` is reserved unless KICI_SCALER_MANAGED=1.
/// - `KICI_PROPERTIES` (`properties`), default empty: Comma-separated `key=value` host properties;
///   `true`/`false` become booleans, decimal numbers numbers, the rest text; later duplicates win.
/// - `KICI_ROLES` (`roles`), no default: Internal job roles. Unset or empty: none.
///   `builder`/`init-runner`/`all` are refused: KiCI TypeScript builder/init jobs need the Node
///   agent.
/// - `KICI_PORT` (`port`), default `8080`: HTTP port for /health, /ready and /metrics; 0 picks an
///   ephemeral port.
/// - `KICI_BIND_ADDRESS` (`bind_address`), default `::`: IP address the HTTP server binds to; `::`
///   = all interfaces.
/// - `KICI_LOG_LEVEL` (`log_level`), default `info`: Agent log level: debug | info | warn | error.
/// - `KICI_LOG_FORMAT` (`log_format`), default `auto`: Agent log format: auto (JSON unless stdout
///   is a TTY) | plain | json.
/// - `KICI_LOG_DIR` (`log_dir`), no default: Directory of an additional JSON log file
///   `agent-<suffix>-YYYY-MM-DD.log`, rotated daily and by size (gzip), old files removed. Unset,
///   empty or `undefined`: stdout only.
/// - `KICI_LOG_MAX_SIZE` (`log_max_size`), default `500m`: Size cap per log file: bytes or a k/m/g
///   suffix.
/// - `KICI_LOG_RETENTION_DAYS` (`log_retention_days`), default `7`: Days of log files kept in
///   KICI_LOG_DIR (>= 1); older ones are removed at start and at each day change.
/// - `KICI_CLUSTER_INSTANCE_ID` (`cluster_instance_id`), no default: Log-file suffix shared with
///   other KiCI services; beats KICI_AGENT_ID as the suffix (a generated agent id is never used).
/// - `KICI_PLATFORM_INSTANCE_ID` (`platform_instance_id`), no default: Log-file suffix of other
///   KiCI services; accepted.
/// - `KICI_AGENT_TOKEN` (`token`), no default: Pre-shared agent token (`kat_...`): authenticate
///   before registering. Unset or empty: unauthenticated.
/// - `KICI_GITHUB_TOKEN` (`github_token`), no default: Lowest-priority HTTPS clone credential, used
///   when a dispatch carries none.
/// - `KICI_MAX_LOG_SIZE_BYTES` (`max_log_size_bytes`), default `10485760`: Per-step log cap in
///   bytes (> 0; a step log cannot be switched off); a dispatch's maxLogSizeBytes overrides it.
/// - `KICI_DEFAULT_STEP_TIMEOUT_MS` (`default_step_timeout`), default `1800000`: Per-step timeout
///   in ms when the workflow sets none (> 0).
/// - `KICI_DOCKER_KEEP_FAILED` (`docker_keep_failed`), default `false`: Exactly `true`: keep the
///   containers of jobs that did not succeed.
/// - `KICI_JOB_HEARTBEAT_INTERVAL_MS` (`job_heartbeat_interval`), default `60000`: Period of
///   job.heartbeat messages during a job, in ms (> 0).
/// - `KICI_HEARTBEAT_INTERVAL_MS` (`heartbeat_interval`), default `30000`: Period of connection
///   heartbeats after registration, in ms (> 0 and < 180000: the orchestrator drops an agent after
///   180 s without one).
/// - `KICI_BACKPRESSURE_MODE` (`backpressure_mode`), default `pause`: Log-streaming backpressure:
///   pause (slow the step) | drop. This agent always pauses; `drop` is accepted with a warning.
/// - `KICI_SANDBOX` (`sandbox`), default `false`: Exactly `true`: bare-metal steps run inside a
///   bubblewrap sandbox (read-only system, private /tmp, the workspace at /workspace, own pid/ipc
///   namespaces); start-up fails when `bwrap` is missing or cannot run.
/// - `KICI_SANDBOX_NETWORK` (`sandbox_network`), default `isolated`: Network of the bubblewrap
///   sandbox: isolated (loopback only) | host.
/// - `KICI_SCALER_MANAGED` (`scaler_managed`), default `0`: Exactly `1`: ephemeral agent owned by
///   the auto-scaler: `kici:*` labels allowed, and the agent shuts itself down (exit 0) once idle
///   (KICI_SCALER_IDLE_TIMEOUT).
/// - `KICI_SCALER_IDLE_TIMEOUT` (`scaler_idle_timeout`), default `5000`: Scaler-managed: ms idle
///   (no job, registered) before the agent shuts itself down, at most 7 days; <= 0 = at once.
/// - `KICI_SCALER_PENDING_DISPATCH_TIMEOUT` (`scaler_pending_dispatch_timeout`), default `60000`:
///   Scaler-managed: ms to wait for a pre-bound job announced at registration (`pendingDispatch`)
///   before shutting down, at most 7 days; <= 0 = no longer than KICI_SCALER_IDLE_TIMEOUT.
/// - `KICI_EXECUTION_MODE` (`execution_mode`), no default: Force the execution backend: container |
///   bare-metal | firecracker. Unset: automatic.
/// - `KICI_CONCURRENCY_WAIT_TIMEOUT_MS` (`concurrency_wait_timeout`), default `3600000`: Max wait
///   in ms for a concurrency-group `proceed` (>= 1000, at most 7 days).
/// - `KICI_AGENT_IS_ORCHESTRATOR_HOST` (`is_orchestrator_host`), default `false`: Exactly `true`:
///   this host runs the orchestrator, so refuse workflow-requested reboots.
/// - `KICI_MAX_CONCURRENCY` (`max_concurrency`), default `1`: Jobs run at the same time (>= 1),
///   advertised at registration.
/// - `KICI_MAX_CONCURRENT_JOBS` (`max_concurrent_jobs`), no default: Set by scalers; used as
///   KICI_MAX_CONCURRENCY when that is unset and this is an integer >= 1, otherwise ignored with a
///   warning.
/// - `KICI_CANCEL_GRACE_MS` (`cancel_grace`), default `30000`: Longest graceful cancel in ms before
///   the job is force-killed (at most 7 days).
/// - `KICI_SHUTDOWN_GRACE_MS` (`shutdown_grace`), default `10000`: Graceful shutdown: ms to wait
///   for the running job before exiting (at most 7 days).
/// - `KICI_JOB_PIDS_MAX` (`job_pids_max`), default `0`: Most processes a job may have at once (a
///   fork bomb stops there), applied through the job's pids cgroup where the agent can make one; 0
///   = no limit.
/// - `KICI_STEP_MAP` (`step_map_file`), no default: JSON file mapping step names to shell commands,
///   read by the shell executor; must be readable.
/// - `KICI_PROCESS_EXECUTOR` (`process_executor`), no default: Program that runs every step instead
///   of the built-in executors.
/// - `KICI_NODE` (`node`), no default: Node.js (>= 20.6) that runs TypeScript jobs; unset: `node`
///   on PATH.
/// - `KICI_CONTAINER_IMAGE` (`default_container_image`), no default: Container image for jobs that
///   name none.
/// - `KICI_DEV` (`dev`), default `false`: Exactly `true`: development mode; unknown KICI_*
///   variables only warn.
/// - `KICI_CACHE` (`cache`), no default: Used by KiCI's cache tooling; accepted and ignored.
/// - `KICI_RATE_MSGS_PER_SEC` (`rate_msgs_per_sec`), default `80`: Outbound throttle: messages per
///   second (the orchestrator allows 100/s).
/// - `KICI_RATE_MSG_BURST` (`rate_msg_burst`), default `150`: Outbound throttle: message burst (the
///   orchestrator allows 200).
/// - `KICI_RATE_BYTES_PER_SEC` (`rate_bytes_per_sec`), default `450000`: Outbound throttle: bytes
///   per second (the orchestrator allows 512000/s).
/// - `KICI_RATE_BYTE_BURST` (`rate_byte_burst`), default `1500000`: Outbound throttle: byte burst
///   (the orchestrator allows 2097152).
/// - `KICI_TLS_CA_FILE` (`tls_ca_file`), no default: PEM file of extra CA certificates trusted for
///   wss:// and git HTTPS clones, besides the system's; unset: NODE_EXTRA_CA_CERTS.
///
/// (End of the generated keys.)
///
/// Ownership: `config` is borrowed; `name` and `value` are copied. Thread safety: see
/// `kici_config`.
#[no_mangle]
pub unsafe extern "C" fn kici_config_set(
    config: *mut kici_config,
    name: *const c_char,
    value: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(config, err, |builder| {
            let (name, value) = (text(name, "name")?, text(value, "value")?);
            builder.set(name, value).map_err(setter_failure)
        })
    }
}

/// Replaces the user labels with `count` labels (`KICI_LABELS` as a list, for labels holding a
/// comma). Labels are kept verbatim; `kici:*` is reserved unless scaler-managed. `labels` may be
/// NULL when `count` is 0. On failure the labels are unchanged.
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
        update(config, err, |builder| {
            let labels = text_list(labels, count, "labels")?;
            let labels = SettingValue::List(labels.into_iter().map(str::to_owned).collect());
            builder
                .set_value("KICI_LABELS", labels)
                .map_err(setter_failure)
        })
    }
}

/// Sets host property `key` (`KICI_PROPERTIES` one at a time, for keys or values holding a comma
/// or `=`): `value` is typed like the environment's (`true`/`false` become booleans, decimal
/// numbers numbers, the rest text). Setting a key again replaces its value and keeps its
/// position.
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
        update(config, err, |builder| {
            let (key, value) = (text(key, "key")?, text(value, "value")?);
            builder.set_property(key, PropertyValue::parse(value));
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kici_agent_core::config::{ExecutionMode, LogLevel, SETTINGS};
    use std::ffi::CStr;
    use std::ptr;
    use std::time::Duration;

    fn new_config() -> *mut kici_config {
        let mut config = ptr::null_mut();
        // SAFETY: `config` is writable local storage.
        let code = unsafe { kici_config_new(&mut config, ptr::null_mut()) };
        assert_eq!(code, kici_result::Ok);
        config
    }

    /// `kici_config_set` with Rust strings.
    ///
    /// # Safety
    /// `config` must be live.
    unsafe fn set(config: *mut kici_config, name: &str, value: &str) -> (kici_result, String) {
        let (name, value) = (CString::new(name).unwrap(), CString::new(value).unwrap());
        let mut error = ptr::null_mut();
        // SAFETY: forwarded caller contract; the strings live until the end of the call.
        unsafe {
            let code = kici_config_set(config, name.as_ptr(), value.as_ptr(), &mut error);
            let message = if error.is_null() {
                String::new()
            } else {
                let message = CStr::from_ptr(crate::error::kici_error_message(error));
                let message = message.to_string_lossy().into_owned();
                crate::error::kici_error_free(error);
                message
            };
            (code, message)
        }
    }

    #[test]
    fn a_new_configuration_needs_a_url_and_settings_reach_the_core_config() {
        let config = new_config();
        // SAFETY: `config` is live until the free at the end; every other pointer is a live
        // local or a C string literal.
        unsafe {
            assert_eq!(
                kici_config_validate(config, ptr::null_mut()),
                kici_result::InvalidConfig
            );
            for (name, value) in [
                ("KICI_ORCHESTRATOR_URL", "ws://127.0.0.1:9/ws"),
                ("agent_id", "runner-7"),
                ("KICI_PORT", "0"),
                ("log_level", "debug"),
                ("KICI_AGENT_TOKEN", "kat_x"),
                ("KICI_EXECUTION_MODE", "bare-metal"),
                ("KICI_MAX_CONCURRENCY", "3"),
                ("KICI_CANCEL_GRACE_MS", "250"),
                ("KICI_NODE", "/opt/node/bin/node"),
                ("KICI_JOB_PIDS_MAX", "128"),
                ("KICI_LOG_DIR", "/var/log/kici"),
                ("KICI_LOG_RETENTION_DAYS", "3"),
            ] {
                assert_eq!(set(config, name, value), (kici_result::Ok, String::new()));
            }
            let labels = [c"gpu".as_ptr(), c"a,b".as_ptr()];
            let code = kici_config_set_labels(config, labels.as_ptr(), 2, ptr::null_mut());
            assert_eq!(code, kici_result::Ok);
            for value in [c"8", c"16"] {
                let code = kici_config_set_property(
                    config,
                    c"cores".as_ptr(),
                    value.as_ptr(),
                    ptr::null_mut(),
                );
                assert_eq!(code, kici_result::Ok);
            }
            assert_eq!(
                kici_config_validate(config, ptr::null_mut()),
                kici_result::Ok
            );
            let core = (*config).agent_config().unwrap();
            assert_eq!(core.agent_id, "runner-7");
            assert_eq!(core.labels, vec!["gpu", "a,b"]);
            assert_eq!(
                core.properties,
                vec![("cores".to_string(), PropertyValue::Number(16.into()))]
            );
            assert_eq!((core.port, core.max_concurrency), (0, 3));
            assert_eq!(core.log_level, LogLevel::Debug);
            assert_eq!(core.execution_mode, Some(ExecutionMode::BareMetal));
            assert_eq!(core.cancel_grace, Duration::from_millis(250));
            assert_eq!(core.job_pids_max, 128);
            assert_eq!(core.log_retention_days, 3);
            assert_eq!(
                core.node.as_deref(),
                Some(std::path::Path::new("/opt/node/bin/node"))
            );
            assert_eq!(
                core.log_dir.as_deref(),
                Some(std::path::Path::new("/var/log/kici"))
            );
            for name in [
                "KICI_AGENT_TOKEN",
                "node",
                "KICI_EXECUTION_MODE",
                "KICI_PORT",
            ] {
                assert_eq!(set(config, name, "").0, kici_result::Ok);
            }
            let core = (*config).agent_config().unwrap();
            assert!(core.token.is_none() && core.execution_mode.is_none() && core.node.is_none());
            assert_eq!(core.port, 8080);
            kici_config_free(config);
        }
    }

    #[test]
    fn every_setting_of_the_core_table_is_a_c_key_by_name_and_by_key() {
        let config = new_config();
        // SAFETY: `config` is live until the free at the end.
        unsafe {
            for setting in SETTINGS {
                assert_eq!(
                    set(config, setting.name, "").0,
                    kici_result::Ok,
                    "{}",
                    setting.name
                );
                assert_eq!(
                    set(config, setting.key, "").0,
                    kici_result::Ok,
                    "{}",
                    setting.key
                );
            }
            kici_config_free(config);
        }
    }

    #[test]
    fn bad_values_are_refused_without_changing_the_configuration() {
        let config = new_config();
        // SAFETY: `config` is live until the free at the end.
        unsafe {
            assert_eq!(
                set(config, "KICI_ORCHESTRATOR_URL", "ws://127.0.0.1:9/ws").0,
                kici_result::Ok
            );
            assert_eq!(
                set(config, "KICI_PROT", "1"),
                (
                    kici_result::InvalidArgument,
                    "unknown setting \"KICI_PROT\": did you mean KICI_PORT?".to_string()
                )
            );
            let (code, message) = set(config, "KICI_LOG_FORMAT", "yaml");
            assert_eq!(code, kici_result::InvalidArgument);
            assert_eq!(
                message,
                "KICI_LOG_FORMAT: expected one of auto, plain, json, got \"yaml\""
            );
            assert_eq!(
                set(config, "KICI_BIND_ADDRESS", "not-an-ip").0,
                kici_result::InvalidArgument
            );
            assert_eq!(
                set(config, "KICI_JOB_PIDS_MAX", "-1").0,
                kici_result::InvalidArgument
            );
            let labels = [c"ok".as_ptr(), ptr::null()];
            let code = kici_config_set_labels(config, labels.as_ptr(), 2, ptr::null_mut());
            assert_eq!(code, kici_result::NullArgument);
            let core = (*config).agent_config().unwrap();
            assert!(core.labels.is_empty());
            assert_eq!(core.log_format, Default::default());
            assert_eq!(core.job_pids_max, 0);
            assert_eq!(set(config, "KICI_ROLES", "all").0, kici_result::Ok);
            assert_eq!(
                kici_config_validate(config, ptr::null_mut()),
                kici_result::InvalidConfig
            );
            assert_eq!(
                kici_config_set(
                    ptr::null_mut(),
                    c"KICI_PORT".as_ptr(),
                    c"1".as_ptr(),
                    ptr::null_mut()
                ),
                kici_result::NullArgument
            );
            assert_eq!(
                kici_config_set(config, c"KICI_PORT".as_ptr(), ptr::null(), ptr::null_mut()),
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
            kici_config_free(config);
        }
    }

    #[test]
    fn setter_warnings_are_counted_and_stay_readable() {
        let config = new_config();
        // SAFETY: `config` is live until the free at the end.
        unsafe {
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
            assert_eq!(
                set(config, "KICI_MAX_CONCURRENT_JOBS", "many").0,
                kici_result::Ok
            );
            assert_eq!(
                kici_config_warning(config, 0, &mut warning, ptr::null_mut()),
                kici_result::Ok
            );
            assert_eq!(
                set(config, "KICI_MAX_CONCURRENT_JOBS", "0").0,
                kici_result::Ok
            );
            kici_config_warning_count(config, &mut count, ptr::null_mut());
            assert_eq!(count, 2);
            let first = CStr::from_ptr(warning).to_string_lossy();
            assert!(
                first.starts_with("KICI_MAX_CONCURRENT_JOBS=\"many\""),
                "{first}"
            );
            kici_config_free(config);
        }
    }
}
