"""Wraps vLLM's FusedMoEFactory so that every MoE layer a model builds gets our router.

Smoothable layers are built at width top_k + max_extra with a SmoothRouter;
the rest (and every layer when smoothing is off) keep vLLM's own router,
wrapped by a CountingRouter, and the log says why. No model code is copied:
the models call the factory, and the factory is what we wrap.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
from collections.abc import Callable

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
from vllm.model_executor.models.utils import extract_layer_index

from smoothsmoe_kernels import RoutingConfig
from smoothsmoe_kernels.config import BIASED_SCORING_FUNCS, SCORING_FUNCS
from smoothsmoe_server.engine.eps import EpsPlan
from smoothsmoe_server.engine.family_probe import recognise_routing_function
from smoothsmoe_server.engine.router import CountingRouter, SmoothRouter
from smoothsmoe_server.options import SmoothingOptions

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format
_MARK = "_smoothsmoe_original"


def install(options: SmoothingOptions, eps_plan: EpsPlan) -> None:
    """Replace FusedMoEFactory wherever vLLM refers to it. Safe to call twice."""
    import vllm.model_executor.layers.fused_moe.layer as fused_moe_layer
    from vllm.model_executor.layers import fused_moe

    current = fused_moe_layer.FusedMoEFactory
    if hasattr(current, _MARK):
        return
    wrapped = _wrap(current, options, eps_plan)
    setattr(wrapped, _MARK, current)
    fused_moe.FusedMoEFactory = wrapped
    fused_moe_layer.FusedMoEFactory = wrapped
    # Model modules imported before us hold the original in their namespace.
    # Read __dict__ rather than getattr: lazy module attributes would import
    # image code that needs torchvision.
    for name, module in list(sys.modules.items()):
        # Model code lives in both packages in vLLM 0.32 (DeepSeek-V4 and others under vllm.models).
        if name.startswith(("vllm.model_executor.models.", "vllm.models.")) and \
                vars(module).get("FusedMoEFactory") is current:
            module.FusedMoEFactory = wrapped


def _wrap(original: Callable, options: SmoothingOptions, eps_plan: EpsPlan) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def smoothsmoe_factory(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        prefix, num_experts = a["prefix"], a["num_experts"]
        layer_index = extract_layer_index(prefix)
        device = get_current_vllm_config().device_config.device
        if options.top_k:
            if options.top_k > num_experts:
                raise ValueError(f"--smooth-top-k {options.top_k} exceeds {prefix}'s {num_experts} experts")
            logger.info("smoothsmoe: %s top_k %d -> %d (--smooth-top-k)", prefix, a["top_k"], options.top_k)
            a["top_k"] = options.top_k  # every layer, smoothed or stock: the model as if its config said so
        our_experts = options.experts_backend(torch.device(device).type) == "smoothsmoe"
        config, reason = routing_config(a, options.max_extra, our_experts)
        bias = a["e_score_correction_bias"]
        if options.enabled and reason is None:
            router = SmoothRouter(config, num_experts, prefix, layer_index, eps_plan.initial(layer_index), bias, device,
                                  options)
            # Our router replaces a recognised custom routing function as well as vLLM's own.
            runner = original(**{**a, "top_k": config.width, "router": router, "custom_routing_function": None})
            router.experts = experts = use_our_experts(runner, options, device, prefix)
            if a["apply_router_weight_on_input"] and experts != "smoothsmoe":
                # vLLM's kernels would apply these weights at top-k 1 only: refuse rather than compute it wrong.
                raise RuntimeError(f"smoothsmoe: {prefix} applies router weights to the input, which only this "
                                   "project's experts do past top-k 1, and they cannot take this layer (see the log); "
                                   "serve it with --no-smoothing")
            logger.info("smoothsmoe: %s smoothed, top_k %d -> width %d, experts: %s", prefix, config.top_k,
                        config.width, experts)
            return runner
        if options.enabled:
            logger.warning("smoothsmoe: %s keeps stock top-k routing: %s", prefix, reason)
        runner = original(**a)
        if config is not None and isinstance(runner.router, BaseRouter):
            stock = dataclasses.replace(config, max_extra=0)
            runner.router = CountingRouter(runner.router, stock, num_experts, prefix, layer_index, bias, device,
                                           options)
        else:
            logger.warning("smoothsmoe: %s is not counted either (%s)", prefix, reason)
            # Read by the worker's snapshot: the layer is listed as stock (smoothsmoe_layer_smoothed 0).
            runner.smoothsmoe_stock_layer = (layer_index, reason)
        return runner

    return smoothsmoe_factory


def routing_config(a: dict, max_extra: int, our_experts: bool = False) -> tuple[RoutingConfig | None, str | None]:
    """The layer's RoutingConfig, and why it cannot be smoothed (None if it can).

    Read from how vLLM would route the layer: its scoring function,
    renormalization, bias, grouping, or its custom routing function, which is
    recognised by what it computes (family_probe), never by name. The config is
    None where the routing is none of the spec's families. our_experts: the
    layer's experts would be this project's (--smooth-experts), the only ones
    that apply router weights to the input past top-k 1 (Llama 4).
    """
    if a["router"] is not None:
        return None, "the model supplies its own router"
    scoring_func, renormalize = a["scoring_func"], a["renormalize"]
    custom = a["custom_routing_function"]
    if custom is not None:
        family = recognise_routing_function(custom, a["top_k"], renormalize, a["num_experts"])
        name = getattr(custom, "__qualname__", repr(custom))
        if family is None:
            return None, f"its routing function {name} computes none of the spec's families (probed on random logits)"
        scoring_func, renormalize = family
        logger.info("smoothsmoe: %s routing function %s computes the %s family", a["prefix"], name, scoring_func)
    elif scoring_func not in SCORING_FUNCS or scoring_func == "topk_sigmoid":
        return None, f"scoring_func {scoring_func!r} is not one of the spec's families"
    if a["e_score_correction_bias"] is not None and scoring_func not in BIASED_SCORING_FUNCS:
        return None, f"a correction bias with {scoring_func} scoring is not one of the spec's families"
    grouped = a["use_grouped_topk"]
    scale = 1.0 if a["apply_routed_scale_to_output"] else a["routed_scaling_factor"]  # as vLLM's factory does
    try:
        config = RoutingConfig(
            top_k=a["top_k"],
            max_extra=max_extra,
            scoring_func=scoring_func,
            renormalize=renormalize,
            num_expert_group=a["num_expert_group"] if grouped else None,
            topk_group=a["topk_group"] if grouped else None,
            routed_scaling_factor=scale,
        )
        config.check_num_experts(a["num_experts"])
    except ValueError as e:
        return None, str(e)
    parallel = get_current_vllm_config().parallel_config
    for why, unsupported in (
        ("expert parallelism (vLLM's EP kernels assume the model's top_k)", parallel.enable_expert_parallel),
        ("EPLB", a["enable_eplb"] or a["num_redundant_experts"]),
        ("fused shared experts", a["fuse_shared_experts"] and a["n_shared_experts"]),
        ("hash routing", a["hash_indices_table"] is not None),
        ("zero experts", a["zero_expert_type"] is not None),
        ("vision routing bias", a["bias_vl"] is not None),
        ("router weights applied to the input with vLLM's experts (they do that at top-k 1 only; this project's "
         "do it for unquantized SiLU experts: --smooth-experts smoothsmoe, the default on CUDA)",
         a["apply_router_weight_on_input"] and max_extra > 0 and not (our_experts and _our_experts_take(a))),
    ):
        if unsupported:
            return config, f"{why} is not supported with smoothing"
    return config, None


def _our_experts_take(a: dict) -> bool:
    from smoothsmoe_server.engine import experts_method  # imported where used, as in use_our_experts

    return experts_method.unsupported_reason_before_build(a) is None


def use_our_experts(runner, options: SmoothingOptions, device, prefix: str) -> str:
    """Give a smoothed layer our active-pairs experts if asked and possible; returns which it has."""
    if options.experts_backend(torch.device(device).type) != "smoothsmoe":
        return "vllm"
    from smoothsmoe_server.engine import experts_method

    reason = experts_method.unsupported_reason(runner)
    if reason is not None:
        logger.warning("smoothsmoe: %s keeps vLLM's experts kernel: %s", prefix, reason)
        return "vllm"
    experts_method.install(runner)
    return "smoothsmoe"
