"""Soak: a steady open-loop rate for a long time, in windows; memory, latency and counters per window.

Each window is one `vllm bench serve` level (rate x window seconds of requests,
all finished before the next window starts). After each, from /metrics:
  - the server's memory: resident set of the API server (process_resident_memory_bytes)
    and, when the server's process id is known (a local server), of its whole
    process tree (engine core and workers included);
  - the window's latency percentiles and errors;
  - the counter check: tokens routed by each MoE layer in the window against the
    tokens the engine computed, prompt - cached prompt + generated - requests
    (a request's last token is never fed back). Equal unless the engine preempted
    and recomputed (then routed is larger); smaller would mean lost counts.
The summary compares the last windows with the first: memory growth and p99 drift.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import psutil

from loadtests.metrics_scrape import metric_samples
from loadtests.profiles import Profile
from loadtests.run import bench_args, run_level

ENGINE_COUNTERS = {
    "vllm:prompt_tokens_total": "prompt",
    "vllm:prompt_tokens_cached_total": "cached",
    "vllm:generation_tokens_total": "generated",
    "vllm:request_success_total": "requests",
}


def scrape(url: str, headers: dict | None = None) -> dict:
    """Counters the soak follows: engine tokens, tokens routed per layer, API server RSS."""
    out = dict.fromkeys(ENGINE_COUNTERS.values(), 0.0) | {"routed": {}, "api_rss": 0.0}
    for s in metric_samples(url, headers):
        if s.name in ENGINE_COUNTERS:
            out[ENGINE_COUNTERS[s.name]] += s.value
        elif s.name == "smoothsmoe_tokens_routed_total":
            out["routed"][s.labels["layer"]] = s.value
        elif s.name == "process_resident_memory_bytes":
            out["api_rss"] = s.value
    return out


def tree_rss(pid: int) -> float:
    """Resident bytes of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class Window:
    index: int
    elapsed_s: float
    completed: int
    failed: int
    e2el_p50_ms: float
    e2el_p99_ms: float
    ttft_p99_ms: float
    api_rss_mb: float
    tree_rss_mb: float | None
    engine_tokens: float  # tokens the engine computed in the window
    routed_min: float  # tokens routed in the window, least and most over layers
    routed_max: float

    @property
    def counters_add_up(self) -> bool:
        # Every layer sees every computed token; preemption only adds recomputed ones.
        return self.routed_min == self.routed_max >= self.engine_tokens


def run_soak(url: str, model: str, tokenizer: str, profile: Profile, *, rate: float, duration_s: float,
             window_s: float, api_key: str | None = None, server_pid: int | None = None,
             on_window=None) -> list[Window]:
    """round(duration_s / window_s) windows (at least one), each of rate * window_s requests sent at `rate`.

    The count of windows is fixed up front: each window also pays vLLM's load generator its own
    start (a test request, the tokenizer), so a loop on elapsed time would give fewer windows than
    asked, the more so the shorter they are.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    per_window = max(1, round(rate * window_s))
    windows: list[Window] = []
    start = time.monotonic()
    before = scrape(url, headers)
    for _ in range(max(1, round(duration_s / window_s))):
        bench = run_level(bench_args(url, model, tokenizer, profile, per_window, concurrency=None, rate=rate,
                                     dataset=None, api_key=api_key, slo_ttft_ms=2000.0, slo_tpot_ms=200.0,
                                     seed=len(windows)))
        after = scrape(url, headers)
        d = {k: after[k] - before[k] for k in ENGINE_COUNTERS.values()}
        routed = [after["routed"][layer] - before["routed"].get(layer, 0.0) for layer in after["routed"]]
        w = Window(
            index=len(windows), elapsed_s=time.monotonic() - start, completed=bench["completed"],
            failed=bench.get("failed", 0), e2el_p50_ms=bench["p50_e2el_ms"], e2el_p99_ms=bench["p99_e2el_ms"],
            ttft_p99_ms=bench["p99_ttft_ms"], api_rss_mb=after["api_rss"] / 2**20,
            tree_rss_mb=tree_rss(server_pid) / 2**20 if server_pid else None,
            engine_tokens=d["prompt"] - d["cached"] + d["generated"] - d["requests"],
            routed_min=min(routed, default=0.0), routed_max=max(routed, default=0.0))
        windows.append(w)
        if on_window:
            on_window(w)
        before = after
    return windows


def summary(windows: list[Window]) -> dict:
    """First quarter against last quarter of the windows (at least one each)."""
    n = max(1, len(windows) // 4)
    first, last = windows[:n], windows[-n:]

    def mean(ws, key):
        values = [getattr(w, key) for w in ws if getattr(w, key) is not None]
        return sum(values) / len(values) if values else None

    out = {"windows": len(windows), "requests": sum(w.completed for w in windows),
           "failed": sum(w.failed for w in windows),
           "counters_add_up": all(w.counters_add_up for w in windows)}
    for key in ("api_rss_mb", "tree_rss_mb", "e2el_p99_ms"):
        a, b = mean(first, key), mean(last, key)
        out[f"{key}_first"], out[f"{key}_last"] = a, b
        out[f"{key}_ratio"] = b / a if a and b is not None else None
    return out


def print_window(w: Window) -> None:
    tree = f"{w.tree_rss_mb:9.0f}" if w.tree_rss_mb is not None else f"{'-':>9}"
    print(f"{w.index:>4} {w.elapsed_s:8.0f} {w.completed:>5} {w.failed:>4} {w.e2el_p50_ms:8.1f} {w.e2el_p99_ms:8.1f} "
          f"{w.ttft_p99_ms:8.1f} {w.api_rss_mb:8.0f} {tree} {w.engine_tokens:8.0f} {w.routed_min:8.0f} "
          f"{'yes' if w.counters_add_up else 'NO':>5}", flush=True)


WINDOW_HEADER = (f"{'win':>4} {'t s':>8} {'ok':>5} {'err':>4} {'e2e p50':>8} {'e2e p99':>8} {'ttft p99':>8} "
                 f"{'api MB':>8} {'tree MB':>9} {'tokens':>8} {'routed':>8} {'adds':>5}")


def as_dicts(windows: list[Window]) -> list[dict]:
    return [asdict(w) | {"counters_add_up": w.counters_add_up} for w in windows]
