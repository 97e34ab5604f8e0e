"""The Triton routing kernel against the torch reference (interpreter on the CPU, real on a GPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from smoothsmoe_kernels import RoutingConfig, StatsLayout, accumulate
from smoothsmoe_kernels.routing import route_with_gaps
from smoothsmoe_kernels.routing_triton import smooth_topk_triton
from tests.kernels.cases import LAYER_FAMILIES as FAMILIES
from tests.kernels.cases import WEIGHT_ATOL, adversarial_scores, assert_matches, call, layer_cases, routing_case

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(0, 8), (1, 8), (33, 60), (130, 128), (40, 256)]  # (T, E): empty, single, odd, E not a power of 2, 256
CASES = layer_cases(SHAPES)


@pytest.mark.parametrize("T,E,family", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_and_counts_the_same(T, E, family, dtype):
    kw, bias_scale = FAMILIES[family]
    config = RoutingConfig(**kw)
    scores = adversarial_scores(T, E, seed=T * 131 + E).to(dtype).to(DEV)
    bias = (torch.randn(E, generator=torch.Generator().manual_seed(E)) * bias_scale).to(DEV) if bias_scale else None
    eps = torch.tensor(0.3, device=DEV)
    layout = StatsLayout(config.top_k, config.max_extra, E)
    stats, ref_stats = layout.new_buffer(DEV), layout.new_buffer(DEV)
    valid = torch.arange(T, device=DEV) % 4 != 3  # every 4th row is padding: not counted
    out, out_gaps = smooth_topk_triton(scores, config, eps, bias, stats=stats, valid=valid)
    ref, ref_gaps = route_with_gaps(scores, config, eps, bias)
    assert_matches(out, out_gaps, ref, ref_gaps, config.routed_scaling_factor)
    accumulate(ref_stats, layout, ref, valid)
    # Counts are sums of integers in float64: exact; the margin sum adds
    # float32 values in another order: 1e-9 relative.
    torch.testing.assert_close(stats, ref_stats, rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routing_case())
def test_kernel_matches_reference_on_random_cases(case):
    # Cases are drawn on the CPU; the kernel gets them on its own device (a
    # CPU tensor handed to a CUDA kernel would be read as a device pointer).
    scores, k, m, eps, family, bias, groups = case
    ref = call(*case)
    on_dev = (scores.to(DEV), k, m, eps, family, None if bias is None else bias.to(DEV), groups)
    out = call(*on_dev, backend="triton")
    out = type(out)(*(t.cpu() for t in (out.ids, out.weights, out.order, out.capped, out.margin)))
    assert torch.equal(out.ids, ref.ids) and torch.equal(out.order, ref.order)
    assert torch.equal(out.capped, ref.capped) and torch.equal(out.margin, ref.margin)
    torch.testing.assert_close(out.weights, ref.weights, atol=WEIGHT_ATOL, rtol=0)


def test_eps_is_data_and_zero_eps_is_stock():
    scores = adversarial_scores(50, 16, seed=3).to(DEV)
    config = RoutingConfig(top_k=2, max_extra=2)
    for eps in (0.0, 0.2, 5.0):
        out, g = smooth_topk_triton(scores, config, torch.tensor(eps, device=DEV))
        ref, rg = route_with_gaps(scores, config, eps)
        assert_matches(out, g, ref, rg)
    zero, _ = smooth_topk_triton(scores, config, torch.tensor(0.0, device=DEV))
    assert (zero.ids[:, 2:] == -1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_counts_every_replay():
    config = RoutingConfig(top_k=8, max_extra=2)
    scores = torch.randn(64, 128, device="cuda")
    eps = torch.tensor(0.2, device="cuda")
    layout = StatsLayout(8, 2, 128)
    stats = layout.new_buffer("cuda")
    smooth_topk_triton(scores, config, eps, stats=stats)  # compile outside the capture
    stats.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = smooth_topk_triton(scores, config, eps, stats=stats)
    stats.zero_()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    ref = route_with_gaps(scores, config, eps)[0]
    assert torch.equal(out.ids, ref.ids) and stats[0].item() == 3 * 64


def test_groups_of_one_expert_with_a_bias_score_by_that_expert():
    """Found by the random cases: a group of one has no second score; it scores its only
    one (the reference's top-min(2, group size)), not best + (-inf) for every group."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(7, 6, generator=g)
    scores[0] = 0.0  # equal scores: the bias alone decides
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, -0.25])
    for topk_group in (2, 3, 4):
        case = (scores.to(DEV), 2, 1, 0.5, "sigmoid", bias.to(DEV), (6, topk_group))
        ref, out = call(*case), call(*case, backend="triton")
        assert torch.equal(out.ids, ref.ids) and torch.equal(out.order, ref.order)
        torch.testing.assert_close(out.weights, ref.weights, atol=WEIGHT_ATOL, rtol=0)
    assert call(*case).ids[0, 0] == 4  # the biased expert's group wins row 0
