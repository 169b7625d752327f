//! SSH clones against a real OpenSSH server that each test starts on a loopback port, with a
//! throw-away host key, user key and bare repository, to check host-key pinning end to end
//! (libgit2 + libssh2 on our side, the real `sshd` and `git-upload-pack` on the other).
//!
//! The tests need `/usr/sbin/sshd` (Debian `openssh-server`, which `scripts/test.sh`
//! installs) and `git-upload-pack`; without them they fail, they never skip. They work as
//! root (as in CI) and as an ordinary user: the server only lets the current user in.

// Cloning needs the `git` feature.
#![cfg(feature = "git")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use git2::{Oid, Repository, Signature};
use kici_agent_core::internals::checkout::{
    checkout, CheckoutError, CheckoutReport, CheckoutRequest, GitCredentials, HostKeyPolicy,
};

/// Where Debian's `openssh-server` puts the daemon; sshd insists on an absolute path.
const SSHD: &str = "/usr/sbin/sshd";
/// How long sshd may take to start listening before the test gives up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at a free port: the port is picked by binding port 0, released, then handed to
/// sshd, so another process may take it in between.
const PORT_ATTEMPTS: usize = 5;
/// The line sshd logs (at INFO, to stderr with `-e`) once its socket is bound.
const LISTENING: &str = "Server listening on 127.0.0.1 port";

/// Runs a command and returns its trimmed stdout, failing the test with its stderr otherwise.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Generates an ed25519 key pair without a passphrase; returns the key file's path.
fn generate_key(dir: &Path, name: &str) -> PathBuf {
    generate_key_of_type(dir, name, "ed25519")
}

/// Generates a key pair of `key_type` (`ssh-keygen -t`) without a passphrase.
fn generate_key_of_type(dir: &Path, name: &str, key_type: &str) -> PathBuf {
    let path = dir.join(name);
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            key_type,
            "-N",
            "",
            "-C",
            "",
            "-f",
            path.to_str().unwrap(),
        ],
    );
    path
}

/// `<keytype> AAAA…` of a generated key, without its (empty) comment.
fn public_key(key_path: &Path) -> String {
    let text = std::fs::read_to_string(key_path.with_extension("pub")).unwrap();
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The directory holding `git-upload-pack`, which the server runs for the login.
fn upload_pack_dir() -> String {
    let exec_path = run("git", &["--exec-path"]);
    let path_var = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(std::iter::once(PathBuf::from(exec_path)))
        .find(|dir| dir.join("git-upload-pack").is_file())
        .unwrap_or_else(|| panic!("git-upload-pack is not installed (apt-get install git)"))
        .to_string_lossy()
        .into_owned()
}

/// A bare repository with one commit on `main`, built with libgit2.
fn bare_repository(path: &Path) -> Oid {
    let repo = Repository::init_bare(path).unwrap();
    let blob = repo.blob(b"served over ssh\n").unwrap();
    let mut tree = repo.treebuilder(None).unwrap();
    tree.insert("file.txt", blob, 0o100644).unwrap();
    let tree = repo.find_tree(tree.write().unwrap()).unwrap();
    let signature = Signature::now("Test", "test@example.invalid").unwrap();
    let commit = repo
        .commit(
            Some("refs/heads/main"),
            &signature,
            &signature,
            "served over ssh",
            &tree,
            &[],
        )
        .unwrap();
    repo.set_head("refs/heads/main").unwrap();
    commit
}

/// A running sshd: its process and the log its stderr is drained into.
struct Daemon {
    child: Child,
    /// sshd's log lines, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `sshd -D -e -f config` and waits for it to listen; on failure stops it again and
    /// returns its log.
    fn launch(config: &Path) -> Result<Self, String> {
        let mut child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let daemon = Self {
            child,
            log: Arc::new(Mutex::new(Vec::new())),
        };
        let (listening_tx, listening_rx) = mpsc::channel();
        let log = Arc::clone(&daemon.log);
        // Drains sshd's log for its whole life, so sshd never blocks on a full pipe. The
        // sender drops when sshd's stderr closes, which ends the wait below early.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(LISTENING) {
                    let _ = listening_tx.send(());
                }
                log.lock().unwrap().push(line);
            }
        });
        match listening_rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(()) => Ok(daemon),
            // Dropping the daemon stops it.
            Err(_) => Err(daemon.log_text()),
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only the process this test started, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running sshd serving one bare repository to the current user.
struct SshServer {
    daemon: Daemon,
    port: u16,
    /// `ssh-ed25519 AAAA…` of the server's host key.
    host_key: String,
    /// `<keytype> AAAA…` of the server's further host keys, if it was asked for any.
    extra_host_keys: Vec<String>,
    /// The user key's private half, in OpenSSH text form.
    user_private_key: String,
    user: String,
    repo_path: PathBuf,
    /// The commit `main` points at.
    head: Oid,
    _dir: tempfile::TempDir,
}

impl SshServer {
    /// A server with one ed25519 host key.
    fn start() -> Self {
        Self::start_with_extra_host_keys(&[])
    }

