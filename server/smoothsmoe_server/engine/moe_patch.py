"""Wraps vLLM's FusedMoEFactory so that every MoE layer a model builds gets our router.

Each layer's LayerPlan (layer_plan.py) says what it gets. Smoothed layers are built at width
top_k + max_extra with a SmoothRouter; the rest (and every layer when smoothing is off) keep
vLLM's own router, wrapped by a CountingRouter, and the log says why. No model code is copied:
the models call the factory, and the factory is what we wrap.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

from smoothsmoe_server.engine.eps import EpsPlan
from smoothsmoe_server.engine.layer_plan import PLAN_ATTRIBUTE, LayerPlan, argument_difference, plan_layer
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
    log_argument_difference(inspect.signature(current))
    wrapped = wrap(current, options, eps_plan)
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


def log_argument_difference(signature: inspect.Signature) -> None:
    """Say which of the factory's parameters the layer plan does not know, and the reverse."""
    unknown, gone = argument_difference(signature)
    if unknown:
        logger.warning("smoothsmoe: FusedMoEFactory takes arguments the layer plan does not know: %s; a layer "
                       "given one of them (other than its default) keeps stock routing", ", ".join(unknown))
    if gone:
        logger.warning("smoothsmoe: the layer plan knows FusedMoEFactory arguments it no longer takes: %s",
                       ", ".join(gone))
    if not unknown and not gone:
        logger.info("smoothsmoe: the layer plan knows all %d FusedMoEFactory arguments", len(signature.parameters))


def wrap(original: Callable, options: SmoothingOptions, eps_plan: EpsPlan) -> Callable:
    """`original` (FusedMoEFactory) building each layer as its LayerPlan says; the runner carries the plan."""
    signature = inspect.signature(original)
    defaults = {name: p.default for name, p in signature.parameters.items()}

    @functools.wraps(original)
    def smoothsmoe_factory(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        prefix, num_experts = a["prefix"], a["num_experts"]
        device = get_current_vllm_config().device_config.device
        if options.top_k:
            if options.top_k > num_experts:
                raise ValueError(f"--smooth-top-k {options.top_k} exceeds {prefix}'s {num_experts} experts")
            logger.info("smoothsmoe: %s top_k %d -> %d (--smooth-top-k)", prefix, a["top_k"], options.top_k)
            a["top_k"] = options.top_k  # every layer, smoothed or stock: the model as if its config said so
        plan = plan_layer(a, defaults, options, torch.device(device).type)
        bias = a["e_score_correction_bias"]
        if plan.smoothed:
            runner = _build_smoothed(original, a, plan, eps_plan, bias, device, options)
        else:
            runner = _build_stock(original, a, plan, bias, device, options)
        setattr(runner, PLAN_ATTRIBUTE, runner.router.plan if isinstance(runner.router, SmoothRouter) else plan)
        return runner

    return smoothsmoe_factory


def _build_smoothed(original: Callable, a: dict, plan: LayerPlan, eps_plan: EpsPlan, bias, device,
                    options: SmoothingOptions):
    eps = eps_plan.initial(plan.layer_index)
    # Our router replaces a recognised custom routing function as well as vLLM's own.
    runner = original(**{**a, "top_k": plan.config.width, "router": SmoothRouter(plan, eps, bias, device, options),
                         "custom_routing_function": None})
    if plan.experts_reason is not None:
        logger.warning("smoothsmoe: %s keeps vLLM's experts kernel: %s", plan.prefix, plan.experts_reason)
    built = plan.after_build(runner)
    experts = built.experts
    if built.experts == "smoothsmoe":
        from smoothsmoe_server.engine import experts_method  # imports vLLM's experts methods: only when used

        experts_method.install(runner)
        experts = experts_method.describe(runner)
    elif built is not plan:  # the built layer turned out to need vLLM's experts: a router that pads for them
        logger.warning("smoothsmoe: %s keeps vLLM's experts kernel: %s", plan.prefix, built.experts_reason)
        runner.router = SmoothRouter(built, eps, bias, device, options)
    elif built.experts == "vllm" and options.experts == "auto" and plan.experts_reason is None:
        experts = f"vllm ({options.AUTO_CPU_EXPERTS_WHY})"
    if built.experts == "vllm" and type(runner.routed_experts.quant_method).__name__ == "Fp8MoEMethod":
        from smoothsmoe_server.engine.experts_method_fp8 import vllm_backend_missing

        if vllm_backend_missing(runner.routed_experts.quant_method):  # say so now, not at weight loading
            raise RuntimeError(f"smoothsmoe: {plan.prefix}: vLLM has no FP8 MoE backend for a smoothed layer here "
                               f"(its CPU FP8 experts take only its own routers); its experts cannot compute "
                               f"it ({built.experts_reason or '--smooth-experts vllm'}): serve it with "
                               "--smooth-experts smoothsmoe (block FP8 only) or --no-smoothing")
    logger.info("smoothsmoe: %s smoothed, top_k %d -> width %d, experts: %s", plan.prefix, plan.config.top_k,
                plan.config.width, experts)
    return runner


def _build_stock(original: Callable, a: dict, plan: LayerPlan, bias, device, options: SmoothingOptions):
    if options.enabled:
        logger.warning("smoothsmoe: %s keeps stock top-k routing: %s", plan.prefix, plan.reason)
    runner = original(**a)
    if plan.config is not None and isinstance(runner.router, BaseRouter):
        runner.router = CountingRouter(runner.router, plan, bias, device, options)
    else:
        # The worker's snapshot lists it as stock (smoothsmoe_layer_smoothed 0), with the plan's reason.
        logger.warning("smoothsmoe: %s is not counted either (%s)", plan.prefix,
                       plan.reason if plan.config is None else "its router is not one of vLLM's BaseRouters")
    return runner
