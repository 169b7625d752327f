//! The workflow dependencies of a TypeScript job (`.kici/node_modules`) on a fresh clone: the
//! dispatch's pre-built tarball (`depsUrl`, checked against `depsHash`), and the host's
//! [`InstallCache`], so that only the first job of a lock file pays for an install.
//!
//! The cache (`<temp>/kici-deps-<uid>/`, private to the agent's user, shared by every agent of
//! that user on the host) holds one complete `node_modules` tree per key:
//! `<key>/node_modules`. A key is the sha256 of what decides the installed tree (package
//! manager, lock file, `package.json`, Node's version and the platform), or the tarball's
//! sha256 for `depsUrl`.
//!
//! Restore is a **hard-link copy**: directories are made fresh for the job and every file is a
//! hard link to the cached one (a copy where linking fails, e.g. across file systems). Cost is
//! one metadata operation per file whatever the package sizes, against a full data copy; and
//! unlike a symlink to the cache, the job's tree is its own: what package managers and steps
//! do to it (add, remove, replace files by rename) never reaches the cache or another job.
//! Cached files are read-only, so an in-place write to a linked file fails instead of reaching
//! the shared copy (except for root, who ignores modes: the remaining risk of the choice).
//! A new entry is a real copy of the job's fresh install (the job keeps running with its own
//! tree), staged under a unique name and published with one `rename`; so a reader only ever
//! sees complete entries, and of two jobs that install the same key at once, one publishes and
//! the other drops its copy. An advisory lock (`flock` on `.lock`: shared to restore,
//! exclusive to publish and evict) keeps eviction from removing an entry while it is read.
//! At most [`MAX_ENTRIES`] entries are kept, the least recently used evicted first.

use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Entries kept in the host cache.
pub const MAX_ENTRIES: usize = 8;

/// Why a build without the cargo feature `http` cannot fetch an `http(s)://` tarball.
const NO_HTTP: &str =
    "downloading over HTTP needs the cargo feature `http`, which this build of the agent leaves out";

/// Longest a tarball download may take (the reference's limit).
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The dispatch's pre-built dependency tarball (`depsUrl`, `depsHash`).
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct DepsTarball {
    /// `http://`, `https://` or `file://`. Presigned: its query is a credential, so only
    /// [`DepsTarball::shown`] may reach a log or an error.
    pub url: String,
    /// sha256 (hex) of the tarball as downloaded.
    pub sha256: String,
}

impl std::fmt::Debug for DepsTarball {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DepsTarball")
            .field("url", &self.shown())
            .field("sha256", &self.sha256)
            .finish()
    }
}

impl DepsTarball {
    /// From a dispatch's top-level fields: both `depsUrl` and `depsHash`, non-empty.
    pub fn from_dispatch(extra: &serde_json::Map<String, serde_json::Value>) -> Option<Self> {
        let field = |name: &str| {
            extra
                .get(name)
                .and_then(serde_json::Value::as_str)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Some(DepsTarball {
            url: field("depsUrl")?,
            sha256: field("depsHash")?.to_ascii_lowercase(),
        })
    }

    /// Why this build cannot fetch the tarball at all, if it cannot: `http(s)://` needs the
    /// cargo feature `http`. The TypeScript executor then installs the dependencies instead, as
    /// if no tarball had come.
    pub fn unavailable_in_this_build(&self) -> Option<&'static str> {
        let over_http =
            url::Url::parse(&self.url).is_ok_and(|url| matches!(url.scheme(), "http" | "https"));
        (over_http && !cfg!(feature = "http")).then_some(NO_HTTP)
    }

    /// The URL without its query, user info or fragment: what logs may show.
    pub fn shown(&self) -> String {
        match url::Url::parse(&self.url) {
            Ok(url) => match url.scheme() {
                "file" => "a file:// URL".to_owned(),
                scheme => format!(
                    "{scheme}://{}{}",
                    url.host_str().unwrap_or(""),
                    url.port().map(|p| format!(":{p}")).unwrap_or_default()
                ),
            },
            Err(_) => "an unparsable URL".to_owned(),
        }
    }
}

