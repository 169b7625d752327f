//! The diagnostics bundle answering `fleet.logs.request` (protocol.md §4.2, agent spec §15.4): a
//! ZIP with `manifest.json`, `config/config.json` (an allowlist of settings; secrets appear only
//! as whether they are set), `system/info.json` (host facts), `system/metrics.txt` (what
//! `/metrics` serves), `system/jobs.json` (active jobs), `logs/recent.log` (the agent's recent
//! log records) and the `KICI_LOG_DIR` files written within the requested window, newest first,
//! as far as `maxBytes` allows.
//!
//! The ZIP goes out as `fleet.bundle.chunk`s of [`CHUNK_RAW_BYTES`] raw bytes each on the
//! outbox's telemetry lane, at most [`CHUNKS_IN_FLIGHT`] waiting at once; a bundle that cannot
//! be built or does not fit `maxBytes` is answered with `fleet.bundle.error`.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::{json, Value};
use zip::write::SimpleFileOptions;

use crate::config::AgentConfig;
use crate::outbox::Outbox;
use crate::protocol::{FleetBundleChunk, FleetBundleError, JobRef, Outbound};

/// Raw bytes per chunk (the Node agent's ~85 KiB).
pub const CHUNK_RAW_BYTES: usize = 85 * 1024;
/// Chunks allowed to wait in the outbox at once.
pub const CHUNKS_IN_FLIGHT: usize = 4;

/// Why no bundle could be built.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Writing the archive failed.
    #[error("could not build the diagnostics bundle: {0}")]
    Zip(#[from] zip::result::ZipError),
    /// Writing the archive failed.
    #[error("could not build the diagnostics bundle: {0}")]
    Io(#[from] std::io::Error),
    /// The mandatory part alone is larger than the request allows.
    #[error("the diagnostics bundle needs {needed} bytes, more than maxBytes {max_bytes}")]
    TooLarge {
        /// Bytes of the smallest bundle.
        needed: usize,
        /// The request's limit.
        max_bytes: u64,
    },
}

/// What goes into a bundle.
pub(crate) struct BundleFacts {
    pub agent_id: String,
    pub hostname: String,
    pub config: Value,
    pub metrics_text: String,
    pub active_jobs: Vec<JobRef>,
    pub recent_log: Vec<String>,
    pub log_dir: Option<PathBuf>,
    pub uptime: Duration,
}

/// The settings shown in a bundle: an allowlist, secrets only as "set or not".
pub(crate) fn redacted_config(config: &AgentConfig) -> Value {
    let mut url = url::Url::parse(&config.orchestrator_url).ok();
    if let Some(url) = url.as_mut() {
        // Credentials or tokens in the URL are not shown.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_query(None);
    }
    json!({
        "agentId": config.agent_id,
        "orchestratorUrl": url.map(String::from),
        "labels": config.labels,
        "maxConcurrency": config.max_concurrency,
        "logLevel": config.log_level.as_str(),
        "logFormat": config.log_format.as_str(),
        "logDir": config.log_dir,
        "executionMode": config.execution_mode.map(|m| m.as_str()),
        "scalerManaged": config.scaler_managed,
        "sandbox": config.sandbox,
        "agentToken": if config.token.is_some() { "set" } else { "unset" },
        "githubToken": if config.github_token.is_some() { "set" } else { "unset" },
    })
}

/// Builds the ZIP: the mandatory entries, then log files of the window while they fit.
pub(crate) fn build(
    facts: &BundleFacts,
    window: Duration,
    max_bytes: u64,
) -> Result<Vec<u8>, BundleError> {
    let host = crate::host::facts();
    let generated_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut entries: Vec<(String, Vec<u8>)> = vec![
        (
            "manifest.json".into(),
            json!({"kind": "agent", "agentId": facts.agent_id, "generatedAt": generated_at})
                .to_string()
                .into_bytes(),
        ),
        (
            "config/config.json".into(),
            facts.config.to_string().into_bytes(),
        ),
        (
            "system/info.json".into(),
            json!({
                "hostname": facts.hostname,
                "platform": std::env::consts::OS,
                "arch": std::env::consts::ARCH,
                "runtimeVersion": crate::agent::VERSION,
                "cpus": host.cpu_count,
                "totalMemoryMb": host.total_memory_mb,
                "osRelease": host.os_release,
                "uptimeSeconds": facts.uptime.as_secs(),
            })
            .to_string()
            .into_bytes(),
        ),
        (
            "system/metrics.txt".into(),
            facts.metrics_text.clone().into_bytes(),
        ),
        (
            "system/jobs.json".into(),
            serde_json::to_vec(&facts.active_jobs).unwrap_or_default(),
        ),
        (
            "logs/recent.log".into(),
            facts.recent_log.join("\n").into_bytes(),
        ),
    ];
    let mandatory = zip_entries(&entries)?;
    if mandatory.len() as u64 > max_bytes {
        return Err(BundleError::TooLarge {
            needed: mandatory.len(),
            max_bytes,
        });
    }
    let mut bundle = mandatory;
    for file in log_files_within(facts.log_dir.as_deref(), window) {
        let Ok(content) = std::fs::read(&file) else {
            continue;
        };
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        entries.push((format!("logs/{name}"), content));
        let candidate = zip_entries(&entries)?;
        if candidate.len() as u64 > max_bytes {
            entries.pop();
            break;
        }
        bundle = candidate;
    }
    Ok(bundle)
}

fn zip_entries(entries: &[(String, Vec<u8>)]) -> Result<Vec<u8>, BundleError> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, content) in entries {
        writer.start_file(name.as_str(), options)?;
        writer.write_all(content)?;
    }
    Ok(writer.finish()?.into_inner())
}

