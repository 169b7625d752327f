//! The keyword arguments of `Agent(...)`: each is the key of a setting of the core's table
//! (`kici_agent_core::config::SETTINGS`), its Python value converted by the setting's kind.
//! Nothing here knows a particular setting; `settings()` shows the table to Python (the stub test
//! checks `_native.pyi` against it).

use std::path::PathBuf;

use kici_agent_core::config::{
    AgentConfigBuilder, ConfigError as CoreConfigError, PropertyValue, Setting, SettingKind,
    SettingValue, SETTINGS,
};
use kici_agent_core::AgentConfig;
use pyo3::exceptions::{PyTypeError, PyUserWarning};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

use crate::convert::{type_name, Seconds};
use crate::ConfigError;

/// The keyword argument that is no setting of the table: it overrides the detected host name.
const HOSTNAME: &str = "hostname";

/// The validated configuration of `Agent(url, **keywords)`; a keyword set to `None` keeps the
/// default. Unknown keywords are a `TypeError` (with the closest key), values of the wrong type
/// a `TypeError`, invalid values a `ConfigError` listing every problem. Warnings become
/// `UserWarning`s.
pub fn from_keywords(
    py: Python<'_>,
    url: String,
    keywords: Option<&Bound<'_, PyDict>>,
) -> PyResult<AgentConfig> {
    let mut builder = AgentConfig::builder(url);
    let mut settings = Vec::new();
    for (key, value) in keywords.into_iter().flat_map(|keywords| keywords.iter()) {
        let key: String = key.extract()?;
        if value.is_none() {
            continue;
        }
        // The host name first: a generated agent id is derived from it.
        if key == HOSTNAME {
            builder = builder.with_hostname(value.extract::<String>()?);
            continue;
        }
        settings.push((key, value));
    }
    for (key, value) in settings {
        let setting = Setting::find(&key)
            .filter(|setting| setting.key == key)
            .ok_or_else(|| unknown_keyword(&key))?;
        let value = setting_value(setting, &value)?;
        builder
            .set_value(setting.key, value)
            .map_err(config_error)?;
    }
    warn(py, &builder)?;
    builder.build().map_err(config_error)
}

fn unknown_keyword(key: &str) -> PyErr {
    let hint = Setting::closest(key)
        .map(|setting| format!(" (did you mean '{}'?)", setting.key))
        .unwrap_or_default();
    PyTypeError::new_err(format!(
        "Agent() got an unexpected keyword argument '{key}'{hint}"
    ))
}

fn warn(py: Python<'_>, builder: &AgentConfigBuilder) -> PyResult<()> {
    for warning in builder.warnings() {
        let message = std::ffi::CString::new(warning.replace('\0', " "))?;
        PyErr::warn(py, &py.get_type::<PyUserWarning>(), &message, 1)?;
    }
    Ok(())
}

/// The Python value of a keyword as the setting's kind takes it.
fn setting_value(setting: &Setting, value: &Bound<'_, PyAny>) -> PyResult<SettingValue> {
    let wrong_type = |expected: &str| {
        PyTypeError::new_err(format!(
            "{}: expected {expected}, got {}",
            setting.key,
            type_name(value)
        ))
    };
    let text = || -> PyResult<SettingValue> {
        match value.cast::<PyString>() {
            Ok(text) => Ok(SettingValue::Text(text.to_str()?.to_owned())),
            Err(_) => Err(wrong_type("str")),
        }
    };
    // `bool` is a subclass of `int`: refuse it where a number is meant.
    let is_int = value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>();
    let integer = || -> PyResult<SettingValue> {
        value
            .extract::<i64>()
            .map(SettingValue::Integer)
            .map_err(|_| {
                ConfigError::new_err(format!("{}: {value} does not fit in 64 bits", setting.key))
            })
    };
    match setting.kind {
        SettingKind::Text
        | SettingKind::Secret
        | SettingKind::Choice(_)
        | SettingKind::IpAddress
        | SettingKind::Ignored => text(),
        SettingKind::Path => {
            let path: PathBuf = value
                .extract()
                .map_err(|_| wrong_type("str or os.PathLike"))?;
            path.into_os_string()
                .into_string()
                .map(SettingValue::Text)
                .map_err(|_| {
                    ConfigError::new_err(format!("{}: the path is not valid UTF-8", setting.key))
                })
        }
        SettingKind::Flag => match value.cast::<PyBool>() {
            Ok(flag) => Ok(SettingValue::Flag(flag.is_true())),
            Err(_) => Err(wrong_type("bool")),
        },
        SettingKind::Integer if is_int => integer(),
        SettingKind::Integer => Err(wrong_type("int")),
        SettingKind::Size if is_int => integer(),
        SettingKind::Size => text().map_err(|_| wrong_type("int or str")),
        SettingKind::Millis => Ok(SettingValue::Duration(value.extract::<Seconds>()?.0)),
        SettingKind::Number if is_int => integer(),
        SettingKind::Number => match value.cast::<PyFloat>() {
            Ok(number) => Ok(SettingValue::Number(number.value())),
            Err(_) => Err(wrong_type("float")),
        },
        SettingKind::List => value
            .extract::<Vec<String>>()
            .map(SettingValue::List)
            .map_err(|_| wrong_type("list of str")),
        SettingKind::Properties => match value.cast::<PyDict>() {
            Ok(dict) => parse_properties(dict).map(SettingValue::Properties),
            Err(_) => Err(wrong_type("dict")),
        },
    }
}

