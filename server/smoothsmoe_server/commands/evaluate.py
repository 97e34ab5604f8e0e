"""`smoothsmoe eval`: what smoothing does to a model, measured on your text before you serve it.

For each configuration (stock; smoothed at each budget, eps calibrated to it as `serve`
calibrates; the same again at each --top-k other than the model's) it reports:
  cost       mean active experts per token, from the layers' own counters, on the text
  quality    negative log-likelihood of the text from vLLM's prompt logprobs (windows of
             --window tokens; each window's first token is context only), and its change
             against stock at the model's top-k
  stability  the model's own input embeddings of --samples short prefixes of the text, plus
             Gaussian noise of relative size sigma (noise norm = sigma x the embedding's norm,
             the same draws for every configuration), fed back as prompt embeddings: the mean
             total-variation distance of the next-token distribution from the clean one's, and
             how often its argmax changes. Top-k routing jumps where a token sits near a
             routing boundary; the band makes the layer continuous, so the distance shrinks
             with sigma.

Each (top-k, stock or smoothed) pair of settings runs in its own vLLM engine, in a child
process (`python -m smoothsmoe_server.commands.evaluate --engine SPEC OUT`), because the plugin's
options are fixed when an engine builds its layers; smoothed budgets share one engine and
one calibration recording. Output: a table, a JSON file and a PNG of the trade-offs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from smoothsmoe_server.commands import engine_setup

DEFAULT_BUDGETS = "0,0.25,0.5,1.0"
DEFAULT_NOISE = "1e-3,1e-2"
FULL_VOCAB_MAX = 4096  # vocabularies up to this size get exact distances; larger ones the top-N (a lower bound)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """One engine's job, written to a JSON file for the child process."""

    engine_kwargs: dict  # vllm.LLM keywords
    options: dict  # SmoothingOptions fields
    budgets: list[float]  # smoothed engines: one configuration per budget; stock engines: []
    windows: list[list[int]]  # token ids scored for NLL
    samples: list[list[int]]  # token ids of the stability prefixes
    noise: list[float]
    seed: int
    top_logprobs: int  # 0: the whole vocabulary (if small enough)


# ---------------------------------------------------------------- the child: one engine


def run_engine(spec: EngineSpec) -> list[dict]:
    """All configurations of one engine: [{budget, eps, cost, nll, clean distributions, stability}]."""
    os.environ.update({"SMOOTHSMOE_OPTIONS": json.dumps(spec.options)})
    from vllm import LLM, SamplingParams

    from smoothsmoe_server.models.calibration_prompts import CALIBRATION_PROMPTS
    from smoothsmoe_server.options import WORKER_EXTENSION

    vocab = _vocab_size(spec.engine_kwargs)
    top = spec.top_logprobs or min(vocab, FULL_VOCAB_MAX)
    # No prefix caching: KV computed at one eps must not serve the next configuration.
    llm = LLM(**{**spec.engine_kwargs, "enable_prefix_caching": False}, worker_extension_cls=WORKER_EXTENSION,
              enable_prompt_embeds=True, max_logprobs=top)
    smoothed = spec.options["enabled"]
    eps_by_budget: dict[float, dict[int, float]] = {None: {}}
    if smoothed:  # the calibration `serve` runs at start-up, recorded once for every budget
        llm.collective_rpc("smoothsmoe_start_recording")
        llm.generate(CALIBRATION_PROMPTS, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        eps_by_budget = {b: e for b, e in zip(spec.budgets, llm.collective_rpc(
            "smoothsmoe_fit_eps", args=(spec.budgets,))[0].values())}
    embeds = llm.collective_rpc("smoothsmoe_embed", args=(spec.samples,))[0]
    noisy = {sigma: _perturbed(embeds, sigma, spec.seed) for sigma in spec.noise}
    results = []
    for budget, eps in eps_by_budget.items():
        if smoothed:
            llm.collective_rpc("smoothsmoe_set_eps", args=(eps,))
        llm.collective_rpc("smoothsmoe_reset")
        nll, tokens = _score(llm, spec.windows)
        cost = _cost(llm.collective_rpc("smoothsmoe_snapshot")[0])
        clean = _next_token_dists(llm, embeds, top)
        stability = {}
        for sigma, perturbed in noisy.items():
            dists = _next_token_dists(llm, perturbed, top)
            tvs = list(map(total_variation, clean, dists))
            stability[str(sigma)] = {
                "tv": sum(tvs) / len(tvs),
                "tv_max": max(tvs),
                "flip": sum(_argmax(p) != _argmax(q) for p, q in zip(clean, dists)) / len(clean),
            }
        results.append({"budget": budget, "eps": eps, **cost, "nll": nll / tokens, "tokens": tokens,
                        "clean": clean, "stability": stability, "exact_distances": top >= vocab})
        print(f"smoothsmoe eval: {'smoothed' if smoothed else 'stock'} top_k {cost['top_k']}"
              + (f" budget {budget}" if smoothed else "") + f": NLL {nll / tokens:.4f}", file=sys.stderr, flush=True)
    return results


def _vocab_size(engine_kwargs: dict) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(engine_kwargs["model"],
                                        trust_remote_code=engine_kwargs.get("trust_remote_code", False))
    return getattr(config.get_text_config(), "vocab_size", None) or FULL_VOCAB_MAX + 1


def _score(llm, windows: list[list[int]]) -> tuple[float, int]:
    """Summed negative log-likelihood of every window token but the first, and how many tokens that is."""
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=True)
    total, n = 0.0, 0
    for window, out in zip(windows, outs):
        for pos in range(1, len(window)):
            total -= out.prompt_logprobs[pos][window[pos]].logprob
            n += 1
    return total, n


