"""smoothsmoe serve|calibrate|eval|models|drift-model (python -m smoothsmoe_server does the same).

`serve` is `vllm serve` with a "Smoothing" group of flags: vLLM's own parser
and flags, passed through untouched. Our flags are generated from the fields
of SmoothingOptions, and the options reach vLLM's engine processes once, as
one JSON environment variable that the plugin's register() parses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from smoothsmoe_server.options import WORKER_EXTENSION, SmoothingOptions

MIDDLEWARE = ["smoothsmoe_server.api.app.MetricsRefresh", "smoothsmoe_server.api.app.OpenAIErrorBodies"]
# Flag help, keyed by SmoothingOptions field; `model` is not a flag (it is
# the served model name).
FLAG_HELP = {
    "enabled": "Smoothed routing on or off. Off serves stock top-k routing, still counted in /metrics.",
    "eps": "Band width per layer, in router-score units: a number (all layers), a JSON file from "
    "`smoothsmoe calibrate` (or the last line of a --smooth-eps-log file), 'auto': calibrated to "
    "--smooth-budget at start-up, then fixed, or 'online': calibrated, then each layer's eps follows its "
    "traffic to hold the budget.",
    "budget": "Target mean extra experts per token for eps=auto and online (the paper's k + 0.5 is 0.5).",
    "eps_window": "eps=online: tokens a layer routes between two updates of its eps (default 1024; each "
    "update corrects half the error, so a shift settles in about 8 windows).",
    "eps_range": "eps=online: each layer's eps stays within [eps0 / range, eps0 * range] of its calibrated eps0 "
    "(default 16); smoothsmoe_epsilon_bound shows the bounds.",
    "eps_log": "A file to append every layer's eps and counts to, once a second (JSON lines); its last line "
    "is a valid --smooth-eps file, to pin a tuned state.",
    "top_k": "Experts per token of every MoE layer, in place of the model's (0: the model's). With smoothing "
    "on, the band keeps a smaller top-k continuous (S2MoE's cheaper inference); with --no-smoothing it serves "
    "stock top-k at this k.",
    "max_extra": "Cap on extra experts per token; MoE layers run at width top_k + max_extra.",
    "experts": "Experts computation of smoothed layers: 'smoothsmoe' (this project's kernel: active pairs only; "
    "Triton on CUDA, torch elsewhere), 'vllm' (vLLM's own kernel, which also computes the inactive slots, "
    "at weight 0), or 'auto' (smoothsmoe on CUDA, vllm on the CPU).",
}


def add_smoothing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Smoothing", "SmoothSMoE routing (flags prefixed --smooth-)")
    defaults = SmoothingOptions()
    for f in dataclasses.fields(SmoothingOptions):
        if f.name not in FLAG_HELP:
            continue
        if f.type == "bool" or isinstance(getattr(defaults, f.name), bool):
            group.add_argument("--smoothing", dest=f"smooth_{f.name}", action=argparse.BooleanOptionalAction,
                               default=getattr(defaults, f.name), help=FLAG_HELP[f.name])
        else:
            kind = type(getattr(defaults, f.name))
            group.add_argument(f"--smooth-{f.name.replace('_', '-')}", dest=f"smooth_{f.name}", type=kind,
                               default=getattr(defaults, f.name), help=FLAG_HELP[f.name])


def options_from_args(args: argparse.Namespace, model: str) -> SmoothingOptions:
    values = {f.name: getattr(args, f"smooth_{f.name}") for f in dataclasses.fields(SmoothingOptions)
              if f.name in FLAG_HELP}
    return SmoothingOptions(**values, model=model)


def serve(argv: list[str]) -> int:
    import uvloop
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="smoothsmoe serve",
                                                    description="OpenAI-compatible server with smoothed MoE routing."))
    add_smoothing_args(parser)
    parser.add_argument("--metrics-require-api-key", action=argparse.BooleanOptionalAction, default=False,
                        help="Guard /metrics and /smoothsmoe/* with the API key too (by default only /v1/* "
                        "needs it, so that Prometheus scrapes without one). /health stays open.")
    args = parser.parse_args(argv)
    model_given = args.model_tag is not None or args.model != parser.get_default("model")
    if args.model_tag is not None:
        args.model = args.model_tag
    if not model_given:
        use_default_model(args)
    served = (args.served_model_name or [args.model])[0]
    options = options_from_args(args, served)
    from smoothsmoe_server.engine.eps import EpsPlan

    EpsPlan.parse(options.eps)  # a bad --smooth-eps fails here, not in a worker
    if args.worker_extension_cls not in ("", WORKER_EXTENSION):
        parser.error("--worker-extension-cls is taken by smoothsmoe (its counters and calibration live there)")
    if args.api_server_count not in (None, 1):
        parser.error("smoothsmoe serves its routing metrics from one API server: use --api-server-count 1")
    if args.metrics_require_api_key:
        from smoothsmoe_server.api.app import api_keys

        if not api_keys(args):
            parser.error("--metrics-require-api-key needs --api-key (or VLLM_API_KEY)")
    bind_cpu_workers(parser, args)
    args.worker_extension_cls = WORKER_EXTENSION
    # Listed innermost first: the error bodies wrap everything, the key check runs before a metrics refresh.
    keyed = ["smoothsmoe_server.api.app.KeyedMetrics"] if args.metrics_require_api_key else []
    args.middleware = [*args.middleware, MIDDLEWARE[0], *keyed, *MIDDLEWARE[1:]]
    os.environ.update(options.to_env())
    validate_parsed_serve_args(args)

    from smoothsmoe_server.api.app import run_server

    uvloop.run(run_server(args, options))
    return 0


def bind_cpu_workers(parser, args: argparse.Namespace) -> None:
    """On vLLM's CPU build with several ranks on one machine, bind their threads (see cpu_binding)."""
    from vllm.platforms import current_platform

    from smoothsmoe_server.commands.cpu_binding import ENV_VAR, default_binding

    if not current_platform.is_cpu() or os.environ.get(ENV_VAR, "auto") != "auto":
        return
    try:
        binding = default_binding(args.tensor_parallel_size * args.pipeline_parallel_size)
    except ValueError as e:
        parser.error(str(e))
    if binding is not None:
        os.environ[ENV_VAR] = binding
        print(f"smoothsmoe: one NUMA node for several CPU workers: {ENV_VAR}={binding!r}", file=sys.stderr)


