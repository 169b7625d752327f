//! The [`Agent`] handle: one agent with its own runtime, connection, HTTP endpoints, metrics,
//! jobs and events. The library installs no signal handlers; hosts map their own signals to
//! [`Agent::drain`] and [`Agent::shutdown`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent_log::{self, AgentLogBuffer};
use crate::bundle;
use crate::config::{AgentConfig, ExecutionMode};
use crate::connection::{self, ConnectionSettings, ConnectionState, SessionHandler};
use crate::container::{ContainerError, ContainerExecutor, ContainerSettings};
use crate::events::{Event, EventQueue};
use crate::executor::{BuiltinSettings, Executor, StepMapError};
use crate::http::Endpoints;
use crate::job::{self, JobControl, JobServices, JobSettings};
use crate::metrics::Metrics;
use crate::outbox::{JobAttempt, Outbox, OutboxLimits, Pacer};
use crate::protocol::{
    new_message_id, now_ms, AgentRegister, AgentStatus, ConfigAck, FleetLogsRequest, JobAck,
    JobCancel, JobDispatch, JobRef, JobReject, JobState, JobStatusData, Outbound, RegisterAck,
    RejectReason, JOB_LOG_INDEX,
};
use crate::routing::{Builtins, ExecutorRegistry};
use crate::scaler::{Armed, IdleTimer, SelfShutdownReason};
use crate::telemetry;
use crate::typescript::TypeScriptExecutor;

/// The agent version (`agent.register.version`, `/health`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit this library was built from (`/health` `buildCommit`), or `"unknown"` when
/// it was built outside a git checkout of this project.
pub const BUILD_COMMIT: &str = env!("KICI_BUILD_COMMIT");

/// Why an agent could not be created or started.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    StepMap(#[from] StepMapError),
    #[error("could not create the agent's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("could not listen on {addr} for /health, /ready and /metrics: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent was already started")]
    AlreadyStarted,
    /// [`Agent::shutdown`] or [`Agent::drain`] came before [`Agent::start`].
    #[error("the agent was stopped before it started")]
    StoppedBeforeStart,
    /// Executors are fixed when the agent starts.
    #[error("executors must be registered before the agent starts")]
    RegisteredAfterStart,
    #[error("container backend: {0}")]
    Container(#[from] ContainerError),
    /// `KICI_SANDBOX=true` but bubblewrap is missing or cannot make its namespaces here.
    #[error("{0}")]
    Sandbox(String),
}

/// The container executor (spec §12.3). It does not contact the engine yet. In container
/// execution mode an unusable DOCKER_HOST (or a build without the cargo feature `container`)
/// stops start-up; otherwise container jobs are then refused with that reason.
fn container_executor(
    config: &AgentConfig,
    default_image: Option<String>,
) -> Result<Option<Arc<ContainerExecutor>>, AgentError> {
    let settings = ContainerSettings {
        default_image,
        keep_failed: config.docker_keep_failed,
        stop_grace: config.cancel_grace.min(Duration::from_secs(10)),
        ..ContainerSettings::default()
    };
    match ContainerExecutor::new(settings) {
        Ok(executor) => Ok(Some(Arc::new(executor))),
        Err(e) if config.execution_mode == Some(ExecutionMode::Container) => {
            Err(AgentError::Container(e))
        }
        Err(e) => {
            tracing::warn!(error = %e, "container jobs are unavailable");
            Ok(None)
        }
    }
}

/// The agent's own executors for `config`: the shell or process executor, the container
/// executor and the TypeScript runner.
fn builtins(config: &AgentConfig) -> Result<Builtins, AgentError> {
    let builtin = BuiltinSettings {
        process_executor: config.process_executor.clone(),
        step_map_file: config.step_map_file.clone(),
        kill_grace: config.cancel_grace,
    };
    let default_image = (config.execution_mode == Some(ExecutionMode::Container))
        .then(|| config.default_container_image.clone())
        .flatten();
    Ok(Builtins {
        executor: Some(builtin.executor()?),
        chosen_by_operator: builtin.chosen_by_operator(),
        container: container_executor(config, default_image.clone())?,
        default_image,
        typescript: Some(Arc::new(TypeScriptExecutor::new(
            config.node.clone(),
            config.cancel_grace,
            config.default_step_timeout,
        ))),
    })
}

