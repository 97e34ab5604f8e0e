"""Random and adversarial routing cases shared by the reference and kernel tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from smoothsmoe_kernels import smooth_topk

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


