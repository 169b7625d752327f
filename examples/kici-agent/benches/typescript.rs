//! Per-job overhead of the TypeScript runner, through the release binary and the strict mock
//! orchestrator on loopback. Run: `cargo bench -p kici-agent-cli --bench typescript`. Prints
//! figures; asserts nothing. Needs Node >= 20.6 on PATH.
//!
//! Both kinds of job check out the same small local repository (the TypeScript fixtures with the
//! stand-in SDK), so the difference of the two medians is what the runner adds:
//! - dispatch -> first TypeScript step body running (Node start, loader, transform, import);
//! - dispatch -> first shell step running (`date`), same checkout;
//! - the runner's peak RSS when its first step runs.
//!
//! The Node reference agent: ~1.4 s job start and ~210 MiB per job (notes/node-agent-baseline).
//!
//! `KICI_BENCH_BASELINE_BIN=/path/to/an/older/kici-agent` measures that binary in the same run,
//! job by job alternating with this build, so a regression shows under the same machine load.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kici_mock_orchestrator::{MockConfig, MockOrchestrator, TEST_TOKEN};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_kici-agent");
const WAIT: Duration = Duration::from_secs(120);
const RUNS: usize = 15;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn copy_tree(from: &Path, to: &Path) {
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

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@example.invalid")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@example.invalid")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The fixture workflows with the stand-in SDK, committed; returns (url, branch, sha).
fn repo(root: &Path) -> (String, String, String) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/typescript");
    copy_tree(&fixtures.join("repo"), root);
    copy_tree(
        &fixtures.join("sdk"),
        &root.join(".kici/node_modules/@kici-dev/sdk"),
    );
    git(root, &["init", "-q"]);
    git(root, &["add", "-A"]);
    git(root, &["commit", "-qm", "workflows"]);
    (
        format!("file://{}", root.display()),
        git(root, &["rev-parse", "--abbrev-ref", "HEAD"]),
        git(root, &["rev-parse", "HEAD"]),
    )
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

/// Dispatches and returns (dispatch -> first step's reported start, the step's log lines).
async fn first_step(
    mock: &MockOrchestrator,
    agent_id: &str,
    job: &str,
    dispatch: Value,
) -> (Duration, Vec<String>) {
    let sent = now();
    mock.dispatch(agent_id, dispatch).await.unwrap();
    let job_id = job.to_owned();
    let done = mock
        .wait_for_message(
            "job.status",
            move |m| {
                m["jobId"] == job_id.as_str()
                    && ["success", "failed", "cancelled"]
                        .contains(&m["state"].as_str().unwrap_or(""))
            },
            WAIT,
        )
        .await
        .expect("the job ended");
    assert_eq!(done["state"], "success", "{done}");
    let lines: Vec<String> = mock
        .received()
        .into_iter()
        .filter(|r| {
            r.msg["type"] == "log.chunk" && r.msg["jobId"] == job && r.msg["stepIndex"] == 0
        })
        .flat_map(|r| r.msg["lines"].as_array().cloned().unwrap_or_default())
        .map(|l| l.as_str().unwrap_or_default().to_owned())
        .collect();
    let started_ns: u128 = lines
        .iter()
        .find_map(|l| l.strip_prefix("t ").unwrap_or(l).parse().ok())
        .expect("the step printed its start time");
    (
        Duration::from_nanos((started_ns - sent.as_nanos()) as u64),
        lines,
    )
}

fn spawn(mock: &MockOrchestrator, bin: &str, id: &str) -> Agent {
    Agent(
        Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("KICI_ORCHESTRATOR_URL", mock.ws_url())
            .env("KICI_AGENT_TOKEN", TEST_TOKEN)
            .env("KICI_AGENT_ID", id)
            .env("KICI_PORT", "0")
            .env("KICI_BIND_ADDRESS", "127.0.0.1")
            .env("KICI_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the agent"),
    )
}

/// Figures of one binary.
#[derive(Default)]
struct Figures {
    typescript: Vec<Duration>,
    shell: Vec<Duration>,
    rss_kib: Vec<u64>,
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (url, branch, sha) = repo(dir.path());
    let mock = MockOrchestrator::start(MockConfig::default())
        .await
        .unwrap();
    let mut binaries = vec![("this build", BIN.to_owned())];
    if let Some(baseline) = std::env::var_os("KICI_BENCH_BASELINE_BIN") {
        let baseline = baseline.to_string_lossy().into_owned();
        assert!(
            Path::new(&baseline).is_file(),
            "KICI_BENCH_BASELINE_BIN={baseline} is not a file"
        );
        binaries.push(("baseline", baseline));
    }
    let mut agents = Vec::new();
    for (b, (_, bin)) in binaries.iter().enumerate() {
        let id = format!("ts-bench-{b}");
        agents.push(spawn(&mock, bin, &id));
        assert!(mock
            .wait_for_message("config.ack", move |m| m["agentId"] == id.as_str(), WAIT)
            .await
            .is_some());
    }

    let mut figures: Vec<Figures> = binaries.iter().map(|_| Figures::default()).collect();
    for i in 0..RUNS {
        for (b, figures) in figures.iter_mut().enumerate() {
            let agent_id = format!("ts-bench-{b}");
            let ts_job = format!("ts-{b}-{i}");
            let mut d = kici_mock_orchestrator::sample_dispatch(
                &format!("r-{ts_job}"),
                &ts_job,
                &url,
                &branch,
                &sha,
                json!([{"name": "report", "hasOutputs": false}]),
            );
            d["jobConfig"]["source"]["file"] = json!(".kici/workflows/bench.ts");
            d["jobConfig"]["workflowName"] = json!("bench");
            d["jobConfig"]["name"] = json!("first-step");
            d["jobConfig"]["baseJobName"] = json!("first-step");
            let (elapsed, lines) = first_step(&mock, &agent_id, &ts_job, d).await;
            figures.typescript.push(elapsed);
            figures.rss_kib.push(
                lines
                    .iter()
                    .find_map(|l| l.strip_prefix("rss "))
                    .and_then(|v| v.parse::<u64>().ok())
                    .expect("the step printed its RSS"),
            );

            let sh_job = format!("sh-{b}-{i}");
            let d = kici_mock_orchestrator::sample_dispatch(
                &format!("r-{sh_job}"),
                &sh_job,
                &url,
                &branch,
                &sha,
                json!([{"name": "t", "run": "date +%s%N"}]),
            );
            figures
                .shell
                .push(first_step(&mock, &agent_id, &sh_job, d).await.0);
        }
    }
    for ((label, _), mut figures) in binaries.iter().zip(figures) {
        let ts = median(figures.typescript.clone());
        let sh = median(figures.shell);
        figures.rss_kib.sort();
        println!(
            "[{label}] dispatch -> first TypeScript step running: median {:.1} ms (min {:.1}; n={RUNS}; checkout included)   [Node agent: ~1400 ms job start]",
            ts.as_secs_f64() * 1e3,
            figures.typescript.iter().min().unwrap().as_secs_f64() * 1e3
        );
        println!(
            "[{label}] dispatch -> first shell step running, same checkout: median {:.1} ms; runner overhead (difference): {:.1} ms",
            sh.as_secs_f64() * 1e3,
            (ts.as_secs_f64() - sh.as_secs_f64()) * 1e3
        );
        println!(
            "[{label}] runner peak RSS at its first step: median {:.1} MiB   [Node agent: ~210 MiB per job]",
            figures.rss_kib[figures.rss_kib.len() / 2] as f64 / 1024.0
        );
    }
    drop(agents);
}
