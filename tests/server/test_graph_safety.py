"""A layer's forward on the CUDA code path, as vLLM calls it, is capturable in a CUDA graph: smoothed or stock.

Smoothed: the router (routing kernel, in-kernel counts, the calibration recorder, the online eps
controller, the ids handed to the experts) and the experts op run with their Triton backends,
under Triton's interpreter here. Stock: a CountingRouter counts vLLM's ids beside vLLM's router
(every layer under --no-smoothing, and the layers a plan keeps stock), margins included.
tests/graph_safety.py records their torch ops and fails on any that would sync with the host,
copy from it, or size by data. Every weight family is covered, grouped or not, biased where the
family takes a bias.
"""

from __future__ import annotations

import pytest
import torch
from smoothsmoe_server.engine.experts_method import _experts_op
from smoothsmoe_server.engine.layer_plan import SMOOTHING_OFF, LayerPlan
from smoothsmoe_server.engine.router import CountingRouter, SmoothRouter
from smoothsmoe_server.options import SmoothingOptions
from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router

from smoothsmoe_kernels import RoutingConfig, moe_experts, route
from tests.graph_safety import record
from tests.kernels.cases import FAMILIES, adversarial_scores

T, E, H, I = 20, 8, 32, 32
CPU = torch.device("cpu")
PREFIX = "model.layers.0.mlp.experts"


def family_config(family: str, grouped: bool, max_extra: int) -> RoutingConfig:
    """The family as tests/kernels/cases.py names it, on 16 experts (4 groups of 4, 2 kept, when grouped)."""
    return RoutingConfig(top_k=2, max_extra=max_extra, scoring_func="softmax" if family == "softmax_norm" else family,
                         renormalize=family not in ("softmax", "topk_sigmoid"),
                         num_expert_group=4 if grouped else None, topk_group=2 if grouped else None)


FAMILY_CASES = [(f, g) for f in FAMILIES for g in (False, True)]
CASE_IDS = [f"{f}{'-grouped' if g else ''}" for f, g in FAMILY_CASES]


def bias_for(config: RoutingConfig, E_: int) -> torch.Tensor | None:
    if config.scoring_func not in ("sigmoid", "sqrtsoftplus"):
        return None
    return torch.linspace(-0.2, 0.2, E_)  # a correction bias, as DeepSeek-V3 and V4 carry


def test_smoothed_layer_forward_is_capturable():
    config = RoutingConfig(top_k=2, max_extra=2)
    options = SmoothingOptions(eps="online", eps_window=16)  # the controller runs in the forward too
    # this project's experts, the CUDA default: the router hands them its ids; "triton": what "auto" picks on CUDA
    plan = LayerPlan(prefix=PREFIX, layer_index=0, num_experts=E, config=config, smoothed=True, experts="smoothsmoe")
    router = SmoothRouter(plan, 0.5, None, CPU, options, backend="triton")
    router.controller.arm()
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5

    def forward(logits, x):
        weights, ids = router.route_now(logits)
        return _experts_op(x, w13, w2, ids, weights, "triton")

    router.counters.recorder.start()  # the calibration recorder runs in the forward too
    runs = []
    for seed in (1, 2, 3):
        logits, x = torch.randn(T, E, generator=g), torch.randn(T, H, generator=g)
        eps = float(router.eps)  # the controller may move it after this forward's routing
        y, ops, forbidden = record(forward, logits, x)
        assert forbidden == []
        runs.append(ops)
        # and it computes the layer: the torch reference at the same routing
        weights, ids = router.route_uncounted(logits, eps)
        assert (ids == -1).any()  # inactive slots reach the experts as -1: skipped, not computed at weight 0
        torch.testing.assert_close(y, moe_experts(x, w13, w2, ids, weights, backend="torch"), atol=2e-5, rtol=2e-5)
    assert runs[0] == runs[1] == runs[2]
    assert int(router.counters.stats[0]) == 3 * T  # every token counted once, in the kernel
    assert router.counters.recorder.stop().gaps.shape[0] == 3 * T  # and recorded once, in the kernel too
    assert int(router.controller.updates) == 3  # a window of 16 closed in each forward of 20 tokens


@pytest.mark.parametrize("family,grouped", FAMILY_CASES, ids=CASE_IDS)
def test_smoothed_routing_of_every_family_is_capturable(family, grouped):
    E_ = 16
    config = family_config(family, grouped, max_extra=2)
    bias = bias_for(config, E_)
    plan = LayerPlan(prefix=PREFIX, layer_index=0, num_experts=E_, config=config, smoothed=True)
    router = SmoothRouter(plan, 0.5, bias, CPU, SmoothingOptions(eps="0.5"), backend="triton")
    runs = []
    for seed in (1, 2):
        _, ops, forbidden = record(router.route_now, adversarial_scores(T, E_, seed))
        assert forbidden == [], forbidden
        runs.append(ops)
    assert runs[0] == runs[1], "the same ops and shapes whatever the data"
    assert int(router.counters.stats[0]) == 2 * T


def vllm_router(config: RoutingConfig, bias: torch.Tensor | None, E_: int):
    """vLLM's own router for the family, as its factory makes one (CPURouter on this platform)."""
    custom = None
    if config.scoring_func == "topk_sigmoid":
        from vllm.model_executor.models.llama4 import Llama4MoE

        custom = Llama4MoE.custom_routing_function
    return create_fused_moe_router(
        top_k=config.top_k, global_num_experts=E_, renormalize=config.renormalize,
        use_grouped_topk=config.num_expert_group is not None, num_expert_group=config.num_expert_group,
        topk_group=config.topk_group, scoring_func="softmax" if custom else config.scoring_func,
        e_score_correction_bias=bias, custom_routing_function=custom)


@pytest.mark.parametrize("family,grouped", FAMILY_CASES, ids=CASE_IDS)
def test_stock_counting_of_every_family_is_capturable(family, grouped):
    """CountingRouter.count_now, the whole of what a stock layer adds to vLLM's forward, margins included:
    no host sync (the old margin path called nonzero() to re-rank ties), the same ops whatever the data."""
    E_ = 16
    config = family_config(family, grouped, max_extra=0)
    bias = bias_for(config, E_)
    plan = LayerPlan(prefix=PREFIX, layer_index=0, num_experts=E_, config=config, smoothed=False, reason=SMOOTHING_OFF)
    router = CountingRouter(vllm_router(config, bias, E_), plan, bias, CPU, SmoothingOptions(enabled=False))
    runs, margins = [], []
    for seed in (1, 2, 3):
        logits = adversarial_scores(T, E_, seed)  # exact ties, near-ties, NaN, -inf, all -inf rows
        stock = route(logits, config, 0.0, bias)  # the ids vLLM's router picks (tests/server/test_routing_families)
        _, ops, forbidden = record(router.count_now, logits, stock.ids)
        assert forbidden == [], forbidden
        runs.append(ops)
        margins.append(stock.margin)
    assert runs[0] == runs[1] == runs[2], "the same ops and shapes whatever the data"
    # and it counts what the reference counts: every token, the same margins
    counts = router.snapshot().counts()
    margin = torch.cat(margins)
    assert counts.tokens == 3 * T and counts.extras == 0
    assert sum(counts.margin_buckets) == 3 * T
    assert counts.margin_sum == pytest.approx(float(margin[margin < torch.finfo(torch.float32).max].double().sum()))
