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
if cargo clippy --workspace --exclude kici-agent-py --all-targets -- -D warnings; then record clippy ok; else record clippy FAILED; fi

# --- Rust ----------------------------------------------------------------------------------
log "npm ci (zx for the TypeScript runner fixtures)"
npm ci --prefix tests/fixtures/typescript --no-audit --no-fund --silent ||
  echo "!!! npm ci failed: the TypeScript runner tests will fail (see above)" >&2
log "cargo test (Rust: core, binary, mock orchestrator, C ABI)"
if cargo test --workspace --exclude kici-agent-py; then record rust ok; else record rust FAILED; fi

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
