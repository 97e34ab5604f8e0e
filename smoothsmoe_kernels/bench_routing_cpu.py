"""bench routing on the CPU: our routing step against vLLM's CPU router for the same layer.

For each layer shape and T, in one process, on the same logits, interleaved:
  vllm      vLLM's CPURouter._compute_routing (vllm/model_executor/layers/
            fused_moe/router/cpu_router.py), what a stock layer runs on the CPU
  ref       the reference (routing.route_with_gaps + stats.accumulate +
            GapRecorder.record): the server's CPU step today
  cpu       routing_cpu.smooth_topk_cpu: the fused CPU path
each called eagerly; then vllm and cpu compiled the way vLLM's CPU backend
compiles a model (torch.compile, inductor with vLLM's options, T dynamic):
  cpu 1 graph   the call of a graph that routes one layer (what an op that
                calls a compiled smooth_topk_cpu would cost, graph call included)
  in graph      the microseconds one layer's routing adds to a compiled graph:
                a graph routing two layers minus a graph routing one (what a
                layer costs inside vLLM's one-graph forward) Ours always counts into the layer's stats buffer
and carries its calibration recorder (off), as the server runs it. vLLM is
imported here only, lazily; without it the baseline is stock_topk_softmax
(torch topk + softmax) and the header says so.
"""

from __future__ import annotations

import os

import torch

from smoothsmoe_kernels import route_and_count
from smoothsmoe_kernels.calibration import DEFAULT_BUDGET, calibrate_eps
from smoothsmoe_kernels.config import RoutingConfig
from smoothsmoe_kernels.gap_recorder import GapRecorder
from smoothsmoe_kernels.routing_cpu import smooth_topk_cpu
from smoothsmoe_kernels.routing_result import as_eps_tensor
from smoothsmoe_kernels.stats import StatsLayout
from smoothsmoe_kernels.timing import cpu_clock, device_name, interleaved_us

TOKENS = (1, 16, 256, 4096)
# name: (E, RoutingConfig keywords without max_extra, correction bias scale or None)
SHAPES = {
    "default model": (16, {"top_k": 4}, None),
    "OLMoE-1B-7B": (64, {"top_k": 8}, None),
    "Qwen3-30B-A3B": (128, {"top_k": 8}, None),
    "DeepSeek-V3": (256, {"top_k": 8, "scoring_func": "sigmoid", "num_expert_group": 8, "topk_group": 4,
                          "routed_scaling_factor": 2.5}, 1e-3),
}
# vLLM's CPU backend compiles with these inductor options (vllm/platforms/cpu.py)
VLLM_CPU_INDUCTOR = {"dce": True, "size_asserts": False, "nan_asserts": False, "epilogue_fusion": True,
                     "cpp.dynamic_threads": True}


