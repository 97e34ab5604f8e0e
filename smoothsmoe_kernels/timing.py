"""How the benchmarks and the tuner time a call: eager medians and CUDA-graph replays."""

from __future__ import annotations

import platform
import statistics
import time

import torch

GRAPH_MAX_T = 512  # vLLM captures decode batches up to about this size: smaller calls run as graph replays


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def time_us(fn, device: torch.device, min_time: float = 0.2, max_reps: int = 2000) -> float:
    """Median microseconds per eager call over repeats (after a warm-up call), launch overhead included."""
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


def graph_time_us(fn, replays: int = 50) -> tuple[float | None, str | None]:
    """Microseconds per replay of fn captured in a CUDA graph (as vLLM runs decode), or why capture failed."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, per-device constants) outside the capture
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / replays, None
    except Exception as e:  # a benchmark reports why and goes on
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
