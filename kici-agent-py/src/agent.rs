//! `Agent`: the core agent handle with Python step functions, Python-style lifecycle verbs and
//! an iterator of events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kici_agent_core::{
    Agent as CoreAgent, AgentConfig, AgentError as CoreAgentError, Event as CoreEvent,
};
use pyo3::exceptions::{PyKeyboardInterrupt, PyTypeError, PyUserWarning};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};

use crate::blocking::wait_interruptibly;
use crate::convert::{json_to_py, Seconds};
use crate::executor::StepFunction;
use crate::{AgentError, ConfigError};

/// A KiCI agent running inside this process, with Python functions as step executors.
///
/// Register step functions with the `step`, `job` and `default` decorators before `start()`
/// (background) or `run()` (blocking, Ctrl-C aware). Use it as a context manager to shut it
/// down on exit. The core's one routing rule picks what runs a step: the function for its step
/// name, else for its job name, else the job's container, else the default function, else the
/// built-in shell executor (the step's `run` field, or `step_map_file`) or `process_executor`.
/// A TypeScript job that no function claims runs through the TypeScript runner.
#[pyclass(frozen, module = "kici_agent")]
pub struct Agent {
    /// Shared with [`crate::exit`], which shuts it down at interpreter exit.
    core: Arc<CoreAgent>,
    shutdown_grace: Duration,
}

/// Where a step function is registered.
enum Route {
    /// Steps with this name.
    Step(String),
    /// Every step of jobs with this name.
    Job(String),
    /// Every other step.
    Default,
}

impl Agent {
    fn from_config(config: AgentConfig) -> PyResult<Self> {
        let shutdown_grace = config.shutdown_grace;
        let core = Arc::new(CoreAgent::new(config).map_err(agent_error)?);
        crate::exit::track(&core, shutdown_grace);
        Ok(Agent {
            core,
            shutdown_grace,
        })
    }

    fn register(
        &self,
        py: Python<'_>,
        route: Route,
        function: Option<Py<PyAny>>,
        secrets: bool,
    ) -> PyResult<Py<PyAny>> {
        let registration = Registration {
            core: self.core.clone(),
            route: std::sync::Mutex::new(Some(route)),
            secrets,
        };
        match function {
            Some(function) => registration.__call__(py, function),
            None => Ok(Bound::new(py, registration)?.into_any().unbind()),
        }
    }

    fn started(&self) -> bool {
        self.core.http_addr().is_some()
    }

    fn grace_or_default(&self, grace: Option<Seconds>) -> Duration {
        grace.map_or(self.shutdown_grace, |Seconds(grace)| grace)
    }

    fn wait_stopped(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<bool> {
        let core = &self.core;
        Ok(
            wait_interruptibly(py, timeout, |slice| core.wait(Some(slice)).then_some(()))?
                .is_some(),
        )
    }
}

fn agent_error(error: CoreAgentError) -> PyErr {
    match error {
        CoreAgentError::Config(e) => ConfigError::new_err(e.to_string()),
        CoreAgentError::StepMap(e) => ConfigError::new_err(e.to_string()),
        other => AgentError::new_err(other.to_string()),
    }
}

#[pymethods]
impl Agent {
    /// Creates an agent for the orchestrator at `url` (`ws://` or `wss://`). Every keyword
    /// argument is an agent setting, named by the key of the core's setting table (see
    /// `settings()` and `_native.pyi`); `None` keeps the default. Durations are seconds
    /// (`int`/`float`) or `datetime.timedelta`. Raises `ConfigError` listing every invalid
    /// setting, `TypeError` for an unknown keyword or a value of the wrong type.
    #[new]
    #[pyo3(signature = (url, **settings))]
    fn new(py: Python<'_>, url: String, settings: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        Agent::from_config(crate::config::from_keywords(py, url, settings)?)
    }

    /// Creates an agent configured by `KICI_*` environment variables, exactly like the
    /// stand-alone `kici-agent` (unknown `KICI_*` names are an error unless `KICI_DEV=true`).
    /// `environ` replaces `os.environ`. Non-fatal findings become `UserWarning`s.
    #[classmethod]
    #[pyo3(signature = (environ=None))]
    fn from_env(
        _cls: &Bound<'_, PyType>,
        py: Python<'_>,
        environ: Option<BTreeMap<String, String>>,
    ) -> PyResult<Self> {
        let loaded = match environ {
            Some(vars) => AgentConfig::from_vars(vars),
            None => AgentConfig::from_env(),
        }
        .map_err(|e| ConfigError::new_err(e.to_string()))?;
        for warning in &loaded.warnings {
            let message = std::ffi::CString::new(warning.replace('\0', " "))?;
            PyErr::warn(py, &py.get_type::<PyUserWarning>(), &message, 1)?;
        }
        Agent::from_config(loaded.config)
    }