/// What every job of the agent shares: `executors` (the host's and the agent's) and the job
/// settings of the configuration.
fn job_services(shared: &Shared, executors: ExecutorRegistry) -> JobServices {
    let config = &shared.config;
    JobServices {
        outbox: shared.outbox.clone(),
        metrics: shared.metrics.clone(),
        executors,
        events: shared.events.clone(),
        settings: JobSettings {
            max_log_size_bytes: config.max_log_size_bytes,
            default_step_timeout: config.default_step_timeout,
            job_heartbeat_interval: config.job_heartbeat_interval,
            cancel_grace: config.cancel_grace,
            github_token: config.github_token.as_ref().map(|t| t.expose().to_owned()),
            host_env: std::env::vars().collect(),
            job_pids_max: config.job_pids_max,
            sandbox: config.sandbox.then_some(config.sandbox_network),
            running_resends: config.running_resends.clone(),
            labels: config.wire_labels(),
        },
    }
}

/// Settings the Node agent has that this agent accepts but does not act on yet; each one that
/// is set is logged as a warning at start.
fn ignored_settings(config: &AgentConfig) -> Vec<&'static str> {
    use crate::config::BackpressureMode;
    let mut ignored = Vec::new();
    if config.backpressure_mode == BackpressureMode::Drop {
        ignored.push("KICI_BACKPRESSURE_MODE=drop: log lines are never dropped while connected; the step is slowed instead (pause)");
    }
    ignored
}

/// A snapshot of the agent's state.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    pub agent_id: String,
    pub connection: ConnectionState,
    pub registered: bool,
    pub draining: bool,
    pub stopped: bool,
    pub active_jobs: usize,
    /// The last error worth showing: auth failure, lost connection (e.g. `TLS handshake with
    /// host:443 failed: invalid peer certificate: UnknownIssuer`); cleared on registration.
    pub last_error: Option<String>,
}

struct RunningJob {
    attempt: JobAttempt,
    control: JobControl,
}

/// Everything about the agent that changes together: connection, lifecycle flags and the
/// running jobs. One lock guards all of it, so there is no lock order to get wrong (an admission
/// reads `draining` and the job count atomically; a snapshot sees a consistent pair).
struct Status {
    connection: ConnectionState,
    draining: bool,
    stopped: bool,
    last_error: Option<String>,
    jobs: HashMap<String, RunningJob>,
    /// The last `register.ack` announced a job on its way (`pendingDispatch`).
    pending_dispatch: bool,
}

struct Shared {
    config: AgentConfig,
    metrics: Metrics,
    outbox: Arc<Outbox>,
    events: Arc<EventQueue>,
    /// Set by [`Agent::start`], before the connection that brings dispatches opens.
    services: OnceLock<Arc<JobServices>>,
    status: Mutex<Status>,
    stopped: Condvar,
    /// Woken when the job count changes or a drain or shutdown is requested.
    wake: Notify,
    shutdown_grace: Mutex<Option<Duration>>,
    started_at: Instant,
    /// This agent's `agent.log` ring, fed by [`crate::agent_log::layer`].
    agent_log: Arc<AgentLogBuffer>,
    /// Scaler-managed agents only: the idle self-shutdown window (§6.5).
    scaler_idle: Option<IdleTimer>,
}

/// One KiCI agent. Create it, register executors ([`Agent::register_step_executor`],
/// [`Agent::register_job_executor`], [`Agent::set_default_executor`]), `start` it, and
/// `drain` / `shutdown` / `wait`. Dropping it shuts it down.
///
/// Which executor runs a job or step is decided by one rule, in [`ExecutorRegistry`]: host
/// executors registered for the step or the job first, then the job's container, then the
/// host default, then the built-in executor (`process_executor`, else the shell executor with
/// `step_map_file`); a TypeScript job nothing claims runs through the TypeScript runner.
pub struct Agent {
    shared: Arc<Shared>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    http_addr: Mutex<Option<SocketAddr>>,
    started: Mutex<bool>,
    /// The host's executors, until `start` fixes them.
    executors: Mutex<ExecutorRegistry>,
    /// The agent's own executors, added to the host's at `start`.
    builtins: Builtins,
}

impl Agent {
    /// An agent with no host executors yet. Fails on an invalid configuration, an unreadable
    /// step map, or an unusable `DOCKER_HOST` (or a build without the cargo feature `container`)
    /// in container execution mode.
    pub fn new(config: AgentConfig) -> Result<Agent, AgentError> {
        Self::with_executors(config, ExecutorRegistry::new())
    }

