"""LayerPlan: what this project does with one MoE layer, decided once from its FusedMoEFactory call.

Whether the layer is smoothed, whose experts compute it, and why it keeps stock routing when it
does are decided here and nowhere else: from the factory's arguments before the layer is built
(plan_layer), and from what only the built layer shows right after (LayerPlan.after_build). The
routers are made from the plan; the worker's snapshot reports it.

The plan reads the factory's arguments from an allow-list: every name in KNOWN_ARGUMENTS has a
rule below. An argument it does not know (one a newer vLLM adds) with a value other than its
default keeps the layer stock, since nothing here can tell what it does to the routing or to the
experts. install() logs, at start-up, the names on either side of the difference
(argument_difference).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index

from smoothsmoe_kernels import RoutingConfig
from smoothsmoe_kernels.config import BIASED_SCORING_FUNCS, SCORING_FUNCS
from smoothsmoe_server.engine.family_probe import RoutingFunctionFailed, recognise_routing_function
from smoothsmoe_server.options import SmoothingOptions

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format

# Read by routing_config: together they are the layer's routing family.
ROUTING_ARGUMENTS = ("num_experts", "top_k", "renormalize", "use_grouped_topk", "num_expert_group", "topk_group",
                     "custom_routing_function", "scoring_func", "routed_scaling_factor", "e_score_correction_bias",
                     "apply_routed_scale_to_output", "apply_router_weight_on_input")
# Given (not None, False or 0), each keeps the layer stock (routing_config's list says why):
# the routing is not one a router of ours can widen, or a model-supplied runner runs the layer's
# forward (vLLM 0.32's TransformersMoERunner takes the model's own top-k ids, past any router).
STOCK_IF_GIVEN = ("router", "enable_eplb", "num_redundant_experts", "fuse_shared_experts", "hash_indices_table",
                  "zero_expert_type", "bias_vl", "runner_cls", "runner_args")
# They parametrize the experts computation. vLLM's experts take any value; this project's
# compute bias-free SiLU-and-multiply experts, unquantized or block-FP8, at the loaded size, in
# vLLM's own RoutedExperts, so any other value keeps vLLM's experts (experts_reason). Routing does not read
# them: a model-supplied experts class (gpt-oss's, DBRX's: their own weight loading) computes
# from the router's ids as vLLM's does.
EXPERTS_ARGUMENTS = ("quant_config", "has_bias", "activation", "swiglu_limit", "swiglu_alpha", "swiglu_beta",
                     "activation_situ_beta", "activation_situ_linear_beta", "intermediate_pad", "routed_experts_cls",
                     "routed_experts_args")
# Neither routing nor the experts computation: weight shapes, loading and parallel layout; the
# gate and the shared experts (vLLM computes them beside the routed experts); the transforms
# the runner applies to the routed experts' input and output (the router's logits come from the
# gate, before them; the experts, ours or vLLM's, get the transformed input); image_sentinel_lo
# (read only with bias_vl); skip_padding (read only by DeepEP v2 kernels, i.e. expert
# parallelism, which keeps a layer stock).
NEUTRAL_ARGUMENTS = ("hidden_size", "intermediate_size", "params_dtype", "tp_size", "dp_size", "pcp_size", "prefix",
                     "is_sequence_parallel", "reduce_results", "ckpt_names", "is_fused_checkpoint_transposed",
                     "n_shared_experts", "shared_expert_prefix", "router_logits_dtype", "gate", "shared_experts",
                     "shared_expert_gate", "routed_input_transform", "routed_output_transform", "image_sentinel_lo",
                     "skip_padding")
KNOWN_ARGUMENTS = frozenset(ROUTING_ARGUMENTS + STOCK_IF_GIVEN + EXPERTS_ARGUMENTS + NEUTRAL_ARGUMENTS)
SMOOTHING_OFF = "smoothing is off (--no-smoothing)"
PLAN_ATTRIBUTE = "smoothsmoe_plan"  # every MoE runner this project's factory builds carries its plan here


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """One MoE layer's routing and experts, as this project runs them.

    config: the layer's family at width top_k + max_extra when smoothed, at max_extra 0 when
    stock (what its counters count by); None where the routing is none of the spec's families
    (then the layer is not counted either). reason: why the layer keeps stock routing (None
    when smoothed). experts: whose kernel computes the layer's experts; experts_reason: why
    vLLM's, where this project's were asked for (--smooth-experts) and cannot take the layer.
    """

    prefix: str  # the factory's prefix, e.g. "model.layers.3.mlp.experts": the layer's name in vLLM
    layer_index: int
    num_experts: int
    config: RoutingConfig | None
    smoothed: bool
    experts: Literal["smoothsmoe", "vllm"] = "vllm"
    reason: str | None = None
    experts_reason: str | None = None

    def __post_init__(self):
        if self.smoothed and (self.config is None or self.reason is not None):
            raise ValueError(f"a smoothed layer needs a config and no reason to stay stock: {self}")
        if not self.smoothed and (self.reason is None or self.experts != "vllm"
                                  or (self.config is not None and self.config.max_extra)):
            raise ValueError(f"a stock layer needs its reason, vLLM's experts and max_extra 0: {self}")

    def after_build(self, runner) -> LayerPlan:
        """The plan for the built layer `runner` (vLLM's MoERunner): this project's experts only if they
        can take what the layer turned out to hold (experts_method.unsupported_reason).

        Raises RuntimeError for a smoothed layer that applies router weights to its input and
        would get vLLM's experts: they apply them correctly at top-k 1 only.
        """
        if self.experts != "smoothsmoe":
            return self
        from smoothsmoe_server.engine import experts_method  # imports vLLM's experts methods: only when asked

        why = experts_method.unsupported_reason(runner)
        if why is None:
            return self
        if runner.routed_experts.apply_router_weight_on_input:
            raise RuntimeError(f"smoothsmoe: {self.prefix} applies router weights to the input, which only this "
                               f"project's experts do past top-k 1, and they cannot take this layer ({why}); "
                               "serve it with --no-smoothing")
        return dataclasses.replace(self, experts="vllm", experts_reason=why)


def plan_layer(a: Mapping[str, Any], defaults: Mapping[str, Any], options: SmoothingOptions,
               device_type: str) -> LayerPlan:
    """The plan of the layer that FusedMoEFactory(**a) builds.

    a: the call's arguments by name, defaults applied (inspect.BoundArguments.arguments);
    defaults: the factory's parameter defaults by name; device_type: "cuda", "cpu", ...
    Reads vLLM's current config (parallel settings). Raises nothing for a layer it cannot
    smooth: that layer's plan says why.
    """
    prefix = a["prefix"]
    wants_ours = options.experts_backend(device_type) == "smoothsmoe"
    if options.experts == "auto" and a["quant_config"] is not None and quantization_reason(a["quant_config"]) is None:
        # Block FP8: vLLM 0.32's CPU FP8 experts take only its own routing methods (not a custom
        # router's), so a smoothed layer has no vLLM FP8 backend on the CPU; ours compute it anywhere.
        wants_ours = True
    experts_why = experts_reason(a) if wants_ours else None
    config, reason = routing_config(a, options.max_extra, our_experts=wants_ours and experts_why is None)
    unknown = unknown_arguments(a, defaults)
    if unknown:
        reason = (f"FusedMoEFactory argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                  "(not known to this plugin's layer plan; it cannot tell what they do to routing or experts)")
    if reason is None and not options.enabled:
        reason = SMOOTHING_OFF
    common = dict(prefix=prefix, layer_index=extract_layer_index(prefix), num_experts=a["num_experts"])
    if reason is not None:
        stock = None if config is None else dataclasses.replace(config, max_extra=0)
        return LayerPlan(**common, config=stock, smoothed=False, reason=reason)
    return LayerPlan(**common, config=config, smoothed=True, experts="smoothsmoe" if wants_ours and not experts_why
                     else "vllm", experts_reason=experts_why)


def unknown_arguments(a: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """Names in `a` that KNOWN_ARGUMENTS lacks, given a value other than their default."""
    missing = inspect.Parameter.empty  # a name without a default is never at it
    return sorted(name for name, value in a.items()
                  if name not in KNOWN_ARGUMENTS and not _is_default(value, defaults.get(name, missing)))


def argument_difference(signature: inspect.Signature) -> tuple[list[str], list[str]]:
    """(the factory's parameters the plan does not know, the known names the factory does not take)."""
    names = set(signature.parameters)
    return sorted(names - KNOWN_ARGUMENTS), sorted(KNOWN_ARGUMENTS - names)


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    # Plain values compare by value; a tensor, module or callable only by identity (== on a tensor
    # is elementwise, and an equal-looking object may still behave otherwise).
    plain = (bool, int, float, str, bytes, tuple, type(None))
    return isinstance(value, plain) and isinstance(default, plain) and value == default


def experts_reason(a: Mapping[str, Any]) -> str | None:
    """Why this project's experts cannot compute the layer FusedMoEFactory(**a) builds, as far as its
    arguments tell (None if they can); LayerPlan.after_build checks the built layer."""
    activation = str(getattr(a["activation"], "value", a["activation"])).lower()
    quantized = quantization_reason(a["quant_config"])
    checks = (
        (quantized, quantized is not None),
        # FP8 activations are quantized per token, so a weight cannot scale each pair's input first.
        ("router weights applied to the input with quantized experts",
         a["quant_config"] is not None and a["apply_router_weight_on_input"]),
        ("expert biases", a["has_bias"]),
        (f"activation {activation}", activation != "silu"),
        ("a SwiGLU clamp", a["swiglu_limit"] is not None),
        ("SwiGLU alpha/beta", a.get("swiglu_alpha") is not None or a.get("swiglu_beta") is not None),
        ("SituGLU betas", a.get("activation_situ_beta") is not None
         or a.get("activation_situ_linear_beta") is not None),
        ("a padded intermediate size", bool(a.get("intermediate_pad"))),
        ("a model-supplied experts class", a.get("routed_experts_cls") is not None
         or bool(a.get("routed_experts_args"))),
    )
    return next((why for why, unsupported in checks if unsupported), None)


def quantization_reason(quant_config) -> str | None:
    """Why this project's experts cannot take a layer of a checkpoint quantized by `quant_config` (vLLM's
    QuantizationConfig, or None), as far as the config tells: they take unquantized experts and vLLM's
    block-FP8 ones (Fp8Config with weight_block_size; dynamic activations, the only scheme vLLM allows
    with blocks). The method vLLM builds for the layer decides the rest (experts_method.unsupported_reason):
    a layer the config leaves unquantized (ignored_layers) is then computed as an unquantized one."""
    if quant_config is None:
        return None
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config  # the config classes: only when quantized

    if type(quant_config) is Fp8Config and quant_config.weight_block_size is not None \
            and quant_config.store_dtype is None:  # store_dtype "mxfp4": Fp8Config builds an MXFP4 method
        return None
    what = quant_config.get_name() if type(quant_config) is not Fp8Config else (
        "fp8, per-tensor" if quant_config.weight_block_size is None else f"fp8 stored as {quant_config.store_dtype}")
    return f"quantized experts ({what}; this project's experts take unquantized and block-FP8 ones)"


def routing_config(a: Mapping[str, Any], max_extra: int,
                   our_experts: bool = False) -> tuple[RoutingConfig | None, str | None]:
    """The layer's RoutingConfig at `max_extra`, and why it cannot be smoothed (None if it can).

    Read from how vLLM would route the layer: its scoring function, renormalization, bias,
    grouping, or its custom routing function, which is recognised by what it computes
    (family_probe), never by name. The config is None where the routing is none of the spec's
    families. our_experts: the layer's experts would be this project's (--smooth-experts), the
    only ones that apply router weights to the input past top-k 1 (Llama 4).
    """
    if a["router"] is not None:
        return None, "the model supplies its own router"
    scoring_func, renormalize = a["scoring_func"], a["renormalize"]
    custom = a["custom_routing_function"]
    if custom is not None:
        name = getattr(custom, "__qualname__", repr(custom))
        try:
            family = recognise_routing_function(custom, a["top_k"], renormalize, a["num_experts"])
        except RoutingFunctionFailed as e:
            logger.warning("smoothsmoe: %s: probing its routing function failed", a["prefix"], exc_info=True)
            return None, f"its routing function could not be probed: {e}"
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
    custom_runner = next((n for n in ("runner_cls", "runner_args") if a.get(n)), None)
    for why, unsupported in (
        ("expert parallelism (vLLM's EP kernels assume the model's top_k)", parallel.enable_expert_parallel),
        ("EPLB", a["enable_eplb"] or a["num_redundant_experts"]),
        ("fused shared experts", a["fuse_shared_experts"] and a["n_shared_experts"]),
        ("hash routing", a["hash_indices_table"] is not None),
        ("zero experts", a["zero_expert_type"] is not None),
        ("vision routing bias", a["bias_vl"] is not None),
        (f"a model-supplied MoE runner ({custom_runner}: it runs the layer's forward, and may route past this "
         "project's router)", custom_runner is not None),
        ("router weights applied to the input with vLLM's experts (they do that at top-k 1 only; this project's "
         "do it for unquantized SiLU experts: --smooth-experts smoothsmoe, the default on CUDA)",
         a["apply_router_weight_on_input"] and max_extra > 0 and not our_experts),
    ):
        if unsupported:
            return config, f"{why} is not supported with smoothing"
    return config, None
