"""The Python embedding example runs a real job end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TIMEOUT, TOKEN, MockOrchestrator

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "python" / "hardware_rig.py"
RIG_STEPS = ["power-on", "flash-firmware", "self-test", "measure-power", "power-off"]


def test_the_hardware_rig_example_runs_a_job_and_stops_on_ctrl_c(mock: MockOrchestrator) -> None:
    # The agent refuses unknown KICI_* variables, such as the test's own KICI_MOCK_ORCHESTRATOR.
    env = {name: value for name, value in os.environ.items() if not name.startswith("KICI_")}
    env |= {
        "KICI_ORCHESTRATOR_URL": mock.ws,
        "KICI_AGENT_TOKEN": TOKEN,
        "KICI_AGENT_ID": "rig-7",
        "KICI_LABELS": "hil,board:nrf52",
        "KICI_PORT": "0",
        "KICI_BIND_ADDRESS": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
    }
    rig = subprocess.Popen([sys.executable, str(EXAMPLE)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        status_code, registered = mock.request("GET", "/wait_agent", timeoutMs=int(TIMEOUT * 1000))
        if status_code != 200:
            rig.kill()
            pytest.fail(f"the rig did not register: {rig.communicate()}")
        assert registered["agentId"] == "rig-7"
        dispatch = mock.dispatch("rig-7", RIG_STEPS, job_name="hil-smoke")
        status = mock.wait("job.status", state="success", job_id=dispatch["jobId"])
        # The main thread is inside run() once a job ran: Ctrl-C drains and run() returns.
        rig.send_signal(signal.SIGINT)
        out, err = rig.communicate(timeout=TIMEOUT)
    finally:
        if rig.poll() is None:
            rig.kill()
            rig.communicate()

    assert rig.returncode == 0, err
    outputs = status["data"]["outputs"]
    assert len(outputs["flash-firmware"]["sha256"]) == 64
    assert outputs["self-test"] == {"selftest": "pass"}
    assert outputs["measure-power"]["idle_ma"] <= 12.0
    log = mock.log_text(dispatch["jobId"])
    assert "console: selftest: PASS" in log and "relay 1 open: board unpowered" in log
    assert "rig registered as rig-7" in out
    assert "job hil-smoke success" in out
    assert out.strip().splitlines()[-1] == "rig stopped (closed)"
    registration = mock.request("GET", "/registrations")[1][0]
    assert {"hil", "board:nrf52"} <= set(registration["labels"])
