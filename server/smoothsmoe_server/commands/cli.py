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

from smoothsmoe_server.commands import engine_setup
from smoothsmoe_server.options import WORKER_EXTENSION, SmoothingOptions

MIDDLEWARE = ["smoothsmoe_server.api.middleware.MetricsRefresh", "smoothsmoe_server.api.middleware.AbortedAsError",
              "smoothsmoe_server.api.middleware.OpenAIErrorBodies"]
KEYED_METRICS = "smoothsmoe_server.api.middleware.KeyedMetrics"
# After SIGTERM, what vLLM's --shutdown-timeout gives in-flight requests to finish (vLLM's own
# default, 0, aborts them). Shorter than the Kubernetes manifest's terminationGracePeriodSeconds.
SHUTDOWN_TIMEOUT_S = 60
# Once requests are drained (or aborted), how long uvicorn waits for connections that are still
# open: a stream whose engine side is gone could otherwise keep the process alive forever.
GRACEFUL_SHUTDOWN_S = 10
METRICS_KEY_FLAG = "--metrics-require-api-key"
METRICS_KEY_HELP = "`/metrics` and `/smoothsmoe/*` need the `--api-key` too"


def flag_name(name: str) -> str:
    """The flag of a SmoothingOptions field (`enabled` is --smoothing / --no-smoothing)."""
    return "--smoothing" if name == "enabled" else f"--smooth-{name.replace('_', '-')}"


def shown_default(f: dataclasses.Field) -> str:
    """How a flag's default reads in the help and the README: on/off, the field's `shown`, or `value`."""
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return f.metadata.get("shown") or f"`{f.default}`"


def flag_help(f: dataclasses.Field) -> str:
    from smoothsmoe_kernels.eps_control import SETTLE_WINDOWS

    return f.metadata["help"].format(settle_windows=SETTLE_WINDOWS)


def smoothing_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(SmoothingOptions) if "help" in f.metadata]


def flags_table() -> str:
    """The README's table of the Smoothing flags (markdown), from the fields that define them."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in smoothing_fields():
        name = "`--smoothing` / `--no-smoothing`" if f.name == "enabled" else f"`{flag_name(f.name)}`"
        rows.append(f"| {name} | {shown_default(f)} | {flag_help(f)} |")
    rows.append(f"| `{METRICS_KEY_FLAG}` | off | {METRICS_KEY_HELP} |")
    return "\n".join(rows) + "\n"


def add_smoothing_args(parser: argparse.ArgumentParser, serve: bool = False) -> None:
    """The Smoothing group: one flag per SmoothingOptions field (and, for serve, the /metrics key flag)."""
    group = parser.add_argument_group("Smoothing", "SmoothSMoE routing (flags prefixed --smooth-)")
    for f in smoothing_fields():
        text = f"{flag_help(f)} (default: {shown_default(f)})".replace("%", "%%")
        if isinstance(f.default, bool):
            group.add_argument(flag_name(f.name), dest=f"smooth_{f.name}", action=argparse.BooleanOptionalAction,
                               default=f.default, help=text)
        else:
            group.add_argument(flag_name(f.name), dest=f"smooth_{f.name}", type=type(f.default), default=f.default,
                               help=text)
    if serve:
        group.add_argument(METRICS_KEY_FLAG, action=argparse.BooleanOptionalAction, default=False,
                           help=f"{METRICS_KEY_HELP} (default: off; /health always stays open)")


def options_from_args(args: argparse.Namespace, model: str) -> SmoothingOptions:
    values = {f.name: getattr(args, f"smooth_{f.name}") for f in smoothing_fields()}
    return SmoothingOptions(**values, model=model)


def serve(argv: list[str]) -> int:
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="smoothsmoe serve",
                                                    description="OpenAI-compatible server with smoothed MoE routing."))
    parser.set_defaults(shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    add_smoothing_args(parser, serve=True)
    args = parser.parse_args(argv)
    engine_setup.resolve_model(args, parser)
    served = (args.served_model_name or [args.model])[0]
    options = options_from_args(args, served)
    from smoothsmoe_server.engine.eps import EpsPlan

    EpsPlan.parse(options.eps)  # a bad --smooth-eps fails here, not in a worker
    if args.worker_extension_cls not in ("", WORKER_EXTENSION):
        parser.error("--worker-extension-cls is taken by smoothsmoe (its counters and calibration live there)")
    if args.api_server_count not in (None, 1):
        parser.error("smoothsmoe serves its routing metrics from one API server: use --api-server-count 1")
    if args.metrics_require_api_key:
        from smoothsmoe_server.api.middleware import api_keys

        if not api_keys(args):
            parser.error("--metrics-require-api-key needs --api-key (or VLLM_API_KEY)")
    bind_cpu_workers(parser, args)
    args.worker_extension_cls = WORKER_EXTENSION
    # Listed innermost first: the error bodies wrap everything, the key check runs before a metrics refresh.
    keyed = [KEYED_METRICS] if args.metrics_require_api_key else []
    args.middleware = [*args.middleware, MIDDLEWARE[0], *keyed, *MIDDLEWARE[1:]]
    os.environ.update(options.to_env())
    os.environ["VLLM_PLUGINS"] = allowed_plugins()
    validate_parsed_serve_args(args)
    args.api_server_count = None  # one API server, in this process: what `vllm serve` does then
    uvloop.run(run_server(args, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    return 0


def allowed_plugins() -> str:
    """VLLM_PLUGINS for `smoothsmoe serve`: what was loaded before, plus our endpoint plugin.

    vLLM loads an endpoint plugin only when VLLM_PLUGINS names it, and the variable is then an
    allow-list for every plugin group: unset, it meant "every general plugin installed", so we
    name those; set by the user, we add ours to their list.
    """
    from importlib.metadata import entry_points

    from smoothsmoe_server.api.app import ENDPOINT_PLUGIN

    given = os.environ.get("VLLM_PLUGINS")
    names = [n for n in given.split(",") if n] if given is not None else \
        [ep.name for ep in entry_points(group="vllm.general_plugins")]
    return ",".join(dict.fromkeys([*names, ENDPOINT_PLUGIN]))


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
    engine_setup.resolve_model(args, parser)  # the default model, sized for a CPU, as serve does
    options = dataclasses.replace(options_from_args(args, args.model), enabled=True, eps="auto")
    os.environ.update(options.to_env())

    from vllm import LLM, SamplingParams

    llm = LLM(**engine_setup.changed_engine_args(args), worker_extension_cls=WORKER_EXTENSION)
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
