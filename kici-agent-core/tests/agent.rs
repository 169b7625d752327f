//! The agent handle under pressure: state read from many threads while dispatches arrive,
//! executors that panic, `/ready` while draining, and `/health`'s build identity.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start_with, WAIT};
use kici_agent_core::config::RateLimits;
use kici_agent_core::{
    Executor, ExecutorRegistry, JobContext, StepContext, StepFailure, StepIo, StepResult,
};
use kici_mock_orchestrator::{MockConfig, RateLimits as MockRateLimits};
use serde_json::json;

/// Succeeds at once: the job's whole life is dispatch, admission and release.
struct Instantly;

#[async_trait::async_trait]
impl Executor for Instantly {
    fn name(&self) -> &str {
        "instantly"
    }
    async fn run_step(&self, _: &JobContext, _: &StepContext, _: StepIo) -> StepResult {
        Ok(())
    }
}

fn registry_with_default(executor: Arc<dyn Executor>) -> ExecutorRegistry {
    let mut registry = ExecutorRegistry::new();
    registry.set_default(executor);
    registry
}

/// A blocking `GET /health` with socket timeouts, so a frozen agent shows as an error rather
/// than a stuck reader.
fn blocking_health(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if response.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "unexpected answer: {response}"
        )))
    }
}

/// Fails the test if any reader makes no progress for this long: the agent is frozen.
const STALL: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_health_readers_never_freeze_dispatch_admission() {
    // Limits high enough that hundreds of answers a second never queue behind a token bucket.
    let mock_config = MockConfig {
        rate_limits: MockRateLimits {
            msg_burst: 10_000.0,
            msgs_per_sec: 10_000.0,
            ..MockRateLimits::default()
        },
        ..MockConfig::default()
    };
    let agent_limits = RateLimits {
        msgs_per_sec: 5_000.0,
        msg_burst: 5_000.0,
        ..RateLimits::default()
    };
    let h = start_with(
        mock_config,
        |c| c.with_max_concurrency(3).with_rate_limits(agent_limits),
        registry_with_default(Arc::new(Instantly)),
    )
    .await;
    h.registered().await;
    let agent = Arc::new(h);
    let http = agent.agent.http_addr().expect("http bound");

    let stop = Arc::new(AtomicBool::new(false));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..6).map(|_| AtomicU64::new(0)).collect());
    let mut readers = Vec::new();
    for reader in 0..6 {
        let (agent, stop, progress) = (agent.clone(), stop.clone(), progress.clone());
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let answered = if reader < 4 {
                    let state = agent.agent.state();
                    assert!(state.active_jobs <= 3, "capacity exceeded: {state:?}");
                    true
                } else {
                    // A timeout counts as no progress; the watchdog judges.
                    blocking_health(http).is_ok()
                };
                if answered {
                    progress[reader].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Dispatches keep arriving (admitted or rejected busy) and jobs keep finishing while the
    // readers hammer the state; a watchdog checks that every reader keeps moving.
    let run_for = Duration::from_secs(3);
    let started = Instant::now();
    let mut last_seen: Vec<(u64, Instant)> = (0..6).map(|_| (0, Instant::now())).collect();
    let mut dispatched = 0u32;
    let mut stalled = None;
    while started.elapsed() < run_for {
        agent
            .dispatch(&format!("stress-{dispatched}"), json!([{"name": "s"}]))
            .await;
        dispatched += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
        for (reader, (count, since)) in last_seen.iter_mut().enumerate() {
            let now = progress[reader].load(Ordering::Relaxed);
            if now != *count {
                *count = now;
                *since = Instant::now();
            } else if since.elapsed() > STALL {
                stalled = Some(reader);
            }
        }
        if stalled.is_some() {
            break;
        }
    }
    // After the dispatches stop the readers must still move (the last admissions are done).
    let settle = Instant::now();
    let snapshot: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    while stalled.is_none()
        && progress
            .iter()
            .zip(&snapshot)
            .any(|(p, before)| p.load(Ordering::Relaxed) == *before)
    {
        if settle.elapsed() > STALL {
            stalled = progress
                .iter()
                .zip(&snapshot)
                .position(|(p, before)| p.load(Ordering::Relaxed) == *before);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(reader) = stalled {
        // The agent is deadlocked: dropping it would hang this test too.
        std::mem::forget(agent);
        panic!(
            "reader {reader} made no progress for {STALL:?}: the agent froze (lock-order deadlock)"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.join().expect("reader thread");
    }
    assert!(dispatched > 100, "only {dispatched} dispatches were sent");
    // The connection task is alive too: the last dispatch was answered.
    let last = format!("stress-{}", dispatched - 1);
    assert!(
        agent
            .mock
            .wait_for(
                |r| r.accepted
                    && r.msg["jobId"] == last.as_str()
                    && ["job.ack", "job.reject"].contains(&r.msg["type"].as_str().unwrap_or("")),
                WAIT,
            )
            .await
            .is_some(),
        "the last dispatch was never answered"
    );
    agent.assert_no_violations();
}

/// Panics in the job-level hook that runs inside the job's own task.
struct PanicsInPrepare;

#[async_trait::async_trait]
impl Executor for PanicsInPrepare {
    fn name(&self) -> &str {
        "panics-in-prepare"
    }
    async fn prepare(&self, _: &JobContext) -> Result<(), StepFailure> {
        panic!("prepare blew up");
    }
    async fn run_step(&self, _: &JobContext, _: &StepContext, _: StepIo) -> StepResult {
        Ok(())
    }
}

/// Panics while running a step.
struct PanicsInStep;

#[async_trait::async_trait]
impl Executor for PanicsInStep {
    fn name(&self) -> &str {
        "panics-in-step"
    }
    async fn run_step(&self, _: &JobContext, _: &StepContext, _: StepIo) -> StepResult {
        panic!("step blew up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_executor_fails_its_job_frees_the_slot_and_the_next_job_runs() {
    let mut executors = registry_with_default(Arc::new(Instantly));
    executors
        .for_step("explode-prepare", Arc::new(PanicsInPrepare))
        .for_step("explode-step", Arc::new(PanicsInStep));
    let h = start_with(
        MockConfig::default(),
        |c| c.with_max_concurrency(1),
        executors,
    )
    .await;
    h.registered().await;

    for (job, step, message) in [
        ("prepare-panics", "explode-prepare", "prepare blew up"),
        ("step-panics", "explode-step", "step blew up"),
    ] {
        h.dispatch(job, json!([{"name": step}])).await;
        let terminal = h.terminal_status(job).await;
        assert_eq!(terminal["state"], "failed", "{terminal}");
        // The panic is named where it happened: the job (prepare) or the step.
        let errors: Vec<String> = h
            .job_messages(job)
            .iter()
            .filter(|m| m["type"] == "job.status" || m["type"] == "step.status")
            .filter_map(|m| m["data"]["error"].as_str().map(str::to_owned))
            .collect();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("panicked") && e.contains(message)),
            "no clear error: {errors:?}"
        );
        // The only slot is free again: the next dispatch is acked and runs.
        let next = format!("after-{job}");
        h.dispatch(&next, json!([{"name": "fine"}])).await;
        assert_eq!(h.terminal_status(&next).await["state"], "success");
        assert!(h.mock.messages_of_type("job.reject").is_empty());
    }
    assert_eq!(h.agent.state().active_jobs, 0);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_commit_the_library_was_built_from() {
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git runs (this test runs inside the repository)");
    assert!(head.status.success(), "not inside the repository");
    let head = String::from_utf8(head.stdout).unwrap().trim().to_owned();

    let h = start_with(MockConfig::default(), |c| c, ExecutorRegistry::new()).await;
    let (status, body) = h.http_get("/health").await;
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["buildCommit"], head.as_str());
    assert_eq!(kici_agent_core::BUILD_COMMIT, head);
    let date = health["buildDate"].as_str().unwrap_or_default();
    assert!(
        date.len() == 24 && date.ends_with('Z') && date > "2026",
        "buildDate: {date}"
    );
}

/// Sets an output naming who ran the step.
struct Named(&'static str);

#[async_trait::async_trait]
impl Executor for Named {
    fn name(&self) -> &str {
        self.0
    }
    async fn run_step(&self, _: &JobContext, _: &StepContext, io: StepIo) -> StepResult {
        io.set_output("by", json!(self.0)).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_registered_on_the_agent_route_steps_and_are_refused_after_start() {
    let mock = kici_mock_orchestrator::MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let config = common::config_for(&mock).build().unwrap();
    let agent = kici_agent_core::Agent::new(config).unwrap();
    agent
        .register_job_executor("hil", Arc::new(Named("job")))
        .unwrap();
    agent
        .register_step_executor("flash", Arc::new(Named("step")))
        .unwrap();
    agent
        .set_default_executor(Arc::new(Named("default")))
        .unwrap();
    agent.start().unwrap();
    let late = agent.register_step_executor("late", Arc::new(Named("late")));
    assert!(
        matches!(late, Err(kici_agent_core::AgentError::RegisteredAfterStart)),
        "{late:?}"
    );
    let h = common::Harness { mock, agent };
    h.registered().await;

    // The host's job executor wins over the job's container image: no engine is needed, and
    // the job log says where the step ran.
    h.dispatch_with(
        "hil-in-container",
        json!([{"name": "flash", "hasOutputs": true}, {"name": "measure", "hasOutputs": true}]),
        |d| {
            d["jobConfig"]["name"] = json!("hil");
            d["jobConfig"]["container"] = json!("debian:12");
        },
    )
    .await;
    let done = h.terminal_status("hil-in-container").await;
    assert_eq!(done["state"], "success", "{done}");
    assert_eq!(
        done["data"]["outputs"],
        json!({"flash": {"by": "step"}, "measure": {"by": "job"}})
    );
    let job_log = h.lines("hil-in-container", -1).join("\n");
    assert!(
        job_log.contains(
            "Step 'measure' runs on this host with executor 'job' (registered for the job), not in the job's container"
        ),
        "{job_log}"
    );

    // The host default is a catch-all: it does not take steps out of a container (here the
    // container executor cannot reach an engine, so the job fails without the default running).
    h.dispatch_with(
        "other-in-container",
        json!([{"name": "build", "hasOutputs": false}]),
        |d| {
            d["jobConfig"]["container"] = json!("debian:12");
        },
    )
    .await;
    let failed = h.terminal_status("other-in-container").await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(failed["data"].get("outputs").is_none(), "{failed}");
    // Without an image the default takes the step.
    h.dispatch("plain", json!([{"name": "build", "hasOutputs": true}]))
        .await;
    let plain = h.terminal_status("plain").await;
    assert_eq!(
        plain["data"]["outputs"],
        json!({"build": {"by": "default"}})
    );
    h.assert_no_violations();
}
