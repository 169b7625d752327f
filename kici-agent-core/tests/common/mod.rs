//! Shared harness for the end-to-end tests: a strict mock orchestrator on loopback and an
//! agent talking to it.
#![allow(dead_code)]

use std::time::Duration;

use kici_agent_core::config::AgentConfigBuilder;
use kici_agent_core::{Agent, AgentConfig, ExecutorRegistry};
use kici_mock_orchestrator::{AuthMode, MockConfig, MockOrchestrator, TEST_TOKEN};
use serde_json::Value;

/// Generous upper bound for anything the tests wait for.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Harness {
    pub mock: MockOrchestrator,
    pub agent: Agent,
}

/// A config builder pointed at `mock` (with the test token when it wants one), HTTP on an
/// ephemeral loopback port, and fast heartbeats.
pub fn config_for(mock: &MockOrchestrator) -> AgentConfigBuilder {
    let builder = AgentConfig::builder(mock.ws_url());
    let builder = match mock.config().auth {
        AuthMode::Token(_) => builder.with_token(TEST_TOKEN),
        AuthMode::None => builder,
    };
    builder
        .with_port(0)
        .with_bind_address("127.0.0.1".parse().unwrap())
        .with_heartbeat_interval(Duration::from_millis(200))
        .with_cancel_grace(Duration::from_secs(2))
        .with_shutdown_grace(Duration::from_secs(3))
}

pub async fn start_with(
    mock_config: MockConfig,
    configure: impl FnOnce(AgentConfigBuilder) -> AgentConfigBuilder,
    executors: ExecutorRegistry,
) -> Harness {
    let mock = MockOrchestrator::start(mock_config)
        .await
        .expect("mock starts");
    let config = configure(config_for(&mock)).build().expect("valid config");
    let agent = Agent::with_executors(config, executors).expect("agent builds");
    agent.start().expect("agent starts");
    Harness { mock, agent }
}

pub async fn start(configure: impl FnOnce(AgentConfigBuilder) -> AgentConfigBuilder) -> Harness {
    start_with(MockConfig::default(), configure, ExecutorRegistry::new()).await
}

impl Harness {
    pub fn agent_id(&self) -> String {
        self.agent.agent_id().to_owned()
    }

    pub async fn registered(&self) {
        let id = self.agent_id();
        assert!(
            self.mock
                .wait_until(|m| m.registered_agents().contains(&id), WAIT)
                .await,
            "agent never registered"
        );
    }

    /// Dispatches a job with these steps (no checkout unless `repo` is given).
    pub async fn dispatch(&self, job_id: &str, steps: Value) -> String {
        self.dispatch_with(job_id, steps, |_| {}).await
    }

    pub async fn dispatch_with(
        &self,
        job_id: &str,
        steps: Value,
        edit: impl FnOnce(&mut Value),
    ) -> String {
        let run_id = format!("run-{job_id}");
        let mut dispatch =
            kici_mock_orchestrator::sample_dispatch(&run_id, job_id, "", "main", "", steps);
        edit(&mut dispatch);
        self.mock
            .dispatch(&self.agent_id(), dispatch)
            .await
            .expect("dispatch sent");
        run_id
    }

    /// Waits for the job's terminal `job.status` and returns it.
    pub async fn terminal_status(&self, job_id: &str) -> Value {
        let job_id = job_id.to_owned();
        self.mock
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
            .expect("terminal job.status")
    }

    /// Every accepted message of a job, in arrival order.
    pub fn job_messages(&self, job_id: &str) -> Vec<Value> {
        self.mock
            .received()
            .into_iter()
            .filter(|r| r.accepted && r.msg["jobId"] == job_id)
            .map(|r| r.msg)
            .collect()
    }

    /// Log lines of one step of a job, in order.
    pub fn lines(&self, job_id: &str, step_index: i64) -> Vec<String> {
        self.job_messages(job_id)
            .iter()
            .filter(|m| m["type"] == "log.chunk" && m["stepIndex"] == step_index)
            .flat_map(|m| m["lines"].as_array().cloned().unwrap_or_default())
            .map(|l| l.as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// `(type, stepIndex or "", state or "")` of a job's messages, logs and the run timeline
    /// (`run.event`, `job.context`: tests/telemetry.rs) left out, and the repeats of
    /// `job.status running` (sent while the job runs, see `tests/dispatch_ack.rs`) folded into
    /// the first.
    pub fn sequence(&self, job_id: &str) -> Vec<String> {
        let mut running_seen = false;
        self.job_messages(job_id)
            .iter()
            .filter(|m| {
                !["log.chunk", "job.heartbeat", "run.event", "job.context"]
                    .contains(&m["type"].as_str().unwrap_or(""))
            })
            .filter(|m| {
                let repeat = m["type"] == "job.status" && m["state"] == "running" && running_seen;
                running_seen |= m["type"] == "job.status" && m["state"] == "running";
                !repeat
            })
            .map(|m| {
                let step = m["stepIndex"]
                    .as_i64()
                    .map(|i| format!(" {i}"))
                    .unwrap_or_default();
                format!(
                    "{}{} {}",
                    m["type"].as_str().unwrap_or(""),
                    step,
                    m["state"].as_str().unwrap_or("")
                )
                .trim_end()
                .to_owned()
            })
            .collect()
    }

    pub fn assert_no_violations(&self) {
        assert_eq!(
            self.mock.violations(),
            Vec::<String>::new(),
            "mock saw violations"
        );
        assert_eq!(
            self.mock.rate_limit_warnings_sent(),
            0,
            "rate limit warnings"
        );
    }

    /// GET on the agent's HTTP port: (status code, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let addr = self.agent.http_addr().expect("http bound");
        http_get(addr, path).await
    }
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to agent http");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits until the agent's state satisfies `pred`, waking on each agent event (consuming them).
pub async fn wait_state(
    agent: &Agent,
    pred: impl Fn(&kici_agent_core::AgentState) -> bool,
) -> kici_agent_core::AgentState {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let state = agent.state();
        if pred(&state) {
            return state;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "state never reached: {state:?}"
        );
        tokio::task::block_in_place(|| agent.next_event(Some(Duration::from_millis(50))));
    }
}
