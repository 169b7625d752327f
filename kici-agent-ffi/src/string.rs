//! Strings across the boundary: owned strings handed to C (`char **out`, freed with
//! [`kici_string_free`]) and the conversions behind them.

use std::ffi::{c_char, CString};

/// Frees a string this library handed out through a `char **out` parameter. NULL does nothing.
///
/// Ownership: takes `string`, which must come from this library and not be freed twice.
/// Thread safety: any thread, once no other thread uses `string`.
#[no_mangle]
pub unsafe extern "C" fn kici_string_free(string: *mut c_char) {
    if !string.is_null() {
        // SAFETY: the caller hands back a string made by `into_c_owned`, exactly once.
        drop(unsafe { CString::from_raw(string) });
    }
}

/// A C string of `text`; NUL bytes (which C cannot carry) become U+FFFD.
pub(crate) fn c_string_lossy(text: impl Into<String>) -> CString {
    let text = text.into();
    let text = if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    };
    CString::new(text).unwrap_or_default()
}

/// `text` as an owned C string for a `char **out` parameter.
pub(crate) fn into_c_owned(text: impl Into<String>) -> *mut c_char {
    c_string_lossy(text).into_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn owned_strings_round_trip_and_nul_bytes_are_replaced() {
        let owned = into_c_owned("a\0b");
        // SAFETY: `owned` is a live string from into_c_owned, freed once below.
        unsafe {
            assert_eq!(CStr::from_ptr(owned).to_str().ok(), Some("a\u{FFFD}b"));
            kici_string_free(owned);
            kici_string_free(std::ptr::null_mut());
        }
    }
}
