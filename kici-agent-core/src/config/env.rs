//! Reading the configuration from the process environment: the `KICI_*` variables through
//! [`SETTINGS`], Node's `NODE_EXTRA_CA_CERTS`, and the refusal of unknown `KICI_*` names with a
//! did-you-mean.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use super::settings::{Setting, SettingValue, SETTINGS};
use super::{var, AgentConfig, AgentConfigBuilder, ConfigError, ConfigIssue};

/// `KICI_*` name prefixes that are always accepted (test harnesses, step environment pass-through).
pub const ALLOWED_PREFIXES: &[&str] = &["KICI_E2E_", "KICI_AGENT_ENV_"];

/// A configuration loaded from the environment, with the warnings to log once logging is up.
#[derive(Debug, Clone)]
pub struct FromEnv {
    /// The validated configuration.
    pub config: AgentConfig,
    /// Non-fatal findings (unknown variables under `KICI_DEV=true`, an ignored
    /// `KICI_MAX_CONCURRENT_JOBS` or `NODE_EXTRA_CA_CERTS`).
    pub warnings: Vec<String>,
}

impl FromEnv {
    fn new((builder, config): (AgentConfigBuilder, AgentConfig)) -> Self {
        Self {
            config,
            warnings: builder.warnings,
        }
    }
}

/// An unknown `KICI_*` variable, with the known name it most likely misspells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVariable {
    /// The variable as found in the environment.
    pub name: String,
    /// The closest known variable, when close enough to be a typo.
    pub suggestion: Option<&'static str>,
}

impl fmt::Display for UnknownVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.suggestion {
            Some(known) => write!(f, "{}: did you mean {known}?", self.name),
            None => write!(f, "{}: no close match", self.name),
        }
    }
}

impl AgentConfig {
    /// Loads and validates the configuration from the process environment (spec §2).
    pub fn from_env() -> Result<FromEnv, ConfigError> {
        let (vars, issues) = environment();
        load(&vars, issues).map(FromEnv::new)
    }

    /// Loads and validates a configuration from the given variables, exactly like
    /// [`AgentConfig::from_env`] (a later duplicate name wins).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<FromEnv, ConfigError> {
        load(&vars.into_iter().collect(), Vec::new()).map(FromEnv::new)
    }
}

impl AgentConfigBuilder {
    /// The builder of the process environment's settings, checked exactly like
    /// [`AgentConfig::from_env`] (its warnings are in [`AgentConfigBuilder::warnings`]), for
    /// hosts that change settings before building.
    pub fn from_env() -> Result<Self, ConfigError> {
        let (vars, issues) = environment();
        load(&vars, issues).map(|(builder, _)| builder)
    }
}

/// The `KICI_*` variables of the process (and Node's extra-CA one), with an issue for each value
/// that is not UTF-8. Anything else may hold any bytes and is not read.
fn environment() -> (BTreeMap<String, String>, Vec<ConfigIssue>) {
    let mut vars = BTreeMap::new();
    let mut issues = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name
            .to_str()
            .filter(|name| name.starts_with("KICI_") || *name == var::NODE_EXTRA_CA_CERTS)
        else {
            continue;
        };
        match value.into_string() {
            Ok(value) => {
                vars.insert(name.to_owned(), value);
            }
            Err(_) => issues.push(ConfigIssue::new(name, "value is not valid UTF-8")),
        }
    }
    (vars, issues)
}

/// The environment loader: every known variable through [`Setting::store`] (collecting issues),
/// `NODE_EXTRA_CA_CERTS`, validation, then the check for unknown `KICI_*` names. Returns the
/// builder (for hosts that change settings afterwards) and the validated configuration; all
/// warnings are in the builder.
fn load(
    vars: &BTreeMap<String, String>,
    mut issues: Vec<ConfigIssue>,
) -> Result<(AgentConfigBuilder, AgentConfig), ConfigError> {
    let mut builder = AgentConfigBuilder::default();
    for setting in SETTINGS {
        if let Some(value) = vars.get(setting.name) {
            if let Err(message) = setting.store(&mut builder, &SettingValue::from(value.as_str())) {
                issues.push(ConfigIssue::new(setting.name, message));
            }
        }
    }
    if builder.config.tls_ca_file.is_none() {
        if let Some(raw) = vars
            .get(var::NODE_EXTRA_CA_CERTS)
            .filter(|raw| !raw.is_empty())
        {
            // Node's semantics: a file it cannot load is reported and skipped, not fatal.
            let path = PathBuf::from(raw);
            match crate::tls::read_ca_file(&path) {
                Ok(_) => builder.config.tls_ca_file = Some(path),
                Err(reason) => builder.warnings.push(format!(
                    "{}: ignoring the extra CA certificates: {reason}",
                    var::NODE_EXTRA_CA_CERTS
                )),
            }
        }
    }

    let config = builder.clone().finish();
    config.validate_after(issues)?;

    let unknown = unknown_variables(vars.keys().map(String::as_str));
    if !unknown.is_empty() {
        let error = ConfigError::UnknownVariables { variables: unknown };
        if !config.dev {
            return Err(error);
        }
        builder.warnings.push(error.to_string());
    }
    Ok((builder, config))
}

