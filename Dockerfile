# The two images of charlm, from one build context (the repository root):
#   DOCKER_BUILDKIT=1 docker build --target operator -t charlm-operator:dev .
#   DOCKER_BUILDKIT=1 docker build --target trainer  -t charlm-trainer:dev .
# Both run as non-root users: the operator as 65532 (distroless "nonroot"), the trainer as 1000,
# the uid the operator's worker pods demand (runAsUser: 1000, fsGroup: 1000).
#
# Every base is a build argument whose default is a public image, so a machine with Docker Hub and
# gcr.io builds this file unchanged; e2e/images/build makes local stand-ins for them from Debian's
# packages (for machines that reach no registry) and passes them as --build-arg. No `# syntax=`
# line: it would pull a frontend image; the builder built into Docker (20.10+) runs this file,
# cache mounts included.
#
#   DEBIAN_IMAGE  Debian with apt: the trainer's base (python3 + the torch wheel) and the build stage
#   RUST_IMAGE    where the Rust toolchain comes from: /usr/local/cargo and /usr/local/rustup, as
#                 the official rust images lay them out (copied, never downloaded with curl)
#   STATIC_IMAGE  the operator's base: glibc and libgcc only, a "nonroot" user 65532 (distroless)
#   BINARIES      where the two binaries come from: `build` (the default) is the stage below that
#                 compiles them from this context; any other value is an image holding
#                 /usr/local/bin/charlm-trainer and /usr/local/bin/charlm-operator, built for the
#                 same Debian release (e2e/images/build --binaries DIR makes one from a host build,
#                 so CI compiles Rust once, not twice; BuildKit then skips the build stage)
# DEBIAN_IMAGE and STATIC_IMAGE must be the same Debian release (glibc), as the defaults are.

ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG STATIC_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG TORCH_VERSION=2.11.0
ARG BINARIES=build

FROM ${RUST_IMAGE} AS rust

# ---- torch: python3 and PyPI's torch wheel in /opt/torch --------------------------------------
# libtorch comes from the torch wheel (CUDA 13, cuDNN and NCCL arrive as its nvidia-* wheels). The
# build stage and the trainer image both start from this stage, so libtorch sits at the same path
# in both and the rpath the trainer's build.rs writes holds, whatever python version the base has.
FROM ${DEBIAN_IMAGE} AS torch
ARG TORCH_VERSION
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The pip cache is a cache mount: a rebuild (another base, a changed Dockerfile) does not download
# the ~3 GB of wheels again.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --disable-pip-version-check "torch==${TORCH_VERSION}"
# The dynamic linker finds libtorch (and the nvidia-* libraries it loads through its own rpath)
# from its cache: no LD_LIBRARY_PATH naming a python version, valid on any base.
RUN /opt/torch/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' \
      >/etc/ld.so.conf.d/charlm-torch.conf \
 && ldconfig

# ---- build: both binaries ---------------------------------------------------------------------
FROM torch AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      gcc g++ libc6-dev make pkg-config \
 && rm -rf /var/lib/apt/lists/*
# Headers the trainer's C++ bridge compiles against and nvcc for its fused CUDA kernels (the same
# list as scripts/setup; without nvcc the build warns and the image falls back to eager kernels).
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/torch/bin/pip install --disable-pip-version-check \
      "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*"
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \
    PATH=/opt/torch/bin:/usr/local/cargo/bin:$PATH VIRTUAL_ENV=/opt/torch LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
# The crate registry and the target folder are cache mounts: a rebuild after a source change
# recompiles only what changed (the first build compiles everything, ~15 min on 2 cores).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p charlm-trainer -p charlm-operator \
 && cp target/release/charlm-trainer target/release/charlm-operator /usr/local/bin/
# The release profile keeps debug info (for profiling); the images do without it (the operator's
# binary shrinks from ~100 MB to ~20 MB).
RUN strip --strip-debug /usr/local/bin/charlm-trainer /usr/local/bin/charlm-operator

# ---- binaries: the build stage, or an image of the two binaries built elsewhere -----------------
FROM ${BINARIES} AS binaries

# ---- operator ---------------------------------------------------------------------------------
FROM ${STATIC_IMAGE} AS operator
COPY --from=binaries /usr/local/bin/charlm-operator /usr/local/bin/charlm-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/charlm-operator"]
CMD ["run"]

# ---- trainer ----------------------------------------------------------------------------------
# Runs with a read-only root file system: it writes only to the volumes the operator mounts
# (/work, /checkpoints, /dev/shm). NVIDIA_* tell the NVIDIA container runtime to give the
# container the GPUs and the driver's compute libraries (the CUDA runtime itself is in the wheels).
FROM torch AS trainer
COPY --from=binaries /usr/local/bin/charlm-trainer /usr/local/bin/charlm-trainer
RUN groupadd --gid 1000 charlm \
 && useradd --uid 1000 --gid 1000 --home-dir /work --no-create-home --shell /usr/sbin/nologin charlm \
 && mkdir -p /work && chown 1000:1000 /work
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/work PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /work
EXPOSE 9090 29500
ENTRYPOINT ["/usr/local/bin/charlm-trainer"]
CMD ["--help"]
