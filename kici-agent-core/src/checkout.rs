//! Git checkout of a job's repository into its workspace (agent spec §9), done in-process with
//! libgit2 instead of the `git` CLI.
//!
//! The clone is shallow (depth 1) where the transport supports it, checks out the requested
//! branch or tag, then verifies the event's commit and fetches it explicitly when the ref has
//! moved on since the event. Credentials only ever travel through libgit2's credential callback:
//! they are never written into the URL, the remote configuration or any message.
//!
//! Everything here blocks; callers run [`checkout`] on a blocking thread.

mod known_hosts;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use git2::build::CheckoutBuilder;
use git2::{
    AutotagOption, CertificateCheckStatus, Commit, Cred, CredentialType, Direction, ErrorCode,
    FetchOptions, ProxyOptions, Remote, RemoteCallbacks, Repository,
};
use known_hosts::{HostKeyVerdict, PinnedKnownHosts};

/// Depth of the initial clone, as in the reference agent.
const CLONE_DEPTH: i32 = 1;
/// Length of a full SHA-1 object id in hex.
const FULL_SHA_LEN: usize = 40;
/// Depth of the explicit fetch of the event's commit when the ref has moved on.
const SHA_FETCH_DEPTH: i32 = 50;
/// libgit2 calls the credential callback again after every rejection, forever; SSH needs two
/// calls (user name, then key) for a single real attempt, so this allows two real attempts.
const MAX_CREDENTIAL_CALLBACKS: u32 = 4;
/// Replacement text for anything secret found in a message.
const REDACTED: &str = "[REDACTED]";
/// The remote name written into the workspace's git configuration.
const REMOTE_NAME: &str = "origin";

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
}

