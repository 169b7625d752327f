//! End-to-end figures of the release binary against the strict mock orchestrator on loopback.
//! Run: `cargo bench -p kici-agent-cli --bench agent`. Prints figures; asserts nothing.
//!
//! - start -> registered (median of 20 starts), idle RSS 5 s after registering, RSS after 1,000
//!   heartbeat cycles (5 ms interval);
//! - dispatch -> first step process started (median of 20 jobs);
//! - agent CPU seconds to stream 200,000 lines of 80 bytes from one step, the time until the last
//!   line is accepted against the floor set by the byte budget (bytes / 500 KiB/s), peak RSS.
//!
//! The Node reference agent, measured on the same kind of machine (notes/node-agent-baseline):
//! 1.839 s to registered, 202.3 MiB idle RSS, 92 % of a 200,000-line log lost.
//!
//! `KICI_BENCH_BASELINE_BIN=/path/to/an/older/kici-agent` measures that binary in the same run,
//! interleaved with this build (starts alternate, both idle side by side, dispatches alternate), so
//! a regression shows against a baseline under the same machine load. The big-log figure is
//! measured for this build only.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kici_mock_orchestrator::{MockConfig, MockOrchestrator, TEST_TOKEN};

const BIN: &str = env!("CARGO_BIN_EXE_kici-agent");
const WAIT: Duration = Duration::from_secs(120);

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binaries measured: this build, then the baseline if one is given.
fn binaries() -> Vec<(&'static str, String)> {
    let mut binaries = vec![("this build", BIN.to_owned())];
    if let Some(baseline) = std::env::var_os("KICI_BENCH_BASELINE_BIN") {
        let baseline = baseline.to_string_lossy().into_owned();
        assert!(
            std::path::Path::new(&baseline).is_file(),
            "KICI_BENCH_BASELINE_BIN={baseline} is not a file"
        );
        binaries.push(("baseline", baseline));
    }
    binaries
}

fn spawn(mock: &MockOrchestrator, bin: &str, id: &str, extra: &[(&str, &str)]) -> Agent {
    let mut command = Command::new(bin);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .env("KICI_ORCHESTRATOR_URL", mock.ws_url())
        .env("KICI_AGENT_TOKEN", TEST_TOKEN)
        .env("KICI_AGENT_ID", id)
        .env("KICI_PORT", "0")
        .env("KICI_BIND_ADDRESS", "127.0.0.1")
        .env("KICI_LOG_LEVEL", "warn")
        .envs(extra.iter().copied())
        .stdout(Stdio::null());
    Agent(command.spawn().expect("spawn the agent"))
}

fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
        * 1024
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .unwrap_or("")
        .split(' ')
        .collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

async fn registered(mock: &MockOrchestrator, id: &str) {
    let id = id.to_owned();
    assert!(
        mock.wait_for_message("config.ack", move |m| m["agentId"] == id.as_str(), WAIT)
            .await
            .is_some(),
        "agent did not register"
    );
}

