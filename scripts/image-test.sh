#!/usr/bin/env bash
# Builds the container image from the project's Dockerfile and runs it for real, with no image
# registry: a private engine (scripts/container-engine.sh), a Debian base made locally
# (scripts/image-base.sh), the agent binary built once on the host in release mode and handed to
# the Dockerfile's `prebuilt` target, then examples/kici-agent/tests/image.rs against the mock.
#
#   scripts/image-test.sh             # prints each phase's time and the image size
#
# Why a prebuilt binary: `docker build` of the default target compiles every crate again inside
# the build (many minutes on 2 CPUs); the release build on the host is the same one
# scripts/release.sh ships. The default (from-source) target is not built here.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${KICI_TEST_AGENT_IMAGE:-kici-agent:test}
BASE=kici-test/debian:bookworm
t0=$(date +%s)
phase() { echo "image-test: $* (+$(( $(date +%s) - t0 )) s)" >&2; }

engine_dir=$(mktemp -d /tmp/kici-image.XXXXXX)
context=$(mktemp -d)
cleanup() {
  # The engine's data (images, layers) goes too: only the base tarball is cached.
  scripts/container-engine.sh stop "$engine_dir" && rm -rf "$engine_dir"
  rm -rf "$context"
}
trap cleanup EXIT

engine_env=$(scripts/container-engine.sh start "$engine_dir")
export DOCKER_HOST=${engine_env#DOCKER_HOST=}
phase "engine ready"

scripts/image-base.sh "$DOCKER_HOST" "$BASE"
phase "base image $BASE ready"

# The same build command as scripts/release.sh, so the suite's release section reuses it.
cargo build --release --locked -p kici-agent-cli -p kici-agent-ffi
release_bin=${CARGO_TARGET_DIR:-target}/release/kici-agent
strip -o "$context/kici-agent" "$release_bin"
phase "release binary built ($(stat -c %s "$context/kici-agent") bytes stripped)"

# The legacy builder is what dockerd 20.10 with a CLI lacking buildx runs; it honours --target
# by building only the stages up to it (runtime, prebuilt).
DOCKER_BUILDKIT=0 docker build --quiet --network host --target prebuilt \
  --build-arg RUNTIME_IMAGE="$BASE" \
  --build-arg VERSION="$("$release_bin" --version | cut -d' ' -f2)" \
  -f Dockerfile -t "$IMAGE" "$context" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
phase "image $IMAGE built: $((size / 1000000)) MB ($size bytes; base $(( $(docker image inspect -f '{{.Size}}' "$BASE") / 1000000 )) MB)"

KICI_TEST_DOCKER_HOST=$DOCKER_HOST KICI_TEST_AGENT_IMAGE=$IMAGE \
  cargo test -p kici-agent-cli --test image -- --ignored --nocapture
phase "container checks passed"

# The Compose stack with the mock orchestrator comes up: the agent registers (/ready 200 on the
# published port), and `down` stops it.
cargo build -q -p kici-mock-orchestrator --bin kici-mock-orchestrator
http_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export KICI_AGENT_IMAGE=$IMAGE KICI_MOCK_HTTP_PORT=$http_port
export KICI_MOCK_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/kici-mock-orchestrator
KICI_AGENT_TOKEN="compose-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
export KICI_AGENT_TOKEN
compose=(docker-compose -p kici-image-test -f deploy/compose/compose.mock.yaml)
"${compose[@]}" up -d --no-build
ready=
for _ in $(seq 1 150); do
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$http_port/ready")" = 200 ]; then ready=yes; break; fi
  sleep 0.2
done
[ -n "$ready" ] || "${compose[@]}" logs --tail 30 >&2
"${compose[@]}" down --timeout 20
[ -n "$ready" ] || { echo "image-test: the Compose mock stack never became ready" >&2; exit 1; }
phase "compose.mock.yaml: the agent registered with the mock (/ready 200), stack down"
