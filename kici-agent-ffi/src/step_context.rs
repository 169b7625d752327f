//! `kici_step_context`: what a C executor's `run_step` callback uses to write the step log, set
//! outputs, read the workspace and environment, and notice cancellation.

use std::ffi::{c_char, CStr, CString};
use std::sync::Mutex;

use kici_agent_core::SecretOutputError;
use kici_agent_core::{StepContext, StepIo};

use crate::boundary::{guard, guard_infallible, object, out, text};
use crate::error::{kici_error, kici_result, Failure};
use crate::string::c_string_lossy;

/// The context of one step attempt, handed to `run_step`. Opaque.
///
/// Lifetime: valid only until `run_step` returns; never keep the pointer. Strings read from it
/// are borrowed and die with it.
///
/// Thread safety: every function may be called from the callback's thread and from threads it
/// started and joins before returning, also at the same time.
pub struct kici_step_context {
    io: StepIo,
    workspace: CString,
    /// The step environment, sorted by name.
    env: Vec<(CString, CString)>,
    failure: Mutex<Option<String>>,
}

impl kici_step_context {
    pub(crate) fn new(io: StepIo, step: &StepContext) -> Self {
        kici_step_context {
            io,
            workspace: c_string_lossy(step.workspace.to_string_lossy()),
            env: step
                .env
                .iter()
                .map(|(name, value)| (c_string_lossy(name), c_string_lossy(value)))
                .collect(),
            failure: Mutex::new(None),
        }
    }

    /// The message set by `kici_step_context_set_failure`, if any.
    pub(crate) fn take_failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Runs `body` with the context behind `context`.
///
/// # Safety
/// `context` must be NULL or the context of a running callback.
unsafe fn with_context(
    context: *const kici_step_context,
    err: *mut *mut kici_error,
    body: impl FnOnce(&kici_step_context) -> Result<(), Failure>,
) -> kici_result {
    guard(err, || {
        // SAFETY: guaranteed by the caller.
        let context = unsafe { object(context, "context") }?;
        body(context)
    })
}

/// Writes one line to the step log (a newline is added). The bytes need not be UTF-8; the line
/// is masked (secrets become `***`) and capped like any step output. Blocks while the log
/// backlog is full.
///
/// Ownership: `context` and `line` are borrowed. Thread safety: see `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_write_line(
    context: *mut kici_step_context,
    line: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            if line.is_null() {
                return Err(Failure::null("line"));
            }
            // SAFETY: non-NULL and NUL-terminated by contract.
            let line = CStr::from_ptr(line).to_bytes();
            let mut bytes = Vec::with_capacity(line.len() + 1);
            bytes.extend_from_slice(line);
            bytes.push(b'\n');
            context.io.blocking_write(bytes);
            Ok(())
        })
    }
}

/// Writes raw output bytes to the step log; they are split into lines, masked and capped like
/// any step output. `data` may be NULL when `len` is 0. Blocks while the log backlog is full.
///
/// Ownership: `context` and `data` are borrowed. Thread safety: see `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_write(
    context: *mut kici_step_context,
    data: *const u8,
    len: usize,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            if len == 0 {
                return Ok(());
            }
            if data.is_null() {
                return Err(Failure::null("data"));
            }
            // SAFETY: non-NULL and `len` bytes long by contract.
            let bytes = std::slice::from_raw_parts(data, len);
            context.io.blocking_write(bytes.to_vec());
            Ok(())
        })
    }
}

/// Sets step output `key` to the string `value` (reported as `outputs[step][key]` with the
/// job's result). Setting a key again replaces its value.
///
/// Ownership: `context`, `key` and `value` are borrowed (copied). Thread safety: see
/// `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_set_output(
    context: *mut kici_step_context,
    key: *const c_char,
    value: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            let (key, value) = (text(key, "key")?, text(value, "value")?);
            context
                .io
                .blocking_set_output(key, serde_json::Value::String(value.to_owned()));
            Ok(())
        })
    }
}

/// Sets secret output `key` of the job to the string `value`. The value is encrypted for the
/// run's key (the dispatch's `runPublicKey`) and sent only in `secretOutputs` of the job's
/// terminal status (a successful job's), never in plain outputs; from this call on it is masked
/// in every log line of the job. Setting a key again replaces its value.
///
/// `KICI_RESULT_INVALID_STATE` when the dispatch carried no usable `runPublicKey`, and
/// `KICI_RESULT_INVALID_ARGUMENT` for an empty `key`: the step then fails with that message
/// (naming the key, never the value) even if `run_step` returns 0.
///
/// Ownership: `context`, `key` and `value` are borrowed (copied). Thread safety: see
/// `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_set_secret_output(
    context: *mut kici_step_context,
    key: *const c_char,
    value: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            let (key, value) = (text(key, "key")?, text(value, "value")?);
            context
                .io
                .blocking_set_secret_output(key, value)
                .map_err(|e| match e {
                    SecretOutputError::EmptyName => Failure::invalid(e.to_string()),
                    SecretOutputError::NoRunKey { .. } => Failure::state(e.to_string()),
                })
        })
    }
}

