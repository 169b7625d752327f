//! The libgit2 session of one checkout: the init, the fetches (shallow where the transport
//! allows), the checkout of the ref and of the event's commit, progress, cancellation, and the
//! translation of libgit2's errors into [`CheckoutError`]s without secrets.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::time::{Duration, Instant};

use git2::build::CheckoutBuilder;
use git2::{
    AutotagOption, CertificateCheckStatus, Commit, Direction, ErrorCode, FetchOptions,
    ProxyOptions, Remote, RemoteCallbacks, Repository,
};

use super::credentials::{
    credential_for, host_key_refusal, ssh_port, HostKeyCheck, HostKeyRefusal,
};
use super::redact::{redact_url, replace_whole_word, RedactedUrl, REDACTED};
use super::{CheckoutError, CheckoutReport, CheckoutRequest, GitCredentials};

/// Depth of the initial clone, as in the reference agent.
const CLONE_DEPTH: i32 = 1;
/// Length of a full SHA-1 object id in hex.
const FULL_SHA_LEN: usize = 40;
/// Depth of the explicit fetch of the event's commit when the ref has moved on.
const SHA_FETCH_DEPTH: i32 = 50;
/// libgit2 calls the credential callback again after every rejection, forever; SSH needs two
/// calls (user name, then key) for a single real attempt, so this allows two real attempts.
const MAX_CREDENTIAL_CALLBACKS: u32 = 4;
/// The remote name written into the workspace's git configuration.
const REMOTE_NAME: &str = "origin";

/// [`super::checkout`] with libgit2.
pub(super) fn clone_and_check_out(
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
                let check = HostKeyCheck::for_policy(host_key).map_err(|e| {
                    CheckoutError::InvalidRequest {
                        repo: repo.clone(),
                        reason: e.to_string(),
                    }
                })?;
                host_key_check = Some(check);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkout::{checkout, HostKeyPolicy};
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
