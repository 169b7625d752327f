#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, starts what it needs
# (a container engine on a private socket, the mock orchestrator per test), stops what it
# started, and prints one summary line per suite.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '\n=== %s\n' "$*"; }
results=()
record() { results+=("$1: $2"); }

# --- packages ---------------------------------------------------------------------------
need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
command -v git >/dev/null || need_apt+=(git)
command -v valgrind >/dev/null || need_apt+=(valgrind)
command -v curl >/dev/null || need_apt+=(curl)
# A real sshd (and ssh-keygen) for the SSH clone tests (kici-agent-core/tests/ssh_clone.rs),
# which run with the Rust suite and fail without it.
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v bwrap >/dev/null || need_apt+=(bubblewrap)
# kici-agent-py's Rust tests link libpython (python3-dev); its Python suite needs venv.
command -v python3 >/dev/null || need_apt+=(python3)
command -v python3-config >/dev/null || need_apt+=(python3-dev)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# The TLS tests expect a non-empty system root store (an untrusted test CA must fail as
# UnknownIssuer, not as "no trusted CA certificate").
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
# deploy/ checks: Compose's own validator and systemd-analyze verify.
command -v docker-compose >/dev/null || need_apt+=(docker-compose)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# The container image's test makes its Debian base image with debootstrap.
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
# The TypeScript runner tests need Node >= 20.6 and npm (for zx in the fixture repository).
command -v npm >/dev/null || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true

# --- static checks -------------------------------------------------------------------------
log "cargo fmt --check"
if cargo fmt --all -- --check; then record fmt ok; else record fmt FAILED; fi
log "cargo clippy"
if cargo clippy --workspace --all-targets -- -D warnings; then record clippy ok; else record clippy FAILED; fi

log "cargo doc (the core's API docs, warnings denied: a link to a private item breaks them)"
doc_started=$(date +%s)
if RUSTDOCFLAGS="-D warnings" cargo doc -q -p kici-agent-core --no-deps; then
  record doc "ok ($(( $(date +%s) - doc_started )) s)"
else
  record doc "FAILED ($(( $(date +%s) - doc_started )) s)"
fi

# --- cargo features of the core: the library with each one left out lints clean; with all left
# out, every target lints clean and the unit tests pass. The feature list is read from the
# crate's `default`, so a new feature is covered without editing this stage. Only the library is
# linted per left-out feature: the integration tests are gated per feature, so the default build
# (clippy above) and the all-off build cover both sides of every gate, and linting all targets
# once per feature tripled the stage (399 s on a loaded 2-CPU machine).
log "features (kici-agent-core with each default feature left out, then with none)"
features_started=$(date +%s)
features_failed=0
if default_features=$(cargo metadata -q --no-deps --format-version 1 | python3 -c '
import json, sys
crate = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "kici-agent-core")
print(" ".join(crate["features"].get("default", [])))'); then
  for left_out in $default_features; do
    kept=$(printf '%s\n' $default_features | grep -vx "$left_out" | paste -sd, -)
    echo "--- without '$left_out' (features: ${kept:-none})"
    cargo clippy -q -p kici-agent-core --lib --no-default-features --features "$kept" -- -D warnings ||
      features_failed=1
  done
  echo "--- no features: every target linted, unit tests run"
  cargo clippy -q -p kici-agent-core --all-targets --no-default-features -- -D warnings ||
    features_failed=1
  cargo test -q -p kici-agent-core --no-default-features --lib || features_failed=1
else
  echo "!!! cannot read the features of kici-agent-core" >&2
  features_failed=1
fi
if [ "$features_failed" -eq 0 ]; then
  record features "ok ($(( $(date +%s) - features_started )) s)"
else
  record features "FAILED ($(( $(date +%s) - features_started )) s)"
fi

# --- Rust ----------------------------------------------------------------------------------
log "npm ci (zx for the TypeScript runner fixtures)"
npm ci --prefix tests/fixtures/typescript --no-audit --no-fund --silent ||
  echo "!!! npm ci failed: the TypeScript runner tests will fail (see above)" >&2
log "cargo test (Rust: core, binary, mock orchestrator, C ABI, Python bindings)"
if cargo test --workspace --no-fail-fast; then record rust ok; else record rust FAILED; fi

