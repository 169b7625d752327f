#!/usr/bin/env bash
# Builds libkici_agent and the strict mock orchestrator, then runs the C tests against the mock:
#  - the header compiles as C11 and C++17 with -Wall -Wextra -Werror -pedantic (and works from C++);
#  - every C test program, compiled normally, with -fsanitize=address,undefined, and run under
#    valgrind (--leak-check=full --errors-for-leak-kinds=definite --error-exitcode=1);
#  - the example (examples/c), built through the installed pkg-config file, runs a job and
#    drains on SIGTERM; it also links statically.
# Each test program gets a fresh mock, started here and stopped by its pid; test_tls gets one
# serving wss:// (`--tls`), its test CA named by KICI_E2E_TLS_CA_FILE; test_routing gets a git
# repository of TypeScript workflows (tests/fixtures/typescript, with the stand-in SDK and zx:
# run `npm ci --prefix tests/fixtures/typescript` first) named by KICI_E2E_TS_REPO_URL,
# KICI_E2E_TS_REF and KICI_E2E_TS_SHA.
#
# usage: tests/c/run.sh [--release] [--no-valgrind] [--no-sanitizers]
# Needs: cargo, cc, c++, make, pkg-config, valgrind, git, node >= 20.6; curl or python3.
# Installs nothing.
# CARGO_TARGET_DIR is honoured. Prints "c-tests: N passed, M failed" and exits non-zero on failure.
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
profile=debug
cargo_flags=()
use_valgrind=1
use_sanitizers=1
for arg in "$@"; do
    case $arg in
        --release) profile=release; cargo_flags=(--release) ;;
        --debug) profile=debug; cargo_flags=() ;;
        --no-valgrind) use_valgrind=0 ;;
        --no-sanitizers) use_sanitizers=0 ;;
        *) echo "usage: tests/c/run.sh [--release] [--no-valgrind] [--no-sanitizers]" >&2; exit 2 ;;
    esac
done
target=${CARGO_TARGET_DIR:-$root/target}
lib_dir=$target/$profile
tests_dir=$root/tests/c
work=$(mktemp -d "${TMPDIR:-/tmp}/kici-c-tests.XXXXXX")
mock_pid=
# Per-run limit: valgrind is slow, a hang must not stall CI.
run_limit=${KICI_C_TEST_TIMEOUT:-900}
# Read by sanitized programs only.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
token=kat_c0ffee0123456789abcdef0123456789abcdef0123456789abcdef01234567

stop_mock() {
    if [ -n "$mock_pid" ]; then
        kill "$mock_pid" 2>/dev/null
        wait "$mock_pid" 2>/dev/null
        mock_pid=
    fi
}
cleanup() {
    stop_mock
    rm -rf "$work"
}
trap cleanup EXIT

# ---- HTTP for the mock's control API (curl, else python3) ---------------------------------
http() { # http METHOD URL [BODY] -> body on stdout; fails unless 2xx
    local method=$1 url=$2 body=${3:-}
    if command -v curl >/dev/null 2>&1; then
        curl -sS --fail-with-body --max-time 90 -X "$method" -H 'Content-Type: application/json' \
            ${body:+--data "$body"} "$url"
    else
        python3 - "$method" "$url" "$body" <<'PY'
import sys, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
request = urllib.request.Request(url, data=body.encode() if body else None, method=method,
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=90) as response:
    sys.stdout.write(response.read().decode())
PY
    fi
}

# ---- the mock ------------------------------------------------------------------------------
start_mock() { # start_mock [MOCK ARGS...]: sets mock_pid, mock_ws, mock_control
    local out=$work/mock.out
    : > "$out"
    "$lib_dir/kici-mock-orchestrator" --token "$token" "$@" > "$out" 2> "$work/mock.err" &
    mock_pid=$!
    for _ in $(seq 200); do
        if grep -q '"control"' "$out"; then
            mock_ws=$(sed -n 's/.*"ws":"\([^"]*\)".*/\1/p' "$out")
            mock_control=$(sed -n 's/.*"control":"\([^"]*\)".*/\1/p' "$out")
            return 0
        fi
        sleep 0.05
    done
    echo "the mock orchestrator did not start:" >&2
    cat "$work/mock.err" >&2
    return 1
}

with_mock() { # with_mock COMMAND... : runs COMMAND with a fresh mock in its environment
    start_mock || return 1
    KICI_E2E_WS_URL=$mock_ws KICI_E2E_CONTROL_URL=$mock_control KICI_E2E_TOKEN=$token \
        timeout "$run_limit" "$@"
    local status=$?
    stop_mock
    return $status
}

