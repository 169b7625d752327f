//! Pinned `known_hosts` content (the dispatch's `sshKnownHostsPem`) and the decision whether a
//! server's host key may be trusted, with OpenSSH's semantics (sshd(8), "SSH_KNOWN_HOSTS FILE
//! FORMAT").
//!
//! Lines are parsed by the `ssh-key` crate. It does not match host names, so that part is
//! written here, after OpenSSH's `match.c`: comma-separated patterns with `*` and `?`,
//! negation with `!`, case-insensitive, looked up by `host` on port 22 and by `[host]:port`
//! otherwise; hashed `|1|salt|hash` names are HMAC-SHA1 of that lookup name keyed by the salt.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use ssh_key::known_hosts::{Entry, HostPatterns, Marker};
use ssh_key::{HashAlg, PublicKey};

/// The SSH port: a host on any other port is known as `[host]:port`.
pub(crate) const DEFAULT_SSH_PORT: u16 = 22;

/// Why pinned known_hosts content cannot be used. Messages name lines by number and never
/// quote them, so nothing pasted there by mistake (a private key, say) is repeated.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KnownHostsError {
    /// A line is not `[@marker] hostnames keytype base64-key [comment]`.
    #[error("known_hosts line {line} is not `[@revoked|@cert-authority] hostnames keytype base64-key [comment]` ({reason})")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What the parser objected to.
        reason: String,
    },
    /// No line pins a host key.
    #[error("the pinned host key policy needs known_hosts content with at least one host key{}",
        if *.has_cert_authorities { " (@cert-authority entries are not supported: host certificates are not checked, so pin the host keys themselves)" } else { "" })]
    NoHostKeys {
        /// Only `@cert-authority` (and maybe `@revoked`) lines were given.
        has_cert_authorities: bool,
    },
}

/// The outcome of checking a server's host key against pinned known_hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostKeyVerdict {
    /// An entry for this host pins exactly this key.
    Accepted,
    /// The key is listed under `@revoked`, whatever else lists it.
    Revoked,
    /// Entries for this host exist, none with this key.
    NotPinnedForHost,
    /// Only `@cert-authority` entries name this host; host certificates are not supported.
    OnlyCertAuthority,
    /// No entry names this host: unknown hosts are refused (strict host key checking).
    HostNotListed,
}

/// Parsed, validated known_hosts content.
#[derive(Debug)]
pub(crate) struct PinnedKnownHosts {
    entries: Vec<PinnedEntry>,
}

#[derive(Debug)]
struct PinnedEntry {
    marker: Option<Marker>,
    hosts: HostPatterns,
    /// The key in SSH wire encoding, the form the server presents it in.
    key: Vec<u8>,
}

impl PinnedKnownHosts {
    /// Parses known_hosts text. Blank lines and `#` comment lines are skipped; any other line
    /// that does not parse is an error, since silently dropping a pin would turn into a
    /// confusing refusal later.
    pub(crate) fn parse(text: &str) -> Result<Self, KnownHostsError> {
        let mut entries = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.first() {
                None => continue,
                Some(first) if first.starts_with('#') => continue,
                Some(_) => {}
            }
            let malformed = |reason: String| KnownHostsError::Malformed {
                line: index + 1,
                reason,
            };
            // OpenSSH separates fields by any run of blanks; `Entry` wants single spaces.
            let entry: Entry = fields
                .join(" ")
                .parse()
                .map_err(|e: ssh_key::Error| malformed(e.to_string()))?;
            let key = entry
                .public_key()
                .to_bytes()
                .map_err(|e| malformed(e.to_string()))?;
            entries.push(PinnedEntry {
                marker: entry.marker().cloned(),
                hosts: entry.host_patterns().clone(),
                key,
            });
        }
        if !entries.iter().any(|entry| entry.marker.is_none()) {
            return Err(KnownHostsError::NoHostKeys {
                has_cert_authorities: entries
                    .iter()
                    .any(|entry| entry.marker == Some(Marker::CertAuthority)),
            });
        }
        Ok(Self { entries })
    }

    /// Decides whether `key` (SSH wire encoding) may be trusted for `host` on `port`.
    pub(crate) fn verdict(&self, host: &str, port: u16, key: &[u8]) -> HostKeyVerdict {
        // A revoked key must never be accepted (sshd(8)), so the revocation applies whatever
        // host its line names: stricter than OpenSSH, which only consults matching lines.
        if self
            .entries
            .iter()
            .any(|entry| entry.marker == Some(Marker::Revoked) && entry.key == key)
        {
            return HostKeyVerdict::Revoked;
        }
        let name = lookup_name(host, port);
        let name = name.as_str();
        let matching = |marker: Option<Marker>| {
            self.entries
                .iter()
                .filter(move |entry| entry.marker == marker && host_matches(&entry.hosts, name))
        };
        let mut pinned = matching(None).peekable();
        if pinned.peek().is_some() {
            return if pinned.any(|entry| entry.key == key) {
                HostKeyVerdict::Accepted
            } else {
                HostKeyVerdict::NotPinnedForHost
            };
        }
        if matching(Some(Marker::CertAuthority)).next().is_some() {
            return HostKeyVerdict::OnlyCertAuthority;
        }
        HostKeyVerdict::HostNotListed
    }
}

