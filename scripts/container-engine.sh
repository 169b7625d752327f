#!/bin/sh
# A private container engine (Docker Engine API on a unix socket) for the container executor's
# integration tests, with a local busybox image: no registry is needed or reachable here.
#
#   sh scripts/container-engine.sh start DIR   # prints DOCKER_HOST=unix://DIR/docker.sock
#   sh scripts/container-engine.sh stop DIR
#
# ENGINE=docker (default: Debian's docker.io dockerd) or ENGINE=podman (podman's Docker-compatible
# service). Everything the engine keeps (data, exec root, pid file, log) lives under DIR, which
# must be short: containerd's sockets go under DIR/exec and unix socket paths are limited to 107
# bytes. Needs root (apt-get, dockerd). Facts behind the choices: shared/notes/containers.md.
set -eu

ENGINE=${ENGINE:-docker}   # `stop` uses the engine `start` recorded in DIR
IMAGE=${KICI_TEST_IMAGE:-kici-test/busybox:latest}

die() { echo "container-engine: $*" >&2; exit 1; }

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }

[ $# -eq 2 ] || usage
ACTION=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
# dockerd puts containerd's sockets under DIR/exec; longer paths fail to bind.
[ ${#DIR} -le 60 ] || die "DIR must be at most 60 characters (unix socket paths are short): $DIR"
SOCK=$DIR/docker.sock
PIDFILE=$DIR/engine.pid
LOG=$DIR/engine.log

api() { curl -sS --unix-socket "$SOCK" "$@"; }

ping_ok() { [ "$(curl -s --max-time 2 --unix-socket "$SOCK" http://d/_ping 2>/dev/null)" = OK ]; }

engine_alive() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

# Installs only what is missing, so a machine that has the packages needs no network.
install_packages() {
  case $ENGINE in
    # --no-install-recommends keeps cgroupfs-mount and needrestart out (not needed).
    docker) needed="docker.io busybox-static"; commands="dockerd busybox curl" ;;
    # runc: crun 1.8 fails on this VM's hybrid cgroup layout; netavark: the bridge backend.
    podman) needed="podman runc catatonit netavark aardvark-dns iptables busybox-static"; commands="podman runc busybox curl" ;;
    *) die "unknown ENGINE=$ENGINE (docker or podman)" ;;
  esac
  missing=
  for c in $commands; do command -v "$c" >/dev/null 2>&1 || missing=yes; done
  [ -z "$missing" ] && return 0
  command -v curl >/dev/null 2>&1 || needed="$needed curl"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >"$DIR/apt.log" 2>&1 || { cat "$DIR/apt.log" >&2; die "apt-get update failed"; }
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $needed >>"$DIR/apt.log" 2>&1 \
    || { tail -n 30 "$DIR/apt.log" >&2; die "apt-get install $needed failed"; }
}

# Podman asks for rlimits above this VM's hard limits (no CAP_SYS_RESOURCE) unless told.
configure_podman() {
  [ -f /etc/containers/containers.conf ] && return 0
  nofile=$(awk '/^Max open files/ {print $5}' /proc/self/limits)
  nproc=$(awk '/^Max processes/ {print $4}' /proc/self/limits)
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  [ "$nofile" = unlimited ] && nofile=1048576
  mkdir -p /etc/containers
  cat >/etc/containers/containers.conf <<CONF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
exit_command_delay = 10
CONF
}

start_engine() {
  rm -f "$SOCK"
  case $ENGINE in
    docker)
      dockerd --host "unix://$SOCK" --data-root "$DIR/data" --exec-root "$DIR/exec" \
        --pidfile "$DIR/dockerd.pid" >"$LOG" 2>&1 &
      ;;
    podman)
      podman --root "$DIR/storage" --runroot "$DIR/run" system service --time=0 "unix://$SOCK" >"$LOG" 2>&1 &
      ;;
  esac
  echo $! >"$PIDFILE"
  echo "$ENGINE" >"$DIR/engine"
  tries=0
  until ping_ok; do
    engine_alive || { tail -n 30 "$LOG" >&2; undo_start; die "$ENGINE exited before answering on $SOCK (log: $LOG)"; }
    tries=$((tries + 1))
    [ $tries -lt 300 ] || { tail -n 30 "$LOG" >&2; undo_start; die "$ENGINE did not answer _ping on $SOCK within 30 s (log: $LOG)"; }
    sleep 0.1
  done
}

