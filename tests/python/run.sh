#!/usr/bin/env bash
# Builds and installs kici-agent (./kici-agent-py) into a fresh virtual environment, builds the
# strict mock orchestrator, and runs the pytest suite. Extra arguments go to pytest.
#
#   tests/python/run.sh                     # everything
#   tests/python/run.sh -k cancel           # a subset
#
# PYTHON picks the interpreter (default python3, >= 3.10). CARGO_TARGET_DIR is honoured.
# MATURIN_PEP517_ARGS="--profile dev" builds the package faster (unoptimised).
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/kici-agent-py-tests.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { printf '==> %s\n' "$*" >&2; }

step "virtual environment in $work/venv ($("$python" --version))"
"$python" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv_python" -m pip install --quiet --disable-pip-version-check pytest mypy

step "pip install ./kici-agent-py (maturin build)"
(cd "$repo" && "$venv_python" -m pip install --quiet --disable-pip-version-check ./kici-agent-py)

step "cargo build kici-mock-orchestrator"
cargo build --quiet --manifest-path "$repo/Cargo.toml" -p kici-mock-orchestrator --bin kici-mock-orchestrator
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$repo/Cargo.toml" |
    "$venv_python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export KICI_MOCK_ORCHESTRATOR="$target_dir/debug/kici-mock-orchestrator"

step "pytest"
# `kici_agent` is the installed package: no source tree of it is on the path from here.
cd "$repo/tests/python"
"$venv_python" -m pytest -p no:cacheprovider -W error::ResourceWarning "$@"
