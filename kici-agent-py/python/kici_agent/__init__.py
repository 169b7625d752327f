"""Run a KiCI CI agent inside this Python process, with Python functions as steps.

    import kici_agent

    agent = kici_agent.Agent("ws://orchestrator:4000/ws", token="kat_...")

    @agent.step("flash-firmware")
    def flash(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.log(f"flashing in {ctx.workspace}")
        ctx.set_output("flashed", True)

    agent.run()  # Ctrl-C drains, a second Ctrl-C stops

A step function returns ``None`` (success) or an ``int`` exit code; raising fails the step
with the traceback in the step log. ``async def`` functions work too.
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
    Step,
    StepContext,
    __version__,
    enable_logging,
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
    "Step",
    "StepContext",
    "__version__",
    "enable_logging",
]
