//! The job's checkout: clone credentials from the dispatch, the blocking clone with its
//! progress in the job log.

use tokio::sync::mpsc;

use super::JobRunner;
use crate::checkout::{self, CheckoutRequest, GitCredentials, HostKeyPolicy};
use crate::protocol::{GitAuthKind, JobDispatch, SshHostKeyPolicy};

impl JobRunner {
    pub(super) async fn checkout(
        &self,
        dispatch: &JobDispatch,
        workspace: &std::path::Path,
    ) -> Result<(), String> {
        let credentials =
            clone_credentials(dispatch, self.services.settings.github_token.as_deref());
        let repo_url = dispatch.repo_url.clone();
        let git_ref = dispatch.git_ref.clone();
        let sha = dispatch.sha.clone();
        let dest = workspace.to_path_buf();
        let cancel = self.control.cancel.clone();
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<String>();
        let clone = tokio::task::spawn_blocking(move || {
            let request = CheckoutRequest {
                repo_url: &repo_url,
                git_ref: &git_ref,
                sha: &sha,
                credentials: credentials.as_ref(),
            };
            let is_cancelled = || cancel.is_cancelled();
            let mut progress = |line: &str| {
                let _ = progress_tx.send(line.to_owned());
            };
            checkout::checkout(&request, &dest, &is_cancelled, &mut progress)
        });
        tokio::pin!(clone);
        let result = loop {
            tokio::select! {
                Some(line) = progress_rx.recv() => self.job_log(format!("[kici] {line}")).await,
                result = &mut clone => break result,
            }
        };
        while let Ok(line) = progress_rx.try_recv() {
            self.job_log(format!("[kici] {line}")).await;
        }
        match result {
            Ok(Ok(report)) => {
                self.services
                    .metrics
                    .clone_duration_seconds
                    .observe(report.duration.as_secs_f64());
                Ok(())
            }
            Ok(Err(e)) => Err(format!("Checkout failed: {e}")),
            Err(e) => Err(format!(
                "Checkout failed: the clone task ended abnormally: {e}"
            )),
        }
    }
}

/// Clone credentials in priority order: `sourceAuth`, the legacy `token`, then the agent's
/// `KICI_GITHUB_TOKEN` (spec agent.md §9.2).
fn clone_credentials(dispatch: &JobDispatch, github_token: Option<&str>) -> Option<GitCredentials> {
    if let Some(auth) = &dispatch.source_auth {
        return Some(match auth.kind {
            GitAuthKind::Basic => GitCredentials::Basic {
                user: auth.user.clone().unwrap_or_else(|| "x-access-token".into()),
                secret: auth.secret.clone(),
            },
            GitAuthKind::Ssh => GitCredentials::Ssh {
                user: auth.user.clone(),
                private_key: auth.secret.clone(),
                host_key: match (auth.ssh_host_key_policy, &auth.ssh_known_hosts_pem) {
                    (Some(SshHostKeyPolicy::Pinned), Some(known)) => HostKeyPolicy::Pinned {
                        known_hosts: known.clone(),
                    },
                    (Some(SshHostKeyPolicy::Pinned), None) => HostKeyPolicy::Pinned {
                        known_hosts: String::new(),
                    },
                    _ => HostKeyPolicy::AcceptNew,
                },
            },
        });
    }
    dispatch
        .token
        .as_deref()
        .or(github_token)
        .map(|secret| GitCredentials::Basic {
            user: "x-access-token".into(),
            secret: secret.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatch(extra: serde_json::Value) -> JobDispatch {
        let mut value: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/real-orchestrator/job.dispatch.json"
        ))
        .unwrap();
        for (key, field) in extra.as_object().unwrap() {
            value[key] = field.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    fn basic(user: &str, secret: &str) -> Option<GitCredentials> {
        Some(GitCredentials::Basic {
            user: user.into(),
            secret: secret.into(),
        })
    }

    #[test]
    fn clone_credentials_prefer_source_auth_then_the_token_then_the_agents_github_token() {
        let none = dispatch(serde_json::json!({}));
        assert!(clone_credentials(&none, None).is_none());
        assert!(
            clone_credentials(&none, Some("ghp_agent")) == basic("x-access-token", "ghp_agent")
        );
        let token = dispatch(serde_json::json!({"token": "ghs_dispatch"}));
        assert!(
            clone_credentials(&token, Some("ghp_agent")) == basic("x-access-token", "ghs_dispatch")
        );
        let source_auth = dispatch(serde_json::json!({
            "token": "ghs_dispatch",
            "sourceAuth": {"kind": "basic", "secret": "from-source-auth"}
        }));
        assert!(
            clone_credentials(&source_auth, Some("ghp_agent"))
                == basic("x-access-token", "from-source-auth")
        );
        let with_user = dispatch(serde_json::json!({
            "sourceAuth": {"kind": "basic", "user": "bot", "secret": "s3cret"}
        }));
        assert!(clone_credentials(&with_user, None) == basic("bot", "s3cret"));
    }

    #[test]
    fn ssh_clone_credentials_pin_host_keys_only_when_asked() {
        let ssh = |policy: serde_json::Value| {
            let d = dispatch(serde_json::json!({"sourceAuth": {
                "kind": "ssh", "secret": "KEY", "sshHostKeyPolicy": policy,
                "sshKnownHostsPem": "example.com ssh-ed25519 AAAA"
            }}));
            match clone_credentials(&d, None) {
                Some(GitCredentials::Ssh { host_key, .. }) => host_key,
                _ => panic!("SSH credentials"),
            }
        };
        assert_eq!(
            ssh(serde_json::json!("pinned")),
            HostKeyPolicy::Pinned {
                known_hosts: "example.com ssh-ed25519 AAAA".into()
            }
        );
        assert_eq!(
            ssh(serde_json::json!("accept-new")),
            HostKeyPolicy::AcceptNew
        );
        // Pinned with nothing listed refuses every host rather than trusting any.
        let unlisted = dispatch(serde_json::json!({"sourceAuth": {
            "kind": "ssh", "secret": "KEY", "sshHostKeyPolicy": "pinned"
        }}));
        match clone_credentials(&unlisted, None) {
            Some(GitCredentials::Ssh { host_key, .. }) => assert_eq!(
                host_key,
                HostKeyPolicy::Pinned {
                    known_hosts: String::new()
                }
            ),
            _ => panic!("SSH credentials"),
        }
    }
}
