"""calibrate_eps reaches the budget within its stated precision."""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels import RoutingConfig, calibrate_eps, route

N = 20_000
FAMILIES = {
    "softmax_norm": (RoutingConfig(top_k=8, max_extra=2), None),
    "softmax": (RoutingConfig(top_k=4, max_extra=2, renormalize=False, num_expert_group=8, topk_group=3), None),
    "sigmoid": (RoutingConfig(top_k=8, max_extra=2, scoring_func="sigmoid", num_expert_group=8, topk_group=4), 0.1),
}


def mean_order(scores, config, eps, bias):
    return route(scores, config, eps, bias).order.double().mean().item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_reaches_budget_within_precision(family, budget):
    config, bias_scale = FAMILIES[family]
    g = torch.Generator().manual_seed(7)
    scores = torch.randn(N, 64, generator=g) * 1.5
    bias = torch.randn(64, generator=g) * bias_scale if bias_scale else None
    c = calibrate_eps(scores, config, budget, bias)
    assert c.reached and c.eps > 0
    # Reaches the budget, overshooting by at most a few tokens' worth (the
    # count is a step function; continuous scores step by 1/N).
    assert budget <= c.mean_extras <= budget + 5 / N
    # The router itself, at that eps, routes exactly that many extras.
    assert mean_order(scores, config, c.eps, bias) == pytest.approx(c.mean_extras, abs=1e-12)
    # Precision: the smallest eps reaching the budget is above eps * (1 - rtol).
    assert mean_order(scores, config, c.eps * (1 - 1e-4), bias) < budget


def test_budget_zero_and_out_of_range():
    config = RoutingConfig(top_k=2, max_extra=2)
    scores = torch.randn(100, 8)
    assert calibrate_eps(scores, config, 0.0).eps == 0.0
    with pytest.raises(ValueError):
        calibrate_eps(scores, config, 2.5)  # above max_extra
    with pytest.raises(ValueError):
        calibrate_eps(scores[:0], config, 0.5)


def test_unreachable_budget_says_so():
    # Every token has the k-th, (k+1)-th, (k+2)-th and (k+3)-th scores tied:
    # an order-3 tie above the cap of 2, so no band ever opens.
    config = RoutingConfig(top_k=1, max_extra=2)
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0, 1.0, 0.0]]).repeat(50, 1)
    scores[:, 0] = 1.0
    c = calibrate_eps(scores, config, 0.5)
    assert not c.reached and c.mean_extras == 0.0
