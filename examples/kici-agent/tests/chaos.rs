//! The chaos suite: the binary against the strict mock orchestrator through a fault-injecting
//! proxy, with exact figures. `#[ignore]`d because it takes minutes (it runs at the
//! orchestrator's real rate limits); `scripts/test.sh` runs it on its own and prints the table:
//!
//! ```sh
//! cargo test -p kici-agent-cli --test chaos -- --ignored --nocapture
//! ```
//!
//! `KICI_CHAOS_SEED` replays a run's fault schedule (each run prints its seed).

mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::*;
use kici_mock_orchestrator::proxy::FaultProxy;
use kici_mock_orchestrator::{sample_dispatch, MockConfig, MockOrchestrator};
use serde_json::{json, Value};

const LINES: u32 = 200_000;
/// 66 characters: each spew line is 79 characters + newline = 80 bytes.
const PAD: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd";
const CAP_32_MIB: &str = "33554432";
const JOB_DEADLINE: Duration = Duration::from_secs(240);

fn spew(lines: u32, pause_every: Option<u32>) -> String {
    // `system("sleep ...")` paces a producer so that a job spans the faults.
    let pause = pause_every.map_or(String::new(), |n| {
        format!("if ($1 % {n} == 0) {{ fflush(); system(\"sleep 0.1\") }}")
    });
    format!("seq 1 {lines} | awk '{{ printf \"spew %07d {PAD}\\n\", $1; {pause} }}'")
}

/// A small deterministic generator (xorshift64*), so a failing schedule can be replayed.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("KICI_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            });
        eprintln!("chaos seed: KICI_CHAOS_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low))
    }
}

/// One row of the summary table.
#[derive(Default)]
struct Row {
    scenario: &'static str,
    faults: String,
    expected: u64,
    delivered: u64,
    duplicated: u64,
    out_of_order: u64,
    statuses_lost: u64,
    /// Messages the orchestrator dropped for being over its rate limit.
    rate_limited: usize,
    peak_rss_mib: f64,
    seconds: f64,
    failures: Vec<String>,
}

/// What the mock received of one job's step 0: the spew numbers in arrival order.
fn spew_numbers(mock: &MockOrchestrator, job_id: &str) -> Vec<u32> {
    mock.messages_of_type("log.chunk")
        .iter()
        .filter(|m| m["jobId"] == job_id && m["stepIndex"] == 0)
        .flat_map(|m| m["lines"].as_array().cloned().unwrap_or_default())
        .filter_map(|line| {
            let line = line.as_str()?;
            line.strip_prefix("spew ")?.get(..7)?.parse().ok()
        })
        .collect()
}

/// Counts duplicates, order breaks and lines delivered of `1..=expected`.
fn check_lines(row: &mut Row, numbers: &[u32], expected: u32) {
    let mut seen = vec![false; expected as usize + 1];
    let mut last = 0;
    for &n in numbers {
        if n == 0 || n > expected {
            row.failures.push(format!("unexpected line number {n}"));
            continue;
        }
        if seen[n as usize] {
            row.duplicated += 1;
        } else {
            seen[n as usize] = true;
            row.delivered += 1;
        }
        if n <= last {
            row.out_of_order += 1;
        }
        last = n;
    }
    row.expected = u64::from(expected);
    if row.delivered != row.expected {
        row.failures.push(format!(
            "{} of {} lines delivered",
            row.delivered, row.expected
        ));
    }
    if row.duplicated > 0 || row.out_of_order > 0 {
        row.failures.push(format!(
            "{} duplicated, {} out of order",
            row.duplicated, row.out_of_order
        ));
    }
}

/// Checks that job `job_id` ended `state` with exactly one terminal `job.status` and one
/// terminal `step.status` per step.
fn check_statuses(row: &mut Row, mock: &MockOrchestrator, job_id: &str, steps: u64, state: &str) {
    let terminal = |m: &Value| m["jobId"] == job_id && m["state"] != "running";
    let jobs: Vec<Value> = mock
        .messages_of_type("job.status")
        .into_iter()
        .filter(|m| terminal(m))
        .collect();
    let step_ends = mock
        .messages_of_type("step.status")
        .into_iter()
        .filter(|m| terminal(m))
        .count() as u64;
    row.statuses_lost = u64::from(jobs.is_empty()) + steps.saturating_sub(step_ends);
    if jobs.len() != 1 || jobs[0]["state"] != state {
        row.failures.push(format!(
            "terminal job.status {jobs:?}, expected one {state}"
        ));
    }
    if step_ends != steps {
        row.failures.push(format!(
            "{step_ends} terminal step.status, expected {steps}"
        ));
    }
    row.rate_limited = mock.dropped_by_rate_limit();
    let violations = mock.violations();
    if !violations.is_empty() {
        row.failures
            .push(format!("mock violations: {violations:?}"));
    }
}

async fn wait_terminal(mock: &MockOrchestrator, job_id: &str) -> bool {
    let job_id = job_id.to_owned();
    mock.wait_for_message(
        "job.status",
        move |m| m["jobId"] == job_id.as_str() && m["state"] != "running",
        JOB_DEADLINE,
    )
    .await
    .is_some()
}

