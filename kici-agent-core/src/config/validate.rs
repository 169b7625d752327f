//! The checks of a whole configuration, shared by the builder and the environment loader:
//! every invalid value (all reported together), then roles, then reserved labels.

use std::time::Duration;

use super::{var, AgentConfig, ConfigError, ConfigIssue};

const MIN_CONCURRENCY_WAIT_TIMEOUT: Duration = Duration::from_millis(1000);
/// The orchestrator drops an agent that sent no heartbeat for this long.
const ORCHESTRATOR_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(180);
const RESERVED_LABEL_PREFIX: &str = "kici:";

impl AgentConfig {
    /// Checks every setting: invalid values (all reported together), then roles, then reserved
    /// labels.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_after(Vec::new())
    }

    /// [`AgentConfig::validate`], reporting `issues` found earlier (while parsing) first.
    pub(super) fn validate_after(&self, mut issues: Vec<ConfigIssue>) -> Result<(), ConfigError> {
        self.collect_value_issues(&mut issues);
        if !issues.is_empty() {
            return Err(ConfigError::Invalid(issues));
        }
        if !self.roles.is_empty() {
            return Err(ConfigError::UnsupportedRole {
                roles: self.roles.clone(),
            });
        }
        // The scaler writes kici:agent:*, kici:scaler:* and kici:role:* labels itself.
        if !self.scaler_managed {
            let reserved: Vec<String> = self
                .labels
                .iter()
                .filter(|label| label.to_lowercase().starts_with(RESERVED_LABEL_PREFIX))
                .cloned()
                .collect();
            if !reserved.is_empty() {
                return Err(ConfigError::ReservedLabels { labels: reserved });
            }
        }
        Ok(())
    }

    fn collect_value_issues(&self, issues: &mut Vec<ConfigIssue>) {
        let mut issue = |setting: &str, message: String| {
            issues.push(ConfigIssue::new(setting, message));
        };
        if let Err(message) = check_orchestrator_url(&self.orchestrator_url) {
            issue(var::ORCHESTRATOR_URL, message);
        }
        // Longer than any real grace, and small enough that `Instant + duration` cannot overflow.
        const MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
        for (setting, value) in [
            (var::CANCEL_GRACE_MS, self.cancel_grace),
            (var::SHUTDOWN_GRACE_MS, self.shutdown_grace),
            (var::DEFAULT_STEP_TIMEOUT_MS, self.default_step_timeout),
            (var::JOB_HEARTBEAT_INTERVAL_MS, self.job_heartbeat_interval),
            (var::HEARTBEAT_INTERVAL_MS, self.heartbeat_interval),
            (var::SCALER_IDLE_TIMEOUT, self.scaler_idle_timeout),
            (
                var::SCALER_PENDING_DISPATCH_TIMEOUT,
                self.scaler_pending_dispatch_timeout,
            ),
            (
                var::CONCURRENCY_WAIT_TIMEOUT_MS,
                self.concurrency_wait_timeout,
            ),
        ] {
            if value > MAX_GRACE {
                issue(setting, "must be at most 7 days".into());
            }
        }
        if self.agent_id.is_empty() {
            issue(var::AGENT_ID, "must not be empty".into());
        }
        if self.log_max_size == 0 {
            issue(var::LOG_MAX_SIZE, "must be greater than 0".into());
        }
        if self.log_retention_days == 0 {
            issue(var::LOG_RETENTION_DAYS, "must be at least 1 day".into());
        }
        if self.labels.iter().any(String::is_empty) {
            issue(var::LABELS, "labels must not be empty".into());
        }
        let mut keys = std::collections::BTreeSet::new();
        for (key, _) in &self.properties {
            if key.is_empty() {
                issue(var::PROPERTIES, "property keys must not be empty".into());
            } else if !keys.insert(key.as_str()) {
                issue(var::PROPERTIES, format!("duplicate property key {key:?}"));
            }
        }
        for (name, secret) in [
            (var::AGENT_TOKEN, &self.token),
            (var::GITHUB_TOKEN, &self.github_token),
        ] {
            if secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                issue(name, "must not be empty (leave it unset instead)".into());
            }
        }
        for (name, interval) in [
            (var::DEFAULT_STEP_TIMEOUT_MS, self.default_step_timeout),
            (var::JOB_HEARTBEAT_INTERVAL_MS, self.job_heartbeat_interval),
            (var::HEARTBEAT_INTERVAL_MS, self.heartbeat_interval),
        ] {
            if interval.is_zero() {
                issue(name, "must be greater than 0".into());
            }
        }
        if self.heartbeat_interval >= ORCHESTRATOR_HEARTBEAT_TIMEOUT {
            issue(
                var::HEARTBEAT_INTERVAL_MS,
                format!(
                    "must be below 180000 ms: the orchestrator drops an agent that sends no heartbeat for 180 s, got {} ms",
                    self.heartbeat_interval.as_millis()
                ),
            );
        }
        if self.max_log_size_bytes == 0 {
            // Refused rather than read as "no log": a step whose output is all lost is more
            // likely a mistake than a wish, and the orchestrator expects log lines.
            issue(
                var::MAX_LOG_SIZE_BYTES,
                "must be greater than 0: 0 would cut every step's log at its first line (a step log cannot be switched off)".into(),
            );
        }
        if self.concurrency_wait_timeout < MIN_CONCURRENCY_WAIT_TIMEOUT {
            issue(
                var::CONCURRENCY_WAIT_TIMEOUT_MS,
                format!(
                    "must be at least 1000 ms, got {} ms",
                    self.concurrency_wait_timeout.as_millis()
                ),
            );
        }
        if self.max_concurrency == 0 {
            issue(var::MAX_CONCURRENCY, "must be at least 1".into());
        }
        if let Some(path) = &self.step_map_file {
            if let Err(message) = check_readable_file(path) {
                issue(var::STEP_MAP, message);
            }
        }
        if let Some(path) = &self.tls_ca_file {
            if let Err(message) = crate::tls::read_ca_file(path) {
                issue(var::TLS_CA_FILE, message);
            }
        }
        for (name, value) in [
            (var::PROCESS_EXECUTOR, &self.process_executor),
            (var::CONTAINER_IMAGE, &self.default_container_image),
        ] {
            if value.as_ref().is_some_and(String::is_empty) {
                issue(name, "must not be empty (leave it unset instead)".into());
            }
        }
        let limits = &self.rate_limits;
        for (name, value, minimum) in [
            (var::RATE_MSGS_PER_SEC, limits.msgs_per_sec, 0.0),
            (var::RATE_BYTES_PER_SEC, limits.bytes_per_sec, 0.0),
            // A bucket smaller than one message or one byte could never send anything.
            (var::RATE_MSG_BURST, limits.msg_burst, 1.0),
            (var::RATE_BYTE_BURST, limits.byte_burst, 1.0),
        ] {
            let fits = value.is_finite()
                && if minimum == 0.0 {
                    value > 0.0
                } else {
                    value >= minimum
                };
            if !fits {
                let bound = if minimum == 0.0 {
                    "greater than 0"
                } else {
                    "at least 1"
                };
                issue(
                    name,
                    format!("must be a finite number {bound}, got {value}"),
                );
            }
        }
        let reconnect = &self.reconnect;
        if reconnect.initial_delay.is_zero() || reconnect.initial_delay > reconnect.max_delay {
            issue(
                "reconnect",
                "initial_delay must be greater than 0 and at most max_delay".into(),
            );
        }
        if reconnect.max_delay > MAX_GRACE || reconnect.stable_after > MAX_GRACE {
            issue(
                "reconnect",
                "max_delay and stable_after must be at most 7 days".into(),
            );
        }
        if !(0.0..=1.0).contains(&reconnect.jitter) {
            issue(
                "reconnect",
                format!("jitter must be within 0..=1, got {}", reconnect.jitter),
            );
        }
        if self.running_resends.iter().any(|delay| *delay > MAX_GRACE) {
            issue("running_resends", "each must be at most 7 days".into());
        }
        if self.hostname.is_empty() {
            issue("hostname", "must not be empty".into());
        }
    }
}

