"""Benchmarks: python -m smoothsmoe_kernels.bench routing|experts|stages|tune

Baseline and ours in one process, on the same inputs, back to back; the ratio
is what to read.
  routing  on CUDA: smooth_topk (torch; the Triton kernel with its counts),
           at eps calibrated to the default budget, against stock routing:
           torch.topk + softmax. On the CPU: bench_routing_cpu, the reference
           and the fused CPU path against vLLM's CPU router, eager and
           compiled into a graph, T = 1, 16, 256, 4096.
  experts  on the shapes of real models (one layer, random weights): the work
           the experts kernel schedules (GEMM row tiles) with smoothing against
           stock top-k, next to 1 + extra pairs / base pairs (any machine); on
           CUDA also times our kernel at the stock and the smoothed ids, vLLM's
           fused_experts at the stock ids where vLLM is importable, the whole
           layer (routing + experts) smoothed against stock, eager and (T <= 512)
           captured in CUDA graphs, and the fraction of the roofline. On the
           CPU then bench_experts_cpu: vLLM's CPU experts op padded to the
           smoothed width against active pairs only (experts_by_width).
  stages   on a GPU: where a decode-sized smoothed layer spends its time, each
           stage captured in a CUDA graph: stock routing (torch), our routing
           kernel as the server runs it (counting, its calibration recorder
           off), the same with the recorder as torch ops after the kernel (how
           the server ran it before the kernel recorded), the tile schedule,
           our experts at the stock and the smoothed ids.
  tune     on a GPU: times the tile-config candidates per token bucket and writes
           the tuned tables the kernel loads (smoothsmoe_kernels/tuned/); with
           --fp8, the FP8 block-quantized kernel's (128 x 128 blocks) on the
           per-GPU shapes of FP8 deployments (FP8_MODEL_SHAPES).
"""

from __future__ import annotations

import argparse

import torch

from smoothsmoe_kernels.calibration import DEFAULT_BUDGET, calibrate_eps
from smoothsmoe_kernels.config import RoutingConfig
from smoothsmoe_kernels.gap_recorder import GapRecorder
from smoothsmoe_kernels.routing import route
from smoothsmoe_kernels.stats import StatsLayout
from smoothsmoe_kernels.stock_routing import stock_topk_softmax
from smoothsmoe_kernels.timing import GRAPH_MAX_T, device_name, graph_time_us, time_us

# (E, K): Mixtral-8x7B, OLMoE-1B-7B, Qwen3-30B-A3B, DeepSeek-V3 (without grouping here)
ROUTING_SHAPES = [(8, 2), (64, 8), (128, 8), (256, 8)]
TOKENS = [1, 16, 256, 1024, 4096, 16384]


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
                stats = StatsLayout(K, max_extra, E).new_buffer(device)  # counted, as the server runs it
                kernel = time_us(lambda s=scores, c=config: smooth_topk_triton(s, c, eps_t, stats=stats), device)
                line += f" {kernel:10.1f} {kernel / stock:6.2f}"
            print(line)


# name: (E, K, H, I), one MoE layer of each model
MODEL_SHAPES = {
    "Mixtral-8x7B": (8, 2, 4096, 14336),
    "Qwen3-30B-A3B": (128, 8, 2048, 768),
    "OLMoE-1B-7B": (64, 8, 2048, 1024),
    "DeepSeek-V2-Lite": (64, 6, 2048, 1408),
}
# FP8 checkpoints as deployed, per GPU: (E, K, H, I) with the intermediate size split by tensor parallelism
FP8_MODEL_SHAPES = {
    "Qwen3-30B-A3B-FP8": (128, 8, 2048, 768),
    "Qwen3-235B-A22B-FP8/tp4": (128, 8, 4096, 384),
    "DeepSeek-V3/tp8": (256, 8, 7168, 256),
}
FP8_BLOCK = (128, 128)
EXPERT_TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
TUNE_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def bench_experts(device: torch.device, dtype: torch.dtype, max_extra: int) -> None:
    from smoothsmoe_kernels.pairs import tile_schedule
    from smoothsmoe_kernels.tile_config import default_tile_config

    timing = device.type == "cuda"
    print(f"# experts: {device_name(device)}  torch {torch.__version__}  {dtype}  max_extra={max_extra}  "
          f"tiles at vLLM's default BLOCK_M for T; eps calibrated to {DEFAULT_BUDGET} extras/token")
    head = f"{'model':>17} {'T':>6} {'pairs+%':>8} {'tiles+%':>8}"
    vllm_experts = _vllm_fused_experts() if timing else None
    if timing:
        peak_bw, peak_flops = measured_peaks(device)
        print(f"# measured peaks: copy {peak_bw / 1e9:.0f} GB/s, dense {dtype} matmul {peak_flops / 1e12:.0f} TFLOP/s")
        print("# stock layer = torch topk+softmax + " + ("vLLM's fused_experts at k" if vllm_experts else
              "our kernel at k (vLLM not importable here)") + "; smoothed layer = our routing kernel + our kernel")
        head += (f" {'ours_k us':>9} {'ours_sm us':>10} {'ratio':>6} {'vllm_k us':>9} {'ours/vllm':>9}"
                 f" {'layer':>6} {'goal':>5} {'graph':>6} {'roofline':>8}")
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
            block_m = default_tile_config(T, E).block_m
            t_stock = int(tile_schedule(stock.ids, E, block_m).num_tiles)
            t_smooth = int(tile_schedule(smooth.ids, E, block_m).num_tiles)
            extra = pairs / base_pairs - 1
            line = f"{name:>17} {T:>6} {100 * extra:7.1f}% {100 * (t_smooth / t_stock - 1):7.1f}%"
            if timing:
                x = torch.randn(T, H, device=device, dtype=dtype)
                line += _time_layer(x, w13, w2, scores, config, eps, stock, smooth, vllm_experts, extra,
                                    peak_bw, peak_flops)
            print(line, flush=True)


