//! Git checkout of a job's repository into its workspace (agent spec §9), done in-process with
//! libgit2 instead of the `git` CLI.
//!
//! The clone is shallow (depth 1) where the transport supports it, checks out the requested
//! branch or tag, then verifies the event's commit and fetches it explicitly when the ref has
//! moved on since the event. Credentials only ever travel through libgit2's credential callback:
//! they are never written into the URL, the remote configuration or any message.
//!
//! Everything here blocks; callers run [`checkout`] on a blocking thread.
//!
//! libgit2 comes with the cargo feature `git` (on by default). Built without it, the request
//! and error types stay the same and [`checkout`] refuses every request with
//! [`CheckoutError::GitFeatureDisabled`], so a job that needs its repository fails saying why.

#[cfg(feature = "git")]
mod ca_trust;
#[cfg(feature = "git")]
mod clone;
#[cfg(feature = "git")]
mod credentials;
#[cfg(feature = "git")]
mod known_hosts;
mod redact;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redact::REDACTED;

/// What to check out: one job's repository at one ref and (optionally) one commit.
#[derive(Debug, Clone, Copy)]
pub struct CheckoutRequest<'a> {
    /// Clone URL: `https://`, `ssh://`, scp-like `user@host:path`, `file://` or a local path.
    /// Userinfo in it is tolerated but kept out of messages and out of the workspace's config.
    pub repo_url: &'a str,
    /// Branch or tag name (`main`, `v1.2`, or the full `refs/heads/…` / `refs/tags/…` form);
    /// empty means the remote's default branch.
    pub git_ref: &'a str,
    /// Commit the event was for (full or abbreviated hex); empty or `HEAD` skips verification.
    pub sha: &'a str,
    /// Credentials for the remote, if it needs any.
    pub credentials: Option<&'a GitCredentials>,
}

/// Credentials for cloning, the in-process form of the dispatch's `GitAuth` (protocol §4.1).
#[derive(Clone, PartialEq, Eq)]
pub enum GitCredentials {
    /// HTTP basic authentication. Defaulting the user to `x-access-token` is the caller's job.
    Basic {
        /// User name.
        user: String,
        /// Password or token.
        secret: String,
    },
    /// SSH public-key authentication with an in-memory private key.
    Ssh {
        /// Login; `None` uses the URL's user, or `git` when the URL has none.
        user: Option<String>,
        /// The private key in OpenSSH or PEM text form.
        private_key: String,
        /// How to trust the server's host key.
        host_key: HostKeyPolicy,
    },
}

// Hand-written so that logging a request can never print a secret.
impl fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Basic { user, .. } => f
                .debug_struct("Basic")
                .field("user", user)
                .field("secret", &REDACTED)
                .finish(),
            Self::Ssh { user, host_key, .. } => f
                .debug_struct("Ssh")
                .field("user", user)
                .field("private_key", &REDACTED)
                .field("host_key", host_key)
                .finish(),
        }
    }
}

/// How the SSH server's host key is trusted (`sshHostKeyPolicy` in `GitAuth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Accept whatever key the server presents (`accept-new` against an empty per-call
    /// known_hosts, as the reference agent does).
    AcceptNew,
    /// Strict host key checking against this known_hosts text (`sshKnownHostsPem`), as
    /// OpenSSH does it: the server's key must be listed for its host (plain names, comma
    /// lists, `*`/`?` wildcards, `!` negation, `[host]:port` for ports other than 22, hashed
    /// `|1|` names). A host that is not listed is refused, and so is a key listed under
    /// `@revoked`, for any host. `@cert-authority` entries are not supported: a host matched
    /// only by them is refused. A line that does not parse fails the checkout up front.
    ///
    /// libssh2 negotiates the host key type by its own preference, not by what is pinned, so
    /// pin every key type the server has (`ssh-keyscan` lists them all).
    Pinned {
        /// known_hosts lines: `[@marker] hostnames keytype base64-key [comment]`.
        known_hosts: String,
    },
}

/// The outcome of a successful checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutReport {
    /// Full hex id of the commit checked out.
    ///
    /// HEAD is on a local branch tracking `origin/<branch>` when a branch tip was checked out,
    /// and detached when a tag was checked out or the event's commit had to be fetched because
    /// the branch had moved on (the same HEAD states `git clone` + `git checkout <sha>` leave).
    pub head: String,
    /// The ref had moved on since the event, so the event's commit was fetched (when it was not
    /// already present, which needs a full sha) and checked out detached.
    pub fetched_sha: bool,
    /// Wall time of the whole checkout.
    pub duration: Duration,
}