fn check_orchestrator_url(raw: &str) -> Result<(), String> {
    if raw.is_empty() {
        return Err("required (e.g. ws://orchestrator:4000/ws)".into());
    }
    // The URL itself is not echoed: it may carry credentials.
    let url = url::Url::parse(raw).map_err(|error| format!("not a valid URL: {error}"))?;
    match url.scheme() {
        "ws" | "wss" if url.host_str().is_some_and(|host| !host.is_empty()) => Ok(()),
        "ws" | "wss" => Err("the URL has no host".into()),
        scheme => Err(format!(
            "must be a ws:// or wss:// URL, got scheme {scheme:?}"
        )),
    }
}

fn check_readable_file(path: &std::path::Path) -> Result<(), String> {
    let shown = path.display();
    let file =
        std::fs::File::open(path).map_err(|error| format!("cannot read {shown}: {error}"))?;
    let metadata = file
        .metadata()
        .map_err(|error| format!("cannot read {shown}: {error}"))?;
    if metadata.is_file() {
        Ok(())
    } else {
        Err(format!("{shown} is not a regular file"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

    #[test]
    fn log_retention_must_keep_at_least_a_day() {
        for bad in ["0", "-1", "seven", "1.5"] {
            let found = issues(&[(var::LOG_RETENTION_DAYS, bad)]);
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert_eq!(found[0].setting, var::LOG_RETENTION_DAYS);
        }
        assert_eq!(
            issues(&[(var::LOG_RETENTION_DAYS, "0")])[0].message,
            "must be at least 1 day"
        );
        config(&[(var::LOG_RETENTION_DAYS, "7")]);
    }

    #[test]
    fn a_zero_step_log_cap_is_refused() {
        let expected = vec![ConfigIssue::new(
            var::MAX_LOG_SIZE_BYTES,
            "must be greater than 0: 0 would cut every step's log at its first line (a step log cannot be switched off)",
        )];
        assert_eq!(issues(&[(var::MAX_LOG_SIZE_BYTES, "0")]), expected);
        let built = AgentConfig::builder(URL).with_max_log_size_bytes(0).build();
        assert!(
            matches!(&built, Err(ConfigError::Invalid(found)) if *found == expected),
            "{built:?}"
        );
        assert_eq!(
            config(&[(var::MAX_LOG_SIZE_BYTES, "1")]).max_log_size_bytes,
            1
        );
    }

    #[test]
    fn the_heartbeat_must_come_before_the_orchestrator_gives_up() {
        assert_eq!(
            issues(&[(var::HEARTBEAT_INTERVAL_MS, "180000")]),
            vec![ConfigIssue::new(
                var::HEARTBEAT_INTERVAL_MS,
                "must be below 180000 ms: the orchestrator drops an agent that sends no heartbeat for 180 s, got 180000 ms"
            )]
        );
        config(&[(var::HEARTBEAT_INTERVAL_MS, "179999")]);
    }

    #[test]
    fn scaler_and_concurrency_waits_are_capped_at_seven_days() {
        for name in [
            var::SCALER_IDLE_TIMEOUT,
            var::SCALER_PENDING_DISPATCH_TIMEOUT,
            var::CONCURRENCY_WAIT_TIMEOUT_MS,
        ] {
            assert_eq!(
                issues(&[(name, "9223372036854775807")]),
                vec![ConfigIssue::new(name, "must be at most 7 days")],
                "{name}"
            );
            config(&[(name, "604800000")]);
        }
    }

    #[test]
    fn range_rules_apply_after_parsing() {
        for (name, value) in [
            (var::MAX_CONCURRENCY, "0"),
            (var::CONCURRENCY_WAIT_TIMEOUT_MS, "999"),
            (var::DEFAULT_STEP_TIMEOUT_MS, "0"),
            (var::JOB_HEARTBEAT_INTERVAL_MS, "0"),
            (var::HEARTBEAT_INTERVAL_MS, "0"),
            (var::RATE_MSGS_PER_SEC, "0"),
            (var::RATE_BYTE_BURST, "0.5"),
            (var::RATE_BYTES_PER_SEC, "inf"),
        ] {
            let found = issues(&[(name, value)]);
            assert_eq!(found.len(), 1, "{name}={value}: {found:?}");
            assert_eq!(found[0].setting, name);
        }
    }

    #[test]
    fn reserved_labels_are_refused_unless_scaler_managed() {
        let error = load_vars(&[(var::LABELS, "gpu,kici:os:linux,KICI:Foo,kicix")]).unwrap_err();
        let ConfigError::ReservedLabels { labels } = &error else {
            panic!("expected reserved labels, got {error:?}");
        };
        assert_eq!(labels, &vec!["kici:os:linux", "KICI:Foo"]);
        let text = error.to_string();
        assert!(text.contains("KICI_LABELS") && text.contains("kici:os:linux, KICI:Foo"));
        let c = config(&[
            (var::LABELS, "kici:scaler:pool-a,kici:agent:x"),
            (var::SCALER_MANAGED, "1"),
        ]);
        assert_eq!(c.labels, vec!["kici:scaler:pool-a", "kici:agent:x"]);
    }

    #[test]
    fn requesting_a_role_is_refused() {
        for (raw, expected) in [
            ("builder", vec![Role::Builder]),
            ("init-runner", vec![Role::InitRunner]),
            ("all", vec![Role::Builder, Role::InitRunner]),
            (
                "init-runner,builder,all",
                vec![Role::InitRunner, Role::Builder],
            ),
        ] {
            let error = load_vars(&[(var::ROLES, raw)]).unwrap_err();
            let ConfigError::UnsupportedRole { roles } = &error else {
                panic!("expected unsupported role for {raw}, got {error:?}");
            };
            assert_eq!(roles, &expected);
            let text = error.to_string();
            assert!(
                text.contains("cannot serve role") && text.contains("Node agent"),
                "{text}"
            );
        }
        assert!(config(&[(var::ROLES, "")]).roles.is_empty());
        assert_eq!(
            issues(&[(var::ROLES, "builder,cook")]),
            vec![ConfigIssue::new(
                var::ROLES,
                "must contain only: builder, init-runner, all"
            )]
        );
        let built = AgentConfig::builder(URL)
            .with_roles(vec![Role::Builder])
            .build();
        assert!(matches!(built, Err(ConfigError::UnsupportedRole { .. })));
    }

    #[test]
    fn failures_are_reported_in_spec_order() {
        let all = [
            (var::PORT, "abc"),
            (var::ROLES, "builder"),
            (var::LABELS, "kici:x"),
            ("KICI_PROT", "1"),
        ];
        let stage = |pairs: &[(&str, &str)]| match load_vars(pairs) {
            Err(ConfigError::Invalid(_)) => "invalid",
            Err(ConfigError::UnsupportedRole { .. }) => "role",
            Err(ConfigError::ReservedLabels { .. }) => "labels",
            Err(ConfigError::UnknownVariables { .. }) => "unknown",
            Err(ConfigError::UnknownSetting { .. }) => "setting",
            Ok(_) => "ok",
        };
        assert_eq!(stage(&all), "invalid");
        assert_eq!(stage(&all[1..]), "role");
        assert_eq!(stage(&all[2..]), "labels");
        assert_eq!(stage(&all[3..]), "unknown");
    }

    #[test]
    fn builder_refuses_duplicate_or_empty_property_keys() {
        let duplicate = AgentConfig::builder(URL)
            .with_properties([
                ("a", PropertyValue::Bool(true)),
                ("a", PropertyValue::Bool(false)),
            ])
            .build();
        assert!(
            matches!(duplicate, Err(ConfigError::Invalid(ref i)) if i[0].setting == var::PROPERTIES)
        );
        let empty = AgentConfig::builder(URL)
            .with_properties([("", PropertyValue::Bool(true))])
            .build();
        assert!(matches!(empty, Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn builder_validates_the_url() {
        for (url, needle) in [
            ("", "required"),
            ("http://orchestrator:4000/ws", "ws:// or wss://"),
            ("not a url", "not a valid URL"),
        ] {
            let error = AgentConfig::builder(url).build().unwrap_err();
            let ConfigError::Invalid(found) = &error else {
                panic!("expected invalid URL for {url:?}, got {error:?}");
            };
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].setting, var::ORCHESTRATOR_URL);
            assert!(
                found[0].message.contains(needle),
                "{url:?}: {}",
                found[0].message
            );
        }
        let with_password = AgentConfig::builder("https://user:hunter2@host/").build();
        assert!(!with_password.unwrap_err().to_string().contains("hunter2"));
        assert!(AgentConfig::builder("wss://orchestrator.example/ws")
            .build()
            .is_ok());
        assert_eq!(
            issues(&[(var::ORCHESTRATOR_URL, "")])[0].setting,
            var::ORCHESTRATOR_URL
        );
    }

    #[test]
    fn builder_validates_values() {
        let built = AgentConfig::builder(URL)
            .with_max_concurrency(0)
            .with_concurrency_wait_timeout(Duration::from_millis(10))
            .with_token("")
            .with_agent_id("")
            .build();
        let Err(ConfigError::Invalid(found)) = built else {
            panic!("expected invalid values, got {built:?}");
        };
        let settings: Vec<&str> = found.iter().map(|issue| issue.setting.as_str()).collect();
        assert_eq!(
            settings,
            vec![
                var::AGENT_ID,
                var::AGENT_TOKEN,
                var::CONCURRENCY_WAIT_TIMEOUT_MS,
                var::MAX_CONCURRENCY
            ]
        );
        let good = AgentConfig::builder(URL)
            .with_port(0)
            .with_labels(["a", "b"])
            .with_max_concurrency(3)
            .with_token(TOKEN)
            .with_log_format(LogFormat::Json)
            .build();
        assert!(good.is_ok_and(|c| c.port == 0 && c.max_concurrency == 3 && c.token.is_some()));
    }

    #[test]
    fn builder_validates_the_reconnect_policy_and_running_resends() {
        let messages = |builder: AgentConfigBuilder| match builder.build() {
            Err(ConfigError::Invalid(found)) => found
                .into_iter()
                .map(|issue| format!("{}: {}", issue.setting, issue.message))
                .collect::<Vec<_>>(),
            other => panic!("expected invalid values, got {other:?}"),
        };
        let policy = ReconnectPolicy::default();
        let found = messages(
            AgentConfig::builder(URL)
                .with_reconnect(ReconnectPolicy {
                    initial_delay: Duration::ZERO,
                    jitter: 1.5,
                    ..policy
                })
                .with_running_resends(vec![Duration::from_secs(8 * 24 * 3600)]),
        );
        assert_eq!(
            found,
            [
                "reconnect: initial_delay must be greater than 0 and at most max_delay",
                "reconnect: jitter must be within 0..=1, got 1.5",
                "running_resends: each must be at most 7 days"
            ]
        );
        let found = messages(AgentConfig::builder(URL).with_reconnect(ReconnectPolicy {
            initial_delay: Duration::from_secs(61),
            stable_after: Duration::from_secs(8 * 24 * 3600),
            ..policy
        }));
        assert_eq!(found.len(), 2, "{found:?}");
        let built = AgentConfig::builder(URL)
            .with_reconnect(policy)
            .with_running_resends(Vec::new())
            .build();
        assert!(built.is_ok_and(|c| c.reconnect == policy && c.running_resends.is_empty()));
    }

    #[test]
    fn the_step_map_must_be_a_readable_file() {
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let c = config(&[(var::STEP_MAP, manifest)]);
        assert_eq!(c.step_map_file, Some(PathBuf::from(manifest)));
        for path in [
            "/nonexistent/kici-step-map.json",
            env!("CARGO_MANIFEST_DIR"),
        ] {
            let found = issues(&[(var::STEP_MAP, path)]);
            assert_eq!(found.len(), 1, "{path}");
            assert_eq!(found[0].setting, var::STEP_MAP);
            assert!(found[0].message.contains(path), "{}", found[0].message);
        }
    }
}
