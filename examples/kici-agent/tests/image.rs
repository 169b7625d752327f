//! The container image, built from the project's Dockerfile, run on a real engine against the
//! strict mock orchestrator on the host. Ignored by default: `scripts/image-test.sh` builds the
//! image on a private engine and runs this with
//! `KICI_TEST_DOCKER_HOST=unix://... KICI_TEST_AGENT_IMAGE=name cargo test --test image -- --ignored`.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kici_mock_orchestrator::{MockConfig, MockOrchestrator, TEST_TOKEN};
use tokio::net::{TcpListener, TcpStream};

/// The agent's shutdown grace inside the container; `docker stop` gives it more.
const GRACE_MS: u64 = 5_000;
const STOP_TIMEOUT_S: u64 = 20;

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (see scripts/image-test.sh)"))
}

/// `docker ARGS` against the test engine; panics with its stderr when it fails.
fn docker(args: &[&str]) -> String {
    let out = docker_output(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn docker_output(args: &[&str]) -> Output {
    Command::new("docker")
        .env("DOCKER_HOST", required_env("KICI_TEST_DOCKER_HOST"))
        .args(args)
        .output()
        .expect("the docker CLI runs")
}

/// The container, removed (with its logs printed) if the test fails before it is.
struct Container {
    name: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = docker_output(&["logs", "--tail", "50", &self.name]);
            eprintln!(
                "container log tail:\n{}{}",
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        let _ = docker_output(&["rm", "-f", &self.name]);
    }
}

/// Forwards connections from the engine's bridge gateway to the mock, which listens on
/// loopback only: the container reaches the host as `host.docker.internal`.
async fn relay_to(mock: SocketAddr, listen_ip: &str) -> u16 {
    let listener = TcpListener::bind((listen_ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(mock).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

/// The host's address on the engine's default bridge: IPAM's gateway, or (dockerd 20.10 leaves
/// it out) the subnet's first address, which dockerd gives the bridge.
fn bridge_gateway() -> String {
    let ipam = docker(&[
        "network",
        "inspect",
        "bridge",
        "-f",
        "{{json .IPAM.Config}}",
    ]);
    let config: serde_json::Value = serde_json::from_str(&ipam).unwrap();
    let first = &config[0];
    if let Some(gateway) = first["Gateway"].as_str().filter(|g| !g.is_empty()) {
        return gateway.to_owned();
    }
    let subnet = first["Subnet"].as_str().expect("the bridge has a subnet");
    let network: std::net::Ipv4Addr = subnet.split('/').next().unwrap().parse().unwrap();
    std::net::Ipv4Addr::from(u32::from(network) + 1).to_string()
}

/// Polls `docker inspect` (the engine has no wait-for-health call) until `done` or `timeout`.
fn inspect_until(
    name: &str,
    format: &str,
    done: impl Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let value = docker(&["inspect", "-f", format, name]);
        if done(&value) || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn step_lines(mock: &MockOrchestrator, job_id: &str) -> Vec<String> {
    mock.messages_of_type("log.chunk")
        .iter()
        .filter(|m| m["jobId"] == job_id && m["stepIndex"].as_i64() >= Some(0))
        .flat_map(|m| m["lines"].as_array().cloned().unwrap_or_default())
        .filter_map(|line| line.as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a container engine and the built image: scripts/image-test.sh"]
async fn the_image_registers_serves_probes_runs_jobs_and_stops_gracefully() {
    let image = required_env("KICI_TEST_AGENT_IMAGE");
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let mock_addr: SocketAddr = mock
        .ws_url()
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    let gateway = bridge_gateway();
    let relay_port = relay_to(mock_addr, &gateway).await;

    let name = format!("kici-image-test-{}", std::process::id());
    let url = format!("KICI_ORCHESTRATOR_URL=ws://host.docker.internal:{relay_port}/ws");
    let token = format!("KICI_AGENT_TOKEN={TEST_TOKEN}");
    let grace = format!("KICI_SHUTDOWN_GRACE_MS={GRACE_MS}");
    let started = Instant::now();
    docker(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--publish",
        "127.0.0.1::8080",
        "--add-host",
        "host.docker.internal:host-gateway",
        "--env",
        &url,
        "--env",
        &token,
        "--env",
        &grace,
        "--env",
        "KICI_AGENT_ID=in-a-container",
        "--env",
        "KICI_LABELS=docker,image-test",
        &image,
    ]);
    let container = Container { name };
    let agent = mock
        .wait_for_message(
            "config.ack",
            |m| m["agentId"] == "in-a-container",
            Duration::from_secs(30),
        )
        .await;
    assert!(agent.is_some(), "the containerised agent did not register");
    eprintln!(
        "container start -> registered: {} ms",
        started.elapsed().as_millis()
    );

    // The probes through the published port.
    let published = docker(&["port", &container.name, "8080/tcp"]);
    let host_port: u16 = published
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no published port in {published:?}"));
    let (status, body) = tokio::task::spawn_blocking(move || common::get(host_port, "/health"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    let (status, body) = tokio::task::spawn_blocking(move || common::get(host_port, "/ready"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    // Not root: the image's user, for the init and the agent's steps alike.
    assert_eq!(
        docker(&["inspect", "-f", "{{.Config.User}}", &container.name]),
        "10001:10001"
    );
    let init_pid = docker(&["inspect", "-f", "{{.State.Pid}}", &container.name]);
    let status = std::fs::read_to_string(format!("/proc/{init_pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|uid| uid == "10001"),
        "{uid_line}"
    );

    // A job with run steps: bash, git and a writable workspace, as the agent's user.
    let steps = serde_json::json!([
        {"name": "who", "run": "echo \"uid=$(id -u) gid=$(id -g)\""},
        {"name": "tools", "run": "git --version && bash --version | head -n 1"},
        {"name": "workspace", "run": "echo built > out.txt && cat out.txt && pwd"},
    ]);
    let dispatch =
        kici_mock_orchestrator::sample_dispatch("run-image", "job-image", "", "main", "", steps);
    mock.dispatch("in-a-container", dispatch).await.unwrap();
    let done = mock
        .wait_for_message(
            "job.status",
            |m| m["jobId"] == "job-image" && m["state"].as_str().is_some_and(|s| s != "running"),
            Duration::from_secs(60),
        )
        .await
        .expect("the job ended");
    let lines = step_lines(&mock, "job-image");
    assert_eq!(done["state"], "success", "{done} {lines:?}");
    assert!(
        lines.iter().any(|l| l == "uid=10001 gid=10001"),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("git version")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "built"), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("/var/lib/kici-agent/work/kici-")),
        "the workspace is under the image's TMPDIR: {lines:?}"
    );

    // The image's HEALTHCHECK (`kici-agent health`) goes healthy.
    let health = inspect_until(
        &container.name,
        "{{.State.Health.Status}}",
        |s| s != "starting",
        Duration::from_secs(60),
    );
    assert_eq!(health, "healthy");

    // `docker stop`: SIGTERM through tini; the running job is ended and reported, exit 0.
    let steps = serde_json::json!([{"name": "long", "run": "echo started; sleep 300"}]);
    let dispatch =
        kici_mock_orchestrator::sample_dispatch("run-long", "job-long", "", "main", "", steps);
    mock.dispatch("in-a-container", dispatch).await.unwrap();
    mock.wait_for_message(
        "log.chunk",
        |m| m["jobId"] == "job-long" && m["lines"][0] == "started",
        Duration::from_secs(30),
    )
    .await
    .expect("the long job started");
    let asked = Instant::now();
    let stop_timeout = STOP_TIMEOUT_S.to_string();
    let name = container.name.clone();
    tokio::task::spawn_blocking(move || docker(&["stop", "-t", &stop_timeout, &name]))
        .await
        .unwrap();
    let took = asked.elapsed();
    eprintln!("docker stop with a running job: {} ms", took.as_millis());
    assert!(
        took < Duration::from_secs(STOP_TIMEOUT_S),
        "stopped only by SIGKILL after {took:?}"
    );
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.ExitCode}}", &container.name]),
        "0"
    );
    let terminal = mock
        .messages_of_type("job.status")
        .into_iter()
        .find(|m| m["jobId"] == "job-long" && m["state"] != "running");
    assert!(
        terminal.as_ref().is_some_and(|m| m["state"] == "cancelled"),
        "{terminal:?}"
    );
    assert!(
        mock.closes()
            .iter()
            .any(|c| !c.by_server && c.code == Some(1000)),
        "{:?}",
        mock.closes()
    );
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    drop(container);
}

/// A container job launched from inside the agent container: the engine's socket is mounted
/// (with its group added, the agent being uid 10001), and a host directory is mounted at the
/// same path as the agent's `TMPDIR`, because the engine resolves the job workspace's bind
/// mount on the host, not in the agent's container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a container engine and the built image: scripts/image-test.sh"]
async fn a_container_job_runs_on_the_engine_whose_socket_is_mounted() {
    use std::os::unix::fs::MetadataExt;
    let image = required_env("KICI_TEST_AGENT_IMAGE");
    let docker_host = required_env("KICI_TEST_DOCKER_HOST");
    let socket = docker_host
        .strip_prefix("unix://")
        .expect("KICI_TEST_DOCKER_HOST is a unix socket");
    let socket_gid = std::fs::metadata(socket).unwrap().gid().to_string();
    let job_image = std::env::var("KICI_TEST_IMAGE").unwrap_or("kici-test/busybox:latest".into());

    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let mock_addr: SocketAddr = mock
        .ws_url()
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    let relay_port = relay_to(mock_addr, &bridge_gateway()).await;

    // Owned by the image's user, like the image's own work directory.
    let work = tempfile::Builder::new()
        .prefix("kici-image-work-")
        .tempdir()
        .unwrap();
    std::os::unix::fs::chown(work.path(), Some(10001), Some(10001)).unwrap();
    let work_path = work.path().to_str().unwrap().to_owned();

    let name = format!("kici-image-socket-test-{}", std::process::id());
    let url = format!("KICI_ORCHESTRATOR_URL=ws://host.docker.internal:{relay_port}/ws");
    let token = format!("KICI_AGENT_TOKEN={TEST_TOKEN}");
    let socket_mount = format!("{socket}:/var/run/docker.sock");
    let work_mount = format!("{work_path}:{work_path}");
    let tmpdir = format!("TMPDIR={work_path}");
    docker(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--add-host",
        "host.docker.internal:host-gateway",
        "--volume",
        &socket_mount,
        "--group-add",
        &socket_gid,
        "--volume",
        &work_mount,
        "--env",
        &tmpdir,
        "--env",
        &url,
        "--env",
        &token,
        "--env",
        "KICI_AGENT_ID=with-the-engine",
        &image,
    ]);
    let container = Container { name };
    assert!(
        mock.wait_for_message(
            "config.ack",
            |m| m["agentId"] == "with-the-engine",
            Duration::from_secs(30),
        )
        .await
        .is_some(),
        "the containerised agent did not register"
    );

    let steps = serde_json::json!([
        {"name": "inside", "run": "echo \"job container $(hostname) uid=$(id -u)\"; echo made > artifact.txt; pwd"},
        {"name": "sees", "run": "cat artifact.txt"},
    ]);
    let mut dispatch =
        kici_mock_orchestrator::sample_dispatch("run-socket", "job-socket", "", "main", "", steps);
    dispatch["jobConfig"]["container"] = serde_json::json!(job_image);
    mock.dispatch("with-the-engine", dispatch).await.unwrap();
    let done = mock
        .wait_for_message(
            "job.status",
            |m| m["jobId"] == "job-socket" && m["state"].as_str().is_some_and(|s| s != "running"),
            Duration::from_secs(60),
        )
        .await
        .expect("the container job ended");
    let lines = step_lines(&mock, "job-socket");
    assert_eq!(done["state"], "success", "{done} {lines:?}");
    // The step ran in a job container of the same engine (root in busybox), not in the agent's.
    let agent_hostname = docker(&["inspect", "-f", "{{.Config.Hostname}}", &container.name]);
    let inside = lines
        .iter()
        .find(|l| l.starts_with("job container "))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(inside.ends_with(" uid=0"), "{inside}");
    assert!(
        !inside.contains(&agent_hostname),
        "{inside} ran in the agent's container"
    );
    assert!(lines.iter().any(|l| l == "/workspace"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "made"), "{lines:?}");
    // The job container is gone, and the workspace went with the job.
    let left = docker(&[
        "ps",
        "--all",
        "--quiet",
        "--filter",
        "label=kici-job-id=job-socket",
    ]);
    assert!(left.is_empty(), "job containers left: {left}");
    let workspaces: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        workspaces.is_empty(),
        "left in the work dir: {workspaces:?}"
    );
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
    drop(container);
}
