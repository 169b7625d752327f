//! The bubblewrap sandbox for bare-metal steps (`KICI_SANDBOX=true`, spec §12.2).
//!
//! Each step process runs as `bwrap <args> -- <program> <args>`: the system directories
//! read-only, a private `/tmp`, the job workspace at `/workspace` (and at its host path, so
//! paths the job computed stay valid), the step's hand-off directory, new pid and ipc
//! namespaces, a new session, killed with the agent (`--die-with-parent`), and with
//! `KICI_SANDBOX_NETWORK=isolated` a network namespace of its own (loopback only).
//! Compared with the Node agent's binds we add what a shell step needs that the spec's list
//! misses: `/etc/alternatives` (Debian's `awk`, `editor`, ... are links into it), and the
//! user and host databases (`/etc/passwd`, `/etc/group`, `/etc/hosts`), all read-only.
//!
//! A cancel SIGTERMs the step's group, whose leader is `bwrap`: bwrap ends, and
//! `--die-with-parent` plus the pid namespace take everything inside with it.
//!
//! TypeScript jobs run their runner (node) the same way, with Node's install and the runner's
//! files bound read-only besides ([`Sandbox::with_read_only`]) and fd 3 inherited through
//! bwrap. Their graceful cancel travels over that channel instead of SIGTERM (which would end
//! bwrap, and the runner with it, before its cancel hooks); force still kills the group.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::SandboxNetwork;

const BWRAP: &str = "bwrap";

/// Where a sandboxed step sees the job workspace.
pub(crate) const WORKSPACE_INSIDE: &str = "/workspace";

/// Read-only system paths bound into every sandbox: required ones, then those bound only
/// where they exist.
const SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/bin", "/sbin"];
const OPTIONAL_SYSTEM_PATHS: &[&str] = &[
    "/lib64",
    "/lib32",
    "/etc/resolv.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/alternatives",
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/nsswitch.conf",
];

/// A job's sandbox.
#[derive(Debug, Clone)]
pub(crate) struct Sandbox {
    network: SandboxNetwork,
    workspace: PathBuf,
    /// More host paths visible read-only at the same path (a job executor's runtime).
    read_only: Vec<PathBuf>,
}

impl Sandbox {
    pub(crate) fn new(network: SandboxNetwork, workspace: PathBuf) -> Self {
        Sandbox {
            network,
            workspace,
            read_only: Vec::new(),
        }
    }

    /// This sandbox with `paths` also visible, read-only (those under the system directories,
    /// bound already, are left out).
    pub(crate) fn with_read_only(&self, paths: Vec<PathBuf>) -> Self {
        let mut sandbox = self.clone();
        sandbox.read_only.extend(
            paths
                .into_iter()
                .filter(|path| !SYSTEM_DIRS.iter().any(|dir| path.starts_with(dir))),
        );
        sandbox
    }

