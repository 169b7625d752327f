//! The value types of settings: the enums with exact spellings, typed host properties,
//! credentials that never print, the outbound rate limits, and the comma-list readers.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The error of parsing one of the configuration enums from its text form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected one of {}, got {got:?}", expected.join(", "))]
pub struct ParseEnumError {
    /// Every accepted spelling.
    pub expected: &'static [&'static str],
    /// The rejected text.
    pub got: String,
}

/// Declares a configuration enum whose values have exact, case-sensitive spellings.
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every accepted spelling, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The exact spelling used in configuration and on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text ),+
                }
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;

            fn from_str(text: &str) -> Result<Self, ParseEnumError> {
                match text {
                    $( $text => Ok(Self::$variant), )+
                    _ => Err(ParseEnumError { expected: Self::NAMES, got: text.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

config_enum! {
    /// Minimum level of the agent's own log (`KICI_LOG_LEVEL`).
    #[derive(Default)]
    LogLevel {
        /// Everything, including protocol traces.
        Debug => "debug",
        /// Normal operation (default).
        #[default]
        Info => "info",
        /// Problems the agent recovers from.
        Warn => "warn",
        /// Failures only.
        Error => "error",
    }
}

impl From<LogLevel> for tracing::Level {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Error => tracing::Level::ERROR,
        }
    }
}

config_enum! {
    /// Format of the agent's own log (`KICI_LOG_FORMAT`).
    #[derive(Default)]
    LogFormat {
        /// JSON when stdout is not a terminal, plain text on a terminal (default).
        #[default]
        Auto => "auto",
        /// Human-readable text.
        Plain => "plain",
        /// One JSON object per line.
        Json => "json",
    }
}

config_enum! {
    /// What log streaming does when the outbound budget is exhausted (`KICI_BACKPRESSURE_MODE`).
    #[derive(Default)]
    BackpressureMode {
        /// Slow the producing step down until the budget recovers (default).
        #[default]
        Pause => "pause",
        /// Discard log lines that do not fit.
        Drop => "drop",
    }
}

config_enum! {
    /// Network of the bubblewrap sandbox (`KICI_SANDBOX_NETWORK`).
    #[derive(Default)]
    SandboxNetwork {
        /// No network inside the sandbox (default).
        #[default]
        Isolated => "isolated",
        /// The host's network.
        Host => "host",
    }
}

config_enum! {
    /// Forced execution backend (`KICI_EXECUTION_MODE`).
    ExecutionMode {
        /// Docker or Podman containers.
        Container => "container",
        /// Directly on the host.
        BareMetal => "bare-metal",
        /// Firecracker micro-VMs.
        Firecracker => "firecracker",
    }
}

config_enum! {
    /// An internal job role (`KICI_ROLES`). This agent serves none of them; the type exists so a
    /// future executor plugin can.
    Role {
        /// Dependency/source cache build jobs (`__build__`).
        Builder => "builder",
        /// Dynamic init / job-function evaluation jobs (`__init__`, `__dynamic__`).
        InitRunner => "init-runner",
    }
}

impl Role {
    /// The label advertising this role at registration (`kici:role:<role>`).
    pub fn label(self) -> String {
        format!("kici:role:{}", self.as_str())
    }
}

/// A typed host property sent at registration; serializes as a bare JSON boolean, number or string.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// Exactly `true` or `false`.
    Bool(bool),
    /// A decimal number (`-?digits(.digits)?`).
    Number(serde_json::Number),
    /// Anything else, verbatim.
    Text(String),
}

impl PropertyValue {
    /// Types a raw `KICI_PROPERTIES` value: `true`/`false` -> boolean, `-?\d+(\.\d+)?` -> number,
    /// anything else (`1.2.3`, `08x`, `""`) -> text.
    pub fn parse(raw: &str) -> Self {
        match raw {
            "true" => Self::Bool(true),
            "false" => Self::Bool(false),
            _ => decimal_number(raw).map_or_else(|| Self::Text(raw.to_owned()), Self::Number),
        }
    }
}

/// Parses `-?\d+(\.\d+)?` into a JSON number the way JavaScript's `Number()` would value it.
fn decimal_number(raw: &str) -> Option<serde_json::Number> {
    let unsigned = raw.strip_prefix('-').unwrap_or(raw);
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (unsigned, None),
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !fraction.map_or(true, all_digits) {
        return None;
    }
    if fraction.is_none() {
        if let Ok(integer) = raw.parse::<i64>() {
            return Some(integer.into());
        }
    }
    let float: f64 = raw.parse().ok()?;
    // JavaScript has one number type: `1.0` is the integer 1 on the wire.
    const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53
    if float.fract() == 0.0 && float.abs() < EXACT_INTEGER_LIMIT {
        return Some((float as i64).into());
    }
    serde_json::Number::from_f64(float)
}

/// A credential. `Debug` and `Display` never show the value: a KiCI agent token prints as
/// `kat_***`, anything else as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.starts_with("kat_") {
            f.write_str("kat_***")
        } else {
            f.write_str("***")
        }
    }
}

