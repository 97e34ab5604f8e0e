"""smooth_topk against the spec: hand cases, a per-token oracle, stock limits, invariances."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smoothsmoe_kernels import RoutingConfig, route, smooth_topk
from smoothsmoe_kernels.routing_result import FMAX
from tests.kernels.cases import FAMILIES, adversarial_scores, call, routing_case
from tests.kernels.oracle import route_token, smooth_step

INF = float("inf")
NAN = float("nan")


def step(u):  # written out once more, from the spec: s(u) = u^1 / (u^1 + (1-u)^50)
    return u / (u + (1 - u) ** 50)


# ---------------------------------------------------------------- hand cases
# Each case: k=1, max_extra=1, worked by hand from the spec.
#   free:   z = [2.0, 0.0, 1.05], eps = 1.0: tau = 2, gap = 0.95, cap gap = 2 > eps, so
#           B = eps = 1, u = 0.05, mult = s(0.05) = 0.05 / (0.05 + 0.95^50) = 0.39387
#   capped: z = [2.0, 1.5, 1.45], eps = 1.0: gap = 0.5, cap gap = 0.55 < eps, so the
#           lower edge moves up to 1.45: B = 0.55, u = 0.05/0.55, mult = s(0.0909) = 0.91432


def test_hand_step_values():
    assert step(0.05) == pytest.approx(0.39387, abs=1e-5)
    assert step(0.05 / 0.55) == pytest.approx(0.91432, abs=1e-5)


def test_hand_softmax_renormalized():
    r = smooth_topk(torch.tensor([[2.0, 0.0, 1.05], [2.0, 1.5, 1.45]]), 1, 1.0, 1)
    assert r.ids.tolist() == [[0, 2], [0, 1]]
    assert r.order.tolist() == [1, 1] and r.capped.tolist() == [False, True]
    m0, m1 = step(0.05), step(0.05 / 0.55)
    e0, e1 = math.exp(-0.95), math.exp(-0.5)
    expected = [[1 / (1 + m0 * e0), m0 * e0 / (1 + m0 * e0)], [1 / (1 + m1 * e1), m1 * e1 / (1 + m1 * e1)]]
    torch.testing.assert_close(r.weights, torch.tensor(expected), atol=1e-6, rtol=0)
    assert r.weights[0].tolist() == pytest.approx([0.86781, 0.13219], abs=1e-5)
    torch.testing.assert_close(r.margin, torch.tensor([0.95, 0.5]))


def test_hand_softmax_not_renormalized():
    r = smooth_topk(torch.tensor([[2.0, 0.0, 1.05], [2.0, 1.5, 1.45]]), 1, 1.0, 1, renormalize=False)
    m0, m1 = step(0.05), step(0.05 / 0.55)
    s0 = math.exp(2) + math.exp(0) + math.exp(1.05)
    s1 = math.exp(2) + math.exp(1.5) + math.exp(1.45)
    expected = [[math.exp(2) / s0, m0 * math.exp(1.05) / s0], [math.exp(2) / s1, m1 * math.exp(1.5) / s1]]
    torch.testing.assert_close(r.weights, torch.tensor(expected), atol=1e-6, rtol=0)
    assert r.capped.tolist() == [False, True]


def test_hand_sigmoid_with_bias():
    # Logits chosen so that sigmoid + bias gives the scores of the hand cases
    # shifted by the bias: selection by sig + bias, weights by sig alone.
    sig = torch.tensor([[0.9, 0.2, 0.6], [0.9, 0.7, 0.65]])
    bias = torch.tensor([0.0, 0.0, 0.25])
    logits = torch.log(sig / (1 - sig))
    r = smooth_topk(logits, 1, 0.4, 1, scoring_func="sigmoid", correction_bias=bias)
    # row 0: z = [0.9, 0.2, 0.85], gap 0.05, cap gap 0.7 > eps: B = 0.4, u = 0.35/0.4
    # row 1: z = [0.9, 0.7, 0.9], tie at 0.9 -> expert 0 first (lower index), then expert 2
    #        is top-1? no: top-1 is expert 0, extra candidate expert 2 with gap 0, cap gap 0.2:
    #        B = 0.2, u = 1, mult = 1
    assert r.ids.tolist() == [[0, 2], [0, 2]]
    assert r.capped.tolist() == [False, True]
    z = sig[0] + bias
    m0 = step((0.4 - float(z[0] - z[2])) / 0.4)
    expected = [[0.9 / (0.9 + m0 * 0.6), m0 * 0.6 / (0.9 + m0 * 0.6)], [0.9 / 1.55, 0.65 / 1.55]]
    torch.testing.assert_close(r.weights, torch.tensor(expected), atol=1e-5, rtol=0)


def test_hand_cap_moves_lower_edge_continuously():
    # k=1, m=1, eps=1: as the third score rises to the second, the extra's weight goes to 0.
    w = [smooth_topk(torch.tensor([[2.0, 1.5, 1.5 - d]]), 1, 1.0, 1).weights[0, 1].item() for d in (0.5, 1e-2, 1e-4)]
    assert w[0] > 0.3 and w[1] < 0.05 and w[2] < 2e-4  # ~ proportional to d near the edge
    tie = smooth_topk(torch.tensor([[2.0, 1.5, 1.5]]), 1, 1.0, 1)  # order-2 tie above the cap: band empty
    assert tie.ids.tolist() == [[0, -1]] and tie.capped.tolist() == [True]


def test_all_minus_inf_falls_back_to_first_k():
    for family in ("softmax", "sigmoid"):
        r = smooth_topk(torch.full((2, 5), NAN), 2, 0.5, 2, scoring_func=family)
        assert r.ids.tolist() == [[0, 1, -1, -1]] * 2
        assert r.weights.tolist() == [[0.5, 0.5, 0.0, 0.0]] * 2
        assert not r.capped.any() and r.margin.tolist() == [0.0, 0.0]


def test_input_dtypes_route_in_fp32():
    s = torch.randn(64, 16)
    for dtype in (torch.float16, torch.bfloat16):
        low = s.to(dtype)
        a, b = smooth_topk(low, 2, 0.3, 2), smooth_topk(low.float(), 2, 0.3, 2)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)
        assert a.weights.dtype == torch.float32 and a.ids.dtype == torch.int32


def test_eps_tensor_equals_float():
    s = torch.randn(32, 12)
    a, b = smooth_topk(s, 2, 0.25, 2), smooth_topk(s, 2, torch.tensor(0.25), 2)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("bad", [-0.1, NAN, INF])
def test_bad_eps_is_refused(bad):
    with pytest.raises(ValueError):
        smooth_topk(torch.randn(2, 8), 2, bad, 2)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError):
        smooth_topk(torch.randn(2, 3), 4, 0.1, 1)  # k > E
    with pytest.raises(ValueError):
        smooth_topk(torch.randn(2, 8), 2, 0.1, 1, num_expert_group=3, topk_group=1)  # 8 % 3
    with pytest.raises(ValueError):
        smooth_topk(torch.randn(2, 8), 4, 0.1, 1, num_expert_group=4, topk_group=1)  # 2 reachable < 4
    with pytest.raises(ValueError):
        smooth_topk(torch.randn(2, 8), 2, 0.1, 1, correction_bias=torch.zeros(8))  # bias with softmax
    with pytest.raises(ValueError):
        smooth_topk(torch.randn(8), 2, 0.1, 1)  # not [T, E]


# ---------------------------------------------------------------- properties
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routing_case())
def test_properties_and_oracle(case):
    scores, k, m, eps, family, bias, groups = case
    T, E = scores.shape
    r = call(*case)
    W = k + m
    assert r.ids.shape == (T, W) and r.ids.dtype == torch.int32
    assert r.weights.shape == (T, W) and r.weights.dtype == torch.float32
    assert torch.isfinite(r.weights).all() and torch.isfinite(r.margin).all()
    assert (r.weights >= 0).all() and (r.weights <= 1 + 1e-6).all()
    active = r.ids >= 0
    assert (r.weights[~active] == 0).all() and active[:, :k].all()
    assert (r.ids < E).all()
    assert torch.equal(r.order, active[:, k:].sum(-1, dtype=torch.int32)) and (r.order <= m).all()
    for row in r.ids.tolist():  # active extras form a prefix; ids are distinct
        ext = row[k:]
        assert ext == sorted(ext, key=lambda i: i < 0)
        live = [i for i in row if i >= 0]
        assert len(live) == len(set(live))
    if family not in ("softmax", "topk_sigmoid") and T:  # the normalizing families
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(T), atol=1e-5, rtol=0)
    elif T and family == "softmax":  # a share of the softmax over all experts (topk_sigmoid: each <= 1)
        assert (r.weights.sum(-1) <= 1 + 1e-5).all()
    for t in range(T):
        ids, w, order, capped, margin = route_token(
            scores[t].tolist(), k, m, eps, "softmax" if family == "softmax_norm" else family,
            renormalize=family not in ("softmax", "topk_sigmoid"), bias=bias, groups=groups,
        )
        assert r.ids[t].tolist() == ids, (t, scores[t])
        assert r.order[t].item() == order and r.capped[t].item() == capped
        # the oracle computes u and weights in float64 from the same float32
        # gaps: 1e-5 covers float32 rounding of exp and the sums.
        torch.testing.assert_close(r.weights[t], torch.tensor(w, dtype=torch.float32), atol=1e-5, rtol=0)
        expected_margin = FMAX if margin is None and r.margin[t] != 0 else (0.0 if margin is None else margin)
        assert r.margin[t].item() == pytest.approx(min(expected_margin, FMAX), rel=1e-6)


@settings(max_examples=150, deadline=None)
@given(routing_case(), st.floats(0.25, 4.0))
def test_routed_scaling_factor_scales_weights(case, scale):
    base, scaled = call(*case), call(*case, scale=scale)
    assert torch.equal(base.ids, scaled.ids)
    torch.testing.assert_close(scaled.weights, base.weights * scale, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- stock limit
def stock_topk(logits, k, family, bias=None, groups=None):
    """Plain top-k routing of each family, as vLLM's routers compute it (ties to the lower index)."""
    x = logits.float()
    if family in ("sigmoid", "sqrtsoftplus"):
        sig = x.sigmoid() if family == "sigmoid" else torch.nn.functional.softplus(x).sqrt()
        z = sig + (bias if bias is not None else 0.0)
    else:
        z = x
    if groups is not None:
        G, tg = groups
        zg = z.view(z.shape[0], G, -1)
        gs = zg.topk(2, dim=-1).values.sum(-1) if bias is not None else zg.amax(-1)
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.sort(dim=-1, descending=True, stable=True).indices[:, :tg], True)
        z = torch.where(keep.unsqueeze(-1), zg, -INF).view_as(z)
    ids = z.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    if family in ("sigmoid", "sqrtsoftplus"):
        w = sig.gather(1, ids)
        w = w / w.sum(-1, keepdim=True)
    elif family == "topk_sigmoid":
        w = x.gather(1, ids).sigmoid()
    else:
        p = torch.softmax(x, -1).gather(1, ids)
        w = p / p.sum(-1, keepdim=True) if family == "softmax_norm" else p
    return ids.to(torch.int32), w


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("groups", [None, (4, 2)])
def test_eps_to_zero_is_stock_topk(family, groups):
    torch.manual_seed(0)
    T, E, k, m = 512, 64, 6, 2
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 0.1 if family in ("sigmoid", "sqrtsoftplus") else None
    ref_ids, ref_w = stock_topk(logits, k, family, bias, groups)
    # The smallest gap below the k-th score in this batch: any eps under it
    # leaves every band empty, so routing must be stock exactly.
    gaps = call(logits, k, 1, 1e9, family, bias, groups).margin
    for eps in (0.0, float(gaps.min()) / 2, float(gaps.min()) / 1e3):
        r = call(logits, k, m, eps, family, bias, groups)
        assert torch.equal(r.ids[:, :k], ref_ids) and (r.ids[:, k:] == -1).all()
        # Same formula, different association (stock normalizes a softmax over
        # all E, then over the top-k): a few float32 ulps apart.
        torch.testing.assert_close(r.weights[:, :k], ref_w, atol=0, rtol=1e-6)


