"""Generation speed of `smoothsmoe serve`, smoothing off and on, in one run.

    python -m loadtests.throughput [MODEL] [--requests 16 --max-tokens 64 --rounds 3]

Starts the server once per configuration, one after another, on the same
machine, and sends each the same batch of concurrent greedy requests (fixed
length: ignore_eos). Prints generated tokens/s, the mean active experts read
off /metrics, and each configuration's ratio to smoothing off:
  off   --no-smoothing: stock top-k at width k (the baseline)
  on    smoothing at the defaults (eps auto, budget 0.5, width k + 2)
  eps0  --smooth-eps 0: stock routing at width k + 2, every extra slot padded;
        what the padded slots cost vLLM's experts kernel, which computes them
  ours  smoothing at the defaults with --smooth-experts smoothsmoe: this
        project's experts on active pairs only (Triton on CUDA, torch on the CPU)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time

import openai

from loadtests.metrics_scrape import metric_samples
from loadtests.prompts import PROSE_PROMPTS
from loadtests.server_process import ServerProcess, served_model, smoothsmoe_command

CONFIGS = {"off": ["--no-smoothing"], "on": ["--smooth-experts", "vllm"], "eps0": ["--smooth-eps", "0"],
           "ours": ["--smooth-experts", "smoothsmoe"]}


def routing_totals(url: str) -> tuple[float, float]:
    """(tokens routed, active experts) summed over layers."""
    tokens = active = 0.0
    for s in metric_samples(url):
        if s.name == "smoothsmoe_tokens_routed_total":
            tokens += s.value
        elif s.name == "smoothsmoe_active_experts_total":
            active += s.value
    return tokens, active


async def one_round(url: str, model: str, requests: int, max_tokens: int) -> tuple[float, int]:
    prompts = [PROSE_PROMPTS[i % len(PROSE_PROMPTS)] for i in range(requests)]
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(
            client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0.0,
                                      extra_body={"ignore_eos": True}) for p in prompts))
        return time.perf_counter() - start, sum(r.usage.completion_tokens for r in results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model to serve (default: the embedded tiny MoE)")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration (median reported)")
    parser.add_argument("--configs", default="off,on,eps0,ours")
    parser.add_argument("--port", type=int, help="port of the servers it starts, one after the other "
                        "(default: a free one)")
    args = parser.parse_args(argv)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    base = smoothsmoe_command("serve", *([args.model] if args.model else []))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.model or 'the default model'}; "
          f"{args.requests} concurrent requests x {args.max_tokens} tokens, median of {args.rounds} rounds")
    print(f"{'config':>6} {'start s':>8} {'tok/s':>8} {'ratio':>6} {'active/token':>13}")
    baseline = None
    with tempfile.TemporaryDirectory() as logs:
        for name in args.configs.split(","):
            server = ServerProcess(name, [*base, *CONFIGS[name]], env, logs, port=args.port)
            try:
                served, _ = served_model(server.url)
                tokens0, active0 = routing_totals(server.url)
                speeds = []
                for _ in range(args.rounds):
                    seconds, tokens = asyncio.run(one_round(server.url, served, args.requests, args.max_tokens))
                    speeds.append(tokens / seconds)
                tokens1, active1 = routing_totals(server.url)
            finally:
                server.stop()
            speed = statistics.median(speeds)
            baseline = baseline or speed
            active = (active1 - active0) / max(tokens1 - tokens0, 1)
            print(f"{name:>6} {server.started_in:8.1f} {speed:8.1f} {speed / baseline:6.3f} {active:13.3f}")


if __name__ == "__main__":
    main()
