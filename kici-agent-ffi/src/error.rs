//! Result codes and error objects. Every fallible call returns a [`kici_result`]; when the
//! caller passes a `kici_error **err`, a failure also hands out an owned [`kici_error`] with the
//! message. There is no thread-local "last error": hosts hop threads and executor callbacks
//! re-enter the API.

use std::ffi::{c_char, CString};

/// The outcome of a call. `KICI_RESULT_OK` is 0; the other values are stable.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kici_result {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// An argument has an invalid value: text that is not UTF-8, an unknown spelling, malformed
    /// JSON, an executor table that is too small.
    InvalidArgument = 2,
    /// The configuration was refused; the error message lists every problem.
    InvalidConfig = 3,
    /// The call does not fit the object's state (registering an executor after start, waiting
    /// for an agent that was never started, blocking on an agent thread).
    InvalidState = 4,
    /// The operating system refused a resource (the HTTP port could not be bound, no threads).
    Io = 5,
    /// The timeout passed first.
    Timeout = 6,
    /// The agent stopped and no event is left.
    Closed = 7,
    /// Nothing has that name or index.
    NotFound = 8,
    /// A bug in the library panicked; the panic was caught and the call abandoned.
    Panic = 9,
}

impl kici_result {
    /// Every code, for tests and for [`kici_result_str`].
    const ALL: [kici_result; 10] = [
        kici_result::Ok,
        kici_result::NullArgument,
        kici_result::InvalidArgument,
        kici_result::InvalidConfig,
        kici_result::InvalidState,
        kici_result::Io,
        kici_result::Timeout,
        kici_result::Closed,
        kici_result::NotFound,
        kici_result::Panic,
    ];

    /// The C spelling of the code, NUL-terminated.
    fn name(self) -> &'static str {
        match self {
            kici_result::Ok => "KICI_RESULT_OK\0",
            kici_result::NullArgument => "KICI_RESULT_NULL_ARGUMENT\0",
            kici_result::InvalidArgument => "KICI_RESULT_INVALID_ARGUMENT\0",
            kici_result::InvalidConfig => "KICI_RESULT_INVALID_CONFIG\0",
            kici_result::InvalidState => "KICI_RESULT_INVALID_STATE\0",
            kici_result::Io => "KICI_RESULT_IO\0",
            kici_result::Timeout => "KICI_RESULT_TIMEOUT\0",
            kici_result::Closed => "KICI_RESULT_CLOSED\0",
            kici_result::NotFound => "KICI_RESULT_NOT_FOUND\0",
            kici_result::Panic => "KICI_RESULT_PANIC\0",
        }
    }
}

/// Why a call failed: a code and a message. Internal counterpart of [`kici_error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Failure {
    pub(crate) code: kici_result,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(code: kici_result, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn null(argument: &str) -> Self {
        Failure::new(
            kici_result::NullArgument,
            format!("`{argument}` must not be NULL"),
        )
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Failure::new(kici_result::InvalidArgument, message)
    }

    pub(crate) fn state(message: impl Into<String>) -> Self {
        Failure::new(kici_result::InvalidState, message)
    }
}

/// Results of the internal functions behind the exports.
pub(crate) type FfiResult<T = ()> = Result<T, Failure>;

/// An error: a `kici_result` code and a UTF-8 message. Opaque.
///
/// Thread safety: immutable; may be read from any thread, also at the same time.
pub struct kici_error {
    code: kici_result,
    message: CString,
}

impl kici_error {
    pub(crate) fn from_failure(failure: Failure) -> Self {
        kici_error {
            code: failure.code,
            message: crate::string::c_string_lossy(failure.message),
        }
    }
}

/// The code of an error; `KICI_RESULT_NULL_ARGUMENT` when `error` is NULL.
///
/// Ownership: `error` is borrowed. Thread safety: safe from any thread (the error is immutable).
#[no_mangle]
pub unsafe extern "C" fn kici_error_code(error: *const kici_error) -> kici_result {
    // SAFETY: the caller passes NULL or a live error from this library.
    unsafe { error.as_ref() }.map_or(kici_result::NullArgument, |error| error.code)
}

/// The message of an error, NUL-terminated UTF-8; "" when `error` is NULL.
///
/// Ownership: the string belongs to `error` and lives until `kici_error_free(error)`.
/// Thread safety: safe from any thread (the error is immutable).
#[no_mangle]
pub unsafe extern "C" fn kici_error_message(error: *const kici_error) -> *const c_char {
    // SAFETY: the caller passes NULL or a live error from this library.
    match unsafe { error.as_ref() } {
        Some(error) => error.message.as_ptr(),
        None => c"".as_ptr(),
    }
}

/// Frees an error. NULL does nothing.
///
/// Ownership: takes `error`, which must come from this library and not be freed twice.
/// Thread safety: any thread, once no other thread uses `error`.
#[no_mangle]
pub unsafe extern "C" fn kici_error_free(error: *mut kici_error) {
    if !error.is_null() {
        // SAFETY: the caller hands back an error this library boxed, exactly once.
        drop(unsafe { Box::from_raw(error) });
    }
}

/// A static, NUL-terminated name for a result code ("KICI_RESULT_TIMEOUT", ...), or
/// "KICI_RESULT_UNKNOWN" for a value that is no code.
///
/// Ownership: static; never free it. Thread safety: safe from any thread.
#[no_mangle]
pub extern "C" fn kici_result_str(result: u32) -> *const c_char {
    let name = kici_result::ALL
        .iter()
        .find(|code| **code as u32 == result)
        .map_or("KICI_RESULT_UNKNOWN\0", |code| code.name());
    name.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn result_name(code: u32) -> String {
        // SAFETY: kici_result_str always returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(kici_result_str(code)) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn every_code_has_its_c_name_and_unknown_values_are_named_unknown() {
        for (value, code) in kici_result::ALL.iter().enumerate() {
            assert_eq!(*code as u32, value as u32, "codes are dense from 0");
            let name = result_name(*code as u32);
            assert!(name.starts_with("KICI_RESULT_"), "{name}");
            assert!(!name.ends_with('\0'));
        }
        assert_eq!(result_name(6), "KICI_RESULT_TIMEOUT");
        assert_eq!(result_name(999), "KICI_RESULT_UNKNOWN");
    }

    #[test]
    fn error_objects_carry_code_and_message_and_tolerate_null() {
        let error = Box::into_raw(Box::new(kici_error::from_failure(Failure::new(
            kici_result::Timeout,
            "no event within 5 ms",
        ))));
        // SAFETY: `error` is live until the free below; NULL is allowed everywhere.
        unsafe {
            assert_eq!(kici_error_code(error), kici_result::Timeout);
            let message = CStr::from_ptr(kici_error_message(error));
            assert_eq!(message.to_str().ok(), Some("no event within 5 ms"));
            kici_error_free(error);
            assert_eq!(kici_error_code(std::ptr::null()), kici_result::NullArgument);
            assert_eq!(
                CStr::from_ptr(kici_error_message(std::ptr::null())).to_bytes(),
                b""
            );
            kici_error_free(std::ptr::null_mut());
        }
    }
}