/// A core configuration error, settings named by their keyword argument.
fn config_error(error: CoreConfigError) -> PyErr {
    match error {
        CoreConfigError::Invalid(issues) => ConfigError::new_err(format!(
            "invalid agent settings:{}",
            issues
                .iter()
                .map(|issue| format!("\n  - {}: {}", argument_name(&issue.setting), issue.message))
                .collect::<String>()
        )),
        other => ConfigError::new_err(other.to_string()),
    }
}

/// The keyword argument of a setting the core names by its environment variable (settings
/// without one, like `hostname` or `reconnect`, keep their name).
fn argument_name(setting: &str) -> &str {
    Setting::find(setting).map_or(setting, |found| found.key)
}

/// One row of `settings()`: variable, keyword, default, kind, choices, description.
type SettingRow = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static [&'static str],
    &'static str,
);

/// `settings()`: the core's setting table as `(variable, keyword, default, kind, choices,
/// description)` tuples, `kind` being the setting's kind in lower case (`"millis"`,
/// `"choice"`, ...) and `choices` the spellings of a `"choice"`.
#[pyfunction]
pub fn settings() -> Vec<SettingRow> {
    SETTINGS
        .iter()
        .map(|setting| {
            let (kind, choices): (&str, &'static [&'static str]) = match setting.kind {
                SettingKind::Text => ("text", &[]),
                SettingKind::Secret => ("secret", &[]),
                SettingKind::Path => ("path", &[]),
                SettingKind::Flag => ("flag", &[]),
                SettingKind::Integer => ("integer", &[]),
                SettingKind::Size => ("size", &[]),
                SettingKind::Millis => ("millis", &[]),
                SettingKind::Number => ("number", &[]),
                SettingKind::Choice(names) => ("choice", names),
                SettingKind::IpAddress => ("ip_address", &[]),
                SettingKind::List => ("list", &[]),
                SettingKind::Properties => ("properties", &[]),
                SettingKind::Ignored => ("ignored", &[]),
            };
            (
                setting.name,
                setting.key,
                setting.default,
                kind,
                choices,
                setting.description,
            )
        })
        .collect()
}

/// `properties={...}`: `bool`, `int`, `float` and `str` values, in the dict's order.
pub fn parse_properties(dict: &Bound<'_, PyDict>) -> PyResult<Vec<(String, PropertyValue)>> {
    dict.iter()
        .map(|(key, value)| {
            let key: String = key.extract().map_err(|_| {
                ConfigError::new_err(format!(
                    "properties: keys must be str, got {}",
                    type_name(&key)
                ))
            })?;
            let value = property_value(&key, &value)?;
            Ok((key, value))
        })
        .collect()
}

fn property_value(key: &str, value: &Bound<'_, PyAny>) -> PyResult<PropertyValue> {
    if let Ok(flag) = value.cast::<PyBool>() {
        return Ok(PropertyValue::Bool(flag.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        let integer: i64 = value.extract().map_err(|_| {
            ConfigError::new_err(format!(
                "properties[{key:?}]: integer does not fit in 64 bits"
            ))
        })?;
        return Ok(PropertyValue::Number(integer.into()));
    }
    if let Ok(float) = value.cast::<PyFloat>() {
        return serde_json::Number::from_f64(float.value())
            .map(PropertyValue::Number)
            .ok_or_else(|| {
                ConfigError::new_err(format!("properties[{key:?}]: {float} is not a JSON number"))
            });
    }
    if let Ok(text) = value.cast::<PyString>() {
        return Ok(PropertyValue::Text(text.to_str()?.to_owned()));
    }
    Err(ConfigError::new_err(format!(
        "properties[{key:?}]: expected bool, int, float or str, got {}",
        type_name(value)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_named_by_their_keyword_argument() {
        assert_eq!(argument_name("KICI_ORCHESTRATOR_URL"), "url");
        assert_eq!(argument_name("KICI_MAX_CONCURRENCY"), "max_concurrency");
        assert_eq!(argument_name("KICI_CANCEL_GRACE_MS"), "cancel_grace");
        assert_eq!(argument_name("KICI_RATE_MSGS_PER_SEC"), "rate_msgs_per_sec");
        assert_eq!(argument_name("hostname"), "hostname");
    }

    #[test]
    fn invalid_settings_are_all_reported_by_argument_name() {
        Python::initialize();
        Python::attach(|py| {
            let keywords = PyDict::new(py);
            keywords.set_item("max_concurrency", 0).unwrap();
            keywords.set_item("job_pids_max", 12).unwrap();
            let message = from_keywords(py, "http://x".into(), Some(&keywords))
                .unwrap_err()
                .to_string();
            assert!(
                message.contains("- url: must be a ws:// or wss:// URL"),
                "{message}"
            );
            assert!(message.contains("- max_concurrency: "), "{message}");
            keywords.set_item("max_concurency", 2).unwrap();
            let message = from_keywords(py, "ws://x".into(), Some(&keywords))
                .unwrap_err()
                .to_string();
            assert!(
                message.contains("'max_concurency' (did you mean 'max_concurrency'?)"),
                "{message}"
            );
        });
    }
}
