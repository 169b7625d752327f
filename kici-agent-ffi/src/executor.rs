//! `kici_executor`: a step executor written in C, as a table of function pointers, wrapped into
//! the core's [`Executor`] trait. Callbacks run on blocking threads of the agent, never on its
//! async workers, so they may block.

use std::ffi::{c_char, c_void, CString};
use std::mem::{offset_of, size_of};
use std::sync::{Arc, Weak};

use kici_agent_core::{Executor, JobContext, StepContext, StepFailure, StepIo, StepResult};
use serde::Serialize;

use crate::boundary::{guard, guard_infallible, out, text};
use crate::error::{kici_error, kici_result, Failure};
use crate::step_context::kici_step_context;

/// The callbacks of a C step executor. Fill it, set `struct_size` to
/// `sizeof(kici_executor_vtable)`, and pass it to `kici_executor_new` (which copies it). Later
/// versions only append fields, so a table from an older header keeps working; fields beyond
/// `struct_size` count as NULL.
///
/// Callbacks are called on threads of the agent (not the host's), may block, and may run at the
/// same time for different steps (several jobs, or one executor shared by several agents), so
/// `user_data` must be safe to use from several threads. Callbacks must return normally:
/// never `longjmp` out of them or let a C++ exception escape.
#[repr(C)]
pub struct kici_executor_vtable {
    /// `sizeof(kici_executor_vtable)` as compiled by the caller.
    pub struct_size: usize,
    /// Passed to every callback; owned by the executor once `kici_executor_new` succeeds.
    pub user_data: *mut c_void,
    /// Optional. Called once, on any thread, when the executor is gone: after the last
    /// `kici_executor_free` / `kici_agent_free` and after every callback returned.
    pub free_user_data: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
    /// Required. Runs one step attempt. `job_json` (`{"runId","jobId","name","config",
    /// "workspace","upstreamJobOutputs"}`; the last: job -> step -> outputs of the jobs this
    /// one needs) and `step_json` (`{"index","name","spec","attempt","workspace"}`) are
    /// NUL-terminated UTF-8 JSON, valid until the callback returns; so is `context`. Return 0
    /// for success; any other value fails the step with that exit code and the message set by
    /// `kici_step_context_set_failure`. The agent goes on either way.
    pub run_step: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            job_json: *const c_char,
            step_json: *const c_char,
            context: *mut kici_step_context,
        ) -> i32,
    >,
    /// Optional. Called once per job before the first step this executor runs in it; a
    /// non-zero return fails that step.
    pub prepare_job:
        Option<unsafe extern "C" fn(user_data: *mut c_void, job_json: *const c_char) -> i32>,
    /// Optional. Called after the job's steps when `prepare_job` ran (also after failure or
    /// cancel, not after a forced cancel); may be called more than once.
    pub cleanup_job: Option<unsafe extern "C" fn(user_data: *mut c_void, job_json: *const c_char)>,
}

/// The smallest table accepted: everything up to and including `run_step`.
const MIN_VTABLE_SIZE: usize = offset_of!(kici_executor_vtable, run_step) + size_of::<usize>();

/// The C table, owning `user_data`.
struct Callbacks {
    table: kici_executor_vtable,
}

// SAFETY: the documented contract of `kici_executor_vtable` makes `user_data` and the callbacks
// usable from any thread, concurrently.
unsafe impl Send for Callbacks {}
// SAFETY: as above.
unsafe impl Sync for Callbacks {}

impl Drop for Callbacks {
    fn drop(&mut self) {
        if let Some(free_user_data) = self.table.free_user_data {
            // SAFETY: the last reference is gone, so no callback runs; called exactly once.
            unsafe { free_user_data(self.table.user_data) };
        }
    }
}

