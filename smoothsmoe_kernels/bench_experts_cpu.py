"""bench experts on the CPU: a smoothed layer's experts on vLLM's CPU kernel, padded or on active pairs only.

vLLM's CPU experts op (torch.ops._C.cpu_fused_moe, which vllm/model_executor/
layers/fused_moe/experts/cpu_moe.py calls) computes every slot it is given: it
cannot skip an inactive one (an id of -1 indexes its per-expert counts out of
bounds; a weight-0 slot goes through both GEMMs). For each layer shape and T,
in one process, on the same inputs, in blocks of calls:
  stock      the op at the model's top-k: the layer without smoothing
  padded     the op at width k + max_extra, inactive slots as the token's
             top-1 expert at weight 0: what a smoothed layer runs today
  by width   experts_by_width.moe_experts_by_width over the op: one call per
             active width, each token with exactly its active slots
  torch      experts.moe_experts_torch, the reference (T <= 256: it is slow)
x: the time over stock's; goal: 1 + extra pairs / base pairs, what active
pairs would cost at stock's price per pair. vLLM is imported here only,
lazily; without it there is nothing to time and the bench says so.
"""

from __future__ import annotations

import statistics

import torch

from smoothsmoe_kernels.calibration import DEFAULT_BUDGET, calibrate_eps
from smoothsmoe_kernels.config import RoutingConfig
from smoothsmoe_kernels.experts import moe_experts_torch
from smoothsmoe_kernels.experts_by_width import moe_experts_by_width
from smoothsmoe_kernels.routing import route
from smoothsmoe_kernels.timing import cpu_clock, device_name

TOKENS = (1, 16, 256, 2048, 8192)
# name: (E, K, H, I): the default model's layer, and one of OLMoE's proportions at half its width (the real
# sizes of MODEL_SHAPES take gigabytes a layer, more than a small CPU box holds beside its other work)
SHAPES = {"default model": (16, 4, 256, 128), "OLMoE / 2": (64, 8, 1024, 512)}


def bench_experts_cpu(dtype: torch.dtype, max_extra: int) -> None:
    try:
        from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
    except ImportError as e:
        print(f"# experts on the CPU: vLLM's CPU experts op is not importable here ({e}): nothing to time")
        return
    # vLLM picks the AMX kernel for bfloat16 where the CPU has AMX; a process must ask the kernel for AMX
    # state first (torch does it on its first AMX matmul, vLLM's op does not)
    isa = "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() and torch._C._cpu._init_amx() else "vec"
    clock, clock_name = cpu_clock()
    print(f"# experts: {device_name(torch.device('cpu'))}  torch {torch.__version__}  {dtype}  vLLM op isa={isa}  "
          f"max_extra={max_extra}; eps calibrated to {DEFAULT_BUDGET} extras/token; us: medians, {clock_name}")
    print(f"{'layer':>14} {'T':>5} {'stock us':>9} {'padded us':>10} {'x':>5} {'by width':>9} {'x':>5} "
          f"{'torch us':>9} {'x':>6} {'goal':>5}")
    g = torch.Generator().manual_seed(0)
    for name, (E, K, H, I) in SHAPES.items():
        config = RoutingConfig(top_k=K, max_extra=max_extra)
        eps = calibrate_eps(torch.randn(16384, E, generator=g), config).eps
        w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
        w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
        packed = cpu_prepack_moe_weight(w13, isa), cpu_prepack_moe_weight(w2, isa)

        def op(out, x, weights, ids, packed=packed):
            cpu_fused_moe(out, x, *packed, None, None, weights, ids, "silu", isa)

        def call(x, weights, ids, op=op):
            out = torch.empty_like(x)
            op(out, x, weights, ids)
            return out

        for T in TOKENS:
            scores = torch.randn(T, E, generator=g)
            x = torch.randn(T, H, generator=g).to(dtype)
            stock, smooth = route(scores, config, 0.0), route(scores, config, eps)
            us = _blocked_us(_variants(x, stock, smooth, K, call, op, (w13, w2) if T <= 256 else None), clock,
                             calls=max(3, min(50, 4000 // T)))
            pairs = int((smooth.ids >= 0).sum())
            goal = pairs / (T * K)
            line = (f"{name:>14} {T:>5} {us[0]:9.1f} {us[1]:10.1f} {us[1] / us[0]:5.2f} {us[2]:9.1f} "
                    f"{us[2] / us[0]:5.2f}")
            line += f" {us[3]:9.1f} {us[3] / us[0]:6.2f}" if len(us) > 3 else f" {'-':>9} {'-':>6}"
            print(line + f" {goal:5.2f}", flush=True)


def _variants(x, stock, smooth, K: int, call, op, torch_weights) -> list:
    """The calls timed for one T: stock, padded, by width, and the torch reference if its weights are given."""
    stock_ids, stock_w = stock.ids[:, :K].contiguous(), stock.weights[:, :K].contiguous()
    padded_ids = torch.where(smooth.ids >= 0, smooth.ids, smooth.ids[:, :1])
    fns = [lambda: call(x, stock_w, stock_ids), lambda: call(x, smooth.weights, padded_ids),
           lambda: moe_experts_by_width(x, smooth.ids, smooth.weights, K, op)]
    if torch_weights is not None:
        fns.append(lambda: moe_experts_torch(x, *torch_weights, smooth.ids, smooth.weights))
    return fns


def _blocked_us(fns, clock, calls: int, rounds: int = 5) -> list[float]:
    """Median microseconds per call of each of `fns`, timed in blocks of `calls` calls, block after block.

    Blocks, not one call of each in turn: an experts call leaves its experts'
    weights in the caches, which the next call of the same kind finds there,
    as the next layer of a model would not; alternating kinds would charge
    each for the other's weights instead. Blocks give each the same state.
    """
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            for _ in range(calls):
                t0 = clock()
                fn()
                t.append(clock() - t0)
    return [statistics.median(t) * 1e6 for t in times]

