//! Keeping secrets out of what a checkout shows: the repository URL without its userinfo, and
//! the pieces of it to scrub from libgit2's messages.

// Without the `git` feature only the display form is used (in the refusal naming the feature):
// the pieces to scrub are for libgit2's messages.
#![cfg_attr(not(feature = "git"), allow(dead_code))]

/// Replacement text for anything secret found in a message.
pub(super) const REDACTED: &str = "[REDACTED]";

/// A URL prepared for display, with the userinfo pieces to scrub from messages.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct RedactedUrl {
    /// The URL without its password, and without its user name unless it is SSH (where the
    /// name is an account such as `git`, not a token).
    pub(super) display: String,
    /// The password, as written and percent-decoded.
    pub(super) secrets: Vec<String>,
    /// The removed user name, as written and percent-decoded.
    pub(super) user_names: Vec<String>,
}

pub(super) fn redact_url(raw: &str) -> RedactedUrl {
    let mut redacted = RedactedUrl {
        display: raw.to_owned(),
        secrets: Vec::new(),
        user_names: Vec::new(),
    };
    let Ok(mut url) = url::Url::parse(raw) else {
        // Local paths and scp-like `user@host:path` addresses carry no password.
        return redacted;
    };
    // Both spellings: libgit2 may quote the userinfo as written or as it decoded it.
    // Malformed escapes stay as written; bytes that are not UTF-8 become U+FFFD.
    let spellings = |value: &str| {
        let decoded = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        vec![value.to_owned(), decoded.into_owned()]
    };
    if let Some(password) = url.password() {
        redacted.secrets = spellings(password);
    }
    let keep_user = url.scheme() == "ssh";
    if !keep_user && !url.username().is_empty() {
        redacted.user_names = spellings(url.username());
    }
    // Setting userinfo only fails for URLs without a host, which cannot carry any.
    let _ = url.set_password(None);
    if !keep_user {
        let _ = url.set_username("");
    }
    redacted.display = url.to_string();
    redacted
}

/// Replaces `word` wherever it is not part of a longer alphanumeric run.
pub(super) fn replace_whole_word(text: &str, word: &str, with: &str) -> String {
    let mut replaced = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        replaced.push_str(&rest[..at]);
        let after = &rest[at + word.len()..];
        let glued_before = replaced
            .chars()
            .next_back()
            .is_some_and(char::is_alphanumeric);
        let glued_after = after.chars().next().is_some_and(char::is_alphanumeric);
        replaced.push_str(if glued_before || glued_after {
            word
        } else {
            with
        });
        rest = after;
    }
    replaced.push_str(rest);
    replaced
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_but_keeps_ssh_account_names() {
        assert_eq!(
            redact_url("https://tok%40en:p%40ss@example.invalid/r.git"),
            RedactedUrl {
                display: "https://example.invalid/r.git".to_owned(),
                secrets: vec!["p%40ss".to_owned(), "p@ss".to_owned()],
                user_names: vec!["tok%40en".to_owned(), "tok@en".to_owned()],
            }
        );
        // A malformed escape stays as written; an escaped byte that is not UTF-8 is replaced.
        assert_eq!(
            redact_url("https://x:50%zz%ff@example.invalid/r.git").secrets,
            ["50%zz%ff", "50%zz\u{FFFD}"]
        );
        for kept in [
            "ssh://git@example.invalid/r.git",
            "git@example.invalid:org/r.git",
        ] {
            assert_eq!(redact_url(kept).display, kept);
        }
    }

    #[test]
    fn short_url_user_names_are_scrubbed_only_as_words() {
        assert_eq!(
            replace_whole_word("u refused u@host (u)", "u", REDACTED),
            "[REDACTED] refused [REDACTED]@host ([REDACTED])"
        );
    }
}