/// Why a checkout failed. Every message starts with `repository <url>:` (URL without secrets)
/// and never contains a credential.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The request itself is unusable (bad sha, pinned policy without known_hosts, …).
    #[error("repository {repo}: {reason}")]
    InvalidRequest {
        /// Repository URL without secrets.
        repo: String,
        /// What is wrong with the request.
        reason: String,
    },
    /// The workspace directory could not be inspected.
    #[error("repository {repo}: cannot use workspace {}: {source}", path.display())]
    Workspace {
        /// Repository URL without secrets.
        repo: String,
        /// The workspace directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The workspace directory already has content.
    #[error("repository {repo}: workspace {} is not empty", path.display())]
    WorkspaceNotEmpty {
        /// Repository URL without secrets.
        repo: String,
        /// The workspace directory.
        path: PathBuf,
    },
    /// The remote has neither a branch nor a tag of that name.
    #[error("repository {repo}: ref '{git_ref}' not found")]
    RefNotFound {
        /// Repository URL without secrets.
        repo: String,
        /// The ref as requested.
        git_ref: String,
    },
    /// No ref was requested and the remote has no default branch (e.g. it is empty).
    #[error("repository {repo}: the remote has no default branch")]
    NoDefaultBranch {
        /// Repository URL without secrets.
        repo: String,
    },
    /// The event's commit is not available from the remote.
    #[error("repository {repo}: commit {sha} not found (ref '{git_ref}' is at {ref_head})")]
    CommitNotFound {
        /// Repository URL without secrets.
        repo: String,
        /// The commit as requested.
        sha: String,
        /// The ref that was cloned.
        git_ref: String,
        /// Where that ref points.
        ref_head: String,
    },
    /// After checking out the event's commit, HEAD is still something else.
    #[error("repository {repo}: SHA mismatch: expected {expected}, got {actual}")]
    ShaMismatch {
        /// Repository URL without secrets.
        repo: String,
        /// The commit as requested.
        expected: String,
        /// The commit HEAD is at.
        actual: String,
    },
    /// The remote refused the credentials, or needs credentials that were not given.
    #[error("repository {repo}: authentication failed: {reason}")]
    AuthenticationFailed {
        /// Repository URL without secrets.
        repo: String,
        /// Why, without secrets.
        reason: String,
    },
    /// The SSH server's host key is not trusted by the pinned known_hosts.
    #[error("repository {repo}: host key of {host} refused: {reason}")]
    HostKeyRejected {
        /// Repository URL without secrets.
        repo: String,
        /// The name the host is looked up by: `host`, or `[host]:port` when the port is not 22.
        host: String,
        /// Why, naming the presented key by type and fingerprint only.
        reason: String,
    },
    /// `cancel()` returned true.
    #[error("repository {repo}: checkout cancelled")]
    Cancelled {
        /// Repository URL without secrets.
        repo: String,
    },
    /// Any other libgit2 failure (network, transport, object database, working tree).
    #[error("repository {repo}: {action} failed: {detail}")]
    Git {
        /// Repository URL without secrets.
        repo: String,
        /// What was being done.
        action: &'static str,
        /// libgit2's message, with secrets redacted.
        detail: String,
    },
    /// This build has no git support: kici-agent-core was built without its `git` cargo
    /// feature. The variant exists in every build so that features stay additive.
    #[error(
        "repository {repo}: cannot check out: this agent was built without git support (the `git` \
         cargo feature of kici-agent-core)"
    )]
    GitFeatureDisabled {
        /// Repository URL without secrets.
        repo: String,
    },
}

/// Clones `req.repo_url` into `dest` (which must be empty or not exist yet) and checks out the
/// requested ref, then the requested commit if the ref has moved on (agent spec §9.1).
///
/// `cancel` is polled before the clone, during every transfer and before the working tree is
/// written; once it returns true the checkout stops with [`CheckoutError::Cancelled`].
/// `progress` receives a few human-readable lines, free of secrets.
///
/// Without the cargo feature `git` every request fails with
/// [`CheckoutError::GitFeatureDisabled`], before `dest` is touched.
pub fn checkout(
    req: &CheckoutRequest,
    dest: &Path,
    cancel: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str),
) -> Result<CheckoutReport, CheckoutError> {
    #[cfg(feature = "git")]
    {
        clone::clone_and_check_out(req, dest, cancel, progress)
    }
    #[cfg(not(feature = "git"))]
    {
        let _ = (dest, cancel, progress);
        Err(CheckoutError::GitFeatureDisabled {
            repo: redact::redact_url(req.repo_url).display,
        })
    }
}

/// Adds the CA certificates of the PEM file `path` (`KICI_TLS_CA_FILE`) to what git HTTPS
/// clones trust, on top of OpenSSL's default locations (which honour `SSL_CERT_FILE` /
/// `SSL_CERT_DIR`). libgit2 keeps one TLS context per process: once added, the CA is trusted by
/// every clone of every agent in this process. Without the `git` feature there is no libgit2
/// and so nothing to add (the WebSocket's trust is [`crate::tls`]'s and does not depend on it).
pub(crate) fn trust_extra_ca(path: &Path) -> Result<(), String> {
    #[cfg(feature = "git")]
    {
        ca_trust::add_to_libgit2(path)
    }
    #[cfg(not(feature = "git"))]
    {
        let _ = path;
        Ok(())
    }
}

#[cfg(all(test, not(feature = "git")))]
mod tests {
    use super::*;

    #[test]
    fn without_the_git_feature_a_checkout_fails_naming_it_and_touches_nothing() {
        let parent = tempfile::tempdir().unwrap();
        let dest = parent.path().join("workspace");
        let request = CheckoutRequest {
            repo_url: "https://urluser:hunter2pw@example.invalid/org/r.git",
            git_ref: "main",
            sha: "",
            credentials: None,
        };
        let mut lines = Vec::new();
        let result = checkout(&request, &dest, &|| false, &mut |line: &str| {
            lines.push(line.to_owned())
        });
        let error = match result {
            Ok(report) => panic!("a build without git cannot check out, got {report:?}"),
            Err(error) => error,
        };
        assert!(matches!(error, CheckoutError::GitFeatureDisabled { .. }));
        let text = error.to_string();
        assert!(
            text.starts_with("repository https://example.invalid/org/r.git: "),
            "{text}"
        );
        assert!(text.contains("the `git` cargo feature"), "{text}");
        assert!(
            !text.contains("hunter2pw") && !text.contains("urluser"),
            "{text}"
        );
        assert!(lines.is_empty(), "{lines:?}");
        assert!(!dest.exists(), "the workspace was touched");
    }
}
