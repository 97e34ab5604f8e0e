"""What every command that starts an engine (serve, calibrate, eval) sets up alike.

One place for the model default and the CPU memory cap, so that `calibrate` and
`eval` start the engine `serve` would start: without a model they use the
embedded default model (built locally, never downloaded), sized for a CPU; and
LLM() gets the engine flags the user changed, nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

# vLLM's CPU backend reserves this much KV cache (GiB) unless told otherwise; its own default is
# a share of the machine's memory (17 GB of 24 seen for a 16 MB model). The default model's
# 2048-token context needs a few MB: 1 GiB leaves room for hundreds of concurrent requests.
DEFAULT_MODEL_KV_CACHE_GIB = "1"
DEFAULT_MODEL_MAX_LEN = 2048


def model_given(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Whether the command line named a model (a positional model tag, or --model other than vLLM's default)."""
    return getattr(args, "model_tag", None) is not None or args.model != parser.get_default("model")


def use_default_model(args: argparse.Namespace, served_name: bool = True) -> None:
    """Point `args` at the embedded tiny Qwen3-MoE (built on first use) and cap what vLLM reserves for it.

    Sets args.model (the local checkpoint), args.served_model_name (when the command has one and
    `served_name`), args.max_model_len (2048, if unset) and VLLM_CPU_KVCACHE_SPACE (1 GiB, unless
    the environment sets it).
    """
    from smoothsmoe_server.models import default_model

    args.model = str(default_model.ensure_default_model())
    if served_name and hasattr(args, "served_model_name") and not args.served_model_name:
        args.served_model_name = [default_model.DEFAULT_MODEL_NAME]
    if args.max_model_len is None:
        args.max_model_len = DEFAULT_MODEL_MAX_LEN
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_MODEL_KV_CACHE_GIB)


def resolve_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The model an engine command serves: the one named (positional tag first), else the default model."""
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag
    elif not model_given(args, parser):
        use_default_model(args)


def changed_engine_args(args: argparse.Namespace) -> dict:
    """{field: value} of vLLM's EngineArgs that the flags changed from its defaults, plus `model`:
    the keywords LLM() takes (it fills in the rest itself)."""
    from vllm.engine.arg_utils import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    defaults = EngineArgs(model=engine_args.model)
    return {f.name: getattr(engine_args, f.name) for f in dataclasses.fields(EngineArgs)
            if f.name == "model" or getattr(engine_args, f.name) != getattr(defaults, f.name)}
