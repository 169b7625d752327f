//! The container executor against a real container engine, driven through the job engine
//! (`local::run`).
//!
//! These tests are `#[ignore]`d so a plain `cargo test` skips them. Run them with an engine:
//!
//! ```sh
//! sh scripts/container-engine.sh start /tmp/kici-engine      # prints DOCKER_HOST=unix://...
//! KICI_TEST_DOCKER_HOST=unix:///tmp/kici-engine/docker.sock \
//!     cargo test -p kici-agent-core --test container -- --ignored
//! sh scripts/container-engine.sh stop /tmp/kici-engine
//! ```
//!
//! Without `KICI_TEST_DOCKER_HOST` they fail loudly instead of passing. The image is
//! `KICI_TEST_IMAGE`, default `kici-test/busybox:latest` (the one the script imports).
//! They need the cargo feature `container` (on by default).
#![cfg(feature = "container")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions,
};
use bollard::Docker;
use kici_agent_core::internals::container::{
    ContainerError, ContainerExecutor, ContainerSettings, PullPolicy, JOB_ID_LABEL, SANDBOX_LABEL,
};
use kici_agent_core::local::{self, LocalCancel, LocalJob, LocalSettings};
use kici_agent_core::protocol::JobState;
use kici_agent_core::ExecutorRegistry;
use serde_json::{json, Value};
use tokio::sync::RwLock;

/// Every test holds it shared; the sweep test holds it alone, so it cannot remove the
/// containers of jobs other tests are running.
static ENGINE: RwLock<()> = RwLock::const_new(());

fn engine_host() -> String {
    match std::env::var("KICI_TEST_DOCKER_HOST") {
        Ok(host) if !host.trim().is_empty() => host,
        _ => panic!(
            "KICI_TEST_DOCKER_HOST is not set: the container tests need a real container engine, \
             and none was given. Start one with `sh scripts/container-engine.sh start /tmp/kici-engine` \
             and run `KICI_TEST_DOCKER_HOST=unix:///tmp/kici-engine/docker.sock \
             cargo test -p kici-agent-core --test container -- --ignored`"
        ),
    }
}

fn image() -> String {
    std::env::var("KICI_TEST_IMAGE").unwrap_or_else(|_| "kici-test/busybox:latest".to_owned())
}

fn settings() -> ContainerSettings {
    let mut settings = ContainerSettings::new(engine_host());
    settings.default_image = Some(image());
    settings.pull_policy = PullPolicy::Never;
    settings.stop_grace = Duration::from_secs(1);
    settings
}

async fn executor(settings: ContainerSettings) -> Arc<ContainerExecutor> {
    match ContainerExecutor::connect(settings).await {
        Ok(executor) => Arc::new(executor),
        Err(e) => panic!("the container engine of KICI_TEST_DOCKER_HOST is not usable: {e}"),
    }
}

/// A direct client, to look at what the executor left in the engine.
fn docker() -> Docker {
    let host = engine_host();
    let connected = match host.strip_prefix("unix://") {
        Some(path) => Docker::connect_with_unix(path, 60, bollard::API_DEFAULT_VERSION),
        None => Docker::connect_with_http(&host, 60, bollard::API_DEFAULT_VERSION),
    };
    connected.expect("a client for KICI_TEST_DOCKER_HOST")
}

/// Ids of the containers (running or not) labelled with this job.
async fn containers_of(job_id: &str) -> Vec<String> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{JOB_ID_LABEL}={job_id}")])]);
    docker()
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .expect("listing containers")
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

async fn remove(id: &str) {
    let options = RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    docker()
        .remove_container(id, Some(options))
        .await
        .expect("removing a container");
}

/// What a job run produced.
struct Run {
    state: JobState,
    messages: Vec<Value>,
    elapsed: Duration,
}

impl Run {
    fn job_id(&self) -> String {
        self.messages
            .iter()
            .find_map(|m| m["jobId"].as_str())
            .expect("a message with the job id")
            .to_owned()
    }

    /// Log lines of a step, in order.
    fn lines(&self, step_index: i64) -> Vec<String> {
        self.messages
            .iter()
            .filter(|m| m["type"] == "log.chunk" && m["stepIndex"] == step_index)
            .flat_map(|m| m["lines"].as_array().cloned().unwrap_or_default())
            .filter_map(|line| line.as_str().map(str::to_owned))
            .collect()
    }

    /// The terminal `step.status` of a step.
    fn step_end(&self, name: &str) -> &Value {
        self.messages
            .iter()
            .rev()
            .find(|m| {
                m["type"] == "step.status"
                    && m["stepName"] == name
                    && m["state"] != "running"
                    && m["state"] != "pending"
            })
            .unwrap_or_else(|| panic!("no terminal status for step '{name}'"))
    }

