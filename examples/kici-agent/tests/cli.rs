//! The standalone binary: configuration errors, local exec, and the agent against the strict
//! mock orchestrator with signals (loopback only).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use kici_mock_orchestrator::{MockConfig, MockOrchestrator, TEST_TOKEN};

const BIN: &str = env!("CARGO_BIN_EXE_kici-agent");

fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The binary with a clean environment: PATH and HOME, plus `vars`.
fn agent_command(vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command.env_clear();
    for key in ["PATH", "HOME"] {
        if let Ok(value) = std::env::var(key) {
            command.env(key, value);
        }
    }
    command.envs(vars.iter().copied());
    command
}

#[test]
fn an_unknown_kici_variable_refuses_start_with_a_hint() {
    let out = agent_command(&[
        ("KICI_ORCHESTRATOR_URL", "ws://127.0.0.1:9/ws"),
        ("KICI_PROT", "8081"),
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KICI_PROT") && stderr.contains("did you mean KICI_PORT"),
        "{stderr}"
    );
    assert!(stderr.contains("KICI_DEV=true"), "{stderr}");
}

#[test]
fn bad_configuration_exits_1_naming_the_variable() {
    let out = agent_command(&[
        ("KICI_ORCHESTRATOR_URL", "ws://127.0.0.1:9/ws"),
        ("KICI_PORT", "eighty"),
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KICI_PORT"));
    let out = agent_command(&[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KICI_ORCHESTRATOR_URL"));
}

#[test]
fn missing_git_exits_1() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .env_clear()
        .env("PATH", empty.path())
        .env("KICI_ORCHESTRATOR_URL", "ws://127.0.0.1:9/ws")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("required-tools") && stderr.contains("git"),
        "{stderr}"
    );
}

#[test]
fn exec_runs_the_sample_job_files() {
    let out = agent_command(&[])
        .arg("exec")
        .arg(examples_dir().join("jobs/hello.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("hello from kici-agent"), "{stdout}");
    assert!(
        stdout.contains("the token is ***") && !stdout.contains("tok-3f9a"),
        "{stdout}"
    );
    assert!(stdout.contains("BUILD_ID is 42"), "{stdout}");
    assert!(
        stdout.contains("== job success: 6/6 steps succeeded"),
        "{stdout}"
    );

    let out = agent_command(&[])
        .arg("exec")
        .arg(examples_dir().join("jobs/fails.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("step boom failed") && stdout.contains("exit code 3"),
        "{stdout}"
    );
    assert!(!stdout.contains("unreachable"), "{stdout}");

    let out = agent_command(&[])
        .args(["exec", "/nonexistent/job.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/job.json"));
}

/// A spawned agent, killed if a test fails before it exits.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the binary against `mock`; returns the child and its HTTP port (from its log).
fn spawn_agent(mock: &MockOrchestrator) -> (Spawned, u16, std::thread::JoinHandle<Vec<String>>) {
    spawn_agent_with(mock, &[])
}

fn spawn_agent_with(
    mock: &MockOrchestrator,
    extra: &[(&str, &str)],
) -> (Spawned, u16, std::thread::JoinHandle<Vec<String>>) {
    let url = mock.ws_url();
    let mut vars = vec![
        ("KICI_ORCHESTRATOR_URL", url.as_str()),
        ("KICI_AGENT_TOKEN", TEST_TOKEN),
        ("KICI_PORT", "0"),
        ("KICI_BIND_ADDRESS", "127.0.0.1"),
        ("KICI_LOG_FORMAT", "json"),
    ];
    vars.extend_from_slice(extra);
    let mut child = agent_command(&vars).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("agent log ended before it started")
            .unwrap();
        let record: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        if record["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Agent started on port"))
        {
            break record["port"].as_u64().unwrap() as u16;
        }
    };
    // Keep reading the log so the agent never blocks on a full pipe; keep it for asserts.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<String>>());
    (Spawned(child), port, drain)
}

fn get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        status,
        response.split_once("\r\n\r\n").unwrap().1.to_owned(),
    )
}

fn signal(child: &Spawned, signal: i32) {
    // SAFETY: kill with a pid we spawned.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, signal) }, 0);
}

fn wait_exit(child: &mut Spawned) -> Option<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status.code();
        }
        assert!(std::time::Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_registers_serves_endpoints_drains_on_usr1_and_stops_on_term() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (mut child, port, drain) = spawn_agent(&mock);
    // config.ack follows the agent's own switch to registered.
    assert!(mock
        .wait_for_message("config.ack", |_| true, Duration::from_secs(20))
        .await
        .is_some());
    let (status, body) = tokio::task::spawn_blocking(move || get(port, "/health"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["connected"], true);
    let (status, _) = tokio::task::spawn_blocking(move || get(port, "/ready"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (_, metrics) = tokio::task::spawn_blocking(move || get(port, "/metrics"))
        .await
        .unwrap();
    assert!(metrics.contains("kici_agent_connection_status 1"));
    signal(&child, libc::SIGUSR1);
    assert_eq!(
        tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
            .await
            .unwrap()
            .0,
        Some(0)
    );
    drain.join().unwrap();

    let (mut child, _, drain) = spawn_agent(&mock);
    assert!(
        mock.wait_until(|m| m.registrations().len() >= 2, Duration::from_secs(20))
            .await
    );
    signal(&child, libc::SIGTERM);
    assert_eq!(
        tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
            .await
            .unwrap()
            .0,
        Some(0)
    );
    drain.join().unwrap();
    let normal_close = mock
        .closes()
        .iter()
        .filter(|c| !c.by_server && c.code == Some(1000))
        .count();
    assert_eq!(normal_close, 2, "{:?}", mock.closes());
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
}

/// Peak RSS of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Stated bound: the agent's peak RSS stays under 64 MiB while a 100 MB log drains, because
/// producers wait once 8 MiB of log lines are queued (the step's pipe is not read meanwhile).
/// Rates are raised on both sides so the drain takes seconds rather than minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_memory_stays_bounded_while_a_100_mb_log_drains() {
    let mock = MockOrchestrator::start(MockConfig {
        rate_limits: kici_mock_orchestrator::RateLimits {
            msgs_per_sec: 10_000.0,
            msg_burst: 20_000.0,
            bytes_per_sec: 40_000_000.0,
            byte_burst: 8_000_000.0,
            ..Default::default()
        },
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let (child, _, drain) = spawn_agent_with(
        &mock,
        &[
            ("KICI_MAX_LOG_SIZE_BYTES", "268435456"),
            ("KICI_RATE_MSGS_PER_SEC", "5000"),
            ("KICI_RATE_MSG_BURST", "10000"),
            ("KICI_RATE_BYTES_PER_SEC", "25000000"),
            ("KICI_RATE_BYTE_BURST", "2000000"),
        ],
    );
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    let dispatch = kici_mock_orchestrator::sample_dispatch(
        "run-huge",
        "huge",
        "",
        "main",
        "",
        serde_json::json!([{"name": "huge", "run": "awk 'BEGIN { s = sprintf(\"%079d\", 0); for (i = 0; i < 1250000; i++) print s }'"}]),
    );
    mock.dispatch(&agent_id, dispatch).await.unwrap();
    let done = mock
        .wait_for_message(
            "job.status",
            |m| m["state"] == "success",
            Duration::from_secs(120),
        )
        .await;
    assert!(done.is_some(), "the 100 MB job did not finish");
    let peak = peak_rss(child.0.id());
    let lines: usize = mock
        .messages_of_type("log.chunk")
        .iter()
        .filter(|m| m["stepIndex"] == 0)
        .map(|m| m["lines"].as_array().unwrap().len())
        .sum();
    assert_eq!(lines, 1_250_000);
    eprintln!(
        "agent peak RSS while draining 100 MB: {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(peak < 64 * 1024 * 1024, "peak RSS {peak} bytes");
    assert_eq!(mock.rate_limit_warnings_sent(), 0);
    drop(child);
    drain.join().unwrap();
}

/// Shutdown waits for the log backlog within its grace; what it cannot deliver is counted in the
/// log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_the_backlog_within_its_grace_and_counts_what_it_could_not() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let spew = |lines: u32| serde_json::json!([{"name": "spew", "run": format!("seq 1 {lines} | awk '{{ printf \"%079d\\n\", $1 }}'")}]);
    // 3 MB: the first 1.5 MB go at once, the rest takes a few seconds at 450 KB/s.
    let (mut child, _, drain) = spawn_agent_with(
        &mock,
        &[
            ("KICI_SHUTDOWN_GRACE_MS", "20000"),
            ("KICI_AGENT_ID", "patient"),
        ],
    );
    mock.wait_for_message(
        "config.ack",
        |m| m["agentId"] == "patient",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let dispatch = kici_mock_orchestrator::sample_dispatch(
        "r-patient",
        "patient",
        "",
        "main",
        "",
        spew(37_500),
    );
    mock.dispatch("patient", dispatch).await.unwrap();
    mock.wait_for_message(
        "log.chunk",
        |m| m["jobId"] == "patient" && m["stepIndex"] == 0,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    signal(&child, libc::SIGTERM);
    assert_eq!(
        tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
            .await
            .unwrap()
            .0,
        Some(0)
    );
    drain.join().unwrap();
    let lines: usize = mock
        .messages_of_type("log.chunk")
        .iter()
        .filter(|m| m["jobId"] == "patient" && m["stepIndex"] == 0)
        .map(|m| m["lines"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        lines,
        37_500,
        "the backlog was not delivered before the exit (rate-limit drops {}, closes {:?})",
        mock.dropped_by_rate_limit(),
        mock.closes()
    );

    // 20 MB cannot drain in a 1 s grace: the agent exits anyway and says how much was lost.
    let (mut child, _, drain) = spawn_agent_with(
        &mock,
        &[
            ("KICI_SHUTDOWN_GRACE_MS", "1000"),
            ("KICI_AGENT_ID", "hasty"),
            ("KICI_MAX_LOG_SIZE_BYTES", "33554432"),
        ],
    );
    mock.wait_for_message(
        "config.ack",
        |m| m["agentId"] == "hasty",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let dispatch =
        kici_mock_orchestrator::sample_dispatch("r-hasty", "hasty", "", "main", "", spew(250_000));
    mock.dispatch("hasty", dispatch).await.unwrap();
    mock.wait_for_message(
        "log.chunk",
        |m| m["jobId"] == "hasty" && m["stepIndex"] == 0,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let asked = std::time::Instant::now();
    signal(&child, libc::SIGTERM);
    assert_eq!(
        tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
            .await
            .unwrap()
            .0,
        Some(0)
    );
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        asked.elapsed()
    );
    let log = drain.join().unwrap();
    let report = log
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("could not be delivered"))
        })
        .expect("the agent logs what it could not deliver");
    assert!(
        report["undelivered_lines"].as_u64().unwrap() > 0,
        "{report}"
    );
    let terminal = mock.messages_of_type("job.status");
    assert!(
        terminal
            .iter()
            .any(|m| m["jobId"] == "hasty" && m["state"] == "cancelled"),
        "{terminal:?}"
    );
}

/// The names of the files in `dir`, sorted.
fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Whether `name` is `<prefix>YYYY-MM-DD.log`.
fn is_day_file(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(".log"))
        .is_some_and(|date| {
            date.len() == 10
                && date.char_indices().all(|(i, c)| {
                    if i == 4 || i == 7 {
                        c == '-'
                    } else {
                        c.is_ascii_digit()
                    }
                })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kici_log_dir_gets_a_json_copy_of_the_log_named_by_the_suffix_rules() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    // (extra variables, expected file-name prefix)
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("KICI_AGENT_ID", "cli agent/1")], "agent-cli_agent_1-"),
        (
            &[
                ("KICI_AGENT_ID", "cli-agent"),
                ("KICI_CLUSTER_INSTANCE_ID", "pod:7"),
            ],
            "agent-pod_7-",
        ),
        // A generated agent id never names the file.
        (&[], "agent-"),
        (&[("KICI_CLUSTER_INSTANCE_ID", "undefined")], "agent-"),
    ];
    for (started, (extra, prefix)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = dir.path().join("logs");
        let mut vars = vec![("KICI_LOG_DIR", log_dir.to_str().unwrap())];
        vars.extend_from_slice(extra);
        let (mut child, _, drain) = spawn_agent_with(&mock, &vars);
        // Registered: the signal handlers are installed by then.
        assert!(
            mock.wait_until(
                |m| m.registrations().len() > started,
                Duration::from_secs(20)
            )
            .await
        );
        signal(&child, libc::SIGTERM);
        let code = tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
            .await
            .unwrap()
            .0;
        assert_eq!(code, Some(0));
        drain.join().unwrap();
        let names = file_names(&log_dir);
        assert!(
            names.len() == 1 && is_day_file(&names[0], prefix),
            "{prefix}: {names:?}"
        );
        let text = std::fs::read_to_string(log_dir.join(&names[0])).unwrap();
        let messages: Vec<String> = text
            .lines()
            .map(|line| {
                let record: serde_json::Value = serde_json::from_str(line).expect("JSON lines");
                record["message"].as_str().unwrap().to_owned()
            })
            .collect();
        assert!(
            messages.iter().any(|m| m == "Agent starting")
                && messages
                    .iter()
                    .any(|m| m.starts_with("Agent started on port"))
                && messages.iter().any(|m| m.starts_with("Received SIGTERM")),
            "{messages:?}"
        );
    }
}

#[test]
fn an_unusable_kici_log_dir_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let out = agent_command(&[
        ("KICI_ORCHESTRATOR_URL", "ws://127.0.0.1:9/ws"),
        ("KICI_LOG_DIR", not_a_dir.to_str().unwrap()),
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KICI_LOG_DIR"), "{stderr}");
}