async fn startup(mock: &MockOrchestrator, binaries: &[(&'static str, String)]) {
    let mut times = vec![Vec::new(); binaries.len()];
    let mut to_first_frame = vec![Vec::new(); binaries.len()];
    // Alternate the binaries start by start, so both see the same machine load.
    for i in 0..20 {
        for (b, (_, bin)) in binaries.iter().enumerate() {
            let id = format!("start-{b}-{i}");
            let started = Instant::now();
            let agent = spawn(mock, bin, &id, &[]);
            registered(mock, &id).await;
            times[b].push(started.elapsed());
            // The agent's first frame on the wire: process start, runtime, config, connect.
            let first = mock
                .received()
                .into_iter()
                .filter(|r| r.at >= started)
                .map(|r| r.at)
                .min()
                .unwrap();
            to_first_frame[b].push(first - started);
            drop(agent);
        }
    }
    for (b, (label, _)) in binaries.iter().enumerate() {
        println!(
            "[{label}] start -> registered: median {:.1} ms (min {:.1}, max {:.1}; n=20; first frame on the wire after {:.1} ms)   [Node agent: 1839 ms]",
            median(times[b].clone()).as_secs_f64() * 1e3,
            times[b].iter().min().unwrap().as_secs_f64() * 1e3,
            times[b].iter().max().unwrap().as_secs_f64() * 1e3,
            median(to_first_frame[b].clone()).as_secs_f64() * 1e3
        );
    }

    // Side by side: both idle through the same 5 s.
    let mut idle = Vec::new();
    for (b, (_, bin)) in binaries.iter().enumerate() {
        let id = format!("idle-{b}");
        idle.push(spawn(mock, bin, &id, &[]));
        registered(mock, &id).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    for ((label, _), agent) in binaries.iter().zip(&idle) {
        println!(
            "[{label}] idle RSS 5 s after registering: {:.1} MiB   [Node agent: 202.3 MiB]",
            mib(status_field(agent.0.id(), "VmRSS:"))
        );
    }
    drop(idle);

    for (b, (label, bin)) in binaries.iter().enumerate() {
        let id = format!("beats-{b}");
        let agent = spawn(mock, bin, &id, &[("KICI_HEARTBEAT_INTERVAL_MS", "5")]);
        registered(mock, &id).await;
        // One agent at a time (the others are stopped), so every heartbeat is this one's.
        let beats = |m: &MockOrchestrator| m.messages_of_type("heartbeat").len();
        let before = beats(mock);
        let pid = agent.0.id();
        assert!(mock.wait_until(|m| beats(m) >= before + 1000, WAIT).await);
        println!(
            "[{label}] RSS after 1,000 heartbeat cycles (5 ms): {:.1} MiB (peak {:.1} MiB)",
            mib(status_field(pid, "VmRSS:")),
            mib(status_field(pid, "VmHWM:"))
        );
    }
}

async fn dispatch_latency(mock: &MockOrchestrator, binaries: &[(&'static str, String)]) {
    let mut agents = Vec::new();
    for (b, (_, bin)) in binaries.iter().enumerate() {
        let id = format!("latency-{b}");
        agents.push(spawn(mock, bin, &id, &[]));
        registered(mock, &id).await;
    }
    let mut times = vec![Vec::new(); binaries.len()];
    // Alternate the agents job by job.
    for i in 0..20 {
        for (b, times) in times.iter_mut().enumerate() {
            let job = format!("lat-{b}-{i}");
            // The step's first act is to print the wall clock in ns.
            let steps = serde_json::json!([{"name": "t", "run": "date +%s%N"}]);
            let dispatch = kici_mock_orchestrator::sample_dispatch(
                &format!("r-{job}"),
                &job,
                "",
                "main",
                "",
                steps,
            );
            let sent = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            mock.dispatch(&format!("latency-{b}"), dispatch)
                .await
                .unwrap();
            let job_id = job.clone();
            let chunk = mock
                .wait_for_message(
                    "log.chunk",
                    move |m| m["jobId"] == job_id.as_str() && m["stepIndex"] == 0,
                    WAIT,
                )
                .await
                .unwrap();
            let started_ns: u128 = chunk["lines"][0].as_str().unwrap().parse().unwrap();
            times.push(Duration::from_nanos((started_ns - sent.as_nanos()) as u64));
            let job_id = job.clone();
            mock.wait_for_message(
                "job.status",
                move |m| m["jobId"] == job_id.as_str() && m["state"] == "success",
                WAIT,
            )
            .await
            .expect("job finished");
        }
    }
    for (b, (label, _)) in binaries.iter().enumerate() {
        println!(
            "[{label}] dispatch -> first step process running: median {:.2} ms (min {:.2}; n=20; includes bash start-up and `date`)",
            median(times[b].clone()).as_secs_f64() * 1e3,
            times[b].iter().min().unwrap().as_secs_f64() * 1e3
        );
    }
    drop(agents);
}

async fn big_log(mock: &MockOrchestrator) {
    let agent = spawn(
        mock,
        BIN,
        "spew",
        &[("KICI_MAX_LOG_SIZE_BYTES", "33554432")],
    );
    registered(mock, "spew").await;
    let pid = agent.0.id();
    let cpu_before = cpu_seconds(pid);
    let pad = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd";
    let steps = serde_json::json!([{"name": "spew", "run": format!("seq 1 200000 | awk '{{ printf \"spew %07d {pad}\\n\", $1 }}'")}]);
    let dispatch = kici_mock_orchestrator::sample_dispatch("r-spew", "spew", "", "main", "", steps);
    let started = Instant::now();
    mock.dispatch("spew", dispatch).await.unwrap();
    let done = mock
        .wait_for_message(
            "job.status",
            |m| m["jobId"] == "spew" && m["state"] == "success",
            Duration::from_secs(300),
        )
        .await;
    assert!(done.is_some(), "the 200,000-line job did not succeed");
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(pid) - cpu_before;
    let received = mock.received();
    let chunks: Vec<_> = received
        .iter()
        .filter(|r| {
            r.msg["type"] == "log.chunk" && r.msg["jobId"] == "spew" && r.msg["stepIndex"] == 0
        })
        .collect();
    let lines: usize = chunks
        .iter()
        .map(|r| r.msg["lines"].as_array().unwrap().len())
        .sum();
    let bytes: usize = received
        .iter()
        .filter(|r| r.msg["jobId"] == "spew")
        .map(|r| r.text_len)
        .sum();
    let first = chunks.first().unwrap().at;
    let last = chunks.last().unwrap().at;
    let floor = bytes as f64 / 512_000.0;
    println!(
        "200,000 lines x 80 bytes: {lines} lines in {} chunks, {:.1} MB sent, dispatch -> success {:.1} s, warnings {}",
        chunks.len(),
        bytes as f64 / 1e6,
        elapsed.as_secs_f64(),
        mock.rate_limit_warnings_sent()
    );
    println!(
        "  first -> last line accepted {:.1} s; floor (bytes / 500 KiB/s) {:.1} s; ratio {:.3}",
        (last - first).as_secs_f64(),
        floor,
        (last - first).as_secs_f64() / floor
    );
    println!(
        "  agent CPU for the job: {cpu:.2} s; agent peak RSS {:.1} MiB   [Node agent: 8 % of the lines stored]",
        mib(status_field(pid, "VmHWM:"))
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // The mock simulates the orchestrator's token lookup (20 ms by default): not the
        // agent's time, so it is off here.
        let config = MockConfig {
            auth_check_delay: Duration::ZERO,
            ..MockConfig::default()
        };
        let mock = MockOrchestrator::start(config).await.unwrap();
        let binaries = binaries();
        startup(&mock, &binaries).await;
        dispatch_latency(&mock, &binaries).await;
        big_log(&mock).await;
    });
}
