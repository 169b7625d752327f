//! The identity of one running agent process, so that what it leaves on the host (workspaces,
//! hand-off directories, job cgroups, job processes) can be told apart from a live agent's
//! after a crash.
//!
//! A pid alone is not enough: pids are reused, across reboots too. The pid together with the
//! process start time (`/proc/<pid>/stat`, field 22, clock ticks since boot) names one process
//! for the life of the system -- within one pid namespace. Agents run in containers (each its
//! own pid namespace, where the agent is pid 1 or 2) and on the host beside them, and the host
//! sees the containers' job processes in its `/proc` and may share a temp dir with them: there
//! `2-<ticks>` means the container's agent, but on the host pid 2 is another process (kthreadd)
//! with other ticks. So an instance also names its pid namespace (the inode of
//! `/proc/self/ns/pid`), and whether it still runs is only judged from inside that namespace;
//! from anywhere else the answer is [`Liveness::Unknown`] and its leftovers are not touched.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::str::FromStr;
use std::sync::OnceLock;

/// One agent process: pid namespace, pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Instance {
    pid: u32,
    start_ticks: u64,
    /// Inode of the process's pid namespace; 0 when it could not be read.
    pid_namespace: u64,
}

/// What this process can tell about an [`Instance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// It still runs.
    Running,
    /// It has exited: its leftovers are free to collect.
    Gone,
    /// It cannot be told from here (another pid namespace, or no `/proc`): leave its things be.
    Unknown,
}

impl Instance {
    /// This process.
    pub(crate) fn current() -> Instance {
        static CURRENT: OnceLock<Instance> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            let pid = std::process::id();
            Instance {
                pid,
                // Without /proc the start time is unknown; 0 still names this pid.
                start_ticks: start_ticks(pid).unwrap_or(0),
                pid_namespace: own_pid_namespace().unwrap_or(0),
            }
        })
    }

    /// Whether this process still runs, as far as this process can tell: only an instance of
    /// its own pid namespace can be judged, by its pid and start time.
    pub(crate) fn liveness(&self) -> Liveness {
        let here = Instance::current().pid_namespace;
        if here == 0 || self.pid_namespace != here {
            return Liveness::Unknown;
        }
        match start_ticks(self.pid) {
            None => Liveness::Gone,
            Some(_) if self.start_ticks == 0 => Liveness::Unknown,
            Some(ticks) if ticks == self.start_ticks => Liveness::Running,
            // The pid was reused by another process.
            Some(_) => Liveness::Gone,
        }
    }
}

/// `<pid>-<start ticks>-<pid namespace inode>`: safe in file and cgroup names.
impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}",
            self.pid, self.start_ticks, self.pid_namespace
        )
    }
}

/// Refuses anything but the three numbers, including the `<pid>-<ticks>` of earlier versions,
/// which cannot say which pid namespace they belong to.
impl FromStr for Instance {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let mut parts = text.trim().split('-');
        let mut number = || parts.next().ok_or(())?.parse::<u64>().map_err(|_| ());
        let instance = Instance {
            pid: u32::try_from(number()?).map_err(|_| ())?,
            start_ticks: number()?,
            pid_namespace: number()?,
        };
        match parts.next() {
            None => Ok(instance),
            Some(_) => Err(()),
        }
    }
}

/// The inode of this process's pid namespace (`/proc/self/ns/pid`, followed).
fn own_pid_namespace() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/pid")
        .ok()
        .map(|meta| meta.ino())
}

/// Field 22 of `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted after its closing parenthesis.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; field 22 is the 20th.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_running_and_round_trips() {
        let me = Instance::current();
        assert_eq!(me.liveness(), Liveness::Running);
        assert_ne!(me.start_ticks, 0, "/proc is available here");
        assert_ne!(me.pid_namespace, 0, "/proc/self/ns/pid is readable here");
        assert_eq!(me.to_string().parse::<Instance>(), Ok(me));
    }

    #[test]
    fn a_reused_pid_is_not_the_same_instance() {
        let me = Instance::current();
        let impostor = Instance {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert_eq!(impostor.liveness(), Liveness::Gone);
    }

    #[test]
    fn an_exited_process_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let instance = Instance {
            pid: child.id(),
            start_ticks: start_ticks(child.id()).unwrap_or(1),
            pid_namespace: Instance::current().pid_namespace,
        };
        child.wait().unwrap();
        assert_eq!(instance.liveness(), Liveness::Gone);
    }

    /// The pid of another pid namespace names some other process here, or none: neither says
    /// anything about the agent it names there.
    #[test]
    fn an_instance_of_another_pid_namespace_is_never_judged() {
        let me = Instance::current();
        let elsewhere = Instance {
            pid_namespace: me.pid_namespace + 1,
            ..me
        };
        assert_eq!(elsewhere.liveness(), Liveness::Unknown);
        let gone_pid_elsewhere = Instance {
            pid: u32::MAX,
            ..elsewhere
        };
        assert_eq!(gone_pid_elsewhere.liveness(), Liveness::Unknown);
    }

    #[test]
    fn malformed_and_namespace_less_text_is_refused() {
        // "12-345" is what earlier versions wrote: no pid namespace, so no judgement.
        for text in [
            "", "12", "12-345", "a-1-2", "1-b-2", "1-2-c", "1-2-3-4", "-1-2-3",
        ] {
            assert!(text.parse::<Instance>().is_err(), "{text}");
        }
    }
}
