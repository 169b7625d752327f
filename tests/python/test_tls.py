"""`wss://` against the mock orchestrator in TLS mode (`--tls CA_FILE`: a server certificate
signed by a CA the mock generates and writes to CA_FILE)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TIMEOUT, TOKEN, MockOrchestrator, next_event

import kici_agent


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    return tmp_path / "ca.pem"


@pytest.fixture
def tls_mock(mock_binary: str, tmp_path: Path, ca_file: Path) -> Iterator[MockOrchestrator]:
    orchestrator = MockOrchestrator(mock_binary, tmp_path / "mock.log", "--tls", str(ca_file))
    yield orchestrator
    violations = orchestrator.violations()
    orchestrator.stop()
    assert violations == [], f"the agent broke the protocol: {violations}"


def tls_agent(mock: MockOrchestrator, tls_ca_file: Path | None = None) -> kici_agent.Agent:
    return kici_agent.Agent(mock.ws, token=TOKEN, port=0, bind_address="127.0.0.1", tls_ca_file=tls_ca_file)


def test_wss_registers_with_the_ca_trusted_through_tls_ca_file(tls_mock: MockOrchestrator, ca_file: Path) -> None:
    assert tls_mock.ws.startswith("wss://127.0.0.1:")
    with tls_agent(tls_mock, tls_ca_file=ca_file) as agent:  # entering starts it
        next_event(agent, "registered")
        assert agent.last_error is None
        assert tls_mock.wait_agent() == agent.agent_id


def test_an_untrusted_certificate_is_the_last_error_and_the_agent_retries(tls_mock: MockOrchestrator) -> None:
    with tls_agent(tls_mock) as agent:
        tls_mock.wait_tls_failures(2)  # refused, then retried: not a permanent failure

        port = tls_mock.ws.rsplit(":", 1)[1].removesuffix("/ws")
        expected = f"TLS handshake with 127.0.0.1:{port} failed: invalid peer certificate: UnknownIssuer"
        assert agent.last_error == expected
        assert agent.state.connection in ("connecting", "disconnected")
        address = agent.http_address
        assert address is not None
        host, http_port = address
        with urllib.request.urlopen(f"http://{host}:{http_port}/health", timeout=TIMEOUT) as response:
            health = json.loads(response.read())
        assert health["lastError"] == expected
        assert TOKEN not in json.dumps(health)


def test_a_ca_file_without_certificates_is_a_config_error(tmp_path: Path) -> None:
    not_a_ca = tmp_path / "ca.pem"
    not_a_ca.write_text("not a certificate\n")
    with pytest.raises(kici_agent.ConfigError, match=r"tls_ca_file: .*contains no PEM certificate"):
        kici_agent.Agent("wss://orchestrator.example/ws", tls_ca_file=not_a_ca)
