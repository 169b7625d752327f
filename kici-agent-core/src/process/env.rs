//! The step environment: built from scratch, with only the host allowlist inherited from the
//! agent (spec §10.1).

use std::collections::BTreeMap;
use std::fmt;

/// Host variables a step inherits from the agent's environment when set (spec §10.1, Unix part).
const HOST_ALLOWLIST: [&str; 10] = [
    "PATH",
    "HOME",
    "USER",
    "SHELL",
    "LANG",
    "LC_ALL",
    "TERM",
    "TMPDIR",
    "NODE_PATH",
    "TZ",
];

/// What a step process sees as its environment: built from scratch, never inheriting the
/// agent's environment.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StepEnv {
    pub(super) vars: BTreeMap<String, String>,
}

impl StepEnv {
    /// Layer 1 of the step environment: the host allowlist (`PATH`, `HOME`, `USER`, `SHELL`,
    /// `LANG`, `LC_ALL`, `TERM`, `TMPDIR`, `NODE_PATH`, `TZ`) copied from `host`, then
    /// `FORCE_COLOR=1`, `CI=true` and `KICI=true`. No `KICI_*` variable is ever copied.
    pub fn from_host(host: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut env = Self::default();
        env.extend(
            host.into_iter()
                .filter(|(name, _)| HOST_ALLOWLIST.contains(&name.as_str())),
        );
        env.set("FORCE_COLOR", "1");
        env.set("CI", "true");
        env.set("KICI", "true");
        env
    }

    /// Sets (or replaces) one variable.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(key.into(), value.into());
    }

    /// Sets every variable of `vars`, later ones replacing earlier ones.
    pub fn extend(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        self.vars.extend(vars);
    }

    /// Puts `dir` in front of `PATH` (`PATH=dir:old`, or just `dir` when `PATH` is unset or
    /// empty).
    pub fn prepend_path(&mut self, dir: &str) {
        let path = match self.get("PATH") {
            Some(old) if !old.is_empty() => format!("{dir}:{old}"),
            _ => dir.to_string(),
        };
        self.set("PATH", path);
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// All variables, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
    }
}

/// Lists names only: values may be secrets a step exposed.
impl fmt::Debug for StepEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_host_keeps_only_the_allowlist_and_adds_ci_markers() {
        let host = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/ci"),
            ("TZ", "UTC"),
            ("KICI_AGENT_TOKEN", "kat_secret"),
            ("KICI_URL", "wss://x"),
            ("AWS_SECRET_ACCESS_KEY", "nope"),
            ("LD_PRELOAD", "/evil.so"),
            ("FORCE_COLOR", "0"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let env = StepEnv::from_host(host);
        let all: Vec<_> = env.iter().collect();
        assert_eq!(
            all,
            [
                ("CI", "true"),
                ("FORCE_COLOR", "1"),
                ("HOME", "/home/ci"),
                ("KICI", "true"),
                ("PATH", "/usr/bin"),
                ("TZ", "UTC"),
            ]
        );
    }

    #[test]
    fn debug_output_hides_values() {
        let mut env = StepEnv::default();
        env.set("TOKEN", "hunter2");
        let shown = format!("{env:?}");
        assert!(
            shown.contains("TOKEN") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn prepend_path_handles_missing_and_present_path() {
        let mut env = StepEnv::default();
        env.prepend_path("/a");
        assert_eq!(env.get("PATH"), Some("/a"));
        env.prepend_path("/b");
        assert_eq!(env.get("PATH"), Some("/b:/a"));
    }
}
