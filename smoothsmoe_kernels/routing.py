"""route(): smoothed top-k routing as docs/routing.md states it, in vectorized torch.

This is the reference that the Triton kernel is tested against, and the CPU
path of the server (smoothsmoe_kernels.smooth_topk picks it off CUDA).
Everything is computed in float32 whatever the input dtype.

How the band is computed (one token, scores sorted descending, tau = z(k)):

    gap_j = tau - z(k+j)            j = 1..M, the distance of candidate extra j
    c     = tau - z(k+M+1)          the gap of the first excluded score
    B     = min(eps, c)             band width: tau - L in the spec's notation
    extra j is active  <=>  gap_j < B
    u_j   = (B - gap_j) / B,  mult_j = s(u_j)

which is the spec's `L = max(tau - eps, z(k+M+1))`, `u = (z - L) / (tau - L)`
written in gaps. Deciding activity on gaps (not on `z > tau - eps`) lets the
calibration count extras with the very same comparison (see `band_gaps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoothsmoe_kernels.config import BIASED_SCORING_FUNCS, RoutingConfig
from smoothsmoe_kernels.routing_result import FMAX, STEP_B, BandGaps, RoutingResult, as_eps_tensor


def route(
    scores: torch.Tensor,
    config: RoutingConfig,
    eps: float | torch.Tensor,
    correction_bias: torch.Tensor | None = None,
) -> RoutingResult:
    """smooth_topk with the layer's RoutingConfig; see the module docstring."""
    return route_with_gaps(scores, config, eps, correction_bias)[0]


def route_with_gaps(
    scores: torch.Tensor,
    config: RoutingConfig,
    eps: float | torch.Tensor,
    correction_bias: torch.Tensor | None = None,
) -> tuple[RoutingResult, BandGaps]:
    """route(), plus the band gaps it decided on (what calibration records)."""
    K, M = config.top_k, config.max_extra
    weight_src, idx, zs = _select(scores, config, correction_bias)
    eps_t = as_eps_tensor(eps, zs.device)

    bg = _gaps_from_sorted(zs, K, M)
    B = bg.band(eps_t)  # [T, 1]
    active = bg.gaps < B  # [T, M], a prefix of the M slots
    mult = F.pad(torch.where(active, _f64(_smooth_step, bg.gaps, B), 0.0), (K, 0), value=1.0)  # [T, W]
    slot_active = F.pad(active, (K, 0), value=True)  # [T, W]

    ids = torch.where(slot_active, idx[:, : K + M], -1).to(torch.int32)
    weights = _weights(config, weight_src, zs, idx, mult)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    result = RoutingResult(
        ids=ids,
        weights=weights,  # 0 in inactive slots already: their mult is 0
        order=active.sum(-1, dtype=torch.int32),
        capped=bg.capped(eps_t),
        margin=_margin(zs, K),
    )
    return result, bg


