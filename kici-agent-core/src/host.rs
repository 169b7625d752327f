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
    // SAFETY: uname fills the zeroed struct it is given; its fields are NUL-terminated.
    let (os_release, os_version) = unsafe {
        let mut names: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut names) == 0 {
            (Some(c_chars(&names.release)), Some(c_chars(&names.version)))
        } else {
            (None, None)
        }
    };
    // SAFETY: sysconf has no preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let total_memory_mb =
        (pages > 0 && page_size > 0).then(|| (pages as u64 * page_size as u64) / (1024 * 1024));
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    HostFacts {
        os_release,
        os_version,
        total_memory_mb,
        cpu_count: std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() as u32),
        user: user_name(uid).or_else(|| std::env::var("USER").ok()),
        uid: Some(uid),
    }
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

#[cfg(unix)]
fn c_chars(chars: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(unix)]
fn user_name(uid: libc::uid_t) -> Option<String> {
    let mut buffer = vec![0 as libc::c_char; 4096];
    // SAFETY: getpwuid_r writes into our buffer and record; `result` is null or points at `record`.
    unsafe {
        let mut record: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut record,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || record.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(record.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
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
