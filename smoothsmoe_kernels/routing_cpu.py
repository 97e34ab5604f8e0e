"""smooth_topk_cpu(): smoothed top-k routing with its counts, in few torch ops that torch.compile fuses.

The second implementation of the spec beside the reference (routing.py), for
where there is no Triton: the CPU server. Same contract as smooth_topk_triton
(route, count into the layer's stats buffer, record the band gaps while
calibration records), and tested against the reference the same way: same
ids, order, capped, margins and gaps, weights within 1e-6, same counts.

What differs from the reference, and why:

- Ties without a host branch. The reference takes torch.topk and re-ranks the
  rows that hold a tie with a stable sort: a data-dependent Python branch
  (a host sync, and a graph break under torch.compile). Here one stable
  descending sort ranks every row: equal scores keep index order, the
  reference's rule (ties to the lower index, -0.0 equal to +0.0).
- float32 for the weights. exp and log run in float32: torch computes them
  with its vectorized math library on every element, the tail of a tensor
  included (the `vml` functions), so a token's weight does not depend on where
  it sits in the batch, which is what the reference's float64 guards against.
  pow and sigmoid have a scalar tail that differs by an ulp, so the step
  is written u / (u + exp(50 log(1 - u))), not with pow. The selection
  scores of the sigmoid families stay float64 rounded to float32, as in the
  reference and the Triton kernel: ids are compared exactly, and one ulp moves
  a near-tie.
- Degenerate rows without a select. A row of all -inf (softmax) gives
  exp(nan_to_num(NaN)) = 1 on every slot, so k top-k slots at multiplier 1 and
  inactive extras normalize to 1/k each: the spec's fallback falls out of the
  same arithmetic.
- Counting in one index_add_ into the stats buffer (stats.accumulate is the
  reference for it), and no Python branch on data anywhere: Dynamo traces the
  whole function into one graph (tests/kernels/test_routing_cpu.py compiles it
  with fullgraph=True).

Numbers: 2-core x86 and vLLM's CPU routing in `python -m smoothsmoe_kernels.bench routing`.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from smoothsmoe_kernels.config import BIASED_SCORING_FUNCS, RoutingConfig
from smoothsmoe_kernels.gap_recorder import GapRecorder
from smoothsmoe_kernels.routing_result import FMAX, STEP_B, BandGaps, RoutingResult
from smoothsmoe_kernels.stats import StatsLayout

NEG_INF = float("-inf")


def smooth_topk_cpu(
    scores: torch.Tensor,
    config: RoutingConfig,
    eps: torch.Tensor,
    correction_bias: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    recorder: GapRecorder | None = None,
) -> tuple[RoutingResult, BandGaps]:
    """Route scores [T, E] (fp32/bf16/fp16, any device); optionally count into `stats` and record gaps.

    eps: 0-d float32 tensor on the scores' device (as_eps_tensor makes one).
    correction_bias [E] (sigmoid and sqrtsoftplus only). stats: the layer's
    float64 buffer in StatsLayout(config.top_k, config.max_extra, E) layout,
    added to in place. valid [T] bool: the rows to count and record (padding
    rows False). recorder: while its flag is set, the valid rows' band gaps
    are appended (GapRecorder.record). Returns the routing (RoutingResult:
    ids [T, W] int32 with -1 on inactive slots, weights [T, W] float32 with 0
    there, order [T] int32, capped [T] bool, margin [T] float32) and its band
    gaps, as routing.route_with_gaps does.

    Raises ValueError for scores that are not [T, E], an E the config cannot
    route, or a correction bias on a family that has none.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
    E = scores.shape[1]
    config.check_num_experts(E)
    if correction_bias is not None and config.scoring_func not in BIASED_SCORING_FUNCS:
        raise ValueError(f"correction_bias is defined for scoring_func in {BIASED_SCORING_FUNCS} only")
    K, M, W = config.top_k, config.max_extra, config.width

    x = scores.float()  # [T, E] logits
    z, z_all, sig = _selection_scores(x, config, correction_bias)
    zs, idx = _top_sorted(z, W + 1)  # [T, W+1] float32, int64 (-1 past E)

    # The band in gaps below tau = z(k), as the reference: +inf where there is no candidate.
    gaps = torch.nan_to_num(zs[:, K - 1 : K] - zs[:, K:], nan=float("inf"), posinf=float("inf"))  # [T, M+1]
    cap_gap = gaps[:, M:]  # [T, 1]
    B = torch.minimum(eps, cap_gap)  # [T, 1]
    active = gaps[:, :M] < B  # [T, M], a prefix
    mult = F.pad(torch.where(active, _smooth_step(gaps[:, :M], B), 0.0), (K, 0), value=1.0)  # [T, W]
    slot_active = F.pad(active, (K, 0), value=True)  # [T, W]

    weights = _weights(config, x, zs, z_all, sig, idx[:, :W], mult)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    result = RoutingResult(
        ids=torch.where(slot_active, idx[:, :W], -1).to(torch.int32),
        weights=weights,
        order=active.sum(-1, dtype=torch.int32),
        capped=(cap_gap < eps).squeeze(-1),
        margin=torch.nan_to_num(zs[:, K - 1] - zs[:, K], nan=0.0, posinf=FMAX),
    )
    band = BandGaps(gaps=gaps[:, :M], cap_gap=cap_gap)
    if stats is not None:
        _count(stats, StatsLayout(K, M, E), result, slot_active, valid)
    if recorder is not None:
        recorder.record(band, valid)
    return result, band