/// Keeps a C executor's callbacks (and so its `user_data`) alive. Held by `kici_executor`
/// handles, by the agents it is registered with, and by every callback call in flight, so that
/// `free_user_data` runs as soon as the last of them is gone: at the latest when
/// `kici_agent_free` returns, not whenever the agent's runtime threads drop their tasks.
#[derive(Clone)]
pub(crate) struct ExecutorLease {
    /// Only held, never read: dropping the last lease frees `user_data`.
    _callbacks: Arc<Callbacks>,
}

/// A C executor as the core sees it: it only borrows the callbacks (see [`ExecutorLease`]).
struct CExecutor {
    name: String,
    callbacks: Weak<Callbacks>,
}

impl CExecutor {
    /// The callbacks for one call, or a failure once every lease is gone (only possible for a
    /// task the agent's runtime still runs after `kici_agent_free`).
    fn callbacks(&self) -> Result<Arc<Callbacks>, StepFailure> {
        self.callbacks
            .upgrade()
            .ok_or_else(|| self.failure("the executor was released"))
    }

    fn failure(&self, what: &str) -> StepFailure {
        StepFailure::new(format!("C executor '{}': {what}", self.name))
    }

    fn json(&self, value: &impl Serialize) -> Result<CString, StepFailure> {
        let json = serde_json::to_string(value)
            .map_err(|e| self.failure(&format!("could not serialise the job or step: {e}")))?;
        // serde_json escapes control characters, so a NUL byte cannot appear.
        CString::new(json).map_err(|e| self.failure(&format!("NUL in the job or step JSON: {e}")))
    }

    /// Runs `call` on a blocking thread of the agent's runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StepFailure> {
        tokio::task::spawn_blocking(call)
            .await
            .map_err(|e| self.failure(&format!("the callback thread failed: {e}")))
    }
}

#[async_trait::async_trait]
impl Executor for CExecutor {
    fn name(&self) -> &str {
        &self.name
    }

    async fn prepare(&self, job: &JobContext) -> Result<(), StepFailure> {
        let callbacks = self.callbacks()?;
        let Some(prepare_job) = callbacks.table.prepare_job else {
            return Ok(());
        };
        let job_json = self.json(job)?;
        // SAFETY: the table's contract; the JSON outlives the call.
        let code = self
            .blocking(move || unsafe { prepare_job(callbacks.table.user_data, job_json.as_ptr()) })
            .await?;
        match code {
            0 => Ok(()),
            code => Err(StepFailure {
                message: format!("C executor '{}': prepare_job returned {code}", self.name),
                exit_code: Some(code),
            }),
        }
    }

    async fn run_step(&self, job: &JobContext, step: &StepContext, io: StepIo) -> StepResult {
        let callbacks = self.callbacks()?;
        let run_step = callbacks
            .table
            .run_step
            .ok_or_else(|| self.failure("no run_step callback"))?;
        let (job_json, step_json) = (self.json(job)?, self.json(step)?);
        let context = kici_step_context::new(io, step);
        let (code, message) = self
            .blocking(move || {
                let context_ptr = std::ptr::from_ref(&context).cast_mut();
                // SAFETY: the table's contract; the JSON and the context outlive the call, and
                // the context is only used through shared references.
                let code = unsafe {
                    run_step(
                        callbacks.table.user_data,
                        job_json.as_ptr(),
                        step_json.as_ptr(),
                        context_ptr,
                    )
                };
                (code, context.take_failure())
            })
            .await?;
        match code {
            0 => Ok(()),
            code => Err(StepFailure {
                message: message.unwrap_or_else(|| {
                    format!(
                        "step '{}' failed: C executor '{}' returned {code}",
                        step.name, self.name
                    )
                }),
                exit_code: Some(code),
            }),
        }
    }

