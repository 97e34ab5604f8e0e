"""Fixed against online eps over a traffic shift: extras per token and eps against time.

    python -m loadtests.eps_online [--phase-s 40] [--out DIR]

Starts `smoothsmoe serve` twice, one after the other (fixed: --smooth-eps auto;
online: --smooth-eps online), on the drift model that `smoothsmoe drift-model DIR`
builds (the default model with a second "language" in its vocabulary: the
default model's random weights route any text alike; its drift.json names the
drift tokens), and sends each the same two traffic mixes in turn:
  A  prose (loadtests.prompts; the default model routes any prose alike, so
     this is the traffic auto calibrated eps on, as far as routing can tell)
  B  prompts of the drift tokens (router inputs auto never saw)
Every SAMPLE_S it reads /metrics: each layer's eps, and its extras per token
over the tokens routed since the last sample. Writes eps_online.json and
eps_online.png (extras per token and eps against time, fixed dashed, online
solid) and prints each layer's mean extras per token over the second half of
each phase, and, for the online run's settled part of B, how far means over
windows of 18 to 54 s stray from the budget (what tests/server/test_eps_online.py
allows for; --phase-s 100 for enough windows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import openai

from loadtests.metrics_scrape import metric_samples
from loadtests.prompts import PROSE_PROMPTS
from loadtests.server_process import ServerProcess, served_model, smoothsmoe_command

SAMPLE_S = 0.5
SETTLE_WINDOWS = 20  # the settling time smoothsmoe_kernels.eps_control states
CONCURRENCY = 8
DRIFT_PROMPT_TOKENS = 48  # short: tokens of one prompt route alike, so many prompts make a steady mean


def read_layers(url: str, headers: dict | None = None) -> dict[str, dict[str, float]]:
    """{layer: {"tokens", "extras", "eps"}} from the server's /metrics."""
    names = {"smoothsmoe_tokens_routed_total": "tokens", "smoothsmoe_extra_experts_total": "extras",
             "smoothsmoe_epsilon": "eps"}
    out: dict[str, dict[str, float]] = {}
    for s in metric_samples(url, headers):
        if s.name in names:
            out.setdefault(s.labels["layer"], {})[names[s.name]] = s.value
    return out


def build_drift_model(out: Path) -> tuple[Path, range]:
    """Build (once) the drift model in `out` with `smoothsmoe drift-model`; return it and its drift token ids."""
    subprocess.run(smoothsmoe_command("drift-model", str(out)), check=True, stdout=subprocess.DEVNULL)
    first, stop = json.loads((Path(out) / "drift.json").read_text())["token_ids"]
    return Path(out), range(first, stop)


def mix_prompt(mix: str, rng: random.Random, prose: Sequence[str], drift_ids: Sequence[int]) -> str | list[int]:
    if mix == "A":
        return rng.choice(prose)
    return [rng.choice(drift_ids) for _ in range(DRIFT_PROMPT_TOKENS)]


async def send(url: str, model: str, mix: str, seconds: float, api_key: str, seed: int,
               prose: Sequence[str], drift_ids: Sequence[int]) -> None:
    """CONCURRENCY clients sending mix requests back to back for `seconds`."""
    rng = random.Random(seed)
    stop = time.monotonic() + seconds
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600) as client:
        async def client_loop() -> None:
            while time.monotonic() < stop:
                await client.completions.create(model=model, prompt=mix_prompt(mix, rng, prose, drift_ids),
                                                max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True})
        await asyncio.gather(*(client_loop() for _ in range(CONCURRENCY)))


async def run_phases(url: str, model: str, phases: list[tuple[str, float]], drift_ids: Sequence[int],
                     prose: Sequence[str] = PROSE_PROMPTS, api_key: str = "none", seed: int = 0) -> list[dict]:
    """Send each (mix, seconds) in turn (A: `prose`, B: prompts of `drift_ids`); sample every layer
    every SAMPLE_S. Returns the samples."""
    headers = {"Authorization": f"Bearer {api_key}"}
    samples: list[dict] = []
    start = time.monotonic()

    async def sample(phase: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            layers = await asyncio.to_thread(read_layers, url, headers)
            samples.append({"t": time.monotonic() - start, "phase": phase, "layers": layers})
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_S)
            except TimeoutError:
                pass

    for i, (mix, seconds) in enumerate(phases):
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(mix, stop))
        await send(url, model, mix, seconds, api_key, seed + i, prose, drift_ids)
        stop.set()
        await sampler
    return samples


def window_extras(samples: list[dict], phase: str, t_from: float, t_to: float = float("inf")) -> dict[str, float]:
    """Per layer: extras / tokens routed between the first and last sample of `phase` within [t_from, t_to]."""
    picked = [s for s in samples if s["phase"] == phase and t_from <= s["t"] <= t_to]
    first, last = picked[0]["layers"], picked[-1]["layers"]
    return {layer: (last[layer]["extras"] - first[layer]["extras"])
            / max(1.0, last[layer]["tokens"] - first[layer]["tokens"]) for layer in last}


