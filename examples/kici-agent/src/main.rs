//! `kici-agent`: the standalone agent, a drop-in for the Node agent.
//!
//! - `kici-agent` reads its configuration from `KICI_*` variables exactly like the Node agent,
//!   serves `/health`, `/ready` and `/metrics`, and maps signals to the library's verbs:
//!   SIGTERM/SIGINT = graceful shutdown (running jobs get `KICI_SHUTDOWN_GRACE_MS`, 10 s by
//!   default, then their processes are killed), a second SIGTERM/SIGINT = exit at once,
//!   SIGUSR1 = drain (no new jobs, exit 0 when idle). Under a service manager that sets
//!   `NOTIFY_SOCKET` (systemd `Type=notify`) it reports `READY=1` once registered with the
//!   orchestrator, the connection's state as `STATUS=`, and `STOPPING=1` on shutdown or drain.
//! - `kici-agent exec JOB_FILE` runs a job file locally through the same engine, with no
//!   orchestrator, and exits 0 on success, 1 otherwise.
//! - `kici-agent health` asks a running agent's `GET /health` on the configured `KICI_PORT`
//!   (loopback unless `KICI_BIND_ADDRESS` names one address) and exits 0 on 200, 1 otherwise:
//!   a container `HEALTHCHECK` with no curl in the image.
//! - `kici-agent exec WORKFLOW.ts --job NAME` runs a job of a TypeScript workflow the same way,
//!   in the working copy (Node from `KICI_NODE` or PATH); without `--job` it lists the jobs.