# --- chaos (faults against the binary, minutes at the real rate limits) ------------------------
log "chaos suite (fault-injecting proxy, restarting mock, malformed frames)"
chaos_started=$(date +%s)
if timeout 900 cargo test -p kici-agent-cli --test chaos -- --ignored --nocapture; then
  record chaos "ok ($(( $(date +%s) - chaos_started )) s)"
else
  record chaos "FAILED ($(( $(date +%s) - chaos_started )) s)"
fi

# --- containers (a real engine) ------------------------------------------------------------
if [ -x scripts/container-engine.sh ] && [ -f kici-agent-core/tests/container.rs ]; then
  log "container engine + container tests"
  engine_dir=$(mktemp -d /tmp/kici-engine.XXXXXX)
  if engine_env=$(scripts/container-engine.sh start "$engine_dir"); then
    # Scoped to these commands: an agent started later must not see an unknown KICI_* variable.
    engine_host=${engine_env#DOCKER_HOST=}
    if KICI_TEST_DOCKER_HOST=$engine_host cargo test -p kici-agent-core --test container -- --ignored --test-threads=2 &&
       KICI_TEST_DOCKER_HOST=$engine_host cargo test -p kici-agent-core --lib container:: -- --ignored; then
      record containers ok
    else
      record containers FAILED
    fi
    scripts/container-engine.sh stop "$engine_dir"
  else
    echo "!!! the container engine could not start: container tests FAILED (see above)" >&2
    record containers "FAILED (no engine)"
  fi
fi

# --- deploy files (Kubernetes schemas, Compose, systemd) ------------------------------------
if [ -f tests/deploy/check_deploy.py ]; then
  log "deploy files: Kubernetes manifests against the OpenAPI schemas, Compose, systemd unit"
  deploy_started=$(date +%s)
  deploy_venv=${CARGO_TARGET_DIR:-target}/deploy-venv
  if { [ -x "$deploy_venv/bin/kubernetes-validate" ] ||
       { python3 -m venv "$deploy_venv" && "$deploy_venv/bin/pip" install -q kubernetes-validate==1.37.0; }; } &&
     cargo build -q -p kici-agent-cli &&
     "$deploy_venv/bin/python" tests/deploy/check_deploy.py "${CARGO_TARGET_DIR:-target}/debug/kici-agent"; then
    record deploy "ok ($(( $(date +%s) - deploy_started )) s)"
  else
    record deploy FAILED
  fi
fi

# --- container image (the Dockerfile, built and run on a private engine) --------------------
if [ -x scripts/image-test.sh ]; then
  log "container image: build from the Dockerfile, run it against the mock orchestrator"
  image_started=$(date +%s)
  if scripts/image-test.sh; then
    record image "ok ($(( $(date +%s) - image_started )) s)"
  else
    record image "FAILED ($(( $(date +%s) - image_started )) s)"
  fi
fi

# --- release artefacts (dist/), the wheel installed from dist/ alone ------------------------
if [ -x scripts/release.sh ] && [ -x tests/deploy/test_release.sh ]; then
  log "release artefacts: scripts/release.sh into dist/, then install and run them"
  release_started=$(date +%s)
  if scripts/release.sh && tests/deploy/test_release.sh; then
    record release "ok ($(( $(date +%s) - release_started )) s)"
  else
    record release "FAILED ($(( $(date +%s) - release_started )) s)"
  fi
fi

# --- C -------------------------------------------------------------------------------------
if [ -x tests/c/run.sh ]; then
  log "C ABI tests (plain, ASan+UBSan, valgrind)"
  if tests/c/run.sh; then record c ok; else record c FAILED; fi
fi

# --- Python --------------------------------------------------------------------------------
if [ -x tests/python/run.sh ]; then
  log "Python package tests"
  # An unoptimised build of the extension: the suite measures behaviour, not speed.
  if MATURIN_PEP517_ARGS="--profile dev" tests/python/run.sh; then record python ok; else record python FAILED; fi
fi

log "summary"
failed=0
for r in "${results[@]}"; do
  echo "  $r"
  case "$r" in *FAILED*) failed=$((failed + 1)) ;; esac
done
passed=$(( ${#results[@]} - failed ))
echo "suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
