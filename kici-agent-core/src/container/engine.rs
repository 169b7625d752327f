//! The container engine: where it listens (`DOCKER_HOST`), the connection and API version, and
//! the few engine calls the rest of the executor shares (a short exec, an exec's exit code,
//! removing a container).

use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::RemoveContainerOptions;
use bollard::Docker;
use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{ContainerError, ContainerExecutor};

/// Engine requests must answer (headers) within this; streams may then run for as long as the
/// step does.
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// How long an exec may still report `running` after its output ended.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(5);

/// Where the engine listens.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum EngineAddress {
    Unix(String),
    /// `host:port` for plain HTTP.
    Tcp(String),
}

/// Parses a `DOCKER_HOST` value. TCP must be loopback: the job workspace is bind-mounted, so
/// the engine has to run on this machine, and plain TCP to another one would be unauthenticated.
pub(super) fn parse_docker_host(host: &str) -> Result<EngineAddress, ContainerError> {
    let unsupported = |reason| ContainerError::UnsupportedHost {
        host: host.to_owned(),
        reason,
    };
    if let Some(path) = host.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(unsupported("a unix socket path must be absolute"));
        }
        return Ok(EngineAddress::Unix(path.to_owned()));
    }
    if !(host.starts_with("tcp://") || host.starts_with("http://")) {
        return Err(unsupported(
            "use unix:///path/to/docker.sock or tcp://127.0.0.1:PORT",
        ));
    }
    let url = url::Url::parse(host).map_err(|_| unsupported("not a valid tcp:// address"))?;
    // `tcp://` is not a special scheme to the URL parser: an IPv4 host comes back as a name.
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback {
        return Err(unsupported(
            "tcp:// must be a loopback address: job workspaces are bind-mounted, so the engine must run on this machine (TLS is not supported)",
        ));
    }
    let host_part = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(other) => other.to_string(),
        None => return Err(unsupported("not a valid tcp:// address")),
    };
    Ok(EngineAddress::Tcp(format!(
        "{host_part}:{}",
        url.port().unwrap_or(2375)
    )))
}

impl ContainerExecutor {
    /// Checks that the engine answers, and agrees on an API version it speaks (dockerd 20.10
    /// only accepts up to 1.41). Cheap once it succeeded; an error names the address.
    pub async fn check_engine(&self) -> Result<(), ContainerError> {
        self.docker().await.map(|_| ())
    }

    /// The client; the first successful call connects and negotiates the API version.
    pub(super) async fn docker(&self) -> Result<&Docker, ContainerError> {
        self.client
            .get_or_try_init(|| async {
                let host = &self.settings.docker_host;
                let unreachable = |source| ContainerError::Unreachable {
                    host: host.clone(),
                    source,
                };
                let docker = match &self.address {
                    EngineAddress::Unix(path) => Docker::connect_with_unix(
                        path,
                        REQUEST_TIMEOUT_SECS,
                        bollard::API_DEFAULT_VERSION,
                    ),
                    EngineAddress::Tcp(address) => Docker::connect_with_http(
                        address,
                        REQUEST_TIMEOUT_SECS,
                        bollard::API_DEFAULT_VERSION,
                    ),
                }
                .map_err(unreachable)?;
                let docker = docker.negotiate_version().await.map_err(unreachable)?;
                let version = docker.client_version();
                info!(
                    host = %host,
                    api = %format!("{}.{}", version.major_version, version.minor_version),
                    "connected to the container engine"
                );
                Ok(docker)
            })
            .await
    }

    /// Force-removes a container; `false` (logged) when the engine refused.
    pub(super) async fn remove_container(&self, id: &str) -> bool {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        let removed = match self.docker().await {
            Ok(docker) => docker.remove_container(id, Some(options)).await,
            Err(e) => {
                warn!(container = %id, error = %e, "could not remove a job container");
                return false;
            }
        };
        match removed {
            Ok(()) => true,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => false,
            Err(e) => {
                warn!(container = %id, error = %e, "could not remove a job container");
                false
            }
        }
    }

    /// Runs a short command in the container; returns its exit code and output.
    pub(super) async fn exec_collect(
        &self,
        id: &str,
        cmd: &[&str],
        user: Option<&str>,
    ) -> Result<(i64, String), ContainerError> {
        let action = || format!("running `{}` in container {id}", cmd.join(" "));
        let exec = self
            .docker()
            .await?
            .create_exec(
                id,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(cmd.iter().map(|arg| arg.to_string()).collect()),
                    user: user.map(str::to_owned),
                    ..Default::default()
                },
            )
            .await
            .map_err(ContainerError::engine(action()))?;
        let mut output = Vec::new();
        if let StartExecResults::Attached {
            output: mut stream, ..
        } = self
            .docker()
            .await?
            .start_exec(&exec.id, Some(StartExecOptions::default()))
            .await
            .map_err(ContainerError::engine(action()))?
        {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(ContainerError::engine(action()))?;
                output.extend_from_slice(&chunk.into_bytes());
            }
        }
        let code = self.exit_code(&exec.id).await?;
        Ok((code, String::from_utf8_lossy(&output).into_owned()))
    }

    /// The exit code of a finished exec (the engine may flag it finished shortly after its
    /// output ended).
    pub(super) async fn exit_code(&self, exec_id: &str) -> Result<i64, ContainerError> {
        let give_up = Instant::now() + EXIT_CODE_WAIT;
        loop {
            let inspect = self
                .docker()
                .await?
                .inspect_exec(exec_id)
                .await
                .map_err(ContainerError::engine(format!("inspecting exec {exec_id}")))?;
            match (inspect.running, inspect.exit_code) {
                (Some(false) | None, Some(code)) => return Ok(code),
                _ if Instant::now() >= give_up => {
                    return Err(ContainerError::Io {
                        action: format!("reading the exit code of exec {exec_id}"),
                        source: std::io::Error::other("the engine still reports it running"),
                    })
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hosts_are_unix_sockets_or_loopback_tcp() {
        assert_eq!(
            parse_docker_host("unix:///run/docker.sock").unwrap(),
            EngineAddress::Unix("/run/docker.sock".into())
        );
        assert_eq!(
            parse_docker_host("tcp://127.0.0.1:2375").unwrap(),
            EngineAddress::Tcp("127.0.0.1:2375".into())
        );
        assert_eq!(
            parse_docker_host("tcp://localhost").unwrap(),
            EngineAddress::Tcp("localhost:2375".into())
        );
        assert_eq!(
            parse_docker_host("tcp://[::1]:2376").unwrap(),
            EngineAddress::Tcp("[::1]:2376".into())
        );
        for bad in [
            "tcp://10.0.0.5:2375",
            "ssh://host",
            "unix://relative.sock",
            "/x.sock",
        ] {
            let err = parse_docker_host(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        let remote = parse_docker_host("tcp://192.168.1.2:2375")
            .unwrap_err()
            .to_string();
        assert!(remote.contains("loopback"), "{remote}");
    }
}
