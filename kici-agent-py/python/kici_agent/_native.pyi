"""Typed view of the native module ``kici_agent._native`` (re-exported by ``kici_agent``)."""

import datetime
import os
import pathlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, TypeAlias, TypeVar, final, overload

from typing_extensions import Self

__version__: str
__all__ = [
    "__version__",
    "Agent",
    "AgentError",
    "AgentState",
    "Cancellation",
    "ConfigError",
    "Event",
    "EventIterator",
    "Job",
    "PanicException",
    "Step",
    "StepContext",
    "enable_logging",
    "settings",
]

#: JSON-compatible data: what ``StepContext.set_output`` accepts.
_JsonValue: TypeAlias = (
    None | bool | int | float | str | list["_JsonValue"] | tuple["_JsonValue", ...] | dict[str, "_JsonValue"]
)
#: A duration: seconds, or a ``datetime.timedelta``.
_Seconds: TypeAlias = float | datetime.timedelta
#: A step function: ``None`` means success, an ``int`` is an exit code (0 = success).
_StepFunction: TypeAlias = (
    Callable[[Step, StepContext], int | None] | Callable[[Step, StepContext], Awaitable[int | None]]
)
_F = TypeVar("_F", bound=_StepFunction)

class ConfigError(ValueError):
    """An invalid agent setting; the message lists every problem."""

class AgentError(RuntimeError):
    """The agent could not do what was asked (start twice, HTTP port taken, ...)."""

class PanicException(BaseException):
    """Raised in Python when the agent's Rust code panics (a bug in the agent). A
    ``BaseException``: ``except Exception`` does not catch it. If it leaves a step function the
    agent reports the step as ``executor 'python' panicked: <message>``."""

def settings() -> list[tuple[str, str, str | None, str, list[str], str]]:
    """The agent's settings, from the core's table: ``(variable, keyword, default, kind,
    choices, description)`` per setting, e.g. ``("KICI_PORT", "port", "8080", "integer", [],
    "HTTP port ...")``. ``default`` is ``None`` when unset has its own meaning; ``kind`` is
    one of text, secret, path, flag, integer, size, millis (seconds here), number, choice,
    ip_address, list, properties, ignored."""

def enable_logging(level: str = "info", format: str = "plain") -> bool:
    """Sends the agent's own log to stderr. ``level``: debug | info | warn | error;
    ``format``: plain | json | auto. Applies to every agent in the process; returns ``False``
    when a logger was already installed."""