# A failed start leaves nothing running or mounted.
undo_start() {
  kill "$(cat "$PIDFILE")" 2>/dev/null || true
  rm -f "$PIDFILE"
  unmount_under_dir
}

# Podman leaves a conmon per exec behind for exit_command_delay (10 s), which then runs a
# `podman container cleanup` that mounts DIR's storage again: wait for them (they name it).
wait_for_helpers() {
  tries=0
  while [ $tries -lt 200 ]; do
    # Listed before grep starts, so grep does not find its own pattern.
    set -- /proc/[0-9]*/cmdline
    grep -lsaF "$DIR/storage" "$@" | grep -qv "^/proc/$$/" || return 0
    sleep 0.1
    tries=$((tries + 1))
  done
}

# Engines bind-mount their storage onto itself and do not always undo it when they stop.
unmount_under_dir() {
  for mount in $(awk -v dir="$DIR/" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts | sort -r); do
    umount "$mount" 2>/dev/null || true
  done
}

# The whole image is a static busybox (2 MB): /bin/sh and its applets, imported through the
# Docker API (POST /images/create?fromSrc=-), the same call on dockerd and podman.
import_image() {
  api "http://d/images/$IMAGE/json" 2>/dev/null | grep -q '"Id"' && return 0
  rootfs=$(mktemp -d)
  mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/root" "$rootfs/workspace"
  chmod 1777 "$rootfs/tmp"
  cp "$(command -v busybox)" "$rootfs/bin/busybox"
  # Relative links: `busybox --install -s` would point them at host paths.
  for applet in $("$rootfs/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
  echo 'root:x:0:' >"$rootfs/etc/group"
  repo=${IMAGE%:*}
  tag=${IMAGE##*:}
  tar -C "$rootfs" -c . | api -X POST -H 'Content-Type: application/x-tar' --data-binary @- \
    "http://d/images/create?fromSrc=-&repo=$repo&tag=$tag&changes=CMD%20%5B%22%2Fbin%2Fsh%22%5D&changes=ENV%20PATH%3D%2Fbin" \
    >"$DIR/import.log" 2>&1 || true
  rm -rf "$rootfs"
  api "http://d/images/$IMAGE/json" 2>/dev/null | grep -q '"Id"' \
    || { cat "$DIR/import.log" >&2; die "importing $IMAGE failed"; }
}

start() {
  started=$(date +%s)
  if engine_alive && ping_ok; then
    echo "container-engine: already running (pid $(cat "$PIDFILE"))" >&2
  else
    [ "$(id -u)" = 0 ] || die "needs root (apt-get, $ENGINE)"
    install_packages
    [ "$ENGINE" = podman ] && configure_podman
    start_engine
  fi
  import_image
  echo "container-engine: $ENGINE ready on $SOCK with $IMAGE in $(( $(date +%s) - started )) s" >&2
  echo "DOCKER_HOST=unix://$SOCK"
}

stop() {
  [ -f "$DIR/engine" ] && ENGINE=$(cat "$DIR/engine")
  if ping_ok; then
    for id in $(api "http://d/containers/json?all=true" | grep -o '"Id":"[0-9a-f]*"' | cut -d'"' -f4); do
      api -X DELETE "http://d/containers/$id?force=true&v=true" >/dev/null || true
    done
  fi
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    tries=0
    while kill -0 "$pid" 2>/dev/null && [ $tries -lt 150 ]; do sleep 0.1; tries=$((tries + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
      echo "container-engine: $ENGINE (pid $pid) ignored SIGTERM for 15 s; killing it" >&2
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
  fi
  rm -f "$SOCK"
  [ "$ENGINE" = podman ] && wait_for_helpers
  unmount_under_dir
  echo "container-engine: stopped" >&2
}

case $ACTION in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
