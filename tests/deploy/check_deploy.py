"""Checks the deployment files in deploy/: every Kubernetes manifest against the real
Kubernetes OpenAPI schemas (kubernetes-validate, strict, offline), the Compose files with
docker-compose's own schema check, the systemd unit with `systemd-analyze verify`, and the
values the README promises (probes, grace arithmetic, non-root, drain-first stop).

    python tests/deploy/check_deploy.py AGENT_BINARY   # exits 1 naming each failure
"""

import os
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def run(args, env=None):
    return subprocess.run(args, capture_output=True, text=True, env=env)


def kubernetes():
    files = sorted(p for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml")
    validator = pathlib.Path(sys.executable).with_name("kubernetes-validate")
    result = run([str(validator), "--strict", "-k", KUBERNETES_VERSION, *map(str, files)])
    check(result.returncode == 0, f"kubernetes-validate:\n{result.stdout}{result.stderr}")
    print(result.stdout, end="")

    docs = {}
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    listed = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())["resources"]
    check(sorted(listed) == sorted(p.name for p in files), f"kustomization lists {listed}")
    check(
        {"Deployment", "Secret", "ConfigMap", "PodDisruptionBudget", "Service"} <= docs.keys(),
        f"kinds present: {sorted(docs)}",
    )
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    # The probes the KiCI docs give for the agent.
    check(
        agent["livenessProbe"] == {"httpGet": {"path": "/health", "port": 8080}, "initialDelaySeconds": 5, "periodSeconds": 10},
        f"livenessProbe {agent['livenessProbe']}",
    )
    check(
        agent["readinessProbe"] == {"httpGet": {"path": "/ready", "port": 8080}, "initialDelaySeconds": 5, "periodSeconds": 5},
        f"readinessProbe {agent['readinessProbe']}",
    )
    check(pod["securityContext"].get("runAsNonRoot") is True, "runAsNonRoot")
    check(pod["securityContext"].get("runAsUser") == 10001, "runAsUser is the image's uid")
    check(agent["securityContext"].get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation")
    check("limits" in agent["resources"] and "requests" in agent["resources"], "resources")
    # Drain first, then SIGTERM with the shutdown grace, all inside the termination grace.
    pre_stop = " ".join(agent["lifecycle"]["preStop"]["exec"]["command"])
    check("kill -USR1 1" in pre_stop, f"preStop drains with SIGUSR1: {pre_stop}")
    drain = re.search(r"DRAIN_SECONDS=(\d+)", pre_stop)
    grace_ms = int(docs["ConfigMap"]["data"]["KICI_SHUTDOWN_GRACE_MS"])
    check(drain is not None, "preStop sets DRAIN_SECONDS")
    if drain:
        total = int(drain.group(1)) + grace_ms / 1000
        check(
            total < pod["terminationGracePeriodSeconds"] <= total + 60,
            f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} vs drain + grace {total}",
        )
    check(
        {e["name"] for e in agent["env"]} >= {"KICI_AGENT_TOKEN", "KICI_AGENT_ID"},
        "token from the Secret, id from the pod name",
    )
    token = next(e for e in agent["env"] if e["name"] == "KICI_AGENT_TOKEN")
    check(token["valueFrom"]["secretKeyRef"]["name"] == docs["Secret"]["metadata"]["name"], "token secret name")
    check(all(k.startswith("KICI_") for k in docs["ConfigMap"]["data"]), "ConfigMap holds KICI_* settings only")
    annotations = docs["Service"]["metadata"]["annotations"]
    check(annotations.get("prometheus.io/path") == "/metrics" and annotations.get("prometheus.io/port") == "8080", f"Service annotations {annotations}")
    check(docs["PodDisruptionBudget"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"], "PDB selects the agents")


def compose():
    env = dict(os.environ, POSTGRES_PASSWORD="p", KICI_AGENT_TOKEN="t", KICI_ORCHESTRATOR_IMAGE="o", KICI_MOCK_BIN="/bin/true")
    for name in ("compose.yaml", "compose.mock.yaml"):
        result = run(["docker-compose", "-f", str(DEPLOY / "compose" / name), "config"], env=env)
        check(result.returncode == 0, f"docker-compose config {name}:\n{result.stderr}")
        if result.returncode != 0:
            continue
        print(f"docker-compose config: {name} valid")
        config = yaml.safe_load(result.stdout)
        agent = config["services"]["agent"]
        grace_ms = int(agent["environment"]["KICI_SHUTDOWN_GRACE_MS"])
        stop = agent["stop_grace_period"]
        check(stop.endswith("s") and int(stop[:-1]) > grace_ms / 1000, f"{name}: stop_grace_period {stop} vs grace {grace_ms} ms")
    full = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    check({"postgres", "orchestrator", "agent"} <= full["services"].keys(), "compose.yaml services")
    check("/var/run/docker.sock:/var/run/docker.sock" in full["services"]["agent"]["volumes"], "agent mounts the Docker socket")


def systemd(agent_binary):
    unit = (DEPLOY / "systemd" / "kici-agent.service").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        # verify checks that ExecStart exists: point it at the built binary.
        patched = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={agent_binary}", unit)
        path = pathlib.Path(tmp) / "kici-agent.service"
        path.write_text(patched)
        result = run(["systemd-analyze", "verify", str(path)])
        # Unknown or malformed settings are only warnings on stderr: treat them as failures.
        check(result.returncode == 0 and result.stderr.strip() == "", f"systemd-analyze verify:\n{result.stderr}")
        if result.returncode == 0 and not result.stderr.strip():
            print("systemd-analyze verify: kici-agent.service valid")
    settings = dict(re.findall(r"(?m)^(\w+)=(.*)$", unit))
    check(settings.get("KillMode") == "mixed", "KillMode=mixed")
    check(settings.get("Restart") == "on-failure", "Restart=on-failure")
    # Readiness once registered; never killed for waiting on the orchestrator (no restart loop).
    check(settings.get("Type") == "notify", "Type=notify")
    check(settings.get("TimeoutStartSec") == "infinity", "TimeoutStartSec=infinity")
    for option in ("NoNewPrivileges", "ProtectSystem", "StateDirectory"):
        check(option in settings, f"{option} set")
    env = dict(re.findall(r"(?m)^(KICI_\w+)=(.*)$", (DEPLOY / "systemd" / "kici-agent.env").read_text()))
    stop = settings.get("TimeoutStopSec", "")
    check(stop.endswith("s") and int(stop[:-1]) > int(env["KICI_SHUTDOWN_GRACE_MS"]) / 1000, f"TimeoutStopSec {stop} vs KICI_SHUTDOWN_GRACE_MS")
    # The env example must be a configuration the agent accepts: `health` loads it exactly like
    # the agent and, with port 0, stops right after loading with its own message.
    agent_env = {"PATH": os.environ["PATH"], **env, "KICI_PORT": "0"}
    result = run([agent_binary, "health"], env=agent_env)
    check("KICI_PORT is 0" in result.stderr, f"kici-agent.env is accepted:\n{result.stderr}")


if __name__ == "__main__":
    kubernetes()
    compose()
    systemd(os.path.abspath(sys.argv[1]))
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)
