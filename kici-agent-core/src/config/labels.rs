//! The labels an agent registers with: the user's, then the facts of the host (§3.4) and the
//! role labels.

use super::values::Role;
use super::AgentConfig;

impl AgentConfig {
    /// The full label set to register: user labels, then the auto-labels (§3.4) and role labels,
    /// de-duplicated.
    pub fn wire_labels(&self) -> Vec<String> {
        labels_for(
            &self.labels,
            &self.roles,
            Self::platform(),
            Self::arch(),
            &self.hostname,
        )
    }

    /// The OS as Node's `os.platform()` names it (`linux`, `darwin`, `win32`, ...).
    pub fn platform() -> &'static str {
        match std::env::consts::OS {
            "macos" => "darwin",
            "windows" => "win32",
            "solaris" | "illumos" => "sunos",
            other => other,
        }
    }

    /// The CPU architecture as Node's `os.arch()` names it (`x64`, `arm64`, ...).
    pub fn arch() -> &'static str {
        match std::env::consts::ARCH {
            "x86_64" => "x64",
            "aarch64" => "arm64",
            "x86" => "ia32",
            "powerpc64" => "ppc64",
            "powerpc" => "ppc",
            "loongarch64" => "loong64",
            other => other,
        }
    }
}

fn labels_for(
    user: &[String],
    roles: &[Role],
    platform: &str,
    arch: &str,
    hostname: &str,
) -> Vec<String> {
    let mut all: Vec<String> = user.to_vec();
    match platform {
        "darwin" => all.extend(["kici:os:macos".into(), "kici:os:darwin".into()]),
        "win32" => all.extend(["kici:os:windows".into(), "kici:os:win32".into()]),
        other => all.push(format!("kici:os:{other}")),
    }
    match arch {
        "x64" => all.extend(["kici:arch:x64".into(), "kici:arch:amd64".into()]),
        other => all.push(format!("kici:arch:{other}")),
    }
    all.push(format!("kici:host:{hostname}"));
    all.extend(roles.iter().map(|role| role.label()));
    let mut seen = std::collections::HashSet::new();
    all.retain(|label| seen.insert(label.clone()));
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

    #[test]
    fn wire_labels_put_user_labels_first_and_add_facts() {
        let user = vec!["gpu".to_string(), "kici:os:linux".to_string()];
        assert_eq!(
            labels_for(&user, &[], "linux", "x64", "box"),
            vec![
                "gpu",
                "kici:os:linux",
                "kici:arch:x64",
                "kici:arch:amd64",
                "kici:host:box"
            ]
        );
        assert_eq!(
            labels_for(&[], &[], "darwin", "arm64", "mac"),
            vec![
                "kici:os:macos",
                "kici:os:darwin",
                "kici:arch:arm64",
                "kici:host:mac"
            ]
        );
        assert_eq!(
            labels_for(&[], &[], "win32", "ia32", "pc"),
            vec![
                "kici:os:windows",
                "kici:os:win32",
                "kici:arch:ia32",
                "kici:host:pc"
            ]
        );
        assert_eq!(
            labels_for(&[], &[], "freebsd", "riscv64", "b"),
            vec!["kici:os:freebsd", "kici:arch:riscv64", "kici:host:b"]
        );
        let c = config(&[(var::LABELS, "gpu")]);
        let wire = c.wire_labels();
        assert_eq!(wire[0], "gpu");
        assert!(wire.contains(&format!("kici:host:{}", c.hostname)));
        assert!(wire.contains(&format!("kici:os:{}", AgentConfig::platform())));
        assert!(!wire.iter().any(|label| label.starts_with("kici:role:")));
    }

    #[test]
    fn node_style_platform_and_arch() {
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert_eq!(
                (AgentConfig::platform(), AgentConfig::arch()),
                ("linux", "x64")
            );
        }
        assert!(!AgentConfig::platform().is_empty() && !AgentConfig::arch().is_empty());
    }
}