/// Clones `req.repo_url` into `dest` (which must be empty or not exist yet) and checks out the
/// requested ref, then the requested commit if the ref has moved on (agent spec §9.1).
///
/// `cancel` is polled before the clone, during every transfer and before the working tree is
/// written; once it returns true the checkout stops with [`CheckoutError::Cancelled`].
/// `progress` receives a few human-readable lines, free of secrets.
pub fn checkout(
    req: &CheckoutRequest,
    dest: &Path,
    cancel: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&str),
) -> Result<CheckoutReport, CheckoutError> {
    let started = Instant::now();
    let session = Session::new(req, cancel)?;
    let expected_sha = session.expected_sha(req.sha)?;
    session.check_cancelled()?;
    session.ensure_empty_workspace(dest)?;
    if is_missing_local_path(req.repo_url) {
        // libgit2 would only say "unsupported URL protocol".
        return Err(CheckoutError::InvalidRequest {
            repo: session.repo,
            reason: "no such repository directory".to_owned(),
        });
    }

    let ref_label = if req.git_ref.is_empty() {
        "the default branch".to_owned()
    } else {
        format!("'{}'", req.git_ref)
    };
    progress(&format!("Cloning {} at {ref_label}", session.repo));
    tracing::info!(repo = %session.repo, git_ref = req.git_ref, sha = req.sha, dest = %dest.display(), "git checkout starting");

    let repo =
        Repository::init(dest).map_err(|e| session.git_error("creating the repository", e))?;
    // The workspace's `origin` gets the URL without userinfo: nothing secret is persisted.
    repo.remote(REMOTE_NAME, &session.repo)
        .map_err(|e| session.git_error("configuring the remote", e))?;
    let mut remote = repo
        .remote_anonymous(req.repo_url)
        .map_err(|e| session.git_error("opening the remote", e))?;
    let shallow = transport_supports_shallow(req.repo_url);

    let candidates = session.candidate_refs(&mut remote, req.git_ref)?;
    let refspecs: Vec<String> = candidates.iter().map(Target::refspec).collect();
    session.fetch(&mut remote, &refspecs, shallow.then_some(CLONE_DEPTH))?;
    // The branch wins over a tag of the same name, as with `git clone --branch`.
    let target = candidates
        .iter()
        .find(|target| repo.find_reference(&target.local_ref()).is_ok())
        .ok_or_else(|| CheckoutError::RefNotFound {
            repo: session.repo.clone(),
            git_ref: req.git_ref.to_owned(),
        })?;
    let commit = repo
        .find_reference(&target.local_ref())
        .and_then(|reference| reference.peel_to_commit())
        .map_err(|e| session.git_error("resolving the fetched ref", e))?;
    session.check_cancelled()?;
    session.check_out(&repo, &commit, target.branch_name())?;
    let ref_head = commit.id().to_string();
    tracing::debug!(repo = %session.repo, git_ref = %target.remote_ref, head = %ref_head, "ref checked out");

    let mut report = CheckoutReport {
        head: ref_head.clone(),
        fetched_sha: false,
        duration: Duration::ZERO,
    };
    if let Some(expected) = expected_sha.filter(|sha| !ref_head.starts_with(sha.as_str())) {
        progress(&format!(
            "{} is at {ref_head}, not {expected}: fetching {expected}",
            target.remote_ref
        ));
        // Only a full id can be asked for over the wire; a prefix must already be here.
        if expected.len() == FULL_SHA_LEN {
            session.fetch(
                &mut remote,
                std::slice::from_ref(&expected),
                shallow.then_some(SHA_FETCH_DEPTH),
            )?;
        }
        let commit = repo.find_commit_by_prefix(&expected).map_err(|e| {
            if matches!(e.code(), ErrorCode::NotFound | ErrorCode::Invalid) {
                CheckoutError::CommitNotFound {
                    repo: session.repo.clone(),
                    sha: expected.clone(),
                    git_ref: target.remote_ref.clone(),
                    ref_head: ref_head.clone(),
                }
            } else {
                session.git_error("looking up the commit", e)
            }
        })?;
        session.check_cancelled()?;
        session.check_out(&repo, &commit, None)?;
        let actual = repo
            .head()
            .and_then(|head| head.peel_to_commit())
            .map_err(|e| session.git_error("reading HEAD", e))?
            .id()
            .to_string();
        if !actual.starts_with(expected.as_str()) {
            return Err(CheckoutError::ShaMismatch {
                repo: session.repo,
                expected,
                actual,
            });
        }
        report.head = actual;
        report.fetched_sha = true;
    }

    report.duration = started.elapsed();
    progress(&format!("Checked out {}", report.head));
    tracing::info!(repo = %session.repo, head = %report.head, fetched_sha = report.fetched_sha, duration_ms = report.duration.as_millis() as u64, "git checkout done");
    Ok(report)
}

/// libgit2's local transport (chosen for `file://` URLs and existing directories, exactly as
/// tested here) rejects any depth with "shallow fetch is not supported by the local transport",
/// so local repositories are fetched in full.
fn transport_supports_shallow(url: &str) -> bool {
    !(url.starts_with("file://") || Path::new(url).is_dir())
}

/// True for a plain path (no scheme, not scp-like `host:path`) that is not a directory.
fn is_missing_local_path(url: &str) -> bool {
    let scp_like = url
        .find(':')
        .is_some_and(|colon| !url[..colon].contains('/'));
    !url.contains("://") && !scp_like && !Path::new(url).is_dir()
}

/// A remote ref the clone may check out.
struct Target {
    /// `refs/heads/<name>` or `refs/tags/<name>`.
    remote_ref: String,
}

impl Target {
    fn branch_name(&self) -> Option<&str> {
        self.remote_ref.strip_prefix("refs/heads/")
    }

    /// Where the fetch stores the ref: a remote-tracking branch, or the tag itself.
    fn local_ref(&self) -> String {
        match self.branch_name() {
            Some(name) => format!("refs/remotes/{REMOTE_NAME}/{name}"),
            None => self.remote_ref.clone(),
        }
    }

    fn refspec(&self) -> String {
        format!("+{}:{}", self.remote_ref, self.local_ref())
    }
}

