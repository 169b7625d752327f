//! `kici_agent`: one agent inside the host's process, with its own runtime, connection, HTTP
//! endpoints (`/health`, `/ready`, `/metrics`), metrics and events. Several agents may live in
//! one process.

use std::ffi::{c_char, CString};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kici_agent_core::{Agent, AgentError, Executor};

use crate::boundary::{guard, guard_infallible, object, out, text};
use crate::config::kici_config;
use crate::error::{kici_error, kici_result, Failure, FfiResult};
use crate::executor::{kici_executor, ExecutorLease};
use crate::string::{c_string_lossy, into_c_owned};
use crate::KICI_WAIT_FOREVER;

/// One agent. Opaque.
///
/// Life: `kici_agent_new` -> `kici_agent_register_*_executor` -> `kici_agent_start` (returns at
/// once) -> `kici_agent_drain` or `kici_agent_shutdown` -> `kici_agent_wait` ->
/// `kici_agent_free`.
///
/// Which executor runs a step (the core's one rule): the executor registered for the step's
/// name, else the one registered for its job's name, else the job's container (a job that
/// names a container image runs its other steps in it), else the default executor, else the
/// built-in one the configuration selects (`process_executor`, else the shell executor with the
/// step map). A registered step or job executor wins over the job's container: the step runs on
/// the host, and the job's log says so. A TypeScript job (`.ts` source) that no registered
/// executor claims (none for the job, none for any of its steps, no default) and no step map or
/// process executor claims runs through the TypeScript runner (Node >= 20.6).
///
/// Thread safety: every function except `kici_agent_free` may be called from any host thread,
/// also at the same time. `kici_agent_free` must be the last call, made when no other call on
/// the agent is running. Blocking calls (`kici_agent_start`, `kici_agent_wait`) refuse to run
/// on an agent thread (inside an executor callback) with `KICI_RESULT_INVALID_STATE`.
/// Forking after `kici_agent_start` is not supported.
pub struct kici_agent {
    agent_id: CString,
    core: Agent,
    /// The registered C executors, kept alive until the agent is freed. Declared after `core`
    /// so that they are released after the core agent stopped (fields drop in order).
    leases: Mutex<Vec<ExecutorLease>>,
}

impl kici_agent {
    /// The running agent, `None` when it was stopped before it started.
    fn started(&self) -> FfiResult<Option<&Agent>> {
        if self.core.http_addr().is_some() {
            Ok(Some(&self.core))
        } else if self.core.state().stopped {
            Ok(None)
        } else {
            Err(Failure::state(
                "the agent is not started: call kici_agent_start first",
            ))
        }
    }
}

fn agent_failure(error: AgentError) -> Failure {
    let code = match &error {
        AgentError::Config(_) | AgentError::StepMap(_) | AgentError::Sandbox(_) => {
            kici_result::InvalidConfig
        }
        AgentError::Runtime(_) | AgentError::Http { .. } | AgentError::Container(_) => {
            kici_result::Io
        }
        AgentError::AlreadyStarted
        | AgentError::StoppedBeforeStart
        | AgentError::RegisteredAfterStart => kici_result::InvalidState,
    };
    Failure::new(code, error.to_string())
}

/// Blocking on an agent thread would stall or deadlock the agent (a callback waiting for its
/// own agent to stop), and `start` would panic inside a runtime.
fn refuse_on_agent_thread(call: &str) -> FfiResult {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Failure::state(format!(
            "{call} blocks and must be called from a host thread, not from an executor callback"
        )));
    }
    Ok(())
}

/// Durations beyond this are as good as forever; capping them keeps the core's deadline
/// arithmetic (`Instant + Duration`) from overflowing.
const LONGEST_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// A wait in milliseconds: `None` (no limit) for `KICI_WAIT_FOREVER` or anything over a year.
fn timeout(millis: u64) -> Option<Duration> {
    let duration = Duration::from_millis(millis);
    (millis != KICI_WAIT_FOREVER && duration <= LONGEST_DURATION).then_some(duration)
}