/// The name known_hosts lists a host under: `host` on port 22, `[host]:port` on any other.
pub(crate) fn lookup_name(host: &str, port: u16) -> String {
    // IPv6 literals may arrive bracketed from a URL; the brackets are added back for ports.
    let host = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host)
        .to_ascii_lowercase();
    if port == DEFAULT_SSH_PORT {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

/// `ssh-ed25519 SHA256:…` for a key in SSH wire encoding: enough to recognise it, no key
/// material.
pub(crate) fn describe_key(key: &[u8]) -> String {
    match PublicKey::from_bytes(key) {
        Ok(key) => format!(
            "{} key {}",
            key.algorithm(),
            key.fingerprint(HashAlg::Sha256)
        ),
        Err(_) => "a host key of an unrecognised type".to_owned(),
    }
}

fn host_matches(patterns: &HostPatterns, name: &str) -> bool {
    match patterns {
        HostPatterns::Patterns(patterns) => pattern_list_matches(patterns, name),
        HostPatterns::HashedName { salt, hash } => hashed_name_matches(salt, hash, name),
    }
}

/// OpenSSH's `match_pattern_list`: a matching negated pattern excludes the name whatever else
/// matches; otherwise any matching pattern includes it.
fn pattern_list_matches(patterns: &[String], name: &str) -> bool {
    let mut included = false;
    for pattern in patterns {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix('!') {
            Some(negated) if glob_matches(negated.as_bytes(), name.as_bytes()) => return false,
            Some(_) => {}
            None => included |= glob_matches(pattern.as_bytes(), name.as_bytes()),
        }
    }
    included
}

/// `*` matches any run of bytes (also none), `?` exactly one; everything else itself.
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it is currently stretched to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    // Let the `*` swallow one more byte and retry from just after it.
                    star = Some((star_p, star_t + 1));
                    p = star_p + 1;
                    t = star_t + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// `|1|salt|hash`: the hash is HMAC-SHA1 of the lookup name, keyed by the salt.
fn hashed_name_matches(salt: &[u8], hash: &[u8; 20], name: &str) -> bool {
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(hash).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::public::{Ed25519PublicKey, KeyData};
    use HostKeyVerdict::*;

    /// A distinct ed25519 public key per seed: `(openssh text, wire bytes)`.
    fn key(seed: u8) -> (String, Vec<u8>) {
        let key = PublicKey::from(KeyData::Ed25519(Ed25519PublicKey([seed; 32])));
        (key.to_openssh().unwrap(), key.to_bytes().unwrap())
    }

    fn verdict(known_hosts: &str, host: &str, port: u16, key: &[u8]) -> HostKeyVerdict {
        PinnedKnownHosts::parse(known_hosts)
            .unwrap()
            .verdict(host, port, key)
    }

    #[test]
    fn a_plain_name_pins_its_key_for_that_host_only() {
        let (pinned, pinned_bytes) = key(1);
        let (_, other_bytes) = key(2);
        let text = format!("git.example.invalid {pinned}\n");
        assert_eq!(
            verdict(&text, "git.example.invalid", 22, &pinned_bytes),
            Accepted
        );
        assert_eq!(
            verdict(&text, "GIT.Example.INVALID", 22, &pinned_bytes),
            Accepted
        );
        // Right key, wrong host.
        assert_eq!(
            verdict(&text, "evil.example.invalid", 22, &pinned_bytes),
            HostNotListed
        );
        // Right host, wrong key.
        assert_eq!(
            verdict(&text, "git.example.invalid", 22, &other_bytes),
            NotPinnedForHost
        );
    }

    #[test]
    fn a_comma_list_names_each_host() {
        let (pinned, bytes) = key(1);
        let text = format!("a.example.invalid,10.0.0.7,b.example.invalid {pinned}");
        for host in ["a.example.invalid", "10.0.0.7", "b.example.invalid"] {
            assert_eq!(verdict(&text, host, 22, &bytes), Accepted, "{host}");
        }
        assert_eq!(verdict(&text, "example.invalid", 22, &bytes), HostNotListed);
        assert_eq!(verdict(&text, "10.0.0.70", 22, &bytes), HostNotListed);
    }

    #[test]
    fn a_non_default_port_is_part_of_the_name() {
        let (pinned, bytes) = key(1);
        let bracketed = format!("[git.example.invalid]:2222 {pinned}");
        assert_eq!(
            verdict(&bracketed, "git.example.invalid", 2222, &bytes),
            Accepted
        );
        assert_eq!(
            verdict(&bracketed, "git.example.invalid", 22, &bytes),
            HostNotListed
        );
        assert_eq!(
            verdict(&bracketed, "git.example.invalid", 2223, &bytes),
            HostNotListed
        );
        let bare = format!("git.example.invalid {pinned}");
        assert_eq!(
            verdict(&bare, "git.example.invalid", 2222, &bytes),
            HostNotListed
        );
        // Port 22 is written bare: `[host]:22` never matches (as in OpenSSH).
        let port_22 = format!("[git.example.invalid]:22 {pinned}");
        assert_eq!(
            verdict(&port_22, "git.example.invalid", 22, &bytes),
            HostNotListed
        );
        let ipv6 = format!("[::1]:2222 {pinned}");
        assert_eq!(verdict(&ipv6, "::1", 2222, &bytes), Accepted);
        assert_eq!(verdict(&ipv6, "[::1]", 2222, &bytes), Accepted);
    }

    #[test]
    fn wildcards_and_negation_follow_openssh() {
        let (pinned, bytes) = key(1);
        let text = format!("*.example.invalid,!evil.example.invalid,git?.test.invalid {pinned}");
        assert_eq!(verdict(&text, "git.example.invalid", 22, &bytes), Accepted);
        assert_eq!(verdict(&text, "a.b.example.invalid", 22, &bytes), Accepted);
        assert_eq!(verdict(&text, "git1.test.invalid", 22, &bytes), Accepted);
        assert_eq!(
            verdict(&text, "evil.example.invalid", 22, &bytes),
            HostNotListed
        );
        assert_eq!(
            verdict(&text, "EVIL.example.invalid", 22, &bytes),
            HostNotListed
        );
        assert_eq!(verdict(&text, "example.invalid", 22, &bytes), HostNotListed);
        assert_eq!(
            verdict(&text, "git12.test.invalid", 22, &bytes),
            HostNotListed
        );
        assert_eq!(
            verdict(&text, "git.test.invalid", 22, &bytes),
            HostNotListed
        );
        let any_port = format!("[*.example.invalid]:* {pinned}");
        assert_eq!(
            verdict(&any_port, "git.example.invalid", 2222, &bytes),
            Accepted
        );
        assert_eq!(
            verdict(&any_port, "git.example.invalid", 22, &bytes),
            HostNotListed
        );
        // A negation alone includes nothing.
        let only_negated = format!("!evil.example.invalid {pinned}");
        assert_eq!(
            verdict(&only_negated, "git.example.invalid", 22, &bytes),
            HostNotListed
        );
    }

    #[test]
    fn glob_matching_backtracks() {
        for (pattern, text, expected) in [
            ("*", "", true),
            ("*", "anything", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*aab", "aaaab", true),
            ("?", "", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("**.x", "a.x", true),
            ("", "", true),
            ("", "a", false),
        ] {
            assert_eq!(
                glob_matches(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern} vs {text}"
            );
        }
    }

    #[test]
    fn hashed_names_match_what_ssh_keygen_wrote() {
        // `ssh-keygen -H` output for `git.example.invalid` and `[git.example.invalid]:2222`
        // with the key of seed 7 (independent of the HMAC code under test).
        let (ssh_text, bytes) = key(7);
        assert!(ssh_text.ends_with("AAAAIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH"));
        let port_22 = "|1|6bD3HoEQXofZEAwHrXjJUu5luJs=|+P2tcSIDKjsgGrjbOzC++AR5398= \
                       ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH";
        let port_2222 = "|1|0KxuYfGGGvylC5xQKyexeN6HQWs=|Fy0N22qQqeiSyNxHmJW0vjBFe7E= \
                         ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH";
        assert_eq!(
            verdict(port_22, "git.example.invalid", 22, &bytes),
            Accepted
        );
        assert_eq!(
            verdict(port_22, "Git.Example.Invalid", 22, &bytes),
            Accepted
        );
        assert_eq!(
            verdict(port_22, "git.example.invalid", 2222, &bytes),
            HostNotListed
        );
        assert_eq!(
            verdict(port_22, "other.example.invalid", 22, &bytes),
            HostNotListed
        );
        assert_eq!(
            verdict(port_2222, "git.example.invalid", 2222, &bytes),
            Accepted
        );
        assert_eq!(
            verdict(port_2222, "git.example.invalid", 22, &bytes),
            HostNotListed
        );
        let (_, other) = key(8);
        assert_eq!(
            verdict(port_2222, "git.example.invalid", 2222, &other),
            NotPinnedForHost
        );
    }

    #[test]
    fn a_revoked_key_is_refused_even_when_also_pinned() {
        let (pinned, pinned_bytes) = key(1);
        let (revoked, revoked_bytes) = key(2);
        let text = format!(
            "git.example.invalid {pinned}\n\
             git.example.invalid {revoked}\n\
             @revoked other.example.invalid {revoked}\n"
        );
        assert_eq!(
            verdict(&text, "git.example.invalid", 22, &pinned_bytes),
            Accepted
        );
        assert_eq!(
            verdict(&text, "git.example.invalid", 22, &revoked_bytes),
            Revoked
        );
    }

    #[test]
    fn cert_authority_entries_are_not_trusted() {
        let (ca, ca_bytes) = key(1);
        let (pinned, pinned_bytes) = key(2);
        let text = format!(
            "@cert-authority *.example.invalid {ca}\n\
             other.test.invalid {pinned}\n"
        );
        assert_eq!(
            verdict(&text, "git.example.invalid", 22, &ca_bytes),
            OnlyCertAuthority
        );
        assert_eq!(
            verdict(&text, "git.example.invalid", 22, &pinned_bytes),
            OnlyCertAuthority
        );
        assert_eq!(
            verdict(&text, "other.test.invalid", 22, &pinned_bytes),
            Accepted
        );
        let only_ca = PinnedKnownHosts::parse(&format!("@cert-authority * {ca}\n")).unwrap_err();
        assert_eq!(
            only_ca,
            KnownHostsError::NoHostKeys {
                has_cert_authorities: true
            }
        );
        assert!(only_ca
            .to_string()
            .contains("@cert-authority entries are not supported"));
    }

    #[test]
    fn comments_blank_lines_and_loose_spacing_are_accepted() {
        let (pinned, bytes) = key(1);
        let spaced = pinned.replace(' ', " \t ");
        let text = format!(
            "# pins for the build\r\n\r\n   \n  git.example.invalid\t{spaced}  a comment, with # inside\r\n"
        );
        assert_eq!(verdict(&text, "git.example.invalid", 22, &bytes), Accepted);
    }

    #[test]
    fn unusable_content_is_an_error_naming_the_line_but_not_quoting_it() {
        let (pinned, _) = key(1);
        let secret_looking = "c2VjcmV0LWtleS1tYXRlcmlhbA";
        for (text, line) in [
            (format!("git.example.invalid {pinned}\nhost-only\n"), 2),
            (
                format!("git.example.invalid ssh-ed25519 {secret_looking}\n"),
                1,
            ),
            (format!("@unknown git.example.invalid {pinned}\n"), 1),
            (
                format!("# c\ngit.example.invalid ssh-rsa {}\n", &pinned[12..]),
                2,
            ),
            ("-----BEGIN OPENSSH PRIVATE KEY-----\n".to_owned(), 1),
        ] {
            let error = PinnedKnownHosts::parse(&text).unwrap_err();
            assert!(
                matches!(error, KnownHostsError::Malformed { line: l, .. } if l == line),
                "{text}: {error:?}"
            );
            let message = error.to_string();
            assert!(!message.contains(secret_looking), "{message}");
            assert!(!message.contains("git.example.invalid"), "{message}");
        }
        for empty in ["", "# nothing\n\n"] {
            assert_eq!(
                PinnedKnownHosts::parse(empty).unwrap_err(),
                KnownHostsError::NoHostKeys {
                    has_cert_authorities: false
                }
            );
        }
        let (revoked, _) = key(2);
        assert!(PinnedKnownHosts::parse(&format!("@revoked * {revoked}\n")).is_err());
    }

    #[test]
    fn keys_are_described_by_type_and_fingerprint() {
        let (text, bytes) = key(1);
        let expected = PublicKey::from_openssh(&text)
            .unwrap()
            .fingerprint(HashAlg::Sha256)
            .to_string();
        assert_eq!(describe_key(&bytes), format!("ssh-ed25519 key {expected}"));
        assert!(expected.starts_with("SHA256:"));
        assert_eq!(describe_key(b"junk"), "a host key of an unrecognised type");
    }
}