@final
class Agent:
    """A KiCI agent running inside this process, with Python functions as step executors.

    Register step functions with the ``step``, ``job`` and ``default`` decorators before
    ``start()`` (background) or ``run()`` (blocking, Ctrl-C aware). Use it as a context manager
    to shut it down on exit. The core's one routing rule picks what runs a step: the function
    for its step name, else for its job name, else the job's container, else the default
    function, else the built-in shell executor (the step's ``run`` field, or ``step_map_file``)
    or ``process_executor``. A TypeScript job that no function claims runs through the
    TypeScript runner.
    """

    def __new__(
        cls,
        url: str,
        *,
        # BEGIN settings: generated from settings() by tests/python/test_settings.py
        agent_id: str | None = None,
        labels: list[str] | None = None,
        properties: dict[str, bool | int | float | str] | None = None,
        roles: list[str] | None = None,
        port: int | None = None,
        bind_address: str | None = None,
        log_level: Literal["debug", "info", "warn", "error"] | None = None,
        log_format: Literal["auto", "plain", "json"] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        log_max_size: int | str | None = None,
        log_retention_days: int | None = None,
        cluster_instance_id: str | None = None,
        platform_instance_id: str | None = None,
        token: str | None = None,
        github_token: str | None = None,
        max_log_size_bytes: int | None = None,
        default_step_timeout: _Seconds | None = None,
        docker_keep_failed: bool | None = None,
        job_heartbeat_interval: _Seconds | None = None,
        heartbeat_interval: _Seconds | None = None,
        backpressure_mode: Literal["pause", "drop"] | None = None,
        sandbox: bool | None = None,
        sandbox_network: Literal["isolated", "host"] | None = None,
        scaler_managed: bool | None = None,
        scaler_idle_timeout: _Seconds | None = None,
        scaler_pending_dispatch_timeout: _Seconds | None = None,
        execution_mode: Literal["container", "bare-metal", "firecracker"] | None = None,
        concurrency_wait_timeout: _Seconds | None = None,
        is_orchestrator_host: bool | None = None,
        max_concurrency: int | None = None,
        max_concurrent_jobs: int | None = None,
        cancel_grace: _Seconds | None = None,
        shutdown_grace: _Seconds | None = None,
        job_pids_max: int | None = None,
        step_map_file: str | os.PathLike[str] | None = None,
        process_executor: str | None = None,
        node: str | os.PathLike[str] | None = None,
        default_container_image: str | None = None,
        dev: bool | None = None,
        cache: str | None = None,
        rate_msgs_per_sec: float | None = None,
        rate_msg_burst: float | None = None,
        rate_bytes_per_sec: float | None = None,
        rate_byte_burst: float | None = None,
        tls_ca_file: str | os.PathLike[str] | None = None,
        # END settings
        hostname: str | None = None,
    ) -> Self:
        """Creates an agent for the orchestrator at ``url`` (``ws://`` or ``wss://``).

        Every keyword argument is an agent setting, the key of a ``KICI_*`` variable in
        ``settings()`` (``port`` = ``KICI_PORT`` = 8080, ``0`` picks a free port;
        ``cancel_grace`` = ``KICI_CANCEL_GRACE_MS``, in seconds here); ``None`` keeps the
        default. ``hostname`` overrides the detected host name (no variable). Raises
        ``ConfigError`` listing every invalid setting, ``TypeError`` for an unknown keyword
        (naming the closest one) or a value of the wrong type. Ignored settings
        (``max_concurrent_jobs`` below 1) become ``UserWarning``s.

        ``tls_ca_file`` (``KICI_TLS_CA_FILE``): a PEM file of extra CA certificates trusted for
        ``wss://`` and git HTTPS clones, on top of the system's roots (``SSL_CERT_FILE`` /
        ``SSL_CERT_DIR`` replace those, as for OpenSSL); it must hold a certificate. git's trust
        is process-wide: once an agent started with it, clones of every agent in the process
        trust it. A TLS handshake failure shows in ``last_error`` and ``/health``; the agent
        keeps retrying.
        """

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Creates an agent configured by ``KICI_*`` variables (``environ``, default
        ``os.environ``), exactly like the stand-alone ``kici-agent``. Non-fatal findings
        become ``UserWarning``s."""

    @property
    def agent_id(self) -> str:
        """The agent's id."""

    @overload
    def step(self, name: str, function: None = None, *, secrets: bool = False) -> Callable[[_F], _F]: ...
    @overload
    def step(self, name: str, function: _F, *, secrets: bool = False) -> _F:
        """Registers ``function(step, ctx)`` for steps named ``name``; use as a decorator
        (``@agent.step("flash")``) or call with the function. ``async def`` works. With
        ``secrets=True`` the function may read ``ctx.job.secrets``. Functions are registered
        before ``start()``; afterwards this raises ``AgentError``."""

    @overload
    def job(self, name: str, function: None = None, *, secrets: bool = False) -> Callable[[_F], _F]: ...
    @overload
    def job(self, name: str, function: _F, *, secrets: bool = False) -> _F:
        """Registers a function for every step of jobs named ``name`` (a ``step`` function
        for the step's name wins), also when the job names a container image (its steps then
        run here). Used like ``step``."""

    @overload
    def default(self, function: None = None, *, secrets: bool = False) -> Callable[[_F], _F]: ...
    @overload
    def default(self, function: _F, *, secrets: bool = False) -> _F:
        """Registers the function for every step no ``step`` or ``job`` function and no job
        container takes: ``@agent.default``, ``@agent.default(secrets=True)`` or
        ``agent.default(function)``. It also claims TypeScript jobs, which then no longer run
        through the TypeScript runner."""

    def start(self) -> None:
        """Starts in the background: binds ``/health``, ``/ready`` and ``/metrics``, then
        connects and registers. Raises ``AgentError`` when the port is taken or the agent was
        already started."""

    def run(self, grace: _Seconds | None = None) -> None:
        """Starts if needed and blocks until the agent stops. First Ctrl-C: drain (running
        jobs finish, no new ones). Second: shut down (running steps get ``grace``, default
        ``shutdown_grace``, then are cancelled). Third: ``KeyboardInterrupt``."""

    def drain(self) -> None:
        """Stops taking jobs (``/ready`` answers 503 from now on); the agent stops once idle.
        Returns at once (see ``wait``)."""

    def shutdown(self, grace: _Seconds | None = None, *, wait: bool = True) -> None:
        """Stops: no new jobs; running steps get ``grace`` (default ``shutdown_grace``) to
        finish, then are cancelled. With ``wait`` (default) blocks until stopped."""

    def wait(self, timeout: _Seconds | None = None) -> bool:
        """Blocks until the agent stopped, at most ``timeout``; returns whether it stopped."""

    @property
    def state(self) -> AgentState:
        """A snapshot of the agent's state."""

    @property
    def last_error(self) -> str | None:
        """The last error worth showing (authentication failure, lost connection, a failed TLS
        handshake such as ``TLS handshake with host:443 failed: invalid peer certificate:
        UnknownIssuer``); ``None`` once registered."""

    def metrics_text(self) -> str:
        """This agent's metrics in the Prometheus text format (what ``/metrics`` serves)."""

    @property
    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the HTTP endpoints once started, else ``None``."""

    def events(self, timeout: _Seconds | None = None) -> EventIterator:
        """Iterates over the agent's events, oldest first; ends after ``stopped`` or when no
        event came within ``timeout``. Events are consumed (iterators share one queue)."""

    def __enter__(self) -> Self:
        """Starts the agent unless it was started."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        """Shuts the agent down (``shutdown_grace``) and waits until it stopped."""

@final
class AgentState:
    """A snapshot of an agent's state."""

    @property
    def agent_id(self) -> str:
        """The agent's id."""
    @property
    def connection(self) -> str:
        """``disconnected``, ``connecting``, ``authenticating``, ``registering``,
        ``registered``, ``auth_failed`` or ``closed``."""
    @property
    def registered(self) -> bool:
        """Registered with the orchestrator: jobs can be dispatched."""
    @property
    def draining(self) -> bool:
        """Draining or shutting down: no new jobs."""
    @property
    def stopped(self) -> bool:
        """Stopped for good."""
    @property
    def active_jobs(self) -> int:
        """Jobs running now."""
    @property
    def last_error(self) -> str | None:
        """The last error worth showing."""

