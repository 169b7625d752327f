//! Job workspaces: `kici-XXXXXX` directories in the OS temp dir, one per job, removed when the
//! job ends; leftovers of a crashed agent are collected at start-up.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Leftovers older than this are removed at start-up.
pub const STALE_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Creates a fresh private workspace (`<tmp>/kici-XXXXXX`, mode 0700), removed on drop.
pub fn create() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("kici-")
        .rand_bytes(6)
        .tempdir()
}

/// Whether a temp-dir entry name is one of ours: a workspace (`kici-` + 6 alphanumerics) or a
/// step hand-off directory (`kici-env-` + 6 alphanumerics).
fn is_ours(name: &str) -> bool {
    let suffix_ok = |s: &str| s.len() == 6 && s.bytes().all(|b| b.is_ascii_alphanumeric());
    name.strip_prefix("kici-env-").is_some_and(suffix_ok)
        || name.strip_prefix("kici-").is_some_and(suffix_ok)
}

/// Removes our directories in `temp_dir` last modified more than `max_age` ago. Never fails:
/// each removal or failure is logged. Returns what was removed.
pub fn collect_stale(temp_dir: &Path, max_age: Duration) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(temp_dir) else {
        return Vec::new();
    };
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| is_ours(n)) else {
            continue;
        };
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > max_age);
        if !meta.is_dir() || !old {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a stale job workspace");
                removed.push(path);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), name, error = %e, "could not remove a stale job workspace")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_old_directories_are_collected() {
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
        let mut removed: Vec<String> = collect_stale(tmp.path(), Duration::ZERO)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        removed.sort();
        assert_eq!(removed, ["kici-abc123", "kici-env-Zz9Yy8"]);
        assert!(tmp.path().join("kici-toolong1").exists());
        assert!(tmp.path().join("kici-file01").exists());
    }

    #[test]
    fn workspaces_are_named_for_the_collector() {
        let dir = create().unwrap();
        let name = dir.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(is_ours(&name), "{name}");
    }
}
