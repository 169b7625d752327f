//! The panic and argument boundary every export goes through: panics are caught and become
//! `KICI_RESULT_PANIC`, NULL pointers become `KICI_RESULT_NULL_ARGUMENT`, and failures are
//! reported through the optional `kici_error **err`.

use std::any::Any;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{kici_error, kici_result, Failure, FfiResult};

/// Runs `body`, catching any panic, and reports a failure through `err` (when not NULL).
pub(crate) fn guard(err: *mut *mut kici_error, body: impl FnOnce() -> FfiResult) -> kici_result {
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        Err(Failure::new(
            kici_result::Panic,
            format!("kici_agent panicked (a bug): {}", panic_message(&*payload)),
        ))
    });
    match outcome {
        Ok(()) => kici_result::Ok,
        Err(failure) => {
            let code = failure.code;
            if !err.is_null() {
                // Reporting must not unwind either (an allocation failure aborts anyway).
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    let error = Box::into_raw(Box::new(kici_error::from_failure(failure)));
                    // SAFETY: `err` is non-NULL and, by contract, points to writable storage.
                    unsafe { *err = error };
                }));
            }
            code
        }
    }
}

/// Runs a body that has no way to report failure (`_free`, queries), swallowing a panic.
pub(crate) fn guard_infallible<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// A shared reference to an object the caller passed, or a NULL-argument failure.
///
/// # Safety
/// `ptr` must be NULL or point to a live `T` for `'a`.
pub(crate) unsafe fn object<'a, T>(ptr: *const T, name: &str) -> FfiResult<&'a T> {
    // SAFETY: guaranteed by the caller.
    unsafe { ptr.as_ref() }.ok_or_else(|| Failure::null(name))
}

/// An exclusive reference to an object the caller passed, or a NULL-argument failure.
///
/// # Safety
/// `ptr` must be NULL or point to a live `T` that nothing else uses for `'a`.
pub(crate) unsafe fn object_mut<'a, T>(ptr: *mut T, name: &str) -> FfiResult<&'a mut T> {
    // SAFETY: guaranteed by the caller.
    unsafe { ptr.as_mut() }.ok_or_else(|| Failure::null(name))
}

/// A NUL-terminated UTF-8 argument.
///
/// # Safety
/// `ptr` must be NULL or point to a NUL-terminated string live for `'a`.
pub(crate) unsafe fn text<'a>(ptr: *const c_char, name: &str) -> FfiResult<&'a str> {
    if ptr.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: non-NULL and NUL-terminated by contract.
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes
        .to_str()
        .map_err(|e| Failure::invalid(format!("`{name}` is not valid UTF-8: {e}")))
}

/// The place an output goes, checked before any work so that outputs are written only on
/// success.
///
/// # Safety
/// `ptr` must be NULL or point to writable storage for a `T` for `'a`.
pub(crate) unsafe fn out<'a, T>(
    ptr: *mut T,
    name: &str,
) -> FfiResult<&'a mut std::mem::MaybeUninit<T>> {
    // SAFETY: guaranteed by the caller; MaybeUninit does not read the old value.
    unsafe { ptr.cast::<std::mem::MaybeUninit<T>>().as_mut() }.ok_or_else(|| Failure::null(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    fn take_error(error: *mut kici_error) -> (kici_result, String) {
        assert!(!error.is_null());
        // SAFETY: `error` came from `guard` and is freed here, once.
        unsafe {
            let code = crate::error::kici_error_code(error);
            let message = CStr::from_ptr(crate::error::kici_error_message(error))
                .to_string_lossy()
                .into_owned();
            crate::error::kici_error_free(error);
            (code, message)
        }
    }

    #[test]
    fn a_panic_becomes_the_panic_code_with_its_message() {
        let mut error = ptr::null_mut();
        let code = guard(&mut error, || panic!("boom at the boundary"));
        assert_eq!(code, kici_result::Panic);
        let (code, message) = take_error(error);
        assert_eq!(code, kici_result::Panic);
        assert!(message.contains("boom at the boundary"), "{message}");
        assert_eq!(
            guard(ptr::null_mut(), || panic!("no error wanted")),
            kici_result::Panic
        );
        assert_eq!(guard_infallible(7, || panic!("swallowed")), 7);
    }

    #[test]
    fn failures_fill_the_error_only_when_asked_and_success_leaves_it_alone() {
        let mut error = ptr::null_mut();
        assert_eq!(guard(&mut error, || Ok(())), kici_result::Ok);
        assert!(error.is_null());
        let code = guard(&mut error, || Err(Failure::state("not started")));
        assert_eq!(
            take_error(error),
            (kici_result::InvalidState, "not started".into())
        );
        assert_eq!(code, kici_result::InvalidState);
        let code = guard(ptr::null_mut(), || Err(Failure::null("agent")));
        assert_eq!(code, kici_result::NullArgument);
    }

    #[test]
    fn arguments_are_checked_for_null_and_utf8() {
        // SAFETY: every pointer is NULL or points to a live local.
        unsafe {
            let missing = text(ptr::null(), "name").unwrap_err();
            assert_eq!(missing.code, kici_result::NullArgument);
            assert!(missing.message.contains("`name`"));
            let latin1 = b"caf\xe9\0";
            let bad = text(latin1.as_ptr().cast(), "name").unwrap_err();
            assert_eq!(bad.code, kici_result::InvalidArgument);
            assert_eq!(text(c"ok".as_ptr(), "name"), Ok("ok"));
            assert!(object::<u8>(ptr::null(), "x").is_err());
            assert!(object_mut::<u8>(ptr::null_mut(), "x").is_err());
            assert!(out::<u8>(ptr::null_mut(), "out").is_err());
        }
    }
}