    /// A server with an ed25519 host key and one more of each of these `ssh-keygen -t` types.
    fn start_with_extra_host_keys(extra_types: &[&str]) -> Self {
        assert!(
            Path::new(SSHD).is_file(),
            "{SSHD} is missing: these tests need a real OpenSSH server \
             (apt-get install openssh-server; scripts/test.sh installs it)"
        );
        let user = run("id", &["-un"]);
        if run("id", &["-u"]) == "0" {
            // Root's sshd chroots its pre-auth child there; Debian creates it only when the
            // service starts, which never happens in a container.
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let host_key_path = generate_key(dir.path(), "host_key");
        let extra_host_key_paths: Vec<PathBuf> = extra_types
            .iter()
            .map(|key_type| {
                generate_key_of_type(dir.path(), &format!("host_key_{key_type}"), key_type)
            })
            .collect();
        let host_key_lines: String = std::iter::once(&host_key_path)
            .chain(&extra_host_key_paths)
            .map(|path| format!("HostKey {}\n", path.display()))
            .collect();
        let user_key_path = generate_key(dir.path(), "user_key");
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::copy(user_key_path.with_extension("pub"), &authorized_keys).unwrap();
        let repo_path = dir.path().join("repo.git");
        let head = bare_repository(&repo_path);
        let upload_pack_dir = upload_pack_dir();
        let login_home = dir.path().join("home");
        std::fs::create_dir(&login_home).unwrap();
        let config = dir.path().join("sshd_config");

        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            // Public-key logins only, for this user, with this test's files: nothing from
            // /etc/ssh is read. StrictModes is off because the files live under /tmp. The
            // login runs `git-upload-pack` through the user's shell, which would read the
            // user's own startup files from HOME (root's `.bashrc` here runs `pyenv rehash`,
            // which stalls a minute on a lock and leaves it behind when the session ends
            // mid-way), hence an empty HOME and no ~/.ssh/rc.
            std::fs::write(
                &config,
                format!(
                    "ListenAddress 127.0.0.1\n\
                     Port {port}\n\
                     {host_key_lines}\
                     PidFile none\n\
                     UsePAM no\n\
                     AuthenticationMethods publickey\n\
                     PubkeyAuthentication yes\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     AuthorizedKeysFile {authorized_keys}\n\
                     AllowUsers {user}\n\
                     PermitRootLogin prohibit-password\n\
                     StrictModes no\n\
                     PermitUserRC no\n\
                     SetEnv PATH={upload_pack_dir}:/usr/bin:/bin HOME={login_home}\n\
                     LogLevel INFO\n",
                    authorized_keys = authorized_keys.display(),
                    login_home = login_home.display(),
                ),
            )
            .unwrap();
            match Daemon::launch(&config) {
                Ok(daemon) => {
                    return Self {
                        daemon,
                        port,
                        host_key: public_key(&host_key_path),
                        extra_host_keys: extra_host_key_paths
                            .iter()
                            .map(|p| public_key(p))
                            .collect(),
                        user_private_key: std::fs::read_to_string(&user_key_path).unwrap(),
                        user,
                        repo_path,
                        head,
                        _dir: dir,
                    }
                }
                Err(log) if log.contains("Address already in use") => last_log = log,
                Err(log) => panic!("sshd did not start listening:\n{log}"),
            }
        }
        panic!("sshd found no free port in {PORT_ATTEMPTS} attempts:\n{last_log}")
    }

    fn url(&self) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            self.repo_path.display()
        )
    }

    /// Clones `main` with `known_hosts` pinned.
    fn clone_pinned(&self, known_hosts: &str) -> CloneOutcome {
        self.clone_with(HostKeyPolicy::Pinned {
            known_hosts: known_hosts.to_owned(),
        })
    }

    /// Clones `main`, expecting the served commit, with the user key and this host key policy.
    fn clone_with(&self, host_key: HostKeyPolicy) -> CloneOutcome {
        let credentials = GitCredentials::Ssh {
            user: None,
            private_key: self.user_private_key.clone(),
            host_key,
        };
        let url = self.url();
        let head = self.head.to_string();
        let request = CheckoutRequest {
            repo_url: &url,
            git_ref: "main",
            sha: &head,
            credentials: Some(&credentials),
        };
        let workspace = tempfile::tempdir().unwrap();
        let result = checkout(&request, workspace.path(), &|| false, &mut |_: &str| {});
        CloneOutcome {
            result,
            workspace,
            server_log: self.daemon.log_text(),
        }
    }

    /// The known_hosts name of this server: `[127.0.0.1]:<port>`, as the port is not 22.
    fn host_port(&self) -> String {
        format!("[127.0.0.1]:{}", self.port)
    }
}

/// The outcome of one clone.
struct CloneOutcome {
    result: Result<CheckoutReport, CheckoutError>,
    workspace: tempfile::TempDir,
    server_log: String,
}

impl CloneOutcome {
    fn assert_checked_out(&self, expected: Oid) {
        match &self.result {
            Ok(report) => assert_eq!(report.head, expected.to_string()),
            Err(e) => panic!("clone failed: {e}\nsshd log:\n{}", self.server_log),
        }
        assert_eq!(
            std::fs::read_to_string(self.workspace.path().join("file.txt")).unwrap(),
            "served over ssh\n"
        );
    }