def _cost(snapshot: dict) -> dict:
    """Mean active experts per token and extras per token over the MoE layers, from their counters."""
    from smoothsmoe_kernels.stats import EXTRAS_INDEX, TOKENS_INDEX

    layers = snapshot["layers"]
    extras = [s["stats"][EXTRAS_INDEX] / max(s["stats"][TOKENS_INDEX], 1) for s in layers]
    top_k = layers[0]["top_k"]
    return {"top_k": top_k, "active_experts": sum(s["top_k"] for s in layers) / len(layers) + sum(extras) / len(extras),
            "extras_per_token": sum(extras) / len(extras), "layer_tokens": layers[0]["stats"][TOKENS_INDEX]}


def _perturbed(embeds: list, sigma: float, seed: int) -> list:
    """Each prefix's embeddings plus N(0, 1) noise scaled to sigma x each row's norm; the draw depends
    on the seed and the prefix only, so every configuration and every sigma sees the same directions."""
    import torch

    out = []
    for i, e in enumerate(embeds):
        z = torch.randn(e.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
        scale = sigma * e.float().norm(dim=-1, keepdim=True) / math.sqrt(e.shape[-1])
        out.append((e.float() + scale * z).to(e.dtype))
    return out


def _next_token_dists(llm, embeds: list, top: int) -> list[dict[int, float]]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_embeds": e} for e in embeds],
                        SamplingParams(max_tokens=1, temperature=0.0, logprobs=top), use_tqdm=False)
    return [{t: math.exp(lp.logprob) for t, lp in out.outputs[0].logprobs[0].items()} for out in outs]


def total_variation(p: dict[int, float], q: dict[int, float]) -> float:
    """Half the L1 distance; tokens one side did not return count as probability 0 there."""
    return 0.5 * sum(abs(p.get(t, 0.0) - q.get(t, 0.0)) for t in p.keys() | q.keys())


def _argmax(p: dict[int, float]) -> int:
    return max(p, key=lambda t: (p[t], -t))


# ---------------------------------------------------------------- the parent: configurations, report


