"""Run a KiCI CI agent inside this Python process, with Python functions as steps.

    import kici_agent

    agent = kici_agent.Agent("ws://orchestrator:4000/ws", token="kat_...")

    @agent.step("flash-firmware")
    def flash(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.log(f"flashing in {ctx.workspace}")
        ctx.set_output("flashed", True)

    agent.run()  # Ctrl-C drains, a second Ctrl-C stops

A step function returns ``None`` (success) or an ``int`` exit code; raising fails the step
with the traceback in the step log. ``async def`` functions work too. A panic of the agent's
own Rust code (a bug) reaches Python as ``PanicException``, a ``BaseException`` that
``except Exception`` does not catch; if it leaves the step function the agent reports it as
a panic (``executor 'python' panicked: ...``), not as the step's own failure.
"""

from kici_agent._native import (
    Agent,
    AgentError,
    AgentState,
    Cancellation,
    ConfigError,
    Event,
    EventIterator,
    Job,
    PanicException,
    Step,
    StepContext,
    __version__,
    enable_logging,
    settings,
)

__all__ = [
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
    "__version__",
    "enable_logging",
    "settings",
]
