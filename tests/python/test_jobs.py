"""Jobs end to end against the strict mock orchestrator, with Python step functions."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import kici_agent
from conftest import AgentFactory, MockOrchestrator, next_event, run_job, start_registered


def test_a_python_step_logs_sets_outputs_and_succeeds(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent(agent_id="rig-1")
    seen: dict[str, Any] = {}

    @agent.step("measure", secrets=True)
    def measure(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.log("measuring rail voltage")
        ctx.log(f"using key {ctx.job.secrets['RIG_KEY']}")
        ctx.write(b"raw bytes line\n")
        ctx.set_output("volts", 3.3)
        ctx.set_output("report", {"ok": True, "samples": [1, 2], "note": None})
        seen.update(
            step=(step.name, step.index, step.attempt, step.spec["name"]),
            same_step=ctx.step.name == step.name,
            job=(ctx.job.name, ctx.job.run_id, ctx.job.job_id, ctx.job.config["name"]),
            workspace=ctx.workspace,
            env=ctx.env,
            cancelled=(ctx.cancelled.is_set(), bool(ctx.cancelled)),
            thread=threading.current_thread() is threading.main_thread(),
        )

    start_registered(agent)
    finished, status = run_job(mock, agent, ["measure"], job_name="rail-check", secrets={"RIG_KEY": "s3cr3t-rig-key"})

    assert finished.state == "success" and status["state"] == "success"
    assert status["data"]["outputs"] == {
        "measure": {"volts": 3.3, "report": {"ok": True, "samples": [1, 2], "note": None}}
    }
    log = mock.log_text(finished.job_id or "")
    assert "measuring rail voltage" in log
    assert "raw bytes line" in log
    assert "using key ***" in log and "s3cr3t-rig-key" not in log
    assert seen["step"] == ("measure", 0, 1, "measure")
    assert seen["same_step"]
    assert seen["job"] == ("rail-check", status["runId"], status["jobId"], "rail-check")
    assert isinstance(seen["workspace"], Path)
    assert seen["env"]["KICI_STEP_NAME"] == "measure" and seen["env"]["CI"] == "true"
    assert seen["cancelled"] == (False, False)
    assert seen["thread"] is False
    step_status = mock.wait("step.status", state="success", job_id=finished.job_id)
    assert step_status["stepName"] == "measure"


def test_a_raising_step_fails_with_its_traceback_and_the_agent_goes_on(
    mock: MockOrchestrator, make_agent: AgentFactory
) -> None:
    agent = make_agent()

    def read_serial() -> None:
        raise RuntimeError("board not responding")

    @agent.step("boot")
    def boot(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.log("powering on")
        read_serial()

    @agent.step("ok")
    def ok(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.log("fine")

    start_registered(agent)
    finished, status = run_job(mock, agent, ["boot", "ok"])

    assert finished.state == "failed"
    failed_step = mock.wait("step.status", state="failed", job_id=finished.job_id)
    assert failed_step["stepName"] == "boot"
    assert failed_step["data"]["error"] == "RuntimeError: board not responding"
    log = mock.log_text(finished.job_id or "")
    assert "Traceback (most recent call last):" in log
    assert "in read_serial" in log and "RuntimeError: board not responding" in log
    assert "fine" not in log, "the step after a failed one does not run"

    again, _ = run_job(mock, agent, ["ok"])
    assert again.state == "success"


def test_secrets_are_only_given_to_functions_that_ask(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent()

    @agent.default
    def peek(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.log(str(ctx.job.secrets))

    start_registered(agent)
    finished, _ = run_job(mock, agent, ["peek"], secrets={"TOKEN": "do-not-leak-me"})

    assert finished.state == "failed"
    failed = mock.wait("step.status", state="failed", job_id=finished.job_id)
    assert failed["data"]["error"].startswith("PermissionError: ")


@pytest.mark.parametrize(
    ("returned", "state", "exit_code", "error"),
    [
        (None, "success", None, None),
        (0, "success", None, None),
        (3, "failed", 3, "Step function returned exit code 3"),
        ("yes", "failed", None, "Step function returned a str; return None for success or an int exit code"),
        (True, "failed", None, "Step function returned a bool; return None for success or an int exit code"),
    ],
)
def test_a_returned_int_is_an_exit_code(
    mock: MockOrchestrator,
    make_agent: AgentFactory,
    returned: object,
    state: str,
    exit_code: int | None,
    error: str | None,
) -> None:
    agent = make_agent()
    agent.step("check", lambda step, ctx: returned)  # type: ignore[type-var]
    start_registered(agent)

    finished, _ = run_job(mock, agent, ["check"])

    assert finished.state == state
    step = mock.wait("step.status", state=state, job_id=finished.job_id)
    data = step.get("data", {})
    assert data.get("exitCode") == exit_code
    assert data.get("error") == error


def test_sys_exit_ends_the_step_like_a_return(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent()
    agent.step("quit", lambda step, ctx: sys.exit(4))
    start_registered(agent)

    finished, _ = run_job(mock, agent, ["quit"])

    step = mock.wait("step.status", state="failed", job_id=finished.job_id)
    assert step["data"]["exitCode"] == 4


def test_an_async_step_runs_on_its_own_event_loop(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent()

    @agent.step("soak")
    async def soak(step: kici_agent.Step, ctx: kici_agent.StepContext) -> int:
        results = await asyncio.gather(*(asyncio.sleep(0.01, result=n) for n in range(3)))
        ctx.log(f"soaked {results}")
        ctx.set_output("loop", type(asyncio.get_running_loop()).__name__)
        return 0

    start_registered(agent)
    finished, status = run_job(mock, agent, ["soak"])

    assert finished.state == "success"
    assert "soaked [0, 1, 2]" in mock.log_text(finished.job_id or "")
    assert status["data"]["outputs"]["soak"]["loop"].endswith("EventLoop")


def test_an_async_step_that_raises_fails(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent()

    @agent.step("probe")
    async def probe(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        await asyncio.sleep(0)
        raise TimeoutError("no reply from probe")

    start_registered(agent)
    finished, _ = run_job(mock, agent, ["probe"])

    step = mock.wait("step.status", state="failed", job_id=finished.job_id)
    assert step["data"]["error"] == "TimeoutError: no reply from probe"
    assert "Traceback" in mock.log_text(finished.job_id or "")


def test_a_blocking_step_sees_the_cancel(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent(cancel_grace=10)
    entered = threading.Event()

    @agent.step("hold")
    def hold(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.log("holding the rig")
        entered.set()
        seen = ctx.cancelled.wait(30)
        ctx.log(f"cancel seen: {seen}, is_set: {ctx.cancelled.is_set()}")

    start_registered(agent)
    dispatch = mock.dispatch(agent.agent_id, ["hold"])
    assert entered.wait(10)
    mock.cancel(agent.agent_id, dispatch)

    finished = next_event(agent, "job_finished", job_id=dispatch["jobId"])
    assert finished.state == "cancelled"
    mock.wait("job.status", state="cancelled", job_id=dispatch["jobId"])
    assert "cancel seen: True, is_set: True" in mock.log_text(dispatch["jobId"])


def test_an_async_step_is_cancelled_with_the_job(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent(cancel_grace=10)

    @agent.step("soak")
    async def soak(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.log("soaking")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            ctx.log(f"task cancelled, flag {ctx.cancelled.is_set()}")
            raise

    start_registered(agent)
    dispatch = mock.dispatch(agent.agent_id, ["soak"])
    mock.wait("step.status", state="running", job_id=dispatch["jobId"])
    mock.cancel(agent.agent_id, dispatch)

    finished = next_event(agent, "job_finished", job_id=dispatch["jobId"])
    assert finished.state == "cancelled"
    mock.wait("job.status", state="cancelled", job_id=dispatch["jobId"])
    assert "task cancelled, flag True" in mock.log_text(dispatch["jobId"])


def test_functions_are_picked_by_step_then_job_then_default_then_the_shell(
    mock: MockOrchestrator, make_agent: AgentFactory
) -> None:
    agent = make_agent()
    agent.step("flash", lambda step, ctx: ctx.set_output("by", "step"))
    agent.job("hil", lambda step, ctx: ctx.set_output("by", "job"))
    start_registered(agent)

    _, status = run_job(mock, agent, ["flash", "selftest"], job_name="hil")
    assert status["data"]["outputs"] == {"flash": {"by": "step"}, "selftest": {"by": "job"}}

    shell_step = {"name": "shell", "hasOutputs": False, "run": 'echo "from the shell"'}
    finished, _ = run_job(mock, agent, [shell_step], job_name="other")
    assert finished.state == "success"
    assert "from the shell" in mock.log_text(finished.job_id or "")

    # A default function takes what the shell took (registered before start).
    with_default = make_agent()
    with_default.step("flash", lambda step, ctx: ctx.set_output("by", "step"))
    with_default.default(lambda step, ctx: ctx.set_output("by", "default"))
    start_registered(with_default)
    _, status = run_job(mock, with_default, [shell_step, "flash"], job_name="other")
    assert status["data"]["outputs"] == {"shell": {"by": "default"}, "flash": {"by": "step"}}


def test_registration_checks_its_arguments(make_agent: AgentFactory) -> None:
    agent = make_agent()
    with pytest.raises(TypeError, match="must be callable"):
        agent.step("x", 42)  # type: ignore[call-overload]
    decorate = agent.step("x")
    decorate(lambda step, ctx: None)
    with pytest.raises(TypeError, match="already used"):
        decorate(lambda step, ctx: None)


def test_outputs_must_be_json_data(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent()

    @agent.step("bad-output")
    def bad_output(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.set_output("when", object())  # type: ignore[arg-type]

    start_registered(agent)
    finished, _ = run_job(mock, agent, ["bad-output"])

    step = mock.wait("step.status", state="failed", job_id=finished.job_id)
    assert step["data"]["error"] == "TypeError: object is not JSON data: use None, bool, int, float, str, list, tuple or dict"


def test_a_rust_panic_leaving_a_step_is_reported_as_a_panic(
    mock: MockOrchestrator, make_agent: AgentFactory
) -> None:
    agent = make_agent()
    seen: list[str] = []

    @agent.step("panics")
    def panics(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        try:
            # What PyO3 raises here when Rust code this function called panics.
            raise kici_agent.PanicException("index out of bounds")
        except Exception:  # an ordinary handler must not swallow a panic
            seen.append("caught by except Exception")

    @agent.step("ok")
    def ok(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.log("fine")

    start_registered(agent)
    finished, _ = run_job(mock, agent, ["panics"])

    assert seen == []
    assert finished.state == "failed"
    failed_step = mock.wait("step.status", state="failed", job_id=finished.job_id)
    assert failed_step["data"]["error"] == "executor 'python' panicked: index out of bounds"
    assert issubclass(kici_agent.PanicException, BaseException)
    assert not issubclass(kici_agent.PanicException, Exception)

    again, _ = run_job(mock, agent, ["ok"])
    assert again.state == "success"


def test_a_secret_output_is_sealed_masked_and_refused_without_a_run_key(
    mock: MockOrchestrator, make_agent: AgentFactory
) -> None:
    agent = make_agent(agent_id="rig-secret-out")
    value = "https://signed.example/py-output-9c2e"
    errors: list[str] = []

    @agent.step("publish")
    def publish(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        try:
            ctx.set_secret_output("SIGNED_URL", value)
        except kici_agent.AgentError as e:
            errors.append(str(e))
        with pytest.raises(ValueError):
            ctx.set_secret_output("", "x")
        ctx.log(f"published {value}")

    @agent.step("sealed-only")
    def sealed_only(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        ctx.set_secret_output("SIGNED_URL", value)

    start_registered(agent)
    # The fixture dispatch carries the real orchestrator's runPublicKey; the Rust suite opens
    # envelopes with a key it holds (kici-agent-core/tests/secret_outputs.rs).
    finished, status = run_job(mock, agent, ["publish"], job_name="sealed")
    # The empty name fails the step even though the exception was caught.
    assert finished.state == "failed"
    assert errors == []
    log = mock.log_text(finished.job_id or "")
    assert "published ***" in log
    step_status = mock.wait("step.status", state="failed", job_id=finished.job_id)
    assert "non-empty name" in step_status["data"]["error"]
    assert value not in json.dumps(mock.received())

    finished, status = run_job(mock, agent, ["sealed-only"], job_name="sealed-ok")
    assert finished.state == "success"
    envelope = status["secretOutputs"]["SIGNED_URL"]
    assert set(envelope) == {"agentPublicKey", "encrypted"}
    assert "secretOutputs" not in json.dumps(status.get("data", {}))

    finished, status = run_job(mock, agent, ["sealed-only"], job_name="keyless", run_public_key=False)
    assert finished.state == "failed" and "secretOutputs" not in status
    step_status = mock.wait("step.status", state="failed", job_id=finished.job_id)
    assert "secret output 'SIGNED_URL'" in step_status["data"]["error"]
    assert "no runPublicKey" in step_status["data"]["error"]
    assert value not in json.dumps(mock.received())
