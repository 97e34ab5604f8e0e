"""ActivePairsFp8MoEMethod: a smoothed layer of a block-FP8 checkpoint computed on active pairs only.

The layer's weights are vLLM's own: its Fp8MoEMethod (quantization/fp8.py) creates them
(create_weights) and its RoutedExperts.weight_loader fills them, so the layout is the one vLLM
serves FP8 checkpoints with (DeepSeek-V3's, Qwen3's -FP8):
  w13_weight            float8_e4m3fn [E, 2I, H]   gate rows, then up rows
  w2_weight             float8_e4m3fn [E, H, I]
  w13_weight_scale_inv  float32 [E, ceil(2I/bn), ceil(H/bk)]   one scale per weight block
  w2_weight_scale_inv   float32 [E, ceil(H/bn), ceil(I/bk)]
with (bn, bk) the method's moe_block_shape: the checkpoint's weight_block_size, or the finer grid
resolve_fp8_moe_weight_block_shape refines it to where tensor parallelism splits a block (the
loader then upsamples the scales). This method takes over from the built Fp8MoEMethod after
create_weights and before loading, and replaces only what runs after loading: its
process_weights_after_loading does not convert the weights to a vLLM kernel's format
(convert_to_fp8_moe_kernel_format) nor build vLLM's kernel (make_fp8_moe_kernel), so it needs no
FP8 MoE backend of vLLM's. That matters on the CPU: vLLM 0.32's CPU FP8 experts require AMX
tiles (CPUExpertsFp8._supports_current_device), and without them select_fp8_moe_backend returns
Fp8MoeBackend.NONE, with which vLLM's own process_weights_after_loading cannot build a kernel.
The selection itself still runs once, in Fp8MoEMethod.__init__ when vLLM builds the layer (on
CUDA it logs the backend it picked, which then computes nothing).

`apply` computes smoothsmoe_kernels.moe_experts with the block scales: activations quantized per
token in groups of bk as vLLM's per_token_group_quant_fp8, fp8 x fp8 GEMMs with the scales
applied per K block as vLLM's fused_moe_kernel (see smoothsmoe_kernels/fp8_blocks.py).
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend
from vllm.model_executor.layers.quantization.fp8 import Fp8MoEMethod
from vllm.platforms import current_platform

from smoothsmoe_kernels import resolve_backend
from smoothsmoe_kernels.fp8_blocks import FP8_DTYPE, check_block_shape
from smoothsmoe_kernels.tile_config import TUNED_DIR, device_key, load_tile_table

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format


def fp8_unsupported_reason(method: Fp8MoEMethod, weights_on_input: bool) -> str | None:
    """Why ActivePairsFp8MoEMethod cannot take a layer vLLM built with `method` (None if it can).

    It takes block-quantized float8_e4m3fn weights with dynamic per-token-group activations
    (vLLM's only block scheme) and a block shape the kernels tile: bk a power of 2 >= 16.
    """
    if not method.block_quant:
        return ("per-tensor FP8 experts (this project's FP8 experts take block-quantized ones: "
                "a checkpoint with weight_block_size)")
    if method.quant_config.activation_scheme != "dynamic":
        return f"FP8 experts with {method.quant_config.activation_scheme} activation scales"
    if current_platform.is_fp8_fnuz():  # vLLM converts the weights to e4m3fnuz on MI300: not our format
        return "FP8 experts in the e4m3fnuz format (ROCm MI300)"
    if weights_on_input:  # the activation quantizer runs per token, not per weighted (token, expert) pair
        return "router weights applied to the input with FP8 experts"
    try:
        check_block_shape(method.moe_block_shape)
    except ValueError as e:
        return f"FP8 weight blocks {method.moe_block_shape}: {e}"
    return None


def vllm_backend_missing(method) -> bool:
    """Whether `method` is vLLM's Fp8MoEMethod without a backend (Fp8MoeBackend.NONE): its own
    process_weights_after_loading would then fail ("Unsupported FP8 MoE backend: NONE"). On the CPU
    this is every smoothed layer's case: vLLM's CPU FP8 experts accept only its own routing methods,
    not RoutingMethodType.Custom (a SmoothRouter's), and need AMX tiles besides."""
    return type(method) is Fp8MoEMethod and method.fp8_backend == Fp8MoeBackend.NONE


class ActivePairsFp8MoEMethod(Fp8MoEMethod):
    """vLLM's Fp8MoEMethod of one layer, its weights kept as loaded, `apply` on active pairs only.

    built: the Fp8MoEMethod vLLM built the layer with (fp8_unsupported_reason None for it);
    backend: "auto" (the Triton kernel on CUDA, the torch reference elsewhere), "triton" or "torch".
    """

    def __init__(self, built: Fp8MoEMethod, backend: str = "auto"):
        # Not Fp8MoEMethod.__init__, which would select vLLM's FP8 backend again: the built method's
        # state is adopted as is, among it the block shape the scales were created with
        # (moe_block_shape) and the weight_scale_refine that RoutedExperts.weight_loader reads.
        vars(self).update(vars(built))
        self.backend = backend
        self.moe_kernel = None  # no vLLM kernel: the runner then calls `apply`

    @property
    def is_monolithic(self) -> bool:
        return False  # a monolithic kernel would route by itself, past our router

    @property
    def block_shape(self) -> tuple[int, int]:
        return check_block_shape(self.moe_block_shape)

    def process_weights_after_loading(self, layer) -> None:
        # Kept as loaded: moe_experts reads vLLM's loaded layout. Neither vLLM's conversion to a
        # kernel format nor its kernel setup runs (the module docstring says why).
        w13, w2 = layer.w13_weight, layer.w2_weight
        if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
            raise RuntimeError(f"smoothsmoe: {layer.layer_name}: expected float8_e4m3fn expert weights as "
                               f"Fp8MoEMethod creates them, got {w13.dtype} and {w2.dtype}")
        for name in ("w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv"):
            param = getattr(layer, name)
            param.data = param.data.contiguous()
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        if resolve_backend(self.backend, w13.device) == "triton":
            E, two_I, H = w13.shape
            name = device_key(w13.device)
            table = load_tile_table(name, E, H, two_I // 2, layer.orig_dtype, TUNED_DIR, self.block_shape)
            logger.info("smoothsmoe: FP8 experts E=%d H=%d I=%d blocks %s on %s: %s", E, H, two_I // 2,
                        self.block_shape, name, f"tuned tile table ({len(table)} token buckets)" if table else
                        f"vLLM's default FP8 tile sizes (no tuned table in {TUNED_DIR}; "
                        "python -m smoothsmoe_kernels.bench tune --fp8 writes one)")

    def get_fused_moe_quant_config(self, layer):
        # What the layer computes, in vLLM's terms: W8A8 FP8, block weights, dynamic activation groups.
        return fp8_w8a8_moe_quant_config(w1_scale=layer.w13_weight_scale_inv, w2_scale=layer.w2_weight_scale_inv,
                                         block_shape=list(self.block_shape))

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input) -> torch.Tensor:
        # Shared experts are added by vLLM's runner, not here (it calls them itself when the method
        # has no modular kernel).
        return torch.ops.smoothsmoe.experts(x, layer.w13_weight, layer.w2_weight, topk_ids, topk_weights,
                                            self.backend, False, layer.w13_weight_scale_inv,
                                            layer.w2_weight_scale_inv, list(self.block_shape))
