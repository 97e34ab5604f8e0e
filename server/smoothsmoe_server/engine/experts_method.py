"""ActivePairsMoEMethod: a smoothed layer's experts computed on active pairs only.

A smoothed layer runs at width k + max_extra, but only about k + 0.5 of those
slots are active per token. vLLM's experts kernels compute every slot, so the
router hands them the inactive ones as the token's top-1 expert at weight 0:
correct, but each padded slot costs a full expert MLP. The router hands this
method its ids as they are, -1 on an inactive slot. This method replaces
vLLM's unquantized experts in the layers we smooth (`--smooth-experts
smoothsmoe`) with `smoothsmoe_kernels.moe_experts`, which skips them: the
Triton grouped-GEMM kernel on CUDA, the torch reference elsewhere.

It takes the place of vLLM's UnquantizedFusedMoEMethod in the layer (the
hook vLLM calls with the router's output) and keeps the weights in vLLM's
plain loaded layout (w13 [E, 2I, H], gate rows then up rows; w2 [E, H, I]):
it does not run vLLM's weight post-processing, which on the CPU prepacks them
for its own kernel. A layer of a block-FP8 checkpoint gets
ActivePairsFp8MoEMethod (experts_method_fp8.py) in place of vLLM's
Fp8MoEMethod in the same way; any other quantization keeps vLLM's experts.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.quantization.fp8 import Fp8MoEMethod

from smoothsmoe_kernels import moe_experts, resolve_backend
from smoothsmoe_server.engine.experts_method_fp8 import ActivePairsFp8MoEMethod, fp8_unsupported_reason
from smoothsmoe_kernels.tile_config import TUNED_DIR, device_key, load_tile_table

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format


class ActivePairsMoEMethod(UnquantizedFusedMoEMethod):
    """vLLM's unquantized MoE method with `apply` on active pairs only.

    moe: the layer's FusedMoEConfig; backend: "auto" (the Triton kernels on CUDA, the torch
    reference elsewhere), "triton" or "torch".
    """

    def __init__(self, moe, backend: str = "auto"):
        super().__init__(moe)
        self.backend = backend

    @property
    def is_monolithic(self) -> bool:
        return False  # a monolithic kernel would route by itself, past our router

    def process_weights_after_loading(self, layer) -> None:
        # The plain layout is what moe_experts reads; no vLLM kernel is built.
        layer.w13_weight.data = layer.w13_weight.data.contiguous()
        layer.w2_weight.data = layer.w2_weight.data.contiguous()
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        w13 = layer.w13_weight
        if resolve_backend(self.backend, w13.device) == "triton":
            E, two_I, H = w13.shape
            name = device_key(w13.device)
            table = load_tile_table(name, E, H, two_I // 2, w13.dtype)  # read once here, not in the forward
            logger.info("smoothsmoe: experts E=%d H=%d I=%d %s on %s: %s", E, H, two_I // 2, w13.dtype, name,
                        f"tuned tile table ({len(table)} token buckets)" if table else
                        f"vLLM's default tile sizes (no tuned table in {TUNED_DIR}; "
                        "python -m smoothsmoe_kernels.bench tune writes one)")

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input) -> torch.Tensor:
        # Shared experts are added by vLLM's runner, not here (it calls them
        # itself when the method has no modular kernel).
        return torch.ops.smoothsmoe.experts(x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
                                            self.backend, bool(layer.apply_router_weight_on_input))


def unsupported_reason(runner) -> str | None:
    """Why a built layer's experts cannot be computed by ActivePairsMoEMethod (None if they can).

    What the factory's arguments already tell is checked before the layer is built
    (layer_plan.experts_reason); these checks read what only the built layer shows.
    """
    experts = runner.routed_experts
    method = experts.quant_method
    # Exact types: a subclass (another quantization's method) may load or compute otherwise.
    if type(method) is Fp8MoEMethod:
        why = fp8_unsupported_reason(method, bool(experts.apply_router_weight_on_input))
        if why is not None:
            return why
    elif type(method) is not UnquantizedFusedMoEMethod:
        return (f"quantized experts ({type(method).__name__}; this project's experts take unquantized and "
                "block-FP8 ones)")
    config = experts.moe_config
    checks = (
        ("expert biases", config.has_bias),
        (f"activation {experts.activation}", experts.activation != MoEActivation.SILU),
        ("a SwiGLU clamp", getattr(experts, "swiglu_limit", None) is not None),
        ("experts split across ranks", experts.expert_map is not None),
        # vLLM pads the intermediate size for some GPU backends (FlashInfer TRT-LLM, AITER), and
        # the padding is not guaranteed to be zero.
        ("a padded intermediate size", experts.w2_weight.shape[2] != config.intermediate_size_per_partition_unpadded
         or experts.w13_weight.shape[1] != 2 * experts.w2_weight.shape[2]),
    )
    for why, unsupported in checks:
        if unsupported:
            return why
    return None


def install(runner) -> None:
    """Put ActivePairsMoEMethod (or, for vLLM's Fp8MoEMethod, ActivePairsFp8MoEMethod) in the layer,
    after vLLM created its weights and before they are loaded (unsupported_reason None for it)."""
    experts = runner.routed_experts
    if type(experts.quant_method) is Fp8MoEMethod:
        experts.quant_method = ActivePairsFp8MoEMethod(experts.quant_method)
    else:
        experts.quant_method = ActivePairsMoEMethod(experts.moe_config)


def describe(runner) -> str:
    """What computes the layer's experts, for the log: "smoothsmoe" plus the weights' format if quantized."""
    method = runner.routed_experts.quant_method
    blocks = getattr(method, "block_shape", None)
    return "smoothsmoe" if blocks is None else f"smoothsmoe (FP8, {blocks[0]}x{blocks[1]} weight blocks)"


@torch.library.custom_op("smoothsmoe::experts", mutates_args=())
def _experts_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                weights: torch.Tensor, backend: str, weights_on_input: bool = False,
                w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                block_shape: list[int] | None = None) -> torch.Tensor:
    """The layer's expert sum over the slots with an id >= 0 (the router's -1: inactive; weights_on_input:
    Llama 4's, each weight scaling its expert's input). FP8 block-quantized experts: float8_e4m3fn w13, w2
    with their float32 block scales and block_shape [bn, bk], as moe_experts takes them. An op: opaque to
    torch.compile, whose tracing of vLLM's CPU path would otherwise meet the data-dependent pair counts."""
    blocks = None if block_shape is None else tuple(block_shape)
    return moe_experts(x, w13, w2, ids, weights.float(), backend=backend, weights_on_input=weights_on_input,
                       w13_scale=w13_scale, w2_scale=w2_scale, block_shape=blocks)


@_experts_op.register_fake
def _(x, w13, w2, ids, weights, backend, weights_on_input=False, w13_scale=None, w2_scale=None, block_shape=None):
    return torch.empty_like(x)