def vllm_worker_threads() -> int:
    """The OpenMP threads vLLM 0.32's CPU worker runs with here, one rank on one NUMA node: the CPUs this
    process may use less the one it reserves for the engine core's scheduler (vllm/utils/ompmultiprocessing.py)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def bench_routing_cpu(dtype: torch.dtype, max_extra: int, graph: bool = True) -> None:
    stock_router, baseline = _baseline()
    print(f"# routing: {device_name(torch.device('cpu'))}  torch {torch.__version__}  scores {dtype}  "
          f"max_extra={max_extra}; baseline: {baseline}")
    clock, clock_name = cpu_clock()
    print(f"# eps calibrated to budget {DEFAULT_BUDGET} extras/token on 16384 N(0,1) tokens; us: medians of "
          f"interleaved calls, {clock_name}; x = ours / vllm")
    print(f"{'':>20} {'eager':-^40}" + (f" {'cpu 1 graph':>15} {'in graph':-^25}" if graph else ""))
    print(f"{'layer':>14} {'T':>5} {'vllm us':>8} {'ref us':>8} {'x':>6} {'cpu us':>8} {'x':>6}"
          + (f" {'us':>8} {'x':>6} {'vllm us':>8} {'cpu us':>8} {'x':>6}" if graph else "") + f" {'extras':>6}")
    g = torch.Generator().manual_seed(0)
    for name, (E, kw, bias_scale) in SHAPES.items():
        config = RoutingConfig(max_extra=max_extra, **kw)
        bias = torch.randn(E, generator=g) * bias_scale if bias_scale else None
        eps = as_eps_tensor(calibrate_eps(torch.randn(16384, E, generator=g), config, correction_bias=bias).eps,
                            torch.device("cpu"))
        stock = stock_router(E, config, bias)
        layout = StatsLayout(config.top_k, max_extra, E)
        stats, recorder = layout.new_buffer(), GapRecorder(max_extra, 16384, "cpu")  # recorder off, as after start-up

        def step(s, backend, config=config, eps=eps, bias=bias, stats=stats, recorder=recorder):
            return route_and_count(s, config, eps, bias, stats=stats, recorder=recorder, backend=backend)

        layers = [_smoothed_layer(config, eps, bias, layout) for _ in range(2)]
        graphs = _compiled(E, dtype, [stock, stock], layers) if graph else None
        for T in TOKENS:
            s, s2 = (torch.randn(T, E, generator=g).to(dtype) for _ in range(2))
            calls = [lambda s=s, stock=stock: stock(s), lambda s=s: step(s, "torch"), lambda s=s: step(s, "cpu")]
            if graphs:
                calls += [lambda s=s, s2=s2, f=f: f(s, s2) for f in graphs]
            us = interleaved_us(calls, min_time=0.3 if T < 4096 else 1.0, clock=clock)
            extras = route_and_count(s, config, eps, bias, backend="cpu")[0].order.float().mean().item()
            line = f"{name:>14} {T:>5} {us[0]:8.1f} {us[1]:8.1f} {us[1] / us[0]:6.2f} {us[2]:8.1f} {us[2] / us[0]:6.2f}"
            if graphs:
                g_stock, g_cpu = us[4] - us[3], us[6] - us[5]  # two layers minus one
                line += f" {us[5]:8.1f} {us[5] / us[0]:6.2f} {g_stock:8.1f} {g_cpu:8.1f} {g_cpu / g_stock:6.2f}"
            print(line + f" {extras:6.3f}", flush=True)


def _smoothed_layer(config: RoutingConfig, eps: torch.Tensor, bias, layout: StatsLayout):
    """One smoothed layer's routing step with its own counters, as a router hands it to the experts."""
    stats, recorder = layout.new_buffer(), GapRecorder(layout.max_extra, 16384, "cpu")

    def layer(s):
        r, _ = smooth_topk_cpu(s, config, eps, bias, stats=stats, recorder=recorder)
        return r.weights, r.ids  # the rest is dead code in vLLM's graph, as here

    return layer


def _baseline():
    """(make(E, config, bias) -> logits -> (weights, ids), description): vLLM's CPU router, or torch."""
    try:
        from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
    except ImportError as e:
        from smoothsmoe_kernels.stock_routing import stock_topk_softmax

        def torch_stock(E, config, bias):
            return lambda s: stock_topk_softmax(s, config.top_k)

        return torch_stock, f"torch topk + softmax (vLLM not importable: {e})"
    import vllm

    def vllm_stock(E, config, bias):
        grouped = config.num_expert_group is not None
        router = CPURouter(top_k=config.top_k, global_num_experts=E, use_grouped_topk=grouped,
                           num_expert_group=config.num_expert_group, topk_group=config.topk_group,
                           renormalize=config.renormalize, scoring_func=config.scoring_func,
                           routed_scaling_factor=config.routed_scaling_factor, e_score_correction_bias=bias)
        return lambda s: router._compute_routing(None, s, None)

    return vllm_stock, f"vLLM {vllm.__version__} CPURouter at top_k (no smoothing, no counters)"


def _compiled(E: int, dtype: torch.dtype, stock: list, ours: list) -> list:
    """[stock 1 layer, stock 2 layers, ours 1 layer, ours 2 layers], each compiled as vLLM's CPU backend
    compiles a model: one graph, T dynamic. Each takes two layers' logits (the 1-layer graphs ignore the second)."""
    fns = [lambda s, s2: stock[0](s), lambda s, s2: (stock[0](s), stock[1](s2)),
           lambda s, s2: ours[0](s), lambda s, s2: (ours[0](s), ours[1](s2))]
    graphs = [torch.compile(fn, fullgraph=True, options=VLLM_CPU_INDUCTOR) for fn in fns]
    for fn in graphs:
        first = [torch.randn(8, E).to(dtype) for _ in range(2)]
        for t in first:  # unbacked, as vLLM marks the token dimension: one graph for every T (no 0/1 specialization)
            torch._dynamo.decorators.mark_unbacked(t, 0)
        fn(*first)
    return graphs
