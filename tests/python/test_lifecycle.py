"""The agent's lifecycle inside the interpreter: configuration, start/stop verbs, state, events,
HTTP endpoints, several agents, the GIL, and Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import kici_agent
from conftest import TIMEOUT, TOKEN, AgentFactory, MockOrchestrator, next_event, readline_within, run_job, start_registered

AGENT_PROCESS = Path(__file__).resolve().parent / "agent_process.py"


def http_get(agent: kici_agent.Agent, path: str) -> tuple[int, str]:
    address = agent.http_address
    assert address is not None
    host, port = address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_health_ready_and_metrics_are_served_while_embedded(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent(agent_id="embedded-1")
    agent.step("ok", lambda step, ctx: None)
    start_registered(agent)
    run_job(mock, agent, ["ok"])

    status, body = http_get(agent, "/health")
    assert status == 200
    health = json.loads(body)
    assert health["agentId"] == "embedded-1" and health["connected"] is True
    assert http_get(agent, "/ready")[0] == 200
    status, metrics = http_get(agent, "/metrics")
    assert status == 200
    assert 'kici_agent_jobs_total{status="success"} 1' in metrics
    assert 'kici_agent_jobs_total{status="success"} 1' in agent.metrics_text()


def test_ready_is_503_until_registered() -> None:
    # Nothing listens on port 9 (discard): the agent keeps trying to connect.
    unreachable = kici_agent.Agent("ws://127.0.0.1:9/ws", port=0, bind_address="127.0.0.1")
    try:
        unreachable.start()
        assert http_get(unreachable, "/health")[0] == 200
        assert http_get(unreachable, "/ready")[0] == 503
        assert unreachable.state.registered is False
    finally:
        unreachable.shutdown(grace=0)


def test_ready_is_503_while_draining(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent()
    entered, release = threading.Event(), threading.Event()

    def hold(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
        entered.set()
        release.wait(TIMEOUT)

    agent.step("hold", hold)
    start_registered(agent)
    # A running job keeps the drained agent up (idle, it would stop at once).
    dispatch = mock.dispatch(agent.agent_id, ["hold"])
    assert entered.wait(TIMEOUT)
    assert http_get(agent, "/ready")[0] == 200

    agent.drain()
    status, body = http_get(agent, "/ready")
    assert status == 503, body
    assert json.loads(body)["checks"]["draining"] is True
    assert http_get(agent, "/health")[0] == 200

    release.set()
    mock.wait("job.status", state="success", job_id=dispatch["jobId"])
    assert agent.wait(timeout=TIMEOUT)


def test_two_agents_in_one_interpreter_keep_apart(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    rigs = [make_agent(agent_id=f"rig-{name}") for name in ("a", "b")]
    for rig in rigs:
        rig.step("identify", lambda step, ctx, rig_id=rig.agent_id: ctx.set_output("rig", rig_id))
        start_registered(rig)

    outputs = [run_job(mock, rig, ["identify"])[1]["data"]["outputs"] for rig in rigs]

    assert outputs == [{"identify": {"rig": "rig-a"}}, {"identify": {"rig": "rig-b"}}]
    addresses = [rig.http_address for rig in rigs]
    assert addresses[0] != addresses[1]
    for rig in rigs:
        assert 'kici_agent_jobs_total{status="success"} 1' in rig.metrics_text()
    status, agents = mock.request("GET", "/agents")
    assert sorted(agents) == ["rig-a", "rig-b"]


def test_the_context_manager_starts_and_stops(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent(agent_id="ctx-1", shutdown_grace=timedelta(seconds=2))
    agent.step("ok", lambda step, ctx: None)  # functions are registered before start
    with agent:
        next_event(agent, "registered", agent_id="ctx-1")
        # The core emits `registered` just before its state says so; a job is well after.
        run_job(mock, agent, ["ok"])
        state = agent.state
        assert (state.agent_id, state.connection, state.registered, state.stopped) == ("ctx-1", "registered", True, False)
    state = agent.state
    assert state.stopped and state.draining and state.connection == "closed"
    assert agent.wait(0) is True


def test_events_tell_the_story_of_a_job(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent(agent_id="story")
    agent.step("one", lambda step, ctx: None)
    agent.start()
    first = next(agent.events(timeout=TIMEOUT))
    assert (first.type, first.agent_id) == ("registered", "story")
    dispatch = mock.dispatch("story", ["one"], job_name="tale")
    mock.wait("job.status", state="success", job_id=dispatch["jobId"])
    agent.shutdown(grace=1)

    events = list(agent.events(timeout=TIMEOUT))

    assert [event.type for event in events] == ["job_started", "step_finished", "job_finished", "stopped"]
    started, step, job, _ = events
    assert (started.run_id, started.job_id, started.name) == (dispatch["runId"], dispatch["jobId"], "tale")
    assert (step.step_name, step.step_index, step.state, step.error) == ("one", 0, "success", None)
    assert (job.state, job.name) == ("success", "tale")
    assert isinstance(job.duration_ms, int)
    assert job.to_dict()["jobId"] == dispatch["jobId"]
    assert list(agent.events(timeout=0)) == [], "the iterator of a stopped agent ends at once"


def test_a_refused_token_is_the_last_error(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent(token="kat_" + "0" * 64)
    agent.start()

    refused = next_event(agent, "auth_failed")

    assert refused.reason
    assert agent.last_error is not None and "authentication failed" in agent.last_error
    assert agent.state.connection == "auth_failed"


def test_from_env_reads_kici_variables(mock: MockOrchestrator) -> None:
    environ = {
        "KICI_ORCHESTRATOR_URL": mock.ws,
        "KICI_AGENT_TOKEN": TOKEN,
        "KICI_AGENT_ID": "from-env",
        "KICI_PORT": "0",
        "KICI_BIND_ADDRESS": "127.0.0.1",
    }
    agent = kici_agent.Agent.from_env(environ)
    try:
        start_registered(agent)
        assert agent.agent_id == "from-env"
    finally:
        agent.shutdown(grace=1)

    with pytest.raises(kici_agent.ConfigError, match="KICI_PROT: did you mean KICI_PORT"):
        kici_agent.Agent.from_env({**environ, "KICI_PROT": "1"})
    with pytest.warns(UserWarning, match="KICI_PROT"):
        kici_agent.Agent.from_env({**environ, "KICI_PROT": "1", "KICI_DEV": "true"})


def test_settings_are_checked_and_named_by_keyword() -> None:
    with pytest.raises(kici_agent.ConfigError) as error:
        kici_agent.Agent("http://orchestrator/ws", max_concurrency=0, port=0)
    assert "- url: must be a ws:// or wss:// URL" in str(error.value)
    assert "- max_concurrency: " in str(error.value)
    assert isinstance(error.value, ValueError)
    with pytest.raises(kici_agent.ConfigError, match='log_level: expected one of debug, info, warn, error, got "loud"'):
        kici_agent.Agent("ws://o/ws", log_level="loud")  # type: ignore[arg-type]
    with pytest.raises(kici_agent.ConfigError, match="properties"):
        kici_agent.Agent("ws://o/ws", properties={"rack": object()})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="zero or more seconds"):
        kici_agent.Agent("ws://o/ws", cancel_grace=-1)
    agent = kici_agent.Agent(
        "ws://o/ws",
        labels=["hil", "usb3"],
        properties={"rack": 4, "gpu": False, "site": "lab-2", "volts": 3.3},
        heartbeat_interval=timedelta(seconds=5),
        max_concurrency=2,
        port=0,
    )
    assert agent.agent_id


def test_starting_twice_is_an_agent_error(make_agent: AgentFactory) -> None:
    agent = start_registered(make_agent())
    with pytest.raises(kici_agent.AgentError, match="already started"):
        agent.start()


def test_blocking_calls_release_the_gil(make_agent: AgentFactory) -> None:
    agent = start_registered(make_agent())
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    counter = threading.Thread(target=count)
    counter.start()
    try:
        before = ticks
        assert agent.wait(0.3) is False
        during_wait = ticks - before
    finally:
        stop.set()
        counter.join()
    assert during_wait > 1000, "another Python thread ran while wait() blocked"


def test_drain_stops_the_agent_once_idle(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = make_agent()
    start_registered(agent)
    agent.drain()
    assert agent.wait(TIMEOUT)
    assert agent.state.stopped


@contextlib.contextmanager
def agent_process(mock: MockOrchestrator, agent_id: str, mode: str = "run") -> Iterator[subprocess.Popen[str]]:
    """`agent_process.py` in a child interpreter, once it printed `registered`; killed if a
    test leaves it running."""
    child = subprocess.Popen(
        [sys.executable, str(AGENT_PROCESS), mock.ws, TOKEN, agent_id, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert child.stdout is not None
        assert readline_within(child.stdout).strip() == "registered"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()


def interrupt(child: subprocess.Popen[str], expected: str) -> None:
    """Sends Ctrl-C and waits until the child logged `expected` (it logs after acting)."""
    child.send_signal(signal.SIGINT)
    assert child.stderr is not None
    line = readline_within(child.stderr)
    assert expected in line, line


def finish(child: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Waits for the child to exit: its exit code, stdout and (the rest of) stderr."""
    out, err = child.communicate(timeout=TIMEOUT)
    return child.returncode, out, err


