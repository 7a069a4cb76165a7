# syntax=docker/dockerfile:1
# sluice: the CLI and the four service binaries on debian:bookworm-slim.
#   docker build -t sluice:dev .          (`just image`)
#   docker run --rm sluice:dev sluice demo
# The Kubernetes manifests (k8s/) run sluice-source, sluice-enrich,
# sluice-window and sluice-sink from this image with --config FILE.

# Base images, fully qualified (podman has no default registry); override
# them for a mirror: --build-arg RUST_IMAGE=... --build-arg RUNTIME_IMAGE=...
ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# rdkafka 0.39 is built with default features off and only "tokio" (the
# workspace Cargo.toml): rdkafka-sys compiles its bundled librdkafka 2.12
# with librdkafka's own ./configure and make (not cmake), without SSL,
# SASL/GSSAPI, zlib, zstd or curl, and links it statically. So the build
# needs a C compiler, make and pkg-config only: no cmake, no libssl-dev or
# libsasl2-dev. The rust image has them; they are named here so that a
# slimmer base fails at this step. No capnp: the Cap'n Proto code is checked
# in (services/model/src/generated/); no protoc: enrich's gRPC code is
# compiled by protox, in Rust.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build directory between builds, so
# the binaries are copied out in the same step. No debug info in the image:
# the workspace's line tables (and librdkafka's -g) are three quarters of
# each binary (62 MB -> 15 MB for sluice-enrich); a panic still names its
# file and line, and a backtrace its functions.
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --workspace --bins --locked \
 && mkdir -p /out \
 && cp target/release/sluice target/release/sluice-source target/release/sluice-enrich \
       target/release/sluice-window target/release/sluice-sink /out/

FROM ${RUNTIME_IMAGE}
# The binaries link only libc, libm and libgcc_s (librdkafka is static and
# without TLS; PostgreSQL is spoken without TLS), all in the base image:
# nothing to install. The check below fails the build, not a pod, if that
# ever changes.
COPY --from=build /out/ /usr/local/bin/
RUN groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sluice --no-create-home \
      --shell /usr/sbin/nologin sluice \
 && mkdir -p /var/lib/sluice \
 && chown 10001:10001 /var/lib/sluice \
 && for b in sluice sluice-source sluice-enrich sluice-window sluice-sink; do \
      if ldd "/usr/local/bin/$b" | grep -q 'not found'; then ldd "/usr/local/bin/$b"; exit 1; fi; \
      "/usr/local/bin/$b" --version; \
    done
USER 10001:10001
# service.state_dir ("state" by default) is relative to it; the manifests
# mount the state volume at /var/lib/sluice/state.
WORKDIR /var/lib/sluice
# 9090: service.listen (/metrics, /healthz, /readyz; the sink's table API).
# 50051: grpc.listen (sluice-enrich's gRPC API).
EXPOSE 9090 50051
# No entrypoint: the pod names the binary (command: ["sluice-enrich"]).
CMD ["sluice", "--help"]
