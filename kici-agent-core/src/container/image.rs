//! Which image a job runs in, and when to pull it (the pull policy).

use crate::protocol::{ContainerSpec, JobConfig};

/// When to pull a job's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Pull only when the engine does not have the image (the default).
    #[default]
    IfNotPresent,
    /// Pull before every job.
    Always,
    /// Never pull: a missing image fails the job.
    Never,
}

/// A pull policy name was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pull policy {0:?}: expected if-not-present, always or never")]
pub struct UnknownPullPolicy(pub String);

impl std::str::FromStr for PullPolicy {
    type Err = UnknownPullPolicy;

    /// Parses `if-not-present`, `always` or `never` (case-insensitive).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "if-not-present" | "ifnotpresent" | "missing" => Ok(PullPolicy::IfNotPresent),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            _ => Err(UnknownPullPolicy(text.to_owned())),
        }
    }
}

/// The image a job runs in: `jobConfig.container` (a name or `{image}`), else `default_image`
/// (pass it only when the agent runs every job in a container). `None`: not a container job.
pub fn image_for(config: &JobConfig, default_image: Option<&str>) -> Option<String> {
    let named = match &config.container {
        Some(ContainerSpec::Image(image)) => Some(image.as_str()),
        Some(ContainerSpec::Detailed { image, .. }) => Some(image.as_str()),
        None => None,
    };
    named
        .map(str::trim)
        .filter(|image| !image.is_empty())
        .or_else(|| {
            default_image
                .map(str::trim)
                .filter(|image| !image.is_empty())
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_comes_from_the_job_then_the_default() {
        let mut config = JobConfig::default();
        assert_eq!(image_for(&config, None), None);
        assert_eq!(
            image_for(&config, Some("debian:12")).as_deref(),
            Some("debian:12")
        );
        config.container = Some(ContainerSpec::Image("alpine:3".into()));
        assert_eq!(
            image_for(&config, Some("debian:12")).as_deref(),
            Some("alpine:3")
        );
        config.container = Some(
            serde_json::from_value(serde_json::json!({"image": "node:20", "env": {"A": "1"}}))
                .unwrap(),
        );
        assert_eq!(image_for(&config, None).as_deref(), Some("node:20"));
        config.container = Some(ContainerSpec::Image(" ".into()));
        assert_eq!(
            image_for(&config, Some("debian:12")).as_deref(),
            Some("debian:12")
        );
    }

    #[test]
    fn pull_policies_parse() {
        assert_eq!("never".parse(), Ok(PullPolicy::Never));
        assert_eq!("Always".parse(), Ok(PullPolicy::Always));
        assert_eq!("if-not-present".parse(), Ok(PullPolicy::IfNotPresent));
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }
}
