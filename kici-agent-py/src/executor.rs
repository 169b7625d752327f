//! Python callables as step executors. The core picks which one runs a step (its routing rule);
//! each call runs on a blocking thread of the agent's runtime, never on one of its async
//! workers, and takes the GIL only there.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use kici_agent_core::{
    Executor, JobContext, StepContext as CoreStepContext, StepFailure, StepIo, StepResult,
};
use pyo3::exceptions::PySystemExit;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};

use crate::context::{Cancellation, Job, Step, StepContext};
use crate::convert::type_name;

/// One registered Python step function.
pub struct StepFunction {
    /// Shared so that no GIL is needed to hand it to a blocking thread.
    function: Arc<Py<PyAny>>,
    /// Whether the function may read the job's secrets.
    secrets: bool,
}

impl StepFunction {
    /// A step function; with `secrets` it may read the job's secrets.
    pub fn new(function: Py<PyAny>, secrets: bool) -> Self {
        StepFunction {
            function: Arc::new(function),
            secrets,
        }
    }
}

#[async_trait::async_trait]
impl Executor for StepFunction {
    fn name(&self) -> &str {
        "python"
    }

    async fn run_step(&self, job: &JobContext, step: &CoreStepContext, io: StepIo) -> StepResult {
        let call = Call {
            function: self.function.clone(),
            secrets: self.secrets,
            job: job.clone(),
            step: step.clone(),
            io,
            runtime: tokio::runtime::Handle::current(),
        };
        match tokio::task::spawn_blocking(move || call.run()).await {
            Ok(result) => result,
            // A Rust panic that came back through the step function as `PanicException` (PyO3
            // resumes it when it fetches the exception) is a bug in the agent, not the step's
            // own failure: it goes on as a panic, which the core reports as one.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StepFailure::new(format!(
                "the Python step function did not complete: {e}"
            ))),
        }
    }
}

/// One call of a step function, carried to a blocking thread.
struct Call {
    function: Arc<Py<PyAny>>,
    secrets: bool,
    job: JobContext,
    step: CoreStepContext,
    io: StepIo,
    runtime: tokio::runtime::Handle,
}

impl Call {
    fn run(self) -> StepResult {
        Python::attach(|py| {
            let cancellation = Cancellation::new(self.io.cancellation().clone(), &self.runtime);
            let cancelled = match Bound::new(py, cancellation) {
                Ok(cancelled) => cancelled,
                Err(err) => return Err(python_failure(py, &err, None)),
            };
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.invoke(py, &cancelled)));
            // Threads the step function left waiting on `ctx.cancelled` return, panic or not.
            cancelled.get().release();
            result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn invoke(&self, py: Python<'_>, cancelled: &Bound<'_, Cancellation>) -> StepResult {
        let context = match self.context(py, cancelled) {
            Ok(arguments) => arguments,
            Err(err) => return Err(python_failure(py, &err, None)),
        };
        let (step, ctx) = context;
        let returned = self
            .function
            .bind(py)
            .call1((step, ctx.clone()))
            .and_then(|value| finish_awaitable(py, value, cancelled));
        match returned {
            Ok(value) => returned_outcome(&value),
            Err(err) if err.is_instance_of::<PySystemExit>(py) => exit_outcome(py, &err),
            Err(err) => Err(python_failure(py, &err, Some(ctx.get()))),
        }
    }

    fn context<'py>(
        &self,
        py: Python<'py>,
        cancelled: &Bound<'py, Cancellation>,
    ) -> PyResult<(Bound<'py, Step>, Bound<'py, StepContext>)> {
        let step = Bound::new(py, Step::new(py, &self.step)?)?;
        let job = Bound::new(py, Job::new(py, &self.job, self.secrets)?)?;
        let ctx = StepContext::new(
            py,
            step.clone().unbind(),
            job.unbind(),
            &self.step,
            self.io.clone(),
            cancelled.clone().unbind(),
        )?;
        Ok((step, Bound::new(py, ctx)?))
    }
}

/// Runs what an `async def` step function returned to completion (see `kici_agent._aio`);
/// passes anything else through.
fn finish_awaitable<'py>(
    py: Python<'py>,
    value: Bound<'py, PyAny>,
    cancelled: &Bound<'py, Cancellation>,
) -> PyResult<Bound<'py, PyAny>> {
    if !value.hasattr("__await__")? {
        return Ok(value);
    }
    py.import("kici_agent._aio")?
        .getattr("run")?
        .call1((value, cancelled))
}

/// `None` is success and an `int` is an exit code; anything else is a mistake worth failing on.
fn returned_outcome(value: &Bound<'_, PyAny>) -> StepResult {
    if value.is_none() {
        return Ok(());
    }
    if value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>() {
        return match value.extract::<i32>() {
            Ok(0) => Ok(()),
            Ok(code) => Err(StepFailure {
                message: format!("Step function returned exit code {code}"),
                exit_code: Some(code),
            }),
            Err(_) => Err(StepFailure::new(format!(
                "Step function returned {value}, which is not an exit code"
            ))),
        };
    }
    Err(StepFailure::new(format!(
        "Step function returned a {}; return None for success or an int exit code",
        type_name(value)
    )))
}

/// `sys.exit(code)` in a step function ends the step like returning `code` would.
fn exit_outcome(py: Python<'_>, exit: &PyErr) -> StepResult {
    let code = match exit.value(py).getattr("code") {
        Ok(code) => code,
        Err(err) => return Err(python_failure(py, &err, None)),
    };
    if code.is_none() {
        return Ok(());
    }
    if code.is_instance_of::<PyInt>() && !code.is_instance_of::<PyBool>() {
        return returned_outcome(&code);
    }
    // Like the interpreter: any other code is a message, and the exit status is 1.
    Err(StepFailure {
        message: code.to_string(),
        exit_code: Some(1),
    })
}

/// A step failure for a Python exception; its traceback goes to the step log when there is one.
fn python_failure(py: Python<'_>, err: &PyErr, ctx: Option<&StepContext>) -> StepFailure {
    if let Some(ctx) = ctx {
        match format_traceback(py, err) {
            Ok(text) => ctx.write_log(py, text),
            Err(_) => ctx.write_log(py, format!("{err}\n")),
        }
    }
    let value = err.value(py);
    let kind = type_name(value.as_any());
    let message = value.str().map(|s| s.to_string()).unwrap_or_default();
    StepFailure::new(if message.is_empty() {
        kind
    } else {
        format!("{kind}: {message}")
    })
}

fn format_traceback(py: Python<'_>, err: &PyErr) -> PyResult<String> {
    let lines = py
        .import("traceback")?
        .getattr("format_exception")?
        .call1((err.get_type(py), err.value(py), err.traceback(py)))?;
    let mut text = String::new();
    for line in lines.try_iter()? {
        text.push_str(&line?.extract::<String>()?);
    }
    Ok(text)
}