    /// `bwrap` and its arguments that run `program args` inside the sandbox. `handoff_dir`
    /// (the step's `$KICI_ENV` files) is bound read-write at its host path; an absolute
    /// `program` outside the system directories is bound read-only.
    pub(crate) fn wrap(
        &self,
        program: &str,
        args: &[String],
        handoff_dir: Option<&Path>,
    ) -> (String, Vec<String>) {
        let mut out: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| out.extend(items.iter().map(|s| s.to_string()));
        for dir in SYSTEM_DIRS {
            push(&["--ro-bind", dir, dir]);
        }
        for path in OPTIONAL_SYSTEM_PATHS {
            push(&["--ro-bind-try", path, path]);
        }
        push(&["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]);
        let workspace = self.workspace.to_string_lossy();
        push(&["--bind", &workspace, WORKSPACE_INSIDE]);
        push(&["--bind", &workspace, &workspace]);
        if let Some(dir) = handoff_dir {
            let dir = dir.to_string_lossy();
            push(&["--bind", &dir, &dir]);
        }
        // After `--tmpfs /tmp`, so that a path under /tmp (the runner's) is seen.
        for path in &self.read_only {
            let path = path.to_string_lossy();
            push(&["--ro-bind", &path, &path]);
        }
        if Path::new(program).is_absolute()
            && !SYSTEM_DIRS
                .iter()
                .any(|dir| Path::new(program).starts_with(dir))
        {
            push(&["--ro-bind", program, program]);
        }
        push(&["--chdir", WORKSPACE_INSIDE, "--setenv", "TMPDIR", "/tmp"]);
        push(&["--setenv", "KICI_WORKSPACE", WORKSPACE_INSIDE]);
        push(&[
            "--unshare-pid",
            "--unshare-ipc",
            "--die-with-parent",
            "--new-session",
        ]);
        if self.network == SandboxNetwork::Isolated {
            push(&["--unshare-net"]);
        }
        push(&["--", program]);
        out.extend(args.iter().cloned());
        (BWRAP.to_owned(), out)
    }
}

/// Checks that bubblewrap is installed and can make the namespaces a sandbox needs here, by
/// running `true` in a minimal one. The error says what to do.
pub(crate) fn check_available(network: SandboxNetwork) -> Result<(), String> {
    let mut probe = Command::new(BWRAP);
    probe.args([
        "--ro-bind",
        "/",
        "/",
        "--unshare-pid",
        "--unshare-ipc",
        "--die-with-parent",
    ]);
    if network == SandboxNetwork::Isolated {
        probe.arg("--unshare-net");
    }
    match probe.arg("true").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "KICI_SANDBOX=true: bubblewrap cannot create the sandbox's namespaces on this host ({}): \
             allow unprivileged user namespaces, run the agent as root, or unset KICI_SANDBOX",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(
            "KICI_SANDBOX=true needs bubblewrap (`bwrap`) on PATH: install it (Debian/Ubuntu: \
             apt-get install bubblewrap) or unset KICI_SANDBOX"
                .to_owned(),
        ),
        Err(error) => Err(format!("KICI_SANDBOX=true: could not run bwrap: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(network: SandboxNetwork) -> Vec<String> {
        let sandbox = Sandbox::new(network, PathBuf::from("/tmp/kici-abc123"));
        let (program, args) = sandbox.wrap(
            "bash",
            &["-c".into(), "echo hi".into()],
            Some(Path::new("/tmp/kici-env-xyz789")),
        );
        assert_eq!(program, "bwrap");
        args
    }

    fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
        args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn the_step_runs_after_the_options_with_its_own_arguments() {
        let args = args_of(SandboxNetwork::Isolated);
        let tail: Vec<&str> = args
            .iter()
            .rev()
            .take(4)
            .rev()
            .map(String::as_str)
            .collect();
        assert_eq!(tail, ["--", "bash", "-c", "echo hi"]);
    }

    #[test]
    fn workspace_handoff_and_private_tmp_are_bound_in_order() {
        let args = args_of(SandboxNetwork::Host);
        let position = |flag: &str, value: &str| {
            args.windows(2)
                .position(|w| w[0] == flag && w[1] == value)
                .unwrap_or_else(|| panic!("{flag} {value} missing: {args:?}"))
        };
        // Binds under /tmp must come after the tmpfs, or it would hide them.
        let tmpfs = position("--tmpfs", "/tmp");
        assert!(position("--bind", "/tmp/kici-abc123") > tmpfs);
        assert!(position("--bind", "/tmp/kici-env-xyz789") > tmpfs);
        assert!(has_pair(&args, "--chdir", WORKSPACE_INSIDE));
        assert!(has_pair(&args, "--ro-bind", "/usr"));
        assert!(!args.contains(&"--unshare-net".to_owned()));
    }

    #[test]
    fn isolated_network_unshares_it() {
        assert!(args_of(SandboxNetwork::Isolated).contains(&"--unshare-net".to_owned()));
    }

    #[test]
    fn an_operator_program_outside_the_system_dirs_is_bound_read_only() {
        let sandbox = Sandbox::new(SandboxNetwork::Host, PathBuf::from("/tmp/kici-abc123"));
        let (_, args) = sandbox.wrap("/opt/runner/run", &[], None);
        assert!(has_pair(&args, "--ro-bind", "/opt/runner/run"));
        let (_, args) = sandbox.wrap("/usr/bin/env", &[], None);
        assert!(!has_pair(&args, "--ro-bind", "/usr/bin/env"));
    }

    #[test]
    fn a_job_executors_paths_are_bound_read_only_after_the_private_tmp() {
        let sandbox = Sandbox::new(SandboxNetwork::Host, PathBuf::from("/tmp/kici-abc123"))
            .with_read_only(vec![
                PathBuf::from("/opt/node"),
                PathBuf::from("/tmp/kici-agent-runner-0-1"),
                PathBuf::from("/usr/lib/node"),
            ]);
        let (_, args) = sandbox.wrap("/opt/node/bin/node", &[], None);
        let position =
            |flag: &str, value: &str| args.windows(2).position(|w| w[0] == flag && w[1] == value);
        let tmpfs = position("--tmpfs", "/tmp").unwrap();
        assert!(position("--ro-bind", "/tmp/kici-agent-runner-0-1").unwrap() > tmpfs);
        assert!(position("--ro-bind", "/opt/node").is_some());
        assert!(
            position("--ro-bind", "/usr/lib/node").is_none(),
            "under /usr: bound already"
        );
    }
}
