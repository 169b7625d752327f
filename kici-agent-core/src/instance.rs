//! The identity of one running agent process, so that what it leaves on the host (workspaces,
//! hand-off directories, job cgroups, job processes) can be told apart from a live agent's
//! after a crash.
//!
//! A pid alone is not enough: pids are reused, across reboots too. The pid together with the
//! process start time (`/proc/<pid>/stat`, field 22, clock ticks since boot) names one process
//! for the life of the system.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// One agent process: pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Instance {
    pid: u32,
    start_ticks: u64,
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
            }
        })
    }

    /// Whether this process still runs: the pid exists and started at the same time.
    pub(crate) fn is_alive(&self) -> bool {
        match start_ticks(self.pid) {
            Some(ticks) => self.start_ticks == 0 || ticks == self.start_ticks,
            None => false,
        }
    }
}

/// `<pid>-<start ticks>`: safe in file and cgroup names.
impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.pid, self.start_ticks)
    }
}

impl FromStr for Instance {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let (pid, ticks) = text.trim().split_once('-').ok_or(())?;
        Ok(Instance {
            pid: pid.parse().map_err(|_| ())?,
            start_ticks: ticks.parse().map_err(|_| ())?,
        })
    }
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
    fn current_process_is_alive_and_round_trips() {
        let me = Instance::current();
        assert!(me.is_alive());
        assert_ne!(me.start_ticks, 0, "/proc is available here");
        assert_eq!(me.to_string().parse::<Instance>(), Ok(me));
    }

    #[test]
    fn a_reused_pid_is_not_the_same_instance() {
        let me = Instance::current();
        let impostor = Instance {
            pid: me.pid,
            start_ticks: me.start_ticks + 1,
        };
        assert!(!impostor.is_alive());
    }

    #[test]
    fn an_exited_process_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let instance = Instance {
            pid: child.id(),
            start_ticks: start_ticks(child.id()).unwrap_or(1),
        };
        child.wait().unwrap();
        assert!(!instance.is_alive());
    }

    #[test]
    fn malformed_text_is_refused() {
        for text in ["", "12", "a-1", "1-b", "1-2-3"] {
            assert!(text.parse::<Instance>().is_err(), "{text}");
        }
    }
}
