//! One step, one exec: the step's environment inside the container, its hand-off files, the
//! wrapper that makes its process group stoppable, streaming its output, and stopping it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::job_container::{
    create_shared_dir, JobContainer, CONTAINER_HANDOFF, CONTAINER_WORKSPACE,
};
use super::{ContainerError, ContainerExecutor};
use crate::executor::{StepContext, StepFailure, StepIo, StepResult};
use crate::process::StepEnv;

/// Variables the agent copies from its own environment that describe the host, not the image.
pub(super) const HOST_ONLY_VARS: [&str; 6] =
    ["PATH", "HOME", "USER", "SHELL", "TMPDIR", "NODE_PATH"];

/// The hand-off files: variable, file name.
const HANDOFF_FILES: [(&str, &str); 4] = [
    ("KICI_ENV", "env"),
    ("KICI_PATH", "path"),
    ("KICI_OUTPUT", "output"),
    ("KICI_SECRET_OUTPUT", "secret_output"),
];

/// Runs one step: `$1` is the command, `$2` the pid file. Records its pid (= its process group),
/// survives the group SIGTERM so it can report the command's status, then SIGKILLs whatever the
/// command left in the group (found through /proc: no tool beyond `sh` is assumed). Its own
/// stderr goes to /dev/null, and the command gets the real one in a subshell (a redirection on
/// the command itself would still be in force while the wrapper reports a killed command), so
/// the wrapper adds no "Terminated" notice to the step's output.
const STEP_WRAPPER: &str = r#"echo $$ > "$2"
trap : TERM
exec 3>&2 2>/dev/null
(exec sh -c "$1" 2>&3 3>&-)
kici_status=$?
for kici_stat in /proc/[0-9]*/stat; do
  { read -r kici_line < "$kici_stat"; } 2>/dev/null || continue
  set -- ${kici_line##*) }
  kici_pid=${kici_stat#/proc/}
  kici_pid=${kici_pid%/stat}
  [ "$3" = "$$" ] && [ "$kici_pid" != "$$" ] && kill -KILL "$kici_pid" 2>/dev/null
done
exit $kici_status"#;

/// How often a signal whose target has not recorded its pid yet is retried.
const SIGNAL_RETRY: Duration = Duration::from_millis(100);

/// After SIGKILL, stop reading a stream that stays open this long (only a process that left
/// the step's group can hold it).
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(5);

/// Rewrites a host workspace path (or a path below it) to the container's `/workspace`.
fn rewrite_workspace(value: &str, host_workspace: &str) -> String {
    if host_workspace.is_empty() {
        return value.to_owned();
    }
    match value.strip_prefix(host_workspace) {
        Some("") => CONTAINER_WORKSPACE.to_owned(),
        Some(rest) if rest.starts_with('/') => format!("{CONTAINER_WORKSPACE}{rest}"),
        _ => value.to_owned(),
    }
}

/// The environment of a step's exec: see the module docs. `handoff_dir` is the step's hand-off
/// directory inside the container.
fn exec_env(
    step_env: &StepEnv,
    host_only: &BTreeMap<String, String>,
    host_workspace: &str,
    container_path: &str,
    handoff_dir: &str,
) -> Vec<String> {
    let mut env = Vec::new();
    for (key, value) in step_env.iter() {
        if HANDOFF_FILES.iter().any(|(name, _)| *name == key) {
            continue;
        }
        let host_value = host_only.get(key).map(String::as_str);
        let value = if key == "PATH" {
            // Entries added in front of the agent's PATH (`$KICI_PATH`) stay; the agent's own
            // part becomes the container's.
            let added = match host_value {
                Some(host_path) if value == host_path => "",
                Some(host_path) => value
                    .strip_suffix(host_path)
                    .and_then(|front| front.strip_suffix(':'))
                    .unwrap_or(value),
                None => value,
            };
            let mut entries: Vec<String> = added
                .split(':')
                .filter(|entry| !entry.is_empty())
                .map(|entry| rewrite_workspace(entry, host_workspace))
                .collect();
            if added.len() < value.len() || added.is_empty() {
                entries.push(container_path.to_owned());
            }
            entries.join(":")
        } else if host_value == Some(value) {
            continue;
        } else {
            rewrite_workspace(value, host_workspace)
        };
        env.push(format!("{key}={value}"));
    }
    for (name, file) in HANDOFF_FILES {
        env.push(format!("{name}={handoff_dir}/{file}"));
    }
    env
}

/// The signal sent to a step's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum StopSignal {
    Term,
    Kill,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "TERM",
            StopSignal::Kill => "KILL",
        }
    }
}

/// How a step's exec ended.
struct ExecEnd {
    /// The stop that was asked for, if any.
    stopped: Option<StopSignal>,
    /// `None` when the output was abandoned after a kill (an escaped process held it open).
    exit_code: Option<i64>,
}