/// State shared by one checkout and the libgit2 callbacks it installs.
struct Session<'a> {
    /// The URL as given, used only to talk to the remote.
    url: &'a str,
    /// The URL without secrets: what messages, logs and the workspace config show.
    repo: String,
    credentials: Option<&'a GitCredentials>,
    cancel: &'a dyn Fn() -> bool,
    /// Strings to scrub from libgit2 messages wherever they occur.
    secrets: Vec<String>,
    /// User names from the URL, scrubbed only as whole words: they may be tokens, but short
    /// ones would otherwise mangle ordinary words.
    url_user_names: Vec<String>,
    cancelled: Cell<bool>,
    auth_failure: RefCell<Option<String>>,
    /// How to check an SSH host key; `None` leaves it to libgit2 (no SSH credentials).
    host_key_check: Option<HostKeyCheck>,
    /// The port the SSH transport connects to, for `[host]:port` lookups.
    ssh_port: u16,
    host_key_refusal: RefCell<Option<HostKeyRefusal>>,
}

/// A [`HostKeyPolicy`] ready for the certificate callback.
enum HostKeyCheck {
    AcceptAny,
    /// Parsed once, up front, so bad content fails before any connection.
    Pinned(PinnedKnownHosts),
}

/// Why the certificate callback refused a host key, kept for the error libgit2 returns.
#[derive(Debug, Clone)]
struct HostKeyRefusal {
    host: String,
    reason: String,
}

impl<'a> Session<'a> {
    fn new(req: &CheckoutRequest<'a>, cancel: &'a dyn Fn() -> bool) -> Result<Self, CheckoutError> {
        let RedactedUrl {
            display: repo,
            mut secrets,
            mut user_names,
        } = redact_url(req.repo_url);
        let mut host_key_check = None;
        match req.credentials {
            Some(GitCredentials::Basic { secret, .. }) => secrets.push(secret.clone()),
            Some(GitCredentials::Ssh {
                private_key,
                host_key,
                ..
            }) => {
                host_key_check = Some(match host_key {
                    HostKeyPolicy::AcceptNew => HostKeyCheck::AcceptAny,
                    HostKeyPolicy::Pinned { known_hosts } => {
                        match PinnedKnownHosts::parse(known_hosts) {
                            Ok(parsed) => HostKeyCheck::Pinned(parsed),
                            Err(e) => {
                                return Err(CheckoutError::InvalidRequest {
                                    repo,
                                    reason: e.to_string(),
                                })
                            }
                        }
                    }
                });
                secrets.push(private_key.trim().to_owned());
            }
            None => {}
        }
        secrets.retain(|secret| !secret.is_empty());
        user_names.retain(|name| !name.is_empty());
        Ok(Self {
            url: req.repo_url,
            repo,
            credentials: req.credentials,
            cancel,
            secrets,
            url_user_names: user_names,
            cancelled: Cell::new(false),
            auth_failure: RefCell::new(None),
            host_key_check,
            ssh_port: ssh_port(req.repo_url),
            host_key_refusal: RefCell::new(None),
        })
    }

