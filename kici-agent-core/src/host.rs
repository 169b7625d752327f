//! Facts about the host for `agent.register` (all optional on the wire).

/// What the registration reports about the machine and the process.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub os_release: Option<String>,
    pub os_version: Option<String>,
    pub total_memory_mb: Option<u64>,
    pub cpu_count: Option<u32>,
    pub user: Option<String>,
    pub uid: Option<u32>,
}

/// Reads the host facts (cheap: a few syscalls).
#[cfg(unix)]
pub fn facts() -> HostFacts {
    use nix::unistd::{getuid, User};

    let (os_release, os_version) = match nix::sys::utsname::uname() {
        Ok(names) => (
            Some(names.release().to_string_lossy().into_owned()),
            Some(names.version().to_string_lossy().into_owned()),
        ),
        Err(_) => (None, None),
    };
    let uid = getuid();
    HostFacts {
        os_release,
        os_version,
        total_memory_mb: total_memory_bytes().map(|bytes| bytes / (1024 * 1024)),
        cpu_count: std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() as u32),
        user: User::from_uid(uid)
            .ok()
            .flatten()
            .map(|user| user.name)
            .or_else(|| std::env::var("USER").ok()),
        uid: Some(uid.as_raw()),
    }
}

/// Physical memory: pages times page size.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn total_memory_bytes() -> Option<u64> {
    use nix::unistd::{sysconf, SysconfVar};

    let pages = u64::try_from(sysconf(SysconfVar::_PHYS_PAGES).ok()??).ok()?;
    let page_size = u64::try_from(sysconf(SysconfVar::PAGE_SIZE).ok()??).ok()?;
    (pages > 0 && page_size > 0).then(|| pages.saturating_mul(page_size))
}

/// nix offers `_SC_PHYS_PAGES` on Linux and Android only; elsewhere the (optional) field is left
/// out.
#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
fn total_memory_bytes() -> Option<u64> {
    None
}

/// Reads the host facts (non-Unix: what std knows).
#[cfg(not(unix))]
pub fn facts() -> HostFacts {
    HostFacts {
        cpu_count: std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() as u32),
        user: std::env::var("USERNAME").ok(),
        ..HostFacts::default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn facts_are_read_on_this_host() {
        let facts = super::facts();
        assert!(facts.cpu_count.unwrap_or(0) >= 1);
        #[cfg(target_os = "linux")]
        {
            assert!(facts.total_memory_mb.unwrap_or(0) > 0);
            assert!(facts.os_release.is_some_and(|r| !r.is_empty()));
            assert!(facts.uid.is_some());
        }
    }
}
