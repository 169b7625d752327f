//! What the remote is answered with: the credential for libgit2's request (token or in-memory
//! SSH key), and the verdict on the SSH server's host key.

use git2::{Cred, CredentialType};

use super::known_hosts::{self, HostKeyVerdict, KnownHostsError, PinnedKnownHosts};
use super::{GitCredentials, HostKeyPolicy};

/// A [`HostKeyPolicy`] ready for the certificate callback.
pub(super) enum HostKeyCheck {
    AcceptAny,
    /// Parsed once, up front, so bad content fails before any connection.
    Pinned(PinnedKnownHosts),
}

impl HostKeyCheck {
    /// The check for `policy`; pinned known_hosts text that does not parse is refused here.
    pub(super) fn for_policy(policy: &HostKeyPolicy) -> Result<Self, KnownHostsError> {
        Ok(match policy {
            HostKeyPolicy::AcceptNew => Self::AcceptAny,
            HostKeyPolicy::Pinned { known_hosts } => {
                Self::Pinned(PinnedKnownHosts::parse(known_hosts)?)
            }
        })
    }
}

/// Why the certificate callback refused a host key, kept for the error libgit2 returns.
#[derive(Debug, Clone)]
pub(super) struct HostKeyRefusal {
    pub(super) host: String,
    pub(super) reason: String,
}

/// The credential to answer libgit2's request with, or why there is none.
pub(super) fn credential_for(
    credentials: Option<&GitCredentials>,
    url_user: Option<&str>,
    allowed: CredentialType,
) -> Result<Cred, String> {
    let unusable = |what: &str| {
        Err(format!(
            "the remote asks for {allowed:?} credentials, {what} were provided"
        ))
    };
    match credentials {
        None => unusable("none"),
        Some(GitCredentials::Basic { user, secret }) => {
            if !allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
                return unusable("user/password");
            }
            Cred::userpass_plaintext(user, secret).map_err(|e| e.message().to_owned())
        }
        Some(GitCredentials::Ssh {
            user, private_key, ..
        }) => {
            let user = user.as_deref().or(url_user).unwrap_or("git");
            if allowed.contains(CredentialType::USERNAME) {
                return Cred::username(user).map_err(|e| e.message().to_owned());
            }
            if !allowed.contains(CredentialType::SSH_MEMORY)
                && !allowed.contains(CredentialType::SSH_KEY)
            {
                return unusable("SSH key");
            }
            // libssh2 needs the final newline of a PEM/OpenSSH key.
            let mut key = private_key.trim_end().to_owned();
            key.push('\n');
            // libgit2's message for a malformed key names no key material.
            Cred::ssh_key_from_memory(user, None, &key, None).map_err(|e| e.message().to_owned())
        }
    }
}

/// Why `known_hosts` does not trust the key the server presented for `host` (libgit2's host
/// name from the URL) on `port`, or `None` when it does.
pub(super) fn host_key_refusal(
    known_hosts: &PinnedKnownHosts,
    host: &str,
    port: u16,
    presented: Option<&[u8]>,
) -> Option<HostKeyRefusal> {
    let name = known_hosts::lookup_name(host, port);
    let Some(key) = presented else {
        return Some(HostKeyRefusal {
            host: name,
            reason: "the SSH transport did not hand over the server's key".to_owned(),
        });
    };
    let reason = match known_hosts.verdict(host, port, key) {
        HostKeyVerdict::Accepted => return None,
        HostKeyVerdict::Revoked => format!(
            "the server presented {}, which the pinned known_hosts marks @revoked",
            known_hosts::describe_key(key)
        ),
        HostKeyVerdict::NotPinnedForHost => format!(
            "the server presented {}, which is not pinned for this host \
             (the host key changed, or something is intercepting the connection)",
            known_hosts::describe_key(key)
        ),
        HostKeyVerdict::OnlyCertAuthority => "only @cert-authority entries name this host, and \
             host certificates are not supported: pin the host's own keys"
            .to_owned(),
        HostKeyVerdict::HostNotListed => "the host is not listed in the pinned known_hosts \
             (strict host key checking refuses unknown hosts)"
            .to_owned(),
    };
    Some(HostKeyRefusal { host: name, reason })
}