use std::io::{IsTerminal, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kici_agent_core::config::{LogFormat, LogLevel};
use kici_agent_core::local::{self, LocalCancel, LocalJob, LocalSettings};
use kici_agent_core::protocol::{JobState, Outbound, StepState};
use kici_agent_core::{Agent, AgentConfig, FileLogSettings, RotatingFileLog, ServiceNotifier};

const USAGE: &str = "usage: kici-agent            run the agent (configured by KICI_* variables)
       kici-agent exec FILE  run a job file locally, with no orchestrator
       kici-agent exec WORKFLOW.ts [--job NAME]
                             run a job of a TypeScript workflow locally (lists the jobs
                             when none is named)
       kici-agent health     exit 0 if the running agent's /health answers 200, else 1
       kici-agent --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => run_agent(),
        ["exec", file] if file.ends_with(".ts") => exec_typescript(Path::new(file), None),
        ["exec", file, "--job", job] => exec_typescript(Path::new(file), Some(job)),
        ["exec", file] => exec(Path::new(file)),
        ["health"] => health(),
        ["--version" | "-V"] => {
            println!("kici-agent {}", kici_agent_core::VERSION);
            ExitCode::SUCCESS
        }
        ["--help" | "-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Installs the agent's log: stdout in `format`, plus the rotated JSON file log when
/// `KICI_LOG_DIR` is set (always JSON, whatever the stdout format).
fn init_logging(
    level: LogLevel,
    format: LogFormat,
    file: Option<RotatingFileLog>,
) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let json = match format {
        LogFormat::Json => true,
        LogFormat::Plain => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let stdout = tracing_subscriber::fmt::layer().with_writer(std::io::stdout);
    let stdout = if json {
        stdout
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed()
    } else {
        stdout.boxed()
    };
    let file = file.map(|file| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .with_current_span(false)
    });
    tracing_subscriber::registry()
        .with(stdout)
        .with(file)
        .with(kici_agent_core::agent_log_layer())
        .with(tracing_subscriber::filter::LevelFilter::from_level(
            tracing::Level::from(level),
        ))
        .try_init()
        .map_err(|e| format!("could not install the log: {e}"))
}

/// Prints a fatal startup error and returns exit code 1.
fn fatal(message: &str) -> ExitCode {
    eprintln!("kici-agent: {message}");
    ExitCode::from(1)
}

fn run_agent() -> ExitCode {
    let loaded = match AgentConfig::from_env() {
        Ok(loaded) => loaded,
        Err(e) => return fatal(&e.to_string()),
    };
    let config = loaded.config;
    let file_log = match FileLogSettings::from_config(&config).map(RotatingFileLog::open) {
        None => None,
        Some(Ok(file)) => Some(file),
        Some(Err(e)) => return fatal(&e.to_string()),
    };
    if let Err(e) = init_logging(config.log_level, config.log_format, file_log) {
        return fatal(&e);
    }
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    let missing: Vec<&str> = ["git", "bash"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .collect();
    if !missing.is_empty() {
        let lines: Vec<String> = missing
            .iter()
            .map(|t| format!("  - {t}: not found on PATH"))
            .collect();
        return fatal(&format!(
            "Agent required-tools validation failed:\n{}",
            lines.join("\n")
        ));
    }
    // Orphans of jobs (double fork, setsid, nohup) stay ours to kill and reap, not PID 1's.
    if let Err(error) = kici_agent_core::become_child_subreaper() {
        tracing::warn!(%error, "could not become a child subreaper: detached job processes reparent to PID 1");
    }
    let grace = config.shutdown_grace;
    let agent = match Agent::new(config) {
        Ok(agent) => Arc::new(agent),
        Err(e) => return fatal(&e.to_string()),
    };
    if let Err(e) = agent.start() {
        return fatal(&e.to_string());
    }
    if let Some(addr) = agent.http_addr() {
        tracing::info!(port = addr.port(), "Agent started on port {}", addr.port());
    }
    let notifier = match ServiceNotifier::from_env() {
        Ok(notifier) => notifier.map(Arc::new),
        Err(error) => {
            tracing::warn!(%error, "no readiness notifications for the service manager");
            None
        }
    };
    if let Some(notifier) = &notifier {
        // The binary pulls no events otherwise: the service manager gets what they mean.
        let (agent, notifier) = (agent.clone(), notifier.clone());
        std::thread::spawn(move || {
            while let Some(event) = agent.next_event(None) {
                if let Err(error) = notifier.on_event(&event) {
                    tracing::warn!(%error, "could not notify the service manager");
                }
            }
        });
    }
    let signals = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fatal(&format!("could not start the signal runtime: {e}")),
    };
    signals.block_on(serve_signals(agent, grace, notifier))
}

async fn serve_signals(
    agent: Arc<Agent>,
    grace: Duration,
    notifier: Option<Arc<ServiceNotifier>>,
) -> ExitCode {
    let stopping = |why: &str| {
        if let Some(Err(error)) = notifier.as_ref().map(|n| n.stopping(why)) {
            tracing::warn!(%error, "could not notify the service manager");
        }
    };
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
    ) else {
        return fatal("could not install signal handlers");
    };
    let stopped = {
        let agent = agent.clone();
        tokio::task::spawn_blocking(move || agent.wait(None))
    };
    tokio::pin!(stopped);
    let mut shutting_down = false;
    loop {
        let name = tokio::select! {
            _ = &mut stopped => return ExitCode::SUCCESS,
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = usr1.recv() => {
                tracing::info!("Received SIGUSR1, draining: no new jobs, exiting when idle");
                stopping("Draining: no new jobs, exiting when idle");
                agent.drain();
                continue;
            }
        };
        if shutting_down {
            tracing::warn!("Received {name} again, exiting now");
            return ExitCode::from(1);
        }
        shutting_down = true;
        tracing::info!("Received {name}, starting graceful shutdown...");
        stopping(&format!(
            "Shutting down on {name}: running jobs get {} ms",
            grace.as_millis()
        ));
        agent.shutdown(grace);
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let candidate = dir.join(tool);
            std::fs::metadata(&candidate)
                .map(|m| {
                    use std::os::unix::fs::PermissionsExt;
                    m.is_file() && m.permissions().mode() & 0o111 != 0
                })
                .unwrap_or(false)
        })
    })
}

/// How long `kici-agent health` waits to connect, and then for each read or write: well inside
/// the usual probe timeouts (Docker's default is 30 s), long enough for a loaded host.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The biggest `/health` answer read; the real one is a few hundred bytes.
const HEALTH_MAX_RESPONSE: u64 = 64 * 1024;

fn health() -> ExitCode {
    let config = match AgentConfig::from_env() {
        Ok(loaded) => loaded.config,
        Err(e) => return fatal(&e.to_string()),
    };
    if config.port == 0 {
        return fatal("health: KICI_PORT is 0 (an ephemeral port), so there is no port to ask");
    }
    // An agent bound to all interfaces answers on loopback; one bound to a single address only
    // there.
    let ip = if config.bind_address.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        config.bind_address
    };
    let addr = SocketAddr::new(ip, config.port);
    match get_health(addr) {
        Ok((200, body)) => {
            println!("{}", body.trim_end());
            ExitCode::SUCCESS
        }
        Ok((status, body)) => fatal(&format!(
            "health: http://{addr}/health answered {status}: {}",
            body.trim_end()
        )),
        Err(e) => fatal(&format!("health: http://{addr}/health: {e}")),
    }
}

