"""The core's executor routing seen from Python, against the strict mock orchestrator: a
TypeScript job no step function claims runs through the agent's own TypeScript runner, a function
registered for a job that names a container image wins over the container, and functions are
registered before the agent starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

import kici_agent
from conftest import DISPATCH_FIXTURE, AgentFactory, MockOrchestrator, start_registered

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
#: A TypeScript job clones, installs nothing (node_modules is committed) and starts Node.
JOB_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def workflow_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A git repository like a user's: `.kici/workflows` and `.kici/node_modules` with the
    stand-in SDK and zx. Returns the dispatch's `repoUrl`, `ref` and `sha`."""
    zx = FIXTURES / "typescript" / "node_modules" / "zx"
    assert (zx / "package.json").exists(), (
        "zx is not installed for the TypeScript fixtures: run `npm ci --prefix tests/fixtures/typescript`"
    )
    root = tmp_path_factory.mktemp("workflows")
    shutil.copytree(FIXTURES / "typescript" / "repo", root, dirs_exist_ok=True)
    shutil.copytree(FIXTURES / "typescript" / "sdk", root / ".kici" / "node_modules" / "@kici-dev" / "sdk")
    shutil.copytree(zx, root / ".kici" / "node_modules" / "zx")

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True)
        return done.stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", "workflows")
    return {"repoUrl": f"file://{root}", "ref": git("rev-parse", "--abbrev-ref", "HEAD"), "sha": git("rev-parse", "HEAD")}


def dispatch(
    mock: MockOrchestrator,
    agent: kici_agent.Agent,
    *,
    job: str,
    steps: list[dict[str, Any]],
    source_file: str = ".kici/workflows/ci.ts",
    workflow: str = "ci",
    repo: dict[str, str] | None = None,
    **job_config: Any,
) -> str:
    """Sends job `job` of `workflow` in `source_file` (checked out from `repo`, if any), with
    extra `jobConfig` fields; returns its job id."""
    message: dict[str, Any] = json.loads(DISPATCH_FIXTURE.read_text())
    job_id = str(uuid.uuid4())
    message.update(messageId=str(uuid.uuid4()), runId=str(uuid.uuid4()), jobId=job_id, repoUrl="")
    message.update(repo or {})
    config = message["jobConfig"]
    # The fixture's hash is of the real orchestrator's workflow file, not of these.
    del config["contentHash"]
    config.update(name=job, baseJobName=job, workflowName=workflow, steps=steps, **job_config)
    config["source"]["file"] = source_file
    status, body = mock.request("POST", "/dispatch", {"agentId": agent.agent_id, "dispatch": message})
    assert status == 200, body
    return job_id


def finished(agent: kici_agent.Agent, job_id: str) -> kici_agent.Event:
    for event in agent.events(timeout=JOB_TIMEOUT):
        if event.type == "job_finished" and event.job_id == job_id:
            return event
    raise AssertionError(f"job {job_id} did not finish within {JOB_TIMEOUT}s")


def test_a_typescript_job_no_function_claims_runs_through_the_runner(
    mock: MockOrchestrator, make_agent: AgentFactory, workflow_repo: dict[str, str]
) -> None:
    agent = make_agent()
    called: list[str] = []
    # Functions for another job and another step name: they do not claim this job.
    agent.step("flash", lambda step, ctx: called.append("flash"))
    agent.job("hil", lambda step, ctx: called.append("hil"))
    start_registered(agent)

    job_id = dispatch(
        mock,
        agent,
        job="outputs",
        steps=[
            {"name": "produce", "hasOutputs": True},
            {"name": "step-1", "hasOutputs": False},
            {"name": "options-step", "hasOutputs": True},
        ],
        source_file=".kici/workflows/features.ts",
        workflow="features",
        repo=workflow_repo,
    )

    done = finished(agent, job_id)
    assert done.state == "success", done.error
    status = mock.wait("job.status", state="success", job_id=job_id)
    # The steps' return values, as the TypeScript runner reports them.
    assert status["data"]["outputs"] == {"produce": {"version": "1.2.3"}, "options-step": {"value": 42}}
    assert "console output of produce" in mock.log_text(job_id)
    assert called == []


def test_a_function_registered_for_a_job_that_names_a_container_wins(
    mock: MockOrchestrator, make_agent: AgentFactory
) -> None:
    agent = make_agent()
    agent.job("hil", lambda step, ctx: ctx.set_output("ran", "on the host"))
    start_registered(agent)

    # No container engine is needed: the registered function takes every step.
    job_id = dispatch(mock, agent, job="hil", steps=[{"name": "measure", "hasOutputs": True}], container="debian:12")

    done = finished(agent, job_id)
    assert done.state == "success", done.error
    status = mock.wait("job.status", state="success", job_id=job_id)
    assert status["data"]["outputs"] == {"measure": {"ran": "on the host"}}
    assert (
        "Step 'measure' runs on this host with executor 'python' (registered for the job), not in the job's container"
        in mock.log_text(job_id)
    )


def test_functions_are_registered_before_start(mock: MockOrchestrator, make_agent: AgentFactory) -> None:
    agent = start_registered(make_agent())
    with pytest.raises(kici_agent.AgentError, match="executors must be registered before the agent starts"):
        agent.default(lambda step, ctx: None)
    with pytest.raises(kici_agent.AgentError, match="before the agent starts"):

        @agent.step("late")
        def late(step: kici_agent.Step, ctx: kici_agent.StepContext) -> None:
            pass
