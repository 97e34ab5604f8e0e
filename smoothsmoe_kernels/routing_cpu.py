"""smooth_topk_cpu(): smoothed top-k routing with its counts, in few torch ops that torch.compile fuses.

The second implementation of the spec beside the reference (routing.py), for
where there is no Triton: the CPU server. Same contract as smooth_topk_triton
(route, count into the layer's stats buffer, record the band gaps while
calibration records), and tested against the reference the same way: same
ids, order, capped, margins and gaps, weights within 1e-6, same counts.

What differs from the reference, and why:

- Ties without a host branch. The reference takes torch.topk and re-ranks the
  rows that hold a tie with a stable sort: a data-dependent Python branch
  (a host sync, and a graph break under torch.compile). Here topk runs on
  float64 keys that order like the scores and are distinct within a row (each
  score lowered by a sliver that grows with the index, far below a float32
  step; see _top_lower_index), so ties go to the lower index by construction,
  the reference's rule (-0.0 equal to +0.0), and the value comes back by
  rounding to float32. A full stable sort would do too, at 2-5x the time of
  topk for E >= 64 and thousands of tokens. Int64 keys (the float's bits
  above the index) were the first form: their values come back through a
  bit cast that inductor does one element at a time in every loop that reads
  them; measured (2026-12-01, one thread, whole compiled call) the float64
  keys are 15 to 20 % faster for E = 16 at T >= 256, even for E = 128 and
  up to 5 % slower for E = 256 (topk on float64 is the slower sort there).
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
- Counting in one index_add_ of 7 + W (where, what) pairs per token
  (stats.accumulate is the reference). No Python branch on data anywhere:
  Dynamo traces the whole step into one graph (tests/kernels/
  test_routing_cpu.py compiles it with fullgraph=True), and no stack or cat,
  whose pieces inductor would keep as buffers of their own.

Token-major ([T, W]) on purpose. Inductor vectorizes the innermost axis, here the 6-13 slots,
with masked partial vectors, which costs at thousands of tokens. A slot-major variant ([W, T],
topk along dim 0 of the keys' transpose; `_top_lower_index` and every step after it rewritten)
was measured against this one (2026-12-01, both with the int64 keys of the time, one thread,
whole compiled call, default model's E = 16): T = 256 157 us against 197, but T = 1 50 us
against 45 (its kernel 5.5 us against 2.7: each of its loops pays a masked vector per slot row),
T = 16 even. Decode steps (T of 1 to a few dozen) are what a server runs most, so it was not
kept. It also needs sums over slots written as adds (eagerly, torch sums a [W, T] column in a
batch-dependent order).

Written for a compiled graph: eagerly it is about 120 small torch ops, as
slow as the reference at decode sizes and slower at thousands of tokens (the
keys are built in unfused passes); compiled, inductor fuses them into two
kernels around one topk. Figures: `python -m smoothsmoe_kernels.bench routing`
on the CPU.
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
    is_topk = _slot_is_topk(K, W, scores.device)  # [W] bool

    x = scores.float()  # [T, E] logits
    z, z_all, sig = _selection_scores(x, config, correction_bias)
    zs, idx = _top_lower_index(z, W + 1)  # [T, W+1] float32, int64 (-1 past E)

    # Gaps below tau = z(k), as the reference: +inf where there is no candidate
    # (a -inf score, or tau = -inf). Slots 0..K-1 hold gaps <= 0; slot W the cap.
    gaps = torch.nan_to_num(zs[:, K - 1 : K] - zs, nan=float("inf"), posinf=float("inf"))  # [T, W+1]
    # [T, 1]. Not `gaps[:, W:]`: compiled with E dynamic, its size is min(W+1, E) - W, which
    # inductor (torch 2.13) broadcast against [T, W] as if it were W wide: wrong ids, seen.
    cap_gap = gaps[:, W : W + 1]
    B = torch.minimum(eps, cap_gap)  # [T, 1]
    slot_active = (gaps[:, :W] < B) | is_topk  # [T, W]; the active extras are a prefix
    mult = torch.where(is_topk, 1.0, torch.where(slot_active, _smooth_step(gaps[:, :W], B), 0.0))  # [T, W]

    weights = _weights(config, x, zs, z_all, sig, idx[:, :W], mult)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    order = slot_active.sum(-1, dtype=torch.int32) - K
    result = RoutingResult(
        ids=torch.where(slot_active, idx[:, :W], -1).to(torch.int32),
        weights=weights,
        order=order,
        capped=(cap_gap < eps).squeeze(-1),
        margin=torch.nan_to_num(zs[:, K - 1] - zs[:, K], nan=0.0, posinf=FMAX),
    )
    band = BandGaps(gaps=gaps[:, K:W], cap_gap=cap_gap)
    if stats is not None:
        _count(stats, StatsLayout(K, M, E), result, slot_active, valid)
    if recorder is not None:
        recorder.record_rows(gaps[:, K:], valid)  # gap_1..gap_M and the cap gap, side by side already
    return result, band


def count_stock_cpu(scores: torch.Tensor, ids: torch.Tensor, config: RoutingConfig, stats: torch.Tensor,
                    correction_bias: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> None:
    """Count a stock top-k routing into `stats`, in torch ops that torch.compile traces (no graph break).

    scores [T, E] (any float dtype), ids [T, k] (any int dtype: the stock router's choice, e.g.
    vLLM's CPURouter), stats the layer's float64 buffer in StatsLayout(config.top_k, 0, E) layout,
    valid [T] bool or None. Adds what stats.accumulate(stock_result(...)) adds (the reference;
    tests/kernels/test_routing_cpu.py compares them): order 0, nothing capped, the margin z(k) -
    z(k+1) of the selection scores. The margin is read from a top-(k+1) of the same selection
    scores the routing uses (ties do not change the k-th and (k+1)-th values).

    Raises ValueError for a config with max_extra > 0 (a stock layer has no extras) or ids that are
    not [T, k].
    """
    K = config.top_k
    if config.max_extra != 0 or ids.dim() != 2 or ids.shape[1] != K or scores.dim() != 2:
        raise ValueError(f"stock counting takes [T, E] scores and [T, {K}] ids at max_extra 0, got "
                         f"{tuple(scores.shape)}, {tuple(ids.shape)}, max_extra={config.max_extra}")
    E = scores.shape[1]
    z, _, _ = _selection_scores(scores.float(), config, correction_bias)
    zs, _ = _top_lower_index(z, K + 1)  # [T, K+1], -inf past E: then the margin is FMAX, as route() gives it
    T = ids.shape[0]
    order = torch.zeros(T, dtype=torch.int32, device=ids.device)  # sized by the batch, not by data
    result = RoutingResult(ids=ids.to(torch.int32), weights=torch.zeros(ids.shape, device=ids.device), order=order,
                           capped=order.bool(), margin=torch.nan_to_num(zs[:, K - 1] - zs[:, K], nan=0.0, posinf=FMAX))
    active = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    _count(stats, StatsLayout(K, 0, E), result, active, valid)


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
    (V2), as routing._mask_groups; ties go to the lower group.
    """
    T, E = z.shape
    G = config.num_expert_group
    zg = z.view(T, G, E // G)
    if with_bias:
        group_score = torch.nan_to_num(zg.topk(min(2, E // G), dim=-1).values.sum(-1), nan=NEG_INF, posinf=FMAX)
    else:
        group_score = zg.amax(-1)
    _, best = _top_lower_index(group_score, config.topk_group)  # [T, topk_group]
    keep = torch.zeros(T, G, dtype=torch.bool, device=z.device).scatter_(1, best, True)  # [T, G]
    return torch.where(keep.unsqueeze(-1), zg, NEG_INF).view(T, E)


def _top_lower_index(z: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [T, n] float32 and indices [T, n] int64 of the n largest z per row, ties to the lower
    index; -inf / -1 past E. z [T, E] float32 with no NaN.

    torch.topk orders equal values arbitrarily (the reference repairs the rows
    with a tie, a host branch). Here topk runs on float64 keys, all distinct
    within a row: key(z, e) = z - (|z| + 2^-200) * e * d, d = 2^-(28 + bits(E))
    (so e * d < 2^-28), with -inf first made -2^200 (below any float32). Why
    that works, for float32 z:
    - equal z, different e: the keys differ by at least |z| * d, above
      float64's step at z (|z| * 2^-52) for E up to 2^22; at z = 0 by 2^-200 d.
    - a > b: a's key is at least a (1 - 2^-28) (a > 0) or a (1 + 2^-28) (a < 0),
      still above b, which is a float32 step (>= 2^-24 relative) or, near
      zero, a subnormal step (2^-149) below a.
    - the value: a key is within 2^-28 relative of z (or within 2^-200 of 0),
      so rounding it to float32 gives z back (-2^200 gives -inf); a zero comes
      back as -0.0, made +0.0 (the int64 form's and the reference's sign).
    Worked example, E = 3, z = [1.0, 2.0, 1.0]: keys [1.0, 2.0 - 2d, 1.0 - 2d],
    so the top 3 are experts 1, 0, 2.
    """
    E = z.shape[1]
    d = 2.0 ** -(28 + max(1, (E - 1).bit_length()))
    z64 = torch.where(z == NEG_INF, -(2.0**200), z.double())
    key = z64 - (z64.abs() + 2.0**-200) * (torch.arange(E, device=z.device, dtype=torch.float64) * d)  # [T, E]
    # A branch, not topk(min(n, E)): E dynamic under torch.compile, min() is a size inductor can mishandle (see
    # cap_gap); the branch fixes it.
    top, idx = key.topk(n if E >= n else E, dim=-1, sorted=True)  # noqa: FURB136
    vals = top.float()
    vals = torch.where(vals == 0.0, 0.0, vals)  # -0.0 -> +0.0
    if E >= n:
        return vals, idx
    return F.pad(vals, (0, n - E), value=NEG_INF), F.pad(idx, (0, n - E), value=-1)


def _smooth_step(gaps: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """s(u) = u / (u + (1-u)^50), u = (B - gap) / B, in float32; meaningful where 0 <= gap < B.

    Both u and 1 - u = gap / B come from the gap, as in the reference; the
    power is exp(50 log(.)) (batch-invariant exp and log, see the module
    docstring). Each float32 step is within an ulp or two; a relative error d
    in gap / B comes out at most 12.5 d in s (50 d in the power, times
    s (1 - s) <= 1/4): with d of a few ulps (6e-8 each), below 1e-6.
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
    equal = _slot_is_topk(K, config.width, num.device) / K  # the spec's fallback: nothing to normalize by
    return torch.where(den > 0, num / den, equal)


def _count(stats: torch.Tensor, layout: StatsLayout, result: RoutingResult, slot_active: torch.Tensor,
           valid: torch.Tensor | None) -> None:
    """Add the step's counts to `stats` with one index_add_ (stats.accumulate, the reference, counts the same).

    Per token 7 + W (where, what) pairs, written against the column number c
    (no stack or cat: under torch.compile each piece of one would be a buffer
    of its own): c = 0..4 the head (tokens, active, extras, capped, margin
    sum; a margin of float max has no (k+1)-th candidate, so adds 0), c = 5
    the hit of the token's order (a 0 for order 0), c = 6 its margin bucket,
    c = 7 + j slot j's expert (a 0 for an inactive slot).
    """
    K, H0, B0 = layout.top_k, layout.hits.start, layout.margin_buckets.start
    col, slot_base = _count_columns(layout, stats.device)  # [7 + W] each
    order = result.order.unsqueeze(-1)  # [T, 1]
    margin = result.margin.unsqueeze(-1)
    bucket = (margin > layout.edges_on(stats.device)).sum(-1, keepdim=True)  # edges[i-1] < m <= edges[i]
    ids = F.pad(result.ids.clamp(min=0), (7, 0))  # [T, 7 + W]: slot j under column 7 + j
    where = torch.where(col < 5, col, torch.where(col == 5, H0 - 1 + order.clamp(min=1),
                                                  torch.where(col == 6, B0 + bucket, slot_base + ids)))
    what = torch.where(col == 0, 1.0, torch.where(col == 1, K + order, torch.where(col == 2, order, 0)))
    what = what + (col == 3) * result.capped.unsqueeze(-1) + (col == 4) * torch.where(margin < FMAX, margin, 0.0)
    what = what + (col == 5) * (order > 0) + (col == 6) + F.pad(slot_active, (7, 0))  # [T, 7 + W]
    if valid is not None:
        what = what * valid.unsqueeze(-1)
    stats.index_add_(0, where.view(-1), what.double().view(-1))


@lru_cache(maxsize=64)
def _slot_is_topk(K: int, W: int, device: torch.device) -> torch.Tensor:
    """[W] bool, True on the top-k slots (a per-device constant, made on first use)."""
    return torch.arange(W, device=device) < K


@lru_cache(maxsize=64)
def _count_columns(layout: StatsLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([7 + W] column numbers, [7 + W] where each slot column's expert counts start) int64, per device."""
    col = torch.arange(7 + layout.top_k + layout.max_extra, device=device)
    return col, torch.where(col < 7 + layout.top_k, layout.expert_topk.start, layout.expert_extra.start)