    /// An agent with the host's executors already in a registry; more may be registered
    /// before it starts.
    pub fn with_executors(
        config: AgentConfig,
        executors: ExecutorRegistry,
    ) -> Result<Agent, AgentError> {
        config.validate()?;
        let builtins = builtins(&config)?;
        let metrics = Metrics::new();
        let shared = Arc::new(Shared {
            outbox: Arc::new(Outbox::new(OutboxLimits::default(), metrics.clone())),
            metrics,
            events: Arc::new(EventQueue::new(10_000)),
            services: OnceLock::new(),
            status: Mutex::new(Status {
                connection: ConnectionState::Disconnected,
                draining: false,
                stopped: false,
                last_error: None,
                jobs: HashMap::new(),
                pending_dispatch: false,
            }),
            stopped: Condvar::new(),
            wake: Notify::new(),
            shutdown_grace: Mutex::new(None),
            started_at: Instant::now(),
            agent_log: AgentLogBuffer::register(),
            scaler_idle: config.scaler_managed.then(|| {
                IdleTimer::new(
                    config.scaler_idle_timeout,
                    config.scaler_pending_dispatch_timeout,
                )
            }),
            config,
        });
        Ok(Agent {
            shared,
            runtime: Mutex::new(None),
            http_addr: Mutex::new(None),
            started: Mutex::new(false),
            executors: Mutex::new(executors),
            builtins,
        })
    }

    /// Runs steps named `step` with `executor` (replacing an earlier registration).
    /// [`AgentError::RegisteredAfterStart`] once started.
    pub fn register_step_executor(
        &self,
        step: impl Into<String>,
        executor: Arc<dyn Executor>,
    ) -> Result<(), AgentError> {
        self.register(|executors| {
            executors.for_step(step, executor);
        })
    }

    /// Runs the steps of jobs named `job` (`jobConfig.name`) with `executor`, unless a step
    /// executor matches. [`AgentError::RegisteredAfterStart`] once started.
    pub fn register_job_executor(
        &self,
        job: impl Into<String>,
        executor: Arc<dyn Executor>,
    ) -> Result<(), AgentError> {
        self.register(|executors| {
            executors.for_job(job, executor);
        })
    }

    /// Runs every step no step or job executor and no job container takes with `executor`,
    /// instead of the built-in executor; it also claims TypeScript jobs.
    /// [`AgentError::RegisteredAfterStart`] once started.
    pub fn set_default_executor(&self, executor: Arc<dyn Executor>) -> Result<(), AgentError> {
        self.register(|executors| {
            executors.set_default(executor);
        })
    }

    fn register(&self, add: impl FnOnce(&mut ExecutorRegistry)) -> Result<(), AgentError> {
        // Held while adding: `start` takes the registry under the same lock.
        let started = lock(&self.started);
        if *started {
            return Err(AgentError::RegisteredAfterStart);
        }
        add(&mut lock(&self.executors));
        Ok(())
    }

    /// The agent's id.
    pub fn agent_id(&self) -> &str {
        &self.shared.config.agent_id
    }

    /// Starts the HTTP endpoints and the connection in the background. Returns once the HTTP
    /// port is bound (so a port conflict is an error here, not a log line).
    pub fn start(&self) -> Result<(), AgentError> {
        let mut started = lock(&self.started);
        if *started {
            return Err(AgentError::AlreadyStarted);
        }
        let shared = self.shared.clone();
        if shared.state().stopped {
            return Err(AgentError::StoppedBeforeStart);
        }
        if shared.config.sandbox {
            // Running unsandboxed when asked for a sandbox would be worse than not starting.
            crate::sandbox::check_available(shared.config.sandbox_network)
                .map_err(AgentError::Sandbox)?;
        }
        let executors = lock(&self.executors)
            .clone()
            .with_builtins(self.builtins.clone());
        let services = Arc::new(job_services(&shared, executors));
        // Created here, not in `new`: no agent thread exists before `start` (a C host blocks
        // its signals between the two, and threads inherit the mask they were created with).
        let runtime = {
            let mut slot = lock(&self.runtime);
            match &*slot {
                Some(runtime) => runtime.handle().clone(),
                None => {
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .thread_name("kici-agent")
                        .enable_all()
                        .build()
                        .map_err(AgentError::Runtime)?;
                    let handle = runtime.handle().clone();
                    *slot = Some(runtime);
                    handle
                }
            }
        };
        let addr = SocketAddr::new(shared.config.bind_address, shared.config.port);
        let endpoints = {
            let _runtime = runtime.enter();
            Endpoints::bind(addr).map_err(|source| AgentError::Http { addr, source })?
        };
        let bound = endpoints.local_addr();
        *lock(&self.http_addr) = bound;
        // Set once: an earlier start that failed returned before this point.
        let _ = shared.services.set(services.clone());
        *started = true;
        tracing::info!(
            agent_id = %shared.config.agent_id,
            version = VERSION,
            build_commit = BUILD_COMMIT,
            orchestrator_url = %shared.config.orchestrator_url,
            labels = ?shared.config.wire_labels(),
            port = bound.map(|a| a.port()),
            "Agent starting"
        );
        for warning in ignored_settings(&shared.config) {
            tracing::warn!("{warning}");
        }
        if let Some(ca_file) = &shared.config.tls_ca_file {
            // libgit2's TLS trust is process-wide, so it is set here, once, not per clone.
            if let Err(error) = crate::checkout::trust_extra_ca(ca_file) {
                tracing::error!(%error, "git HTTPS clones will not trust the extra CA certificates");
            }
        }
        runtime.spawn(supervise(shared.clone(), services, endpoints));
        // Leftovers of a crashed agent; never delays or fails the start.
        runtime.spawn_blocking(|| {
            crate::containment::collect_dead_agents_leftovers();
            crate::workspace::collect_stale(&std::env::temp_dir(), crate::workspace::STALE_AFTER)
        });
        Ok(())
    }