impl ContainerExecutor {
    /// Sends a signal to a step's process group; `false` when the step has not recorded its pid
    /// yet (try again).
    async fn signal_step(
        &self,
        container: &JobContainer,
        pid_file: &Path,
        signal: StopSignal,
    ) -> bool {
        let Ok(pid) = std::fs::read_to_string(pid_file) else {
            return false;
        };
        let pid = pid.trim();
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let script = format!(
            "kill -{} -{pid} 2>/dev/null || kill -{} {pid} 2>/dev/null; true",
            signal.name(),
            signal.name()
        );
        // As root: the step may have changed user.
        if let Err(e) = self
            .exec_collect(&container.id, &["sh", "-c", &script], Some("0"))
            .await
        {
            warn!(container = %container.name, error = %e, "could not signal a step");
        }
        true
    }

    /// Runs one step's exec to its end, streaming its output and stopping it when asked.
    async fn run_exec(
        &self,
        container: &JobContainer,
        command: &str,
        env: Vec<String>,
        pid_file: &Path,
        pid_file_inside: &str,
        io: &StepIo,
    ) -> Result<ExecEnd, ContainerError> {
        let cmd = [
            "sh",
            "-c",
            STEP_WRAPPER,
            "kici-step",
            command,
            pid_file_inside,
        ];
        let exec = self
            .docker()
            .await?
            .create_exec(
                &container.id,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(cmd.iter().map(|arg| arg.to_string()).collect()),
                    env: Some(env),
                    working_dir: Some(CONTAINER_WORKSPACE.to_owned()),
                    ..Default::default()
                },
            )
            .await
            .map_err(ContainerError::engine(format!(
                "creating the step exec in container {}",
                container.name
            )))?;
        let started = self
            .docker()
            .await?
            .start_exec(&exec.id, Some(StartExecOptions::default()))
            .await
            .map_err(ContainerError::engine(format!(
                "starting the step exec in container {}",
                container.name
            )))?;
        let StartExecResults::Attached { output, .. } = started else {
            return Err(ContainerError::Io {
                action: "starting the step exec".to_owned(),
                source: std::io::Error::other("the engine detached the exec"),
            });
        };
        let ended = self.stream_output(container, output, pid_file, io).await;
        let exit_code = if ended.drained {
            Some(self.exit_code(&exec.id).await?)
        } else {
            None
        };
        Ok(ExecEnd {
            stopped: ended.signal,
            exit_code,
        })
    }

    /// Forwards the exec's output until it ends; on cancel SIGTERM, then SIGKILL after the stop
    /// grace (at once on force).
    async fn stream_output(
        &self,
        container: &JobContainer,
        mut output: ExecOutput,
        pid_file: &Path,
        io: &StepIo,
    ) -> StreamEnd {
        let cancel = io.cancellation().clone();
        let force = io.force().clone();
        let mut wanted: Option<StopSignal> = None;
        let mut sent: Option<StopSignal> = None;
        let mut kill_at: Option<Instant> = None;
        let mut retry_at: Option<Instant> = None;
        let mut abandon_at: Option<Instant> = None;
        loop {
            if let Some(signal) = wanted.filter(|signal| sent != Some(*signal)) {
                retry_at = None;
                if self.signal_step(container, pid_file, signal).await {
                    sent = Some(signal);
                    if signal == StopSignal::Kill {
                        abandon_at = Some(Instant::now() + DRAIN_AFTER_KILL);
                    }
                } else {
                    // The wrapper has not recorded its pid yet: the exec is just starting.
                    retry_at = Some(Instant::now() + SIGNAL_RETRY);
                }
            }
            tokio::select! {
                chunk = output.next() => match chunk {
                    Some(Ok(chunk)) => io.write(chunk.into_bytes().to_vec()).await,
                    Some(Err(e)) => {
                        io.line(format!("[kici] lost the output of the step: {e}")).await;
                        return StreamEnd { signal: wanted, drained: true };
                    }
                    None => return StreamEnd { signal: wanted, drained: true },
                },
                _ = cancel.cancelled(), if wanted.is_none() => {
                    wanted = Some(StopSignal::Term);
                    kill_at = Some(Instant::now() + self.settings.stop_grace);
                }
                _ = force.cancelled(), if wanted != Some(StopSignal::Kill) => {
                    wanted = Some(StopSignal::Kill);
                }
                _ = sleep_until_some(kill_at), if wanted == Some(StopSignal::Term) => {
                    wanted = Some(StopSignal::Kill);
                }
                _ = sleep_until_some(retry_at) => {}
                _ = sleep_until_some(abandon_at) => {
                    io.line("[kici] the step's output stayed open after it was killed: a process of it left its process group").await;
                    return StreamEnd { signal: wanted, drained: false };
                }
            }
        }
    }

    /// Copies what the step wrote to its container-side hand-off files into the agent's.
    fn copy_handoff_back(step_env: &StepEnv, step_dir: &Path) -> Result<(), ContainerError> {
        for (name, file) in HANDOFF_FILES {
            let Some(target) = step_env.get(name) else {
                continue;
            };
            let written = match std::fs::read(step_dir.join(file)) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => {
                    return Err(ContainerError::Io {
                        action: format!("reading ${name} of the step"),
                        source: e,
                    })
                }
            };
            std::fs::write(target, written)
                .map_err(ContainerError::io(format!("writing ${name} to {target}")))?;
        }
        Ok(())
    }

    pub(super) async fn run_step_in(
        &self,
        container: &JobContainer,
        step: &StepContext,
        command: &str,
        io: &StepIo,
    ) -> StepResult {
        let key = format!(
            "step-{}-{}-{}",
            step.index,
            step.attempt,
            self.step_counter.fetch_add(1, Ordering::Relaxed)
        );
        let step_dir = container.handoff_root().join(&key);
        let inside = format!("{CONTAINER_HANDOFF}/{key}");
        create_step_files(&step_dir).map_err(|e| StepFailure::new(e.to_string()))?;
        let env = exec_env(
            &step.env,
            &self.host_only,
            &container.host_workspace,
            &container.path,
            &inside,
        );
        let ended = self
            .run_exec(
                container,
                command,
                env,
                &step_dir.join("pid"),
                &format!("{inside}/pid"),
                io,
            )
            .await;
        if let Err(e) = Self::copy_handoff_back(&step.env, &step_dir) {
            io.line(format!("[kici] {e}")).await;
        }
        if let Err(e) = std::fs::remove_dir_all(&step_dir) {
            debug!(dir = %step_dir.display(), error = %e, "could not remove a step hand-off directory");
        }
        let ended = ended.map_err(|e| StepFailure::new(e.to_string()))?;
        match (ended.stopped, ended.exit_code) {
            (None, Some(0)) => Ok(()),
            (None, Some(code)) => Err(StepFailure::exit_code(
                i32::try_from(code).unwrap_or(i32::MAX),
            )),
            (Some(StopSignal::Kill), _) => {
                Err(StepFailure::new("Command was killed (forced cancel)"))
            }
            (Some(StopSignal::Term), _) => Err(StepFailure::new("Command was stopped (cancelled)")),
            (None, None) => Err(StepFailure::new("the step's exit code is unknown")),
        }
    }
}

