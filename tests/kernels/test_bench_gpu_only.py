"""GPU-only benchmarks say so in one line on a machine without a GPU, and exit non-zero."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the commands run for real there")
@pytest.mark.parametrize("what", ["stages", "tune"])
def test_gpu_only_bench_without_a_gpu_is_one_line_and_exit_2(what):
    run = subprocess.run([sys.executable, "-m", "smoothsmoe_kernels.bench", what], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == f"bench {what}: needs a CUDA GPU (torch sees none here); run it on the GPU machine"
