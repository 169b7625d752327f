//! Fleet telemetry and the run timeline end to end against the strict mock orchestrator, which
//! holds `run.event` / `job.context` to their protocol.md §4.4 shapes.

mod common;

use common::start;
use serde_json::{json, Value};

#[cfg(feature = "git")]
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
#[cfg(feature = "git")]
fn label(m: &Value) -> String {
    let kind = m["type"].as_str().unwrap_or_default();
    let detail = m["eventType"]
        .as_str()
        .or(m["state"].as_str())
        .unwrap_or_default();
    format!("{kind} {detail}").trim_end().to_owned()
}

// Its job clones a repository.
#[cfg(feature = "git")]
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

/// Installs the `agent.log` layer for this test binary (once; every test's agents share it).
fn install_agent_log_layer() {
    use tracing_subscriber::layer::SubscriberExt;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::registry()
            .with(kici_agent_core::agent_log_layer())
            .with(tracing_subscriber::filter::LevelFilter::INFO);
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
    });
}

/// Every `agent.log` line the mock accepted from `agent_id`, in order.
fn agent_log_lines(h: &common::Harness, agent_id: &str) -> Vec<String> {
    h.mock
        .received()
        .into_iter()
        .filter(|r| r.accepted && r.msg["type"] == "agent.log" && r.msg["agentId"] == agent_id)
        .flat_map(|r| r.msg["lines"].as_array().cloned().unwrap_or_default())
        .map(|line| line.as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_log_lines_stream_as_json_and_replay_after_an_outage_behind_one_gap_marker() {
    install_agent_log_layer();
    let h = start(|c| c).await;
    h.registered().await;
    let id = h.agent_id();
    tracing::info!(probe = 7, "agent log probe online");
    assert!(
        h.mock
            .wait_until(
                |_| agent_log_lines(&h, &id)
                    .iter()
                    .any(|l| l.contains("agent log probe online")),
                common::WAIT
            )
            .await
    );
    let online = agent_log_lines(&h, &id)
        .into_iter()
        .find(|l| l.contains("agent log probe online"))
        .unwrap();
    let record: Value = serde_json::from_str(&online).expect("a JSON line");
    assert_eq!(record["message"], "agent log probe online");
    assert_eq!(record["level"], "info");
    assert_eq!(record["service"], "agent");
    assert_eq!(record["probe"], 7);

    h.mock.set_accepting(false);
    h.mock.disconnect(&id, 1001).await.unwrap();
    common::wait_state(&h.agent, |s| !s.registered).await;
    for i in 0..3 {
        tracing::info!("agent log probe offline {i}");
    }
    let before = agent_log_lines(&h, &id).len();
    h.mock.set_accepting(true);
    assert!(
        h.mock
            .wait_until(
                |_| agent_log_lines(&h, &id)
                    .iter()
                    .any(|l| l.contains("agent log probe offline 2")),
                common::WAIT
            )
            .await,
        "the offline lines never arrived; agent {:?}, {} registrations, listening {}, closes {:?}, \
         problems {:?}, last lines {:?}",
        h.agent.state(),
        h.mock.registrations().len(),
        h.mock.is_listening(),
        h.mock.closes(),
        h.mock.violations(),
        agent_log_lines(&h, &id).iter().rev().take(5).collect::<Vec<_>>()
    );
    let replay = agent_log_lines(&h, &id).split_off(before);
    let markers: Vec<&String> = replay.iter().filter(|l| l.starts_with("--- ")).collect();
    assert_eq!(markers.len(), 1, "{replay:?}");
    assert!(
        replay[0].starts_with("--- Orchestrator offline for ")
            && replay[0].contains("buffered log lines.")
            && replay[0].ends_with(" ---"),
        "{replay:?}"
    );
    let offline: Vec<usize> = (0..3)
        .map(|i| {
            replay
                .iter()
                .position(|l| l.contains(&format!("agent log probe offline {i}")))
                .unwrap_or_else(|| panic!("offline line {i} missing: {replay:?}"))
        })
        .collect();
    assert!(offline.windows(2).all(|w| w[0] < w[1]), "order kept");
    h.assert_no_violations();
}

/// The bundle answering `requestId`, reassembled from its chunks in `seq` order.
async fn bundle_bytes(h: &common::Harness, request_id: &str) -> Vec<u8> {
    use base64::Engine as _;
    let id = request_id.to_owned();
    h.mock
        .wait_for_message(
            "fleet.bundle.chunk",
            move |m| m["requestId"] == id.as_str() && m["isLast"] == true,
            common::WAIT,
        )
        .await
        .expect("the last chunk");
    let mut chunks: Vec<Value> = h
        .mock
        .messages_of_type("fleet.bundle.chunk")
        .into_iter()
        .filter(|m| m["requestId"] == request_id)
        .collect();
    chunks.sort_by_key(|m| m["seq"].as_u64().unwrap());
    let seqs: Vec<u64> = chunks.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..chunks.len() as u64).collect::<Vec<_>>());
    chunks
        .iter()
        .flat_map(|m| {
            base64::engine::general_purpose::STANDARD
                .decode(m["dataB64"].as_str().unwrap())
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_logs_request_gets_a_zip_with_redacted_config_host_facts_logs_and_jobs() {
    use std::io::Read;
    install_agent_log_layer();
    // KICI_LOG_DIR files in the bundle: bundle.rs unit tests (the builder has no log-dir setter).
    let h = start(|c| c.with_token(kici_mock_orchestrator::TEST_TOKEN)).await;
    h.registered().await;
    tracing::info!("bundle probe line");
    h.mock
        .send_raw(
            &h.agent_id(),
            r#"{"type":"fleet.logs.request","requestId":"req-1","logWindowHours":24,"maxBytes":10000000}"#,
        )
        .await
        .unwrap();
    let zip_bytes = bundle_bytes(&h, "req-1").await;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes)).unwrap();
    let mut read = |name: &str| {
        let mut text = String::new();
        archive
            .by_name(name)
            .unwrap_or_else(|_| panic!("{name} missing"))
            .read_to_string(&mut text)
            .unwrap();
        text
    };
    let manifest: Value = serde_json::from_str(&read("manifest.json")).unwrap();
    assert_eq!(manifest["kind"], "agent");
    assert_eq!(manifest["agentId"], h.agent_id().as_str());
    let config_text = read("config/config.json");
    assert!(!config_text.contains(kici_mock_orchestrator::TEST_TOKEN));
    let config: Value = serde_json::from_str(&config_text).unwrap();
    assert_eq!(config["agentToken"], "set");
    let info: Value = serde_json::from_str(&read("system/info.json")).unwrap();
    assert_eq!(info["platform"], std::env::consts::OS);
    assert!(read("system/metrics.txt").contains("kici_agent_connection_status 1"));
    assert!(read("logs/recent.log").contains("bundle probe line"));
    assert_eq!(read("system/jobs.json"), "[]");

    // Too small a budget: a clear error instead of a truncated archive.
    h.mock
        .send_raw(
            &h.agent_id(),
            r#"{"type":"fleet.logs.request","requestId":"req-2","logWindowHours":1,"maxBytes":10}"#,
        )
        .await
        .unwrap();
    let error = h
        .mock
        .wait_for_message(
            "fleet.bundle.error",
            |m| m["requestId"] == "req-2",
            common::WAIT,
        )
        .await
        .expect("fleet.bundle.error");
    assert!(error["message"].as_str().unwrap().contains("maxBytes 10"));
    h.assert_no_violations();
}