with_tls_mock() { # with_tls_mock COMMAND...: with_mock, the mock serving wss:// with a test CA
    local ca=$work/mock-ca.pem
    start_mock --tls "$ca" || return 1
    KICI_E2E_WS_URL=$mock_ws KICI_E2E_CONTROL_URL=$mock_control KICI_E2E_TOKEN=$token \
        KICI_E2E_TLS_CA_FILE=$ca timeout "$run_limit" "$@"
    local status=$?
    stop_mock
    return $status
}

# ---- bookkeeping ---------------------------------------------------------------------------
passed=0
failed=0
failed_names=()
check() { # check NAME COMMAND...: runs a check, keeps its output in a log, counts it
    local name=$1
    shift
    local log=$work/log.$passed.$failed
    if "$@" > "$log" 2>&1; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        failed_names+=("$name")
        echo "FAIL $name"
        tail -n 80 "$log" | sed 's/^/     | /'
    fi
}

# ---- build ---------------------------------------------------------------------------------
echo "building libkici_agent and the mock orchestrator ($profile)"
if ! (cd "$root" && cargo build --quiet "${cargo_flags[@]}" -p kici-agent-ffi -p kici-mock-orchestrator); then
    echo "c-tests: 0 passed, 1 failed"
    exit 1
fi