def router_margin(
    scores: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """z(k) - z(k+1) per token [T] float32, equal to route(...).margin, without routing.

    scores [T, E] (any float dtype; computed in float32), correction_bias [E]
    or None. What the server counts for a layer that keeps stock routing.
    Capturable in a CUDA graph: fixed shapes, no host sync, no copy from the
    host. The k-th and (k+1)-th values of a top-k are the same however its
    ties are broken, so torch.topk's values are used as they come; only a
    grouped layer's choice of groups depends on ties (see _mask_groups).
    """
    K = config.top_k
    _, z = _selection_scores(scores, config, correction_bias, with_weights=False)
    zs = z.topk(min(K + 1, z.shape[1]), dim=-1).values  # [T, <= K+1]
    if zs.shape[1] == K:  # no (k+1)-th expert: the margin is FMAX, as route() gives it
        zs = F.pad(zs, (0, 1), value=float("-inf"))
    return _margin(zs, K)


def stock_result(
    scores: torch.Tensor, ids: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> RoutingResult:
    """A stock top-k routing's ids [T, k] (any int dtype; another router's choice) as a RoutingResult
    to count: ids int32, order 0 and capped False (no extras), margin from router_margin, weights 0
    (the counts never read them). Capturable in a CUDA graph, as router_margin."""
    T = ids.shape[0]
    order = torch.zeros(T, dtype=torch.int32, device=ids.device)  # [T]: sized by the batch, not by data
    return RoutingResult(ids=ids.to(torch.int32), weights=torch.zeros(ids.shape, device=ids.device), order=order,
                         capped=order.bool(), margin=router_margin(scores, config, correction_bias))


def _margin(zs: torch.Tensor, K: int) -> torch.Tensor:
    # finite always: +inf (no (k+1)-th candidate) as float32 max, -inf - -inf as 0
    return torch.nan_to_num(zs[:, K - 1] - zs[:, K], nan=0.0, posinf=FMAX)


def _smooth_step(gaps: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """s(u) = u / (u + (1-u)^50) with u = (B - gap) / B; meaningful where gap < B.

    u and 1 - u = gap / B are both taken from the gap, so that neither loses
    bits to cancellation near 0 or 1. Called in float64 (see _f64), where this
    direct form is exact to rounding: u + (1-u) = 1, so one of them is >= 1/2
    and the denominator is >= 2^-50, far from underflow. The spec's log form,
    -softplus(50 log(1-u) - log u), is what float32 code needs instead.
    """
    u = (B - gaps) / B
    return u / (u + (gaps / B) ** STEP_B)


def band_gaps(
    scores: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> BandGaps:
    """The gaps that decide a batch's extras for every eps (used by calibration)."""
    _, _, zs = _select(scores, config, correction_bias)
    return _gaps_from_sorted(zs, config.top_k, config.max_extra)


def _f64(fn, *args: torch.Tensor) -> torch.Tensor:
    """fn over float64 copies of float32 args, rounded back to float32.

    Batch invariance: torch's CPU kernels evaluate exp/log/sigmoid with SIMD in
    the body of a tensor and with scalar code in its tail, which can differ by
    one float32 ulp, so a token's weights would depend on where it sits in the
    batch. In float64 both are far more accurate than float32, and rounding to
    float32 gives the same value (unless the exact value lies within ~1e-16 of a
    float32 rounding midpoint, about one weight in 1e9).
    """
    return fn(*(a.double() for a in args)).float()


def _select(scores: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None):
    """Selection scores and the top W+1 of them, ties to the lower index.

    Returns weight_src [T, E] (logits for softmax; sigmoid(logit) for
    sigmoid and topk_sigmoid; sqrt(softplus(logit)) for sqrtsoftplus; before
    group masking), idx [T, W+1] int64 (expert ids by descending selection
    score, -1 past E) and zs [T, W+1] (their selection scores, -inf past E).
    """
    weight_src, z = _selection_scores(scores, config, correction_bias)
    E = z.shape[1]
    zs, idx = _topk_lower_index(z, min(config.width + 1, E))  # [T, n]
    pad = config.width + 1 - zs.shape[1]
    if pad:  # fewer experts than W+1: the missing candidates score -inf
        idx = F.pad(idx, (0, pad), value=-1)
        zs = F.pad(zs, (0, pad), value=float("-inf"))
    return weight_src, idx, zs


def _selection_scores(scores: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None,
                      with_weights: bool = True):
    """(weight_src [T, E], z [T, E]): the weights' source (see _select; None unless with_weights)
    and the selection scores, float32, NaN-free, the experts of groups not chosen at -inf."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
    config.check_num_experts(scores.shape[1])
    logits = scores.float()
    if correction_bias is not None and config.scoring_func not in BIASED_SCORING_FUNCS:
        raise ValueError(f"correction_bias is defined for scoring_func in {BIASED_SCORING_FUNCS} only")
    if config.scoring_func in BIASED_SCORING_FUNCS:
        sig = _f64(torch.sigmoid if config.scoring_func == "sigmoid" else _sqrt_softplus, logits)  # NaN stays NaN
        z = sig if correction_bias is None else sig + correction_bias.float()
        weight_src = torch.nan_to_num(sig, nan=0.0) if with_weights else None
    else:
        z = logits
        weight_src = None
        if config.scoring_func == "topk_sigmoid" and with_weights:  # selected on the logits, weighted by their sigmoid
            weight_src = torch.nan_to_num(_f64(torch.sigmoid, logits), nan=0.0)
    # NaN counts as -inf, +inf as the largest float (so differences stay finite).
    z = torch.nan_to_num(z, nan=float("-inf"), posinf=FMAX, neginf=float("-inf"))
    if config.scoring_func == "softmax":
        weight_src = z

    if config.num_expert_group is not None:
        z = _mask_groups(z, config, with_bias=correction_bias is not None)
    return weight_src, z


def _sqrt_softplus(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4's score sqrt(softplus(x)) (torch's softplus: x itself above 20).

    A +inf logit counts as the largest float32, so the score stays finite
    (about 1.8e19) and the weights' sums cannot overflow.
    """
    return F.softplus(torch.where(x == float("inf"), FMAX, x)).sqrt()


def _topk_lower_index(z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices [T, n] of the n largest entries per row, ties to the lower index.

    torch.topk returns the right values but orders equal values arbitrarily.
    So take the top n+1 values; a row whose values hold no two equal
    neighbours has no tie that could change its first n ids (a tie with an
    expert outside the set would show as the n-th and (n+1)-th being equal).
    Only rows with a tie are re-ranked with a stable sort, which keeps equal
    values in index order. NaN must already be gone (it would rank first).
    """
    E = z.shape[1]
    vals, idx = z.topk(min(n + 1, E), dim=-1, sorted=True)
    tie = (vals[:, 1:] == vals[:, :-1]).any(-1)  # -0.0 == +0.0 counts as a tie too
    rows = tie.nonzero().squeeze(-1)
    if rows.numel():  # data-dependent, so a host sync: fine on the CPU path this serves
        idx[rows] = z[rows].sort(dim=-1, descending=True, stable=True).indices[:, : idx.shape[1]]
    return vals[:, :n], idx[:, :n]  # the values are right either way


def _mask_groups(z: torch.Tensor, config: RoutingConfig, with_bias: bool) -> torch.Tensor:
    """Grouped (node-limited) top-k: experts outside the best groups score -inf.

    As in DeepSeek: a group scores the sum of its top-2 scores when a correction
    bias is in use (V3), else its best score (V2). Ties go to the lower group.
    """
    T, E = z.shape
    G = config.num_expert_group
    zg = z.view(T, G, E // G)
    if with_bias:
        top2 = zg.topk(min(2, E // G), dim=-1).values
        group_score = torch.nan_to_num(top2.sum(-1), nan=float("-inf"), posinf=FMAX)
    else:
        group_score = zg.amax(-1)
    # The best groups, ties to the lower group: a stable sort of G values, which (unlike
    # _topk_lower_index) needs no host sync, so router_margin stays capturable.
    groups = group_score.sort(dim=-1, descending=True, stable=True).indices[:, : config.topk_group]  # [T, topk_group]
    keep = torch.zeros(T, G, dtype=torch.bool, device=z.device).scatter_(1, groups, True)
    return torch.where(keep.unsqueeze(-1), zg, float("-inf")).view(T, E)


def _gaps_from_sorted(zs: torch.Tensor, K: int, M: int) -> BandGaps:
    # -inf candidates, and tau = -inf (then -inf - -inf = NaN), never enter: +inf.
    gaps = torch.nan_to_num(zs[:, K - 1 : K] - zs[:, K:], nan=float("inf"), posinf=float("inf"))  # [T, M+1]
    return BandGaps(gaps=gaps[:, :M], cap_gap=gaps[:, M:])


def _weights(config: RoutingConfig, weight_src, zs, idx, mult) -> torch.Tensor:
    """Unscaled weights [T, W] of the family; inactive slots are masked by the caller."""
    K, W = config.top_k, config.width
    if config.scoring_func == "softmax":
        zmax = zs[:, :1]  # -inf for an all -inf row: then every exp below is NaN
        num = mult * _f64(torch.exp, zs[:, :W] - zmax)  # exp(-inf) = 0 for -inf or missing slots
        if config.renormalize:
            den = num.sum(-1, keepdim=True)
        else:
            # Over all experts, before any group masking (as DeepSeek-V2 takes
            # the softmax of all logits first). Not via logsumexp: at |z| ~ 1e30
            # its log(count) term is lost to rounding.
            den = _f64(lambda d: torch.exp(d).sum(-1, keepdim=True), weight_src - zmax)
    else:
        num = mult * weight_src.gather(1, idx[:, :W].clamp(min=0))
        den = num.sum(-1, keepdim=True) if config.renormalize else torch.ones_like(num[:, :1])
    # A row with nothing to normalize by (all scores -inf, or all sigmoids 0)
    # falls back to equal weights on its top-k slots, as the spec says.
    # Elsewhere den >= the top slot's term > 0 and every term is finite.
    equal = torch.tensor([1.0 / K] * K + [0.0] * (W - K), device=zs.device)
    return torch.where(den > 0, num / den, equal)