def _time_layer(x, w13, w2, scores, config, eps, stock, smooth, vllm_experts, extra, peak_bw, peak_flops) -> str:
    """The CUDA columns of one row of bench experts."""
    from smoothsmoe_kernels.experts_triton import moe_experts_triton
    from smoothsmoe_kernels.routing_triton import smooth_topk_triton

    device, (T, H), (E, _, I), K = x.device, x.shape, w13.shape, config.top_k
    I //= 2
    stock_ids = stock.ids[:, :K].contiguous()
    stock_w = stock.weights[:, :K].contiguous()
    us_k = time_us(lambda: moe_experts_triton(x, w13, w2, stock_ids, stock_w), device)
    us_sm = time_us(lambda: moe_experts_triton(x, w13, w2, smooth.ids, smooth.weights), device)
    if vllm_experts is not None:
        def stock_experts(w, i):
            return vllm_experts(x, w13, w2, w, i)
        us_vllm = time_us(lambda: stock_experts(stock_w, stock_ids), device)
    else:
        def stock_experts(w, i):
            return moe_experts_triton(x, w13, w2, i, w)
        us_vllm = float("nan")
    eps_t = torch.tensor(eps, device=device)
    stats = StatsLayout(K, config.max_extra, E).new_buffer(device)
    recorder = GapRecorder(config.max_extra, 16384, device)  # off, as the server runs it after calibration

    def smoothed_layer():
        r, _ = smooth_topk_triton(scores, config, eps_t, stats=stats, recorder=recorder)
        return moe_experts_triton(x, w13, w2, r.ids, r.weights)

    def stock_layer():
        w, i = stock_topk_softmax(scores, K)
        return stock_experts(w, i)

    layer = time_us(smoothed_layer, device) / time_us(stock_layer, device)
    graph = "-"
    if T <= GRAPH_MAX_T:
        g_ours, why_ours = graph_time_us(smoothed_layer)
        g_stock, why_stock = graph_time_us(stock_layer)
        graph = f"{g_ours / g_stock:6.2f}" if g_ours and g_stock else f"FAIL {why_ours or why_stock}"
    pairs = int((smooth.ids >= 0).sum())
    touched = int(torch.unique(smooth.ids[smooth.ids >= 0]).numel())
    bytes_moved = touched * 3 * H * I * w13.element_size() + 2 * T * H * x.element_size()
    roof = max(bytes_moved / peak_bw, pairs * 6 * H * I / peak_flops) * 1e6
    return (f" {us_k:9.1f} {us_sm:10.1f} {us_sm / us_k:6.2f} {us_vllm:9.1f} {us_k / us_vllm:9.2f}"
            f" {layer:6.2f} {1 + extra + 0.03:5.2f} {graph:>6} {roof / us_sm:8.2f}")


STAGE_TOKENS = [1, 16, 64, 256]


