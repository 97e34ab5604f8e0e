"""Random and adversarial routing cases shared by the reference and kernel tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from smoothsmoe_kernels import RoutingConfig, smooth_topk

INF = float("inf")
NAN = float("nan")

# Values from a small pool make exact ties and near-ties common; the pool has
# NaN, +-inf, huge values, -0.0, and neighbours one ulp apart.
POOL = [0.0, -0.0, 1.0, 1.0 + 2**-23, 1.0 - 2**-24, 0.5, 0.75, -1.0, 2.0, 3.5, -2.5, 1e30, -1e30, 3e38, INF, -INF, NAN]
# Weight families: softmax renormalized or not, sigmoid (DeepSeek-V3), sqrt-softplus (DeepSeek-V4),
# top-k then sigmoid (Llama 4).
FAMILIES = ["softmax_norm", "softmax", "sigmoid", "sqrtsoftplus", "topk_sigmoid"]
score_value = st.one_of(st.sampled_from(POOL), st.floats(-6, 6, width=32))


@st.composite
def routing_case(draw):
    E = draw(st.sampled_from([1, 2, 3, 5, 6, 8, 12, 60]))
    T = draw(st.sampled_from([0, 1, 2, 7]))
    family = draw(st.sampled_from(FAMILIES))
    groups = None
    if E >= 4 and draw(st.booleans()):
        G = draw(st.sampled_from([g for g in (2, 3, 4, 5, 6) if E % g == 0]))
        groups = (G, draw(st.integers(1, G)))
    reach = E if groups is None else groups[1] * (E // groups[0])
    k = draw(st.integers(1, min(reach, 4)))
    m = draw(st.integers(0, 3))
    eps = draw(st.sampled_from([0.0, 1e-6, 0.05, 0.5, 2.0, 1e3]))
    rows = draw(st.lists(st.lists(score_value, min_size=E, max_size=E), min_size=T, max_size=T))
    scores = torch.tensor(rows, dtype=torch.float32).reshape(T, E)
    bias = None
    if family in ("sigmoid", "sqrtsoftplus") and draw(st.booleans()):
        bias = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.1, -0.25, 0.5]), min_size=E, max_size=E)))
    return scores, k, m, eps, family, bias, groups


def call(scores, k, m, eps, family, bias, groups, scale=1.0, backend="torch"):
    return smooth_topk(
        scores, k, eps, m,
        scoring_func="softmax" if family == "softmax_norm" else family,
        renormalize=family not in ("softmax", "topk_sigmoid"),
        correction_bias=bias,
        num_expert_group=groups[0] if groups else None,
        topk_group=groups[1] if groups else None,
        routed_scaling_factor=scale,
        backend=backend,
    )


def adversarial_scores(T: int, E: int, seed: int) -> torch.Tensor:
    """Normal scores with exact ties, near-ties at the k-th score, NaN, -inf, huge values, all -inf rows."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(T, E, generator=g)
    if T == 0 or E < 4:
        return s
    rows = torch.arange(T)
    s[rows[::5], 1] = s[rows[::5], 3]  # exact ties
    s[rows[1::5], 2] = s[rows[1::5], 0] + 2**-20  # near-ties
    s[rows[2::7], 0] = NAN
    s[rows[3::7], : E // 2] = -INF
    s[rows[4::11], -1] = 1e30
    s[rows[5::13]] = -INF  # all -inf
    s[rows[6::17], 1] = INF
    return s


LAYER_FAMILIES = {  # one MoE layer per weight family: (RoutingConfig keywords, bias scale or None)
    "softmax_norm": (dict(top_k=2, max_extra=2), None),
    "softmax_grouped": (dict(top_k=4, max_extra=3, renormalize=False, num_expert_group=4, topk_group=2), None),
    "sigmoid_bias": (dict(top_k=8, max_extra=4, scoring_func="sigmoid", num_expert_group=4, topk_group=2,
                          routed_scaling_factor=2.5), 0.1),
    "k1_m0": (dict(top_k=1, max_extra=0), None),
    "sqrtsoftplus_bias": (dict(top_k=6, max_extra=2, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5), 0.1),
    "topk_sigmoid": (dict(top_k=1, max_extra=2, scoring_func="topk_sigmoid", renormalize=False), None),
}
# The Triton kernel and the fused CPU path decide the band on the same float32
# gaps as the reference, so ids, order, capped, margins and gaps are equal
# exactly. Weights: they take exp/log in float32 where the reference uses
# float64 (for batch invariance on the CPU); each of the few float32 operations
# on a weight in [0, 1] is off by at most an ulp (6e-8), and the smooth step
# amplifies its input's error by at most ~10 near the band's edge: 1e-6 covers it.
WEIGHT_ATOL = 1e-6


def layer_cases(shapes):
    """(T, E, family) for each shape and each LAYER_FAMILIES entry that can route E experts."""
    def fits(family, E):
        try:
            RoutingConfig(**LAYER_FAMILIES[family][0]).check_num_experts(E)
            return True
        except ValueError:
            return False

    return [(T, E, f) for T, E in shapes for f in LAYER_FAMILIES if fits(f, E)]


def assert_matches(out, out_gaps, ref, ref_gaps, scale=1.0):
    assert torch.equal(out.ids, ref.ids)
    assert torch.equal(out.order, ref.order) and torch.equal(out.capped, ref.capped)
    assert torch.equal(out.margin, ref.margin)
    assert torch.equal(out_gaps.gaps, ref_gaps.gaps) and torch.equal(out_gaps.cap_gap, ref_gaps.cap_gap)
    torch.testing.assert_close(out.weights, ref.weights, atol=WEIGHT_ATOL * scale, rtol=0)
    assert torch.isfinite(out.weights).all()
