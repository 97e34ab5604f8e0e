"""Smoothed top-k routing for MoE layers: torch references, a fused CPU path, Triton kernels.

The public entry points `smooth_topk`, `route_and_count` and `moe_experts`
pick an implementation once per call site: the Triton kernels on CUDA; off
CUDA the fused CPU routing (routing_cpu.py) and the torch experts reference.
`backend="torch"` always takes the references. The dispatch lives here, at the
package's entry, so that no reference imports the implementation it checks.
Imports with torch alone: the Triton modules are imported only when a Triton
backend is asked for.
"""

from __future__ import annotations

import torch

from smoothsmoe_kernels.calibration import Calibration, calibrate_eps, calibrate_gaps
from smoothsmoe_kernels.config import RoutingConfig
from smoothsmoe_kernels.experts import moe_experts_torch
from smoothsmoe_kernels.gap_recorder import GapRecorder
from smoothsmoe_kernels.routing import route, route_with_gaps
from smoothsmoe_kernels.routing_cpu import smooth_topk_cpu
from smoothsmoe_kernels.routing_result import BandGaps, RoutingResult, as_eps_tensor
from smoothsmoe_kernels.stats import RoutingStats, StatsLayout, accumulate, read_stats, routing_stats

__all__ = [
    "Calibration",
    "RoutingConfig",
    "RoutingResult",
    "RoutingStats",
    "StatsLayout",
    "accumulate",
    "calibrate_eps",
    "calibrate_gaps",
    "moe_experts",
    "read_stats",
    "resolve_backend",
    "resolve_routing_backend",
    "route",
    "route_and_count",
    "routing_stats",
    "smooth_topk",
]


def resolve_backend(backend: str, device: torch.device) -> str:
    """'torch' or 'triton': 'auto' takes the Triton kernels on CUDA, torch elsewhere."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def resolve_routing_backend(backend: str, device: torch.device) -> str:
    """'torch' (the reference), 'cpu' (routing_cpu) or 'triton': 'auto' takes Triton on CUDA, 'cpu' elsewhere."""
    if backend not in ("auto", "torch", "cpu", "triton"):
        raise ValueError(f"routing backend must be 'auto', 'torch', 'cpu' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    return backend


def route_and_count(
    scores: torch.Tensor,
    config: RoutingConfig,
    eps: torch.Tensor,
    correction_bias: torch.Tensor | None = None,
    *,
    stats: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    recorder: GapRecorder | None = None,
    backend: str = "auto",
) -> tuple[RoutingResult, BandGaps]:
    """One routing step of a layer as the server runs it: route, count, record.

    scores [T, E]; eps a 0-d float32 tensor on their device; stats the
    layer's float64 buffer (StatsLayout(config.top_k, config.max_extra, E)),
    added to in place; valid [T] bool marks the rows to count and record;
    recorder appends the valid rows' band gaps while its flag is set. Returns
    the routing and its band gaps. backend: 'auto' (Triton on CUDA, the fused
    CPU path elsewhere), 'cpu', 'triton', or 'torch' (the reference routing,
    stats.accumulate and GapRecorder.record one after the other).
    """
    which = resolve_routing_backend(backend, scores.device)
    if which == "triton":
        from smoothsmoe_kernels.routing_triton import smooth_topk_triton

        return smooth_topk_triton(scores, config, eps, correction_bias, stats=stats, valid=valid, recorder=recorder)
    if which == "cpu":
        return smooth_topk_cpu(scores, config, eps, correction_bias, stats=stats, valid=valid, recorder=recorder)
    result, gaps = route_with_gaps(scores, config, eps, correction_bias)
    if stats is not None:
        accumulate(stats, StatsLayout(config.top_k, config.max_extra, scores.shape[1]), result, valid)
    if recorder is not None:
        recorder.record(gaps, valid)
    return result, gaps


def smooth_topk(
    scores: torch.Tensor,
    top_k: int,
    eps: float | torch.Tensor,
    max_extra: int,
    *,
    scoring_func: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    backend: str = "auto",
) -> RoutingResult:
    """Smoothed top-k routing of router logits `scores` [T, E] (any float dtype).

    `eps` (a float or a 0-d tensor, in score units) is the band width; 0 gives
    the family's stock top-k. Softmax families score by the logit; the sigmoid
    family scores by `sigmoid(logit) + correction_bias` and weighs by
    `sigmoid(logit)`. See RoutingConfig for the families, routing.route for the
    reference. backend: 'auto' (the Triton kernel on CUDA, routing_cpu's fused
    path elsewhere), 'cpu', 'triton', or 'torch' (the reference).

    Example (k=1, one extra allowed): expert 2 sits 0.05 below expert 0, inside
    a band of 0.1, so it is active as a first-order extra:

        >>> r = smooth_topk(torch.tensor([[2.0, 0.0, 1.95]]), 1, 0.1, 1)
        >>> r.ids.tolist(), r.order.tolist()
        ([[0, 2]], [1])
    """
    config = RoutingConfig(
        top_k=top_k,
        max_extra=max_extra,
        scoring_func=scoring_func,
        renormalize=renormalize,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
    )
    which = resolve_routing_backend(backend, scores.device)
    if which == "torch":
        return route(scores, config, eps, correction_bias)
    return route_and_count(scores, config, as_eps_tensor(eps, scores.device), correction_bias, backend=which)[0]


def moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    backend: str = "auto",
    weights_on_input: bool = False,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The experts' weighted sum over active (token, expert) pairs only.

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I];
    ids [T, W] int (-1 = inactive); weights [T, W] float32. Returns [T, H] in
    x's dtype. weights_on_input: each weight scales its expert's input, not
    its output (Llama 4). FP8 block-quantized experts: float8_e4m3fn w13, w2
    with w13_scale float32 [E, ceil(2I/bn), ceil(H/bk)], w2_scale float32
    [E, ceil(H/bn), ceil(I/bk)] and block_shape (bn, bk), as vLLM's
    fused_experts takes them (fp8_blocks). See experts.moe_experts_torch for
    the exact contract; ValueError on shapes or dtypes that do not agree.
    """
    T, H = x.shape
    E, two_I, H_w = w13.shape
    if H_w != H or w2.shape != (E, H, two_I // 2) or ids.shape != weights.shape or ids.shape[0] != T:
        raise ValueError(
            f"shapes do not agree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, "
            f"ids {tuple(ids.shape)}, weights {tuple(weights.shape)}"
        )
    quant = dict(w13_scale=w13_scale, w2_scale=w2_scale, block_shape=block_shape)
    if resolve_backend(backend, x.device) == "triton":
        from smoothsmoe_kernels.experts_triton import moe_experts_triton

        return moe_experts_triton(x, w13, w2, ids, weights, weights_on_input=weights_on_input, **quant)
    return moe_experts_torch(x, w13, w2, ids, weights, weights_on_input, **quant)