def bench_stages(device: torch.device, dtype: torch.dtype, max_extra: int) -> None:
    from smoothsmoe_kernels.experts_triton import moe_experts_triton
    from smoothsmoe_kernels.routing_triton import smooth_topk_triton
    from smoothsmoe_kernels.tile_config import tile_config
    from smoothsmoe_kernels.tile_schedule_triton import tile_schedule_triton

    print(f"# stages: {device_name(device)}  torch {torch.__version__}  {dtype}  max_extra={max_extra}; "
          "us per CUDA-graph replay")
    print(f"{'model':>17} {'T':>5} {'route':>6} {'ours':>6} {'+t_rec':>6} {'sched':>6} {'exp_k':>7} {'exp_sm':>7}"
          "  tiles")
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, (E, K, H, I) in MODEL_SHAPES.items():
        config = RoutingConfig(top_k=K, max_extra=max_extra)
        eps_t = torch.tensor(calibrate_eps(torch.randn(16384, E, generator=g), config).eps, device=device)
        stats = StatsLayout(K, max_extra, E).new_buffer(device)
        recorder = GapRecorder(max_extra, 16384, device)  # off, as in every step after calibration
        w13 = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype)
        w2 = (torch.randn(E, H, I, device=device) / I**0.5).to(dtype)
        for T in STAGE_TOKENS:
            scores = torch.randn(T, E, generator=g).to(device)
            x = torch.randn(T, H, device=device, dtype=dtype)
            r, _ = smooth_topk_triton(scores, config, eps_t, stats=stats)
            w_k, i_k = stock_topk_softmax(scores, K)
            tiles, source = tile_config(T, E, H, I, dtype, device)
            def torch_recorder():
                _, gaps = smooth_topk_triton(scores, config, eps_t, stats=stats)
                recorder.record(gaps, None)

            calls = {
                "route": lambda: stock_topk_softmax(scores, K),
                "ours": lambda: smooth_topk_triton(scores, config, eps_t, stats=stats, recorder=recorder),
                "+t_rec": torch_recorder,
                "sched": lambda: tile_schedule_triton(r.ids, E, tiles.block_m),
                "exp_k": lambda: moe_experts_triton(x, w13, w2, i_k, w_k),
                "exp_sm": lambda: moe_experts_triton(x, w13, w2, r.ids, r.weights),
            }
            us = {k: graph_time_us(fn, replays=200)[0] for k, fn in calls.items()}
            cells = " ".join(f"{us[k]:{7 if k.startswith('exp') else 6}.1f}" if us[k] else "  FAIL"
                             for k in calls)
            print(f"{name:>17} {T:>5} {cells}  {source} {tiles}", flush=True)


def _vllm_fused_experts():
    """vLLM's own Triton experts, where vLLM is installed (a real GPU deployment); else None."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except ImportError:
        return None
    return fused_experts


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
    parser.add_argument("what", choices=["routing", "experts", "stages", "tune"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="routing scores dtype (default float32; bfloat16 on the CPU, the default model's "
                             "dtype there) / experts dtype (default bfloat16)")
    parser.add_argument("--max-extra", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch threads (default torch's; routing: as many as vLLM's CPU worker would "
                             "run with here, the CPUs less one; on a machine shared with other jobs, 1 keeps a "
                             "descheduled thread from stalling every parallel region)")
    parser.add_argument("--no-graph", action="store_true",
                        help="routing on the CPU: eager calls only (the compiled-graph columns compile for minutes)")
    parser.add_argument("--models", default=None,
                        help="tune: model shapes to tune (names from MODEL_SHAPES or, with --fp8, FP8_MODEL_SHAPES; "
                        "or E:K:H:I); default all of them")
    parser.add_argument("--fp8", action="store_true", help="tune: FP8 block-quantized experts, 128 x 128 blocks")
    parser.add_argument("--tokens", default=",".join(map(str, TUNE_TOKENS)), help="tune: token buckets")
    parser.add_argument("--out", default=None, help="tune: directory of the tables (default: the package's tuned/)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.what in ("stages", "tune") and device.type != "cuda":
        # Both time compiled Triton kernels (and CUDA graphs); Triton's interpreter would only time itself.
        parser.exit(2, f"bench {args.what}: needs a CUDA GPU (torch sees none here); run it on the GPU machine\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "routing" and device.type == "cpu":
        from smoothsmoe_kernels.bench_routing_cpu import bench_routing_cpu, vllm_worker_threads

        torch.set_num_threads(args.threads or vllm_worker_threads())
        bench_routing_cpu(getattr(torch, args.dtype or "bfloat16"), args.max_extra, graph=not args.no_graph)
    elif args.what == "routing":
        bench_routing(device, getattr(torch, args.dtype or "float32"), args.max_extra)
    elif args.what == "experts":
        bench_experts(device, getattr(torch, args.dtype or "bfloat16"), args.max_extra)
        if device.type == "cpu":
            from smoothsmoe_kernels.bench_experts_cpu import bench_experts_cpu

            bench_experts_cpu(getattr(torch, args.dtype or "bfloat16"), args.max_extra)
    elif args.what == "stages":
        bench_stages(device, getattr(torch, args.dtype or "bfloat16"), args.max_extra)
    else:
        from smoothsmoe_kernels.tune import tune_experts

        shapes = FP8_MODEL_SHAPES if args.fp8 else MODEL_SHAPES
        for spec in (args.models or ",".join(shapes)).split(","):
            E, K, H, I = shapes[spec] if spec in shapes else map(int, spec.split(":"))
            path = tune_experts(E, K, H, I, getattr(torch, args.dtype or "bfloat16"), device,
                                [int(t) for t in args.tokens.split(",")], args.max_extra, args.out,
                                block_shape=FP8_BLOCK if args.fp8 else None)
            print(f"# wrote {path}")


if __name__ == "__main__":
    main()