    /// The agent's id.
    #[getter]
    fn agent_id(&self) -> &str {
        self.core.agent_id()
    }

    /// Registers a function for steps named `name`: `@agent.step("flash")`, or
    /// `agent.step("flash", function)`. The function is called as `function(step, ctx)` and may
    /// be `async def`. With `secrets=True` it may read `ctx.job.secrets`. Returns the function.
    /// Functions are registered before `start()`; afterwards this raises `AgentError`.
    #[pyo3(signature = (name, function=None, *, secrets=false))]
    fn step(
        &self,
        py: Python<'_>,
        name: String,
        function: Option<Py<PyAny>>,
        secrets: bool,
    ) -> PyResult<Py<PyAny>> {
        self.register(py, Route::Step(name), function, secrets)
    }

    /// Registers a function for every step of jobs named `name` (unless a `step` function
    /// matches first), also when the job names a container image (its steps then run here).
    /// Used like `step`.
    #[pyo3(signature = (name, function=None, *, secrets=false))]
    fn job(
        &self,
        py: Python<'_>,
        name: String,
        function: Option<Py<PyAny>>,
        secrets: bool,
    ) -> PyResult<Py<PyAny>> {
        self.register(py, Route::Job(name), function, secrets)
    }

    /// Registers the function for every step no `step` or `job` function and no job container
    /// takes: `@agent.default`, `@agent.default(secrets=True)` or `agent.default(function)`. It
    /// also claims TypeScript jobs, which then no longer run through the TypeScript runner.
    #[pyo3(signature = (function=None, *, secrets=false))]
    fn default(
        &self,
        py: Python<'_>,
        function: Option<Py<PyAny>>,
        secrets: bool,
    ) -> PyResult<Py<PyAny>> {
        self.register(py, Route::Default, function, secrets)
    }

    /// Starts the agent in the background: binds the HTTP endpoints (`/health`, `/ready`,
    /// `/metrics`), then connects and registers. Raises `AgentError` when the port is taken or
    /// the agent was already started.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.core.start()).map_err(agent_error)
    }

