//! Helpers shared by the binary's test files: the binary with a clean environment, an agent
//! started against a mock orchestrator, HTTP GETs, signals, exits, peak RSS.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use kici_mock_orchestrator::{MockOrchestrator, TEST_TOKEN};

pub const BIN: &str = env!("CARGO_BIN_EXE_kici-agent");

pub fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The binary with a clean environment: PATH and HOME, plus `vars`.
pub fn agent_command(vars: &[(&str, &str)]) -> Command {
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

/// A spawned agent, killed if a test fails before it exits.
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the binary against `mock`; returns the child and its HTTP port (from its log).
pub fn spawn_agent(
    mock: &MockOrchestrator,
) -> (Spawned, u16, std::thread::JoinHandle<Vec<String>>) {
    spawn_agent_with(mock, &[])
}

pub fn spawn_agent_with(
    mock: &MockOrchestrator,
    extra: &[(&str, &str)],
) -> (Spawned, u16, std::thread::JoinHandle<Vec<String>>) {
    spawn_agent_at(&mock.ws_url(), extra)
}

/// Starts the binary against the orchestrator at `url` (a mock, or a proxy in front of one).
pub fn spawn_agent_at(
    url: &str,
    extra: &[(&str, &str)],
) -> (Spawned, u16, std::thread::JoinHandle<Vec<String>>) {
    let mut vars = vec![
        ("KICI_ORCHESTRATOR_URL", url),
        ("KICI_AGENT_TOKEN", TEST_TOKEN),
        ("KICI_PORT", "0"),
        ("KICI_BIND_ADDRESS", "127.0.0.1"),
        ("KICI_LOG_FORMAT", "json"),
    ];
    vars.extend_from_slice(extra);
    let mut child = agent_command(&vars).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut start_log = Vec::new();
    let port = loop {
        let line = lines
            .next()
            .expect("agent log ended before it started")
            .unwrap();
        let record: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        start_log.push(line);
        if record["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Agent started on port"))
        {
            break record["port"].as_u64().unwrap() as u16;
        }
    };
    // Keep reading the log so the agent never blocks on a full pipe; keep it all for asserts.
    let drain = std::thread::spawn(move || {
        start_log.extend(lines.map_while(Result::ok));
        start_log
    });
    (Spawned(child), port, drain)
}

pub fn get(port: u16, path: &str) -> (u16, String) {
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

pub fn signal(child: &Spawned, signal: i32) {
    // SAFETY: kill with a pid we spawned.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, signal) }, 0);
}

pub fn wait_exit(child: &mut Spawned) -> Option<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status.code();
        }
        assert!(std::time::Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Peak RSS of a process (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}
