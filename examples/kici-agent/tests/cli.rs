//! The standalone binary: configuration errors, local exec, and the agent against the strict
//! mock orchestrator with signals (loopback only).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use kici_mock_orchestrator::{MockConfig, MockOrchestrator, MockTls, TEST_TOKEN};

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

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn exec_lists_and_runs_jobs_of_a_typescript_workflow_in_the_working_copy() {
    // A working copy like a user's: workflows, the stand-in SDK and zx under .kici.
    let fixtures = examples_dir().join("../tests/fixtures");
    let zx = fixtures.join("typescript/node_modules/zx");
    assert!(
        zx.exists(),
        "run `npm ci --prefix tests/fixtures/typescript` (scripts/test.sh does)"
    );
    let copy = tempfile::tempdir().unwrap();
    let root = copy.path();
    copy_tree(&fixtures.join("typescript/repo"), root);
    std::fs::copy(
        fixtures.join("real-orchestrator/fails.ts"),
        root.join(".kici/workflows/fails.ts"),
    )
    .unwrap();
    copy_tree(
        &fixtures.join("typescript/sdk"),
        &root.join(".kici/node_modules/@kici-dev/sdk"),
    );
    copy_tree(&zx, &root.join(".kici/node_modules/zx"));
    let workflow = root.join(".kici/workflows/features.ts");

    let out = agent_command(&[])
        .arg("exec")
        .arg(&workflow)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("workflow features\n  outputs\n  fails\n"),
        "{stdout}"
    );

    let out = agent_command(&[])
        .arg("exec")
        .arg(&workflow)
        .args(["--job", "outputs"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("   | version 1.2.3\n   | env hello from KICI_ENV\n   | tool ran\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("== job success: 3/3 steps succeeded"),
        "{stdout}"
    );
    // In place: the step's files are in the working copy.
    assert!(root.join("tools/mytool").exists());
    assert!(!stdout.contains("does not match"), "{stdout}");

    // Job init commands and `.result` references work the same way locally.
    let out = agent_command(&[])
        .arg("exec")
        .arg(&workflow)
        .args(["--job", "init"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    for expected in [
        "-- step init:0 [1000000]\n   | init zero sees hello\n",
        "   | init one sees FROM_INIT=yes GREETING=unset\n",
        "   | step sees FROM_INIT=yes\n   | inittool ran\n",
        "== job success: 1/1 steps succeeded",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in {stdout}");
    }
    let out = agent_command(&[])
        .arg("exec")
        .arg(&workflow)
        .args(["--job", "result-ref"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("   | artifact app-1.2.3.tgz\n"), "{stdout}");

    let out = agent_command(&[])
        .current_dir(root)
        .args(["exec", ".kici/workflows/fails.ts", "--job", "fails"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("step boom failed") && stdout.contains("exit code 3"),
        "{stdout}"
    );

    let out = agent_command(&[])
        .arg("exec")
        .arg(&workflow)
        .args(["--job", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no job named 'nope'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

// --- Containment: nothing a job starts outlives it -------------------------------------------

/// A step script that detaches processes every way a step can, writes their pids into `dir`
/// and returns once all are running: `setsid nohup`, a double fork, a `setsid` process that
/// ignores SIGTERM and SIGHUP, and plain `nohup`.
fn detaching_script(dir: &std::path::Path) -> String {
    let d = dir.display();
    format!(
        r#"setsid nohup sleep 4000 >/dev/null 2>&1 & echo $! > {d}/setsid
( (sleep 4001 >/dev/null 2>&1 & echo $! > {d}/double) & )
setsid bash -c 'trap "" TERM HUP; echo $$ > {d}/ignores; exec sleep 4002' >/dev/null 2>&1 &
nohup sleep 4003 >/dev/null 2>&1 & echo $! > {d}/nohup
for f in setsid double ignores nohup; do while [ ! -s {d}/$f ]; do sleep 0.01; done; done"#
    )
}

/// Waits (bounded) until the detaching script has written every pid, and returns them.
async fn detached_pids(dir: &std::path::Path) -> Vec<i32> {
    let read = || -> Option<Vec<i32>> {
        ["setsid", "double", "ignores", "nohup"]
            .iter()
            .map(|name| {
                std::fs::read_to_string(dir.join(name))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pids) = read() {
            return pids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the step did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Gone, or a zombie (dead, waiting for whoever its parent is now to reap it).
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits (bounded) until every pid is gone; the kill is asynchronous for processes that are
/// not the agent's children.
async fn assert_all_gone(pids: &[i32]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|&pid| is_gone(pid)) {
        if std::time::Instant::now() > deadline {
            let alive: Vec<_> = pids.iter().filter(|&&p| !is_gone(p)).collect();
            // Leave nothing behind even when failing.
            for &&pid in &alive {
                // SAFETY: kill of a pid this test's job started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            panic!("still running after the job ended: {alive:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn job_status_is(message: &serde_json::Value, job_id: &str, state: &str) -> bool {
    message["jobId"] == job_id && message["state"] == state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_job_detaches_survives_its_successful_end() {
    let pids_dir = tempfile::tempdir().unwrap();
    let job_file = pids_dir.path().join("job.json");
    let job = serde_json::json!({
        "name": "detach",
        "steps": [{"name": "detach", "run": detaching_script(pids_dir.path())}],
    });
    std::fs::write(&job_file, job.to_string()).unwrap();
    let out = agent_command(&[])
        .arg("exec")
        .arg(&job_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    // At least the two `setsid` ones; the other two stayed in the step's process group, which
    // is SIGKILLed when the step ends, and may or may not have exited by the job's end.
    let killed: u32 = stdout
        .split("[kici] Killed ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no leftover-kill line: {stdout}"));
    assert!((2..=4).contains(&killed), "{stdout}");
    assert_all_gone(&detached_pids(pids_dir.path()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_job_detaches_survives_cancel_or_shutdown() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (mut child, _, drain) = spawn_agent(&mock);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();

    for (job_id, stop) in [("cancelled-job", "cancel"), ("shutdown-job", "shutdown")] {
        let pids_dir = tempfile::tempdir().unwrap();
        let script = format!("{}\nsleep 600", detaching_script(pids_dir.path()));
        let dispatch = kici_mock_orchestrator::sample_dispatch(
            "run-contain",
            job_id,
            "",
            "main",
            "",
            serde_json::json!([{"name": "detach", "run": script}]),
        );
        mock.dispatch(&agent_id, dispatch).await.unwrap();
        let pids = detached_pids(pids_dir.path()).await;
        if stop == "cancel" {
            mock.cancel(&agent_id, "run-contain", job_id, false)
                .await
                .unwrap();
            assert!(mock
                .wait_for_message(
                    "job.status",
                    |m| job_status_is(m, job_id, "cancelled"),
                    Duration::from_secs(20)
                )
                .await
                .is_some());
        } else {
            signal(&child, libc::SIGTERM);
            child = tokio::task::spawn_blocking(move || {
                assert_eq!(wait_exit(&mut child), Some(0));
                child
            })
            .await
            .unwrap();
        }
        assert_all_gone(&pids).await;
    }
    drop(child);
    drain.join().unwrap();
}

/// The instance string (`<pid>-<start ticks>-<pid namespace>`) of this test process: a live
/// owner.
fn own_instance() -> String {
    use std::os::unix::fs::MetadataExt;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let ticks = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(19)
        .unwrap()
        .to_owned();
    let namespace = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
    format!("{}-{ticks}-{namespace}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_next_agent_removes_what_the_dead_one_left_and_nothing_else() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let tmp_path = tmp.path().display().to_string();
    // A live agent's workspace (this test process stands in as its owner): never touched.
    let live = tmp.path().join("kici-live01");
    std::fs::create_dir(&live).unwrap();
    std::fs::write(tmp.path().join("kici-live01.owner"), own_instance()).unwrap();

    let (mut child, _, drain) = spawn_agent_with(&mock, &[("TMPDIR", tmp_path.as_str())]);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    let pids_dir = tempfile::tempdir().unwrap();
    let script = format!("{}\nsleep 600", detaching_script(pids_dir.path()));
    let dispatch = kici_mock_orchestrator::sample_dispatch(
        "run-crash",
        "crash-job",
        "",
        "main",
        "",
        serde_json::json!([{"name": "detach", "run": script}]),
    );
    mock.dispatch(&agent_id, dispatch).await.unwrap();
    let pids = detached_pids(pids_dir.path()).await;
    signal(&child, libc::SIGKILL);
    let _ = child.0.wait();
    drain.join().unwrap();
    let ours = |dir: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("kici-") && !n.ends_with(".owner"))
            .collect();
        names.sort();
        names
    };
    let left = ours(tmp.path());
    assert!(
        left.len() >= 2,
        "a workspace and a kici-env dir stay after the crash: {left:?}"
    );
    assert!(
        pids.iter().all(|&pid| !is_gone(pid)),
        "the crash leaves the job's processes running"
    );

    let (child, _, drain) = spawn_agent_with(&mock, &[("TMPDIR", tmp_path.as_str())]);
    assert_all_gone(&pids).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ours(tmp.path()) != ["kici-live01"] {
        assert!(
            std::time::Instant::now() < deadline,
            "left: {:?}",
            ours(tmp.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tmp.path().join("kici-live01.owner").exists());
    drop(child);
    drain.join().unwrap();
}

/// Needs a pids cgroup the agent can create (root here and in CI: v1 `pids` or v2); fails
/// loudly, never skips, when there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_stops_at_the_jobs_pids_limit() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (child, _, drain) = spawn_agent_with(&mock, &[("KICI_JOB_PIDS_MAX", "20")]);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    let count = tempfile::tempdir().unwrap();
    let count_file = count.path().join("count");
    let script = format!(
        "sh -c 'n=0; while [ $n -lt 200 ]; do sleep 60 & n=$((n+1)); echo $n > {}; done'",
        count_file.display()
    );
    let dispatch = kici_mock_orchestrator::sample_dispatch(
        "run-bomb",
        "bomb-job",
        "",
        "main",
        "",
        serde_json::json!([{"name": "bomb", "run": script}]),
    );
    mock.dispatch(&agent_id, dispatch).await.unwrap();
    let status = mock
        .wait_for_message(
            "job.status",
            |m| m["jobId"] == "bomb-job" && (m["state"] == "failed" || m["state"] == "success"),
            Duration::from_secs(30),
        )
        .await
        .expect("the job ended");
    let started: u32 = std::fs::read_to_string(&count_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        status["state"], "failed",
        "the fork bomb must hit the limit"
    );
    assert!(
        started < 20,
        "{started} processes started under a limit of 20"
    );
    drop(child);
    drain.join().unwrap();
}

// --- The bubblewrap sandbox (KICI_SANDBOX=true) ----------------------------------------------

/// What a sandboxed step can see and do, one `probe:answer` line each.
fn sandbox_probe_script(outside: &std::path::Path, port: u16) -> String {
    format!(
        r#"test -e {outside} && echo "outside:visible" || echo "outside:hidden"
test -e {repo}/Cargo.toml && echo "repo:visible" || echo "repo:hidden"
touch /usr/kici-sandbox-probe 2>/dev/null && echo "usr:writable" || echo "usr:read-only"
(echo hi > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo "host-port:reached" || echo "host-port:unreachable"
echo "pid1:$(cat /proc/1/comm)"
echo "cwd:$PWD"
echo "workspace-var:$KICI_WORKSPACE"
echo SANDBOXED=yes >> "$KICI_ENV""#,
        outside = outside.display(),
        repo = examples_dir().display(),
    )
}

/// The step's log lines of job `job_id`, in order.
fn log_lines(mock: &MockOrchestrator, job_id: &str) -> Vec<String> {
    mock.messages_of_type("log.chunk")
        .iter()
        .filter(|m| m["jobId"] == job_id && m["stepIndex"] == 0)
        .flat_map(|m| m["lines"].as_array().cloned().unwrap_or_default())
        .filter_map(|line| line.as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxed_steps_see_only_the_workspace_and_the_network_the_setting_allows() {
    let outside = tempfile::tempdir().unwrap();
    let outside_file = outside.path().join("agent-secret.txt");
    std::fs::write(&outside_file, "not for steps").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || for _ in listener.incoming() {});

    for network in ["isolated", "host"] {
        let mock = MockOrchestrator::start(MockConfig::default())
            .await
            .unwrap();
        let (child, _, drain) = spawn_agent_with(
            &mock,
            &[("KICI_SANDBOX", "true"), ("KICI_SANDBOX_NETWORK", network)],
        );
        let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
        let job_id = format!("sandbox-{network}");
        let dispatch = kici_mock_orchestrator::sample_dispatch(
            "run-sandbox",
            &job_id,
            "",
            "main",
            "",
            serde_json::json!([
                {"name": "probe", "run": sandbox_probe_script(&outside_file, port)},
                {"name": "handoff", "run": "echo \"handoff:$SANDBOXED\""},
            ]),
        );
        mock.dispatch(&agent_id, dispatch).await.unwrap();
        let status = mock
            .wait_for_message(
                "job.status",
                |m| m["jobId"] == job_id && m["state"] != "running",
                Duration::from_secs(30),
            )
            .await
            .expect("the job ended");
        let lines = log_lines(&mock, &job_id);
        assert_eq!(status["state"], "success", "{lines:?}");
        let expected_port = if network == "isolated" {
            "host-port:unreachable"
        } else {
            "host-port:reached"
        };
        for expected in [
            "outside:hidden",
            "repo:hidden",
            "usr:read-only",
            expected_port,
            "pid1:bwrap",
            "cwd:/workspace",
            "workspace-var:/workspace",
        ] {
            assert!(
                lines.iter().any(|l| l == expected),
                "{expected} in {lines:?}"
            );
        }
        let handoff: Vec<String> = mock
            .messages_of_type("log.chunk")
            .iter()
            .filter(|m| m["jobId"] == job_id && m["stepIndex"] == 1)
            .flat_map(|m| m["lines"].as_array().cloned().unwrap_or_default())
            .filter_map(|l| l.as_str().map(str::to_owned))
            .collect();
        assert_eq!(handoff, ["handoff:yes"], "$KICI_ENV reaches the next step");
        drop(child);
        drain.join().unwrap();
    }
}

/// Processes whose command line is exactly `sleep <seconds>`.
fn sleeps_of(seconds: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c == format!("sleep\0{seconds}\0").as_bytes())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_everything_inside_the_sandbox() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (child, _, drain) = spawn_agent_with(&mock, &[("KICI_SANDBOX", "true")]);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    let seconds = format!("{}", 4000 + std::process::id() % 1000);
    let script = format!("setsid sleep {seconds} & sleep {seconds} & echo started; wait");
    let dispatch = kici_mock_orchestrator::sample_dispatch(
        "run-sandbox",
        "sandbox-cancel",
        "",
        "main",
        "",
        serde_json::json!([{"name": "sleepers", "run": script}]),
    );
    mock.dispatch(&agent_id, dispatch).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sleeps_of(&seconds).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sleepers did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mock.cancel(&agent_id, "run-sandbox", "sandbox-cancel", false)
        .await
        .unwrap();
    assert!(mock
        .wait_for_message(
            "job.status",
            |m| job_status_is(m, "sandbox-cancel", "cancelled"),
            Duration::from_secs(20)
        )
        .await
        .is_some());
    assert_all_gone(&sleeps_of(&seconds)).await;
    assert!(sleeps_of(&seconds).is_empty());
    drop(child);
    drain.join().unwrap();
}

#[test]
fn a_sandbox_without_bwrap_refuses_to_start() {
    let bin = tempfile::tempdir().unwrap();
    for tool in ["git", "bash"] {
        let path = String::from_utf8(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        std::os::unix::fs::symlink(path.trim(), bin.path().join(tool)).unwrap();
    }
    let out = Command::new(BIN)
        .env_clear()
        .env("PATH", bin.path())
        .env("KICI_ORCHESTRATOR_URL", "ws://127.0.0.1:9/ws")
        .env("KICI_SANDBOX", "true")
        .env("KICI_PORT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KICI_SANDBOX=true needs bubblewrap")
            && stderr.contains("apt-get install bubblewrap"),
        "{stderr}"
    );
}

/// A git repository with the TypeScript fixture workflows and `.kici/node_modules` (the
/// stand-in SDK and zx): `(dir, file:// URL, branch, sha)`.
fn typescript_repo() -> (tempfile::TempDir, String, String, String) {
    let fixtures = examples_dir().join("../tests/fixtures");
    let zx = fixtures.join("typescript/node_modules/zx");
    assert!(
        zx.exists(),
        "run `npm ci --prefix tests/fixtures/typescript` (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_tree(&fixtures.join("typescript/repo"), root);
    copy_tree(
        &fixtures.join("typescript/sdk"),
        &root.join(".kici/node_modules/@kici-dev/sdk"),
    );
    copy_tree(&zx, &root.join(".kici/node_modules/zx"));
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=test",
                "-c",
                "user.email=test@example.invalid",
            ])
            .args(args)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "-A", "-f"]);
    git(&["commit", "-q", "-m", "workflows"]);
    let sha = git(&["rev-parse", "HEAD"]);
    let url = format!("file://{}", root.display());
    (dir, url, "main".into(), sha)
}

/// A dispatch of job `job` of the fixture workflow `features`, with `job_env` for its steps.
fn typescript_dispatch(
    repo: &(tempfile::TempDir, String, String, String),
    job_id: &str,
    job: &str,
    step: &str,
    job_env: serde_json::Value,
) -> serde_json::Value {
    let mut d = kici_mock_orchestrator::sample_dispatch(
        "run-sandbox-ts",
        job_id,
        &repo.1,
        &repo.2,
        &repo.3,
        serde_json::json!([{"name": step, "hasOutputs": false}]),
    );
    let config = &mut d["jobConfig"];
    config["source"] =
        serde_json::json!({"file": ".kici/workflows/features.ts", "export": "#default"});
    config["workflowName"] = serde_json::json!("features");
    config["name"] = serde_json::json!(job);
    config["baseJobName"] = serde_json::json!(job);
    config["jobEnv"] = job_env;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_jobs_run_inside_the_sandbox() {
    let repo = typescript_repo();
    let outside = tempfile::tempdir().unwrap();
    let outside_file = outside.path().join("agent-secret.txt");
    std::fs::write(&outside_file, "not for steps").unwrap();
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (child, _, drain) = spawn_agent_with(&mock, &[("KICI_SANDBOX", "true")]);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    let dispatch = typescript_dispatch(
        &repo,
        "ts-sandbox",
        "sandbox-probe",
        "probe",
        serde_json::json!({"PROBE_OUTSIDE": outside_file.display().to_string()}),
    );
    mock.dispatch(&agent_id, dispatch).await.unwrap();
    let status = mock
        .wait_for_message(
            "job.status",
            |m| m["jobId"] == "ts-sandbox" && m["state"] != "running",
            Duration::from_secs(60),
        )
        .await
        .expect("the job ended");
    let lines = log_lines(&mock, "ts-sandbox");
    assert_eq!(status["state"], "success", "{status} {lines:?}");
    assert_eq!(
        lines,
        [
            "outside:hidden",
            "usr:read-only",
            "pid1:bwrap",
            "workspace-var:/workspace"
        ]
    );
    drop(child);
    drain.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_cancel_of_a_sandboxed_typescript_job_runs_its_hook_and_kills_everything() {
    let repo = typescript_repo();
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (child, _, drain) = spawn_agent_with(&mock, &[("KICI_SANDBOX", "true")]);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    let seconds = format!("{}", 5000 + std::process::id() % 1000);
    let dispatch = typescript_dispatch(
        &repo,
        "ts-sandbox-cancel",
        "sandbox-cancel",
        "sleeps",
        serde_json::json!({"SLEEP_SECONDS": seconds}),
    );
    mock.dispatch(&agent_id, dispatch).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sleeps_of(&seconds).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the sleep did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sleeping = sleeps_of(&seconds);
    mock.cancel(&agent_id, "run-sandbox-ts", "ts-sandbox-cancel", false)
        .await
        .unwrap();
    assert!(mock
        .wait_for_message(
            "job.status",
            |m| job_status_is(m, "ts-sandbox-cancel", "cancelled"),
            Duration::from_secs(30)
        )
        .await
        .is_some());
    assert_all_gone(&sleeping).await;
    let hook_lines: Vec<String> = mock
        .messages_of_type("log.chunk")
        .iter()
        .filter(|m| m["jobId"] == "ts-sandbox-cancel" && m["stepIndex"] != -1)
        .flat_map(|m| m["lines"].as_array().cloned().unwrap_or_default())
        .filter_map(|l| l.as_str().map(str::to_owned))
        .collect();
    assert!(
        hook_lines.contains(&"job onCancel hook".to_owned()),
        "the graceful path ran the hook inside the sandbox: {hook_lines:?}"
    );
    drop(child);
    drain.join().unwrap();
}

/// Polls `/health` until the agent says it is draining (SIGUSR1 is handled asynchronously).
fn wait_draining(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(port, "/health");
        assert_eq!(status, 200, "/health must stay 200 while draining: {body}");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        if health["draining"] == true {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never draining: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_while_draining_a_running_job_and_health_stays_200() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("go");
    let (mut child, port, drain) = spawn_agent_with(&mock, &[("KICI_AGENT_ID", "drainer")]);
    mock.wait_for_message(
        "config.ack",
        |m| m["agentId"] == "drainer",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let wait_gate = format!(
        "echo waiting; while [ ! -f {} ]; do sleep 0.02; done",
        gate.display()
    );
    let dispatch = kici_mock_orchestrator::sample_dispatch(
        "r-drainer",
        "drainer-job",
        "",
        "main",
        "",
        serde_json::json!([{"name": "wait", "run": wait_gate}]),
    );
    mock.dispatch("drainer", dispatch).await.unwrap();
    mock.wait_for_message(
        "log.chunk",
        |m| m["jobId"] == "drainer-job" && m["stepIndex"] == 0,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let (status, _) = tokio::task::spawn_blocking(move || get(port, "/ready"))
        .await
        .unwrap();
    assert_eq!(status, 200, "registered and running a job: ready");

    signal(&child, libc::SIGUSR1);
    tokio::task::spawn_blocking(move || wait_draining(port))
        .await
        .unwrap();
    let (status, body) = tokio::task::spawn_blocking(move || get(port, "/ready"))
        .await
        .unwrap();
    assert_eq!(status, 503, "draining: not ready for new jobs: {body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "not ready");
    assert_eq!(ready["checks"]["draining"], true);
    assert_eq!(ready["checks"]["connected"], true);

    // The running job still finishes, then the drained agent exits 0.
    std::fs::write(&gate, "").unwrap();
    let terminal = mock
        .wait_for_message(
            "job.status",
            |m| m["jobId"] == "drainer-job" && m["state"] == "success",
            Duration::from_secs(20),
        )
        .await;
    assert!(terminal.is_some(), "the running job did not finish");
    assert_eq!(
        tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
            .await
            .unwrap()
            .0,
        Some(0)
    );
    drain.join().unwrap();
    assert!(mock.violations().is_empty(), "{:?}", mock.violations());
}

/// A private CA reaches the binary the ways operators set it: the OpenSSL convention
/// (`SSL_CERT_FILE`, which replaces the system store), Node's `NODE_EXTRA_CA_CERTS` and the
/// agent's own `KICI_TLS_CA_FILE` (both added to it). Each run has its own environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_trusts_a_private_ca_from_each_environment_variable() {
    for variable in ["SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "KICI_TLS_CA_FILE"] {
        let tls = MockTls::generate().unwrap();
        let ca = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca.path(), tls.ca_pem()).unwrap();
        let mock = MockOrchestrator::start(MockConfig {
            tls: Some(tls),
            ..MockConfig::default()
        })
        .await
        .unwrap();
        let ca_path = ca.path().to_str().unwrap();
        let (child, _, drain) = spawn_agent_with(&mock, &[(variable, ca_path)]);
        assert!(
            mock.wait_for_agent(Duration::from_secs(20)).await.is_some(),
            "{variable}: no registration over wss://; TLS failures: {:?}",
            mock.tls_failures()
        );
        signal(&child, libc::SIGTERM);
        let mut child = child;
        assert_eq!(
            tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
                .await
                .unwrap()
                .0,
            Some(0)
        );
        drain.join().unwrap();
        mock.shutdown().await;
    }
}

/// Like Node, an unreadable `NODE_EXTRA_CA_CERTS` is a warning, not a reason to refuse starting;
/// the orchestrator's certificate is then untrusted and the reconnect log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_node_extra_ca_certs_warns_and_the_handshake_failure_is_logged() {
    let tls = MockTls::generate().unwrap();
    let mock = MockOrchestrator::start(MockConfig {
        tls: Some(tls),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let (child, _, drain) =
        spawn_agent_with(&mock, &[("NODE_EXTRA_CA_CERTS", "/nonexistent/ca.pem")]);
    assert!(
        mock.wait_until(|m| !m.tls_failures().is_empty(), Duration::from_secs(20))
            .await
    );
    signal(&child, libc::SIGTERM);
    let mut child = child;
    assert_eq!(
        tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
            .await
            .unwrap()
            .0,
        Some(0)
    );
    let log = drain.join().unwrap().join("\n");
    assert!(
        log.contains("NODE_EXTRA_CA_CERTS: ignoring the extra CA certificates: cannot read /nonexistent/ca.pem"),
        "{log}"
    );
    assert!(
        log.contains("failed: invalid peer certificate: UnknownIssuer"),
        "{log}"
    );
    assert!(!log.contains(TEST_TOKEN), "token leaked into the log");
    mock.shutdown().await;
}

/// `kici-agent health` with the agent's own variables plus `port`.
fn health_check(port: u16, extra: &[(&str, &str)]) -> std::process::Output {
    let port = port.to_string();
    let mut vars = vec![
        ("KICI_ORCHESTRATOR_URL", "ws://127.0.0.1:9/ws"),
        ("KICI_PORT", port.as_str()),
    ];
    vars.extend_from_slice(extra);
    agent_command(&vars).arg("health").output().unwrap()
}

/// A one-shot HTTP server answering every request with `status_line`; returns its port.
fn serve_status_once(status_line: &'static str) -> (u16, std::thread::JoinHandle<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
            request.push(byte[0]);
        }
        let body = r#"{"status":"degraded"}"#;
        write!(
            stream,
            "{status_line}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8(request).unwrap()
    });
    (port, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_when_the_agent_answers_200_and_1_otherwise() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (child, port, drain) = spawn_agent(&mock);
    let out = tokio::task::spawn_blocking(move || {
        health_check(port, &[("KICI_BIND_ADDRESS", "127.0.0.1")])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let health: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(health["status"], "ok");
    drop(child);
    drain.join().unwrap();

    // Bound to all interfaces (the default): asked on loopback.
    let (port, server) = serve_status_once("HTTP/1.1 200 OK");
    let out = health_check(port, &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(server
        .join()
        .unwrap()
        .starts_with("GET /health HTTP/1.1\r\n"));

    // Anything but 200 is unhealthy, and the answer is shown.
    let (port, server) = serve_status_once("HTTP/1.1 503 Service Unavailable");
    let out = health_check(port, &[]);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("answered 503") && stderr.contains("degraded"),
        "{stderr}"
    );

    // Nothing listening: exit 1 naming the address asked.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let out = health_check(port, &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}/health")),
        "{stderr}"
    );

    // An ephemeral port cannot be asked.
    let out = health_check(0, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KICI_PORT is 0"));
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

/// A scaler-managed agent (spec agent.md §6.5) with nothing to do exits 0 by itself, logging
/// why, after closing the socket normally; it may carry the `kici:*` labels the scaler writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaler_managed_binary_exits_0_when_idle() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (mut child, _, log) = spawn_agent_with(
        &mock,
        &[
            ("KICI_SCALER_MANAGED", "1"),
            ("KICI_SCALER_IDLE_TIMEOUT", "200"),
            ("KICI_LABELS", "linux,kici:scaler:firecracker"),
        ],
    );
    let code = tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
        .await
        .unwrap()
        .0;
    assert_eq!(code, Some(0));
    let log = log.join().unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("scaler-managed agent is idle") && l.contains("scaler-idle")),
        "log: {log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("not implemented")),
        "log: {log:#?}"
    );
    assert_eq!(mock.registrations().len(), 1);
    assert!(mock
        .closes()
        .iter()
        .any(|c| !c.by_server && c.code == Some(1000)));
}

/// A `NOTIFY_SOCKET` datagram listener standing in for systemd (`Type=notify`).
fn notify_listener() -> (tempfile::TempDir, String, std::os::unix::net::UnixDatagram) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (dir, path.display().to_string(), socket)
}

fn next_notification(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let len = socket.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_type_notify_ready_follows_registration_and_stopping_precedes_the_exit() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (_dir, path, socket) = notify_listener();
    let (mut child, _, drain) = spawn_agent_with(&mock, &[("NOTIFY_SOCKET", path.as_str())]);
    let socket = std::sync::Arc::new(socket);
    let listening = socket.clone();
    let first = tokio::task::spawn_blocking(move || next_notification(&listening))
        .await
        .unwrap();
    assert!(
        first.starts_with("READY=1\nSTATUS=Registered as "),
        "{first:?}"
    );
    assert!(
        !mock.registrations().is_empty(),
        "READY=1 before the orchestrator saw agent.register"
    );
    signal(&child, libc::SIGTERM);
    let listening = socket.clone();
    let stopping = tokio::task::spawn_blocking(move || next_notification(&listening))
        .await
        .unwrap();
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=Shutting down on SIGTERM"),
        "{stopping:?}"
    );
    assert_eq!(
        tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
            .await
            .unwrap()
            .0,
        Some(0)
    );
    drain.join().unwrap();
}

/// A rejected token keeps the process up (no restart loop) and never ready: the service
/// manager sees why in the status instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_type_notify_a_rejected_token_is_a_status_never_ready() {
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (_dir, path, socket) = notify_listener();
    let (mut child, _, drain) = spawn_agent_with(
        &mock,
        &[
            ("NOTIFY_SOCKET", path.as_str()),
            ("KICI_AGENT_TOKEN", "kat_not-the-right-one"),
        ],
    );
    let (notification, socket) = tokio::task::spawn_blocking(move || {
        // A disconnect may be reported before the rejection; READY=1 never is.
        loop {
            let notification = next_notification(&socket);
            assert!(!notification.contains("READY=1"), "{notification:?}");
            if notification.contains("Authentication rejected") {
                return (notification, socket);
            }
        }
    })
    .await
    .unwrap();
    assert!(
        notification.contains("not reconnecting"),
        "{notification:?}"
    );
    assert!(
        !notification.contains("kat_not-the-right-one"),
        "the token reached the status: {notification:?}"
    );
    assert!(matches!(child.0.try_wait(), Ok(None)), "the agent exited");
    signal(&child, libc::SIGTERM);
    assert!(next_notification(&socket).starts_with("STOPPING=1"));
    assert_eq!(
        tokio::task::spawn_blocking(move || (wait_exit(&mut child), child))
            .await
            .unwrap()
            .0,
        Some(0)
    );
    drain.join().unwrap();
}