    /// Asserts a host-key refusal and returns its message.
    fn assert_host_key_rejected(&self) -> String {
        match &self.result {
            Err(e @ CheckoutError::HostKeyRejected { .. }) => e.to_string(),
            Err(e) => panic!("expected a host key refusal, got: {e}"),
            Ok(report) => panic!("expected a host key refusal, the clone succeeded: {report:?}"),
        }
    }
}

#[test]
fn a_pinned_host_key_lets_the_clone_through() {
    let server = SshServer::start();
    let known_hosts = format!("{} {}\n", server.host_port(), server.host_key);
    server
        .clone_pinned(&known_hosts)
        .assert_checked_out(server.head);

    // The same pin in the forms OpenSSH writes and reads: among other names, behind a
    // wildcard, and hashed by `ssh-keygen -H` itself.
    let listed = format!(
        "git.example.invalid,{},10.0.0.1 {}\n",
        server.host_port(),
        server.host_key
    );
    server.clone_pinned(&listed).assert_checked_out(server.head);
    let wildcard = format!("[127.0.0.?]:{} {}\n", server.port, server.host_key);
    server
        .clone_pinned(&wildcard)
        .assert_checked_out(server.head);
    // In a directory of its own: ssh-keygen keeps the original next to it as `.old`.
    let hash_dir = tempfile::tempdir().unwrap();
    let file = hash_dir.path().join("known_hosts");
    std::fs::write(&file, &known_hosts).unwrap();
    run("ssh-keygen", &["-q", "-H", "-f", file.to_str().unwrap()]);
    let hashed = std::fs::read_to_string(&file).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    server.clone_pinned(&hashed).assert_checked_out(server.head);

    // And `accept-new` takes whatever key the server has.
    server
        .clone_with(HostKeyPolicy::AcceptNew)
        .assert_checked_out(server.head);
}

#[test]
fn a_different_pinned_key_is_refused_without_key_material_in_the_error() {
    let server = SshServer::start();
    let other_dir = tempfile::tempdir().unwrap();
    let other_key = public_key(&generate_key(other_dir.path(), "other"));
    let known_hosts = format!("{} {other_key}\n", server.host_port());
    let clone = server.clone_pinned(&known_hosts);
    let message = clone.assert_host_key_rejected();
    assert!(message.contains(&server.host_port()), "{message}");
    assert!(message.contains("not pinned for this host"), "{message}");
    let private_body: String = server
        .user_private_key
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    for material in [
        private_body.as_str(),
        other_key.split(' ').nth(1).unwrap(),
        server.host_key.split(' ').nth(1).unwrap(),
    ] {
        assert!(!message.contains(material), "key material in: {message}");
    }
    assert!(!clone.workspace.path().join("file.txt").exists());
}

#[test]
fn a_host_that_is_not_listed_is_refused_even_with_its_key_pinned_elsewhere() {
    let server = SshServer::start();
    // The right key, but for other names: another host, the same host on port 22 (the
    // bare name means port 22), another port, and a list whose negation excludes it.
    for known_hosts in [
        format!("git.example.invalid {}\n", server.host_key),
        format!("127.0.0.1 {}\n", server.host_key),
        format!(
            "[127.0.0.1]:{} {}\n",
            server.port.wrapping_add(1),
            server.host_key
        ),
        format!(
            "[127.0.0.*]:*,![127.0.0.1]:{} {}\n",
            server.port, server.host_key
        ),
    ] {
        let message = server.clone_pinned(&known_hosts).assert_host_key_rejected();
        assert!(message.contains(&server.host_port()), "{message}");
        assert!(message.contains("not listed"), "{known_hosts}: {message}");
    }
}

#[test]
fn a_revoked_key_is_refused_even_when_also_pinned() {
    let server = SshServer::start();
    let known_hosts = format!(
        "{} {key}\n@revoked * {key}\n",
        server.host_port(),
        key = server.host_key
    );
    let message = server.clone_pinned(&known_hosts).assert_host_key_rejected();
    assert!(message.contains("@revoked"), "{message}");
}

#[test]
fn every_host_key_type_must_be_pinned_as_libssh2_picks_the_type() {
    // The documented limitation: libssh2 asks for ed25519 first whatever is pinned, so a
    // pin of only the server's ecdsa key is refused, naming the key it got; pinning every
    // type works.
    let server = SshServer::start_with_extra_host_keys(&["ecdsa"]);
    let ecdsa = &server.extra_host_keys[0];
    assert!(ecdsa.starts_with("ecdsa-sha2-"), "{ecdsa}");
    let only_ecdsa = format!("{} {ecdsa}\n", server.host_port());
    let message = server.clone_pinned(&only_ecdsa).assert_host_key_rejected();
    assert!(
        message.contains("presented ssh-ed25519 key SHA256:"),
        "{message}"
    );
    let every_type = format!("{only_ecdsa}{} {}\n", server.host_port(), server.host_key);
    server
        .clone_pinned(&every_type)
        .assert_checked_out(server.head);
}