/// Samples the agent's peak RSS (VmHWM) now.
fn peak_mib(agent: &Spawned) -> f64 {
    peak_rss(agent.0.id()) as f64 / 1_048_576.0
}

/// N random stalls (the connection stays up) and cuts (both sides reset) during a 200,000-line
/// job with a 32 MiB cap: every line exactly once and in order, one terminal status.
async fn cuts_and_stalls(rng: &mut Rng) -> Row {
    let mut row = Row {
        scenario: "cuts + stalls, 200k lines",
        ..Row::default()
    };
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let proxy = FaultProxy::start(mock.addr()).await.unwrap();
    let (agent, _, log) =
        spawn_agent_at(&proxy.ws_url(), &[("KICI_MAX_LOG_SIZE_BYTES", CAP_32_MIB)]);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    let steps = json!([{"name": "spew", "run": spew(LINES, None)}]);
    mock.dispatch(
        &agent_id,
        sample_dispatch("run-chaos", "cuts", "", "main", "", steps),
    )
    .await
    .unwrap();
    let (mut stalls, mut cuts) = (0, 0);
    let faults = async {
        for _ in 0..6 {
            tokio::time::sleep(rng.millis(2_000, 5_000)).await;
            if rng.next().is_multiple_of(2) {
                proxy.stall(rng.millis(500, 4_000)).await;
                stalls += 1;
            } else {
                proxy.cut();
                cuts += 1;
            }
        }
    };
    let ended = tokio::select! {
        ended = wait_terminal(&mock, "cuts") => ended,
        () = faults => wait_terminal(&mock, "cuts").await,
    };
    row.faults = format!("{stalls} stalls, {cuts} cuts");
    if !ended {
        row.failures.push("the job did not end".into());
    }
    row.peak_rss_mib = peak_mib(&agent);
    check_lines(&mut row, &spew_numbers(&mock, "cuts"), LINES);
    check_statuses(&mut row, &mock, "cuts", 1, "success");
    drop(agent);
    let _ = log.join();
    row
}

/// The orchestrator goes away (1001 close, no listener) for a few seconds while a job runs, with
/// its state kept (a restart with its database): statuses and every line arrive after the
/// re-registration, which lists the running job in `inFlightJobs`.
async fn orchestrator_restart(rng: &mut Rng) -> Row {
    let mut row = Row {
        scenario: "orchestrator restart",
        ..Row::default()
    };
    let lines = 20_000;
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (agent, _, log) = spawn_agent_with(&mock, &[]);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    let steps = json!([
        {"name": "spew", "run": spew(lines, Some(1_000))},
        {"name": "after", "run": "echo after the restart"},
    ]);
    mock.dispatch(
        &agent_id,
        sample_dispatch("run-chaos", "restart", "", "main", "", steps),
    )
    .await
    .unwrap();
    tokio::time::sleep(rng.millis(500, 1_500)).await;
    mock.set_accepting(false);
    let _ = mock.disconnect(&agent_id, 1001).await;
    tokio::time::sleep(rng.millis(2_000, 4_000)).await;
    mock.set_accepting(true);
    row.faults = "1 restart".into();
    if !wait_terminal(&mock, "restart").await {
        row.failures.push("the job did not end".into());
    }
    let listed = mock.registrations().iter().skip(1).any(|r| {
        r["inFlightJobs"]
            .as_array()
            .is_some_and(|jobs| jobs.iter().any(|j| j["jobId"] == "restart"))
    });
    if !listed {
        row.failures
            .push("the re-registration did not list the running job in inFlightJobs".into());
    }
    row.peak_rss_mib = peak_mib(&agent);
    check_lines(&mut row, &spew_numbers(&mock, "restart"), lines);
    check_statuses(&mut row, &mock, "restart", 2, "success");
    drop(agent);
    let _ = log.join();
    row
}