    /// Starts the agent if needed and blocks until it stops. The first Ctrl-C drains (no new
    /// jobs; running ones finish), the second shuts down (running steps get `grace` seconds,
    /// default `shutdown_grace`, then are cancelled), a third raises `KeyboardInterrupt`.
    #[pyo3(signature = (grace=None))]
    fn run(&self, py: Python<'_>, grace: Option<Seconds>) -> PyResult<()> {
        if !self.started() {
            self.start(py)?;
        }
        let grace = self.grace_or_default(grace);
        let mut interrupts = 0;
        loop {
            match self.wait_stopped(py, None) {
                Ok(_) => return Ok(()),
                Err(err) if err.is_instance_of::<PyKeyboardInterrupt>(py) => {
                    interrupts += 1;
                    match interrupts {
                        1 => {
                            self.core.drain();
                            announce(py, DRAINING_NOTICE);
                        }
                        2 => {
                            self.core.shutdown(grace);
                            announce(py, &stopping_notice(grace));
                        }
                        _ => return Err(err),
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Stops taking jobs (dispatches are rejected as draining, `/ready` answers 503); the agent
    /// stops once idle.
    /// Returns at once; see `wait()`.
    fn drain(&self) {
        self.core.drain();
    }

    /// Stops the agent: no new jobs; running steps get `grace` seconds (default
    /// `shutdown_grace`) to finish, then are cancelled. With `wait=True` (the default) blocks
    /// until the agent stopped.
    #[pyo3(signature = (grace=None, *, wait=true))]
    fn shutdown(&self, py: Python<'_>, grace: Option<Seconds>, wait: bool) -> PyResult<()> {
        self.core.shutdown(self.grace_or_default(grace));
        if wait {
            self.wait_stopped(py, None)?;
        }
        Ok(())
    }

    /// Blocks until the agent stopped, at most `timeout` seconds (`None` = no limit). Returns
    /// whether it stopped. Ctrl-C raises `KeyboardInterrupt`.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<Seconds>) -> PyResult<bool> {
        self.wait_stopped(py, timeout.map(|t| t.0))
    }

    /// A snapshot of the agent's state.
    #[getter]
    fn state(&self) -> AgentState {
        AgentState::from(self.core.state())
    }

    /// The last error worth showing (authentication failure, lost connection), if any.
    #[getter]
    fn last_error(&self) -> Option<String> {
        self.core.state().last_error
    }

    /// This agent's metrics in the Prometheus text format (what `/metrics` serves).
    fn metrics_text(&self) -> String {
        self.core.metrics_text()
    }

    /// `(host, port)` of the HTTP endpoints once started, else `None`.
    #[getter]
    fn http_address(&self) -> Option<(String, u16)> {
        self.core
            .http_addr()
            .map(|addr| (addr.ip().to_string(), addr.port()))
    }

    /// An iterator over the agent's events, oldest first. It ends after the `stopped` event,
    /// or when no event came within `timeout` seconds (`None` = wait as long as it takes).
    /// Events are consumed: two iterators share one queue.
    #[pyo3(signature = (timeout=None))]
    fn events(slf: Py<Self>, timeout: Option<Seconds>) -> EventIterator {
        EventIterator {
            agent: slf,
            timeout: timeout.map(|t| t.0),
            ended: AtomicBool::new(false),
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        if !slf.get().started() {
            slf.get().start(slf.py())?;
        }
        Ok(slf)
    }

    /// Shuts the agent down (with `shutdown_grace`) and waits until it stopped.
    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        self.shutdown(py, None, true)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let state = self.core.state();
        format!(
            "Agent(agent_id={:?}, connection={:?}, active_jobs={})",
            state.agent_id,
            connection_name(&state.connection),
            state.active_jobs
        )
    }
}

impl Drop for Agent {
    /// The core's own drop would wait for running steps; it must not hold the GIL meanwhile,
    /// since Python steps need it to finish.
    fn drop(&mut self) {
        if self.started() && !self.core.state().stopped {
            let (core, grace) = (&self.core, self.shutdown_grace);
            Python::attach(|py| {
                py.detach(|| {
                    core.shutdown(grace);
                    core.wait(Some(grace + crate::exit::STOP_EXTRA));
                })
            });
        }
    }
}

const DRAINING_NOTICE: &str =
    "Ctrl-C: draining; running jobs finish, no new jobs are taken (Ctrl-C again to stop)";

fn stopping_notice(grace: Duration) -> String {
    format!(
        "Ctrl-C again: stopping; running steps get {:.1}s, then are cancelled \
         (Ctrl-C again to abandon them)",
        grace.as_secs_f64()
    )
}

/// Tells the user what Ctrl-C did, through the `kici_agent` logger.
fn announce(py: Python<'_>, message: &str) {
    let logged = py
        .import("logging")
        .and_then(|logging| logging.call_method1("getLogger", ("kici_agent",)))
        .and_then(|logger| logger.call_method1("warning", (message,)));
    if let Err(err) = logged {
        err.print(py);
    }
}

fn connection_name(state: &kici_agent_core::ConnectionState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|value| value.get("state")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The decorator returned by `Agent.step(name)`, `Agent.job(name)` and `Agent.default()`.
#[pyclass(frozen, module = "kici_agent")]
struct Registration {
    core: Arc<CoreAgent>,
    /// Taken by the first call: one decorator registers one function.
    route: std::sync::Mutex<Option<Route>>,
    secrets: bool,
}

#[pymethods]
impl Registration {
    fn __call__(&self, py: Python<'_>, function: Py<PyAny>) -> PyResult<Py<PyAny>> {
        if !function.bind(py).is_callable() {
            return Err(PyTypeError::new_err(format!(
                "a step function must be callable, got {}",
                crate::convert::type_name(function.bind(py))
            )));
        }
        let route = self
            .route
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| PyTypeError::new_err("this decorator was already used"))?;
        let executor = Arc::new(StepFunction::new(function.clone_ref(py), self.secrets));
        match route {
            Route::Step(name) => self.core.register_step_executor(name, executor),
            Route::Job(name) => self.core.register_job_executor(name, executor),
            Route::Default => self.core.set_default_executor(executor),
        }
        .map_err(agent_error)?;
        Ok(function)
    }
}

/// A snapshot of an agent's state.
#[pyclass(frozen, module = "kici_agent", get_all)]
pub struct AgentState {
    /// The agent's id.
    agent_id: String,
    /// The connection: `disconnected`, `connecting`, `authenticating`, `registering`,
    /// `registered`, `auth_failed` or `closed`.
    connection: String,
    /// Registered with the orchestrator (jobs can be dispatched).
    registered: bool,
    /// Draining or shutting down: no new jobs.
    draining: bool,
    /// Stopped for good.
    stopped: bool,
    /// Jobs running now.
    active_jobs: usize,
    /// The last error worth showing (authentication failure, lost connection).
    last_error: Option<String>,
}

impl From<kici_agent_core::AgentState> for AgentState {
    fn from(state: kici_agent_core::AgentState) -> Self {
        AgentState {
            connection: connection_name(&state.connection),
            agent_id: state.agent_id,
            registered: state.registered,
            draining: state.draining,
            stopped: state.stopped,
            active_jobs: state.active_jobs,
            last_error: state.last_error,
        }
    }
}

#[pymethods]
impl AgentState {
    fn __repr__(&self) -> String {
        format!(
            "AgentState(agent_id={:?}, connection={:?}, registered={}, draining={}, stopped={}, active_jobs={}, last_error={:?})",
            self.agent_id, self.connection, self.registered, self.draining, self.stopped,
            self.active_jobs, self.last_error
        )
    }
}

/// Something the agent did. `type` says what; the other attributes are `None` unless that
/// kind of event has them.
///
/// Types: `registered` (agent_id), `disconnected`, `reconnect_scheduled` (`attempt` and
/// `delayMs` in `to_dict()`), `auth_failed` (reason), `job_started`
/// (run_id, job_id, name), `job_rejected` (run_id, job_id, reason), `step_finished` (run_id,
/// job_id, step_index, step_name, state, duration_ms, error), `job_finished` (run_id, job_id,
/// name, state, duration_ms, error), `self_shutdown` (reason: `scaler-idle` or
/// `scaler-pending-dispatch-timeout`), `stopped`.
#[pyclass(frozen, module = "kici_agent")]
pub struct Event {
    /// What happened (see the class docstring).
    #[pyo3(get, name = "type")]
    kind: String,
    #[pyo3(get)]
    agent_id: Option<String>,
    #[pyo3(get)]
    run_id: Option<String>,
    #[pyo3(get)]
    job_id: Option<String>,
    /// The job's name.
    #[pyo3(get)]
    name: Option<String>,
    #[pyo3(get)]
    step_index: Option<u32>,
    #[pyo3(get)]
    step_name: Option<String>,
    /// The final state of the step or job (`success`, `failed`, `cancelled`, ...).
    #[pyo3(get)]
    state: Option<String>,
    #[pyo3(get)]
    duration_ms: Option<u64>,
    #[pyo3(get)]
    error: Option<String>,
    /// Why the connection was refused or the job rejected.
    #[pyo3(get)]
    reason: Option<String>,
    json: serde_json::Value,
}

impl From<CoreEvent> for Event {
    fn from(event: CoreEvent) -> Self {
        let json = serde_json::to_value(&event).unwrap_or_default();
        let text = |key: &str| json.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        Event {
            kind: text("type").unwrap_or_default(),
            agent_id: text("agentId").or_else(|| text("agent_id")),
            run_id: text("runId"),
            job_id: text("jobId"),
            name: text("name"),
            step_index: json
                .get("stepIndex")
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok()),
            step_name: text("stepName"),
            state: text("state"),
            duration_ms: json.get("durationMs").and_then(|v| v.as_u64()),
            error: text("error"),
            reason: text("reason"),
            json,
        }
    }
}

#[pymethods]
impl Event {
    /// The event as a dict, with the wire's field names (`runId`, `durationMs`, ...).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.json)
    }

    fn __repr__(&self) -> String {
        format!("Event({})", self.json)
    }
}

/// The iterator returned by `Agent.events()`.
#[pyclass(frozen, module = "kici_agent")]
pub struct EventIterator {
    agent: Py<Agent>,
    timeout: Option<Duration>,
    /// Set once the `stopped` event was yielded or the agent was found stopped.
    ended: AtomicBool,
}

enum Next {
    Event(CoreEvent),
    Ended,
}

#[pymethods]
impl EventIterator {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Event>> {
        if self.ended.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let core = &self.agent.get().core;
        let next = wait_interruptibly(py, self.timeout, |slice| {
            match core.next_event(Some(slice)) {
                Some(event) => Some(Next::Event(event)),
                // Stopped: only what is already queued is left.
                None if core.state().stopped => Some(
                    core.next_event(Some(Duration::ZERO))
                        .map_or(Next::Ended, Next::Event),
                ),
                None => None,
            }
        })?;
        match next {
            Some(Next::Event(event)) => {
                if event == CoreEvent::Stopped {
                    self.ended.store(true, Ordering::SeqCst);
                }
                Ok(Some(Event::from(event)))
            }
            Some(Next::Ended) => {
                self.ended.store(true, Ordering::SeqCst);
                Ok(None)
            }
            None => Ok(None),
        }
    }
}
