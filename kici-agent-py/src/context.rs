//! What a Python step function receives: the [`Step`], and a [`StepContext`] with the job, the
//! workspace, the environment, log and output writers and the [`Cancellation`].

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kici_agent_core::{JobContext, StepContext as CoreStepContext, StepIo};
use pyo3::exceptions::{PyPermissionError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use tokio_util::sync::CancellationToken;

use crate::blocking::wait_interruptibly;
use crate::convert::{json_to_py, py_to_json, type_name};

/// The step being run.
#[pyclass(frozen, module = "kici_agent")]
pub struct Step {
    /// The step's name (`jobConfig.steps[].name`).
    #[pyo3(get)]
    name: String,
    /// The step's flat index in the job (the wire `stepIndex`).
    #[pyo3(get)]
    index: u32,
    /// 1-based attempt number; above 1 when the step is retried.
    #[pyo3(get)]
    attempt: u32,
    /// The step as the dispatch describes it (a dict, wire field names).
    #[pyo3(get)]
    spec: Py<PyAny>,
}

#[pymethods]
impl Step {
    fn __repr__(&self) -> String {
        format!(
            "Step(name={:?}, index={}, attempt={})",
            self.name, self.index, self.attempt
        )
    }
}

impl Step {
    /// The Python view of a step attempt.
    pub fn new(py: Python<'_>, step: &CoreStepContext) -> PyResult<Self> {
        let spec = serde_json::to_value(&step.spec)
            .map_err(|e| PyTypeError::new_err(format!("step spec: {e}")))?;
        Ok(Step {
            name: step.name.clone(),
            index: step.index,
            attempt: step.attempt,
            spec: json_to_py(py, &spec)?.unbind(),
        })
    }
}

/// The job a step belongs to.
#[pyclass(frozen, module = "kici_agent")]
pub struct Job {
    /// The run's id.
    #[pyo3(get)]
    run_id: String,
    /// The job's id.
    #[pyo3(get)]
    job_id: String,
    /// The job's name (`jobConfig.name`).
    #[pyo3(get)]
    name: String,
    /// The whole `jobConfig` of the dispatch (a dict, wire field names).
    #[pyo3(get)]
    config: Py<PyAny>,
    /// The job's private workspace directory (`pathlib.Path`).
    #[pyo3(get)]
    workspace: Py<PyAny>,
    secrets: Option<Py<PyDict>>,
}

#[pymethods]
impl Job {
    /// The dispatch's secrets (name -> value). Only step functions registered with
    /// `secrets=True` may read them; for the others this raises `PermissionError`.
    #[getter]
    fn secrets(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        match &self.secrets {
            Some(secrets) => Ok(secrets.clone_ref(py)),
            None => Err(PyPermissionError::new_err(
                "this step function was registered without secrets=True",
            )),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Job(name={:?}, run_id={:?}, job_id={:?})",
            self.name, self.run_id, self.job_id
        )
    }
}

impl Job {
    /// The Python view of a job; the secrets only `with_secrets`.
    pub fn new(py: Python<'_>, job: &JobContext, with_secrets: bool) -> PyResult<Self> {
        let config = serde_json::to_value(&job.config)
            .map_err(|e| PyTypeError::new_err(format!("job config: {e}")))?;
        let secrets = if with_secrets {
            let dict = PyDict::new(py);
            for (name, value) in &job.secrets {
                dict.set_item(name, value)?;
            }
            Some(dict.unbind())
        } else {
            None
        };
        Ok(Job {
            run_id: job.run_id.clone(),
            job_id: job.job_id.clone(),
            name: job.name.clone(),
            config: json_to_py(py, &config)?.unbind(),
            workspace: path(py, &job.workspace)?,
            secrets,
        })
    }
}

fn path(py: Python<'_>, path: &std::path::Path) -> PyResult<Py<PyAny>> {
    let pathlib = py.import("pathlib")?;
    Ok(pathlib.getattr("Path")?.call1((path,))?.unbind())
}

/// Whether the step was asked to stop: cancel, step or job timeout, or agent shutdown.
///
/// Check it with `is_set()` (or `bool(...)`), or block on it with `wait(timeout)`.
#[pyclass(frozen, module = "kici_agent")]
pub struct Cancellation {
    token: CancellationToken,
    signal: Arc<Signal>,
}

/// A blocking mirror of the step's cancel token, for threads outside the runtime.
#[derive(Default)]
struct Signal {
    state: Mutex<SignalState>,
    changed: Condvar,
}

#[derive(Default, Clone, Copy)]
struct SignalState {
    cancelled: bool,
    /// The step function returned: waiters stop waiting.
    released: bool,
}

impl Signal {
    fn update(&self, change: impl FnOnce(&mut SignalState)) {
        change(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }

    /// Waits up to `slice` for a cancel or a release; returns the state when either happened.
    fn wait(&self, slice: Duration) -> Option<SignalState> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (state, _) = self
            .changed
            .wait_timeout_while(state, slice, |s| !s.cancelled && !s.released)
            .unwrap_or_else(|e| e.into_inner());
        (state.cancelled || state.released).then_some(*state)
    }
}

impl Cancellation {
    /// Mirrors `token` until the step is released; the watcher runs on the agent's runtime.
    pub fn new(token: CancellationToken, runtime: &tokio::runtime::Handle) -> Self {
        let signal = Arc::new(Signal::default());
        let released = CancellationToken::new();
        {
            let (token, signal) = (token.clone(), signal.clone());
            runtime.spawn(async move {
                tokio::select! {
                    () = token.cancelled() => signal.update(|s| s.cancelled = true),
                    () = released.cancelled() => {}
                }
            });
        }
        Cancellation { token, signal }
    }

    /// Marks the step function as returned: every `wait` returns.
    pub fn release(&self) {
        self.signal.update(|s| s.released = true);
    }
}

#[pymethods]
impl Cancellation {
    /// Whether the step was asked to stop.
    fn is_set(&self) -> bool {
        self.token.is_cancelled()
    }

    fn __bool__(&self) -> bool {
        self.is_set()
    }

    /// Blocks until the step is asked to stop, at most `timeout` seconds (`None` = no limit),
    /// with the GIL released. Returns whether it was asked to stop; also returns (`False`) once
    /// the step function has returned.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<crate::convert::Seconds>) -> PyResult<bool> {
        if self.token.is_cancelled() {
            return Ok(true);
        }
        let signal = self.signal.clone();
        wait_interruptibly(py, timeout.map(|t| t.0), |slice| signal.wait(slice))?;
        Ok(self.token.is_cancelled())
    }

    /// Wakes every `wait`, as when the step function returns (used by the asyncio bridge).
    fn _release(&self) {
        self.release();
    }

    fn __repr__(&self) -> String {
        format!("Cancellation(is_set={})", self.token.is_cancelled())
    }
}

