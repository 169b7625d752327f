#!/usr/bin/env bash
# Checks what scripts/release.sh put in dist/ (or DIST) the way a user meets it: checksums,
# the binary tarball runs, the C bundle is found through its pkg-config file, and the wheel
# installs into a fresh virtual environment from dist/ alone (no index, no Rust, no headers
# needed) and runs an agent against the mock orchestrator.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
dist=${DIST:-$root/dist}
target=${CARGO_TARGET_DIR:-$root/target}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$dist" && sha256sum --quiet -c SHA256SUMS)
echo "SHA256SUMS: ok"

tar -C "$work" -xzf "$dist"/kici-agent-[0-9]*.tar.gz
binary=$(echo "$work"/kici-agent-*/kici-agent)
version=$("$binary" --version)
! readelf -S "$binary" | grep -q '\.symtab' || { echo "the binary is not stripped" >&2; exit 1; }
echo "binary tarball: $version"

tar -C "$work" -xzf "$dist"/kici-agent-c-*.tar.gz
pc_dir=$(echo "$work"/kici-agent-c-*/lib/pkgconfig)
[ "$(PKG_CONFIG_PATH=$pc_dir pkg-config --modversion kici_agent)" = "${version#kici-agent }" ]
cflags=$(PKG_CONFIG_PATH=$pc_dir pkg-config --cflags kici_agent)
libs=$(PKG_CONFIG_PATH=$pc_dir pkg-config --libs kici_agent)
libdir=$(PKG_CONFIG_PATH=$pc_dir pkg-config --variable=libdir kici_agent)
printf '#include <kici_agent.h>\n#include <stdio.h>\nint main(void) { puts(KICI_AGENT_VERSION); return 0; }\n' >"$work/v.c"
# shellcheck disable=SC2086
cc -o "$work/v" "$work/v.c" $cflags $libs -Wl,-rpath,"$libdir"
echo "C bundle: pkg-config finds it, a program links against it: $("$work/v")"

"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check --no-index --only-binary :all: --find-links "$dist" kici-agent
cargo build -q -p kici-mock-orchestrator --bin kici-mock-orchestrator
# A token that is only a test's: built here, never a committed literal.
token="test-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
(cd "$work" && "$work/venv/bin/python" "$root/tests/deploy/wheel_smoke.py" "$target/debug/kici-mock-orchestrator" "$token")