    async fn cleanup(&self, job: &JobContext) {
        let Ok(callbacks) = self.callbacks() else {
            return;
        };
        let Some(cleanup_job) = callbacks.table.cleanup_job else {
            return;
        };
        let Ok(job_json) = self.json(job) else {
            return;
        };
        // SAFETY: the table's contract; the JSON outlives the call.
        let done = self
            .blocking(move || unsafe { cleanup_job(callbacks.table.user_data, job_json.as_ptr()) })
            .await;
        if let Err(failure) = done {
            tracing::warn!(%failure, "cleanup_job did not complete");
        }
    }
}

/// A C step executor. Opaque. Create it with `kici_executor_new`, register it with an agent
/// (`kici_agent_register_*_executor`, which keeps its own reference), and free it with
/// `kici_executor_free` whenever the caller no longer needs it.
///
/// Thread safety: immutable; may be used from any thread, also at the same time.
pub struct kici_executor {
    executor: Arc<CExecutor>,
    lease: ExecutorLease,
}

impl kici_executor {
    /// The executor as the core's registry holds it: one shared instance, so the agent calls
    /// `prepare_job` once per job even when the executor is registered under several names.
    pub(crate) fn shared(&self) -> Arc<dyn Executor> {
        self.executor.clone()
    }

    /// A lease for an agent the executor is registered with.
    pub(crate) fn lease(&self) -> ExecutorLease {
        self.lease.clone()
    }
}

/// Reads a caller's table, accepting older (shorter) and newer (longer) layouts.
///
/// # Safety
/// `vtable` must point to at least `struct_size` readable bytes, and `struct_size` bytes must
/// include the `struct_size` field itself.
unsafe fn read_vtable(
    vtable: *const kici_executor_vtable,
) -> Result<kici_executor_vtable, Failure> {
    // SAFETY: every table starts with `struct_size`.
    let struct_size = unsafe { std::ptr::addr_of!((*vtable).struct_size).read_unaligned() };
    if struct_size < MIN_VTABLE_SIZE {
        return Err(Failure::invalid(format!(
            "`vtable->struct_size` is {struct_size}; set it to sizeof(kici_executor_vtable) ({})",
            size_of::<kici_executor_vtable>()
        )));
    }
    let mut table = std::mem::MaybeUninit::<kici_executor_vtable>::zeroed();
    let known = struct_size.min(size_of::<kici_executor_vtable>());
    // SAFETY: `known` bytes are readable in the caller's table and writable in ours; an
    // all-zero table is valid (NULL pointers, `None` callbacks), and so is any prefix the C
    // compiler laid out with the same `repr(C)` layout.
    unsafe {
        std::ptr::copy_nonoverlapping(vtable.cast::<u8>(), table.as_mut_ptr().cast::<u8>(), known);
        Ok(table.assume_init())
    }
}

/// Creates a C executor from `vtable` (copied) and `name` (copied; used in logs and failure
/// messages). `KICI_RESULT_INVALID_ARGUMENT` when `struct_size` is too small or `run_step` is
/// NULL.
///
/// Ownership: on success the executor owns `vtable->user_data` (freed by `free_user_data` when
/// the last reference is gone) and `*out_executor` receives a reference the caller frees with
/// `kici_executor_free`. On failure nothing is taken and `free_user_data` is not called.
/// Thread safety: safe from any thread.
#[no_mangle]
pub unsafe extern "C" fn kici_executor_new(
    vtable: *const kici_executor_vtable,
    name: *const c_char,
    out_executor: *mut *mut kici_executor,
    err: *mut *mut kici_error,
) -> kici_result {
    guard(err, || {
        if vtable.is_null() {
            return Err(Failure::null("vtable"));
        }
        // SAFETY: the caller passes NULL or live, writable pointers and a table of
        // `struct_size` bytes.
        let (name, slot, table) = unsafe {
            (
                text(name, "name")?,
                out(out_executor, "out_executor")?,
                read_vtable(vtable)?,
            )
        };
        if table.run_step.is_none() {
            return Err(Failure::invalid("`vtable->run_step` must not be NULL"));
        }
        let callbacks = Arc::new(Callbacks { table });
        let executor = CExecutor {
            name: name.to_owned(),
            callbacks: Arc::downgrade(&callbacks),
        };
        slot.write(Box::into_raw(Box::new(kici_executor {
            executor: Arc::new(executor),
            lease: ExecutorLease {
                _callbacks: callbacks,
            },
        })));
        Ok(())
    })
}