    /// The commit to verify, lower-cased, or `None` when the request asks for no verification.
    fn expected_sha(&self, sha: &str) -> Result<Option<String>, CheckoutError> {
        if sha.is_empty() || sha == "HEAD" {
            return Ok(None);
        }
        if sha.len() > FULL_SHA_LEN || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CheckoutError::InvalidRequest {
                repo: self.repo.clone(),
                reason: format!("'{sha}' is not a commit id"),
            });
        }
        Ok(Some(sha.to_ascii_lowercase()))
    }

    fn check_cancelled(&self) -> Result<(), CheckoutError> {
        if (self.cancel)() {
            self.cancelled.set(true);
        }
        if self.cancelled.get() {
            return Err(CheckoutError::Cancelled {
                repo: self.repo.clone(),
            });
        }
        Ok(())
    }

    fn ensure_empty_workspace(&self, dest: &Path) -> Result<(), CheckoutError> {
        let mut entries = match std::fs::read_dir(dest) {
            Ok(entries) => entries,
            // `Repository::init` creates it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(CheckoutError::Workspace {
                    repo: self.repo.clone(),
                    path: dest.to_owned(),
                    source,
                })
            }
        };
        if entries.next().is_some() {
            return Err(CheckoutError::WorkspaceNotEmpty {
                repo: self.repo.clone(),
                path: dest.to_owned(),
            });
        }
        Ok(())
    }

    /// The refs that may hold `git_ref`: its branch and its tag (or just the full ref given);
    /// for an empty name, the branch the remote's HEAD points at.
    ///
    /// Which candidate exists is learnt from what the fetch brings back rather than from a
    /// listing of the remote: git2 0.20's `Remote::list` is unsound on an empty remote.
    fn candidate_refs(
        &self,
        remote: &mut Remote,
        git_ref: &str,
    ) -> Result<Vec<Target>, CheckoutError> {
        if git_ref.starts_with("refs/heads/") || git_ref.starts_with("refs/tags/") {
            return Ok(vec![Target {
                remote_ref: git_ref.to_owned(),
            }]);
        }
        if !git_ref.is_empty() {
            return Ok(vec![
                Target {
                    remote_ref: format!("refs/heads/{git_ref}"),
                },
                Target {
                    remote_ref: format!("refs/tags/{git_ref}"),
                },
            ]);
        }
        let action = "connecting to the remote";
        let connection = remote
            .connect_auth(
                Direction::Fetch,
                Some(self.callbacks()),
                Some(proxy_options()),
            )
            .map_err(|e| self.git_error(action, e))?;
        // libgit2 follows HEAD's symref, or else guesses the branch HEAD's commit matches.
        let default_branch = match connection.default_branch() {
            Ok(name) => name.as_str().map(str::to_owned),
            Err(e) if e.code() == ErrorCode::NotFound => None,
            Err(e) => return Err(self.git_error(action, e)),
        };
        let remote_ref = default_branch
            .filter(|name| name.starts_with("refs/heads/"))
            .ok_or_else(|| CheckoutError::NoDefaultBranch {
                repo: self.repo.clone(),
            })?;
        tracing::debug!(repo = %self.repo, %remote_ref, "default branch resolved");
        Ok(vec![Target { remote_ref }])
    }

    fn fetch(
        &self,
        remote: &mut Remote,
        refspecs: &[String],
        depth: Option<i32>,
    ) -> Result<(), CheckoutError> {
        let mut options = FetchOptions::new();
        options
            .remote_callbacks(self.callbacks())
            .proxy_options(proxy_options())
            .download_tags(AutotagOption::None);
        if let Some(depth) = depth {
            options.depth(depth);
        }
        remote
            .fetch(refspecs, Some(&mut options), None)
            .map_err(|e| self.git_error("fetching", e))?;
        let stats = remote.stats();
        tracing::debug!(
            repo = %self.repo,
            ?refspecs,
            depth = depth.unwrap_or(0),
            objects = stats.received_objects(),
            bytes = stats.received_bytes(),
            "fetched"
        );
        Ok(())
    }

    /// Writes `commit` into the working tree (discarding anything else there) and moves HEAD:
    /// onto a local branch tracking `origin/<branch>`, or detached.
    fn check_out(
        &self,
        repo: &Repository,
        commit: &Commit,
        branch: Option<&str>,
    ) -> Result<(), CheckoutError> {
        let action = "checking out the working tree";
        // Tree first, HEAD second, so the files of the previous HEAD are the baseline to remove.
        repo.checkout_tree(commit.as_object(), Some(CheckoutBuilder::new().force()))
            .map_err(|e| self.git_error(action, e))?;
        match branch {
            Some(name) => {
                let mut local = repo
                    .branch(name, commit, true)
                    .map_err(|e| self.git_error(action, e))?;
                local
                    .set_upstream(Some(&format!("{REMOTE_NAME}/{name}")))
                    .map_err(|e| self.git_error(action, e))?;
                repo.set_head(&format!("refs/heads/{name}"))
            }
            None => repo.set_head_detached(commit.id()),
        }
        .map_err(|e| self.git_error(action, e))
    }

    /// Callbacks for one network operation: credentials, host key policy, cancellation.
    fn callbacks(&self) -> RemoteCallbacks<'_> {
        let mut callbacks = RemoteCallbacks::new();
        let mut credential_calls = 0;
        callbacks.credentials(move |_url, url_user, allowed| {
            credential_calls += 1;
            let result = if credential_calls > MAX_CREDENTIAL_CALLBACKS {
                Err("the remote rejected the credentials".to_owned())
            } else {
                credential_for(self.credentials, url_user, allowed)
            };
            result.map_err(|reason| {
                tracing::debug!(repo = %self.repo, %reason, "no credentials for the remote");
                let error = git2::Error::from_str(&reason);
                *self.auth_failure.borrow_mut() = Some(reason);
                error
            })
        });
        callbacks.certificate_check(move |cert, host| {
            let (Some(host_key), Some(check)) = (cert.as_hostkey(), &self.host_key_check) else {
                // TLS certificates, and SSH without our credentials: libgit2's own checks.
                return Ok(CertificateCheckStatus::CertificatePassthrough);
            };
            let refusal = match check {
                HostKeyCheck::AcceptAny => None,
                HostKeyCheck::Pinned(known_hosts) => {
                    host_key_refusal(known_hosts, host, self.ssh_port, host_key.hostkey())
                }
            };
            match refusal {
                None => Ok(CertificateCheckStatus::CertificateOk),
                Some(refusal) => {
                    tracing::warn!(repo = %self.repo, host = %refusal.host, reason = %refusal.reason, "SSH host key refused");
                    *self.host_key_refusal.borrow_mut() = Some(refusal);
                    Err(git2::Error::from_str("host key refused"))
                }
            }
        });
        callbacks.transfer_progress(move |_| self.keep_going());
        callbacks.sideband_progress(move |_| self.keep_going());
        callbacks
    }

    /// Polled by libgit2 during transfers; false aborts the transfer.
    fn keep_going(&self) -> bool {
        if (self.cancel)() {
            self.cancelled.set(true);
        }
        !self.cancelled.get()
    }

    /// Turns a libgit2 error into the most specific [`CheckoutError`], secrets scrubbed.
    fn git_error(&self, action: &'static str, error: git2::Error) -> CheckoutError {
        let repo = self.repo.clone();
        if self.cancelled.get() {
            return CheckoutError::Cancelled { repo };
        }
        if let Some(HostKeyRefusal { host, reason }) = self.host_key_refusal.borrow().clone() {
            return CheckoutError::HostKeyRejected { repo, host, reason };
        }
        if let Some(reason) = self.auth_failure.borrow().clone() {
            return CheckoutError::AuthenticationFailed { repo, reason };
        }
        let detail = self.redact(error.message());
        if error.code() == ErrorCode::Auth {
            return CheckoutError::AuthenticationFailed {
                repo,
                reason: detail,
            };
        }
        CheckoutError::Git {
            repo,
            action,
            detail,
        }
    }

    /// Scrubs the raw URL and every known secret out of a libgit2 message.
    fn redact(&self, message: &str) -> String {
        let mut text = message.replace(self.url, &self.repo);
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), REDACTED);
        }
        for name in &self.url_user_names {
            text = replace_whole_word(&text, name, REDACTED);
        }
        text
    }
}

