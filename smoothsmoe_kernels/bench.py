"""Benchmarks: python -m smoothsmoe_kernels.bench routing

Baseline and ours in one process, on the same inputs, back to back; the ratio
is what to read. The routing benchmark times the torch smooth_topk (at eps
calibrated to the default budget) against stock routing, torch.topk + softmax.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from smoothsmoe_kernels.calibration import DEFAULT_BUDGET, calibrate_eps
from smoothsmoe_kernels.config import RoutingConfig
from smoothsmoe_kernels.routing import route

# (E, K): Mixtral-8x7B, OLMoE-1B-7B, Qwen3-30B-A3B, DeepSeek-V3 (without grouping here)
ROUTING_SHAPES = [(8, 2), (64, 8), (128, 8), (256, 8)]
TOKENS = [1, 16, 256, 1024, 4096, 16384]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def time_us(fn, device: torch.device, min_time: float = 0.2, max_reps: int = 2000) -> float:
    """Median microseconds per call over repeats (after a warm-up call)."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 5):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def stock_topk_softmax(scores: torch.Tensor, k: int):
    """The baseline: vLLM's stock softmax routing with renormalization."""
    probs = torch.softmax(scores.float(), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def bench_routing(device: torch.device, dtype: torch.dtype, max_extra: int) -> None:
    print(f"# routing: {device_name(device)}  torch {torch.__version__}  scores {dtype}  max_extra={max_extra}")
    print(f"# eps calibrated to budget {DEFAULT_BUDGET} extras/token on 16384 N(0,1) tokens")
    print(f"{'E':>4} {'K':>2} {'T':>6} {'stock us':>10} {'smooth us':>10} {'ratio':>6} {'extras':>7}")
    g = torch.Generator(device="cpu").manual_seed(0)
    for E, K in ROUTING_SHAPES:
        config = RoutingConfig(top_k=K, max_extra=max_extra)
        eps = calibrate_eps(torch.randn(16384, E, generator=g), config).eps
        for T in TOKENS:
            scores = torch.randn(T, E, generator=g).to(device=device, dtype=dtype)
            stock = time_us(lambda s=scores, k=K: stock_topk_softmax(s, k), device)
            ours = time_us(lambda s=scores, c=config, e=eps: route(s, c, e), device)
            extras = route(scores, config, eps).order.float().mean().item()
            print(f"{E:>4} {K:>2} {T:>6} {stock:10.1f} {ours:10.1f} {ours / stock:6.2f} {extras:7.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m smoothsmoe_kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["routing"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-extra", type=int, default=2)
    args = parser.parse_args(argv)
    bench_routing(torch.device(args.device), getattr(torch, args.dtype), args.max_extra)


if __name__ == "__main__":
    main()