    /// Stops taking jobs (dispatches are rejected `draining`, `/ready` answers 503) and stops
    /// once idle.
    /// Before [`Agent::start`] it just marks the agent stopped.
    pub fn drain(&self) {
        lock(&self.shared.status).draining = true;
        self.shared.wake.notify_one();
        // Held while marking: a `start` running now either finished first or sees `stopped`.
        let started = lock(&self.started);
        if !*started {
            self.shared.mark_stopped();
        }
    }

    /// Stops: no new jobs; running jobs get `grace` to finish, then their processes are killed
    /// and they are reported `cancelled`. Returns at once; see [`Agent::wait`].
    pub fn shutdown(&self, grace: Duration) {
        self.shared.request_shutdown(grace);
        // Marks an agent that never started as stopped.
        self.drain();
    }

    /// Waits until the agent stopped, at most `timeout` (`None` = forever). Returns whether it
    /// stopped. Blocking: call it from a host thread.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        // A timeout too far away to represent is forever.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut status = lock(&self.shared.status);
        while !status.stopped {
            status = match deadline {
                None => self
                    .shared
                    .stopped
                    .wait(status)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    None => return false,
                    Some(left) => {
                        self.shared
                            .stopped
                            .wait_timeout(status, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                },
            };
        }
        true
    }

    /// The agent's state now.
    pub fn state(&self) -> AgentState {
        self.shared.state()
    }

    /// The Prometheus text of this agent's metrics.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// The next event, waiting up to `timeout` (`None` = forever). Blocking.
    pub fn next_event(&self, timeout: Option<Duration>) -> Option<Event> {
        self.shared.events.next(timeout)
    }

