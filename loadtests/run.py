"""Drives `vllm bench serve` (vLLM's own load generator) at each load level of a profile and
reads the server's routing counters around every level."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path

from loadtests.profiles import Profile
from loadtests.report import level_row, routing_counters, routing_figures


def bench_args(url: str, model: str, tokenizer: str, profile: Profile, num_prompts: int, *,
               concurrency: int | None, rate: float | None, dataset: Path | None, api_key: str | None,
               slo_ttft_ms: float, slo_tpot_ms: float, seed: int) -> list[str]:
    args = ["--backend", profile.backend, "--base-url", url, "--endpoint", profile.endpoint, "--model", model,
            "--tokenizer", tokenizer, "--num-prompts", str(num_prompts), "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--goodput", f"ttft:{slo_ttft_ms}", f"tpot:{slo_tpot_ms}", "--disable-tqdm", "--ignore-eos"]
    if dataset is None:
        args += ["--dataset-name", "random", "--random-input-len", str(profile.input_len),
                 "--random-output-len", str(profile.output_len), "--random-range-ratio", str(profile.range_ratio)]
    else:  # a JSONL file of {"prompt": ...} lines
        args += ["--dataset-name", "custom", "--dataset-path", str(dataset), "--custom-output-len",
                 str(profile.output_len), "--skip-chat-template"]
    if concurrency is not None:
        args += ["--max-concurrency", str(concurrency), "--request-rate", "inf"]
    else:
        args += ["--request-rate", str(rate)]
    if api_key:
        args += ["--header", f"Authorization=Bearer {api_key}"]
    return args


def run_level(argv: list[str], quiet: bool = True) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main_async
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        return asyncio.run(main_async(args))


def run_profile(url: str, model: str, tokenizer: str, profile: Profile, *, concurrency: list[int] | None = None,
                rates: list[float] | None = None, num_prompts: int = 32, dataset: Path | None = None,
                api_key: str | None = None, slo_ttft_ms: float = 2000.0, slo_tpot_ms: float = 200.0,
                seed: int = 0) -> list[dict]:
    """One row per load level: closed loop (concurrency) or open loop (request rate)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    levels = [(f"c={c}", c, None) for c in concurrency or []] + [(f"{r}/s", None, r) for r in rates or []]
    rows = []
    for label, c, r in levels:
        before = routing_counters(url, headers)
        bench = run_level(bench_args(url, model, tokenizer, profile, num_prompts, concurrency=c, rate=r,
                                     dataset=dataset, api_key=api_key, slo_ttft_ms=slo_ttft_ms,
                                     slo_tpot_ms=slo_tpot_ms, seed=seed))
        rows.append(level_row(label, bench, routing_figures(before, routing_counters(url, headers))))
    return rows
