"""tune_experts(): the fastest tile config per token bucket, measured, written as a tuned table.

Run by `python -m smoothsmoe_kernels.bench tune` on the GPU the tables are for.
At each token bucket it routes N(0, 1) logits with the smoothed router (eps
calibrated to the default budget), times every candidate of
tile_config.CANDIDATES (and vLLM's default for that T) on the whole
moe_experts_triton call, as CUDA-graph replays up to GRAPH_MAX_T tokens (how
vLLM runs decode) and eagerly above, and keeps the fastest. Every candidate's output is
checked against vLLM's default config's first: a config that computes
something else is an error, not a speed-up. With block_shape it tunes the FP8
block-quantized kernel (the weights quantized per block, tile_config.FP8_CANDIDATES
against vLLM's block-wise FP8 defaults) and writes an FP8 table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from smoothsmoe_kernels.calibration import calibrate_eps
from smoothsmoe_kernels.config import RoutingConfig
from smoothsmoe_kernels.experts_triton import moe_experts_triton
from smoothsmoe_kernels.fp8_blocks import quantize_weight_blocks
from smoothsmoe_kernels.routing import route
from smoothsmoe_kernels.tile_config import (
    CANDIDATES,
    FP8_CANDIDATES,
    TUNED_DIR,
    ExpertsTileConfig,
    default_fp8_tile_config,
    default_tile_config,
    device_key,
    is_sm90,
    save_tile_table,
)
from smoothsmoe_kernels.timing import GRAPH_MAX_T, device_name, graph_time_us, time_us


def tune_experts(
    E: int, K: int, H: int, I: int, dtype: torch.dtype, device: torch.device, tokens: list[int],
    max_extra: int = 2, out_dir: str | Path | None = None,
    candidates: tuple[ExpertsTileConfig, ...] | None = None, min_time: float = 0.1,
    block_shape: tuple[int, int] | None = None,
) -> Path:
    """Tune one layer shape on `device` (FP8 block-quantized with block_shape); write and return its table's path."""
    g = torch.Generator().manual_seed(0)
    config = RoutingConfig(top_k=K, max_extra=max_extra)
    eps = calibrate_eps(torch.randn(4096, E, generator=g), config).eps
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
    quant = {}
    if block_shape is not None:
        (w13, s13), (w2, s2) = quantize_weight_blocks(w13, block_shape), quantize_weight_blocks(w2, block_shape)
        quant = dict(w13_scale=s13, w2_scale=s2, block_shape=block_shape)
        candidates = tuple(dataclasses.replace(c, block_k=block_shape[1]) for c in candidates or FP8_CANDIDATES)
    table: dict[int, ExpertsTileConfig] = {}
    print(f"# tune E={E} K={K} H={H} I={I} {dtype}{f' fp8 blocks {block_shape}' if quant else ''}"
          f" on {device_name(device)}")
    for T in tokens:
        routed = route(torch.randn(T, E, generator=g), config, eps)
        ids, weights = routed.ids.to(device), routed.weights.to(device)
        x = torch.randn(T, H, generator=g).to(device, dtype)
        default = (default_fp8_tile_config(T, E, block_shape, is_sm90(device)) if quant
                   else default_tile_config(T, E))
        expected = moe_experts_triton(x, w13, w2, ids, weights, config=default, **quant).float()
        timed: dict[ExpertsTileConfig, float] = {}
        for cfg in dict.fromkeys((default, *(candidates or CANDIDATES))):  # the default first, no repeats
            y = moe_experts_triton(x, w13, w2, ids, weights, config=cfg, **quant).float()
            # Same products, another summation order (block_k) and one rounding of h: bf16-sized
            # differences (FP8: and h's quantization flipping one step in a few elements).
            err = ((y - expected).norm() / expected.norm().clamp(min=1e-30)).item()
            if not err < 2e-2:
                raise RuntimeError(f"tile config {cfg} disagrees with vLLM's default at T={T}: "
                                   f"relative error {err:.1e}")
            timed[cfg] = _call_us(lambda c=cfg: moe_experts_triton(x, w13, w2, ids, weights, config=c, **quant),
                                  T, device, min_time)
        best = min(timed, key=timed.get)
        table[T] = best
        print(f"T={T:6d} default {timed[default]:9.1f} us  best {timed[best]:9.1f} us  {best}", flush=True)
    return save_tile_table(table, device_key(device), E, H, I, dtype, Path(out_dir) if out_dir else TUNED_DIR,
                           block_shape)


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