/// The `KICI_*` names among `names` that are not known, each with its likely intended name.
fn unknown_variables<'a>(names: impl Iterator<Item = &'a str>) -> Vec<UnknownVariable> {
    let mut unknown: Vec<UnknownVariable> = names
        .filter(|name| name.starts_with("KICI_") && !is_known_variable(name))
        .map(|name| UnknownVariable {
            name: name.to_owned(),
            suggestion: Setting::closest(name).map(|setting| setting.name),
        })
        .collect();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    unknown
}

fn is_known_variable(name: &str) -> bool {
    SETTINGS.iter().any(|known| known.name == name)
        || ALLOWED_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        || name.ends_with("_ENV_PROBE")
        || name.contains("_ENV_PROBE_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

    #[test]
    fn an_unknown_variable_stops_startup_with_a_hint() {
        let error = load_vars(&[
            ("KICI_PROT", "8080"),
            ("KICI_QQQQQQQQQQQQQQQQQQQQ", "1"),
            ("NOT_KICI_PROT", "1"),
        ])
        .unwrap_err();
        let ConfigError::UnknownVariables { variables } = &error else {
            panic!("expected unknown variables, got {error:?}");
        };
        assert_eq!(
            variables,
            &vec![
                UnknownVariable {
                    name: "KICI_PROT".into(),
                    suggestion: Some("KICI_PORT"),
                },
                UnknownVariable {
                    name: "KICI_QQQQQQQQQQQQQQQQQQQQ".into(),
                    suggestion: None,
                },
            ]
        );
        let text = error.to_string();
        assert!(text.contains("refuses to start"), "{text}");
        assert!(text.contains("KICI_DEV=true"), "{text}");
        assert!(
            text.contains("\n  - KICI_PROT: did you mean KICI_PORT?"),
            "{text}"
        );
        assert!(
            text.contains("\n  - KICI_QQQQQQQQQQQQQQQQQQQQ: no close match"),
            "{text}"
        );
    }

    #[test]
    fn allowed_and_known_names_pass_the_unknown_check() {
        let loaded = load_vars(&[
            ("KICI_E2E_SCENARIO", "x"),
            ("KICI_AGENT_ENV_FOO", "x"),
            ("KICI_STARTUP_ENV_PROBE", "x"),
            ("KICI_X_ENV_PROBE_Y", "x"),
            (var::CACHE, "x"),
            (var::LOG_DIR, "/var/log/kici"),
            (var::LOG_MAX_SIZE, "1g"),
            (var::LOG_RETENTION_DAYS, "3"),
            (var::CLUSTER_INSTANCE_ID, "a"),
            (var::PLATFORM_INSTANCE_ID, "b"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector"),
            ("PATH", "/usr/bin"),
        ]);
        assert!(loaded.is_ok_and(|loaded| loaded.warnings.is_empty()));
    }

    #[test]
    fn dev_mode_downgrades_unknown_variables_to_a_warning() {
        let loaded = load_vars(&[("KICI_PROT", "1"), (var::DEV, "true")]);
        let Ok(loaded) = loaded else {
            panic!("dev mode must not refuse: {loaded:?}");
        };
        assert_eq!(loaded.warnings.len(), 1);
        assert!(loaded.warnings[0].contains("KICI_PROT: did you mean KICI_PORT?"));
    }

    #[test]
    fn misspelt_names_get_the_closest_setting() {
        let closest = |name| Setting::closest(name).map(|setting| setting.name);
        assert_eq!(closest("KICI_PROT"), Some(var::PORT));
        assert_eq!(closest("KICI_LABEL"), Some(var::LABELS));
        assert_eq!(closest("job_pid_max"), Some(var::JOB_PIDS_MAX));
        assert_eq!(closest("KICI_COMPLETELY_DIFFERENT"), None);
    }

    #[test]
    fn the_tls_ca_file_comes_from_kici_tls_ca_file_else_node_extra_ca_certs() {
        let (ours, node) = (ca_file(), ca_file());
        let ours_path = ours.path().to_str().unwrap();
        let node_path = node.path().to_str().unwrap();
        assert_eq!(
            config(&[
                (var::TLS_CA_FILE, ours_path),
                (var::NODE_EXTRA_CA_CERTS, node_path)
            ])
            .tls_ca_file,
            Some(ours.path().to_owned())
        );
        assert_eq!(
            config(&[(var::NODE_EXTRA_CA_CERTS, node_path)]).tls_ca_file,
            Some(node.path().to_owned())
        );
        assert_eq!(config(&[]).tls_ca_file, None);
    }

    #[test]
    fn an_unusable_node_extra_ca_certs_is_a_warning_but_an_unusable_kici_tls_ca_file_an_error() {
        let loaded = load_vars(&[(var::NODE_EXTRA_CA_CERTS, "/nonexistent/ca.pem")]).unwrap();
        assert_eq!(loaded.config.tls_ca_file, None);
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(
            loaded.warnings[0].starts_with("NODE_EXTRA_CA_CERTS: ignoring the extra CA certificates: cannot read /nonexistent/ca.pem"),
            "{:?}",
            loaded.warnings
        );
        let found = issues(&[(var::TLS_CA_FILE, "/nonexistent/ca.pem")]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].setting, "KICI_TLS_CA_FILE");
        assert!(
            found[0]
                .message
                .starts_with("cannot read /nonexistent/ca.pem"),
            "{found:?}"
        );
    }
}