/// Sets step output `key` to a JSON value (`json` is one JSON document: number, object, ...);
/// `KICI_RESULT_INVALID_ARGUMENT` when it does not parse.
///
/// Ownership: `context`, `key` and `json` are borrowed (copied). Thread safety: see
/// `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_set_output_json(
    context: *mut kici_step_context,
    key: *const c_char,
    json: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            let (key, json) = (text(key, "key")?, text(json, "json")?);
            let value: serde_json::Value = serde_json::from_str(json)
                .map_err(|e| Failure::invalid(format!("`json` is not valid JSON: {e}")))?;
            context.io.blocking_set_output(key, value);
            Ok(())
        })
    }
}

/// Sets the message the step fails with when `run_step` returns non-zero (the last call wins).
/// Without it the message names the executor and the returned code. The message is masked.
///
/// Ownership: `context` and `message` are borrowed (copied). Thread safety: see
/// `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_set_failure(
    context: *mut kici_step_context,
    message: *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            let message = text(message, "message")?;
            *context.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.to_owned());
            Ok(())
        })
    }
}

/// Whether the step should stop: a cancel from the orchestrator, the step or job timeout, or a
/// shutdown. Poll it and return promptly once it is true (a thread cannot be killed; the agent
/// stops waiting after the cancel grace). Returns true for a NULL `context`, so loops end.
///
/// Ownership: `context` is borrowed. Thread safety: see `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_is_cancelled(context: *const kici_step_context) -> bool {
    guard_infallible(true, || {
        // SAFETY: the caller passes NULL or the context of a running callback.
        unsafe { context.as_ref() }.map_or(true, |context| context.io.is_cancelled())
    })
}

/// The step's working directory (the job workspace).
///
/// Ownership: `*out_path` is borrowed from `context` (valid until `run_step` returns).
/// Thread safety: see `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_workspace(
    context: *const kici_step_context,
    out_path: *mut *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            out(out_path, "out_path")?.write(context.workspace.as_ptr());
            Ok(())
        })
    }
}

/// The value of variable `name` in the environment the step should run with (sanitised host
/// variables, the workflow's `env`, `KICI_STEP_NAME`, `KICI_ENV`...), or
/// `KICI_RESULT_NOT_FOUND`.
///
/// Ownership: `*out_value` is borrowed from `context` (valid until `run_step` returns).
/// Thread safety: see `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_env(
    context: *const kici_step_context,
    name: *const c_char,
    out_value: *mut *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            let (name, slot) = (text(name, "name")?, out(out_value, "out_value")?);
            let (_, value) = context
                .env
                .iter()
                .find(|(known, _)| known.as_bytes() == name.as_bytes())
                .ok_or_else(|| {
                    Failure::new(kici_result::NotFound, format!("`{name}` is not set"))
                })?;
            slot.write(value.as_ptr());
            Ok(())
        })
    }
}

/// The number of variables in the step environment.
///
/// Ownership: `context` is borrowed. Thread safety: see `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_env_count(
    context: *const kici_step_context,
    out_count: *mut usize,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            out(out_count, "out_count")?.write(context.env.len());
            Ok(())
        })
    }
}

/// Variable number `index` (from 0, sorted by name) of the step environment;
/// `KICI_RESULT_NOT_FOUND` past the end.
///
/// Ownership: `*out_name` and `*out_value` are borrowed from `context` (valid until `run_step`
/// returns). Thread safety: see `kici_step_context`.
#[no_mangle]
pub unsafe extern "C" fn kici_step_context_env_entry(
    context: *const kici_step_context,
    index: usize,
    out_name: *mut *const c_char,
    out_value: *mut *const c_char,
    err: *mut *mut kici_error,
) -> kici_result {
    // SAFETY: forwarded caller contract.
    unsafe {
        with_context(context, err, |context| {
            let name_slot = out(out_name, "out_name")?;
            let value_slot = out(out_value, "out_value")?;
            let (name, value) = context.env.get(index).ok_or_else(|| {
                Failure::new(
                    kici_result::NotFound,
                    format!(
                        "the environment has {} variables, no variable {index}",
                        context.env.len()
                    ),
                )
            })?;
            name_slot.write(name.as_ptr());
            value_slot.write(value.as_ptr());
            Ok(())
        })
    }
}