/// The live output of an exec.
type ExecOutput = std::pin::Pin<
    Box<dyn Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>> + Send>,
>;

/// How reading a step's output ended.
struct StreamEnd {
    signal: Option<StopSignal>,
    /// Whether the output ended (else it was abandoned after a kill).
    drained: bool,
}

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A step's hand-off directory with its empty files, writable by any container user.
fn create_step_files(dir: &Path) -> Result<(), ContainerError> {
    create_shared_dir(dir)?;
    for (_, file) in HANDOFF_FILES {
        let path = dir.join(file);
        std::fs::File::create(&path)
            .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)))
            .map_err(ContainerError::io(format!("creating {}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> StepEnv {
        let mut env = StepEnv::default();
        env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    #[test]
    fn step_envs_lose_host_values_and_point_inside_the_container() {
        let host_only: BTreeMap<String, String> = [
            ("PATH", "/usr/local/cargo/bin:/usr/bin:/bin"),
            ("HOME", "/home/agent"),
            ("USER", "agent"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let step = env_of(&[
            (
                "PATH",
                "/tmp/kici-ab12/bin:/opt/tool/bin:/usr/local/cargo/bin:/usr/bin:/bin",
            ),
            ("HOME", "/home/agent"),
            ("USER", "builder"),
            ("KICI_WORKSPACE", "/tmp/kici-ab12"),
            ("OUT", "/tmp/kici-ab12/out/x"),
            ("OTHER", "/tmp/kici-ab123"),
            ("KICI_ENV", "/tmp/kici-env-1/env"),
            ("LANG", "C.UTF-8"),
        ]);
        let env = exec_env(
            &step,
            &host_only,
            "/tmp/kici-ab12",
            "/bin",
            "/kici-handoff/s1",
        );
        assert_eq!(
            env,
            [
                "KICI_WORKSPACE=/workspace",
                "LANG=C.UTF-8",
                "OTHER=/tmp/kici-ab123",
                "OUT=/workspace/out/x",
                "PATH=/workspace/bin:/opt/tool/bin:/bin",
                "USER=builder",
                "KICI_ENV=/kici-handoff/s1/env",
                "KICI_PATH=/kici-handoff/s1/path",
                "KICI_OUTPUT=/kici-handoff/s1/output",
                "KICI_SECRET_OUTPUT=/kici-handoff/s1/secret_output",
            ]
        );
        let unchanged = env_of(&[("PATH", "/usr/local/cargo/bin:/usr/bin:/bin")]);
        let env = exec_env(&unchanged, &host_only, "/w", "/usr/bin:/bin", "/h");
        assert_eq!(env[0], "PATH=/usr/bin:/bin");
        let own = env_of(&[("PATH", "/only/mine")]);
        let env = exec_env(&own, &host_only, "/w", "/bin", "/h");
        assert_eq!(env[0], "PATH=/only/mine");
    }
}
