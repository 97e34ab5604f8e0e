# SmoothSMoE Serve images, installed the way the README says (deploy/install.sh).
#   docker build --target cpu  -t smoothsmoe-serve:cpu  .   # CPU only (vllm-cpu 0.32), embedded default model
#   docker build --target cuda -t smoothsmoe-serve:cuda .   # NVIDIA GPUs (vllm 0.32, torch's CUDA 13.0 build)
# Both run `smoothsmoe serve` as the user smoothsmoe (uid 1000) on port 8000; arguments after
# the image name go to it (a model, vLLM's flags, --smooth-* flags).
#
# Behind a mirror or a TLS-inspecting proxy, give the build what pip needs; it is used by the
# install step only and nothing of it stays in the image:
#   --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt    a CA bundle (pip and the index probe)
#   --secret id=pip,src=$HOME/.config/pip/pip.conf           pip's settings: index-url, extra-index-url, ...
#   --build-arg SMOOTHSMOE_TORCH_INDEX=https://mirror/whl/cpu a mirror of PyTorch's wheel index
# (a build argument is visible in the image's history: keep credentials in the pip.conf secret).
FROM debian:bookworm-slim AS base
# gcc, g++ and Python's headers: torch.compile's C++ code on the CPU (it includes Python.h) and
# Triton's launchers on CUDA are compiled at run time.
# The install folder is made before WORKDIR, which would make it root's, and the build runs as smoothsmoe.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv gcc g++ libnuma1 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 smoothsmoe \
 && install -d -o smoothsmoe -g smoothsmoe /opt/smoothsmoe
WORKDIR /opt/smoothsmoe
COPY --chown=smoothsmoe pyproject.toml README.md ./
COPY --chown=smoothsmoe smoothsmoe_kernels ./smoothsmoe_kernels
COPY --chown=smoothsmoe server ./server
COPY --chown=smoothsmoe deploy/install.sh ./deploy/install.sh
ENV SMOOTHSMOE_CACHE=/home/smoothsmoe/.cache/smoothsmoe \
    PATH=/opt/smoothsmoe/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER smoothsmoe
EXPOSE 8000

# The install step (the same in both targets): the secrets are mounted for it alone, readable by
# uid 1000, and pip keeps no cache. The embedded default model is then built into the image, so
# the container starts without building it.
FROM base AS cpu
ARG SMOOTHSMOE_TORCH_INDEX=
RUN --mount=type=secret,id=ca,uid=1000 --mount=type=secret,id=pip,uid=1000 \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -s /run/secrets/pip ]; then export PIP_CONFIG_FILE=/run/secrets/pip; fi \
 && PIP_NO_CACHE_DIR=1 bash deploy/install.sh cpu serve \
 && python -c "from smoothsmoe_server.models.default_model import ensure_default_model; ensure_default_model()"
ENV VLLM_CPU_KVCACHE_SPACE=4
ENTRYPOINT ["smoothsmoe", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS cuda
ARG SMOOTHSMOE_TORCH_INDEX=
RUN --mount=type=secret,id=ca,uid=1000 --mount=type=secret,id=pip,uid=1000 \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -s /run/secrets/pip ]; then export PIP_CONFIG_FILE=/run/secrets/pip; fi \
 && PIP_NO_CACHE_DIR=1 bash deploy/install.sh cuda serve
ENTRYPOINT ["smoothsmoe", "serve", "--host", "0.0.0.0", "--port", "8000"]
