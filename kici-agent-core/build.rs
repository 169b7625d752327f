//! Bakes the build's identity into the library for `/health`: the git commit (`buildCommit`)
//! and the build time (`buildDate`). Built outside a git checkout of this project (a crates.io
//! tarball, a Python sdist) the commit is honestly "unknown".

use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let commit = git_commit().unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=KICI_BUILD_COMMIT={commit}");
    // Reproducible builds pin the date; otherwise it is when this crate was compiled.
    let built_at = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=KICI_BUILD_UNIX_TIME={built_at}");
}

/// Where git keeps `name` (`HEAD`, a ref) for this checkout, also in a linked worktree.
fn git_path(name: &str) -> Option<PathBuf> {
    git(&["rev-parse", "--path-format=absolute", "--git-path", name]).map(PathBuf::from)
}

fn git(args: &[&str]) -> Option<String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let output = Command::new("git")
        .args(args)
        .current_dir(manifest_dir)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    Some(text.trim().to_owned())
}

/// The commit checked out, if this crate's sources are tracked by the enclosing repository (a
/// tarball unpacked inside some unrelated checkout must not report that checkout's commit).
fn git_commit() -> Option<String> {
    // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it points to (a commit),
    // and packed refs. Only paths that exist: a missing one would rerun this on every build.
    for name in ["HEAD", "packed-refs"] {
        if let Some(path) = git_path(name).filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|b| git_path(&b)) {
        // A branch that is only in packed-refs gets its loose file with the next commit:
        // then watch the directory it will appear in.
        let watched = if branch.exists() {
            Some(branch.as_path())
        } else {
            branch.parent().filter(|dir| dir.exists())
        };
        if let Some(watched) = watched {
            println!("cargo:rerun-if-changed={}", watched.display());
        }
    }
    git(&["ls-files", "--error-unmatch", "build.rs"])?;
    git(&["rev-parse", "HEAD"])
}
