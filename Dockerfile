# syntax=docker/dockerfile:1.7
# The two images of charlm, from one build context (the repository root):
#   docker build --target operator -t charlm-operator:dev .
#   docker build --target trainer  -t charlm-trainer:dev .
# Both run as non-root users: the operator as 65532 (distroless "nonroot"), the trainer as 1000,
# the uid the operator's worker pods demand (runAsUser: 1000, fsGroup: 1000).

ARG RUST_VERSION=1.95
ARG TORCH_VERSION=2.11.0
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ---- operator ------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS operator-build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p charlm-operator \
 && cp target/release/charlm-operator /usr/local/bin/charlm-operator

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=operator-build /usr/local/bin/charlm-operator /usr/local/bin/charlm-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/charlm-operator"]
CMD ["run"]

# ---- trainer -------------------------------------------------------------------------------
# libtorch comes from PyPI's torch wheel (CUDA 13, cuDNN and NCCL arrive as its nvidia-* wheels),
# installed once and shared by the build and the runtime stage at the same path, so the rpath the
# trainer's build.rs writes stays valid.
FROM ubuntu:24.04 AS torch
ARG TORCH_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir --disable-pip-version-check "torch==${TORCH_VERSION}"

FROM torch AS trainer-build
ARG RUST_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential curl pkg-config \
 && rm -rf /var/lib/apt/lists/*
# Headers the trainer's C++ bridge compiles against and nvcc for its fused CUDA kernels (the same
# list as scripts/setup; without nvcc the build warns and the image falls back to eager kernels).
RUN /opt/torch/bin/pip install --no-cache-dir --disable-pip-version-check \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*"
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
ENV PATH=/opt/torch/bin:/opt/cargo/bin:$PATH VIRTUAL_ENV=/opt/torch LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/opt/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p charlm-trainer \
 && cp target/release/charlm-trainer /usr/local/bin/charlm-trainer

FROM ${CUDA_RUNTIME_IMAGE} AS trainer
COPY --from=torch /opt/torch /opt/torch
COPY --from=trainer-build /usr/local/bin/charlm-trainer /usr/local/bin/charlm-trainer
ENV LD_LIBRARY_PATH=/opt/torch/lib/python3.12/site-packages/torch/lib
# Ubuntu 24.04 ships a user "ubuntu" with uid 1000; the trainer's user takes that uid instead.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 charlm \
 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin charlm
USER 1000:1000
WORKDIR /home/charlm
EXPOSE 9090 29500
ENTRYPOINT ["/usr/local/bin/charlm-trainer"]
CMD ["--help"]