/// Why the dispatch's tarball could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum TarballError {
    #[error("the workflow dependencies tarball ({url}) could not be downloaded: {reason}")]
    Download { url: String, reason: String },
    #[error("the workflow dependencies tarball ({url}) does not match the dispatch's depsHash: expected sha256 {expected}, got {actual}")]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("the workflow dependencies tarball could not be unpacked: {0}")]
    Unpack(String),
}

/// Downloads `tarball` into `scratch` (a file name), checks its sha256 before anything is
/// unpacked, then unpacks it (gzip tar, repository-relative: `.kici/node_modules/...`) into
/// `root`. The scratch file is removed in every case.
pub async fn restore_tarball(
    tarball: &DepsTarball,
    root: &Path,
    scratch: &Path,
) -> Result<(), TarballError> {
    let result = async {
        let actual = tokio::time::timeout(DOWNLOAD_TIMEOUT, download(&tarball.url, scratch))
            .await
            .map_err(|_| format!("no complete answer within {}s", DOWNLOAD_TIMEOUT.as_secs()))
            .and_then(|r| r)
            .map_err(|reason| TarballError::Download {
                url: tarball.shown(),
                reason,
            })?;
        if actual != tarball.sha256 {
            return Err(TarballError::Mismatch {
                url: tarball.shown(),
                expected: tarball.sha256.clone(),
                actual,
            });
        }
        unpack(scratch, root).await
    }
    .await;
    let _ = tokio::fs::remove_file(scratch).await;
    result
}