    /// Where `/health`, `/ready` and `/metrics` are served, once started; always `None` in a
    /// build without the cargo feature `http` (no endpoint is served).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        *lock(&self.http_addr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if *lock(&self.started) && !self.shared.state().stopped {
            self.shutdown(self.shared.config.shutdown_grace);
            self.wait(Some(
                self.shared.config.shutdown_grace + Duration::from_secs(10),
            ));
        }
        if let Some(runtime) = lock(&self.runtime).take() {
            runtime.shutdown_background();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's life: HTTP, connection, and the drain / shutdown sequence.
async fn supervise(shared: Arc<Shared>, services: Arc<JobServices>, endpoints: Endpoints) {
    let stop_http = CancellationToken::new();
    let stop_connection = CancellationToken::new();
    let http_task = tokio::spawn(endpoints.serve(shared.clone(), stop_http.clone()));
    let config = &shared.config;
    let settings = ConnectionSettings {
        url: config.orchestrator_url.clone(),
        token: config.token.clone(),
        heartbeat_interval: config.heartbeat_interval,
        pacer: Pacer::new(
            config.rate_limits.msgs_per_sec,
            config.rate_limits.msg_burst,
            config.rate_limits.bytes_per_sec,
            config.rate_limits.byte_burst,
        ),
        connect_timeout: Duration::from_secs(10),
        reconnect: config.reconnect,
        tls_ca_file: config.tls_ca_file.clone(),
    };
    let connection_task = tokio::spawn(connection::run(
        settings,
        shared.outbox.clone(),
        shared.clone() as Arc<dyn SessionHandler>,
        shared.metrics.clone(),
        stop_connection.clone(),
    ));

    tokio::spawn(agent_log::forward(
        shared.agent_log.clone(),
        shared.outbox.clone(),
        config.agent_id.clone(),
        stop_connection.clone(),
    ));
    if shared.scaler_idle.is_some() {
        tokio::spawn(shut_down_when_idle_too_long(shared.clone()));
    }
    tokio::spawn(telemetry::push_metrics_every(
        telemetry::METRICS_PUSH_INTERVAL,
        shared.outbox.clone(),
        shared.metrics.clone(),
        config.agent_id.clone(),
        stop_connection.clone(),
    ));

    // Leftover job containers of an earlier run (spec §12.3 [Q]); quiet without an engine.
    if let Some(container) = services.executors.container().cloned() {
        tokio::spawn(async move {
            match container.remove_all_sandboxes().await {
                Ok(removed) => tracing::debug!(removed, "start-up sweep of job containers"),
                Err(e) => tracing::debug!(error = %e, "no start-up sweep of job containers"),
            }
        });
    }

    // Wait for a drain that went idle, or a shutdown request.
    let grace = loop {
        let woken = shared.wake.notified();
        if let Some(grace) = *lock(&shared.shutdown_grace) {
            break grace;
        }
        let drained = {
            let status = lock(&shared.status);
            status.draining && status.jobs.is_empty()
        };
        if drained {
            break config.shutdown_grace;
        }
        woken.await;
    };
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
    telemetry::push_metrics(&shared.outbox, &shared.metrics, &config.agent_id);
    let deadline = tokio::time::Instant::now() + grace;
    if !shared.wait_idle_until(deadline).await {
        {
            let status = lock(&shared.status);
            let running: Vec<&String> = status.jobs.keys().collect();
            tracing::warn!(jobs = ?running, "shutdown grace ran out; killing running jobs");
            for job in status.jobs.values() {
                job.control.force.cancel();
                job.control.cancel.cancel();
            }
        }
        shared
            .wait_idle_until(tokio::time::Instant::now() + Duration::from_secs(10))
            .await;
    }
    if let Some(container) = services.executors.container() {
        let sweep = container.remove_all_sandboxes();
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(10), sweep).await {
            tracing::debug!(error = %e, "no shutdown sweep of job containers");
        }
    }
    // Deliver what is queued, within what is left of the grace (at least a moment).
    let flush_until = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
    let registered = matches!(lock(&shared.status).connection, ConnectionState::Registered);
    if registered
        && tokio::time::timeout_at(flush_until, shared.outbox.wait_empty())
            .await
            .is_err()
    {
        // Statuses matter more than the rest of the log: drop the lines so that the terminal
        // statuses waiting behind them still go out.
        tracing::warn!(
            undelivered_lines = shared.outbox.abandon_lines(),
            "shutdown: log lines could not be delivered before the grace ran out"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.outbox.wait_empty()).await;
    }
    stop_connection.cancel();
    let _ = connection_task.await;
    stop_http.cancel();
    let _ = http_task.await;
    tracing::info!("Graceful shutdown complete");
    shared.mark_stopped();
}

/// Scaler-managed agents: waits for an idle window to run out while the agent is still idle,
/// then shuts it down (§6.5).
async fn shut_down_when_idle_too_long(shared: Arc<Shared>) {
    let Some(timer) = &shared.scaler_idle else {
        return;
    };
    loop {
        let (reason, generation) = timer.expired().await;
        // Under the status lock, where every arm and cancel happens: a dispatch admitted after
        // the window ran out has made this expiry stale. A window that ran out is spent either
        // way; the end of the next job arms a new one.
        let still_idle = {
            let status = lock(&shared.status);
            timer.take_if_current(generation) && status.jobs.is_empty()
        };
        if still_idle {
            shared.shut_down_by_itself(reason);
            return;
        }
    }
}

impl Shared {
    /// No new jobs; running jobs get `grace`; the supervisor does the rest.
    fn request_shutdown(&self, grace: Duration) {
        // Keeps the deadline arithmetic representable; nobody waits a year for a job.
        let grace = grace.min(Duration::from_secs(365 * 24 * 3600));
        {
            let mut requested = lock(&self.shutdown_grace);
            *requested = Some(requested.map_or(grace, |g| g.min(grace)));
        }
        lock(&self.status).draining = true;
        self.wake.notify_one();
    }

    fn shut_down_by_itself(&self, reason: SelfShutdownReason) {
        tracing::info!(
            reason = reason.as_str(),
            "scaler-managed agent is idle; shutting down"
        );
        self.events.push(Event::SelfShutdown {
            reason: reason.as_str().to_owned(),
        });
        self.request_shutdown(self.config.shutdown_grace);
    }

    /// Scaler-managed agents: arms the idle window if the agent is idle now (after a job, or
    /// on registration); an agent that is not registered waits for its registration.
    fn arm_scaler_idle_if_idle(&self, pending_dispatch: bool) {
        let Some(timer) = &self.scaler_idle else {
            return;
        };
        let armed = {
            let status = lock(&self.status);
            let idle = status.jobs.is_empty()
                && !status.draining
                && status.connection == ConnectionState::Registered;
            if !idle {
                return;
            }
            timer.arm(pending_dispatch)
        };
        if let Armed::Now(reason) = armed {
            self.shut_down_by_itself(reason);
        }
    }