    fn job_end(&self) -> &Value {
        self.messages
            .iter()
            .rev()
            .find(|m| m["type"] == "job.status")
            .expect("a job status")
    }
}

/// Runs a job whose steps all go to `executor`; `on_message` sees each message as it is sent.
async fn run_job(
    executor: Arc<ContainerExecutor>,
    job: Value,
    cancel: LocalCancel,
    mut on_message: impl FnMut(&Value),
) -> Run {
    let job: LocalJob = serde_json::from_value(job).expect("a valid job");
    let mut registry = ExecutorRegistry::new();
    registry.set_default(executor);
    let settings = LocalSettings {
        cancel_grace: Duration::from_secs(3),
        ..LocalSettings::default()
    };
    let started = Instant::now();
    let mut messages = Vec::new();
    let state = local::run(&job, Some(registry), settings, cancel, |message| {
        let value = serde_json::to_value(message).expect("messages serialise");
        on_message(&value);
        messages.push(value);
    })
    .await;
    Run {
        state,
        messages,
        elapsed: started.elapsed(),
    }
}

async fn assert_no_container_left(run: &Run) {
    let left = containers_of(&run.job_id()).await;
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn steps_share_the_job_container_its_workspace_and_env() {
    let _engine = ENGINE.read().await;
    let job = json!({
        "name": "container-env",
        "env": {"GREETING": "hello container"},
        "steps": [
            {"name": "look", "run": "echo \"pwd=$(pwd) ws=$KICI_WORKSPACE g=$GREETING path=$PATH\"\n\
                echo made-here > /workspace/made.txt\n\
                echo FROM_STEP=yes >> \"$KICI_ENV\"\n\
                echo /opt/kici-bin >> \"$KICI_PATH\"\n\
                echo answer=42 >> \"$KICI_OUTPUT\""},
            {"name": "next", "run": "cat /workspace/made.txt; echo \"from=$FROM_STEP path=$PATH\""}
        ]
    });
    let run = run_job(
        executor(settings()).await,
        job,
        LocalCancel::default(),
        |_| {},
    )
    .await;
    assert_eq!(run.state, JobState::Success, "{:#?}", run.messages);
    assert_eq!(
        run.lines(0),
        ["pwd=/workspace ws=/workspace g=hello container path=/bin"]
    );
    assert_eq!(
        run.lines(1),
        ["made-here", "from=yes path=/opt/kici-bin:/bin"]
    );
    assert_eq!(run.job_end()["data"]["outputs"]["look"]["answer"], "42");
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn a_failing_step_reports_its_exit_code_and_stops_the_job() {
    let _engine = ENGINE.read().await;
    let job = json!({
        "name": "container-fail",
        "steps": [
            {"name": "fail", "run": "echo to-stdout; echo to-stderr >&2; exit 3"},
            {"name": "never", "run": "echo never"}
        ]
    });
    let run = run_job(
        executor(settings()).await,
        job,
        LocalCancel::default(),
        |_| {},
    )
    .await;
    assert_eq!(run.state, JobState::Failed);
    let end = run.step_end("fail");
    assert_eq!(end["state"], "failed");
    assert_eq!(end["data"]["exitCode"], 3);
    let mut lines = run.lines(0);
    lines.sort();
    assert_eq!(lines, ["to-stderr", "to-stdout"]);
    assert!(!run.messages.iter().any(|m| m["stepName"] == "never"));
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn a_step_without_run_fails_naming_the_step() {
    let _engine = ENGINE.read().await;
    let job = json!({"name": "container-no-run", "steps": [{"name": "typescript-only"}]});
    let run = run_job(
        executor(settings()).await,
        job,
        LocalCancel::default(),
        |_| {},
    )
    .await;
    assert_eq!(run.state, JobState::Failed);
    let error = run.step_end("typescript-only")["data"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("'typescript-only'") && error.contains("run"),
        "{error}"
    );
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn output_streams_live_and_a_cancel_stops_the_step() {
    let _engine = ENGINE.read().await;
    let job = json!({
        "name": "container-cancel",
        "steps": [{"name": "long", "run": "echo started; sleep 120; echo never"}]
    });
    let cancel = LocalCancel::default();
    let on_message = {
        let cancel = cancel.clone();
        // The cancel only comes once the first line arrived: the output must be live.
        move |m: &Value| {
            let started = m["type"] == "log.chunk"
                && m["lines"]
                    .as_array()
                    .is_some_and(|l| l.contains(&json!("started")));
            if started {
                cancel.cancel();
            }
        }
    };
    let run = run_job(executor(settings()).await, job, cancel, on_message).await;
    assert_eq!(run.state, JobState::Cancelled, "{:#?}", run.messages);
    assert_eq!(run.step_end("long")["state"], "cancelled");
    assert_eq!(run.lines(0), ["started"]);
    assert!(
        run.elapsed < Duration::from_secs(60),
        "took {:?}",
        run.elapsed
    );
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn a_forced_cancel_kills_at_once_and_removes_the_container() {
    let _engine = ENGINE.read().await;
    let mut patient = settings();
    // Only the forced stop can explain a quick end: SIGTERM is ignored, the grace is long.
    patient.stop_grace = Duration::from_secs(60);
    let job = json!({
        "name": "container-force",
        "steps": [{"name": "stubborn", "run": "trap '' TERM; echo started; sleep 120"}]
    });
    let cancel = LocalCancel::default();
    let on_message = {
        let cancel = cancel.clone();
        move |m: &Value| {
            if m["type"] == "log.chunk"
                && m["lines"]
                    .as_array()
                    .is_some_and(|l| l.contains(&json!("started")))
            {
                cancel.cancel();
                cancel.cancel();
            }
        }
    };
    let run = run_job(executor(patient).await, job, cancel, on_message).await;
    assert_eq!(run.state, JobState::Cancelled, "{:#?}", run.messages);
    assert!(
        run.elapsed < Duration::from_secs(30),
        "took {:?}",
        run.elapsed
    );
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn a_step_timeout_kills_the_step_even_when_it_ignores_sigterm() {
    let _engine = ENGINE.read().await;
    let job = json!({
        "name": "container-timeout",
        "steps": [
            {"name": "stubborn", "run": "trap '' TERM; echo waiting; sleep 120", "timeout": 1500,
             "continueOnError": true},
            {"name": "check", "run": "if ps | grep -v grep | grep -q 'sleep 120'; then ps; exit 1; fi; echo clean"}
        ]
    });
    let run = run_job(
        executor(settings()).await,
        job,
        LocalCancel::default(),
        |_| {},
    )
    .await;
    // continueOnError: the job goes on, and still fails.
    assert_eq!(run.state, JobState::Failed);
    let stubborn = run.step_end("stubborn");
    assert_eq!(stubborn["state"], "failed");
    let error = stubborn["data"]["error"].as_str().unwrap();
    assert!(error.contains("timed out after 1500ms"), "{error}");
    assert_eq!(
        run.step_end("check")["state"],
        "success",
        "{:?}",
        run.lines(1)
    );
    assert_eq!(run.lines(1), ["clean"]);
    assert!(
        run.elapsed < Duration::from_secs(60),
        "took {:?}",
        run.elapsed
    );
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn parallel_steps_run_in_the_same_container() {
    let _engine = ENGINE.read().await;
    let job = json!({
        "name": "container-parallel",
        "steps": [{"kind": "parallel", "name": "both", "children": [
            {"name": "a", "run": "echo host=$(hostname)"},
            {"name": "b", "run": "echo host=$(hostname)"}
        ]}]
    });
    let run = run_job(
        executor(settings()).await,
        job,
        LocalCancel::default(),
        |_| {},
    )
    .await;
    assert_eq!(run.state, JobState::Success, "{:#?}", run.messages);
    let (a, b) = (run.lines(0), run.lines(1));
    assert_eq!(a.len(), 1);
    assert_eq!(a, b, "both steps ran in one container");
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn keep_failed_keeps_the_container_of_a_failed_job() {
    let _engine = ENGINE.read().await;
    let mut kept = settings();
    kept.keep_failed = true;
    let executor = executor(kept).await;
    let job = json!({"name": "container-keep", "steps": [{"name": "fail", "run": "exit 1"}]});
    let run = run_job(executor.clone(), job, LocalCancel::default(), |_| {}).await;
    assert_eq!(run.state, JobState::Failed);
    let left = containers_of(&run.job_id()).await;
    assert_eq!(left.len(), 1, "the failed job's container is kept");
    // Nor does the sweep touch it while keeping failed containers.
    assert_eq!(executor.remove_all_sandboxes().await.unwrap(), 0);
    assert_eq!(containers_of(&run.job_id()).await, left);
    remove(&left[0]).await;

    let job = json!({"name": "container-keep-ok", "steps": [{"name": "ok", "run": "true"}]});
    let run = run_job(executor, job, LocalCancel::default(), |_| {}).await;
    assert_eq!(run.state, JobState::Success);
    assert_no_container_left(&run).await;
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn the_sweep_removes_leftover_job_containers() {
    let _engine = ENGINE.write().await;
    let orphan_job = format!("orphan-{}", std::process::id());
    let body = ContainerCreateBody {
        image: Some(image()),
        cmd: Some(vec!["true".to_owned()]),
        labels: Some(HashMap::from([
            (SANDBOX_LABEL.to_owned(), "true".to_owned()),
            (JOB_ID_LABEL.to_owned(), orphan_job.clone()),
        ])),
        ..Default::default()
    };
    docker()
        .create_container(None::<CreateContainerOptions>, body)
        .await
        .expect("creating a leftover container");
    assert_eq!(containers_of(&orphan_job).await.len(), 1);
    let removed = executor(settings())
        .await
        .remove_all_sandboxes()
        .await
        .unwrap();
    assert!(removed >= 1, "removed {removed}");
    assert!(containers_of(&orphan_job).await.is_empty());
}

#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn missing_images_fail_the_job_with_the_reason() {
    let _engine = ENGINE.read().await;
    // The image is the executor's default: a job naming one would be routed by the agent's own
    // wiring, not to the executor under test.
    let job = json!({"name": "container-missing", "steps": [{"name": "s", "run": "true"}]});
    let mut absent = settings();
    absent.default_image = Some("kici-test/not-there:1".to_owned());
    let run = run_job(
        executor(absent).await,
        job.clone(),
        LocalCancel::default(),
        |_| {},
    )
    .await;
    assert_eq!(run.state, JobState::Failed);
    let error = run.step_end("s")["data"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("kici-test/not-there:1") && error.contains("`never`"),
        "{error}"
    );

    // A registry that refuses connections (loopback, nothing listens on port 1).
    let mut pulling = settings();
    pulling.pull_policy = PullPolicy::IfNotPresent;
    pulling.default_image = Some("127.0.0.1:1/kici/absent:1".to_owned());
    let run = run_job(executor(pulling).await, job, LocalCancel::default(), |_| {}).await;
    assert_eq!(run.state, JobState::Failed);
    let error = run.step_end("s")["data"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains("pulling image 127.0.0.1:1/kici/absent:1 failed"),
        "{error}"
    );
    assert_no_container_left(&run).await;
}

/// Needs no engine: it checks the error when there is none.
#[tokio::test]
async fn an_unreachable_engine_is_named_in_the_error() {
    let socket = format!("/tmp/kici-no-engine-{}/docker.sock", std::process::id());
    let err = ContainerExecutor::connect(ContainerSettings::new(format!("unix://{socket}")))
        .await
        .err()
        .expect("no engine there");
    assert!(matches!(err, ContainerError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&socket), "{err}");

    // Built without the engine (start-up code), a job then fails with the same reason.
    let mut lazy = ContainerSettings::new(format!("unix://{socket}"));
    lazy.default_image = Some("any:1".to_owned());
    let executor = Arc::new(ContainerExecutor::new(lazy).expect("a usable address"));
    let job = json!({"name": "no-engine", "steps": [{"name": "s", "run": "true"}]});
    let run = run_job(executor, job, LocalCancel::default(), |_| {}).await;
    assert_eq!(run.state, JobState::Failed);
    let error = run.step_end("s")["data"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        error.contains(&socket) && error.contains("unreachable"),
        "{error}"
    );

    // A loopback port with nothing behind it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let host = format!("tcp://127.0.0.1:{port}");
    let err = ContainerExecutor::connect(ContainerSettings::new(host.clone()))
        .await
        .err()
        .expect("nothing listens there");
    assert!(matches!(err, ContainerError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&host), "{err}");
}

/// `kici-agent exec` of a job file with a `container` section: no registry given, the engine
/// comes from DOCKER_HOST, exactly as the binary runs it.
#[tokio::test]
#[ignore = "needs a container engine: KICI_TEST_DOCKER_HOST"]
async fn a_job_file_with_a_container_section_runs_in_it() {
    let _engine = ENGINE.read().await;
    // Only this test reads DOCKER_HOST; the others pass their engine explicitly.
    std::env::set_var("DOCKER_HOST", engine_host());
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs/container.json");
    let mut job = LocalJob::load(&path).expect("the sample container job file");
    job.container = Some(kici_agent_core::protocol::ContainerSpec::Image(image()));
    let mut messages = Vec::new();
    let state = local::run(
        &job,
        None,
        LocalSettings::default(),
        LocalCancel::default(),
        |m| messages.push(serde_json::to_value(m).unwrap()),
    )
    .await;
    assert_eq!(state, JobState::Success, "{messages:#?}");
    let lines: Vec<&str> = messages
        .iter()
        .filter(|m| m["type"] == "log.chunk" && m["stepIndex"] == 0)
        .flat_map(|m| m["lines"].as_array().unwrap())
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("inside a container at /workspace")),
        "{lines:?}"
    );
    let job_id = messages[0]["jobId"].as_str().unwrap().to_owned();
    assert!(containers_of(&job_id).await.is_empty());
}