/// Runs `body` with the agent behind `agent`.
///
/// # Safety
/// `agent` must be NULL or a live agent.
unsafe fn with_agent(
    agent: *const kici_agent,
    err: *mut *mut kici_error,
    body: impl FnOnce(&kici_agent) -> FfiResult,
) -> kici_result {
    guard(err, || {
        // SAFETY: guaranteed by the caller.
        let agent = unsafe { object(agent, "agent") }?;
        body(agent)
    })
}

/// Registers `executor` with an agent that is not started yet, through `add`.
///
/// # Safety
/// `agent` and `executor` must be NULL or live objects of this library.
unsafe fn register(
    agent: *mut kici_agent,
    executor: *const kici_executor,
    err: *mut *mut kici_error,
    add: impl FnOnce(&Agent, Arc<dyn Executor>) -> Result<(), Failure>,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_agent(agent, err, |agent| {
            let executor = object(executor, "executor")?;
            add(&agent.core, executor.shared())?;
            agent
                .leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(executor.lease());
            Ok(())
        })
    }
}

/// Creates an agent from `config` (copied and validated: `KICI_RESULT_INVALID_CONFIG` lists
/// every problem, and names an unreadable step map; `KICI_RESULT_IO` for an unusable
/// `DOCKER_HOST` in container execution mode). Nothing connects and no job runs until
/// `kici_agent_start`.
///
/// Ownership: `config` is borrowed and may be freed right after. On success `*out_agent`
/// receives an agent the caller owns and frees with `kici_agent_free`. Thread safety: safe from
/// any thread; `config` must not be changed during the call.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_new(
    config: *const kici_config,
    out_agent: *mut *mut kici_agent,
    err: *mut *mut kici_error,
) -> kici_result {
    guard(err, || {
        // SAFETY: the caller passes NULL or live, writable pointers.
        let (config, slot) = unsafe { (object(config, "config")?, out(out_agent, "out_agent")?) };
        let core = Agent::new(config.agent_config()?).map_err(agent_failure)?;
        let agent = kici_agent {
            agent_id: c_string_lossy(core.agent_id().to_owned()),
            core,
            leases: Mutex::new(Vec::new()),
        };
        slot.write(Box::into_raw(Box::new(agent)));
        Ok(())
    })
}

/// Runs the steps named `step_name` with `executor`, in any job: a step-name match beats a
/// job-name match, the job's container and the default (see `kici_agent` for the whole rule).
/// Registering a name again replaces the earlier executor. `KICI_RESULT_INVALID_STATE` after
/// `kici_agent_start`.
///
/// Ownership: `agent`, `step_name` and `executor` are borrowed; the agent keeps its own
/// reference to the executor. Thread safety: see `kici_agent`.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_register_step_executor(
    agent: *mut kici_agent,
    step_name: *const c_char,
    executor: *const kici_executor,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        register(agent, executor, err, |core, executor| {
            core.register_step_executor(text(step_name, "step_name")?, executor)
                .map_err(agent_failure)
        })
    }
}

/// Runs every step of the jobs named `job_name` (`jobConfig.name`) with `executor`, unless a
/// step executor matches; also when the job names a container image (the steps then run on
/// the host) or is a TypeScript job. `KICI_RESULT_INVALID_STATE` after `kici_agent_start`.
///
/// Ownership: `agent`, `job_name` and `executor` are borrowed; the agent keeps its own
/// reference to the executor. Thread safety: see `kici_agent`.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_register_job_executor(
    agent: *mut kici_agent,
    job_name: *const c_char,
    executor: *const kici_executor,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        register(agent, executor, err, |core, executor| {
            core.register_job_executor(text(job_name, "job_name")?, executor)
                .map_err(agent_failure)
        })
    }
}