warnings=(-Wall -Wextra -Werror -pedantic)
c_flags=(-std=c11 "${warnings[@]}" -g -O1 -pthread -I"$root/include")
link_flags=(-L"$lib_dir" -lkici_agent -Wl,-rpath,"$lib_dir" -pthread)
sanitize_flags=(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
programs=(test_api test_jobs test_two_agents test_tls test_routing)

compile() { # compile OUTPUT SOURCE [EXTRA FLAGS...]
    local output=$1 source=$2
    shift 2
    cc "${c_flags[@]}" "$@" -o "$output" "$source" "$tests_dir/harness.c" "${link_flags[@]}"
}

# ---- the header ----------------------------------------------------------------------------
check "header compiles as C11" \
    cc -std=c11 "${warnings[@]}" -fsyntax-only -x c "$root/include/kici_agent.h"
check "header compiles as C++17" \
    c++ -std=c++17 "${warnings[@]}" -fsyntax-only -x c++ "$root/include/kici_agent.h"
cxx_program() {
    c++ -std=c++17 "${warnings[@]}" -I"$root/include" -o "$work/header_cxx" \
        "$tests_dir/header_cxx.cpp" "${link_flags[@]}" && "$work/header_cxx"
}
check "header works from C++17" cxx_program

# ---- the TypeScript workflow repository (test_routing) ---------------------------------------
make_ts_repo() { # a repository like a user's: workflows, the stand-in SDK and zx under .kici
    local fixtures=$root/tests/fixtures repo=$work/ts-repo
    if [ ! -f "$fixtures/typescript/node_modules/zx/package.json" ]; then
        echo "zx is not installed for the TypeScript fixtures: run" \
            "npm ci --prefix tests/fixtures/typescript" >&2
        return 1
    fi
    mkdir -p "$repo/.kici/node_modules/@kici-dev" &&
        cp -R "$fixtures/typescript/repo/." "$repo/" &&
        cp -R "$fixtures/typescript/sdk" "$repo/.kici/node_modules/@kici-dev/sdk" &&
        cp -R "$fixtures/typescript/node_modules/zx" "$repo/.kici/node_modules/zx" &&
        git -C "$repo" init -q &&
        git -C "$repo" add -A &&
        git -C "$repo" -c user.name=test -c user.email=test@example.invalid commit -qm workflows &&
        export KICI_E2E_TS_REPO_URL="file://$repo" \
            KICI_E2E_TS_REF="$(git -C "$repo" rev-parse --abbrev-ref HEAD)" \
            KICI_E2E_TS_SHA="$(git -C "$repo" rev-parse HEAD)"
}
check "TypeScript workflow repository for test_routing" make_ts_repo
# `check` ran it in this shell: its exports stay for the test programs.

# ---- the test programs ---------------------------------------------------------------------
for program in "${programs[@]}"; do
    runner=with_mock
    [ "$program" = test_tls ] && runner=with_tls_mock
    compile "$work/$program" "$tests_dir/$program.c" \
        || { failed=$((failed + 1)); failed_names+=("$program (compile)"); continue; }
    check "$program" "$runner" "$work/$program"
    if [ "$use_sanitizers" = 1 ]; then
        if compile "$work/$program.san" "$tests_dir/$program.c" "${sanitize_flags[@]}"; then
            check "$program [asan+ubsan]" "$runner" "$work/$program.san"
        else
            failed=$((failed + 1))
            failed_names+=("$program [asan+ubsan] (compile)")
        fi
    fi
    # Under valgrind everything in-process runs tens of times slower (test_routing's libgit2
    # clone of the TypeScript repository: ~1 min), so the harness's waits are scaled.
    if [ "$use_valgrind" = 1 ]; then
        export KICI_E2E_TIME_SCALE=4
        check "$program [valgrind]" "$runner" valgrind --leak-check=full \
            --errors-for-leak-kinds=definite --show-leak-kinds=definite --error-exitcode=1 \
            --suppressions="$tests_dir/valgrind.supp" --num-callers=30 "$work/$program"
        unset KICI_E2E_TIME_SCALE
    fi
done

# ---- the example ---------------------------------------------------------------------------
prefix=$work/prefix
install_library() {
    CARGO_TARGET_DIR=$target "$root/kici-agent-ffi/install.sh" "$prefix" "$profile" &&
        PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --modversion kici_agent
}
check "install.sh installs the library, header and pkg-config file" install_library

build_example() {
    rm -f "$work/kici_agent_example"
    PKG_CONFIG_PATH=$prefix/lib/pkgconfig make --no-print-directory -C "$root/examples/c" \
        USE_PKG_CONFIG=1 kici_agent_example &&
        mv "$root/examples/c/kici_agent_example" "$work/kici_agent_example"
}
check "example builds through pkg-config" build_example

link_example_statically() {
    local libs
    libs=$(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --static --libs-only-l kici_agent |
        sed 's/-lkici_agent//')
    # shellcheck disable=SC2086 # the libraries are separate words
    cc -std=c11 "${warnings[@]}" -pthread -I"$prefix/include" -o "$work/example_static" \
        "$root/examples/c/kici_agent_example.c" "$prefix/lib/libkici_agent.a" $libs &&
        ! ldd "$work/example_static" | grep -q kici_agent
}
check "example links statically with the pkg-config libraries" link_example_statically

run_example() { # runs the example against the mock: a job, then SIGTERM drains it
    local out=$work/example.out
    KICI_ORCHESTRATOR_URL=$KICI_E2E_WS_URL KICI_AGENT_TOKEN=$KICI_E2E_TOKEN KICI_PORT=0 \
        KICI_BIND_ADDRESS=127.0.0.1 KICI_AGENT_ID=c-example "$work/kici_agent_example" \
        > "$out" 2> "$work/example.err" &
    local pid=$!
    local ok=1
    http GET "$KICI_E2E_CONTROL_URL/wait_agent?timeoutMs=30000" > /dev/null || ok=0
    local sample='{"runId":"run-ex","jobId":"job-ex","repoUrl":"","ref":"main","sha":"0000000000000000000000000000000000000000","steps":[{"name":"hello","hasOutputs":true}]}'
    [ $ok = 1 ] && { http POST "$KICI_E2E_CONTROL_URL/dispatch" \
        "{\"agentId\":\"c-example\",\"sample\":$sample}" > /dev/null || ok=0; }
    local status=
    [ $ok = 1 ] && { status=$(http GET \
        "$KICI_E2E_CONTROL_URL/wait?type=job.status&state=success&jobId=job-ex&timeoutMs=30000") || ok=0; }
    kill -TERM "$pid"
    wait "$pid"
    local exit_status=$?
    cat "$work/example.err"
    cat "$out"
    [ $ok = 1 ] && [ $exit_status = 0 ] &&
        grep -q '"greeting":"hello from C"' <<< "$status" &&
        grep -q '"type":"job_finished".*"state":"success"' "$out" &&
        grep -q '"type":"stopped"' "$out"
}
export -f run_example http
export work
if [ -x "$work/kici_agent_example" ]; then
    check "example runs a job and drains on SIGTERM" with_mock bash -c run_example
else
    failed=$((failed + 1))
    failed_names+=("example run (not built)")
fi

# ---- summary -------------------------------------------------------------------------------
if [ "$failed" -gt 0 ]; then
    printf 'failed: %s\n' "${failed_names[@]}"
fi
echo "c-tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
