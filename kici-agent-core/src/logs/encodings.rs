//! The encoded forms of a secret a step may print: base64 (whole and inside a longer string),
//! percent encoding, shell escaping and JSON string escaping.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Adds `value` (long enough to be worth masking) and every encoded form of it a step may
/// print; see [`SecretMasker::add_all`](super::SecretMasker::add_all).
pub(super) fn register_with_encodings(patterns: &mut BTreeSet<String>, value: &str) {
    let base64 = base64::engine::general_purpose::STANDARD;
    patterns.insert(value.to_owned());
    patterns.insert(base64.encode(value));
    patterns.insert(base64.encode(format!("{value}\n")));
    // Inside a longer encoded string (`user:$S`) the value starts at any of three byte
    // alignments; the characters that encode whole groups of its own bytes are the same
    // whatever surrounds it (as the GitHub Actions runner masks).
    let bytes = value.as_bytes();
    for skipped in 0..3.min(bytes.len()) {
        let rest = &bytes[skipped..];
        let whole_groups = rest.len() / 3 * 3;
        if whole_groups > 0 {
            patterns.insert(base64.encode(&rest[..whole_groups]));
        }
    }
    for (kept, space) in [
        // RFC 3986 (curl, Python's `quote(safe="")` and `quote_plus`).
        (RFC3986_UNRESERVED, Space::Escaped),
        (RFC3986_UNRESERVED, Space::Plus),
        // Python's `quote` keeps `/` by default.
        (PYTHON_QUOTE_SAFE, Space::Escaped),
        // JavaScript's `encodeURIComponent`.
        (URI_COMPONENT_SAFE, Space::Escaped),
    ] {
        patterns.insert(percent_encoded(value, kept, space));
    }
    // HTML forms and the WHATWG URL standard (`*-._` kept, a space becomes `+`).
    patterns.insert(form_urlencoded::byte_serialize(value.as_bytes()).collect());
    if let Some(escaped) = shell_escaped(value) {
        patterns.insert(escaped);
    }
    patterns.insert(shell_double_quoted(value));
    patterns.insert(json_escaped(value, false));
    patterns.insert(json_escaped(value, true));
}

/// What percent encoding leaves of the ASCII punctuation besides letters and digits: RFC 3986's
/// unreserved characters.
const RFC3986_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Python's `urllib.parse.quote` with its default `safe="/"`.
const PYTHON_QUOTE_SAFE: &AsciiSet = &RFC3986_UNRESERVED.remove(b'/');
/// JavaScript's `encodeURIComponent`.
const URI_COMPONENT_SAFE: &AsciiSet = &RFC3986_UNRESERVED
    .remove(b'!')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// How a percent encoding writes a space.
#[derive(Clone, Copy)]
enum Space {
    Escaped,
    Plus,
}

/// URL (percent) encoding: ASCII letters, digits and what `kept` leaves stay, every other byte
/// becomes `%XX`, a space `%20` or `+`.
fn percent_encoded(value: &str, kept: &'static AsciiSet, space: Space) -> String {
    let encoded = utf8_percent_encode(value, kept).to_string();
    match space {
        Space::Escaped => encoded,
        // A `%` is always escaped itself, so every `%20` of the result stands for a space.
        Space::Plus => encoded.replace("%20", "+"),
    }
}

/// The value as bash's `printf %q` writes it, or `None` for values with control characters
/// (which it writes in `$'...'` form instead).
fn shell_escaped(value: &str) -> Option<String> {
    const SPECIAL: &str = " !\"$&'()*,;<>?[\\]^`{|}";
    if value.chars().any(char::is_control) {
        return None;
    }
    let mut escaped = String::with_capacity(value.len() * 2);
    for (index, character) in value.chars().enumerate() {
        let leading_only = index == 0 && matches!(character, '#' | '~');
        if SPECIAL.contains(character) || leading_only {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    Some(escaped)
}

/// The value between double quotes in a shell script: `"`, `\`, `$` and `` ` `` escaped.
fn shell_double_quoted(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len() * 2);
    for character in value.chars() {
        if matches!(character, '"' | '\\' | '$' | '`') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

/// The value inside a JSON string (without the quotes); with `ascii_only`, every non-ASCII
/// character as `\uXXXX` (UTF-16, as Python's `json.dumps` writes by default).
fn json_escaped(value: &str, ascii_only: bool) -> String {
    let mut escaped = String::with_capacity(value.len() + 8);
    for character in value.chars() {
        match character {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            '\u{8}' => escaped.push_str("\\b"),
            '\u{c}' => escaped.push_str("\\f"),
            control if u32::from(control) < 0x20 => {
                let _ = write!(escaped, "\\u{:04x}", u32::from(control));
            }
            other if ascii_only && !other.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in other.encode_utf16(&mut units) {
                    let _ = write!(escaped, "\\u{unit:04x}");
                }
            }
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use crate::logs::testing::*;

    #[test]
    fn masks_plain_and_base64_forms() {
        let masker = masker(&["hunter2pass"]);
        assert_eq!(masker.mask("login hunter2pass ok"), "login *** ok");
        let encoded = format!("auth: {}", base64("hunter2pass"));
        assert_eq!(masker.mask(&encoded), "auth: ***");

        let mut log = StepLog::new(masker, u64::MAX);
        let lines = step_lines(&mut log, &[encoded.as_bytes(), b"\nx hunter2pass\n"]);
        assert_eq!(lines, ["auth: ***", "x ***"]);
    }
}
