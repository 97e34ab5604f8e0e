#!/usr/bin/env bash
# Sets up .venv at the repository root with the project and its test tools.
# The README's setup command and CI's .ci/run both use this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: asked for through a range, pip would fetch a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e ".[dev]"
.venv/bin/python -c "import smoothsmoe_kernels, torch; print('installed: torch', torch.__version__)"
