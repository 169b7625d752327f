//! The per-step hand-off files (`$KICI_ENV`, `$KICI_PATH`, `$KICI_OUTPUT`,
//! `$KICI_SECRET_OUTPUT`, spec §10.4) and what a step wrote to them.

use std::io;
use std::path::{Path, PathBuf};

use super::StepEnv;

/// The per-step `$KICI_ENV` / `$KICI_PATH` / `$KICI_OUTPUT` / `$KICI_SECRET_OUTPUT` hand-off
/// files (spec §10.4; the output files are our extension), in a private temporary directory
/// `kici-env-XXXXXX` that is removed on drop (the reference agent leaked one per job).
#[derive(Debug)]
pub struct HandoffFiles {
    /// Held for its drop, which removes the directory with the files.
    _dir: crate::workspace::OwnedDir,
    env_file: PathBuf,
    path_file: PathBuf,
    output_file: PathBuf,
    secret_output_file: PathBuf,
}

impl HandoffFiles {
    /// Creates the directory (in `in_dir`, else the system temp dir) and the four empty files.
    pub fn create(in_dir: Option<&Path>) -> io::Result<Self> {
        let dir = crate::workspace::OwnedDir::create("kici-env-", in_dir)?;
        let files = Self {
            env_file: dir.path().join("env"),
            path_file: dir.path().join("path"),
            output_file: dir.path().join("output"),
            secret_output_file: dir.path().join("secret_output"),
            _dir: dir,
        };
        for file in [
            &files.env_file,
            &files.path_file,
            &files.output_file,
            &files.secret_output_file,
        ] {
            std::fs::File::create(file).map_err(|e| with_path(e, file))?;
        }
        Ok(files)
    }

    /// Points `KICI_ENV`, `KICI_PATH`, `KICI_OUTPUT` and `KICI_SECRET_OUTPUT` at the files.
    pub fn apply_to(&self, env: &mut StepEnv) {
        for (name, file) in [
            ("KICI_ENV", &self.env_file),
            ("KICI_PATH", &self.path_file),
            ("KICI_OUTPUT", &self.output_file),
            ("KICI_SECRET_OUTPUT", &self.secret_output_file),
        ] {
            env.set(name, file.to_string_lossy());
        }
    }

    /// Reads what the step wrote, in format v1 (spec §10.4). A file the step deleted counts as
    /// empty.
    pub fn read_delta(&self) -> io::Result<EnvDelta> {
        let path_entries = read_if_present(&self.path_file)?
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_string)
            .collect();
        Ok(EnvDelta {
            vars: parse_assignments(&read_if_present(&self.env_file)?),
            path_entries,
            outputs: parse_assignments(&read_if_present(&self.output_file)?),
            secret_outputs: self.read_secret_outputs()?,
        })
    }

    /// `$KICI_SECRET_OUTPUT`, the file of secret outputs (`KEY=value` lines as `$KICI_OUTPUT`).
    pub fn secret_output_file(&self) -> &Path {
        &self.secret_output_file
    }

    /// The `$KICI_SECRET_OUTPUT` assignments written so far.
    pub fn read_secret_outputs(&self) -> io::Result<Vec<(String, String)>> {
        Ok(parse_assignments(&read_if_present(
            &self.secret_output_file,
        )?))
    }
}

/// Adds the file name to an I/O error, which otherwise would not say which file failed.
fn with_path(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// The file's text (invalid UTF-8 replaced), or nothing when it does not exist.
fn read_if_present(path: &Path) -> io::Result<String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(error) => Err(with_path(error, path)),
    }
}

/// Parses `KEY=value` lines: the line is trimmed, split at the first `=`, the key trimmed and
/// the value kept as is; blank lines, lines without `=` and empty keys are ignored. A repeated
/// key keeps its first position and its last value.
fn parse_assignments(text: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() {
            continue;
        }
        match pairs.iter_mut().find(|(known, _)| known == key) {
            Some(pair) => pair.1 = value.to_string(),
            None => pairs.push((key.to_string(), value.to_string())),
        }
    }
    pairs
}

