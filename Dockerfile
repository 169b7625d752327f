# kici-agent container image.
#
#   docker build -t kici-agent .                      # from source (needs BuildKit, Docker >= 23's default)
#   docker build --target prebuilt -t kici-agent DIR  # from a prebuilt binary: DIR holds `kici-agent`
#
# Base images are build arguments, so a machine with no registry access can supply its own
# (scripts/image-test.sh makes a Debian one with debootstrap):
#   --build-arg RUNTIME_IMAGE=...  Debian bookworm or compatible, with apt (default debian:bookworm-slim)
#   --build-arg RUST_IMAGE=...     Rust toolchain with pkg-config and libssl-dev (default rust:1-bookworm)
#
# The test suite (scripts/image-test.sh) builds `--target prebuilt` with a binary built on the
# host: with no image registry reachable there is no RUST_IMAGE to build from source in (README).
#
# Stage order matters for the legacy (non-BuildKit) builder, which builds every stage up to the
# target: `prebuilt` comes before the Rust build so `--target prebuilt` never needs RUST_IMAGE.

ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm

# --- runtime: everything but the binary ------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kici-agent" \
      org.opencontainers.image.description="KiCI CI agent: runs jobs dispatched by a KiCI orchestrator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://example.invalid/kici-agent" \
      org.opencontainers.image.licenses="Apache-2.0"
# git and bash: the agent checks both at start-up (steps run in bash and may call git; checkouts
# use libgit2). tini: PID 1 that forwards signals to the agent and reaps orphaned step processes.
# libssl3 and zlib1g: the binary links them (libgit2's https and compression).
#
# Trimmed for size (README, "Image size"):
# - no perl (~47 MB): a stand-in package, made here with dpkg-deb, provides `perl` and
#   `liberror-perl` to git's dependencies, so apt never installs them. Only git's commands
#   written in perl need it (send-email, svn, cvsimport/cvsserver, archimport); a derived image
#   gets them back with `apt-get install perl`, which the stand-in does not block.
# - no git programs a CI job does not run, left out by dpkg path-exclude (so upgrades keep them
#   out too): the servers (daemon, http-backend, shell), imap-send, dumb-HTTP push/fetch,
#   scalar, gitweb. Clones and fetches over https/ssh/git are untouched (git-remote-http stays).
# - no downloaded .debs (the base may lack the official images' apt `docker-clean` hook).
RUN printf 'path-exclude %s\n' \
      /usr/lib/git-core/git-daemon /usr/lib/git-core/git-http-backend \
      /usr/lib/git-core/git-shell /usr/lib/git-core/git-imap-send \
      /usr/lib/git-core/git-http-push /usr/lib/git-core/git-http-fetch \
      /usr/lib/git-core/scalar /usr/bin/scalar /usr/bin/git-shell '/usr/share/gitweb/*' \
      >/etc/dpkg/dpkg.cfg.d/kici-agent-slim \
 && mkdir -p /tmp/no-perl/DEBIAN \
 && printf '%s\n' 'Package: kici-agent-no-perl' 'Version: 1' 'Architecture: all' \
      'Maintainer: kici-agent <kici-agent@example.invalid>' 'Provides: perl, liberror-perl' \
      'Description: stands in for perl in the kici-agent image' \
      ' Satisfies git'"'"'s dependency on perl; install perl for git'"'"'s perl commands.' \
      >/tmp/no-perl/DEBIAN/control \
 && dpkg-deb --build /tmp/no-perl /tmp/no-perl.deb >/dev/null \
 && dpkg -i /tmp/no-perl.deb >/dev/null \
 && rm -rf /tmp/no-perl /tmp/no-perl.deb \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      bash ca-certificates git libssl3 tini zlib1g \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
      /var/cache/debconf/*-old
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it and volume ownership is known.
# Job workspaces go under TMPDIR, which the agent's user owns.
RUN groupadd --system --gid 10001 kici \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/kici-agent --shell /usr/sbin/nologin kici \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/kici-agent /var/lib/kici-agent/work
ENV HOME=/var/lib/kici-agent \
    TMPDIR=/var/lib/kici-agent/work \
    KICI_PORT=8080
WORKDIR /var/lib/kici-agent
USER 10001:10001
EXPOSE 8080
# SIGTERM = graceful shutdown: running jobs get KICI_SHUTDOWN_GRACE_MS (10 s) before they are
# killed, so give `docker stop -t` / stop_grace_period / terminationGracePeriodSeconds more.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["kici-agent", "health"]
ENTRYPOINT ["/usr/bin/tini", "--", "kici-agent"]

# --- prebuilt: the runtime plus a binary built elsewhere (scripts/release.sh, CI) --------------
FROM runtime AS prebuilt
COPY kici-agent /usr/local/bin/kici-agent
RUN ["kici-agent", "--version"]

# --- build: the binary from source -------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kici-agent-cli \
 && mkdir -p /out \
 && strip -o /out/kici-agent target/release/kici-agent

# --- default: the runtime plus the binary built from source ----------------------------------
FROM runtime AS image
COPY --from=build /out/kici-agent /usr/local/bin/kici-agent
RUN ["kici-agent", "--version"]
