#!/bin/sh
# Makes a Debian base image with no image registry: debootstrap a minbase rootfs from the
# machine's own apt source, slim it the way the official `-slim` images are, and import it into
# a Docker engine. The project's Dockerfile then builds on it through its base-image build args.
#
#   sh scripts/image-base.sh DOCKER_HOST NAME    # e.g. unix:///tmp/x/docker.sock kici-test/debian:bookworm
#
# The rootfs tarball is cached (KICI_BASE_CACHE, default /var/cache/kici-agent/bases) under a key
# made of this recipe, so a changed recipe never reuses an old base. A tarball enters the cache
# only complete (written beside it, checked, then renamed), makers serialise on a lock, and a
# reader re-checks the recorded sha256 before using it. Needs root (debootstrap, chroot).
set -eu

die() { echo "image-base: $*" >&2; exit 1; }
[ $# -eq 2 ] || { echo "usage: $0 DOCKER_HOST NAME" >&2; exit 2; }
ENGINE=$1
NAME=$2
SUITE=${KICI_BASE_SUITE:-bookworm}
CACHE=${KICI_BASE_CACHE:-/var/cache/kici-agent/bases}

# The first deb.debian.org-style source of the apt configuration (one-line or deb822 format).
mirror() {
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && awk '$1 == "deb" && $2 !~ /^\[/ && $2 !~ /security/ { print $2; exit }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' "$f"
  done
}
MIRROR=${KICI_BASE_MIRROR:-$(mirror | head -n 1)}
[ -n "$MIRROR" ] || die "no Debian source in the apt configuration; set KICI_BASE_MIRROR"

# Everything that shapes the tarball goes into its cache key.
SLIM_EXCLUDES='path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*'
KEY=$(printf '%s\n' "recipe 1" "$SUITE" "$MIRROR" "minbase" "$SLIM_EXCLUDES" | sha256sum | cut -c1-16)
TARBALL=$CACHE/debian-$SUITE-minbase-$KEY.tar

make_tarball() {
  command -v debootstrap >/dev/null 2>&1 || {
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap; } >/dev/null \
      || die "apt-get install debootstrap failed"
  }
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  started=$(date +%s)
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; rm -rf "$rootfs" "$rootfs.log"; die "debootstrap failed"; }
  # What the official slim images do: no docs, man pages or locales now or in later installs.
  printf '%s\n' "$SLIM_EXCLUDES" >"$rootfs/etc/dpkg/dpkg.cfg.d/slim"
  rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/*
  partial=$TARBALL.partial.$$
  tar --numeric-owner -C "$rootfs" -cf "$partial" .
  rm -rf "$rootfs" "$rootfs.log"
  tar -tf "$partial" ./usr/bin/bash ./usr/bin/apt-get >/dev/null 2>&1 || { rm -f "$partial"; die "made an incomplete rootfs"; }
  sha256sum "$partial" | cut -d' ' -f1 >"$TARBALL.sha256"
  mv "$partial" "$TARBALL"
  echo "image-base: debootstrap $SUITE from $MIRROR in $(( $(date +%s) - started )) s" >&2
}

cached_ok() {
  [ -f "$TARBALL" ] && [ -f "$TARBALL.sha256" ] \
    && [ "$(sha256sum "$TARBALL" | cut -d' ' -f1)" = "$(cat "$TARBALL.sha256")" ]
}

mkdir -p "$CACHE"
# One maker at a time; a reader waits for a maker in progress instead of seeing half a file.
exec 9>"$CACHE/.lock"
flock 9
if ! cached_ok; then
  rm -f "$TARBALL" "$TARBALL.sha256"
  make_tarball
fi
started=$(date +%s)
DOCKER_HOST=$ENGINE docker import \
  --change 'CMD ["/bin/bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  "$TARBALL" "$NAME" >/dev/null || die "docker import of $TARBALL failed"
flock -u 9
echo "image-base: imported $NAME in $(( $(date +%s) - started )) s" >&2
