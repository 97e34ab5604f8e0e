"""Benchmarks: python -m smoothsmoe_kernels.bench routing|experts

Baseline and ours in one process, on the same inputs, back to back; the ratio
is what to read.
  routing  smooth_topk (torch; and the Triton kernel on CUDA), at eps calibrated
           to the default budget, against stock routing: torch.topk + softmax.
  experts  on the shapes of real models (one layer, random weights): the work
           the experts kernel schedules (GEMM row tiles) with smoothing against
           stock top-k, next to 1 + extra pairs / base pairs (any machine); on
           CUDA also times: the Triton kernel stock vs smoothed, a
           torch._grouped_mm baseline, and the fraction of the roofline.
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
    triton_too = device.type == "cuda"
    print(f"{'E':>4} {'K':>2} {'T':>6} {'stock us':>10} {'smooth us':>10} {'ratio':>6} {'extras':>7}"
          + (f" {'triton us':>10} {'ratio':>6}" if triton_too else ""))
    g = torch.Generator(device="cpu").manual_seed(0)
    for E, K in ROUTING_SHAPES:
        config = RoutingConfig(top_k=K, max_extra=max_extra)
        eps = calibrate_eps(torch.randn(16384, E, generator=g), config).eps
        for T in TOKENS:
            scores = torch.randn(T, E, generator=g).to(device=device, dtype=dtype)
            stock = time_us(lambda s=scores, k=K: stock_topk_softmax(s, k), device)
            ours = time_us(lambda s=scores, c=config, e=eps: route(s, c, e), device)
            extras = route(scores, config, eps).order.float().mean().item()
            line = f"{E:>4} {K:>2} {T:>6} {stock:10.1f} {ours:10.1f} {ours / stock:6.2f} {extras:7.3f}"
            if triton_too:
                from smoothsmoe_kernels.routing_triton import smooth_topk_triton

                eps_t = torch.tensor(eps, device=device)
                kernel = time_us(lambda s=scores, c=config: smooth_topk_triton(s, c, eps_t), device)
                line += f" {kernel:10.1f} {kernel / stock:6.2f}"
            print(line)


# name: (E, K, H, I), one MoE layer of each model
MODEL_SHAPES = {
    "Mixtral-8x7B": (8, 2, 4096, 14336),
    "Qwen3-30B-A3B": (128, 8, 2048, 768),
    "OLMoE-1B-7B": (64, 8, 2048, 1024),
    "DeepSeek-V2-Lite": (64, 6, 2048, 1408),
}
EXPERT_TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
BLOCK_M = 16


def bench_experts(device: torch.device, dtype: torch.dtype, max_extra: int) -> None:
    from smoothsmoe_kernels.pairs import tile_schedule

    timing = device.type == "cuda"
    print(f"# experts: {device_name(device)}  torch {torch.__version__}  {dtype}  max_extra={max_extra}  "
          f"BLOCK_M={BLOCK_M}; eps calibrated to {DEFAULT_BUDGET} extras/token")
    head = f"{'model':>17} {'T':>6} {'pairs+%':>8} {'tiles+%':>8}"
    if timing:
        peak_bw, peak_flops = measured_peaks(device)
        print(f"# measured peaks: copy {peak_bw / 1e9:.0f} GB/s, dense {dtype} matmul {peak_flops / 1e12:.0f} TFLOP/s")
        head += f" {'stock us':>9} {'smooth us':>10} {'ratio':>6} {'gmm us':>8} {'vs gmm':>7} {'roofline':>8}"
    print(head)
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, (E, K, H, I) in MODEL_SHAPES.items():
        config = RoutingConfig(top_k=K, max_extra=max_extra)
        eps = calibrate_eps(torch.randn(16384, E, generator=g), config).eps
        if timing:
            w13 = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype)
            w2 = (torch.randn(E, H, I, device=device) / I**0.5).to(dtype)
        for T in EXPERT_TOKENS:
            scores = torch.randn(T, E, generator=g).to(device)
            stock = route(scores, config, 0.0)
            smooth = route(scores, config, eps)
            base_pairs, pairs = int((stock.ids >= 0).sum()), int((smooth.ids >= 0).sum())
            t_stock = int(tile_schedule(stock.ids, E, BLOCK_M).num_tiles)
            t_smooth = int(tile_schedule(smooth.ids, E, BLOCK_M).num_tiles)
            line = f"{name:>17} {T:>6} {100 * (pairs / base_pairs - 1):7.1f}% {100 * (t_smooth / t_stock - 1):7.1f}%"
            if timing:
                from smoothsmoe_kernels.experts_triton import moe_experts_triton

                x = torch.randn(T, H, device=device, dtype=dtype)
                us_stock = time_us(lambda: moe_experts_triton(x, w13, w2, stock.ids, stock.weights), device)
                us_smooth = time_us(lambda: moe_experts_triton(x, w13, w2, smooth.ids, smooth.weights), device)
                us_gmm = time_us(lambda: grouped_mm_experts(x, w13, w2, smooth.ids, smooth.weights), device)
                touched = int(torch.unique(smooth.ids[smooth.ids >= 0]).numel())
                bytes_moved = touched * 3 * H * I * w13.element_size() + 2 * T * H * x.element_size()
                flops = pairs * 6 * H * I
                roof = max(bytes_moved / peak_bw, flops / peak_flops) * 1e6
                line += (f" {us_stock:9.1f} {us_smooth:10.1f} {us_smooth / us_stock:6.2f} {us_gmm:8.1f}"
                         f" {us_smooth / us_gmm:7.2f} {roof / us_smooth:8.2f}")
            print(line)


def grouped_mm_experts(x, w13, w2, ids, weights):
    """The PyTorch grouped-GEMM baseline: torch._grouped_mm over pairs sorted by expert."""
    T, H = x.shape
    E = w13.shape[0]
    W = ids.shape[1]
    flat = ids.reshape(-1).long()
    key = torch.where(flat >= 0, flat, E)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=E + 1)[:E]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // W]
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    out = torch._grouped_mm((torch.nn.functional.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs)
    yp = torch.zeros(T * W, H, device=x.device, dtype=torch.float32)
    yp[order] = out.float() * weights.reshape(-1)[order, None]
    return yp.view(T, W, H).sum(1).to(x.dtype)


def measured_peaks(device: torch.device) -> tuple[float, float]:
    """(copy bytes/s, dense matmul FLOP/s) measured here: the roofline's ceilings."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    copy_s = time_us(lambda: b.copy_(a), device) / 1e6
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_s = time_us(lambda: m @ m, device) / 1e6
    return 2 * a.numel() / copy_s, 2 * 8192**3 / mm_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m smoothsmoe_kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["routing", "experts"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="routing scores dtype (default float32) / experts dtype (default bfloat16)")
    parser.add_argument("--max-extra", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.what == "routing":
        bench_routing(device, getattr(torch, args.dtype or "float32"), args.max_extra)
    else:
        bench_experts(device, getattr(torch, args.dtype or "bfloat16"), args.max_extra)


if __name__ == "__main__":
    main()