def parse_args(argv: list[str]) -> argparse.Namespace:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="smoothsmoe eval",
        description="Cost, quality and stability of smoothed routing on your model and text, against stock.")
    parser.add_argument("model_tag", nargs="?", default=None, help="The model (default: the embedded tiny MoE).")
    parser.add_argument("--text", required=True, type=Path, help="A text file to score (plain UTF-8).")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                        help="Smoothed configurations: mean extra experts per token each is calibrated to.")
    parser.add_argument("--top-k", default="", help="Also evaluate at these top-k (comma-separated), stock and "
                        "smoothed: e.g. 1 on a top-2 model (as --smooth-top-k on serve).")
    parser.add_argument("--noise", default=DEFAULT_NOISE, help="Relative sizes sigma of the input noise.")
    parser.add_argument("--window", type=int, default=256, help="Tokens per scored window.")
    parser.add_argument("--max-text-tokens", type=int, default=16384, help="Score at most this many tokens.")
    parser.add_argument("--samples", type=int, default=64, help="Prefixes for the stability measurement.")
    parser.add_argument("--sample-len", type=int, default=32, help="Tokens per stability prefix.")
    parser.add_argument("--top-logprobs", type=int, default=0,
                        help=f"Tokens of each next-token distribution compared (0: all, for vocabularies up to "
                        f"{FULL_VOCAB_MAX}; else the top 1024, which makes the distance a lower bound).")
    parser.add_argument("--noise-seed", type=int, default=0, help="Seed of the noise draws.")
    parser.add_argument("--smooth-max-extra", dest="max_extra", type=int, default=2,
                        help="Cap on extra experts per token (as on serve).")
    parser.add_argument("--out", type=Path, default=Path("smoothsmoe-eval.json"), help="The JSON report.")
    parser.add_argument("--plot", type=Path, default=Path("smoothsmoe-eval.png"), help="The PNG (needs matplotlib).")
    parser = EngineArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    engine_setup.resolve_model(args, parser)  # the default model, sized for a CPU, as serve does
    args.budget_list = _floats(parser, "--budgets", args.budgets)
    args.noise_list = _floats(parser, "--noise", args.noise)
    args.top_k_list = [int(k) for k in args.top_k.split(",") if k.strip()] if args.top_k else []
    if any(b > args.max_extra for b in args.budget_list):
        parser.error(f"--budgets must be in [0, --smooth-max-extra={args.max_extra}]")
    if any(k < 1 for k in args.top_k_list) or args.window < 2 or args.samples < 1 or args.sample_len < 1:
        parser.error("--top-k values must be >= 1, --window >= 2, --samples and --sample-len >= 1")
    return args


