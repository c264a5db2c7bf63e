# syntax=docker/dockerfile:1
#
# Hearth's container image for machines with Docker (BuildKit) and access to base images:
#
#   docker build -t hearth:$(awk -F'"' '/^version/{print $2; exit}' Cargo.toml) \
#     --build-arg VERSION=$(awk -F'"' '/^version/{print $2; exit}' Cargo.toml) \
#     --build-arg REVISION=$(git rev-parse HEAD) .
#
# Without Docker or a registry, scripts/build-image.sh builds the same image from the Debian
# package mirror with mmdebstrap and umoci. Keep the two in step: binaries at
# /usr/local/bin/hearth and /usr/local/bin/hearth-controller, Debian bookworm with
# ca-certificates, entrypoint `hearth`, command `agent`, the same labels (plus base.name here, where there is
# a base image). (The script's base
# is mmdebstrap's `essential` variant, which is debian:bookworm-slim without apt.)
#
# No USER: the agent needs root (NVML, MIG, BPF, the kubelet's sockets); the Helm chart sets
# a non-root user for the controller.

ARG RUST_VERSION=1.95
ARG DEBIAN_SUITE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_SUITE} AS build
# clang compiles the agent's BPF programs (agent/build.rs); mold is the linker that
# .cargo/config.toml names.
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang mold \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The DaemonSet's agent is built without local mode (no embedded controller); the controller
# is its own crate. Two invocations because features are per package. The release profile's
# line tables are most of each binary (with them the image unpacks to 353 MB, without them
# 122 MB): they stay out of the image and symbols stay in, so backtraces still name
# functions, as in scripts/build-image.sh.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hearth-agent --no-default-features --bin hearth \
 && cargo build --release --locked -p hearth-controller --bin hearth-controller \
 && install -D -m 0755 -t /out/usr/local/bin target/release/hearth target/release/hearth-controller \
 && objcopy --strip-debug /out/usr/local/bin/hearth \
 && objcopy --strip-debug /out/usr/local/bin/hearth-controller

# Same Debian release as the build stage, so the binaries find the glibc they were linked
# against.
FROM debian:${DEBIAN_SUITE}-slim
ARG DEBIAN_SUITE
ARG VERSION=unknown
ARG REVISION=unknown
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old
COPY --from=build /out/ /
LABEL org.opencontainers.image.title="hearth" \
      org.opencontainers.image.description="Hearth node agent (hearth) and controller (hearth-controller)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/hearth-dev/hearth" \
      org.opencontainers.image.base.name="debian:${DEBIAN_SUITE}-slim"
ENTRYPOINT ["/usr/local/bin/hearth"]
CMD ["agent"]