/// Runs every step no step or job executor and no job container takes with `executor`,
/// instead of the built-in executor. It also claims TypeScript jobs, which then no longer run
/// through the TypeScript runner. `KICI_RESULT_INVALID_STATE` after `kici_agent_start`.
///
/// Ownership: `agent` and `executor` are borrowed; the agent keeps its own reference to the
/// executor. Thread safety: see `kici_agent`.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_register_default_executor(
    agent: *mut kici_agent,
    executor: *const kici_executor,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        register(agent, executor, err, |core, executor| {
            core.set_default_executor(executor).map_err(agent_failure)
        })
    }
}

/// Starts the agent in the background: its own runtime threads, the HTTP endpoints, and the
/// connection to the orchestrator (reconnecting as needed). Returns once the HTTP port is
/// bound, so a port conflict is `KICI_RESULT_IO` here; the agent can then be started again.
/// `KICI_RESULT_INVALID_CONFIG` for a setting this host cannot honour (`sandbox` without a
/// working `bwrap`); `KICI_RESULT_INVALID_STATE` when already started or stopped.
///
/// Ownership: `agent` is borrowed. Thread safety: see `kici_agent`; not from a callback.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_start(
    agent: *mut kici_agent,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_agent(agent, err, |agent| {
            refuse_on_agent_thread("kici_agent_start")?;
            agent.core.start().map_err(agent_failure)
        })
    }
}

/// Stops taking jobs (new dispatches are rejected as draining, `/ready` turns 503) and stops
/// once the running jobs are done. Returns at once; see `kici_agent_wait`. Before
/// `kici_agent_start` it just marks the agent stopped.
///
/// Ownership: `agent` is borrowed. Thread safety: see `kici_agent`.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_drain(
    agent: *mut kici_agent,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_agent(agent, err, |agent| {
            agent.core.drain();
            Ok(())
        })
    }
}

/// Stops: no new jobs; running jobs get `grace_ms` (at most a year) to finish, then they are
/// cancelled (C
/// executors see `kici_step_context_is_cancelled`) and reported cancelled. Returns at once; see
/// `kici_agent_wait`. Before `kici_agent_start` it just marks the agent stopped.
///
/// Ownership: `agent` is borrowed. Thread safety: see `kici_agent`.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_shutdown(
    agent: *mut kici_agent,
    grace_ms: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_agent(agent, err, |agent| {
            agent
                .core
                .shutdown(Duration::from_millis(grace_ms).min(LONGEST_DURATION));
            Ok(())
        })
    }
}

/// Waits until the agent stopped, at most `timeout_ms` (`KICI_WAIT_FOREVER` or over a year: no
/// limit):
/// `KICI_RESULT_OK` once stopped, `KICI_RESULT_TIMEOUT` if still running.
/// `KICI_RESULT_INVALID_STATE` if it was never started nor stopped.
///
/// Ownership: `agent` is borrowed. Thread safety: see `kici_agent`; blocks, not from a
/// callback.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_wait(
    agent: *const kici_agent,
    timeout_ms: u64,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_agent(agent, err, |agent| {
            refuse_on_agent_thread("kici_agent_wait")?;
            let Some(core) = agent.started()? else {
                return Ok(());
            };
            if core.wait(timeout(timeout_ms)) {
                Ok(())
            } else {
                Err(Failure::new(
                    kici_result::Timeout,
                    format!("the agent did not stop within {timeout_ms} ms"),
                ))
            }
        })
    }
}

