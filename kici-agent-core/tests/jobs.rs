//! The job engine end to end against the strict mock orchestrator (loopback, real processes,
//! real git repositories made in the test).

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{alive, start, start_with, WAIT};
use kici_agent_core::ExecutorRegistry;
use kici_mock_orchestrator::MockConfig;
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/../tests/fixtures/real-orchestrator/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `pids <a> <b>` printed by a step, as numbers.
fn pids(lines: &[String]) -> Vec<i32> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("pids "))
        .expect("the step printed its pids")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

async fn wait_dead(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "processes still alive: {pids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real dispatches of `hello.ts` and `fails.ts`, with the step map of the interop target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_dispatches_run_to_success_and_failure_with_the_recorded_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("steps.json");
    std::fs::write(
        &map,
        r#"{"say-hello": "echo \"hello from kici peer\"", "boom": "sh -c \"echo about to fail; exit 3\""}"#,
    )
    .unwrap();
    let h = start(|c| c.with_step_map_file(&map)).await;
    h.registered().await;
    let id = h.agent_id();
    for (fixture_name, job_id) in [
        ("job.dispatch.json", "hello"),
        ("job.dispatch.pair-second.json", "second"),
    ] {
        let mut d = fixture(fixture_name);
        d["repoUrl"] = json!(""); // the recorded file:// repo is not on this machine
        d["jobId"] = json!(job_id);
        if job_id == "second" {
            d["jobConfig"]["steps"][0]["name"] = json!("boom");
        }
        h.mock.dispatch(&id, d).await.unwrap();
        h.terminal_status(job_id).await;
    }
    let hello = h.terminal_status("hello").await;
    assert_eq!(hello["state"], "success");
    assert_eq!(
        h.sequence("hello"),
        [
            "job.ack",
            "job.status running",
            "step.status 0 running",
            "step.status 0 success",
            "job.status success"
        ]
    );
    assert_eq!(h.lines("hello", 0), ["hello from kici peer"]);
    let step = h
        .job_messages("hello")
        .into_iter()
        .find(|m| m["state"] == "success" && m["type"] == "step.status")
        .unwrap();
    assert_eq!(step["logBytesStreamed"], 20);
    assert_eq!(step["step_type"], "step");
    assert_eq!(hello["data"]["stepResults"][0]["name"], "say-hello");

    let failed = h.terminal_status("second").await;
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["data"]["error"], "Step 'boom' failed");
    let step = h
        .job_messages("second")
        .into_iter()
        .find(|m| m["state"] == "failed" && m["type"] == "step.status")
        .unwrap();
    assert_eq!(step["data"]["exitCode"], 3);
    assert_eq!(step["data"]["error"], "Command failed with exit code 3");
    assert_eq!(h.lines("second", 0), ["about to fail"]);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_stops_the_job_unless_continue_on_error_and_retries_report_each_attempt() {
    let h = start(|c| c).await;
    h.registered().await;
    h.dispatch(
        "coe",
        json!([
            {"name": "tolerated", "run": "exit 2", "continueOnError": true},
            {"name": "after", "run": "echo still here"},
            {"name": "fatal", "run": "exit 5"},
            {"name": "never", "run": "echo never"}
        ]),
    )
    .await;
    let status = h.terminal_status("coe").await;
    assert_eq!(status["state"], "failed");
    assert_eq!(status["data"]["error"], "Step 'fatal' failed");
    assert_eq!(h.lines("coe", 1), ["still here"]);
    assert!(
        !h.sequence("coe").iter().any(|s| s.contains(" 3 ")),
        "{:?}",
        h.sequence("coe")
    );

    h.dispatch("retry", json!([{
        "name": "flaky",
        "run": "n=$(cat $KICI_WORKSPACE/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > $KICI_WORKSPACE/count; echo attempt $n; [ $n -ge 3 ]",
        "retry": {"maxAttempts": 4, "delayMs": 10, "backoff": "fixed"}
    }])).await;
    assert_eq!(h.terminal_status("retry").await["state"], "success");
    assert_eq!(
        h.sequence("retry"),
        [
            "job.ack",
            "job.status running",
            "step.status 0 running",
            "step.status 0 failed",
            "step.status 0 running",
            "step.status 0 failed",
            "step.status 0 running",
            "step.status 0 success",
            "job.status success"
        ]
    );
    assert!(h
        .lines("retry", -1)
        .iter()
        .any(|l| l.contains("attempt 1/4 failed")));
    // One count per step (its final attempt), by its real result; jobs by their terminal state.
    let metrics = h.http_get("/metrics").await.1;
    for sample in [
        "kici_agent_steps_total{status=\"failed\"} 2",
        "kici_agent_steps_total{status=\"success\"} 2",
        "kici_agent_jobs_total{status=\"failed\"} 1",
        "kici_agent_jobs_total{status=\"success\"} 1",
        "kici_agent_jobs_active 0",
    ] {
        assert!(metrics.contains(sample), "{sample} missing from\n{metrics}");
    }
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_timeout_kills_a_step_that_ignores_sigterm_and_its_grandchild() {
    let h = start(|c| c.with_cancel_grace(Duration::from_millis(300))).await;
    h.registered().await;
    h.dispatch(
        "timeout",
        json!([{
            "name": "stubborn",
            "timeout": 500,
            "run": "trap '' TERM; sleep 300 & echo pids $$ $!; while true; do sleep 0.05; done"
        }]),
    )
    .await;
    let status = h.terminal_status("timeout").await;
    assert_eq!(status["state"], "failed");
    let step = &status["data"]["stepResults"][0];
    assert_eq!(step["error"], "Step 'stubborn' timed out after 500ms");
    wait_dead(&pids(&h.lines("timeout", 0))).await;
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_group_fail_fast_cancels_siblings() {
    let h = start(|c| c).await;
    h.registered().await;
    h.dispatch(
        "par",
        json!([
            {"name": "before", "run": "true"},
            {"kind": "parallel", "name": "group", "failFast": true, "maxParallel": 2, "children": [
                {"name": "fails", "run": "sleep 0.2; exit 1"},
                {"name": "slow", "run": "sleep 30"},
                {"name": "queued", "run": "echo never"}
            ]},
            {"name": "after", "run": "echo never"}
        ]),
    )
    .await;
    let status = h.terminal_status("par").await;
    assert_eq!(status["state"], "failed");
    let results: Vec<(String, String)> = status["data"]["stepResults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().into(),
                r["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    let of = |n: &str| {
        results
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, s)| s.clone())
    };
    assert_eq!(of("fails").as_deref(), Some("failed"));
    assert_eq!(of("slow").as_deref(), Some("cancelled"));
    assert_eq!(of("queued").as_deref(), Some("cancelled"));
    assert_eq!(of("after"), None);
    let messages = h.job_messages("par");
    let queued: Vec<&str> = messages
        .iter()
        .filter(|m| m["type"] == "step.status" && m["stepIndex"] == 3)
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert_eq!(queued, ["pending", "running", "cancelled"]);
    let child = messages
        .iter()
        .find(|m| m["type"] == "step.status" && m["stepIndex"] == 2)
        .unwrap();
    assert_eq!(
        (child["concurrencyKind"].as_str(), child["groupId"].as_str()),
        (Some("parallel-child"), Some("g0"))
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_and_forced_cancel_leave_no_process_behind() {
    let h = start(|c| c.with_cancel_grace(Duration::from_secs(30))).await;
    h.registered().await;
    let step = json!([{"name": "long", "run": "sleep 300 & echo pids $$ $!; wait"}]);
    let run = h.dispatch("graceful", step).await;
    let id = h.agent_id();
    assert!(
        h.mock
            .wait_until(|_| !h.lines("graceful", 0).is_empty(), WAIT)
            .await
    );
    h.mock.cancel(&id, &run, "graceful", false).await.unwrap();
    let status = h.terminal_status("graceful").await;
    assert_eq!(status["state"], "cancelled");
    let seq = h.sequence("graceful");
    assert!(
        seq.contains(&"job.status cancelling".to_string()),
        "{seq:?}"
    );
    assert!(
        seq.contains(&"step.status 0 cancelled".to_string()),
        "{seq:?}"
    );
    wait_dead(&pids(&h.lines("graceful", 0))).await;

    // A step that ignores SIGTERM: force kills at once, long before the 30 s grace.
    let step = json!([{"name": "stubborn", "run": "trap '' TERM; sleep 300 & echo pids $$ $!; while true; do sleep 0.05; done"}]);
    let run = h.dispatch("forced", step).await;
    assert!(
        h.mock
            .wait_until(|_| !h.lines("forced", 0).is_empty(), WAIT)
            .await
    );
    let asked = Instant::now();
    h.mock.cancel(&id, &run, "forced", true).await.unwrap();
    assert_eq!(h.terminal_status("forced").await["state"], "cancelled");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "force took {:?}",
        asked.elapsed()
    );
    wait_dead(&pids(&h.lines("forced", 0))).await;
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_run_at_once_and_a_third_is_rejected_busy_then_draining() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("go");
    let h = start(|c| c.with_max_concurrency(2)).await;
    h.registered().await;
    let wait_gate = format!(
        "echo workspace $KICI_WORKSPACE; while [ ! -f {} ]; do sleep 0.02; done",
        gate.display()
    );
    h.dispatch("one", json!([{"name": "a", "run": wait_gate}]))
        .await;
    h.dispatch("two", json!([{"name": "b", "run": wait_gate}]))
        .await;
    assert!(
        h.mock
            .wait_until(
                |_| !h.lines("one", 0).is_empty() && !h.lines("two", 0).is_empty(),
                WAIT
            )
            .await
    );
    assert_ne!(
        h.lines("one", 0),
        h.lines("two", 0),
        "jobs must have separate workspaces"
    );
    h.dispatch("three", json!([{"name": "c", "run": "true"}]))
        .await;
    let reject = h
        .mock
        .wait_for_message("job.reject", |m| m["jobId"] == "three", WAIT)
        .await
        .unwrap();
    assert_eq!(reject["reason"], "busy");
    // Answered within the mock's 10 s ack deadline, or it records a violation (checked below).
    assert!(h.mock.ack_latency("three").is_some());

    h.agent.drain();
    h.dispatch("four", json!([{"name": "d", "run": "true"}]))
        .await;
    let reject = h
        .mock
        .wait_for_message("job.reject", |m| m["jobId"] == "four", WAIT)
        .await
        .unwrap();
    assert_eq!(reject["reason"], "draining");
    std::fs::write(&gate, "").unwrap();
    assert_eq!(h.terminal_status("one").await["state"], "success");
    assert_eq!(h.terminal_status("two").await["state"], "success");
    // Drained and idle: the agent stops by itself.
    assert!(tokio::task::block_in_place(|| h.agent.wait(Some(WAIT))));
    h.assert_no_violations();
}

#[cfg(feature = "git")]
fn commit(repo: &git2::Repository, content: &str, message: &str) -> git2::Oid {
    let path = repo.workdir().unwrap().join("version.txt");
    std::fs::write(path, content).unwrap();
    let mut index = repo.index().unwrap();
    index.add_path(std::path::Path::new("version.txt")).unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("test", "test@example.invalid").unwrap();
    let parents: Vec<git2::Commit> = repo
        .head()
        .ok()
        .and_then(|h| h.peel_to_commit().ok())
        .into_iter()
        .collect();
    let parents: Vec<&git2::Commit> = parents.iter().collect();
    repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .unwrap()
}

#[cfg(feature = "git")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_of_a_local_repo_at_a_sha_behind_the_ref_head() {
    let origin = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init(origin.path()).unwrap();
    let first = commit(&repo, "one", "first");
    commit(&repo, "two", "second");
    let branch = repo.head().unwrap().shorthand().unwrap().to_owned();
    let h = start(|c| c).await;
    h.registered().await;
    let url = format!("file://{}", origin.path().display());
    let run_id = "run-co";
    let d = kici_mock_orchestrator::sample_dispatch(
        run_id,
        "co",
        &url,
        &branch,
        &first.to_string(),
        json!([{"name": "show", "run": "cat version.txt; echo; pwd"}]),
    );
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    assert_eq!(h.terminal_status("co").await["state"], "success");
    let lines = h.lines("co", 0);
    assert_eq!(lines[0], "one");
    let workspace = std::path::PathBuf::from(&lines[1]);
    assert!(workspace
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("kici-"));
    assert!(!workspace.exists(), "workspace not removed");
    let metrics = h.http_get("/metrics").await.1;
    assert!(
        metrics.contains("kici_agent_clone_duration_seconds_count 1"),
        "{metrics}"
    );
    h.assert_no_violations();
}

#[cfg(not(feature = "git"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_git_feature_a_job_with_a_repository_fails_naming_it() {
    let h = start(|c| c).await;
    h.registered().await;
    h.dispatch_with("nogit", json!([{"name": "s", "run": "true"}]), |d| {
        d["repoUrl"] = json!("https://127.0.0.1:1/acme/widgets.git");
    })
    .await;
    let status = h.terminal_status("nogit").await;
    assert_eq!(status["state"], "failed");
    let error = status["data"]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("Checkout failed: repository https://127.0.0.1:1/acme/widgets.git: ")
            && error.contains("the `git` cargo feature"),
        "{status}"
    );
    assert!(h.lines("nogit", 0).is_empty(), "no step may run");
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_auth_failure_never_shows_the_secret() {
    let h = start(|c| c).await;
    h.registered().await;
    let secret = "ghs_topsecretinstallationtoken123";
    let run = h
        .dispatch_with("auth", json!([{"name": "s", "run": "true"}]), |d| {
            d["repoUrl"] = json!("https://127.0.0.1:1/acme/widgets.git");
            d["token"] = json!(secret);
            d["sourceAuth"] = json!({"kind": "basic", "user": "x-access-token", "secret": secret});
        })
        .await;
    let _ = run;
    let status = h.terminal_status("auth").await;
    assert_eq!(status["state"], "failed");
    let everything = serde_json::to_string(&h.job_messages("auth")).unwrap();
    assert!(
        everything.contains("127.0.0.1:1"),
        "the error should name the repo: {everything}"
    );
    assert!(!everything.contains(secret));
    assert!(!everything.contains(&base64::engine::general_purpose::STANDARD.encode(secret)));
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_masked_plain_base64_multiline_and_split_across_writes() {
    let h = start(|c| c).await;
    h.registered().await;
    let pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkq\nhkiG9w0BAQEFAASC\n-----END KEY-----";
    let b64 = base64::engine::general_purpose::STANDARD.encode("plain-secret-value");
    h.dispatch_with("mask", json!([{"name": "leak", "run": format!(
        "echo 'a plain-secret-value b'; echo '{b64}'; printf 'MIIEvQIBADANBgkq\\n'; printf 'split-sec'; sleep 0.1; printf 'ret-value\\n'; echo ok"
    )}]), |d| {
        d["secrets"] = json!({"PLAIN": "plain-secret-value", "PEM": pem});
        d["namespacedSecrets"] = json!({"deploy": {"TOKEN": "split-secret-value"}});
    }).await;
    assert_eq!(h.terminal_status("mask").await["state"], "success");
    assert_eq!(h.lines("mask", 0), ["a *** b", "***", "***", "***", "ok"]);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_cap_truncates_once_and_reports_bytes() {
    let h = start(|c| c).await;
    h.registered().await;
    h.dispatch_with(
        "cap",
        json!([{"name": "chatty", "run": "for i in $(seq 1 100); do printf '%050d\\n' $i; done"}]),
        |d| {
            d["maxLogSizeBytes"] = json!(1000);
        },
    )
    .await;
    assert_eq!(h.terminal_status("cap").await["state"], "success");
    let lines = h.lines("cap", 0);
    assert_eq!(lines.len(), 21, "{lines:?}");
    assert_eq!(lines[20], "[TRUNCATED: log output exceeded 1000 bytes]");
    let step = h
        .job_messages("cap")
        .into_iter()
        .find(|m| m["type"] == "step.status" && m["state"] == "success")
        .unwrap();
    assert_eq!(step["logBytesStreamed"], 1000);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_executor_gets_the_step_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("runner.sh");
    std::fs::write(&program, "#!/bin/sh\ninput=$(cat)\ncase \"$input\" in *'\"step\":{\"attempt\":1,\"index\":1,\"name\":\"bad\"'*) echo failing; exit 7;; esac\necho \"got $KICI_STEP_NAME\"\n").unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&program)
        .status()
        .unwrap();
    let h = start(|c| c.with_process_executor(program.display().to_string())).await;
    h.registered().await;
    h.dispatch(
        "proc",
        json!([{"name": "good", "hasOutputs": false}, {"name": "bad", "hasOutputs": false}]),
    )
    .await;
    let status = h.terminal_status("proc").await;
    assert_eq!(status["state"], "failed");
    assert_eq!(h.lines("proc", 0), ["got good"]);
    assert_eq!(
        status["data"]["stepResults"][1]["error"],
        "Command failed with exit code 7"
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_with_nothing_to_run_fails_naming_the_step() {
    let h = start_with(MockConfig::default(), |c| c, ExecutorRegistry::new()).await;
    h.registered().await;
    // Not a TypeScript job (those go to the TypeScript runner, see tests/typescript.rs).
    h.dispatch_with(
        "none",
        json!([{"name": "mystery", "hasOutputs": false}]),
        |d| {
            d["jobConfig"].as_object_mut().unwrap().remove("source");
        },
    )
    .await;
    let status = h.terminal_status("none").await;
    assert_eq!(status["state"], "failed");
    let error = status["data"]["stepResults"][0]["error"].as_str().unwrap();
    assert!(error.contains("'mystery'"), "{error}");
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_produced_while_disconnected_is_delivered_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("go");
    let h = start(|c| c).await;
    h.registered().await;
    let id = h.agent_id();
    h.dispatch("offline", json!([
        {"name": "wait", "run": format!("echo started; while [ ! -f {} ]; do sleep 0.02; done; echo done", gate.display())},
        {"name": "next", "run": "echo next"}
    ])).await;
    assert!(
        h.mock
            .wait_until(|_| !h.lines("offline", 0).is_empty(), WAIT)
            .await
    );
    h.mock.set_accepting(false);
    h.mock.disconnect(&id, 1001).await.unwrap();
    common::wait_state(&h.agent, |s| !s.registered).await;
    std::fs::write(&gate, "").unwrap();
    // The job finishes while nobody listens.
    common::wait_state(&h.agent, |s| s.active_jobs == 0).await;
    h.mock.set_accepting(true);
    assert_eq!(h.terminal_status("offline").await["state"], "success");
    let registrations = h.mock.registrations();
    let again = registrations.last().unwrap();
    assert_eq!(
        again["inFlightJobs"],
        json!([{"jobId": "offline", "runId": "run-offline"}])
    );
    assert_eq!(
        h.sequence("offline"),
        [
            "job.ack",
            "job.status running",
            "step.status 0 running",
            "step.status 0 success",
            "step.status 1 running",
            "step.status 1 success",
            "job.status success"
        ]
    );
    assert_eq!(h.lines("offline", 0), ["started", "done"]);
    h.assert_no_violations();
}

/// The orchestrator frees the slot when the terminal status arrives and may dispatch at once:
/// the agent must not answer `busy` then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_right_after_a_terminal_status_is_accepted() {
    let h = start(|c| c).await;
    h.registered().await;
    for i in 0..10 {
        let job = format!("back-to-back-{i}");
        h.dispatch(&job, json!([{"name": "s", "run": "true"}]))
            .await;
        assert_eq!(h.terminal_status(&job).await["state"], "success");
    }
    assert!(
        h.mock.messages_of_type("job.reject").is_empty(),
        "{:?}",
        h.mock.messages_of_type("job.reject")
    );
    h.assert_no_violations();
}

/// Shutdown gives running jobs their grace, then kills their processes and reports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_running_jobs_after_the_grace_and_reports_them() {
    let h = start(|c| c.with_shutdown_grace(Duration::from_millis(500))).await;
    h.registered().await;
    let step =
        json!([{"name": "forever", "run": "trap '' TERM; sleep 300 & echo pids $$ $!; wait"}]);
    h.dispatch("shutdown", step).await;
    assert!(
        h.mock
            .wait_until(|_| !h.lines("shutdown", 0).is_empty(), WAIT)
            .await
    );
    let asked = Instant::now();
    h.agent.shutdown(Duration::from_millis(500));
    assert!(tokio::task::block_in_place(|| h.agent.wait(Some(WAIT))));
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "the job did not get its grace"
    );
    assert_eq!(h.terminal_status("shutdown").await["state"], "cancelled");
    wait_dead(&pids(&h.lines("shutdown", 0))).await;
    assert!(h
        .mock
        .closes()
        .iter()
        .any(|c| !c.by_server && c.code == Some(1000)));
    h.assert_no_violations();
}
