"""A hardware-in-the-loop test rig that is its own KiCI agent.

The rig's Python code already knows how to power the board, flash it, talk to its serial
console and read the current meter; here each CI step name maps to one of those functions:

    power-on, flash-firmware, self-test (async), measure-power, power-off

Any other step runs as a shell command (its `run` field). Logs and outputs reach the
orchestrator like any agent's; secrets are masked; a cancelled job stops the flashing loop and
the self-test.

Configure it like the stand-alone agent, with KICI_* variables, and run it:

    KICI_ORCHESTRATOR_URL=ws://orchestrator:4000/ws KICI_AGENT_TOKEN=kat_... \\
    KICI_LABELS=hil,board:nrf52 python examples/python/hardware_rig.py

Ctrl-C once drains (the running job finishes), twice stops. This file drives a simulated
board, so it runs anywhere; swap `SimulatedBoard` for the real rig driver.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from collections.abc import AsyncIterator

import kici_agent

#: Current budget of the board in its idle state, in milliamperes.
IDLE_BUDGET_MA = 12.0


class SimulatedBoard:
    """Stands in for the relay, the SWD probe, the serial console and the current meter."""

    def __init__(self) -> None:
        self.powered = False
        self.firmware_sha256: str | None = None
        self._lock = threading.Lock()

    def power(self, on: bool) -> None:
        with self._lock:
            self.powered = on

    def write_flash(self, offset: int, chunk: bytes) -> None:
        if not self.powered:
            raise RuntimeError("cannot flash: the board is not powered")

    async def console(self) -> AsyncIterator[str]:
        """Lines from the serial console after reset."""
        for line in ("boot: rom ok", "boot: app start", "selftest: radio ok", "selftest: flash ok", "selftest: PASS"):
            await asyncio.sleep(0.01)
            yield line

    def sample_current_ma(self) -> float:
        return random.uniform(8.0, 11.0) if self.powered else 0.0


board = SimulatedBoard()
agent = kici_agent.Agent.from_env()


@agent.step("power-on")
def power_on(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
    board.power(True)
    ctx.log("relay 1 closed: board powered")


@agent.step("flash-firmware")
def flash_firmware(step: kici_agent.Step, ctx: kici_agent.StepContext) -> int:
    # A real rig would read the image the build job left in the workspace.
    image = ctx.workspace / "build" / "firmware.bin"
    data = image.read_bytes() if image.exists() else bytes(range(256)) * 64
    chunk_size = 4096
    for offset in range(0, len(data), chunk_size):
        if ctx.cancelled.is_set():
            ctx.log(f"flashing stopped at offset {offset:#x}: job cancelled")
            return 130
        board.write_flash(offset, data[offset : offset + chunk_size])
    board.firmware_sha256 = hashlib.sha256(data).hexdigest()
    ctx.log(f"flashed {len(data)} bytes, sha256 {board.firmware_sha256}")
    ctx.set_output("sha256", board.firmware_sha256)
    return 0


@agent.step("self-test")
async def self_test(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
    # The agent enforces the step's timeout: it cancels this coroutine (asyncio.CancelledError),
    # as it does when the job is cancelled.
    async for line in board.console():
        ctx.log(f"console: {line}")
        if "FAIL" in line:
            raise AssertionError(f"self-test failed: {line}")
    ctx.set_output("selftest", "pass")


@agent.step("measure-power")
def measure_power(step: kici_agent.Step, ctx: kici_agent.StepContext) -> int:
    samples = [board.sample_current_ma() for _ in range(50)]
    average = sum(samples) / len(samples)
    ctx.set_output("idle_ma", round(average, 2))
    ctx.log(f"idle current {average:.2f} mA (budget {IDLE_BUDGET_MA} mA)")
    return 0 if average <= IDLE_BUDGET_MA else 1


@agent.step("power-off")
def power_off(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
    board.power(False)
    ctx.log("relay 1 open: board unpowered")


def report_outcomes() -> None:
    """Shows what the agent does on the rig's own console."""
    for event in agent.events():
        if event.type == "registered":
            print(f"rig registered as {event.agent_id}", flush=True)
        elif event.type == "job_finished":
            print(f"job {event.name} {event.state} in {event.duration_ms} ms", flush=True)


if __name__ == "__main__":
    kici_agent.enable_logging("warn")
    threading.Thread(target=report_outcomes, daemon=True).start()
    agent.run()
    print(f"rig stopped ({agent.state.connection})", flush=True)