/// What one step wrote to its hand-off files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvDelta {
    /// `$KICI_ENV` assignments, one per key, in first-seen order, last value winning.
    pub vars: Vec<(String, String)>,
    /// `$KICI_PATH` directories in the order written (the first should end up first on PATH).
    pub path_entries: Vec<String>,
    /// `$KICI_OUTPUT` assignments, same rules as `vars`.
    pub outputs: Vec<(String, String)>,
    /// `$KICI_SECRET_OUTPUT` assignments, same rules as `vars`.
    pub secret_outputs: Vec<(String, String)>,
}

impl EnvDelta {
    /// Applies the variables, except those `protected` names, which are left untouched and
    /// returned so the caller can log `[kici] Cannot override operator secret "<KEY>" via
    /// $KICI_ENV — value preserved`; then prepends the path entries so that the first listed
    /// directory ends up first.
    pub fn apply(&self, env: &mut StepEnv, protected: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut refused = Vec::new();
        for (key, value) in &self.vars {
            if protected(key) {
                refused.push(key.clone());
            } else {
                env.set(key.as_str(), value.as_str());
            }
        }
        for dir in self.path_entries.iter().rev() {
            env.prepend_path(dir);
        }
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::tests::{host_env, run_collect};
    use crate::process::{CommandSpec, ExitStatus, Outcome, RunLimits};

    #[test]
    fn assignments_follow_format_v1() {
        let text = "A=1\n\n  B = two words  \nno equals here\n=empty key\nA=3\nC=x=y\r\nD=\n";
        assert_eq!(
            parse_assignments(text),
            [("A", "3"), ("B", " two words"), ("C", "x=y"), ("D", "")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn delta_apply_refuses_protected_keys_and_orders_path() {
        let delta = EnvDelta {
            vars: vec![
                ("FOO".to_string(), "bar".to_string()),
                ("SECRET".to_string(), "overridden".to_string()),
            ],
            path_entries: vec!["/first".to_string(), "/second".to_string()],
            outputs: Vec::new(),
            secret_outputs: Vec::new(),
        };
        let mut env = StepEnv::default();
        env.set("SECRET", "kept");
        env.set("PATH", "/usr/bin");
        let refused = delta.apply(&mut env, &|key| key == "SECRET");
        assert_eq!(refused, ["SECRET"]);
        assert_eq!(env.get("SECRET"), Some("kept"));
        assert_eq!(env.get("FOO"), Some("bar"));
        assert_eq!(env.get("PATH"), Some("/first:/second:/usr/bin"));
    }

    #[tokio::test]
    async fn handoff_files_round_trip_through_a_step_and_are_removed() {
        let parent = tempfile::tempdir().expect("tempdir");
        let files = HandoffFiles::create(Some(parent.path())).expect("create");
        let dir = files.env_file.parent().expect("a directory").to_path_buf();
        assert!(dir
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("kici-env-")));
        let mut env = host_env();
        files.apply_to(&mut env);
        assert_eq!(
            env.get("KICI_ENV").map(PathBuf::from),
            Some(dir.join("env"))
        );
        let script = r#"
            echo "GREETING=hello world" >> "$KICI_ENV"
            echo "GREETING=bye" >> "$KICI_ENV"
            printf '/opt/one\n\n  /opt/two  \n' >> "$KICI_PATH"
            echo "result=42" >> "$KICI_OUTPUT"
            echo "token=abc=def" >> "$KICI_SECRET_OUTPUT"
        "#;
        let spec = CommandSpec::bash(script, parent.path().to_path_buf(), env);
        let (report, _) = run_collect(spec, RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(0))
        );
        let delta = files.read_delta().expect("delta");
        assert_eq!(
            delta,
            EnvDelta {
                vars: vec![("GREETING".to_string(), "bye".to_string())],
                path_entries: vec!["/opt/one".to_string(), "/opt/two".to_string()],
                outputs: vec![("result".to_string(), "42".to_string())],
                secret_outputs: vec![("token".to_string(), "abc=def".to_string())],
            }
        );
        drop(files);
        assert!(!dir.exists());
    }

    #[test]
    fn deleted_handoff_file_reads_as_empty() {
        let files = HandoffFiles::create(None).expect("create");
        std::fs::remove_file(&files.env_file).expect("remove");
        assert_eq!(files.read_delta().expect("delta"), EnvDelta::default());
    }
}