def use_default_model(args: argparse.Namespace) -> None:
    """Serve the embedded tiny Qwen3-MoE (built on first use), sized for a CPU."""
    from smoothsmoe_server.models import default_model

    args.model = str(default_model.ensure_default_model())
    if not args.served_model_name:
        args.served_model_name = [default_model.DEFAULT_MODEL_NAME]
    if args.max_model_len is None:
        args.max_model_len = 2048
    # vLLM's CPU backend sizes its KV cache from this (GiB); the tiny model needs little.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def calibrate(argv: list[str]) -> int:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="smoothsmoe calibrate",
                                    description="Calibrate per-layer eps on your prompts and write a JSON file "
                                    "for `smoothsmoe serve --smooth-eps FILE`.")
    parser.add_argument("--prompts", required=True, type=Path,
                        help="A text file (one prompt per non-empty line) or JSONL ({\"prompt\": ...} per line).")
    parser.add_argument("--out", required=True, type=Path, help="Where to write the per-layer eps (JSON).")
    parser = EngineArgs.add_cli_args(parser)  # vLLM's engine flags (--model, --dtype, ...)
    add_smoothing_args(parser)
    args = parser.parse_args(argv)
    prompts = read_prompts(args.prompts)
    options = dataclasses.replace(options_from_args(args, args.model), enabled=True, eps="auto")
    os.environ.update(options.to_env())

    from vllm import LLM, SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    engine_args.worker_extension_cls = WORKER_EXTENSION
    # LLM() takes EngineArgs fields as keywords: pass the ones the flags changed.
    defaults = EngineArgs(model=engine_args.model)
    llm = LLM(**{f.name: getattr(engine_args, f.name) for f in dataclasses.fields(EngineArgs)
                 if getattr(engine_args, f.name) != getattr(defaults, f.name) or f.name == "model"})
    llm.collective_rpc("smoothsmoe_start_recording")
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=True)  # the progress bar
    layers = llm.collective_rpc("smoothsmoe_calibrate", args=(options.budget,))[0]
    top_k = {s["layer"]: s["top_k"] for s in llm.collective_rpc("smoothsmoe_snapshot")[0]["layers"]}
    from smoothsmoe_server.engine.eps import save_eps_file

    save_eps_file(args.out, layers, {"model": args.model, "budget": options.budget, "max_extra": options.max_extra,
                                     "prompts": len(prompts)})
    print(f"{'layer':>5} {'eps':>12} {'tokens':>7} {'mean active experts':>20}")
    for layer, r in sorted(layers.items()):
        note = "" if r["reached"] else "  (budget not reached)"
        print(f"{layer:>5} {r['eps']:12.6g} {r['tokens']:>7} {top_k[layer] + r['mean_extras']:20.3f}{note}")
    print(f"wrote {args.out}")
    return 0


def read_prompts(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            item = json.loads(line)
            text = item if isinstance(item, str) else item.get("prompt", item.get("text"))
            if not isinstance(text, str):
                raise SystemExit(f"{path}:{n}: expected a string or an object with 'prompt' or 'text'")
            prompts.append(text)
    else:
        prompts = lines
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def evaluate(argv: list[str]) -> int:
    from smoothsmoe_server.commands import evaluate as evaluation

    return evaluation.main(argv)


def models(argv: list[str]) -> int:
    from smoothsmoe_server.commands import model_table

    return model_table.main(argv)


def drift_model(argv: list[str]) -> int:
    from smoothsmoe_server.models.drift_model import ensure_drift_model

    parser = argparse.ArgumentParser(prog="smoothsmoe drift-model",
                                     description="Build (once) the default model's drift copy, for load tests "
                                     "of --smooth-eps online; print its path. DIR/drift.json names its drift tokens.")
    parser.add_argument("dir", type=Path, help="where to build it")
    print(ensure_drift_model(parser.parse_args(argv).dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve": serve, "calibrate": calibrate, "eval": evaluate, "models": models,
                "drift-model": drift_model}
    if not argv or argv[0] not in commands:
        print("usage: smoothsmoe {serve,calibrate,eval,models,drift-model} [-h] ...\n"
              "  serve      OpenAI-compatible server with smoothed MoE routing (default model: embedded tiny MoE)\n"
              "  calibrate  fit per-layer eps on your prompts, write a JSON file for --smooth-eps\n"
              "  eval       cost, quality and stability of smoothing on your model and text, against stock\n"
              "  models     the installed vLLM's MoE model classes: smoothed, or stock and why\n"
              "  drift-model  build the default model's drift copy (traffic that moves routing), for load tests",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