/// The port an SSH URL connects to: its explicit port, else 22 (also for scp-like
/// `user@host:path` addresses, which cannot name one).
pub(super) fn ssh_port(url: &str) -> u16 {
    url::Url::parse(url)
        .ok()
        .filter(|url| matches!(url.scheme(), "ssh" | "ssh+git" | "git+ssh"))
        .and_then(|url| url.port())
        .unwrap_or(known_hosts::DEFAULT_SSH_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkout::CheckoutError;

    #[test]
    fn credential_requests_that_cannot_be_met_explain_why() {
        let basic = GitCredentials::Basic {
            user: "x-access-token".to_owned(),
            secret: "s3cr3t-basic-token".to_owned(),
        };
        let ssh = GitCredentials::Ssh {
            user: None,
            private_key: "-----BEGIN OPENSSH PRIVATE KEY-----\nkeymaterial".to_owned(),
            host_key: HostKeyPolicy::AcceptNew,
        };
        let plaintext = CredentialType::USER_PASS_PLAINTEXT;
        assert!(credential_for(Some(&basic), None, plaintext).is_ok());
        assert!(credential_for(Some(&ssh), Some("git"), CredentialType::USERNAME).is_ok());
        assert!(credential_for(Some(&ssh), None, CredentialType::SSH_KEY).is_ok());
        for (credentials, allowed, provided) in [
            (None, plaintext, "none"),
            (Some(&basic), CredentialType::SSH_KEY, "user/password"),
            (Some(&ssh), plaintext, "SSH key"),
        ] {
            let reason = credential_for(credentials, None, allowed).err().unwrap();
            assert!(reason.contains(provided), "{reason}");
            assert!(!reason.contains("s3cr3t") && !reason.contains("keymaterial"));
        }
    }

    #[test]
    fn ssh_urls_name_their_port_for_the_known_hosts_lookup() {
        for (url, port) in [
            ("ssh://git@git.example.invalid:2222/r.git", 2222),
            ("ssh://git@git.example.invalid/r.git", 22),
            ("git+ssh://git.example.invalid:7999/r.git", 7999),
            ("git@git.example.invalid:org/r.git", 22),
            ("ssh://git@[::1]:2200/r.git", 2200),
        ] {
            assert_eq!(ssh_port(url), port, "{url}");
        }
    }

    #[test]
    fn host_key_refusals_name_the_host_and_the_key_by_fingerprint_only() {
        let pinned = "AAAAC3NzaC1lZDI1NTE5AAAAIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH";
        let known_hosts =
            PinnedKnownHosts::parse(&format!("[git.example.invalid]:2222 ssh-ed25519 {pinned}"))
                .unwrap();
        let other_key = b"\0\0\0\x0bssh-ed25519\0\0\0\x20other-key-bytes-0123456789abcdef";
        let refusal =
            host_key_refusal(&known_hosts, "git.example.invalid", 2222, Some(other_key)).unwrap();
        assert_eq!(refusal.host, "[git.example.invalid]:2222");
        assert!(
            refusal.reason.contains("ssh-ed25519 key SHA256:"),
            "{}",
            refusal.reason
        );
        assert!(
            refusal.reason.contains("not pinned for this host"),
            "{}",
            refusal.reason
        );
        let refusal =
            host_key_refusal(&known_hosts, "git.example.invalid", 22, Some(other_key)).unwrap();
        assert_eq!(refusal.host, "git.example.invalid");
        assert!(refusal.reason.contains("not listed"), "{}", refusal.reason);
        assert!(host_key_refusal(&known_hosts, "git.example.invalid", 2222, None).is_some());
        let error = CheckoutError::HostKeyRejected {
            repo: "ssh://git@git.example.invalid:2222/r.git".to_owned(),
            host: refusal.host,
            reason: refusal.reason,
        };
        assert!(error
            .to_string()
            .starts_with("repository ssh://git@git.example.invalid:2222/r.git: host key of git.example.invalid refused: "));
    }
}