/// The next event, waiting up to `timeout_ms` (`KICI_WAIT_FOREVER` or over a year: no limit),
/// as one JSON object with a `type`:
/// `registered` {agentId}; `disconnected`; `reconnect_scheduled` {attempt, delayMs};
/// `auth_failed` {reason};
/// `job_started` {runId, jobId, name}; `job_rejected` {runId, jobId, reason};
/// `step_finished` {runId, jobId, stepIndex, stepName, state, durationMs, error?};
/// `job_finished` {runId, jobId, name, state, durationMs, error?};
/// `self_shutdown` {reason} (a scaler-managed agent idled out); `stopped`.
/// `KICI_RESULT_TIMEOUT` when none came, `KICI_RESULT_CLOSED` once the agent stopped and every
/// event was read. Events are kept (up to 10000, oldest dropped) until read; read them from one
/// thread.
///
/// Ownership: on success `*out_json` receives a string the caller frees with
/// `kici_string_free`. Thread safety: see `kici_agent`; blocks up to `timeout_ms`.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_next_event(
    agent: *const kici_agent,
    timeout_ms: u64,
    out_json: *mut *mut c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_agent(agent, err, |agent| {
            let slot = out(out_json, "out_json")?;
            let closed =
                || Failure::new(kici_result::Closed, "the agent stopped; no event is left");
            let Some(core) = agent.started()? else {
                return Err(closed());
            };
            let stopped = core.state().stopped;
            let wait = if stopped {
                Some(Duration::ZERO)
            } else {
                timeout(timeout_ms)
            };
            match core.next_event(wait) {
                Some(event) => {
                    slot.write(into_c_owned(event.to_json()));
                    Ok(())
                }
                None if stopped => Err(closed()),
                None => Err(Failure::new(
                    kici_result::Timeout,
                    format!("no event within {timeout_ms} ms"),
                )),
            }
        })
    }
}

/// The Prometheus text exposition of this agent's metrics (what its `/metrics` serves), for
/// hosts that serve their own HTTP. `KICI_RESULT_INVALID_STATE` unless started.
///
/// Ownership: on success `*out_text` receives a string the caller frees with
/// `kici_string_free`. Thread safety: see `kici_agent`.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_metrics(
    agent: *const kici_agent,
    out_text: *mut *mut c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_agent(agent, err, |agent| {
            let slot = out(out_text, "out_text")?;
            let core = agent
                .started()?
                .ok_or_else(|| Failure::state("the agent was stopped before it started"))?;
            slot.write(into_c_owned(core.metrics_text()));
            Ok(())
        })
    }
}

/// The TCP port serving `/health`, `/ready` and `/metrics` (useful with port 0).
/// `KICI_RESULT_INVALID_STATE` unless started.
///
/// Ownership: `agent` is borrowed. Thread safety: see `kici_agent`.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_http_port(
    agent: *const kici_agent,
    out_port: *mut u16,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_agent(agent, err, |agent| {
            let slot = out(out_port, "out_port")?;
            let address = agent
                .started()?
                .and_then(|core| core.http_addr())
                .ok_or_else(|| Failure::state("the agent was stopped before it started"))?;
            slot.write(address.port());
            Ok(())
        })
    }
}

/// The agent's id (configured or generated), as registered with the orchestrator.
///
/// Ownership: `*out_id` is borrowed from `agent` and lives until `kici_agent_free`.
/// Thread safety: see `kici_agent`.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_id(
    agent: *const kici_agent,
    out_id: *mut *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_agent(agent, err, |agent| {
            out(out_id, "out_id")?.write(agent.agent_id.as_ptr());
            Ok(())
        })
    }
}