    fn state(&self) -> AgentState {
        let status = lock(&self.status);
        AgentState {
            agent_id: self.config.agent_id.clone(),
            registered: status.connection == ConnectionState::Registered,
            connection: status.connection.clone(),
            draining: status.draining,
            stopped: status.stopped,
            active_jobs: status.jobs.len(),
            last_error: status.last_error.clone(),
        }
    }

    fn mark_stopped(&self) {
        let mut status = lock(&self.status);
        if !status.stopped {
            status.stopped = true;
            self.events.push(Event::Stopped);
        }
        self.stopped.notify_all();
    }

    async fn wait_idle_until(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let woken = self.wake.notified();
            if lock(&self.status).jobs.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return lock(&self.status).jobs.is_empty();
            }
        }
    }

    fn agent_status(&self) -> Outbound {
        Outbound::AgentStatus(AgentStatus {
            message_id: new_message_id(),
            agent_id: self.config.agent_id.clone(),
            active_jobs: lock(&self.status).jobs.len() as u32,
            memory_used_mb: None,
            memory_available_mb: None,
            uptime_seconds: Some(self.started_at.elapsed().as_secs()),
        })
    }

    fn reject(&self, job: &JobRef, reason: RejectReason) {
        tracing::info!(run_id = %job.run_id, job_id = %job.job_id, ?reason, "rejecting job dispatch");
        self.outbox.push_control(Outbound::JobReject(JobReject {
            message_id: new_message_id(),
            run_id: job.run_id.clone(),
            job_id: job.job_id.clone(),
            reason,
            timestamp: now_ms(),
        }));
        self.outbox.push_control(self.agent_status());
        self.events.push(Event::JobRejected {
            run_id: job.run_id.clone(),
            job_id: job.job_id.clone(),
            reason: match reason {
                RejectReason::Busy => "busy".into(),
                RejectReason::Draining => "draining".into(),
            },
        });
    }

    fn ack(&self, job: &JobRef) {
        self.outbox.push_control(Outbound::JobAck(JobAck {
            message_id: new_message_id(),
            run_id: job.run_id.clone(),
            job_id: job.job_id.clone(),
            timestamp: now_ms(),
        }));
    }

    /// Accepts a job if there is room, under the status lock so capacity is exact.
    fn admit(self: &Arc<Self>, job: &JobRef) -> Option<(JobAttempt, JobControl)> {
        let mut status = lock(&self.status);
        if let Some(timer) = &self.scaler_idle {
            // Any dispatch ends the idle window, even one we reject: a busy or draining agent
            // is not idle, and an idle one accepts it.
            timer.cancel();
        }
        if status.draining {
            drop(status);
            self.reject(job, RejectReason::Draining);
            return None;
        }
        let jobs = &mut status.jobs;
        if jobs.len() >= self.config.max_concurrency as usize || jobs.contains_key(&job.job_id) {
            drop(status);
            self.reject(job, RejectReason::Busy);
            return None;
        }
        let control = JobControl::default();
        // Before the ack: what an earlier attempt of this job id left undelivered is dropped.
        let attempt = self.outbox.begin_attempt(job);
        jobs.insert(
            job.job_id.clone(),
            RunningJob {
                attempt: attempt.clone(),
                control: control.clone(),
            },
        );
        self.metrics.jobs_active.set(jobs.len() as i64);
        // The ack goes before any work, so a slow clone never misses the ack deadline.
        self.ack(job);
        Some((attempt, control))
    }

    /// Frees the job's slot; called by the runner just before its terminal status is queued.
    fn release_slot(&self, job: &JobRef) {
        let jobs = &mut lock(&self.status).jobs;
        jobs.remove(&job.job_id);
        self.metrics.jobs_active.set(jobs.len() as i64);
    }

    fn job_done(&self) {
        self.outbox.push_control(self.agent_status());
        telemetry::push_metrics(&self.outbox, &self.metrics, &self.config.agent_id);
        self.wake.notify_one();
        self.arm_scaler_idle_if_idle(false);
    }
}

