"""Fixtures: the strict mock orchestrator (its binary, one per test) and agents pointed at it.

`KICI_MOCK_ORCHESTRATOR` names the mock's binary; `run.sh` builds it and sets it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import kici_agent

#: The token the mock is started with (any `kat_` + 64 hex characters).
TOKEN = "kat_" + "5e" * 32
#: A real orchestrator's dispatch; tests replace its ids, steps and repository.
DISPATCH_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "real-orchestrator" / "job.dispatch.json"
#: Generous bound for anything the agent does on loopback.
TIMEOUT = 15.0

# A suite started as a background job of a non-interactive shell inherits SIGINT ignored, and
# an ignored signal stays ignored across exec: the child interpreters of the Ctrl-C tests would
# then never install Python's KeyboardInterrupt handler and ignore their Ctrl-C. A handled
# signal is reset to the default at exec, so handling it here gives them a normal terminal's.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def readline_within(stream: Any, timeout: float = TIMEOUT) -> str:
    """One line of a child's pipe, failing the test (not hanging it) if none comes in time."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        pytest.fail(f"no line from the child within {timeout} s")
    return lines[0]


class MockOrchestrator:
    """The `kici-mock-orchestrator` binary, driven through its HTTP control API."""

    def __init__(self, binary: str, log_path: Path, *args: str) -> None:
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [binary, "--token", TOKEN, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the mock orchestrator exited at once (log: {log_path})")
        endpoints = json.loads(line)
        self.ws: str = endpoints["ws"]
        self.control: str = endpoints["control"]

    def request(self, method: str, path: str, body: Any = None, **query: Any) -> tuple[int, Any]:
        """One control API call: `(status, decoded JSON body)`."""
        query = {key: value for key, value in query.items() if value is not None}
        url = f"{self.control}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT + 5) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def wait(self, msg_type: str, *, state: str | None = None, job_id: str | None = None) -> dict[str, Any]:
        """The first accepted message of `msg_type` (with `state` / `jobId`), waiting for it."""
        status, body = self.request(
            "GET", "/wait", type=msg_type, state=state, jobId=job_id, timeoutMs=int(TIMEOUT * 1000)
        )
        assert status == 200, f"no {msg_type} state={state} jobId={job_id}: {body}"
        return dict(body)

    def wait_agent(self) -> str:
        """The id of the first agent that registered, waiting for one."""
        status, body = self.request("GET", "/wait_agent", timeoutMs=int(TIMEOUT * 1000))
        assert status == 200, body
        return str(body["agentId"])

    def dispatch(
        self,
        agent_id: str,
        steps: Sequence[str | dict[str, Any]],
        *,
        job_name: str = "test",
        secrets: dict[str, str] | None = None,
        run_public_key: bool = True,
    ) -> dict[str, Any]:
        """Sends a job (no checkout) with these steps (names, or step dicts) to `agent_id`;
        `run_public_key=False` leaves out the fixture's `runPublicKey`."""
        dispatch: dict[str, Any] = json.loads(DISPATCH_FIXTURE.read_text())
        dispatch.update(
            messageId=str(uuid.uuid4()),
            runId=str(uuid.uuid4()),
            jobId=str(uuid.uuid4()),
            repoUrl="",
        )
        config = dispatch["jobConfig"]
        config["name"] = config["baseJobName"] = job_name
        config["steps"] = [
            {"name": step, "hasOutputs": False} if isinstance(step, str) else step for step in steps
        ]
        if secrets is not None:
            dispatch["secrets"] = secrets
        if not run_public_key:
            del dispatch["runPublicKey"]
        status, body = self.request("POST", "/dispatch", {"agentId": agent_id, "dispatch": dispatch})
        assert status == 200, body
        return dispatch

    def cancel(self, agent_id: str, dispatch: dict[str, Any], *, force: bool = False) -> None:
        status, body = self.request(
            "POST",
            "/cancel",
            {"agentId": agent_id, "runId": dispatch["runId"], "jobId": dispatch["jobId"], "force": force},
        )
        assert status == 200, body

    def received(self, msg_type: str | None = None, job_id: str | None = None) -> list[dict[str, Any]]:
        """Every accepted message so far, optionally of one type and job."""
        status, frames = self.request("GET", "/received")
        assert status == 200, frames
        messages = [frame["msg"] for frame in frames if frame["accepted"]]
        return [
            msg
            for msg in messages
            if (msg_type is None or msg.get("type") == msg_type)
            and (job_id is None or msg.get("jobId") == job_id)
        ]

    def log_text(self, job_id: str) -> str:
        """Every log line the job sent, one per line."""
        return "\n".join(line for chunk in self.received("log.chunk", job_id) for line in chunk["lines"])

    def wait_tls_failures(self, count: int) -> list[str]:
        """The mock's failed TLS handshakes, once there are `count` of them."""
        status, body = self.request("GET", "/wait_tls_failures", count=count, timeoutMs=int(TIMEOUT * 1000))
        assert status == 200, body
        return list(body["tlsFailures"])

    def violations(self) -> list[Any]:
        status, stats = self.request("GET", "/stats")
        assert status == 200, stats
        return list(stats["violations"])

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.request("POST", "/shutdown", {})
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._log.close()


@pytest.fixture(scope="session")
def mock_binary() -> str:
    binary = os.environ.get("KICI_MOCK_ORCHESTRATOR", "")
    if not binary or not os.access(binary, os.X_OK):
        pytest.fail("set KICI_MOCK_ORCHESTRATOR to the kici-mock-orchestrator binary (run.sh does)")
    return binary


@pytest.fixture
def mock(mock_binary: str, tmp_path: Path) -> Iterator[MockOrchestrator]:
    orchestrator = MockOrchestrator(mock_binary, tmp_path / "mock.log")
    yield orchestrator
    violations = orchestrator.violations() if orchestrator.process.poll() is None else []
    orchestrator.stop()
    assert violations == [], f"the agent broke the protocol: {violations}"


AgentFactory = Callable[..., kici_agent.Agent]


@pytest.fixture
def make_agent(mock: MockOrchestrator) -> Iterator[AgentFactory]:
    """`make_agent(**settings)`: an agent for the mock, on a free loopback port, shut down at the end."""
    agents: list[kici_agent.Agent] = []

    def make(**settings: Any) -> kici_agent.Agent:
        settings = {"token": TOKEN, "port": 0, "bind_address": "127.0.0.1", **settings}
        agent = kici_agent.Agent(mock.ws, **settings)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.shutdown(grace=2)


def next_event(agent: kici_agent.Agent, event_type: str, **fields: Any) -> kici_agent.Event:
    """The next event of `event_type` (with these attribute values), skipping the others."""
    for event in agent.events(timeout=TIMEOUT):
        if event.type == event_type and all(getattr(event, k) == v for k, v in fields.items()):
            return event
    raise AssertionError(f"no {event_type} event {fields} within {TIMEOUT}s")


def start_registered(agent: kici_agent.Agent) -> kici_agent.Agent:
    """Starts `agent` and waits until it registered."""
    agent.start()
    next_event(agent, "registered")
    return agent


def run_job(
    mock: MockOrchestrator, agent: kici_agent.Agent, steps: Sequence[str | dict[str, Any]], **options: Any
) -> tuple[kici_agent.Event, dict[str, Any]]:
    """Dispatches a job to the registered `agent`; returns its `job_finished` event and the final
    `job.status` the mock accepted."""
    dispatch = mock.dispatch(agent.agent_id, steps, **options)
    finished = next_event(agent, "job_finished", job_id=dispatch["jobId"])
    assert finished.state is not None
    status = mock.wait("job.status", state=finished.state, job_id=dispatch["jobId"])
    return finished, status
