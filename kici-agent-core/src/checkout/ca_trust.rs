//! The extra CA file (`KICI_TLS_CA_FILE`) in libgit2's trust store, so that git HTTPS clones
//! trust what the WebSocket trusts.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Files already added to libgit2's store (it is process-wide; adding twice is pointless).
static GIT_TRUSTED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// Adds the CA certificates of `path` to libgit2's process-wide store; see
/// [`super::trust_extra_ca`].
pub(super) fn add_to_libgit2(path: &Path) -> Result<(), String> {
    let mut trusted = GIT_TRUSTED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let trusted = trusted.get_or_insert_with(HashSet::new);
    if trusted.contains(path) {
        return Ok(());
    }
    // SAFETY: the option adds the file to the certificate store of libgit2's process-wide OpenSSL
    // context; OpenSSL locks that store, so clones running meanwhile are not disturbed, and the
    // lock above serialises our own callers. git2's one-time initialisation, which this may run
    // first, is the same one every clone runs.
    unsafe { git2::opts::set_ssl_cert_file(path) }.map_err(|e| {
        format!(
            "cannot add {} to git's trusted CAs: {}",
            path.display(),
            e.message()
        )
    })?;
    trusted.insert(path.to_owned());
    Ok(())
}
