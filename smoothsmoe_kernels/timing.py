"""How the benchmarks and the tuner time a call: eager medians and CUDA-graph replays."""

from __future__ import annotations

import platform
import random
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


def cpu_clock():
    """(clock, its name) for timing CPU calls: with one torch thread, the thread's own CPU time.

    A machine shared with other jobs deschedules this thread at random; its CPU
    time does not count those pauses, wall time does. With more threads the
    work is spread over threads this clock does not see: then wall time.
    """
    if torch.get_num_threads() == 1:
        return time.thread_time, "CPU time of the one thread"
    return time.perf_counter, "wall time"


def interleaved_us(fns, min_time: float = 0.3, max_rounds: int = 3000, clock=time.perf_counter) -> list[float]:
    """Median microseconds per call of each of `fns` (CPU), called in turn, round after round.

    On a shared machine another process's load then falls on all of them alike,
    so their ratios stay meaningful when the absolute times move. Each round
    calls them in a new random order: a call's time depends on the one before
    it (what it left in the caches and the allocator), and a fixed order would
    always charge the same call for the same predecessor (seen: 30 us).
    """
    for fn in fns:  # warm-up: first-call costs (per-device constants, compiled code loading)
        fn()
    order = list(range(len(fns)))
    shuffle = random.Random(0).shuffle
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (time.perf_counter() - start < min_time or rounds < 5):
        shuffle(order)
        for j in order:
            t0 = clock()
            fns[j]()
            times[j].append(clock() - t0)
        rounds += 1
    return [statistics.median(t) * 1e6 for t in times]


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
