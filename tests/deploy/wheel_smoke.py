"""Runs inside a fresh virtual environment where only dist/'s wheel was installed: imports
kici_agent, runs an agent with one Python step against the mock orchestrator binary, and
checks the job succeeded.

    python wheel_smoke.py MOCK_BINARY TOKEN
"""

import json
import subprocess
import sys
import urllib.parse
import urllib.request

import kici_agent

TIMEOUT_MS = 20_000


def control(base, method, path, body=None, **query):
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_MS / 1000 + 5) as response:
        return json.loads(response.read() or b"null")


def main(mock_binary, token):
    mock = subprocess.Popen([mock_binary, "--token", token], stdout=subprocess.PIPE, text=True)
    try:
        endpoints = json.loads(mock.stdout.readline())
        base = endpoints["control"]
        agent = kici_agent.Agent(endpoints["ws"], token=token, agent_id="from-the-wheel", port=0, bind_address="127.0.0.1")

        @agent.step("greet")
        def greet(step, ctx):
            ctx.log(f"hello from {kici_agent.__name__} on CPython {sys.version_info[0]}.{sys.version_info[1]}")

        agent.start()
        control(base, "GET", "/wait_agent", timeoutMs=TIMEOUT_MS)
        sample = {"runId": "run-wheel", "jobId": "job-wheel", "steps": [{"name": "greet"}]}
        control(base, "POST", "/dispatch", {"agentId": "from-the-wheel", "sample": sample})
        done = control(base, "GET", "/wait", type="job.status", state="success", jobId="job-wheel", timeoutMs=TIMEOUT_MS)
        assert done["state"] == "success", done
        agent.shutdown(1)
        print(f"wheel smoke test: kici_agent ran job-wheel against the mock: {done['state']}")
    finally:
        mock.terminate()
        mock.wait(10)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
