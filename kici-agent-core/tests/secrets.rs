//! Secrets outside the step log, through the strict mock orchestrator: step outputs
//! (`$KICI_OUTPUT` and executors' own), step errors, events, and the notice about values too
//! short to mask.

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::{start_with, WAIT};
use kici_agent_core::{
    Event, Executor, ExecutorRegistry, JobContext, StepContext, StepFailure, StepIo, StepResult,
};
use kici_mock_orchestrator::MockConfig;
use serde_json::json;

const SECRET: &str = "p@ss w0rd!";

/// Puts the secret into an output and into its error, as a careless executor would.
struct Leaky;

#[async_trait::async_trait]
impl Executor for Leaky {
    fn name(&self) -> &str {
        "leaky"
    }

    async fn run_step(&self, _job: &JobContext, _step: &StepContext, io: StepIo) -> StepResult {
        io.set_output(
            "login",
            json!({ "user": "bot", "tried": [SECRET, "other"] }),
        )
        .await;
        io.set_output("plain", json!("nothing to hide")).await;
        Err(StepFailure::new(format!("login with {SECRET} was refused")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_step_errors_and_events_are_masked() {
    let mut executors = ExecutorRegistry::new();
    executors.for_step("leak", Arc::new(Leaky));
    let h = start_with(MockConfig::default(), |c| c, executors).await;
    h.registered().await;
    let encoded = base64::engine::general_purpose::STANDARD.encode(SECRET);
    h.dispatch_with(
        "outputs",
        json!([
            {"name": "out", "run": format!(
                "echo 'pw={SECRET}' >> \"$KICI_OUTPUT\"; echo 'enc={encoded}' >> \"$KICI_OUTPUT\"; echo 'ok=yes' >> \"$KICI_OUTPUT\""
            )},
            {"name": "leak", "continueOnError": true},
        ]),
        |d| {
            d["secrets"] = json!({"PW": SECRET, "PIN": "42"});
        },
    )
    .await;
    let status = h.terminal_status("outputs").await;
    let outputs = &status["data"]["outputs"];
    assert_eq!(
        outputs["out"],
        json!({"pw": "***", "enc": "***", "ok": "yes"})
    );
    assert_eq!(
        outputs["leak"],
        json!({"login": {"user": "bot", "tried": ["***", "other"]}, "plain": "nothing to hide"})
    );
    let failed = h
        .job_messages("outputs")
        .into_iter()
        .find(|m| m["type"] == "step.status" && m["state"] == "failed")
        .expect("the leaky step failed");
    assert_eq!(failed["data"]["error"], "login with *** was refused");
    assert_eq!(
        status["data"]["stepResults"][1]["error"],
        "login with *** was refused"
    );

    let job_log = h.lines("outputs", -1);
    for key in ["pw", "enc"] {
        let notice =
            format!("[kici] Output '{key}' of step 'out' holds a secret; it is sent masked");
        assert!(job_log.contains(&notice), "{job_log:?}");
    }
    let short_notices = job_log
        .iter()
        .filter(|line| line.contains("shorter than 3 characters"))
        .collect::<Vec<_>>();
    assert_eq!(
        short_notices,
        ["[kici] 1 secret value(s) shorter than 3 characters cannot be masked in this job's output"]
    );

    let everything = serde_json::to_string(&h.job_messages("outputs")).unwrap();
    assert!(!everything.contains(SECRET), "{everything}");
    assert!(!everything.contains(&encoded), "{everything}");

    // `next_event` blocks: run it where blocking is allowed.
    let step_error = tokio::task::block_in_place(|| loop {
        match h.agent.next_event(Some(WAIT)) {
            Some(Event::StepFinished {
                step_name, error, ..
            }) if step_name == "leak" => break error,
            Some(_) => {}
            None => panic!("no step_finished event for the leaky step"),
        }
    });
    assert_eq!(step_error.as_deref(), Some("login with *** was refused"));
    h.assert_no_violations();
}
