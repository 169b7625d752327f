//! The command a step runs and the process built for it: its own session, exactly the step
//! environment, piped output, inside the job's containment and sandbox when there are.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::unistd::setsid;
use tokio::process::Command;

use super::StepEnv;
use crate::containment::SpawnPolicy;

/// A command to run as one step process.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// Program name (looked up on the step's `PATH`) or path.
    pub program: String,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The complete environment of the process.
    pub env: StepEnv,
    /// Bytes written to the process's stdin, which is then closed; `None` gives it `/dev/null`.
    pub stdin: Option<Vec<u8>>,
}

impl CommandSpec {
    /// `bash --noprofile --norc -eo pipefail -c <script>`: fail on the first failing command or
    /// pipeline stage, and skip the startup files (the reference agent's steps paid ~125 ms for
    /// `~/.bashrc`).
    pub fn bash(script: &str, cwd: PathBuf, env: StepEnv) -> Self {
        let args = ["--noprofile", "--norc", "-eo", "pipefail", "-c", script];
        Self {
            program: "bash".to_string(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            cwd,
            env,
            stdin: None,
        }
    }
}

/// The process for `spec`: own session, exactly the step environment, piped output; inside
/// the job's containment (its cgroups and tag) and sandbox when there are.
pub(super) fn build_command(spec: &CommandSpec, policy: Option<&SpawnPolicy>) -> Command {
    let (program, args) = match policy.and_then(|p| p.sandbox.as_deref()) {
        Some(sandbox) => {
            // The hand-off files' directory, which the step must be able to write.
            let handoff_dir = spec.env.get("KICI_ENV").and_then(|f| Path::new(f).parent());
            sandbox.wrap(&spec.program, &spec.args, handoff_dir)
        }
        None => (spec.program.clone(), spec.args.clone()),
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter())
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cgroup_fds = match policy {
        Some(policy) => {
            command.env(crate::containment::TAG_VARIABLE, policy.containment.tag());
            policy.containment.join_fds()
        }
        None => Vec::new(),
    };
    // A new session rather than only a new group: the step also loses any controlling
    // terminal, so a tool prompting on /dev/tty fails at once instead of hanging the step.
    // SAFETY: the closure runs between fork and exec and only calls setsid(2) and write(2)
    // on already open fds, which are async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            crate::containment::join_in_child(&cgroup_fds);
            setsid()?;
            Ok(())
        });
    }
    command
}
