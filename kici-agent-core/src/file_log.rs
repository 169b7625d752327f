//! The optional rotated file copy of the agent's own JSON log (`KICI_LOG_DIR`, agent spec §16).
//!
//! One file per local day, `agent-<suffix>-YYYY-MM-DD.log` (or `agent-YYYY-MM-DD.log` without a
//! suffix). A file that would grow past `KICI_LOG_MAX_SIZE` is rotated first, and so is the
//! previous day's file when the date changes: rotated files become `<name>.1.gz`, `<name>.2.gz`,
//! ... (newest first, gzip-compressed), at most [`MAX_PIECES_PER_DAY`] per day. Files of days
//! older than `KICI_LOG_RETENTION_DAYS` are removed when the log opens and at each day change.
//!
//! The size rotation and the gzip come from the `file-rotate` crate; `tracing-appender` was not
//! used because it has no size cap, keeps files by count rather than age, and names files
//! `<prefix>.<date>.<suffix>`, not the Node agent's `agent-<id>-<date>.log`. This module adds
//! what neither crate does: the per-day file name and the age-based clean-up.
//!
//! [`RotatingFileLog`] is a plain [`Write`]: the binary hands it, behind a mutex, to its
//! `tracing-subscriber` JSON layer. Each log record arrives as one `write` call, so a record is
//! never split across two files.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

use chrono::{Days, NaiveDate};
use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};

use crate::config::AgentConfig;

/// `KICI_LOG_MAX_SIZE` default: 500 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 500 << 20;
/// `KICI_LOG_RETENTION_DAYS` default.
pub const DEFAULT_RETENTION_DAYS: u32 = 7;
/// Rotated pieces kept per day; with the size cap and the retention it bounds the disk used.
pub const MAX_PIECES_PER_DAY: usize = 100;

/// Why the file log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum FileLogError {
    /// The directory could not be created.
    #[error("KICI_LOG_DIR {dir}: cannot create the directory: {source}")]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The day's file could not be opened for appending.
    #[error("KICI_LOG_DIR: cannot open {file} for appending: {source}")]
    Open {
        /// The file.
        file: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Parses a `KICI_LOG_MAX_SIZE` value: bytes, optionally with a `k`, `m` or `g` suffix (either
/// case, powers of 1024), greater than 0.
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "expected a number of bytes, optionally with a k/m/g suffix (e.g. 500m), got {raw:?}"
        )
    };
    let (digits, shift) = match raw.as_bytes().last() {
        Some(b'k' | b'K') => (&raw[..raw.len() - 1], 10),
        Some(b'm' | b'M') => (&raw[..raw.len() - 1], 20),
        Some(b'g' | b'G') => (&raw[..raw.len() - 1], 30),
        _ => (raw, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{raw:?} is more bytes than a 64-bit size can hold"))?;
    if bytes == 0 {
        return Err(format!("must be greater than 0, got {raw:?}"));
    }
    Ok(bytes)
}

/// The file-name form of an id: every run of characters outside `[A-Za-z0-9_.-]` becomes one `_`.
pub fn sanitize_suffix(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    let mut in_run = false;
    for c in id.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('_');
            in_run = true;
        }
    }
    out
}

/// Where and how much to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLogSettings {
    /// The directory (created when missing).
    pub dir: PathBuf,
    /// Largest size of one file, in bytes (a single larger record still goes whole).
    pub max_file_bytes: u64,
    /// Days of files kept, today included.
    pub retention_days: u32,
    /// The sanitized file-name suffix, if any.
    pub suffix: Option<String>,
}

impl FileLogSettings {
    /// The settings of `config`, or `None` when `KICI_LOG_DIR` is not set.
    pub fn from_config(config: &AgentConfig) -> Option<Self> {
        Some(FileLogSettings {
            dir: config.log_dir.clone()?,
            max_file_bytes: config.log_max_size,
            retention_days: config.log_retention_days,
            suffix: config.log_file_suffix.clone(),
        })
    }

    /// The name of the given day's file.
    pub fn file_name(&self, day: NaiveDate) -> String {
        match &self.suffix {
            Some(suffix) => format!("agent-{suffix}-{}.log", day.format("%Y-%m-%d")),
            None => format!("agent-{}.log", day.format("%Y-%m-%d")),
        }
    }

    /// The day of one of our files (current or rotated), or `None` for any other file.
    fn day_of(&self, file_name: &str) -> Option<NaiveDate> {
        let prefix = match &self.suffix {
            Some(suffix) => format!("agent-{suffix}-"),
            None => "agent-".to_owned(),
        };
        let rest = file_name.strip_prefix(&prefix)?;
        let (date, tail) = (rest.get(..10)?, rest.get(10..)?);
        if !(tail == ".log" || tail.starts_with(".log.")) {
            return None;
        }
        NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()
    }
}