def _selection_scores(x: torch.Tensor, config: RoutingConfig, bias: torch.Tensor | None):
    """(z, z_all, sig): selection scores [T, E] float32 after group masking and before it, weight source.

    NaN counts as -inf, +inf as the largest float. sig [T, E] is the sigmoid
    families' weight source (NaN -> 0), None for the others.
    """
    sig = None
    if config.scoring_func in BIASED_SCORING_FUNCS:
        # float64 rounded to float32, as the reference: ids are compared exactly.
        if config.scoring_func == "sigmoid":
            s = x.double().sigmoid().float()
        else:  # sqrt(softplus), torch's softplus (x itself above 20); +inf as the largest float
            s = F.softplus(torch.where(x == float("inf"), FMAX, x).double()).sqrt().float()
        z = s if bias is None else s + bias.float()
        sig = torch.nan_to_num(s, nan=0.0)
    else:
        z = x
    z = torch.nan_to_num(z, nan=NEG_INF, posinf=FMAX, neginf=NEG_INF)
    z_all = z
    if config.num_expert_group is not None:
        z = _mask_groups(z, config, with_bias=bias is not None)
    return z, z_all, sig


def _mask_groups(z: torch.Tensor, config: RoutingConfig, with_bias: bool) -> torch.Tensor:
    """Experts outside the topk_group best groups score -inf (DeepSeek's node-limited top-k).

    A group scores the sum of its top-2 with a bias (V3), its best without
    (V2), as routing._mask_groups; ties go to the lower group by the stable sort.
    """
    T, E = z.shape
    G = config.num_expert_group
    zg = z.view(T, G, E // G)
    if with_bias:
        group_score = torch.nan_to_num(zg.topk(min(2, E // G), dim=-1).values.sum(-1), nan=NEG_INF, posinf=FMAX)
    else:
        group_score = zg.amax(-1)
    best = group_score.sort(dim=-1, descending=True, stable=True).indices[:, : config.topk_group]
    keep = torch.zeros(T, G, dtype=torch.bool, device=z.device).scatter_(1, best, True)  # [T, G]
    return torch.where(keep.unsqueeze(-1), zg, NEG_INF).view(T, E)


def _top_sorted(z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best [T, n] by descending z, ties to the lower index; -inf / -1 past E.

    One stable sort of each row: equal values keep index order. (torch.topk
    orders equal values arbitrarily; the reference repairs that row by row.)
    """
    E = z.shape[1]
    vals, idx = z.sort(dim=-1, descending=True, stable=True)
    if E >= n:
        return vals[:, :n], idx[:, :n]
    return F.pad(vals, (0, n - E), value=NEG_INF), F.pad(idx, (0, n - E), value=-1)


def _smooth_step(gaps: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """s(u) = u / (u + (1-u)^50), u = (B - gap) / B, in float32; meaningful where gap < B.

    Both u and 1 - u = gap / B come from the gap, as in the reference; the
    power is exp(50 log(.)) (batch-invariant exp and log, see the module
    docstring). Each float32 step is within an ulp, and the step magnifies a
    relative error in its input at most ~12-fold near u = 0.02: below 1e-6.
    """
    u = (B - gaps) / B
    tail = torch.exp(torch.log(gaps / B) * STEP_B)  # (1-u)^50; log(0) = -inf gives 0
    return u / (u + tail)


def _weights(config: RoutingConfig, x, zs, z_all, sig, idx, mult) -> torch.Tensor:
    """Unscaled weights [T, W] float32 of the family; inactive slots are 0 (their mult is)."""
    K = config.top_k
    if config.scoring_func == "softmax":
        zmax = zs[:, :1]
        # Only an all -inf row has zmax = -inf, and there every difference is NaN: as 0,
        # each top-k slot gets exp(0) = 1 and the row normalizes to the spec's 1/k.
        num = mult * torch.exp(torch.nan_to_num(zs[:, : config.width] - zmax, nan=0.0))
        if config.renormalize:
            return num / num.sum(-1, keepdim=True)  # >= the top slot's exp(0) = 1
        # Over all experts before group masking, as the reference (DeepSeek-V2).
        den = torch.exp(z_all - zmax).sum(-1, keepdim=True)  # NaN on an all -inf row only
        return torch.where(den > 0, num / den, num / K)
    if config.scoring_func == "topk_sigmoid":  # Llama 4: the sigmoid of each selected logit, not renormalized
        src = torch.nan_to_num(x.gather(1, idx.clamp(min=0)).double().sigmoid().float(), nan=0.0)
        return mult * src
    num = mult * sig.gather(1, idx.clamp(min=0))
    if not config.renormalize:
        return num
    den = num.sum(-1, keepdim=True)
    equal = num.new_zeros(config.width)
    equal[:K] = 1.0 / K  # the spec's fallback for a row with nothing to normalize by
    return torch.where(den > 0, num / den, equal)


def _count(stats: torch.Tensor, layout: StatsLayout, result: RoutingResult, slot_active: torch.Tensor,
           valid: torch.Tensor | None) -> None:
    """Add the step's counts to `stats` with one index_add_ (stats.accumulate counts the same)."""
    K = layout.top_k
    order = result.order.unsqueeze(-1)  # [T, 1]
    margin = result.margin.unsqueeze(-1)
    bucket = torch.bucketize(margin, layout.edges_on(stats.device))  # [T, 1]
    # Per token, 5 + 2 + W (index, value) pairs: the head, its order's hit, its margin bucket, its slots.
    # Order 0 adds a 0 at the first hit slot; inactive slots add a 0 at expert 0's extra count.
    where = torch.cat([(order - 1).clamp(min=0), bucket, result.ids.clamp(min=0)], dim=-1)  # [T, 2 + W]
    where = F.pad(where, (5, 0)) + _count_offsets(layout, stats.device)  # [T, 7 + W] int64
    has_next = margin < FMAX  # no (k+1)-th candidate: its margin is not summed
    ones = torch.ones_like(margin)
    hit_value = slot_active[:, K : K + 1] if layout.max_extra else torch.zeros_like(has_next)  # order >= 1
    what = torch.cat([ones, K + order, order, result.capped.unsqueeze(-1), torch.where(has_next, margin, 0.0),
                      hit_value, ones, slot_active], dim=-1).double()  # [T, 7 + W]
    if valid is not None:
        what = what * valid.unsqueeze(-1)
    stats.index_add_(0, where.view(-1), what.view(-1))


@lru_cache(maxsize=64)
def _count_offsets(layout: StatsLayout, device: torch.device) -> torch.Tensor:
    """[7 + W] int64: where each of a token's count pairs lands in the stats buffer, before its own offset.

    Head 0..4, the hits, the margin buckets, then the top-k and extra slots'
    expert counts. A per-device constant made once (a copy from the host).
    """
    K, M = layout.top_k, layout.max_extra
    hits = layout.hits.start if M else layout.margin_buckets.start  # M = 0: its value is always 0
    offsets = [0, 1, 2, 3, 4, hits, layout.margin_buckets.start]
    offsets += [layout.expert_topk.start] * K + [layout.expert_extra.start] * M
    return torch.tensor(offsets, dtype=torch.int64, device=device)