/// One `GET /health` over HTTP/1.1; returns the status code and the body.
fn get_health(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, HEALTH_TIMEOUT)?;
    stream.set_read_timeout(Some(HEALTH_TIMEOUT))?;
    stream.set_write_timeout(Some(HEALTH_TIMEOUT))?;
    write!(
        stream,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .take(HEALTH_MAX_RESPONSE)
        .read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}

fn exec(file: &Path) -> ExitCode {
    let job = match LocalJob::load(file) {
        Ok(job) => job,
        Err(e) => return fatal(&e.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fatal(&format!("could not start the runtime: {e}")),
    };
    let cancel = LocalCancel::default();
    let state = runtime.block_on(async {
        let on_ctrl_c = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                while tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("\n[kici] interrupted: stopping the job (again to kill it)");
                    cancel.cancel();
                }
            })
        };
        let mut printer = Printer::new(&job.name);
        let state = local::run(&job, None, LocalSettings::default(), cancel, |message| {
            printer.show(message)
        })
        .await;
        on_ctrl_c.abort();
        state
    });
    if state == JobState::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn exec_typescript(file: &Path, job: Option<&str>) -> ExitCode {
    let workflow_file = match local::WorkflowFile::locate(file) {
        Ok(found) => found,
        Err(e) => return fatal(&e),
    };
    let node = std::env::var_os("KICI_NODE").map(std::path::PathBuf::from);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fatal(&format!("could not start the runtime: {e}")),
    };
    let Some(job) = job else {
        return match runtime.block_on(local::list_typescript_jobs(&workflow_file, node)) {
            Ok(workflows) => {
                for workflow in workflows {
                    println!("workflow {}", workflow.name);
                    for job in workflow.jobs {
                        println!("  {job}");
                    }
                }
                println!(
                    "run one with: kici-agent exec {} --job NAME",
                    file.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fatal(&e),
        };
    };
    let cancel = LocalCancel::default();
    let outcome = runtime.block_on(async {
        let on_ctrl_c = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                while tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("\n[kici] interrupted: stopping the job (again to kill it)");
                    cancel.cancel();
                }
            })
        };
        let mut printer = Printer::new(job);
        let outcome = local::run_typescript(
            &workflow_file,
            job,
            node,
            LocalSettings::default(),
            cancel,
            |message| printer.show(message),
        )
        .await;
        on_ctrl_c.abort();
        outcome
    });
    match outcome {
        Ok(JobState::Success) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => fatal(&e),
    }
}

/// Renders a job's messages as readable progress.
struct Printer {
    started: Instant,
    out: std::io::Stdout,
}

impl Printer {
    fn new(job: &str) -> Self {
        println!("== job {job}");
        Printer {
            started: Instant::now(),
            out: std::io::stdout(),
        }
    }

    fn show(&mut self, message: &Outbound) {
        let mut out = self.out.lock();
        let _ = match message {
            Outbound::StepStatus(s) if s.state == StepState::Running => {
                writeln!(out, "-- step {} [{}]", s.step_name, s.step_index)
            }
            Outbound::StepStatus(s) if s.state == StepState::Pending => Ok(()),
            Outbound::StepStatus(s) => {
                let data = s.data.clone().unwrap_or_default();
                let error = data.error.map(|e| format!(": {e}")).unwrap_or_default();
                writeln!(
                    out,
                    "   step {} {} in {}ms{error}",
                    s.step_name,
                    s.state.as_str(),
                    data.duration_ms.unwrap_or(0)
                )
            }
            Outbound::LogChunk(chunk) => {
                let prefix = if chunk.step_index < 0 {
                    "  # "
                } else {
                    "   | "
                };
                chunk
                    .lines
                    .iter()
                    .try_for_each(|line| writeln!(out, "{prefix}{line}"))
            }
            Outbound::JobStatus(s) if s.state.is_terminal() => {
                let data = s.data.clone().unwrap_or_default();
                let results = data.step_results.unwrap_or_default();
                let passed = results
                    .iter()
                    .filter(|r| r.status == StepState::Success)
                    .count();
                let error = data.error.map(|e| format!(" ({e})")).unwrap_or_default();
                writeln!(
                    out,
                    "== job {}{error}: {passed}/{} steps succeeded in {:.2}s",
                    s.state.as_str(),
                    results.len(),
                    self.started.elapsed().as_secs_f64()
                )
            }
            _ => Ok(()),
        };
    }
}
