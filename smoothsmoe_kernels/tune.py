"""tune_experts(): the fastest tile config per token bucket, measured, written as a tuned table.

Run by `python -m smoothsmoe_kernels.bench tune` on the GPU the tables are for.
At each token bucket it routes N(0, 1) logits with the smoothed router (eps
calibrated to the default budget), times every candidate of
tile_config.CANDIDATES (and vLLM's default for that T) on the whole
moe_experts_triton call, as CUDA-graph replays up to GRAPH_MAX_T tokens (how
vLLM runs decode) and eagerly above, and keeps the fastest. Every candidate's output is
checked against vLLM's default config's first: a config that computes
something else is an error, not a speed-up.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smoothsmoe_kernels.calibration import calibrate_eps
from smoothsmoe_kernels.config import RoutingConfig
from smoothsmoe_kernels.experts_triton import moe_experts_triton
from smoothsmoe_kernels.routing import route
from smoothsmoe_kernels.tile_config import (
    CANDIDATES,
    TUNED_DIR,
    ExpertsTileConfig,
    default_tile_config,
    device_key,
    save_tile_table,
)
from smoothsmoe_kernels.timing import GRAPH_MAX_T, device_name, graph_time_us, time_us


def tune_experts(
    E: int, K: int, H: int, I: int, dtype: torch.dtype, device: torch.device, tokens: list[int],
    max_extra: int = 2, out_dir: str | Path | None = None,
    candidates: tuple[ExpertsTileConfig, ...] = CANDIDATES, min_time: float = 0.1,
) -> Path:
    """Tune one layer shape on `device`; write and return its table's path."""
    g = torch.Generator().manual_seed(0)
    config = RoutingConfig(top_k=K, max_extra=max_extra)
    eps = calibrate_eps(torch.randn(4096, E, generator=g), config).eps
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
    table: dict[int, ExpertsTileConfig] = {}
    print(f"# tune E={E} K={K} H={H} I={I} {dtype} on {device_name(device)}")
    for T in tokens:
        routed = route(torch.randn(T, E, generator=g), config, eps)
        ids, weights = routed.ids.to(device), routed.weights.to(device)
        x = torch.randn(T, H, generator=g).to(device, dtype)
        default = default_tile_config(T, E)
        expected = moe_experts_triton(x, w13, w2, ids, weights, config=default).float()
        timed: dict[ExpertsTileConfig, float] = {}
        for cfg in dict.fromkeys((default, *candidates)):  # the default first, no repeats
            y = moe_experts_triton(x, w13, w2, ids, weights, config=cfg).float()
            # Same products, another summation order (block_k) and one rounding of h: bf16-sized differences.
            err = ((y - expected).norm() / expected.norm().clamp(min=1e-30)).item()
            if not err < 2e-2:
                raise RuntimeError(f"tile config {cfg} disagrees with vLLM's default at T={T}: "
                                   f"relative error {err:.1e}")
            timed[cfg] = _call_us(lambda c=cfg: moe_experts_triton(x, w13, w2, ids, weights, config=c), T, device,
                                  min_time)
        best = min(timed, key=timed.get)
        table[T] = best
        print(f"T={T:6d} default {timed[default]:9.1f} us  best {timed[best]:9.1f} us  {best}", flush=True)
    return save_tile_table(table, device_key(device), E, H, I, dtype, Path(out_dir) if out_dir else TUNED_DIR)


def _call_us(fn, T: int, device: torch.device, min_time: float) -> float:
    """Microseconds per call as vLLM runs a batch of T tokens: a CUDA-graph replay up to
    GRAPH_MAX_T (decode; eager timing there would rank the configs by host launch cost,
    which a graph does not pay), eager above it (prefill, where the GEMMs dominate)."""
    if device.type == "cuda" and T <= GRAPH_MAX_T:
        us, why = graph_time_us(fn)
        if us is not None:
            return us
        print(f"# CUDA graph capture failed ({why}); timing eagerly", flush=True)
    return time_us(fn, device, min_time=min_time)