# ---------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariance(family):
    torch.manual_seed(1)
    T, E = 300, 60
    logits = torch.randn(T, E)
    logits[::7, 5] = logits[::7, 9]  # ties inside the batch
    logits[3::11] = NAN
    groups = (6, 3)
    full = call(logits, 4, 2, 0.4, family, None, groups)
    perm = torch.randperm(T)
    permuted = call(logits[perm], 4, 2, 0.4, family, None, groups)
    assert torch.equal(permuted.ids, full.ids[perm]) and torch.equal(permuted.weights, full.weights[perm])
    for t in (0, 3, 7, 123, T - 1):
        alone = call(logits[t : t + 1], 4, 2, 0.4, family, None, groups)
        assert torch.equal(alone.ids[0], full.ids[t]) and torch.equal(alone.weights[0], full.weights[t])


def test_config_route_matches_keyword_form():
    s = torch.randn(40, 32)
    cfg = RoutingConfig(top_k=3, max_extra=2, scoring_func="softmax", renormalize=False)
    a, b = route(s, cfg, 0.2), smooth_topk(s, 3, 0.2, 2, renormalize=False, backend="torch")
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)
    assert cfg.width == 5


def test_oracle_step_is_the_spec_step():
    assert smooth_step(0.3) == step(0.3)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_router_margin_is_the_routing_margin(family, grouped):
    """router_margin (top-k values, no tie re-ranking: graph-safe) equals the margin route() computes,
    ties, NaN, -inf rows included; also where no (k+1)-th expert exists (margin float32 max)."""
    from smoothsmoe_kernels.routing import router_margin

    for E, k in ((16, 2), (16, 8), (4, 4)):
        if grouped and E // 4 * 2 < k:
            continue
        s = adversarial_scores(64, E, seed=E + k)
        s[3] = NAN
        s[5, 2:] = -INF
        cfg = RoutingConfig(top_k=k, max_extra=2, scoring_func="softmax" if family == "softmax_norm" else family,
                            renormalize=family not in ("softmax", "topk_sigmoid"),
                            num_expert_group=4 if grouped else None, topk_group=2 if grouped else None)
        bias = torch.randn(E, generator=torch.Generator().manual_seed(E)) * 0.1 \
            if family in ("sigmoid", "sqrtsoftplus") else None
        assert torch.equal(router_margin(s, cfg, bias), route(s, cfg, 0.3, bias).margin), (E, k)