def settled_from(samples: list[dict], tokens: int) -> float:
    """The time by which every layer has routed `tokens` tokens of phase B (20 windows: the stated settling)."""
    b = [s for s in samples if s["phase"] == "B"]
    start = b[0]["layers"]
    for s in b:
        if all(s["layers"][k]["tokens"] - start[k]["tokens"] >= tokens for k in start):
            return s["t"]
    raise AssertionError(f"phase B did not route {tokens} tokens")


def rest_spread(samples: list[dict], budget: float, t_from: float, seconds: float) -> list[float]:
    """Windows of `seconds` sliding by 1 s from t_from to the end of phase B: for each, the
    worst layer's |mean extras per token / budget - 1|. At rest, how far a mean over that much
    traffic strays by itself: what a check of "at the budget" over such a window must allow."""
    t_end = max(s["t"] for s in samples if s["phase"] == "B")
    out, t = [], t_from
    while t + seconds <= t_end:
        out.append(max(abs(m / budget - 1) for m in window_extras(samples, "B", t, t + seconds).values()))
        t += 1.0
    return out


def series(samples: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """Per layer: (t, extras per token since the previous sample, eps) for each sample after the first."""
    out: dict[str, list] = {}
    for prev, cur in zip(samples, samples[1:]):
        for layer, c in cur["layers"].items():
            p = prev["layers"][layer]
            tokens = c["tokens"] - p["tokens"]
            if tokens > 0:
                out.setdefault(layer, []).append((cur["t"], (c["extras"] - p["extras"]) / tokens, c["eps"]))
    return out


def plot(runs: dict[str, list[dict]], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_x, ax_e) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, samples in runs.items():
        style = "--" if name == "fixed" else "-"
        for i, (layer, points) in enumerate(sorted(series(samples).items())):
            t, extras, eps = zip(*points)
            color = f"C{i}"
            ax_x.plot(t, extras, style, color=color, lw=1, label=f"{name}, layer {layer}")
            ax_e.plot(t, eps, style, color=color, lw=1)
        shift = next(s["t"] for s in samples if s["phase"] == "B")
        for ax in (ax_x, ax_e):
            ax.axvline(shift, color="grey", lw=0.8)
    ax_x.axhline(budget, color="black", lw=0.8)
    ax_x.set_ylabel("extras per token")
    ax_e.set_ylabel("eps")
    ax_e.set_xlabel("seconds (grey line: traffic shifts from the built-in prompts A to drift-token prompts B)")
    ax_x.legend(fontsize=7, ncol=2)
    ax_x.set_title("--smooth-eps auto (dashed) against online (solid), budget 0.5")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtests.eps_online", description=__doc__.splitlines()[0])
    ap.add_argument("--phase-s", type=float, default=40.0, help="seconds of each traffic mix")
    ap.add_argument("--window", type=int, default=1024, help="--smooth-eps-window of the online server")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "smoothsmoe-drift-model",
                    help="where the drift model is built (once)")
    ap.add_argument("--port", type=int, help="port of the servers it starts, one after the other "
                    "(default: a free one)")
    args = ap.parse_args(argv)
    model_path, drift_ids = build_drift_model(args.model_dir)
    configs = {"fixed": ["--smooth-eps", "auto"],
               "online": ["--smooth-eps", "online", "--smooth-eps-window", str(args.window)]}
    runs: dict[str, list[dict]] = {}
    logs = Path(tempfile.mkdtemp(prefix="eps-online-"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    for name, flags in configs.items():
        server = ServerProcess(name, smoothsmoe_command("serve", str(model_path), "--max-model-len", "2048", *flags),
                               env, logs, port=args.port)
        try:
            model, _ = served_model(server.url)
            runs[name] = asyncio.run(run_phases(server.url, model, [("A", args.phase_s), ("B", args.phase_s)],
                                                drift_ids))
        finally:
            server.stop()
    budget = 0.5
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eps_online.json").write_text(json.dumps(runs) + "\n")
    plot(runs, budget, args.out / "eps_online.png")
    print(f"mean extras per token over the second half of each phase (budget {budget}):")
    for name, samples in runs.items():
        for phase in ("A", "B"):
            ts = [s["t"] for s in samples if s["phase"] == phase]
            means = window_extras(samples, phase, (ts[0] + ts[-1]) / 2)
            print(f"  {name:6s} {phase}: " + "  ".join(f"layer {k} {v:.3f}" for k, v in sorted(means.items())))
    t0 = settled_from(runs["online"], SETTLE_WINDOWS * args.window)
    print(f"online, B, settled {t0:.0f} s in: the worst layer's distance from the budget over windows of")
    for seconds in (18, 27, 36, 48, 54):
        spread = sorted(rest_spread(runs["online"], budget, t0, seconds))
        if spread:
            pct = [spread[min(len(spread) - 1, int(q * len(spread)))] for q in (0.5, 0.9, 0.99)]
            print(f"  {seconds:3d} s ({len(spread)} windows): p50 {pct[0]:.1%}  p90 {pct[1]:.1%}  p99 {pct[2]:.1%}"
                  f"  max {spread[-1]:.1%}  over 5 %: {sum(d > 0.05 for d in spread) / len(spread):.0%}")
    print(f"wrote {args.out / 'eps_online.json'} and {args.out / 'eps_online.png'}")


if __name__ == "__main__":
    main()