def _floats(parser, flag: str, text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        parser.error(f"{flag}: comma-separated numbers, got {text!r}")
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        parser.error(f"{flag}: finite numbers >= 0, got {text!r}")
    return values


def text_windows(token_ids: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of `window` tokens (the last may be shorter, if it has 2 or more)."""
    return [w for w in (token_ids[i:i + window] for i in range(0, len(token_ids), window)) if len(w) >= 2]


def stability_prefixes(token_ids: list[int], samples: int, length: int) -> list[list[int]]:
    """`samples` prefixes of `length` tokens starting at evenly spaced points of the text."""
    length = min(length, len(token_ids))
    span = len(token_ids) - length
    return [token_ids[(i * span) // max(samples - 1, 1):][:length] for i in range(samples)]


def evaluate(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    ids = tokenizer(args.text.read_text(), add_special_tokens=False)["input_ids"][: args.max_text_tokens]
    if len(ids) < 2:
        raise SystemExit(f"{args.text}: fewer than 2 tokens")
    windows, samples = text_windows(ids, args.window), stability_prefixes(ids, args.samples, args.sample_len)
    # What the child can read back: the engine flags the user changed, as JSON.
    engine_kwargs = json.loads(json.dumps(engine_setup.changed_engine_args(args), default=str))
    configs = []
    for top_k in [0, *args.top_k_list]:
        for enabled in (False, True):
            options = {"enabled": enabled, "eps": "auto", "budget": 0.0, "max_extra": args.max_extra,
                       "top_k": top_k, "model": args.model}
            spec = EngineSpec(engine_kwargs, options, args.budget_list if enabled else [], windows, samples,
                              args.noise_list, args.noise_seed, args.top_logprobs)
            for r in _run_child(spec):
                r["name"] = ("smoothed" if enabled else "stock") + (f" k={r['top_k']}" if top_k else "") + (
                    f" b={r['budget']:g}" if enabled else "")
                r["smoothed"] = enabled
                configs.append(r)
    return report(configs, args, len(ids))


def _run_child(spec: EngineSpec) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="smoothsmoe-eval-") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")}
        run = subprocess.run([sys.executable, "-m", "smoothsmoe_server.commands.evaluate", "--engine", str(spec_path),
                              str(out_path)], env=env)
        if run.returncode != 0:
            raise SystemExit(f"smoothsmoe eval: the engine for {spec.options} failed (exit {run.returncode})")
        results = json.loads(out_path.read_text())
    for r in results:  # JSON made the distributions' keys strings
        r["clean"] = [{int(t): p for t, p in d.items()} for d in r["clean"]]
    return results


def report(configs: list[dict], args: argparse.Namespace, text_tokens: int) -> dict:
    """Changes against stock at the model's top-k; the table, the JSON and the plot."""
    stock = configs[0]
    stock_at = {c["top_k"]: c for c in configs if not c["smoothed"]}
    for c in configs:
        c["delta_nll"] = c["nll"] - stock["nll"]
        c["perplexity"] = math.exp(c["nll"])
        c["extra_overhead"] = c["active_experts"] / stock["active_experts"] - 1
        c["tv_vs_stock"] = _mean_tv(c["clean"], stock["clean"])
        c["tv_vs_stock_at_k"] = _mean_tv(c["clean"], stock_at[c["top_k"]]["clean"])
    body = {
        "model": args.model, "text": str(args.text), "text_tokens": text_tokens, "window": args.window,
        "samples": args.samples, "sample_len": args.sample_len, "noise": args.noise_list,
        "noise_seed": args.noise_seed, "exact_distances": all(c["exact_distances"] for c in configs),
        "configs": [{k: v for k, v in c.items() if k != "clean"} for c in configs],
    }
    args.out.write_text(json.dumps(body, indent=2) + "\n")
    print(format_table(body))
    plotted = plot(body, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if plotted else " (no plot: matplotlib is not installed)"))
    return body


def _mean_tv(a: list[dict[int, float]], b: list[dict[int, float]]) -> float:
    return sum(map(total_variation, a, b)) / len(a)


def format_table(body: dict) -> str:
    """One row per configuration; per sigma the mean and the largest TV distance over the prefixes."""
    sigmas = [str(s) for s in body["noise"]]
    head = (f"{'configuration':<20} {'active':>7} {'extra%':>7} {'NLL':>8} {'dNLL':>9} {'ppl':>8} {'TV stock':>9}"
            + "".join(f" {'TV@' + s:>10} {'max@' + s:>10}" for s in sigmas))
    rows = [head]
    for c in body["configs"]:
        rows.append(f"{c['name']:<20} {c['active_experts']:7.3f} {100 * c['extra_overhead']:7.2f} {c['nll']:8.4f}"
                    f" {c['delta_nll']:+9.5f} {c['perplexity']:8.2f} {c['tv_vs_stock']:9.5f}"
                    + "".join(f" {c['stability'][s]['tv']:10.6f} {c['stability'][s]['tv_max']:10.6f}" for s in sigmas))
    note = "" if body["exact_distances"] else "\n(TV over each distribution's top tokens: a lower bound)"
    return "\n".join(rows) + note


def plot(body: dict, path: Path) -> bool:
    """Quality and stability against cost, one point per configuration; the largest TV against sigma."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    configs, sigmas = body["configs"], [s for s in body["noise"] if s > 0]
    fig, (ax_q, ax_s, ax_n) = plt.subplots(1, 3, figsize=(15, 4.3))
    markers = "os^vD"
    for c in configs:
        x, color = c["active_experts"], "tab:blue" if c["smoothed"] else "black"
        ax_q.scatter(x, c["delta_nll"], color=color)
        ax_q.annotate(c["name"], (x, c["delta_nll"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for i, s in enumerate(sigmas):
            ax_s.scatter(x, c["stability"][str(s)]["tv_max"], color=color, marker=markers[i % len(markers)],
                         label=f"sigma = {s:g}" if c is configs[0] else None)
        if sigmas:
            ax_n.plot(sigmas, [c["stability"][str(s)]["tv_max"] for s in sigmas], "o-" if c["smoothed"] else "s--",
                      label=c["name"])
    ax_q.set(xlabel="active experts per token", ylabel="NLL change against stock (nats/token)", title="quality")
    if sigmas:
        ax_s.set(xlabel="active experts per token (black: stock)", yscale="log",
                 ylabel="largest TV distance over the prefixes", title="stability (lower is steadier)")
        ax_s.legend(fontsize=7)
        ax_n.set(xscale="log", yscale="log", xlabel="sigma (relative input noise)",
                 ylabel="largest TV distance over the prefixes", title="continuity: does it go to 0 with sigma?")
        ax_n.legend(fontsize=7)
    fig.suptitle(f"smoothsmoe eval: {Path(body['model']).name}, {body['text_tokens']} tokens, "
                 f"{body['samples']} prefixes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    if argv[:1] == ["--engine"]:  # the child: one engine's configurations
        spec = EngineSpec(**json.loads(Path(argv[1]).read_text()))
        Path(argv[2]).write_text(json.dumps(run_engine(spec)))
        return 0
    evaluate(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