/// Releases the caller's reference to an executor. NULL does nothing. Agents it was registered
/// with keep theirs.
///
/// Ownership: takes `executor`. Thread safety: any thread, once no other call uses this
/// reference.
#[no_mangle]
pub unsafe extern "C" fn kici_executor_free(executor: *mut kici_executor) {
    guard_infallible((), || {
        if !executor.is_null() {
            // SAFETY: the caller hands back an executor from this library, exactly once.
            drop(unsafe { Box::from_raw(executor) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static FREED: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn count_free(user_data: *mut c_void) {
        assert_eq!(user_data as usize, 42);
        FREED.fetch_add(1, Ordering::SeqCst);
    }

    unsafe extern "C" fn succeed(
        _: *mut c_void,
        _: *const c_char,
        _: *const c_char,
        _: *mut kici_step_context,
    ) -> i32 {
        0
    }

    unsafe extern "C" fn refuse_to_prepare(_: *mut c_void, _: *const c_char) -> i32 {
        1
    }

    fn table() -> kici_executor_vtable {
        kici_executor_vtable {
            struct_size: size_of::<kici_executor_vtable>(),
            user_data: 42 as *mut c_void,
            free_user_data: Some(count_free),
            run_step: Some(succeed),
            prepare_job: None,
            cleanup_job: None,
        }
    }

    fn create(table: &kici_executor_vtable) -> Result<*mut kici_executor, kici_result> {
        let mut executor = ptr::null_mut();
        // SAFETY: `table` is a live table of `struct_size` bytes; the name is a literal.
        let code =
            unsafe { kici_executor_new(table, c"test".as_ptr(), &mut executor, ptr::null_mut()) };
        match code {
            kici_result::Ok => Ok(executor),
            code => Err(code),
        }
    }

    #[test]
    fn user_data_is_freed_once_after_the_last_reference_and_never_on_refusal() {
        let before = FREED.load(Ordering::SeqCst);
        let executor = create(&table()).expect("valid table");
        // SAFETY: `executor` is live until freed below.
        let (registered, lease) = unsafe { ((*executor).shared(), (*executor).lease()) };
        unsafe { kici_executor_free(executor) };
        assert_eq!(
            FREED.load(Ordering::SeqCst),
            before,
            "an agent still holds a lease"
        );
        drop(lease);
        assert_eq!(
            FREED.load(Ordering::SeqCst),
            before + 1,
            "registries do not keep it"
        );
        drop(registered);
        assert_eq!(FREED.load(Ordering::SeqCst), before + 1);

        let mut too_small = table();
        too_small.struct_size = offset_of!(kici_executor_vtable, run_step);
        assert_eq!(create(&too_small).err(), Some(kici_result::InvalidArgument));
        let mut no_run_step = table();
        no_run_step.run_step = None;
        assert_eq!(
            create(&no_run_step).err(),
            Some(kici_result::InvalidArgument)
        );
        assert_eq!(
            FREED.load(Ordering::SeqCst),
            before + 1,
            "refused tables are not freed"
        );
    }

    #[test]
    fn fields_beyond_struct_size_count_as_null() {
        let mut short = table();
        short.struct_size = MIN_VTABLE_SIZE;
        short.prepare_job = Some(refuse_to_prepare);
        // SAFETY: `short` is a live table.
        let read = unsafe { read_vtable(&short) }.expect("minimal table");
        assert!(read.prepare_job.is_none() && read.run_step.is_some());
        assert_eq!(read.user_data as usize, 42);
    }
}