@final
class Event:
    """Something the agent did. ``type`` says what; the other attributes are ``None`` unless
    that kind of event has them: ``registered`` (agent_id), ``disconnected``,
    ``reconnect_scheduled`` (``attempt`` and ``delayMs`` in ``to_dict()``), ``auth_failed``
    (reason), ``job_started`` (run_id, job_id, name), ``job_rejected`` (run_id, job_id,
    reason), ``step_finished`` (run_id, job_id, step_index, step_name, state, duration_ms,
    error), ``job_finished`` (run_id, job_id, name, state, duration_ms, error),
    ``self_shutdown`` (reason: ``scaler-idle`` or ``scaler-pending-dispatch-timeout``), ``stopped``."""

    @property
    def type(self) -> str:
        """What happened."""
    @property
    def agent_id(self) -> str | None: ...
    @property
    def run_id(self) -> str | None: ...
    @property
    def job_id(self) -> str | None: ...
    @property
    def name(self) -> str | None:
        """The job's name."""
    @property
    def step_index(self) -> int | None: ...
    @property
    def step_name(self) -> str | None: ...
    @property
    def state(self) -> str | None:
        """Final state of the step or job: ``success``, ``failed``, ``cancelled``, ..."""
    @property
    def duration_ms(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def reason(self) -> str | None:
        """Why the connection was refused or the job rejected."""
    def to_dict(self) -> dict[str, Any]:
        """The event as a dict with the wire's field names (``runId``, ``durationMs``, ...)."""

@final
class EventIterator:
    """The iterator returned by ``Agent.events()``."""

    def __iter__(self) -> Self: ...
    def __next__(self) -> Event: ...

@final
class Step:
    """The step being run."""

    @property
    def name(self) -> str:
        """The step's name."""
    @property
    def index(self) -> int:
        """The step's flat index in the job (the wire ``stepIndex``)."""
    @property
    def attempt(self) -> int:
        """1-based attempt number; above 1 when the step is retried."""
    @property
    def spec(self) -> dict[str, Any]:
        """The step as the dispatch describes it (wire field names)."""

@final
class Job:
    """The job a step belongs to."""

    @property
    def run_id(self) -> str: ...
    @property
    def job_id(self) -> str: ...
    @property
    def name(self) -> str:
        """The job's name (``jobConfig.name``)."""
    @property
    def config(self) -> dict[str, Any]:
        """The whole ``jobConfig`` of the dispatch (wire field names)."""
    @property
    def workspace(self) -> pathlib.Path:
        """The job's private workspace directory."""
    @property
    def secrets(self) -> dict[str, str]:
        """The dispatch's secrets; ``PermissionError`` unless registered with ``secrets=True``."""

@final
class Cancellation:
    """Whether the step was asked to stop: cancel, timeout or agent shutdown."""

    def is_set(self) -> bool:
        """Whether the step was asked to stop."""
    def __bool__(self) -> bool: ...
    def wait(self, timeout: _Seconds | None = None) -> bool:
        """Blocks (GIL released) until the step is asked to stop, at most ``timeout``.
        Returns whether it was; also returns (``False``) once the step function returned."""
    def _release(self) -> None: ...

@final
class StepContext:
    """The step's view of the agent: log, outputs, job, workspace, environment, cancel."""

    @property
    def step(self) -> Step:
        """The step being run."""
    @property
    def job(self) -> Job:
        """The job the step belongs to."""
    @property
    def workspace(self) -> pathlib.Path:
        """The step's working directory: the job's workspace."""
    @property
    def env(self) -> dict[str, str]:
        """The environment a step process would get (sanitised, with the job's and step's
        ``env``)."""
    @property
    def cancelled(self) -> Cancellation:
        """Set when the step should stop."""
    def log(self, line: str) -> None:
        """Appends a line to the step log (masked and capped like any step output)."""
    def write(self, data: str | bytes) -> None:
        """Writes raw output to the step log; lines are split at ``\\n``."""
    def set_output(self, key: str, value: _JsonValue) -> None:
        """Sets the step output ``key`` (JSON-compatible data)."""
    def set_secret_output(self, key: str, value: str) -> None:
        """Sets the job's secret output ``key``: encrypted for the run's key (the dispatch's
        ``runPublicKey``) and sent only in ``secretOutputs`` of a successful job, never in
        plain outputs; masked in every log line of the job from now on. Raises ``ValueError``
        for an empty key and ``AgentError`` when the run has no usable key; the step then fails
        with that message (the key, never the value) even if the exception is caught."""