/// Called by the connection task, on the agent's runtime (so `tokio::spawn` reaches it).
impl SessionHandler for Shared {
    fn state_changed(&self, state: ConnectionState) {
        if state != ConnectionState::Registered {
            // Before the state is visible: a line logged by whoever sees "not registered" must
            // wait in the agent.log ring, not go to an outbox whose socket is gone.
            self.agent_log.disconnected();
        }
        // The state is visible before the event goes out: a host reacting to the event reads it.
        let previous = {
            let mut status = lock(&self.status);
            if state == ConnectionState::Registered {
                status.last_error = None;
            }
            if let ConnectionState::AuthFailed(reason) = &state {
                status.last_error = Some(format!("authentication failed: {reason}"));
            }
            std::mem::replace(&mut status.connection, state.clone())
        };
        match state {
            ConnectionState::Registered => {
                self.agent_log.registered();
                self.outbox.push_control(Outbound::ConfigAck(ConfigAck {
                    message_id: new_message_id(),
                    agent_id: self.config.agent_id.clone(),
                }));
                self.outbox.push_control(self.agent_status());
                self.events.push(Event::Registered {
                    agent_id: self.config.agent_id.clone(),
                });
                let pending_dispatch = lock(&self.status).pending_dispatch;
                self.arm_scaler_idle_if_idle(pending_dispatch);
            }
            ConnectionState::Disconnected if previous == ConnectionState::Registered => {
                self.events.push(Event::Disconnected);
            }
            ConnectionState::AuthFailed(reason) => self.events.push(Event::AuthFailed { reason }),
            _ => {}
        }
    }

    fn registration_acked(&self, ack: &RegisterAck) {
        lock(&self.status).pending_dispatch = ack.pending_dispatch == Some(true);
    }

    fn connection_lost(&self, reason: &str) {
        lock(&self.status).last_error = Some(reason.to_owned());
    }

    fn registration(&self) -> AgentRegister {
        let mut in_flight: Vec<JobRef> = lock(&self.status)
            .jobs
            .values()
            .map(|j| j.attempt.job.clone())
            .collect();
        for job in self.outbox.undelivered_jobs() {
            if !in_flight.contains(&job) {
                in_flight.push(job);
            }
        }
        let host = crate::host::facts();
        AgentRegister {
            message_id: format!("register-{}-{}", self.config.agent_id, now_ms()),
            agent_id: self.config.agent_id.clone(),
            labels: self.config.wire_labels(),
            platform: AgentConfig::platform().to_owned(),
            arch: AgentConfig::arch().to_owned(),
            version: VERSION.to_owned(),
            max_concurrency: self.config.max_concurrency,
            in_flight_jobs: in_flight,
            hostname: self.config.hostname.clone(),
            os_release: host.os_release,
            os_version: host.os_version,
            total_memory_mb: host.total_memory_mb,
            cpu_count: host.cpu_count,
            running_as_user: host.user,
            running_as_uid: host.uid,
            properties: self
                .config
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or_default()))
                .collect(),
        }
    }

    fn on_dispatch(self: Arc<Self>, dispatch: Box<JobDispatch>) {
        let job = dispatch.job_ref();
        let Some(services) = self.services.get().cloned() else {
            // Dispatches come over the connection `start` opens after setting the services.
            self.on_unreadable_dispatch(job, "the agent is not started".into());
            return;
        };
        let Some((attempt, control)) = self.admit(&job) else {
            return;
        };
        tracing::info!(run_id = %job.run_id, job_id = %job.job_id, job = %dispatch.job_config.name, "Accepting job dispatch");
        self.events.push(Event::JobStarted {
            run_id: job.run_id.clone(),
            job_id: job.job_id.clone(),
            name: dispatch.job_config.name.clone(),
        });
        let shared = self.clone();
        tokio::spawn(async move {
            let release = {
                let (shared, job) = (shared.clone(), job.clone());
                move || shared.release_slot(&job)
            };
            let state = job::run_job(services, dispatch, attempt, control, release).await;
            tracing::info!(run_id = %job.run_id, job_id = %job.job_id, state = state.as_str(), "job finished");
            shared.job_done();
        });
    }

    fn on_unreadable_dispatch(&self, job: JobRef, error: String) {
        tracing::error!(run_id = %job.run_id, job_id = %job.job_id, %error, "unreadable job dispatch; failing it");
        // Answer it (REC of spec §4.1): ack, then fail, so it does not wait for the ack deadline.
        let attempt = self.outbox.begin_attempt(&job);
        self.ack(&job);
        let data = JobStatusData {
            error: Some(format!(
                "the agent could not read the job dispatch: {error}"
            )),
            ..JobStatusData::default()
        };
        self.outbox.push_status(
            &attempt,
            job::job_status(&job, JobState::Failed, Some(data)),
            true,
        );
        self.metrics.job_finished(JobState::Failed);
    }

    fn reconnect_scheduled(&self, attempt: u32, delay: Duration) {
        self.events.push(Event::ReconnectScheduled {
            attempt,
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        });
    }

    fn on_fleet_logs_request(&self, request: FleetLogsRequest) {
        tracing::info!(request_id = %request.request_id, "diagnostics bundle requested");
        let facts = bundle::BundleFacts {
            agent_id: self.config.agent_id.clone(),
            hostname: self.config.hostname.clone(),
            config: bundle::redacted_config(&self.config),
            metrics_text: self.metrics.render(),
            active_jobs: lock(&self.status)
                .jobs
                .values()
                .map(|j| j.attempt.job.clone())
                .collect(),
            recent_log: self.agent_log.recent(),
            log_dir: self.config.log_dir.clone(),
            uptime: self.started_at.elapsed(),
        };
        // Negative, NaN or huge values from the peer saturate instead of panicking.
        let window = Duration::try_from_secs_f64(request.log_window_hours.max(0.0) * 3600.0)
            .unwrap_or(Duration::MAX);
        let max_bytes = request.max_bytes.max(0.0) as u64;
        tokio::spawn(bundle::answer(
            self.outbox.clone(),
            request.request_id,
            window,
            max_bytes,
            facts,
        ));
    }

    fn on_cancel(&self, cancel: JobCancel) {
        // The status lock is held while `cancelling` is queued: the runner frees its slot under
        // the same lock before queueing the terminal status, so `cancelling` never follows it.
        let status = lock(&self.status);
        let Some(running) = status.jobs.get(&cancel.job_id) else {
            tracing::debug!(job_id = %cancel.job_id, "cancel for a job we do not run; ignored");
            return;
        };
        let control = running.control.clone();
        let attempt = running.attempt.clone();
        let job = &attempt.job;
        let force = cancel.force == Some(true) || control.cancel.is_cancelled();
        tracing::info!(job_id = %job.job_id, reason = %cancel.reason, force, "Job cancel received");
        let (state, line) = if force {
            (None, "[kici] Force cancel received, skipping all hooks")
        } else {
            (
                Some(JobState::Cancelling),
                "[kici] Cancel received, running cancel hooks...",
            )
        };
        if let Some(state) = state {
            self.outbox
                .push_status(&attempt, job::job_status(job, state, None), false);
        }
        self.outbox
            .push_lines_now(&attempt, JOB_LOG_INDEX, vec![line.into()]);
        drop(status);
        if force {
            control.force.cancel();
            control.cancel.cancel();
            return;
        }
        control.cancel.cancel();
        let grace = self.config.cancel_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            control.force.cancel();
        });
    }
}

