//! `kici_agent._native`: the Python bindings of kici-agent-core. The public Python package
//! `kici_agent` re-exports everything here; `python/kici_agent/_native.pyi` is the typed view.
//!
//! Threads: the agent's tokio runtime never runs Python code. Python step functions run on the
//! runtime's blocking threads with the GIL taken there; every call that may block releases the
//! GIL (see [`blocking`]).

mod agent;
mod blocking;
mod config;
mod context;
mod convert;
mod executor;
mod exit;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    kici_agent,
    ConfigError,
    PyValueError,
    "An invalid agent setting; the message lists every problem."
);
pyo3::create_exception!(
    kici_agent,
    AgentError,
    PyRuntimeError,
    "The agent could not do what was asked (start twice, HTTP port taken, ...)."
);

/// Sends the agent's own log (connection, jobs, warnings) to stderr. `level` is `debug`,
/// `info`, `warn` or `error`; `format` is `plain`, `json` or `auto` (JSON unless stderr is a
/// terminal). Applies to every agent in the process; returns `False` when a logger was already
/// installed.
#[pyfunction]
#[pyo3(signature = (level="info", format="plain"))]
fn enable_logging(level: &str, format: &str) -> PyResult<bool> {
    use kici_agent_core::config::{LogFormat, LogLevel};
    use std::io::IsTerminal;
    let level: LogLevel = level
        .parse()
        .map_err(|e| ConfigError::new_err(format!("level: {e}")))?;
    let format: LogFormat = format
        .parse()
        .map_err(|e| ConfigError::new_err(format!("format: {e}")))?;
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Plain => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::from(level))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    Ok(installed.is_ok())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", kici_agent_core::VERSION)?;
    m.add("ConfigError", m.py().get_type::<ConfigError>())?;
    m.add("AgentError", m.py().get_type::<AgentError>())?;
    // What PyO3 raises in Python when Rust code panics; named so hosts can recognise it.
    m.add(
        "PanicException",
        m.py().get_type::<pyo3::panic::PanicException>(),
    )?;
    m.add_class::<agent::Agent>()?;
    m.add_class::<agent::AgentState>()?;
    m.add_class::<agent::Event>()?;
    m.add_class::<agent::EventIterator>()?;
    m.add_class::<context::Step>()?;
    m.add_class::<context::Job>()?;
    m.add_class::<context::StepContext>()?;
    m.add_class::<context::Cancellation>()?;
    m.add_function(wrap_pyfunction!(enable_logging, m)?)?;
    m.add_function(wrap_pyfunction!(config::settings, m)?)?;
    m.py()
        .import("atexit")?
        .call_method1("register", (wrap_pyfunction!(exit::at_exit, m)?,))?;
    Ok(())
}
