"""Settings by name, once: the Python keywords, the C keys and the environment variables are the
same set, the core's setting table, and the stub's `Agent(...)` keywords are generated from it.

`KICI_UPDATE_STUBS=1` rewrites the generated block of `_native.pyi`."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

import kici_agent
from conftest import AgentFactory, MockOrchestrator, start_registered

REPO = Path(__file__).resolve().parents[2]
STUB = REPO / "kici-agent-py" / "python" / "kici_agent" / "_native.pyi"
HEADER = REPO / "include" / "kici_agent.h"
BEGIN = "        # BEGIN settings: generated from settings() by tests/python/test_settings.py\n"
END = "        # END settings\n"
URL = "ws://127.0.0.1:9/ws"

ANNOTATIONS = {
    "text": "str",
    "secret": "str",
    "ignored": "str",
    "ip_address": "str",
    "path": "str | os.PathLike[str]",
    "flag": "bool",
    "integer": "int",
    "size": "int | str",
    "millis": "_Seconds",
    "number": "float",
    "list": "list[str]",
    "properties": "dict[str, bool | int | float | str]",
}


def stub_block() -> str:
    lines = []
    for _name, key, _default, kind, choices, _doc in kici_agent.settings():
        if key == "url":  # the positional argument
            continue
        if kind == "choice":
            annotation = "Literal[" + ", ".join(f'"{choice}"' for choice in choices) + "]"
        else:
            annotation = ANNOTATIONS[kind]
        lines.append(f"        {key}: {annotation} | None = None,\n")
    return "".join(lines)


def test_the_stub_keywords_are_generated_from_the_setting_table() -> None:
    stub = STUB.read_text()
    start = stub.index(BEGIN) + len(BEGIN)
    end = stub.index(END)
    expected = stub_block()
    if os.environ.get("KICI_UPDATE_STUBS"):
        STUB.write_text(stub[:start] + expected + stub[end:])
        return
    assert stub[start:end] == expected, (
        "_native.pyi's Agent keywords differ from settings(); regenerate them with "
        "KICI_UPDATE_STUBS=1 tests/python/run.sh -k stub_keywords"
    )


def test_python_keywords_c_keys_and_environment_variables_are_one_set() -> None:
    table = kici_agent.settings()
    variables = {name for name, *_ in table}
    keywords = {key: name for name, key, *_ in table}
    assert len(keywords) == len(variables) == len(table)
    # The environment: every variable is known to from_env (an unknown one is refused).
    assert all(name.startswith("KICI_") for name in variables)
    # C: the generated key list on kici_config_set names exactly these variables and keys.
    header = HEADER.read_text()
    listed = dict(re.findall(r"^ \* - `(KICI_[A-Z0-9_]+)` \(`([a-z0-9_]+)`\)", header, re.M))
    assert listed == {name: key for name, key, *_ in table}
    # Python: the stub's keywords and the keywords Agent() accepts are the table's keys.
    stub = STUB.read_text()
    block = stub[stub.index(BEGIN) : stub.index(END)]
    stub_keywords = set(re.findall(r"^        ([a-z0-9_]+):", block, re.M)) | {"url"}
    assert stub_keywords == set(keywords)
    for key in keywords.keys() - {"url"}:
        kici_agent.Agent(URL, **{key: None}).shutdown(wait=True)
    with pytest.raises(TypeError, match="did you mean 'job_pids_max'"):
        kici_agent.Agent(URL, job_pid_max=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'KICI_PORT'"):
        kici_agent.Agent(URL, KICI_PORT=0)  # type: ignore[call-arg]


def test_every_kind_takes_its_python_value(tmp_path: Path) -> None:
    import datetime

    log_dir = tmp_path / "logs"
    agent = kici_agent.Agent(
        URL,
        port=0,
        bind_address="127.0.0.1",
        agent_id="py-settings",
        labels=["gpu", "a,b"],
        properties={"cores": 8, "ssd": True},
        log_level="debug",
        log_dir=log_dir,
        log_max_size="10m",
        log_retention_days=3,
        job_pids_max=64,
        node="/usr/bin/node",
        cancel_grace=datetime.timedelta(milliseconds=1500),
        shutdown_grace=0.5,
        sandbox=False,
        rate_msg_burst=20,
        rate_bytes_per_sec=1e5,
        cache="ignored",
    )
    assert agent.agent_id == "py-settings"
    agent.shutdown(wait=True)
    with pytest.raises(TypeError, match="job_pids_max: expected int, got str"):
        kici_agent.Agent(URL, job_pids_max="64")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sandbox: expected bool, got int"):
        kici_agent.Agent(URL, sandbox=1)  # type: ignore[arg-type]
    with pytest.raises(kici_agent.ConfigError, match="job_pids_max: expected an integer >= 0"):
        kici_agent.Agent(URL, job_pids_max=-1)
    with pytest.raises(kici_agent.ConfigError, match="log_retention_days: must be at least 1"):
        kici_agent.Agent(URL, log_retention_days=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kici_agent.Agent(URL, port=0, max_concurrent_jobs=0).shutdown(wait=True)
    assert any("KICI_MAX_CONCURRENT_JOBS" in str(w.message) for w in caught)


def test_a_setting_python_had_no_keyword_for_reaches_the_orchestrator(
    mock: MockOrchestrator, make_agent: AgentFactory
) -> None:
    # KICI_MAX_CONCURRENT_JOBS had no keyword before the table: it now feeds max concurrency.
    agent = start_registered(make_agent(max_concurrent_jobs=3, labels=["py-e2e"]))
    register = mock.wait("agent.register")
    assert register["maxConcurrency"] == 3, register
    assert "py-e2e" in register["labels"]
    agent.shutdown(wait=True)
