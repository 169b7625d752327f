#!/bin/sh
# Builds libkici_agent and installs it for C and C++ build systems:
#   PREFIX/lib/libkici_agent.so and .a, PREFIX/include/kici_agent.h,
#   PREFIX/lib/pkgconfig/kici_agent.pc
# usage: kici-agent-ffi/install.sh PREFIX [release|debug]     (CARGO_TARGET_DIR is honoured)
set -eu
prefix=${1:?usage: install.sh PREFIX [release|debug]}
profile=${2:-release}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
target=${CARGO_TARGET_DIR:-$root/target}
case $profile in
    release) (cd "$root" && cargo build --quiet -p kici-agent-ffi --release) ;;
    debug) (cd "$root" && cargo build --quiet -p kici-agent-ffi) ;;
    *) echo "install.sh: profile must be release or debug, got $profile" >&2; exit 2 ;;
esac
version=$(sed -n 's/^#define KICI_AGENT_VERSION "\(.*\)"$/\1/p' "$root/include/kici_agent.h")
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
for library in libkici_agent.so libkici_agent.dylib libkici_agent.a; do
    if [ -f "$target/$profile/$library" ]; then
        cp "$target/$profile/$library" "$prefix/lib/"
    fi
done
cp "$root/include/kici_agent.h" "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/kici_agent.pc.in" \
    > "$prefix/lib/pkgconfig/kici_agent.pc"
echo "installed kici_agent $version into $prefix"
