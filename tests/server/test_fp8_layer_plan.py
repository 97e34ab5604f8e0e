"""Which quantized layers this project's experts take: block FP8 yes, every other scheme keeps vLLM's.

The plans are made from vLLM's own quantization configs (Fp8Config, Mxfp4Config), as the model
passes them to FusedMoEFactory; layers are built by vLLM's factory, wrapped as the plugin wraps it,
on the CPU (as tests/server/test_layer_plan.py does). The served block-FP8 path is tested end to end
in tests/server/test_fp8_served.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from smoothsmoe_server.engine.eps import EpsPlan
from smoothsmoe_server.engine.moe_patch import wrap
from smoothsmoe_server.options import SmoothingOptions
from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory
from vllm.model_executor.layers.quantization.fp8 import Fp8Config
from vllm.model_executor.layers.quantization.mxfp4 import Mxfp4Config

from smoothsmoe_server.engine.layer_plan import plan_layer

from tests.server.test_layer_plan import DEFAULTS, args, smoothsmoe_log, vllm_config  # noqa: F401 (fixtures)

BLOCK_FP8 = dict(activation_scheme="dynamic", weight_block_size=[128, 128])
OURS = SmoothingOptions(experts="smoothsmoe")


def test_block_fp8_layers_get_our_experts(vllm_config):  # noqa: F811
    plan = plan_layer(args(quant_config=Fp8Config(**BLOCK_FP8)), DEFAULTS, OURS, "cpu")
    assert plan.smoothed and plan.experts == "smoothsmoe" and plan.experts_reason is None
    # auto as well, on the CPU too: vLLM 0.32 has no CPU FP8 experts for a smoothed layer's router.
    plan = plan_layer(args(quant_config=Fp8Config(**BLOCK_FP8)), DEFAULTS, SmoothingOptions(), "cpu")
    assert plan.experts == "smoothsmoe"
    # With unquantized layers auto still keeps vLLM's on the CPU (its fused kernel is faster there).
    assert plan_layer(args(), DEFAULTS, SmoothingOptions(), "cpu").experts == "vllm"


@pytest.mark.parametrize("quant_config,why", [
    (Fp8Config(activation_scheme="dynamic"), "fp8, per-tensor"),
    (Fp8Config(activation_scheme="static"), "fp8, per-tensor"),
    (Fp8Config(**BLOCK_FP8, store_dtype="mxfp4"), "fp8 stored as mxfp4"),
    (Mxfp4Config(), "mxfp4"),
], ids=["per-tensor-dynamic", "per-tensor-static", "fp8-as-mxfp4", "mxfp4"])
def test_other_quantizations_keep_vllms_experts_with_the_reason(vllm_config, quant_config, why):  # noqa: F811
    plan = plan_layer(args(quant_config=quant_config), DEFAULTS, OURS, "cpu")
    assert plan.smoothed and plan.experts == "vllm"  # still smoothed: vLLM's experts compute the padded slots
    assert plan.experts_reason.startswith(f"quantized experts ({why};"), plan.experts_reason


def test_router_weights_on_the_input_with_fp8_experts_stay_stock(vllm_config):  # noqa: F811
    """Llama 4's input-side weights: ours apply them per pair on unquantized experts only (FP8 activations
    are quantized per token), and vLLM's only at top-k 1, so the layer keeps stock routing."""
    plan = plan_layer(args(quant_config=Fp8Config(**BLOCK_FP8), apply_router_weight_on_input=True), DEFAULTS,
                      OURS, "cpu")
    assert not plan.smoothed and "router weights applied to the input" in plan.reason


def test_an_unsupported_fp8_layer_says_why_before_vllm_fails_to_load_it(vllm_config, smoothsmoe_log):  # noqa: F811
    """Per-tensor FP8 on the CPU: the log says why vLLM's experts keep the layer, and since vLLM 0.32 has
    no CPU FP8 experts for it (block scales and its own routers only), start-up stops here, by name,
    rather than at weight loading with "Unsupported FP8 MoE backend: NONE"."""
    build = wrap(FusedMoEFactory, SmoothingOptions(eps="0.3", experts="smoothsmoe"), EpsPlan.parse("0.3"))
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.experts: vLLM has no FP8 MoE backend"):
        build(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128, tp_size=1, dp_size=1, pcp_size=1,
              prefix="model.layers.0.mlp.experts", quant_config=Fp8Config(activation_scheme="dynamic"),
              params_dtype=torch.bfloat16)
    said = [r.getMessage() for r in smoothsmoe_log.records if r.levelno == logging.WARNING]
    assert any("model.layers.0.mlp.experts keeps vLLM's experts kernel: quantized experts (fp8, per-tensor" in m
               for m in said), said
