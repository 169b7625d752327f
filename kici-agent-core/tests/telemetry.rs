//! Fleet telemetry and the run timeline end to end against the strict mock orchestrator, which
//! holds `run.event` / `job.context` to their protocol.md §4.4 shapes.

mod common;

use common::start;
use serde_json::{json, Value};

fn commit(repo: &git2::Repository) -> git2::Oid {
    let path = repo.workdir().unwrap().join("file.txt");
    std::fs::write(path, "content").unwrap();
    let mut index = repo.index().unwrap();
    index.add_path(std::path::Path::new("file.txt")).unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("test", "test@example.invalid").unwrap();
    repo.commit(Some("HEAD"), &sig, &sig, "only", &tree, &[])
        .unwrap()
}

/// `type` plus `eventType` or `state` of a message, for order checks.
fn label(m: &Value) -> String {
    let kind = m["type"].as_str().unwrap_or_default();
    let detail = m["eventType"]
        .as_str()
        .or(m["state"].as_str())
        .unwrap_or_default();
    format!("{kind} {detail}").trim_end().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reports_its_timeline_in_protocol_order_without_secret_values() {
    let origin = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init(origin.path()).unwrap();
    let sha = commit(&repo);
    let branch = repo.head().unwrap().shorthand().unwrap().to_owned();
    let h = start(|c| c.with_labels(["gpu"])).await;
    h.registered().await;
    let url = format!("file://{}", origin.path().display());
    let mut dispatch = kici_mock_orchestrator::sample_dispatch(
        "run-tl",
        "tl",
        &url,
        &branch,
        &sha.to_string(),
        json!([{"name": "one", "run": "true"}]),
    );
    dispatch["secrets"] = json!({"DEPLOY_PASSWORD": "hunter2-secret-value"});
    dispatch["jobConfig"]["env"] = json!({"MODE": "fast", "NPM_TOKEN": "npm-token-value"});
    h.mock.dispatch(&h.agent_id(), dispatch).await.unwrap();
    assert_eq!(h.terminal_status("tl").await["state"], "success");
    let teardown = h
        .mock
        .wait_for_message(
            "run.event",
            |m| m["eventType"] == "agent.teardown",
            common::WAIT,
        )
        .await
        .expect("agent.teardown");
    assert_eq!(teardown["jobId"], "tl");

    let messages: Vec<Value> = h
        .job_messages("tl")
        .into_iter()
        .filter(|m| m["type"] != "log.chunk" && m["type"] != "job.heartbeat")
        .collect();
    let order: Vec<String> = messages.iter().map(label).collect();
    assert_eq!(
        order,
        [
            "job.ack",
            "job.status running",
            "job.context",
            "run.event agent.execution.start",
            "run.event agent.clone.start",
            "run.event agent.clone.end",
            "step.status running",
            "step.status success",
            "run.event agent.execution.end",
            "job.status success",
            "run.event agent.teardown",
        ]
    );
    let end = &messages[8];
    assert_eq!(end["metadata"]["status"], "success");
    assert!(end["durationMs"].is_u64());
    assert_eq!(messages[5]["metadata"]["success"], true);

    let context = &messages[2]["context"];
    assert_eq!(context["gitRef"], branch.as_str());
    assert_eq!(context["sandboxType"], "bare-metal");
    assert!(context["labels"]
        .as_array()
        .unwrap()
        .contains(&json!("gpu")));
    assert!(context["workingDirectory"]
        .as_str()
        .unwrap()
        .contains("kici-"));
    let var = |name: &str| {
        context["envVars"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {context}"))
    };
    assert_eq!(
        var("MODE"),
        json!({"name":"MODE","value":"fast","category":"user"})
    );
    assert_eq!(var("NPM_TOKEN")["value"], "***");
    assert_eq!(
        var("DEPLOY_PASSWORD"),
        json!({"name":"DEPLOY_PASSWORD","value":"***","category":"secret"})
    );
    assert_eq!(var("CI")["category"], "system");
    let everything = serde_json::to_string(&messages).unwrap();
    assert!(
        !everything.contains("hunter2-secret-value") && !everything.contains("npm-token-value")
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_snapshot_follows_each_job() {
    let h = start(|c| c).await;
    h.registered().await;
    h.dispatch("m1", json!([{"name": "one", "run": "true"}]))
        .await;
    assert_eq!(h.terminal_status("m1").await["state"], "success");
    let snapshot = h
        .mock
        .wait_for_message(
            "agent.metrics",
            |m| {
                m["metrics"].as_array().is_some_and(|all| {
                    all.iter().any(|s| {
                        s["name"] == "kici_agent_jobs_total"
                            && s["labels"]["status"] == "success"
                            && s["value"] == 1.0
                    })
                })
            },
            common::WAIT,
        )
        .await
        .expect("agent.metrics after the job");
    assert_eq!(snapshot["agentId"], h.agent_id().as_str());
    let series = snapshot["metrics"].as_array().unwrap();
    let steps = series
        .iter()
        .find(|s| s["name"] == "kici_agent_step_duration_seconds")
        .expect("step histogram");
    assert_eq!(steps["type"], "histogram");
    assert_eq!(steps["count"], 1);
    assert!(steps["buckets"].as_array().unwrap().len() >= 8);
    // It went after the job's terminal status.
    let received = h.mock.received();
    let position = |pred: &dyn Fn(&Value) -> bool| received.iter().position(|r| pred(&r.msg));
    let terminal = position(&|m| m["type"] == "job.status" && m["state"] == "success").unwrap();
    let metrics = position(&|m| m["type"] == "agent.metrics").unwrap();
    assert!(metrics > terminal);
    h.assert_no_violations();
}