/// Client-side token buckets for outbound messages, kept below the orchestrator's inbound limits
/// (100 msg/s burst 200; 512000 B/s burst 2 MiB) so that nothing is dropped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    /// Message refill rate per second (`KICI_RATE_MSGS_PER_SEC`).
    pub msgs_per_sec: f64,
    /// Message bucket size (`KICI_RATE_MSG_BURST`).
    pub msg_burst: f64,
    /// Byte refill rate per second (`KICI_RATE_BYTES_PER_SEC`).
    pub bytes_per_sec: f64,
    /// Byte bucket size (`KICI_RATE_BYTE_BURST`).
    pub byte_burst: f64,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            msgs_per_sec: 80.0,
            msg_burst: 150.0,
            bytes_per_sec: 450_000.0,
            byte_burst: 1_500_000.0,
        }
    }
}

/// Splits a comma list, dropping empty items and keeping everything else verbatim.
pub(super) fn comma_list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').filter(|item| !item.is_empty())
}

pub(super) fn parse_properties(raw: &str) -> Result<Vec<(String, PropertyValue)>, String> {
    let mut properties: Vec<(String, PropertyValue)> = Vec::new();
    for entry in comma_list(raw) {
        let Some((key, value)) = entry.split_once('=').filter(|(key, _)| !key.is_empty()) else {
            return Err(format!("Invalid property '{entry}': expected key=value"));
        };
        // Later duplicates win, keeping the key's first position (like a JS object).
        upsert_property(&mut properties, key.to_owned(), PropertyValue::parse(value));
    }
    Ok(properties)
}

/// Replaces the value of `key`, keeping its position, or appends it.
pub(super) fn upsert_property(
    properties: &mut Vec<(String, PropertyValue)>,
    key: String,
    value: PropertyValue,
) {
    match properties.iter_mut().find(|(known, _)| *known == key) {
        Some(slot) => slot.1 = value,
        None => properties.push((key, value)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::testing::*;

    #[test]
    fn properties_are_typed() {
        let c = config(&[(
            var::PROPERTIES,
            "region=eu,cores=8,gpu=true,ssd=false,ratio=-1.25,ver=1.2.3,code=08x,eq=a=b,empty=,cores=16,,one=1.0",
        )]);
        let number = |n: serde_json::Number| PropertyValue::Number(n);
        assert_eq!(
            c.properties,
            vec![
                ("region".to_string(), PropertyValue::Text("eu".into())),
                ("cores".to_string(), number(16.into())),
                ("gpu".to_string(), PropertyValue::Bool(true)),
                ("ssd".to_string(), PropertyValue::Bool(false)),
                (
                    "ratio".to_string(),
                    number(serde_json::Number::from_f64(-1.25).unwrap())
                ),
                ("ver".to_string(), PropertyValue::Text("1.2.3".into())),
                ("code".to_string(), PropertyValue::Text("08x".into())),
                ("eq".to_string(), PropertyValue::Text("a=b".into())),
                ("empty".to_string(), PropertyValue::Text(String::new())),
                ("one".to_string(), number(1.into())),
            ]
        );
        let json = serde_json::to_string(&c.properties.iter().cloned().collect::<BTreeMap<_, _>>())
            .unwrap();
        assert!(json.contains(r#""cores":16"#) && json.contains(r#""gpu":true"#));
        assert!(json.contains(r#""ver":"1.2.3""#) && json.contains(r#""ratio":-1.25"#));
        for bad in ["novalue", "=x"] {
            assert_eq!(
                issues(&[(var::PROPERTIES, bad)]),
                vec![ConfigIssue::new(
                    var::PROPERTIES,
                    format!("Invalid property '{bad}': expected key=value")
                )]
            );
        }
        for numeric in ["0", "-7", "08", "3.14", "99999999999999999999"] {
            assert!(
                matches!(PropertyValue::parse(numeric), PropertyValue::Number(_)),
                "{numeric}"
            );
        }
        for text in ["1.", ".5", "-", "1e3", "+1", " 1", "TRUE"] {
            assert!(
                matches!(PropertyValue::parse(text), PropertyValue::Text(_)),
                "{text}"
            );
        }
    }

    #[test]
    fn secrets_never_leak() {
        let c = config(&[
            (var::AGENT_TOKEN, TOKEN),
            (var::GITHUB_TOKEN, "ghp_secretvalue"),
        ]);
        assert_eq!(c.token.as_ref().map(Secret::expose), Some(TOKEN));
        assert_eq!(
            c.github_token.as_ref().map(Secret::expose),
            Some("ghp_secretvalue")
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains(TOKEN) && !debug.contains("secretvalue"),
            "{debug}"
        );
        assert!(debug.contains("kat_***"));
        assert_eq!(Secret::new("ghp_secretvalue").to_string(), "***");

        let errors = [
            load_vars(&[(var::AGENT_TOKEN, TOKEN), (var::PORT, "x")]),
            load_vars(&[(var::AGENT_TOKEN, TOKEN), (var::LABELS, "kici:x")]),
            load_vars(&[("KICI_AGENT_TOKN", TOKEN)]),
        ];
        for error in errors {
            let error = error.unwrap_err();
            let shown = format!("{error} {error:?}");
            assert!(!shown.contains(TOKEN), "{shown}");
        }
        assert!(config(&[(var::AGENT_TOKEN, "")]).token.is_none());
    }
}