/// The step's view of the agent: log, outputs, job, workspace, environment and cancellation.
#[pyclass(frozen, module = "kici_agent")]
pub struct StepContext {
    /// The step being run (also the step function's first argument).
    #[pyo3(get)]
    step: Py<Step>,
    /// The job the step belongs to.
    #[pyo3(get)]
    job: Py<Job>,
    /// The working directory of the step: the job's workspace (`pathlib.Path`).
    #[pyo3(get)]
    workspace: Py<PyAny>,
    /// The environment the step would run a process with (a fresh dict each step; sanitised:
    /// no agent variables, plus the job's and step's `env`).
    #[pyo3(get)]
    env: Py<PyDict>,
    /// Set when the step should stop.
    #[pyo3(get)]
    cancelled: Py<Cancellation>,
    io: StepIo,
}

impl StepContext {
    /// The context of one step attempt, writing through `io`.
    pub fn new(
        py: Python<'_>,
        step: Py<Step>,
        job: Py<Job>,
        core_step: &CoreStepContext,
        io: StepIo,
        cancelled: Py<Cancellation>,
    ) -> PyResult<Self> {
        let env = PyDict::new(py);
        for (name, value) in core_step.env.iter() {
            env.set_item(name, value)?;
        }
        Ok(StepContext {
            step,
            job,
            workspace: path(py, &core_step.workspace)?,
            env: env.unbind(),
            cancelled,
            io,
        })
    }

    /// Writes to the step log from Rust (tracebacks), with the GIL released.
    pub fn write_log(&self, py: Python<'_>, text: String) {
        let io = self.io.clone();
        py.detach(move || io.blocking_write(text));
    }
}

#[pymethods]
impl StepContext {
    /// Appends a line to the step log. Secrets are masked and the log size cap applies, as
    /// for any step output. Blocks (GIL released) while the log backlog is full.
    fn log(&self, py: Python<'_>, line: &str) {
        let mut text = String::with_capacity(line.len() + 1);
        text.push_str(line);
        text.push('\n');
        self.write_log(py, text);
    }

    /// Writes raw output (`str` or `bytes`) to the step log; lines are split at `\n`.
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = if let Ok(text) = data.cast::<PyString>() {
            text.to_str()?.as_bytes().to_vec()
        } else if let Ok(bytes) = data.cast::<PyBytes>() {
            bytes.as_bytes().to_vec()
        } else {
            return Err(PyTypeError::new_err(format!(
                "write() takes str or bytes, got {}",
                type_name(data)
            )));
        };
        let io = self.io.clone();
        py.detach(move || io.blocking_write(bytes));
        Ok(())
    }

    /// Sets the step output `key` to a JSON-compatible value (`None`, `bool`, `int`, `float`,
    /// `str`, `list`, `tuple`, `dict` with `str` keys). Reported in the job's `outputs`.
    fn set_output(&self, py: Python<'_>, key: String, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let value = py_to_json(value)?;
        let io = self.io.clone();
        py.detach(move || io.blocking_set_output(key, value));
        Ok(())
    }

    /// Sets the job's secret output `key` to `value`: encrypted for the run's key and sent
    /// only in the job's `secretOutputs` (of a successful job), never in plain outputs; masked
    /// in every log line of the job from now on. Raises `ValueError` for an empty key and
    /// `AgentError` when the dispatch carried no usable `runPublicKey`; the step then fails
    /// with that message (naming the key, never the value) even if the exception is caught.
    fn set_secret_output(&self, py: Python<'_>, key: String, value: String) -> PyResult<()> {
        use kici_agent_core::SecretOutputError;
        let io = self.io.clone();
        py.detach(move || io.blocking_set_secret_output(key, value))
            .map_err(|e| match e {
                SecretOutputError::EmptyName => PyValueError::new_err(e.to_string()),
                SecretOutputError::NoRunKey { .. } => crate::AgentError::new_err(e.to_string()),
            })
    }

    fn __repr__(&self) -> String {
        format!(
            "StepContext(step={:?}, job={:?})",
            self.step.get().name,
            self.job.get().name
        )
    }
}
