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
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      bash ca-certificates git libssl3 tini zlib1g \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
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