/// Honour `http.proxy` and the usual proxy environment variables, like the `git` CLI does.
fn proxy_options() -> ProxyOptions<'static> {
    let mut options = ProxyOptions::new();
    options.auto();
    options
}

/// The credential to answer libgit2's request with, or why there is none.
fn credential_for(
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

/// A URL prepared for display, with the userinfo pieces to scrub from messages.
#[derive(Debug, PartialEq, Eq)]
struct RedactedUrl {
    /// The URL without its password, and without its user name unless it is SSH (where the
    /// name is an account such as `git`, not a token).
    display: String,
    /// The password, as written and percent-decoded.
    secrets: Vec<String>,
    /// The removed user name, as written and percent-decoded.
    user_names: Vec<String>,
}

fn redact_url(raw: &str) -> RedactedUrl {
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
fn replace_whole_word(text: &str, word: &str, with: &str) -> String {
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

/// Why `known_hosts` does not trust the key the server presented for `host` (libgit2's host
/// name from the URL) on `port`, or `None` when it does.
fn host_key_refusal(
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
fn ssh_port(url: &str) -> u16 {
    url::Url::parse(url)
        .ok()
        .filter(|url| matches!(url.scheme(), "ssh" | "ssh+git" | "git+ssh"))
        .and_then(|url| url.port())
        .unwrap_or(known_hosts::DEFAULT_SSH_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use git2::{Oid, RepositoryInitOptions, Signature};

    /// A source repository on branch `main`, built with libgit2 (no `git` CLI needed).
    struct Source {
        dir: tempfile::TempDir,
        repo: Repository,
    }

    impl Source {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let repo = Repository::init_opts(
                dir.path(),
                RepositoryInitOptions::new().initial_head("main"),
            )
            .unwrap();
            Self { dir, repo }
        }

        fn path(&self) -> String {
            self.dir.path().to_str().unwrap().to_owned()
        }

        fn file_url(&self) -> String {
            format!("file://{}", self.path())
        }

        /// Commits `content` as `file.txt` on the current branch.
        fn commit(&self, content: &str) -> Oid {
            std::fs::write(self.dir.path().join("file.txt"), content).unwrap();
            let mut index = self.repo.index().unwrap();
            index.add_path(Path::new("file.txt")).unwrap();
            index.write().unwrap();
            let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
            let signature = Signature::now("Test", "test@example.invalid").unwrap();
            let parent = self.repo.head().ok().map(|h| h.peel_to_commit().unwrap());
            let parents: Vec<&Commit> = parent.iter().collect();
            self.repo
                .commit(
                    Some("HEAD"),
                    &signature,
                    &signature,
                    content,
                    &tree,
                    &parents,
                )
                .unwrap()
        }

        fn annotated_tag(&self, name: &str, target: Oid) {
            let object = self.repo.find_object(target, None).unwrap();
            let signature = Signature::now("Test", "test@example.invalid").unwrap();
            self.repo
                .tag(name, &object, &signature, "release", false)
                .unwrap();
        }
    }

    struct Outcome {
        result: Result<CheckoutReport, CheckoutError>,
        lines: Vec<String>,
        workspace: tempfile::TempDir,
    }

    impl Outcome {
        fn file(&self) -> String {
            std::fs::read_to_string(self.workspace.path().join("file.txt")).unwrap()
        }

        fn error_text(&self) -> String {
            match &self.result {
                Ok(report) => panic!("expected an error, got {report:?}"),
                Err(error) => format!("{error} / {error:?}"),
            }
        }
    }

    fn run(url: &str, git_ref: &str, sha: &str, credentials: Option<&GitCredentials>) -> Outcome {
        run_with_cancel(url, git_ref, sha, credentials, &|| false)
    }

    fn run_with_cancel(
        url: &str,
        git_ref: &str,
        sha: &str,
        credentials: Option<&GitCredentials>,
        cancel: &dyn Fn() -> bool,
    ) -> Outcome {
        let workspace = tempfile::tempdir().unwrap();
        let request = CheckoutRequest {
            repo_url: url,
            git_ref,
            sha,
            credentials,
        };
        let mut lines = Vec::new();
        let result = checkout(&request, workspace.path(), cancel, &mut |line: &str| {
            lines.push(line.to_owned())
        });
        Outcome {
            result,
            lines,
            workspace,
        }
    }

    #[test]
    fn clones_a_branch_by_path_and_by_file_url_onto_a_tracking_branch() {
        let source = Source::new();
        source.commit("one");
        let tip = source.commit("two");
        for url in [source.path(), source.file_url()] {
            let outcome = run(&url, "main", "", None);
            let report = outcome.result.as_ref().unwrap();
            assert_eq!(report.head, tip.to_string());
            assert!(!report.fetched_sha);
            assert_eq!(outcome.file(), "two");
            let clone = Repository::open(outcome.workspace.path()).unwrap();
            let head = clone.head().unwrap();
            assert_eq!(head.name(), Some("refs/heads/main"));
            let branch = git2::Branch::wrap(head);
            assert_eq!(
                branch.upstream().unwrap().name().unwrap(),
                Some("origin/main")
            );
            assert_eq!(
                outcome.lines,
                vec![
                    format!("Cloning {url} at 'main'"),
                    format!("Checked out {tip}"),
                ]
            );
        }
    }

    #[test]
    fn empty_ref_clones_the_default_branch() {
        let source = Source::new();
        let tip = source.commit("one");
        let outcome = run(&source.path(), "", "", None);
        assert_eq!(outcome.result.unwrap().head, tip.to_string());
    }

    #[test]
    fn clones_an_annotated_tag_detached() {
        let source = Source::new();
        let tagged = source.commit("tagged");
        source.annotated_tag("v1.0", tagged);
        source.commit("later");
        let outcome = run(&source.file_url(), "v1.0", &tagged.to_string(), None);
        let report = outcome.result.as_ref().unwrap();
        assert_eq!(report.head, tagged.to_string());
        assert!(!report.fetched_sha);
        assert_eq!(outcome.file(), "tagged");
        let clone = Repository::open(outcome.workspace.path()).unwrap();
        assert!(clone.head_detached().unwrap());
    }

    #[test]
    fn checks_out_the_event_sha_when_the_branch_moved_on() {
        let source = Source::new();
        let first = source.commit("A");
        source.commit("B");
        for sha in [first.to_string(), first.to_string()[..8].to_uppercase()] {
            let outcome = run(&source.path(), "main", &sha, None);
            let report = outcome.result.as_ref().unwrap();
            assert_eq!(report.head, first.to_string());
            assert!(report.fetched_sha);
            assert_eq!(outcome.file(), "A");
            let clone = Repository::open(outcome.workspace.path()).unwrap();
            assert!(clone.head_detached().unwrap());
        }
    }

    #[test]
    fn a_prefix_of_the_branch_tip_needs_no_fetch() {
        let source = Source::new();
        let tip = source.commit("A");
        let outcome = run(&source.path(), "main", &tip.to_string()[..7], None);
        let report = outcome.result.unwrap();
        assert_eq!(report.head, tip.to_string());
        assert!(!report.fetched_sha);
    }

    #[test]
    fn an_unknown_sha_is_an_error_naming_the_repo() {
        let source = Source::new();
        source.commit("A");
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let outcome = run(&source.file_url(), "main", missing, None);
        let text = outcome.error_text();
        assert!(
            text.starts_with(&format!("repository {}: ", source.file_url())),
            "{text}"
        );
        assert!(text.contains(missing), "{text}");
        let outcome = run(&source.path(), "main", "not-a-sha", None);
        assert!(matches!(
            outcome.result,
            Err(CheckoutError::InvalidRequest { .. })
        ));
    }

    #[test]
    fn a_missing_ref_or_repo_is_a_clear_error() {
        let source = Source::new();
        source.commit("A");
        let outcome = run(&source.path(), "nope", "", None);
        assert_eq!(
            outcome.error_text().split(" / ").next().unwrap(),
            format!("repository {}: ref 'nope' not found", source.path())
        );

        let empty = Source::new();
        let outcome = run(&empty.path(), "", "", None);
        assert!(matches!(
            outcome.result,
            Err(CheckoutError::NoDefaultBranch { .. })
        ));

        let gone = format!("{}/does-not-exist", source.path());
        for url in [gone.clone(), format!("file://{gone}")] {
            let text = run(&url, "main", "", None).error_text();
            assert!(text.starts_with(&format!("repository {url}: ")), "{text}");
            assert!(text.to_lowercase().contains("no such"), "{text}");
        }
    }

    #[test]
    fn refuses_a_workspace_that_is_not_empty() {
        let source = Source::new();
        source.commit("A");
        let workspace = tempfile::tempdir().unwrap();
        std::fs::write(workspace.path().join("stray"), "x").unwrap();
        let request = CheckoutRequest {
            repo_url: &source.path(),
            git_ref: "main",
            sha: "",
            credentials: None,
        };
        let result = checkout(&request, workspace.path(), &|| false, &mut |_: &str| {});
        assert!(matches!(
            result,
            Err(CheckoutError::WorkspaceNotEmpty { .. })
        ));
    }

    #[test]
    fn secrets_never_reach_errors_progress_or_the_workspace_config() {
        let credentials = GitCredentials::Basic {
            user: "x-access-token".to_owned(),
            secret: "s3cr3t-basic-token".to_owned(),
        };
        let url = "https://urluser:hunter2pw@127.0.0.1:1/org/repo.git";
        assert!(format!(
            "{:?}",
            CheckoutRequest {
                repo_url: "r",
                git_ref: "",
                sha: "",
                credentials: Some(&credentials)
            }
        )
        .contains(REDACTED));
        let outcome = run(url, "main", "", Some(&credentials));
        let text = outcome.error_text();
        assert!(
            text.starts_with("repository https://127.0.0.1:1/org/repo.git: "),
            "{text}"
        );
        let config = std::fs::read_to_string(outcome.workspace.path().join(".git/config")).unwrap();
        for seen in [&text, &outcome.lines.join("\n"), &config] {
            for secret in ["s3cr3t-basic-token", "hunter2pw", "urluser"] {
                assert!(!seen.contains(secret), "{secret} leaked into {seen}");
            }
        }
        assert!(!format!("{credentials:?}").contains("s3cr3t-basic-token"));
    }

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
    fn short_url_user_names_are_scrubbed_only_as_words() {
        assert_eq!(
            replace_whole_word("u refused u@host (u)", "u", REDACTED),
            "[REDACTED] refused [REDACTED]@host ([REDACTED])"
        );
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

    #[test]
    fn pinned_policy_without_usable_known_hosts_is_rejected_up_front() {
        for (known_hosts, expected) in [
            ("", "at least one host key"),
            ("# comment only\n", "at least one host key"),
            ("# pins\ngit.example.invalid\n", "known_hosts line 2 is not"),
        ] {
            let credentials = GitCredentials::Ssh {
                user: None,
                private_key: "-----BEGIN OPENSSH PRIVATE KEY-----\nkeymaterial\n".to_owned(),
                host_key: HostKeyPolicy::Pinned {
                    known_hosts: known_hosts.to_owned(),
                },
            };
            let outcome = run(
                "ssh://git@127.0.0.1:1/r.git",
                "main",
                "",
                Some(&credentials),
            );
            assert!(matches!(
                outcome.result,
                Err(CheckoutError::InvalidRequest { .. })
            ));
            let text = outcome.error_text();
            assert!(text.contains(expected), "{text}");
            assert!(!text.contains("keymaterial"));
        }
    }

    #[test]
    fn cancel_aborts_before_and_during_the_transfer() {
        let source = Source::new();
        source.commit("A");
        let outcome = run_with_cancel(&source.path(), "main", "", None, &|| true);
        assert!(matches!(
            outcome.result,
            Err(CheckoutError::Cancelled { .. })
        ));
        assert!(!outcome.workspace.path().join(".git").exists());

        // The first poll (before the clone) says go on; the next one, from the transfer
        // callbacks, cancels.
        let polls = Cell::new(0);
        let cancel = || {
            polls.set(polls.get() + 1);
            polls.get() > 1
        };
        let outcome = run_with_cancel(&source.path(), "main", "", None, &cancel);
        assert!(matches!(
            outcome.result,
            Err(CheckoutError::Cancelled { .. })
        ));
        let clone = Repository::open(outcome.workspace.path()).unwrap();
        assert!(clone.find_reference("refs/remotes/origin/main").is_err());
        assert!(!outcome.workspace.path().join("file.txt").exists());
    }
}