/// The orchestrator stops reading for 10 s while a 200,000-line job streams: memory stays
/// bounded (producers wait) and nothing is lost.
async fn slow_reader() -> Row {
    let mut row = Row {
        scenario: "reader stops 10 s",
        faults: "1 stall of 10 s".into(),
        ..Row::default()
    };
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let proxy = FaultProxy::start(mock.addr()).await.unwrap();
    let (agent, _, log) =
        spawn_agent_at(&proxy.ws_url(), &[("KICI_MAX_LOG_SIZE_BYTES", CAP_32_MIB)]);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    let steps = json!([{"name": "spew", "run": spew(LINES, None)}]);
    mock.dispatch(
        &agent_id,
        sample_dispatch("run-chaos", "slow", "", "main", "", steps),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.stall(Duration::from_secs(10)).await;
    if !wait_terminal(&mock, "slow").await {
        row.failures.push("the job did not end".into());
    }
    row.peak_rss_mib = peak_mib(&agent);
    if row.peak_rss_mib > 64.0 {
        row.failures
            .push(format!("peak RSS {:.1} MiB over 64 MiB", row.peak_rss_mib));
    }
    check_lines(&mut row, &spew_numbers(&mock, "slow"), LINES);
    check_statuses(&mut row, &mock, "slow", 1, "success");
    drop(agent);
    let _ = log.join();
    row
}

/// One malformed frame of many kinds, chosen by `rng`.
fn malformed_frame(rng: &mut Rng, i: u64) -> String {
    let id = format!("bad-{i}");
    match rng.next() % 12 {
        0 => "{".repeat(1 + (rng.next() % 5000) as usize),
        1 => format!("{{\"type\":\"job.dispatch\",\"messageId\":\"{id}\"}}"),
        2 => json!({"type": "job.dispatch", "messageId": id, "runId": 7, "jobId": [1]}).to_string(),
        3 => json!({"type": "job.cancel", "messageId": id, "runId": "r", "jobId": "nope", "reason": "x"}).to_string(),
        4 => json!({"type": "unknown.kind", "messageId": id, "payload": "x".repeat(1000)}).to_string(),
        5 => json!({"type": 42}).to_string(),
        6 => json!([1, 2, 3]).to_string(),
        7 => "\u{0}\u{1}\u{fffd} not json".to_owned(),
        8 => json!({"type": "register.ack"}).to_string(),
        9 => json!({"type": "rate.limit.warning", "retryAfterMs": "soon"}).to_string(),
        10 => format!("{}{}", "[".repeat(20_000), "]".repeat(20_000)),
        // Dispatch-shaped but without usable ids: with ids the agent rightly answers (ack +
        // failed), which the orchestrator would count against jobs it never dispatched.
        _ => json!({"type": "job.dispatch", "messageId": id, "runId": "r", "jobId": i, "jobConfig": {"steps": "not a list"}}).to_string(),
    }
}

/// 1,000 malformed frames: no crash, still registered, and a real job still runs.
async fn malformed_frames(rng: &mut Rng) -> Row {
    let mut row = Row {
        scenario: "1,000 malformed frames",
        faults: "1000 frames".into(),
        ..Row::default()
    };
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let (mut agent, port, log) = spawn_agent_with(&mock, &[]);
    let agent_id = mock.wait_for_agent(Duration::from_secs(20)).await.unwrap();
    for i in 0..1_000 {
        if mock
            .send_raw(&agent_id, &malformed_frame(rng, i))
            .await
            .is_err()
        {
            row.failures
                .push(format!("the connection ended at malformed frame {i}"));
            break;
        }
    }
    if matches!(agent.0.try_wait(), Ok(Some(_))) {
        row.failures.push("the agent exited".into());
    }
    let health = tokio::task::spawn_blocking(move || get(port, "/health"))
        .await
        .unwrap();
    if health.0 != 200 || !health.1.contains("\"connected\":true") {
        row.failures
            .push(format!("/health after the frames: {health:?}"));
    }
    let steps = json!([{"name": "spew", "run": spew(100, None)}]);
    mock.dispatch(
        &agent_id,
        sample_dispatch("run-chaos", "after-garbage", "", "main", "", steps),
    )
    .await
    .unwrap();
    if !wait_terminal(&mock, "after-garbage").await {
        row.failures
            .push("a job after the frames did not end".into());
    }
    row.peak_rss_mib = peak_mib(&agent);
    check_lines(&mut row, &spew_numbers(&mock, "after-garbage"), 100);
    check_statuses(&mut row, &mock, "after-garbage", 1, "success");
    drop(agent);
    let _ = log.join();
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; scripts/test.sh runs it on its own"]
async fn chaos_suite() {
    let mut rng = Rng::from_env();
    let mut rows = Vec::new();
    for scenario in 0..4 {
        let started = Instant::now();
        let mut row = match scenario {
            0 => cuts_and_stalls(&mut rng).await,
            1 => orchestrator_restart(&mut rng).await,
            2 => slow_reader().await,
            _ => malformed_frames(&mut rng).await,
        };
        row.seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "chaos: {} done in {:.1} s: {:?}",
            row.scenario, row.seconds, row.failures
        );
        rows.push(row);
    }
    let mut table = String::from(
        "\nscenario                  | faults              | lines expected | delivered | duplicated | out of order | statuses lost | rate-limited | peak RSS MiB | seconds\n",
    );
    table.push_str(&"-".repeat(155));
    table.push('\n');
    for r in &rows {
        let _ = writeln!(
            table,
            "{:<25} | {:<19} | {:>14} | {:>9} | {:>10} | {:>12} | {:>13} | {:>12} | {:>12.1} | {:>7.1}",
            r.scenario,
            r.faults,
            r.expected,
            r.delivered,
            r.duplicated,
            r.out_of_order,
            r.statuses_lost,
            r.rate_limited,
            r.peak_rss_mib,
            r.seconds
        );
    }
    println!("{table}");
    let failures: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.failures
                .iter()
                .map(move |f| format!("{}: {f}", r.scenario))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "chaos failures:\n{}",
        failures.join("\n")
    );
}