/// Regular files of `dir` modified within `window`, newest first (none without a directory).
fn log_files_within(dir: Option<&Path>, window: Duration) -> Vec<PathBuf> {
    let Some(entries) = dir.and_then(|d| std::fs::read_dir(d).ok()) else {
        return Vec::new();
    };
    let since = SystemTime::now()
        .checked_sub(window)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut files: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let meta = entry.metadata().ok().filter(|m| m.is_file())?;
            let modified = meta.modified().ok().filter(|m| *m >= since)?;
            Some((modified, entry.path()))
        })
        .collect();
    files.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    files.into_iter().map(|(_, path)| path).collect()
}

/// The chunks of `data` (one empty last chunk for an empty bundle).
pub(crate) fn chunks(request_id: &str, data: &[u8]) -> Vec<Outbound> {
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(CHUNK_RAW_BYTES).collect()
    };
    let last = pieces.len() - 1;
    pieces
        .into_iter()
        .enumerate()
        .map(|(seq, piece)| {
            Outbound::FleetBundleChunk(FleetBundleChunk {
                request_id: request_id.to_owned(),
                seq: seq as u64,
                is_last: seq == last,
                data_b64: base64::engine::general_purpose::STANDARD.encode(piece),
            })
        })
        .collect()
}

/// Builds the bundle on a blocking thread and queues its chunks (or the error), a few at a time.
pub(crate) async fn answer(
    outbox: Arc<Outbox>,
    request_id: String,
    window: Duration,
    max_bytes: u64,
    facts: BundleFacts,
) {
    let built = tokio::task::spawn_blocking(move || build(&facts, window, max_bytes)).await;
    let messages = match built {
        Ok(Ok(data)) => chunks(&request_id, &data),
        Ok(Err(error)) => vec![bundle_error(&request_id, error.to_string())],
        Err(_) => vec![bundle_error(
            &request_id,
            "building the diagnostics bundle failed unexpectedly".into(),
        )],
    };
    for message in messages {
        while outbox.telemetry_len() >= CHUNKS_IN_FLIGHT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        outbox.push_telemetry(message);
    }
}

fn bundle_error(request_id: &str, message: String) -> Outbound {
    tracing::warn!(%message, "diagnostics bundle not sent");
    Outbound::FleetBundleError(FleetBundleError {
        request_id: request_id.to_owned(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(log_dir: &Path) -> BundleFacts {
        BundleFacts {
            agent_id: "a".into(),
            hostname: "h".into(),
            config: json!({}),
            metrics_text: String::new(),
            active_jobs: Vec::new(),
            recent_log: Vec::new(),
            log_dir: Some(log_dir.to_owned()),
            uptime: Duration::ZERO,
        }
    }

    fn names(zip_bytes: Vec<u8>) -> Vec<String> {
        let archive = zip::ZipArchive::new(Cursor::new(zip_bytes)).unwrap();
        archive.file_names().map(str::to_owned).collect()
    }

    #[test]
    fn log_files_of_the_window_go_in_while_they_fit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent-2026-12-02.log"), "x".repeat(1000)).unwrap();
        let day = Duration::from_secs(24 * 3600);
        let all = names(build(&facts(dir.path()), day, 1 << 20).unwrap());
        assert!(
            all.contains(&"logs/agent-2026-12-02.log".to_owned()),
            "{all:?}"
        );
        assert!(all.contains(&"system/metrics.txt".to_owned()), "{all:?}");
        // Outside the window, or over the budget: left out, the rest still goes.
        let none = names(build(&facts(dir.path()), Duration::ZERO, 1 << 20).unwrap());
        assert!(!none
            .iter()
            .any(|n| n.ends_with(".log") && n != "logs/recent.log"));
        let mandatory = build(&facts(dir.path()), Duration::ZERO, 1 << 20)
            .unwrap()
            .len();
        let tight = names(build(&facts(dir.path()), day, mandatory as u64 + 10).unwrap());
        assert!(!tight.contains(&"logs/agent-2026-12-02.log".to_owned()));
        assert!(matches!(
            build(&facts(dir.path()), day, 10),
            Err(BundleError::TooLarge { max_bytes: 10, .. })
        ));
    }

    #[test]
    fn chunks_are_numbered_and_the_empty_bundle_is_one_empty_last_chunk() {
        let data = vec![7u8; CHUNK_RAW_BYTES * 2 + 1];
        let sent = chunks("r", &data);
        assert_eq!(sent.len(), 3);
        let Outbound::FleetBundleChunk(last) = &sent[2] else {
            panic!()
        };
        assert_eq!((last.seq, last.is_last), (2, true));
        let Outbound::FleetBundleChunk(first) = &sent[0] else {
            panic!()
        };
        assert!(!first.is_last);
        let empty = chunks("r", &[]);
        assert_eq!(
            empty,
            [Outbound::FleetBundleChunk(FleetBundleChunk {
                request_id: "r".into(),
                seq: 0,
                is_last: true,
                data_b64: String::new()
            })]
        );
    }
}
