"""The spec's continuity property on the reference MoE layer.

Sweep x(t) = x0 + t*d across a routing boundary at step h and take the largest
jump between neighbouring outputs. Hard top-k jumps by a constant however small
h is; smoothed routing is Lipschitz, so the largest jump shrinks like h.
"""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels import moe_experts, smooth_topk

H, I, E = 16, 8, 8
WINDOW = 0.05  # half-width of the sweep around the boundary, in t units


def layer(seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(H, E, generator=g),  # router
        torch.randn(E, 2 * I, H, generator=g) / H**0.5,
        torch.randn(E, H, I, generator=g) / I**0.5,
        torch.randn(H, generator=g),  # x0
        torch.randn(H, generator=g),  # d
    )


def on_boundary(router, x0, rank_a, rank_b):
    """x0 moved (least-squares) onto the surface where its experts of sorted
    ranks a and b tie; checks they still hold those ranks there."""
    z0 = x0 @ router
    order = z0.argsort(descending=True)
    a, b = order[rank_a], order[rank_b]
    n = router[:, a] - router[:, b]
    x = x0 - (z0[a] - z0[b]) / (n @ n) * n
    z = x @ router
    assert torch.isclose(z[a], z[b], atol=1e-5)
    ranks = sorted(range(E), key=lambda i: -float(z[i]))
    assert {int(a), int(b)} == set(ranks[min(rank_a, rank_b) : max(rank_a, rank_b) + 1])
    return x


# The weight families a sweep is run for: (scoring_func, renormalize). Both new ones select on
# a monotone function of the logit (no bias here), so the logits' tie is the boundary.
FAMILIES = {"softmax": ("softmax", True), "sqrtsoftplus": ("sqrtsoftplus", True),
            "topk_sigmoid": ("topk_sigmoid", False)}


def max_jump(seed, ranks, h, k, m, eps, family="softmax"):
    """Largest neighbour jump of the layer's output on a sweep through the tie of `ranks`."""
    router, w13, w2, x0, d = layer(seed)
    x_star = on_boundary(router, x0, *ranks)
    n = round(2 * WINDOW / h)
    t = -WINDOW + h * torch.arange(n + 1, dtype=torch.float64)
    x = (x_star.double() + t[:, None] * d.double()).float()
    scoring_func, renormalize = FAMILIES[family]
    r = smooth_topk(x @ router, k, eps, m, scoring_func=scoring_func, renormalize=renormalize)
    y = moe_experts(x, w13, w2, r.ids, r.weights)
    return float((y[1:] - y[:-1]).norm(dim=-1).max()), r


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_boundary(seed, family):
    k, m = 2, 2
    ranks = (k - 1, k)  # the k-th and (k+1)-th swap
    hs = (1e-3, 1e-4)
    stock = [max_jump(seed, ranks, h, k, m, 0.0, family)[0] for h in hs]
    smooth = [max_jump(seed, ranks, h, k, m, 0.5, family)[0] for h in hs]
    # Stock: the swap's jump does not care about h (it is ~0.1-1 here).
    assert stock[1] > 0.5 * stock[0] and stock[1] > 1e-2
    # Smoothed: 10x smaller step, ~10x smaller largest jump (0.2 leaves room
    # for the sampled grid to land differently against the curve).
    assert smooth[1] < 0.2 * smooth[0]
    assert smooth[1] < 0.05 * stock[1]


@pytest.mark.parametrize("seed", [0, 3])
def test_boundary_where_the_cap_binds(seed):
    # k=1, m=1 with a wide band: several experts are in the band and the cap
    # keeps one. Sweep across the swap of the 2nd and 3rd experts, where the
    # cap's moving lower edge decides which extra is active.
    k, m, eps = 1, 1, 50.0
    jumps = []
    for h in (1e-3, 1e-4):
        jump, r = max_jump(seed, (1, 2), h, k, m, eps)
        assert r.capped.all()  # the cap binds all along the sweep
        jumps.append(jump)
    assert jumps[1] < 0.2 * jumps[0]
    # A hard "best m extras" cut would jump at the swap by the weight of a
    # whole expert; the moving edge makes the extra's weight 0 there instead.
    _, r = max_jump(seed, (1, 2), 1e-4, k, m, eps)
    assert r.weights[:, 1].min() < 1e-3