/// Frees an agent. NULL does nothing. A running agent is shut down first with the configured
/// shutdown grace, and this call waits for it (at most the grace plus 10 s). Then the agent's
/// references to its executors are released: an executor nothing else holds runs its
/// `free_user_data` before this call returns (or, for a callback that ignored a cancel, when
/// that callback returns).
///
/// Ownership: takes `agent`. Thread safety: the last call on `agent`, from a host thread, never
/// from an executor callback.
#[no_mangle]
pub unsafe extern "C" fn kici_agent_free(agent: *mut kici_agent) {
    guard_infallible((), || {
        if !agent.is_null() {
            // SAFETY: the caller hands back an agent from this library, exactly once.
            drop(unsafe { Box::from_raw(agent) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{kici_config_free, kici_config_new, kici_config_set};
    use std::ptr;

    fn new_agent() -> *mut kici_agent {
        // SAFETY: every pointer is a live local or a literal; the config is freed once.
        unsafe {
            let mut config = ptr::null_mut();
            assert_eq!(
                kici_config_new(&mut config, ptr::null_mut()),
                kici_result::Ok
            );
            for (name, value) in [
                (c"KICI_ORCHESTRATOR_URL", c"ws://127.0.0.1:9/ws"),
                (c"KICI_PORT", c"0"),
            ] {
                assert_eq!(
                    kici_config_set(config, name.as_ptr(), value.as_ptr(), ptr::null_mut()),
                    kici_result::Ok
                );
            }
            let mut agent = ptr::null_mut();
            assert_eq!(
                kici_agent_new(config, &mut agent, ptr::null_mut()),
                kici_result::Ok
            );
            kici_config_free(config);
            agent
        }
    }

    #[test]
    fn an_agent_that_never_started_refuses_queries_and_stops_on_shutdown() {
        let agent = new_agent();
        // SAFETY: `agent` is live until the free at the end.
        unsafe {
            let mut json = ptr::null_mut();
            let mut port = 0u16;
            assert_eq!(
                kici_agent_wait(agent, 0, ptr::null_mut()),
                kici_result::InvalidState
            );
            assert_eq!(
                kici_agent_next_event(agent, 0, &mut json, ptr::null_mut()),
                kici_result::InvalidState
            );
            assert_eq!(
                kici_agent_http_port(agent, &mut port, ptr::null_mut()),
                kici_result::InvalidState
            );
            assert_eq!(
                kici_agent_shutdown(agent, 0, ptr::null_mut()),
                kici_result::Ok
            );
            assert_eq!(kici_agent_wait(agent, 0, ptr::null_mut()), kici_result::Ok);
            assert_eq!(
                kici_agent_next_event(agent, 0, &mut json, ptr::null_mut()),
                kici_result::Closed
            );
            assert_eq!(
                kici_agent_start(agent, ptr::null_mut()),
                kici_result::InvalidState
            );
            assert!(json.is_null());
            kici_agent_free(agent);
        }
    }

    #[test]
    fn a_started_agent_serves_metrics_and_stops_within_its_grace() {
        let agent = new_agent();
        // SAFETY: `agent` is live until the free at the end; outputs are live locals.
        unsafe {
            assert_eq!(kici_agent_start(agent, ptr::null_mut()), kici_result::Ok);
            assert_eq!(
                kici_agent_start(agent, ptr::null_mut()),
                kici_result::InvalidState
            );
            let mut text = ptr::null_mut();
            assert_eq!(
                kici_agent_metrics(agent, &mut text, ptr::null_mut()),
                kici_result::Ok
            );
            assert!(std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .contains("kici_agent"));
            crate::string::kici_string_free(text);
            // Huge timeouts are capped instead of overflowing the core's deadlines.
            let huge = KICI_WAIT_FOREVER - 1;
            assert_eq!(
                kici_agent_wait(agent, 10, ptr::null_mut()),
                kici_result::Timeout
            );
            assert_eq!(
                kici_agent_shutdown(agent, huge, ptr::null_mut()),
                kici_result::Ok
            );
            assert_eq!(
                kici_agent_shutdown(agent, 0, ptr::null_mut()),
                kici_result::Ok
            );
            assert_eq!(
                kici_agent_wait(agent, huge, ptr::null_mut()),
                kici_result::Ok
            );
            let mut json = ptr::null_mut();
            loop {
                match kici_agent_next_event(agent, 0, &mut json, ptr::null_mut()) {
                    kici_result::Ok => crate::string::kici_string_free(json),
                    code => {
                        assert_eq!(code, kici_result::Closed);
                        break;
                    }
                }
            }
            kici_agent_free(agent);
        }
    }
}
