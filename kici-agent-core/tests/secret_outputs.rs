//! Secret outputs end to end through the strict mock orchestrator: a shell step's
//! `$KICI_SECRET_OUTPUT` and a Rust executor's `StepIo::set_secret_output` arrive only in
//! `job.status.secretOutputs`, sealed for the run's key (the test holds the private key and
//! opens them), are masked wherever a step prints them, and fail the step clearly when the
//! dispatch carries no `runPublicKey`.

mod common;

use std::sync::Arc;

use common::start_with;
use kici_agent_core::{Executor, ExecutorRegistry, JobContext, StepContext, StepIo, StepResult};
use kici_mock_orchestrator::run_keys::RunKeyPair;
use kici_mock_orchestrator::MockConfig;
use serde_json::{json, Value};

const TOKEN: &str = "deploy-token-4f9a2c";
const SIGNATURE: &str = "sig-77aa91be";

/// Sets a secret output and then prints it, as a careless executor would.
struct Signer;

#[async_trait::async_trait]
impl Executor for Signer {
    fn name(&self) -> &str {
        "signer"
    }

    async fn run_step(&self, _job: &JobContext, _step: &StepContext, io: StepIo) -> StepResult {
        let sent = io.set_secret_output("SIGNATURE", SIGNATURE).await;
        io.line(format!("signed: {SIGNATURE} ({sent:?})")).await;
        Ok(())
    }
}

fn executors() -> ExecutorRegistry {
    let mut executors = ExecutorRegistry::new();
    executors.for_step("sign", Arc::new(Signer));
    executors
}

/// Every message the mock received, as text.
fn all_traffic(h: &common::Harness) -> String {
    h.mock
        .received()
        .iter()
        .map(|r| r.msg.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_outputs_are_sealed_for_the_run_key_and_masked_everywhere() {
    let run_key = RunKeyPair::generate();
    let h = start_with(MockConfig::default(), |c| c, executors()).await;
    h.registered().await;
    h.dispatch_with(
        "sealed",
        json!([
            {"name": "mint", "run": format!(
                "echo 'TOKEN={TOKEN}' >> \"$KICI_SECRET_OUTPUT\"; echo 'plain=visible' >> \"$KICI_OUTPUT\"; echo \"minted {TOKEN}\""
            )},
            {"name": "sign"},
            {"name": "later", "run": format!("echo 'later {TOKEN} {SIGNATURE}'; echo \"file: $KICI_SECRET_OUTPUT\"")},
        ]),
        |d| d["runPublicKey"] = json!(run_key.public_key_base64()),
    )
    .await;
    let status = h.terminal_status("sealed").await;
    assert_eq!(status["state"], "success", "{status}");
    let sealed = status["secretOutputs"]
        .as_object()
        .expect("secretOutputs on the terminal status");
    assert_eq!(
        sealed.keys().collect::<Vec<_>>(),
        ["SIGNATURE", "TOKEN"],
        "{status}"
    );
    assert_eq!(run_key.open(&sealed["TOKEN"]).unwrap(), TOKEN);
    assert_eq!(run_key.open(&sealed["SIGNATURE"]).unwrap(), SIGNATURE);
    // One ephemeral key per job; another run's key opens nothing.
    assert_eq!(
        sealed["TOKEN"]["agentPublicKey"],
        sealed["SIGNATURE"]["agentPublicKey"]
    );
    assert!(RunKeyPair::generate().open(&sealed["TOKEN"]).is_err());
    // Plain outputs keep what is not secret, and nothing that is.
    assert_eq!(
        status["data"]["outputs"],
        json!({"mint": {"plain": "visible"}})
    );

    assert_eq!(h.lines("sealed", 0), ["minted ***"]);
    assert_eq!(h.lines("sealed", 1), ["signed: *** (Ok(()))"]);
    assert_eq!(h.lines("sealed", 2)[0], "later *** ***");
    let traffic = all_traffic(&h);
    for value in [TOKEN, SIGNATURE] {
        assert!(!traffic.contains(value), "{value} left the agent in clear");
    }
    h.assert_no_violations();
    h.agent.shutdown(std::time::Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_run_key_a_secret_output_fails_its_step_and_is_never_sent() {
    let h = start_with(MockConfig::default(), |c| c, executors()).await;
    h.registered().await;
    h.dispatch_with(
        "keyless",
        json!([
            {"name": "mint", "continueOnError": true, "run": format!(
                "echo 'TOKEN={TOKEN}' >> \"$KICI_SECRET_OUTPUT\"; echo \"minted {TOKEN}\""
            )},
            {"name": "sign"},
        ]),
        |d| {
            d.as_object_mut().unwrap().remove("runPublicKey");
        },
    )
    .await;
    let status = h.terminal_status("keyless").await;
    assert_eq!(status["state"], "failed", "{status}");
    assert!(status.get("secretOutputs").is_none(), "{status}");
    let failures: Vec<Value> = h
        .job_messages("keyless")
        .into_iter()
        .filter(|m| m["type"] == "step.status" && m["state"] == "failed")
        .collect();
    assert_eq!(failures.len(), 2, "both steps fail: {failures:?}");
    for (failure, key) in failures.iter().zip(["TOKEN", "SIGNATURE"]) {
        let error = failure["data"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("secret output '{key}'")) && error.contains("no runPublicKey"),
            "{error}"
        );
    }
    // The executor was told, and the values are still masked.
    assert_eq!(h.lines("keyless", 0), ["minted ***"]);
    assert!(
        h.lines("keyless", 1)[0].starts_with("signed: *** (Err(NoRunKey"),
        "{:?}",
        h.lines("keyless", 1)
    );
    let traffic = all_traffic(&h);
    for value in [TOKEN, SIGNATURE] {
        assert!(!traffic.contains(value), "{value} left the agent in clear");
    }
    h.assert_no_violations();
    h.agent.shutdown(std::time::Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_fails_sends_no_secret_outputs() {
    let run_key = RunKeyPair::generate();
    let h = start_with(MockConfig::default(), |c| c, executors()).await;
    h.registered().await;
    h.dispatch_with(
        "failing",
        json!([
            {"name": "sign"},
            {"name": "boom", "run": "exit 3"},
        ]),
        |d| d["runPublicKey"] = json!(run_key.public_key_base64()),
    )
    .await;
    let status = h.terminal_status("failing").await;
    assert_eq!(status["state"], "failed", "{status}");
    assert!(status.get("secretOutputs").is_none(), "{status}");
    assert!(
        h.lines("failing", -1)
            .iter()
            .any(|l| l.contains("1 secret output(s) not sent")),
        "{:?}",
        h.lines("failing", -1)
    );
    h.assert_no_violations();
    h.agent.shutdown(std::time::Duration::from_secs(5));
}