def test_ctrl_c_drains_an_idle_agent_and_run_returns(mock: MockOrchestrator) -> None:
    with agent_process(mock, "ctrl-c-idle") as child:
        interrupt(child, "Ctrl-C: draining")

        code, out, err = finish(child)

    assert code == 0, err
    assert out.strip().splitlines()[-1] == "run returned, stopped=True"


def test_ctrl_c_twice_stops_a_busy_agent(mock: MockOrchestrator) -> None:
    with agent_process(mock, "ctrl-c-busy") as child:
        held = mock.dispatch("ctrl-c-busy", ["hold"])
        mock.wait("step.status", state="running", job_id=held["jobId"])

        interrupt(child, "Ctrl-C: draining")
        # Draining: the running job goes on, a new one is refused.
        refused = mock.dispatch("ctrl-c-busy", ["hold"])
        assert mock.wait("job.reject", job_id=refused["jobId"])["reason"] == "draining"
        assert child.poll() is None

        interrupt(child, "Ctrl-C again: stopping")
        code, out, err = finish(child)

    assert code == 0, err
    assert out.strip().splitlines()[-1] == "run returned, stopped=True"
    mock.wait("job.status", state="cancelled", job_id=held["jobId"])
    assert "hold saw the cancel" in mock.log_text(held["jobId"])


def test_interpreter_exit_shuts_a_running_agent_down(mock: MockOrchestrator) -> None:
    with agent_process(mock, "exit-busy", mode="exit") as child:
        held = mock.dispatch("exit-busy", ["hold"])
        mock.wait("step.status", state="running", job_id=held["jobId"])

        # Closing stdin ends the child's main thread: the interpreter exits with the agent
        # running, a job in progress and a daemon thread inside `events()`.
        code, _, err = finish(child)

    assert code == 0, err
    mock.wait("job.status", state="cancelled", job_id=held["jobId"])
    assert "hold saw the cancel" in mock.log_text(held["jobId"])
