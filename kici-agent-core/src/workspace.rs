//! Job workspaces (`kici-XXXXXX`) and step hand-off directories (`kici-env-XXXXXX`) in the OS
//! temp dir, removed when their job or step ends, and the start-up collection of those a
//! crashed agent left behind.
//!
//! Each directory has a sibling owner file (`<dir>.owner`) naming the agent process that made
//! it ([`Instance`]). At start-up a directory whose owner is dead is removed at once; one whose
//! owner still runs (another agent on the same host) is never touched, however old. Unmarked
//! directories (an older agent's, or the Node agent's, which uses the same names) and those of
//! an owner this agent cannot judge (an agent of another pid namespace sharing the temp dir,
//! such as a container's with a mounted one) keep the reference rule: removed once older than
//! [`STALE_AFTER`].

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::instance::{Instance, Liveness};

/// Unmarked leftovers older than this are removed at start-up (spec §15.1).
pub const STALE_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

const OWNER_SUFFIX: &str = ".owner";

/// A private directory (mode 0700) in the temp dir, marked as this agent's, removed on drop.
#[derive(Debug)]
pub struct OwnedDir {
    path: PathBuf,
    owner_file: PathBuf,
}

impl OwnedDir {
    /// Creates `<prefix>XXXXXX` (6 random alphanumerics) in `in_dir`, else the OS temp dir.
    pub fn create(prefix: &str, in_dir: Option<&Path>) -> io::Result<Self> {
        let mut builder = tempfile::Builder::new();
        builder.prefix(prefix).rand_bytes(6);
        let dir = match in_dir {
            Some(parent) => builder.tempdir_in(parent)?,
            None => builder.tempdir()?,
        };
        let owner_file = owner_file_of(dir.path());
        std::fs::write(&owner_file, format!("{}\n", Instance::current()))?;
        // From here on removal is ours (drop or close), together with the owner file.
        Ok(OwnedDir {
            path: dir.keep(),
            owner_file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory now, reporting a failure (drop ignores it).
    pub fn close(self) -> io::Result<()> {
        self.remove()
    }

    fn remove(&self) -> io::Result<()> {
        let result = match std::fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        let _ = std::fs::remove_file(&self.owner_file);
        result
    }
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// Creates a fresh job workspace (`<tmp>/kici-XXXXXX`), removed on drop.
pub fn create() -> io::Result<OwnedDir> {
    OwnedDir::create("kici-", None)
}

fn owner_file_of(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(OWNER_SUFFIX);
    PathBuf::from(name)
}

/// Whether a temp-dir entry name is one of ours: a workspace (`kici-` + 6 alphanumerics) or a
/// step hand-off directory (`kici-env-` + 6 alphanumerics).
fn is_ours(name: &str) -> bool {
    let suffix_ok = |s: &str| s.len() == 6 && s.bytes().all(|b| b.is_ascii_alphanumeric());
    name.strip_prefix("kici-env-").is_some_and(suffix_ok)
        || name.strip_prefix("kici-").is_some_and(suffix_ok)
}

/// Who made a directory, as its owner file says.
enum Ownership {
    /// No (readable) owner file, or an owner this agent cannot judge.
    Unmarked,
    Live,
    Dead(Instance),
}

fn ownership(dir: &Path) -> Ownership {
    let text = match std::fs::read_to_string(owner_file_of(dir)) {
        Ok(text) => text,
        Err(_) => return Ownership::Unmarked,
    };
    match text.parse::<Instance>() {
        Ok(owner) => match owner.liveness() {
            Liveness::Running => Ownership::Live,
            Liveness::Gone => Ownership::Dead(owner),
            Liveness::Unknown => Ownership::Unmarked,
        },
        Err(()) => Ownership::Unmarked,
    }
}

/// Removes our directories in `temp_dir` that no live agent owns: at once when their owner
/// died, after `max_age` when unmarked. Never fails: each removal or failure is logged.
/// Returns what was removed.
pub fn collect_stale(temp_dir: &Path, max_age: Duration) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(temp_dir) else {
        return Vec::new();
    };
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if let Some(dir_name) = name.strip_suffix(OWNER_SUFFIX) {
            // An owner file whose directory is gone (a crash between the two removals).
            if is_ours(dir_name) && !temp_dir.join(dir_name).exists() {
                if let Ownership::Dead(_) = ownership(&temp_dir.join(dir_name)) {
                    let _ = std::fs::remove_file(&path);
                }
            }
            continue;
        }
        if !is_ours(name) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_dir() {
            continue;
        }
        let reason = match ownership(&path) {
            Ownership::Live => continue,
            Ownership::Dead(owner) => format!("left by agent process {owner}, which is gone"),
            Ownership::Unmarked => {
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age > max_age);
                if !old {
                    continue;
                }
                format!("unmarked and older than {}h", max_age.as_secs() / 3600)
            }
        };
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                let _ = std::fs::remove_file(owner_file_of(&path));
                tracing::info!(path = %path.display(), reason, "removed a stale job directory");
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a stale job directory")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(paths: &[PathBuf]) -> Vec<String> {
        let mut names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn only_our_old_unmarked_directories_are_collected() {
        let tmp = tempfile::tempdir().unwrap();
        for name in [
            "kici-abc123",
            "kici-env-Zz9Yy8",
            "kici-toolong1",
            "other-abc123",
            "kici-ab",
        ] {
            std::fs::create_dir(tmp.path().join(name)).unwrap();
        }
        std::fs::write(tmp.path().join("kici-file01"), "").unwrap();
        assert!(
            collect_stale(tmp.path(), STALE_AFTER).is_empty(),
            "fresh dirs must stay"
        );
        let removed = collect_stale(tmp.path(), Duration::ZERO);
        assert_eq!(names(&removed), ["kici-abc123", "kici-env-Zz9Yy8"]);
        assert!(tmp.path().join("kici-toolong1").exists());
        assert!(tmp.path().join("kici-file01").exists());
    }

    #[test]
    fn a_dead_owners_directories_go_at_once_a_live_owners_never() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_owner = Instance::current().to_string().replacen(
            &std::process::id().to_string(),
            &child.id().to_string(),
            1,
        );
        child.wait().unwrap();
        for (name, owner) in [
            ("kici-dead01", dead_owner.clone()),
            ("kici-env-dead02", dead_owner),
            ("kici-live01", Instance::current().to_string()),
        ] {
            std::fs::create_dir(tmp.path().join(name)).unwrap();
            std::fs::write(owner_file_of(&tmp.path().join(name)), owner).unwrap();
        }
        // A live owner's directory stays even past the age rule.
        let removed = collect_stale(tmp.path(), Duration::ZERO);
        assert_eq!(names(&removed), ["kici-dead01", "kici-env-dead02"]);
        assert!(tmp.path().join("kici-live01").exists());
        assert!(!owner_file_of(&tmp.path().join("kici-dead01")).exists());
        assert!(owner_file_of(&tmp.path().join("kici-live01")).exists());
    }

    /// A temp dir shared with a container (or the host, seen from one): its agent's pid means
    /// another process here, so its directories fall under the age rule, never "owner gone".
    #[test]
    fn an_owner_in_another_pid_namespace_is_not_judged_only_aged() {
        let tmp = tempfile::tempdir().unwrap();
        let me = Instance::current().to_string();
        let (pid_and_ticks, namespace) = me.rsplit_once('-').unwrap();
        let namespace: u64 = namespace.parse().unwrap();
        // A pid that is surely free here, in another namespace.
        let foreign = format!(
            "{}-{}",
            pid_and_ticks.replacen(&std::process::id().to_string(), &u32::MAX.to_string(), 1),
            namespace + 1
        );
        std::fs::create_dir(tmp.path().join("kici-other1")).unwrap();
        std::fs::write(owner_file_of(&tmp.path().join("kici-other1")), &foreign).unwrap();
        assert!(collect_stale(tmp.path(), STALE_AFTER).is_empty());
        assert_eq!(
            names(&collect_stale(tmp.path(), Duration::ZERO)),
            ["kici-other1"]
        );
    }

    #[test]
    fn owned_dirs_are_named_for_the_collector_and_clean_up_their_owner_file() {
        let dir = create().unwrap();
        let name = dir.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(is_ours(&name), "{name}");
        let owner_file = owner_file_of(dir.path());
        assert!(matches!(ownership(dir.path()), Ownership::Live));
        let path = dir.path().to_path_buf();
        dir.close().unwrap();
        assert!(!path.exists() && !owner_file.exists());

        let dir = OwnedDir::create("kici-env-", None).unwrap();
        let (path, owner_file) = (dir.path().to_path_buf(), owner_file_of(dir.path()));
        drop(dir);
        assert!(!path.exists() && !owner_file.exists());
    }
}
