"""python -m loadtests run|compare|soak: latency and throughput under load.

  run      against any OpenAI-compatible URL serving the model
  compare  starts `smoothsmoe serve` with smoothing on and off (and, with --stock,
           vLLM's own server without the plugin), runs the same profile against
           each, prints the tables and their ratios
  soak     a steady request rate for a long time (default an hour), in windows:
           memory, latency and the routing counters' check per window (soak.py);
           against --url, or a `smoothsmoe serve` it starts (then the memory of
           the server's whole process tree is followed too)
Reports go to the terminal, a JSON file and a PNG plot (--out, default loadtest-results/).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from loadtests.profiles import PROFILES
from loadtests.report import print_table, save
from loadtests.run import run_profile

GOAL_SLACK = 0.03  # what smoothing may cost beyond its extra pairs, as a fraction of the stock cost


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "compare"):
        s = sub.add_parser(name)
        s.add_argument("--profile", choices=sorted(PROFILES), default="short-chat")
        load = s.add_mutually_exclusive_group()
        load.add_argument("--concurrency", default=None, help="closed loop: comma list, e.g. 1,4,16")
        load.add_argument("--request-rate", default=None, help="open loop, requests/s: comma list, e.g. 1,2,4")
        s.add_argument("--num-prompts", type=int, default=32, help="requests per load level")
        s.add_argument("--dataset", type=Path, help="JSONL of {\"prompt\": ...} instead of synthetic prompts")
        s.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="goodput SLO on time to first token")
        s.add_argument("--slo-tpot-ms", type=float, default=200.0, help="goodput SLO on time per output token")
        s.add_argument("--out", type=Path, default=Path("loadtest-results"))
        s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
        if name == "run":
            s.add_argument("--url", required=True, help="server base URL, e.g. http://localhost:8000")
            s.add_argument("--model", required=True, help="served model name")
            s.add_argument("--tokenizer", required=True, help="tokenizer (path or name) to size synthetic prompts")
        else:
            s.add_argument("model", nargs="?", help="model to serve (default: the embedded tiny MoE)")
            s.add_argument("--port", type=int, help="port of the servers it starts, one after the other "
                           "(default: a free one)")
            s.add_argument("--stock", action="store_true", help="also stock vLLM (its OpenAI server, no plugin loaded) "
                           "on the same checkpoint: the ratios against it too")
    s = sub.add_parser("soak")
    s.add_argument("--profile", choices=sorted(PROFILES), default="mixed")
    s.add_argument("--request-rate", type=float, default=4.0, help="open loop, requests/s")
    s.add_argument("--duration", type=float, default=3600.0, help="seconds in all")
    s.add_argument("--window", type=float, default=60.0, help="seconds per window")
    s.add_argument("--url", help="server base URL (default: start `smoothsmoe serve` on the model)")
    s.add_argument("--model", help="served model name (with --url), or the model to serve")
    s.add_argument("--tokenizer", help="tokenizer (path or name) to size synthetic prompts (with --url)")
    s.add_argument("--port", type=int, help="port of the server it starts (without --url; default: a free one)")
    s.add_argument("--out", type=Path, default=Path("loadtest-results"))
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    args = p.parse_args(argv)
    if args.command == "soak":
        if args.url and not (args.model and args.tokenizer):
            p.error("soak --url needs --model and --tokenizer")
        return args
    args.levels = {"concurrency": [int(c) for c in args.concurrency.split(",")] if args.concurrency else None,
                   "rates": [float(r) for r in args.request_rate.split(",")] if args.request_rate else None}
    if not args.concurrency and not args.request_rate:
        args.levels["concurrency"] = [1, 4]
    return args


def common(args) -> dict:
    return dict(num_prompts=args.num_prompts, dataset=args.dataset, api_key=args.api_key,
                slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, **args.levels)


def meta(args, url: str, extra: dict | None = None) -> dict:
    return {"profile": args.profile, "url": url, "num_prompts": args.num_prompts,
            "load_kind": "concurrency" if args.levels["concurrency"] else "request rate (req/s)",
            "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, "time": time.time(), **(extra or {})}


def cmd_run(args) -> None:
    rows = run_profile(args.url, args.model, args.tokenizer, PROFILES[args.profile], **common(args))
    print_table(rows, f"{args.profile} on {args.url}")
    paths = save(rows, meta(args, args.url), args.out, f"{args.profile}")
    print("wrote", *paths)


def cmd_compare(args) -> None:
    from loadtests.server_process import (
        ServerProcess,
        served_max_model_len,
        served_model,
        smoothsmoe_command,
        stock_vllm_command,
    )

    results = {}
    model_args = [args.model] if args.model else []

    def serve_and_run(name, argv, env, logs) -> tuple[str, str, int]:
        """Start the server, run the profile, print and save its table; the served (name, root, context length)."""
        server = ServerProcess(name, argv, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env}, Path(logs),
                               port=args.port)
        try:
            model, root = served_model(server.url)
            max_len = served_max_model_len(server.url)
            results[name] = run_profile(server.url, model, root, PROFILES[args.profile], **common(args))
        finally:
            server.stop()
        print_table(results[name], f"{args.profile}, " + ("stock vLLM" if name == "stock" else f"smoothing {name}"))
        save(results[name], meta(args, server.url, {"smoothing": name}), args.out, f"{args.profile}-{name}")
        return model, root, max_len

    with tempfile.TemporaryDirectory() as logs:
        model, root, max_len = serve_and_run("off", smoothsmoe_command("serve", *model_args, "--no-smoothing"), {},
                                             logs)
        if args.stock:  # the checkpoint and context length the "off" server loaded, no plugin at all
            serve_and_run("stock", stock_vllm_command(root, "--served-model-name", model, "--max-model-len",
                                                      str(max_len)), {"VLLM_PLUGINS": ""}, logs)
        serve_and_run("on", smoothsmoe_command("serve", *model_args), {}, logs)
    print_ratios(results["on"], results["off"], f"on / off ({args.profile})", goal=True)
    if args.stock:
        print_ratios(results["off"], results["stock"], "off / stock vLLM (the counters' cost)", goal=False)
        print_ratios(results["on"], results["stock"], "on / stock vLLM", goal=True)


def print_ratios(rows, base_rows, title: str, goal: bool) -> None:
    """Per load level, rows / base_rows of the latency and throughput columns; with goal, the level's
    goal (1 + the extra pairs measured in `rows` + GOAL_SLACK on ITL p50, its inverse on req/s) and
    whether it is met."""
    print(f"# ratios {title}" + (f"; the goal: smoothing costs its extra (token, expert) pairs and at most "
                                 f"{GOAL_SLACK:.2f} more,\n# i.e. ITL p50 <= 1 + extra pairs + {GOAL_SLACK:.2f} "
                                 "and req/s >= 1 / that" if goal else ""))
    print(f"{'load':>8} {'req/s':>7} {'tok/s':>7} {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'e2el p99':>9}"
          + (f" {'extra pairs':>11} {'goal itl':>8} {'goal req/s':>10} {'met':>4}" if goal else ""))
    for row, base in zip(rows, base_rows):
        ratio = {k: row[k] / base[k] if base[k] else float("nan") for k in
                 ("request_throughput", "output_throughput", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "e2el_p99_ms")}
        line = (f"{row['load']:>8} {ratio['request_throughput']:7.3f} {ratio['output_throughput']:7.3f} "
                f"{ratio['ttft_p50_ms']:9.3f} {ratio['ttft_p99_ms']:9.3f} {ratio['itl_p50_ms']:8.3f} "
                f"{ratio['e2el_p99_ms']:9.3f}")
        if goal:
            extra = row["extra_overhead"]  # extra pairs / top-k pairs, read off /metrics during this level
            goal_itl = 1 + extra + GOAL_SLACK
            met = ratio["itl_p50_ms"] <= goal_itl and ratio["request_throughput"] >= 1 / goal_itl
            line += f" {extra:11.3f} {goal_itl:8.3f} {1 / goal_itl:10.3f} {'yes' if met else 'NO':>4}"
        print(line)


def cmd_soak(args) -> None:
    import json

    from loadtests import soak

    def go(url, model, tokenizer, pid):
        print(f"# soak: {args.profile} at {args.request_rate}/s for {args.duration:.0f} s on {url}, "
              f"windows of {args.window:.0f} s")
        print(soak.WINDOW_HEADER)
        windows = soak.run_soak(url, model, tokenizer, PROFILES[args.profile], rate=args.request_rate,
                                duration_s=args.duration, window_s=args.window, api_key=args.api_key,
                                server_pid=pid, on_window=soak.print_window)
        result = soak.summary(windows)
        print("# summary (last quarter of the windows against the first)")
        for key, value in result.items():
            print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"soak-{args.profile}.json"
        path.write_text(json.dumps({"profile": args.profile, "url": url, "rate": args.request_rate,
                                    "window_s": args.window, "summary": result,
                                    "windows": soak.as_dicts(windows)}, indent=2) + "\n")
        print("wrote", path)

    if args.url:
        return go(args.url, args.model, args.tokenizer, None)
    from loadtests.server_process import ServerProcess, served_model, smoothsmoe_command

    argv = smoothsmoe_command("serve", *([args.model] if args.model else []))
    with tempfile.TemporaryDirectory() as logs:
        server = ServerProcess("soak", argv, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, Path(logs),
                               port=args.port)
        try:
            model, root = served_model(server.url)
            go(server.url, model, root, server.proc.pid)
        finally:
            server.stop()


def main(argv=None) -> None:
    args = parse(argv)
    {"run": cmd_run, "compare": cmd_compare, "soak": cmd_soak}[args.command](args)


if __name__ == "__main__":
    main()