/// Today's date on the local clock (the Node agent's files use local dates too).
fn local_today() -> NaiveDate {
    chrono::Local::now().date_naive()
}

/// A day-named, size-capped, gzip-rotated, age-pruned log file.
pub struct RotatingFileLog {
    settings: FileLogSettings,
    today: Box<dyn Fn() -> NaiveDate + Send>,
    day: NaiveDate,
    file: FileRotate<AppendCount>,
    /// Bytes in the current file.
    size: u64,
}

impl std::fmt::Debug for RotatingFileLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotatingFileLog")
            .field("settings", &self.settings)
            .field("day", &self.day)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl RotatingFileLog {
    /// Opens today's file (creating the directory) and removes expired files.
    pub fn open(settings: FileLogSettings) -> Result<Self, FileLogError> {
        Self::with_clock(settings, Box::new(local_today))
    }

    /// [`RotatingFileLog::open`] with a given clock (tests move the date).
    pub fn with_clock(
        settings: FileLogSettings,
        today: Box<dyn Fn() -> NaiveDate + Send>,
    ) -> Result<Self, FileLogError> {
        fs::create_dir_all(&settings.dir).map_err(|source| FileLogError::CreateDir {
            dir: settings.dir.clone(),
            source,
        })?;
        let day = today();
        let (file, size) = open_day(&settings, day)?;
        let log = RotatingFileLog {
            settings,
            today,
            day,
            file,
            size,
        };
        log.remove_expired();
        Ok(log)
    }

    /// The path of the file being written.
    pub fn current_path(&self) -> PathBuf {
        self.settings.dir.join(self.settings.file_name(self.day))
    }

    /// Removes our files of days outside the retention window (errors are ignored: a file
    /// someone else removed or locked is not a reason to stop logging).
    fn remove_expired(&self) {
        let keep = self.settings.retention_days.max(1);
        let Some(oldest_kept) = self.day.checked_sub_days(Days::new(u64::from(keep) - 1)) else {
            return;
        };
        let Ok(entries) = fs::read_dir(&self.settings.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(day) = name.to_str().and_then(|n| self.settings.day_of(n)) else {
                continue;
            };
            if day < oldest_kept {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Closes the finished day's file (rotated and compressed like a full one) and opens today's.
    fn switch_day(&mut self, day: NaiveDate) -> io::Result<()> {
        let finished = self.current_path();
        if self.size > 0 {
            self.file.rotate()?;
        }
        // `rotate` reopens an empty base file; the day is over, so it goes.
        if fs::metadata(&finished).is_ok_and(|m| m.len() == 0) {
            let _ = fs::remove_file(&finished);
        }
        let (file, size) = open_day(&self.settings, day).map_err(io::Error::other)?;
        self.file = file;
        self.size = size;
        self.day = day;
        self.remove_expired();
        Ok(())
    }
}

/// Opens (appending) the file of `day`, checking first that it can be opened: `FileRotate`
/// would otherwise drop every write silently.
fn open_day(
    settings: &FileLogSettings,
    day: NaiveDate,
) -> Result<(FileRotate<AppendCount>, u64), FileLogError> {
    let path = settings.dir.join(settings.file_name(day));
    let size = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|f| f.metadata())
        .map_err(|source| FileLogError::Open {
            file: path.clone(),
            source,
        })?
        .len();
    let file = FileRotate::new(
        &path,
        AppendCount::new(MAX_PIECES_PER_DAY),
        // Rotation by size is decided here, before a write, so a record never straddles files.
        ContentLimit::None,
        Compression::OnRotate(0),
        None,
    );
    Ok((file, size))
}

impl Write for RotatingFileLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let today = (self.today)();
        if today != self.day {
            self.switch_day(today)?;
        }
        if self.size > 0 && self.size + buf.len() as u64 > self.settings.max_file_bytes {
            self.file.rotate()?;
            self.size = 0;
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::{Arc, Mutex};

    use super::*;
    use std::path::Path;

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    fn settings(dir: &Path, suffix: Option<&str>) -> FileLogSettings {
        FileLogSettings {
            dir: dir.to_owned(),
            max_file_bytes: 100,
            retention_days: 3,
            suffix: suffix.map(str::to_owned),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn gunzip(path: &Path) -> String {
        let mut text = String::new();
        flate2::read::GzDecoder::new(fs::File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    /// A clock the test moves.
    fn clock(start: &str) -> (Arc<Mutex<NaiveDate>>, Box<dyn Fn() -> NaiveDate + Send>) {
        let date = Arc::new(Mutex::new(day(start)));
        let read = date.clone();
        (date, Box::new(move || *read.lock().unwrap()))
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("500m"), Ok(500 << 20));
        assert_eq!(parse_size("2K"), Ok(2048));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("123"), Ok(123));
        for bad in ["", "m", "-5", "1.5g", "5 m", "5mb", "+5"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_size("0k"),
            Err("must be greater than 0, got \"0k\"".into())
        );
        assert!(parse_size("17179869184g").is_err());
    }

    #[test]
    fn suffixes_replace_each_run_of_odd_characters_with_one_underscore() {
        assert_eq!(sanitize_suffix("host-1.a_b"), "host-1.a_b");
        assert_eq!(sanitize_suffix("my agent//x"), "my_agent_x");
        assert_eq!(sanitize_suffix("é:é"), "_");
    }

    #[test]
    fn files_are_named_per_day_with_the_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), Some("a1"));
        assert_eq!(s.file_name(day("2026-12-02")), "agent-a1-2026-12-02.log");
        let s = settings(dir.path(), None);
        assert_eq!(s.file_name(day("2026-01-09")), "agent-2026-01-09.log");
    }

    #[test]
    fn a_full_file_is_rotated_and_compressed_before_the_record_that_would_overflow_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_, today) = clock("2026-12-02");
        let mut log = RotatingFileLog::with_clock(settings(dir.path(), Some("a")), today).unwrap();
        let record = format!("{}\n", "x".repeat(39)); // 40 bytes: two fit in 100, three do not
        for _ in 0..5 {
            log.write_all(record.as_bytes()).unwrap();
        }
        log.flush().unwrap();
        assert_eq!(
            names(dir.path()),
            [
                "agent-a-2026-12-02.log",
                "agent-a-2026-12-02.log.1.gz",
                "agent-a-2026-12-02.log.2.gz"
            ]
        );
        let current = fs::read_to_string(dir.path().join("agent-a-2026-12-02.log")).unwrap();
        assert_eq!(current, record);
        let newest = gunzip(&dir.path().join("agent-a-2026-12-02.log.1.gz"));
        assert_eq!(newest, record.repeat(2));
        assert_eq!(
            gunzip(&dir.path().join("agent-a-2026-12-02.log.2.gz")),
            record.repeat(2)
        );
    }

    #[test]
    fn a_new_day_starts_a_new_file_compresses_the_old_one_and_drops_expired_days() {
        let dir = tempfile::tempdir().unwrap();
        // Someone else's file and an expired one of ours.
        fs::write(dir.path().join("agent-other-2026-01-01.log"), "keep").unwrap();
        fs::write(dir.path().join("notes.txt"), "keep").unwrap();
        fs::write(dir.path().join("agent-a-2026-11-28.log.1.gz"), "old").unwrap();
        fs::write(dir.path().join("agent-a-2026-11-29.log"), "kept").unwrap();
        let (date, today) = clock("2026-12-01");
        let mut log = RotatingFileLog::with_clock(settings(dir.path(), Some("a")), today).unwrap();
        // Retention 3 days: 11-29, 11-30 and 12-01 stay.
        assert_eq!(
            names(dir.path()),
            [
                "agent-a-2026-11-29.log",
                "agent-a-2026-12-01.log",
                "agent-other-2026-01-01.log",
                "notes.txt"
            ]
        );
        log.write_all(b"first day\n").unwrap();
        *date.lock().unwrap() = day("2026-12-02");
        log.write_all(b"second day\n").unwrap();
        log.flush().unwrap();
        assert_eq!(
            names(dir.path()),
            [
                "agent-a-2026-12-01.log.1.gz",
                "agent-a-2026-12-02.log",
                "agent-other-2026-01-01.log",
                "notes.txt"
            ]
        );
        assert_eq!(
            gunzip(&dir.path().join("agent-a-2026-12-01.log.1.gz")),
            "first day\n"
        );
        assert_eq!(
            log.current_path(),
            dir.path().join("agent-a-2026-12-02.log")
        );
    }

    #[test]
    fn an_unusable_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, "").unwrap();
        let error = RotatingFileLog::open(settings(&file, None)).unwrap_err();
        assert!(
            error.to_string().starts_with("KICI_LOG_DIR ") && error.to_string().contains("a-file"),
            "{error}"
        );
    }
}