/// Writes the body at `url` to `to`; returns its sha256 (hex).
async fn download(url: &str, to: &Path) -> Result<String, String> {
    let parsed = url::Url::parse(url).map_err(|_| "not a URL".to_owned())?;
    let mut file = tokio::fs::File::create(to)
        .await
        .map_err(|e| format!("cannot write {}: {e}", to.display()))?;
    let mut hash = Sha256::new();
    match parsed.scheme() {
        "file" => {
            let path = parsed
                .to_file_path()
                .map_err(|()| "not a local file URL".to_owned())?;
            let mut source = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let n = source.read(&mut buffer).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                hash.update(&buffer[..n]);
                file.write_all(&buffer[..n])
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        #[cfg(feature = "http")]
        "http" | "https" => {
            let mut response = crate::tls::http_get(&parsed).await?;
            use http_body_util::BodyExt;
            while let Some(frame) = response.frame().await {
                let frame = frame.map_err(|e| format!("the download broke off: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    hash.update(&data);
                    file.write_all(&data).await.map_err(|e| e.to_string())?;
                }
            }
        }
        #[cfg(not(feature = "http"))]
        "http" | "https" => return Err(NO_HTTP.to_owned()),
        other => return Err(format!("unsupported URL scheme {other:?}")),
    }
    file.flush().await.map_err(|e| e.to_string())?;
    Ok(hex(&hash.finalize()))
}

async fn unpack(archive: &Path, root: &Path) -> Result<(), TarballError> {
    // GNU tar refuses members that leave the target (`..`, absolute names).
    let output = tokio::process::Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(root)
        .arg("--no-same-owner")
        .output()
        .await
        .map_err(|e| TarballError::Unpack(format!("cannot run tar: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(TarballError::Unpack(format!(
            "tar ended with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key of an install: sha256 over every part, each length-prefixed.
pub fn install_key(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hex(&hash.finalize())
}

/// The host's cache of installed `node_modules` trees (see the module docs).
#[derive(Debug, Clone)]
pub struct InstallCache {
    root: PathBuf,
}

impl Default for InstallCache {
    /// `<temp>/kici-deps-<uid>`.
    fn default() -> Self {
        let uid = nix::unistd::geteuid();
        InstallCache::at(std::env::temp_dir().join(format!("kici-deps-{uid}")))
    }
}

/// An advisory lock on the cache, released on drop.
type CacheLock = Flock<std::fs::File>;

impl InstallCache {
    pub fn at(root: PathBuf) -> Self {
        InstallCache { root }
    }

    /// Makes the cache directory (0700), refusing one that is not this user's alone.
    fn open(&self) -> io::Result<()> {
        match std::fs::DirBuilder::new().mode(0o700).create(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let meta = std::fs::symlink_metadata(&self.root)?;
        let uid = nix::unistd::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
            return Err(io::Error::other(format!(
                "{} is not a private directory of this user",
                self.root.display()
            )));
        }
        Ok(())
    }

    fn lock(&self, exclusive: bool) -> io::Result<CacheLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(".lock"))?;
        let mode = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        Flock::lock(file, mode).map_err(|(_, errno)| io::Error::from(errno))
    }

    fn entry(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Restores entry `key` as `kici_dir/node_modules` (hard links). `Ok(false)`: no such
    /// entry. A failed restore leaves no partial tree behind.
    pub fn restore(&self, key: &str, kici_dir: &Path) -> io::Result<bool> {
        self.open()?;
        let _shared = self.lock(false)?;
        let cached = self.entry(key).join("node_modules");
        if !cached.is_dir() {
            return Ok(false);
        }
        let target = kici_dir.join("node_modules");
        if let Err(e) = copy_tree(&cached, &target, Link::HardLink) {
            let _ = std::fs::remove_dir_all(&target);
            return Err(e);
        }
        // Least recently used goes first: a restore counts as a use.
        let _ = std::fs::File::open(self.entry(key)).and_then(|dir| {
            dir.set_modified(SystemTime::now())?;
            Ok(())
        });
        Ok(true)
    }

    /// Stores a copy of `kici_dir/node_modules` as entry `key` unless it is there already,
    /// then evicts the least recently used entries beyond [`MAX_ENTRIES`].
    pub fn store(&self, key: &str, kici_dir: &Path) -> io::Result<()> {
        self.open()?;
        if self.entry(key).is_dir() {
            return Ok(());
        }
        let staging = tempfile::Builder::new()
            .prefix(".staging-")
            .tempdir_in(&self.root)?;
        copy_tree(
            &kici_dir.join("node_modules"),
            &staging.path().join("node_modules"),
            Link::ReadOnlyCopy,
        )?;
        {
            let _exclusive = self.lock(true)?;
            match std::fs::rename(staging.path(), self.entry(key)) {
                Ok(()) => {}
                // Another job published the same key first: its entry is as good as ours.
                Err(_) if self.entry(key).is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        self.evict()
    }

    fn evict(&self) -> io::Result<()> {
        let mut entries: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(&self.root)?
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if entries.len() <= MAX_ENTRIES {
            return Ok(());
        }
        entries.sort();
        let excess = entries.len() - MAX_ENTRIES;
        let mut doomed = Vec::new();
        {
            let _exclusive = self.lock(true)?;
            for (_, path) in entries.into_iter().take(excess) {
                let trash = self
                    .root
                    .join(format!(".evicted-{}", uuid::Uuid::new_v4().simple()));
                if std::fs::rename(&path, &trash).is_ok() {
                    doomed.push(trash);
                }
            }
        }
        // Out of sight already: removed without holding up restores (read-only files in
        // writable directories unlink fine).
        for path in doomed {
            let _ = std::fs::remove_dir_all(&path);
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Link {
    /// Hard-link each file (a copy where that fails).
    HardLink,
    /// Copy each file and make it read-only.
    ReadOnlyCopy,
}

/// Copies the tree at `from` to `to` (which must not exist): directories made fresh, symlinks
/// recreated as they are, files linked or copied as `how` says.
fn copy_tree(from: &Path, to: &Path, how: Link) -> io::Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&source, &target, how)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
        } else {
            match how {
                Link::HardLink => {
                    if std::fs::hard_link(&source, &target).is_err() {
                        std::fs::copy(&source, &target)?;
                    }
                }
                Link::ReadOnlyCopy => {
                    std::fs::copy(&source, &target)?;
                    let mode = std::fs::metadata(&target)?.permissions().mode() & !0o222;
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("node_modules/pkg/lib")).unwrap();
        std::fs::write(root.join("node_modules/pkg/lib/index.js"), "export {}").unwrap();
        std::os::unix::fs::symlink("../pkg/lib/index.js", root.join("node_modules/pkg/link"))
            .unwrap();
    }

    #[test]
    fn only_a_build_without_http_gives_up_tarballs_served_over_http() {
        let tarball = |url: &str| DepsTarball {
            url: url.to_owned(),
            sha256: "0".repeat(64),
        };
        assert_eq!(
            tarball("file:///tmp/deps.tgz").unavailable_in_this_build(),
            None
        );
        for url in [
            "https://bucket.example/deps.tgz?X-Amz-Signature=secret",
            "http://10.0.0.1:9000/deps.tgz",
        ] {
            let reason = tarball(url).unavailable_in_this_build();
            if cfg!(feature = "http") {
                assert_eq!(reason, None, "{url}");
            } else {
                let reason = reason.unwrap_or_else(|| panic!("{url} is not refused"));
                assert!(reason.contains("feature `http`"), "{reason}");
                assert!(!reason.contains("secret"), "{reason}");
            }
        }
    }

    #[test]
    fn a_stored_tree_restores_as_links_the_job_may_change_without_touching_the_cache() {
        let base = tempfile::tempdir().unwrap();
        let cache = InstallCache::at(base.path().join("cache"));
        let first = base.path().join("first");
        tree(&first);
        let key = install_key(&[b"npm", b"lock"]);
        cache.store(&key, &first).unwrap();

        let second = base.path().join("second");
        std::fs::create_dir(&second).unwrap();
        assert!(cache.restore(&key, &second).unwrap());
        let restored = second.join("node_modules/pkg/lib/index.js");
        assert_eq!(std::fs::read_to_string(&restored).unwrap(), "export {}");
        assert_eq!(
            std::fs::read_link(second.join("node_modules/pkg/link")).unwrap(),
            Path::new("../pkg/lib/index.js")
        );
        let cached = base
            .path()
            .join("cache")
            .join(&key)
            .join("node_modules/pkg/lib/index.js");
        assert_eq!(
            std::fs::metadata(&restored).unwrap().ino(),
            std::fs::metadata(&cached).unwrap().ino(),
            "restored by hard link"
        );
        // What a package manager does: replace by rename, add, remove.
        std::fs::write(second.join("node_modules/pkg/new.js"), "x").unwrap();
        std::fs::rename(second.join("node_modules/pkg/new.js"), &restored).unwrap();
        std::fs::remove_file(second.join("node_modules/pkg/link")).unwrap();
        assert_eq!(std::fs::read_to_string(&cached).unwrap(), "export {}");
        assert!(base
            .path()
            .join("cache")
            .join(&key)
            .join("node_modules/pkg/link")
            .exists());
        assert!(!cache.restore(&install_key(&[b"other"]), &second).unwrap());
    }

    #[test]
    fn concurrent_stores_of_one_key_leave_one_complete_entry_and_the_cache_is_bounded() {
        let base = tempfile::tempdir().unwrap();
        let cache = InstallCache::at(base.path().join("cache"));
        let source = base.path().join("source");
        tree(&source);
        let key = install_key(&[b"same"]);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| cache.store(&key, &source).unwrap());
            }
        });
        let names: Vec<String> = std::fs::read_dir(base.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect();
        assert_eq!(
            names,
            std::slice::from_ref(&key),
            "no staging copy left behind"
        );

        for i in 0..MAX_ENTRIES + 3 {
            cache
                .store(&install_key(&[i.to_string().as_bytes()]), &source)
                .unwrap();
        }
        let kept = std::fs::read_dir(base.path().join("cache"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().len() == 64)
            .count();
        assert_eq!(kept, MAX_ENTRIES);
    }

    #[test]
    fn the_shown_url_has_no_credentials() {
        let tarball = DepsTarball {
            url: "https://user:pw@store.example:9000/deps.tgz?X-Amz-Signature=abc".into(),
            sha256: "00".into(),
        };
        assert_eq!(tarball.shown(), "https://store.example:9000");
        assert!(!format!("{tarball:?}").contains("abc"));
    }
}