#[cfg(feature = "http")]
impl crate::http::HealthView for Shared {
    fn health(&self) -> serde_json::Value {
        // When this library was built, in seconds since the Unix epoch (`SOURCE_DATE_EPOCH`
        // when set).
        let build_unix_time: u64 = env!("KICI_BUILD_UNIX_TIME").parse().unwrap_or_default();
        let state = self.state();
        let mut body = serde_json::json!({
            "status": "ok",
            "timestamp": crate::http::iso8601_utc(now_ms()),
            "uptime": self.started_at.elapsed().as_secs_f64(),
            "agentId": state.agent_id,
            "activeJobs": state.active_jobs,
            "connected": state.registered,
            "version": VERSION,
            "buildCommit": BUILD_COMMIT,
            "buildDate": crate::http::iso8601_utc(build_unix_time * 1000),
            "connection": state.connection,
            "draining": state.draining,
        });
        if let Some(error) = &state.last_error {
            body["lastError"] = serde_json::Value::String(error.clone());
        }
        if let ConnectionState::AuthFailed(reason) = &state.connection {
            body["stoppedReason"] = serde_json::Value::String(format!(
                "authentication failed: {reason}; not reconnecting (fix KICI_AGENT_TOKEN and restart)"
            ));
        }
        body
    }

    fn readiness(&self) -> crate::http::Readiness {
        let status = lock(&self.status);
        crate::http::Readiness {
            connected: status.connection == ConnectionState::Registered,
            draining: status.draining,
        }
    }

    fn metrics_text(&self) -> String {
        self.metrics.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The endpoints are the cargo feature `http`: with it `start` binds them, without it the
    /// agent starts all the same and serves nothing (the configured port stays free).
    #[test]
    fn the_endpoints_are_served_only_with_the_http_feature() {
        // Nothing listens on port 1: the connection keeps retrying, which is all this needs.
        let config = AgentConfig::builder("ws://127.0.0.1:1/ws")
            .with_port(0)
            .build()
            .expect("config");
        let agent = Agent::new(config).expect("agent");
        agent.start().expect("start");
        assert_eq!(agent.http_addr().is_some(), cfg!(feature = "http"));
        agent.shutdown(Duration::ZERO);
        assert!(
            agent.wait(Some(Duration::from_secs(30))),
            "agent did not stop"
        );
    }
}
