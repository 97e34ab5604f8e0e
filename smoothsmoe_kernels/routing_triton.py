"""_smooth_topk_kernel + smooth_topk_triton(): smoothed top-k routing in one launch.

One program routes BLOCK_T tokens: it loads their E scores, picks the top
W + 1 by repeated arg-max (ties to the lower index, as the reference), builds
the band, the weights of the family, and writes ids / weights / order /
capped / margin. In the same launch it adds the tokens' statistics into the
layer's stats buffer (smoothsmoe_kernels.stats layout) with atomics, and,
while calibration records (smoothsmoe_kernels.gap_recorder), appends the
tokens' band gaps to the recorder: no host sync, fixed shapes, so it is safe
under CUDA graphs and torch.compile.

Numerics: selection scores are computed exactly as the torch reference does
(float32 logits; sigmoid and sqrt(softplus) in float64 rounded to float32), and the band is
decided on the same float32 gaps, so ids, order and capped match it exactly.
Weights use float32 exp/log (the spec's stable log form of the step) where
the reference uses float64: they agree to a few float32 ulps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoothsmoe_kernels.config import BIASED_SCORING_FUNCS, SCORING_FUNCS, RoutingConfig
from smoothsmoe_kernels.gap_recorder import GapRecorder
from smoothsmoe_kernels.routing_result import FMAX, STEP_B, BandGaps, RoutingResult
from smoothsmoe_kernels.stats import StatsLayout


@triton.jit
def _smooth_topk_kernel(
    scores_ptr, bias_ptr, eps_ptr, valid_ptr, edges_ptr, stats_ptr,
    ids_ptr, weights_ptr, order_ptr, capped_ptr, margin_ptr, gaps_ptr,
    rec_rows_ptr, rec_count_ptr, rec_flag_ptr, rec_capacity,
    T, stride_st, scale,
    E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, M: tl.constexpr, W1_PAD: tl.constexpr,
    SCORE: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    G: tl.constexpr, GS: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr,
    HAS_VALID: tl.constexpr, HAS_STATS: tl.constexpr, HAS_REC: tl.constexpr, NB: tl.constexpr,
    HITS_OFF: tl.constexpr, MARGIN_OFF: tl.constexpr, TOPK_OFF: tl.constexpr, EXTRA_OFF: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    FMAX_C: tl.constexpr, STEP_B_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    W: tl.constexpr = K + M
    NEG_INF: tl.constexpr = float("-inf")
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    row_ok = offs_t < T
    col_ok = offs_e < E
    tile_ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(scores_ptr + offs_t[:, None] * stride_st + offs_e[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    is_nan = x != x

    # Selection scores z and weight sources sig, as the reference computes them.
    # SCORE (config.SCORING_FUNCS order): 0 softmax, 1 sigmoid, 2 sqrt(softplus) (both selected on the score
    # plus an optional bias), 3 top-k of the logits weighted by their sigmoid.
    if SCORE == 2:
        sig = tl.sqrt(_softplus_f64(tl.where(x == float("inf"), FMAX_C, x).to(tl.float64))).to(tl.float32)
    elif SCORE != 0:
        sig = (1.0 / (1.0 + tl.exp(-x.to(tl.float64)))).to(tl.float32)
    else:
        sig = x  # unused
    if SCORE != 0:
        sig = tl.where(is_nan, 0.0, sig)
    if SCORE == 1 or SCORE == 2:
        z = sig
        if HAS_BIAS:
            z = z + tl.load(bias_ptr + offs_e, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        z = x
    z = tl.where(is_nan | (z != z), NEG_INF, z)
    z = tl.where(z == float("inf"), FMAX_C, z)
    z = tl.where(col_ok[None, :], z, NEG_INF)
    z_all = z  # before group masking: the softmax denominator of the non-renormalized family

    # Grouped (node-limited) top-k: keep the TOPK_GROUP best groups.
    if G > 1:
        offs_g = tl.arange(0, G_PAD)
        group_of = offs_e // GS
        gscore = tl.full((BLOCK_T, G_PAD), NEG_INF, tl.float32)
        for g in tl.static_range(G):
            in_g = (group_of == g)[None, :] & col_ok[None, :]
            zg = tl.where(in_g, z, NEG_INF)
            best = tl.max(zg, axis=1)
            if HAS_BIAS:  # DeepSeek-V3: sum of the group's top 2 (its only score if it has one)
                s = best
                if GS > 1:
                    first = tl.min(tl.where(zg == best[:, None], offs_e[None, :], E_PAD), axis=1)
                    second = tl.max(tl.where(in_g & (offs_e[None, :] != first[:, None]), z, NEG_INF), axis=1)
                    s = best + second
                s = tl.where(s != s, NEG_INF, s)
                best = tl.where(s == float("inf"), FMAX_C, s)
            gscore = tl.where(offs_g[None, :] == g, best[:, None], gscore)
        gscore = tl.where((offs_g < G)[None, :], gscore, NEG_INF)
        g_avail = (offs_g < G)[None, :] & row_ok[:, None]
        keep = tl.zeros((BLOCK_T, E_PAD), tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gmax = tl.max(tl.where(g_avail, gscore, NEG_INF), axis=1)
            gsel = tl.min(tl.where(g_avail & (gscore == gmax[:, None]), offs_g[None, :], G_PAD), axis=1)
            g_avail = g_avail & (offs_g[None, :] != gsel[:, None])
            keep = keep | (group_of[None, :] == gsel[:, None])
        z = tl.where(keep, z, NEG_INF)

    # Top W + 1 by repeated arg-max, ties to the lower index.
    offs_w = tl.arange(0, W1_PAD)
    vals = tl.full((BLOCK_T, W1_PAD), NEG_INF, tl.float32)
    idx = tl.full((BLOCK_T, W1_PAD), -1, tl.int32)
    src = tl.zeros((BLOCK_T, W1_PAD), tl.float32)
    avail = tile_ok
    for j in tl.static_range(W + 1):
        m = tl.max(tl.where(avail, z, NEG_INF), axis=1)
        pick = tl.min(tl.where(avail & (z == m[:, None]), offs_e[None, :], E_PAD), axis=1)  # E_PAD: none left
        found = pick < E_PAD
        hit = offs_e[None, :] == pick[:, None]
        avail = avail & ~hit
        vals = tl.where(offs_w[None, :] == j, tl.where(found, m, NEG_INF)[:, None], vals)
        idx = tl.where(offs_w[None, :] == j, tl.where(found, pick, -1)[:, None], idx)
        if SCORE != 0:
            s_j = tl.sum(tl.where(hit, sig, 0.0), axis=1)
            src = tl.where(offs_w[None, :] == j, s_j[:, None], src)

    tau = tl.max(tl.where(offs_w[None, :] == K - 1, vals, NEG_INF), axis=1)
    # gaps = tau - z(k+j); -inf candidates and tau = -inf never enter (+inf).
    gaps = tau[:, None] - vals
    gaps = tl.where(gaps != gaps, float("inf"), gaps)
    cap_gap = tl.min(tl.where(offs_w[None, :] == K + M, gaps, float("inf")), axis=1)
    eps = tl.load(eps_ptr).to(tl.float32)
    B = tl.minimum(cap_gap, eps)
    is_extra = (offs_w[None, :] >= K) & (offs_w[None, :] < W)
    active = is_extra & (gaps < B[:, None])
    B_safe = tl.where(B > 0, B, 1.0)[:, None]
    u = tl.maximum((B[:, None] - gaps) / B_safe, 1e-30)
    one_minus_u = tl.maximum(gaps / B_safe, 1e-30)
    log_s = -_softplus(STEP_B_C * tl.log(one_minus_u) - tl.log(u))
    mult = tl.where(offs_w[None, :] < K, 1.0, tl.where(active, tl.exp(log_s), 0.0))
    slot_on = (offs_w[None, :] < K) | active

    if SCORE != 0:
        num = mult * src
        if RENORM:
            den = tl.sum(tl.where(offs_w[None, :] < W, num, 0.0), axis=1)
        else:
            den = tl.full((BLOCK_T,), 1.0, tl.float32)
    else:
        zmax = tl.max(tl.where(offs_w[None, :] == 0, vals, NEG_INF), axis=1)
        num = mult * tl.exp(vals - zmax[:, None])
        num = tl.where(offs_w[None, :] < W, num, 0.0)
        if RENORM:
            den = tl.sum(num, axis=1)
        else:
            den = tl.sum(tl.where(col_ok[None, :], tl.exp(z_all - zmax[:, None]), 0.0), axis=1)
    ok = den > 0
    equal = tl.where(offs_w[None, :] < K, 1.0 / K, 0.0)
    w = tl.where(ok[:, None], num / tl.where(ok, den, 1.0)[:, None], equal)
    w = tl.where(slot_on, w * scale, 0.0)
    ids = tl.where(slot_on, idx, -1)
    order = tl.sum(active.to(tl.int32), axis=1)
    capped = cap_gap < eps
    margin = tau - tl.max(tl.where(offs_w[None, :] == K, vals, NEG_INF), axis=1)
    margin = tl.where(margin != margin, 0.0, margin)
    margin = tl.where(margin == float("inf"), FMAX_C, margin)

    out_mask = row_ok[:, None] & (offs_w[None, :] < W)
    tl.store(ids_ptr + offs_t[:, None] * W + offs_w[None, :], ids, mask=out_mask)
    tl.store(weights_ptr + offs_t[:, None] * W + offs_w[None, :], w, mask=out_mask)
    tl.store(order_ptr + offs_t, order, mask=row_ok)
    tl.store(capped_ptr + offs_t, capped.to(tl.uint8), mask=row_ok)
    tl.store(margin_ptr + offs_t, margin, mask=row_ok)
    # The band gaps gap_1..gap_M and the cap gap (what calibration records).
    gap_cols = (offs_w[None, :] >= K) & (offs_w[None, :] <= K + M)
    tl.store(gaps_ptr + offs_t[:, None] * (M + 1) + (offs_w[None, :] - K), gaps, mask=row_ok[:, None] & gap_cols)

    counted = row_ok  # real rows: counted and recorded; padding rows neither
    if HAS_VALID:
        counted = counted & (tl.load(valid_ptr + offs_t, mask=row_ok, other=0) != 0)
    if HAS_REC:
        # The flag is data (a captured graph cannot be switched from the host): while it is off,
        # recording costs this load and branch; while on, one atomic reserves this program's rows.
        if tl.load(rec_flag_ptr) != 0:
            keep = counted.to(tl.int64)
            first = tl.atomic_add(rec_count_ptr, tl.sum(keep, axis=0), sem="relaxed")
            pos = first + tl.cumsum(keep, axis=0) - 1
            kept = counted & (pos < rec_capacity)
            tl.store(rec_rows_ptr + pos[:, None] * (M + 1) + (offs_w[None, :] - K), gaps,
                     mask=kept[:, None] & gap_cols)

    if HAS_STATS:
        one = counted.to(tl.float64)
        # Two atomic calls per program, relaxed: a counter needs no ordering, and
        # one fenced scalar atomic per counter (about 30) cost twice the routing
        # itself in a decode step. First the head of the layout (tokens .. margin
        # histogram): each token's row of contributions, summed over the block.
        bucket = tl.zeros((BLOCK_T,), tl.int32)
        for b in tl.static_range(NB):
            bucket += (margin > tl.load(edges_ptr + b)).to(tl.int32)
        order64 = order.to(tl.float64)[:, None]
        c = tl.arange(0, HEAD_PAD)[None, :]
        row = tl.where(c == 0, 1.0, 0.0)
        row += tl.where(c == 1, K + order64, 0.0) + tl.where(c == 2, order64, 0.0)
        row += tl.where(c == 3, capped.to(tl.float64)[:, None], 0.0)
        row += tl.where((c == 4) & (margin < FMAX_C)[:, None], margin.to(tl.float64)[:, None], 0.0)
        row += tl.where((c >= HITS_OFF) & (c - HITS_OFF + 1 == order[:, None]), 1.0, 0.0)  # order 0: no column
        row += tl.where((c >= MARGIN_OFF) & (c - MARGIN_OFF == bucket[:, None]), 1.0, 0.0)
        head = tl.sum(row * one[:, None], axis=0)
        offs_h = tl.arange(0, HEAD_PAD)
        tl.atomic_add(stats_ptr + offs_h, head, mask=offs_h < MARGIN_OFF + NB + 1, sem="relaxed")
        # Then tokens per expert: one add per active (token, slot), top-k and extra slots apart.
        on = counted[:, None] & (ids >= 0) & (offs_w[None, :] < W)
        base = tl.where(offs_w[None, :] < K, TOPK_OFF, EXTRA_OFF)
        tl.atomic_add(stats_ptr + base + tl.where(on, ids, 0), tl.where(on, 1.0, 0.0).to(tl.float64), mask=on,
                      sem="relaxed")


@triton.jit
def _softplus_f64(x):
    # torch's softplus in float64 (x itself above 20): log(1 + e^x), with the
    # series e^x - e^2x/2 + e^3x/3 below -10, where 1 + e^x would drop bits.
    e = tl.exp(tl.minimum(x, 20.0))
    small = e - e * e / 2.0 + e * e * e / 3.0
    return tl.where(x > 20.0, x, tl.where(x < -10.0, small, tl.log(1.0 + e)))


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow: x for large x, log1p(e^x) otherwise.
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


def smooth_topk_triton(
    scores: torch.Tensor,
    config: RoutingConfig,
    eps: torch.Tensor,
    correction_bias: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    recorder: GapRecorder | None = None,
    block_t: int = 16,
    num_warps: int = 4,
) -> tuple[RoutingResult, BandGaps]:
    """Route scores [T, E] (fp32/bf16/fp16) in one launch; optionally count into `stats`.

    eps: 0-d float32 tensor on the scores' device. stats: the layer's float64
    buffer (StatsLayout(config.top_k, config.max_extra, E) layout), updated in
    place. valid: [T] bool, rows to count (padding rows False). recorder: while
    its flag is set, the valid rows' band gaps are appended to it (as
    GapRecorder.record does). Returns the routing and its band gaps, as
    routing.route_with_gaps does.

    Safe under CUDA-graph capture: no host sync, no host-to-device copy (the
    margin edges are a per-device constant made on first use), and every
    output is a view of one allocation whose size depends on T only.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
    T, E = scores.shape
    config.check_num_experts(E)
    if E > 1024 or config.width > 16:
        raise ValueError(f"the Triton kernel handles E <= 1024 and top_k + max_extra <= 16, got {E}, {config.width}")
    if correction_bias is not None and config.scoring_func not in BIASED_SCORING_FUNCS:
        raise ValueError(f"correction_bias is defined for scoring_func in {BIASED_SCORING_FUNCS} only")
    K, M, W = config.top_k, config.max_extra, config.width
    dev = scores.device
    if recorder is not None and (recorder.max_extra != M or recorder.rows.device != dev):
        raise ValueError(f"the recorder (max_extra {recorder.max_extra}, on {recorder.rows.device}) does not fit "
                         f"this routing (max_extra {M}, on {dev})")
    scores = scores if scores.stride(1) == 1 else scores.contiguous()
    if eps.dtype != torch.float32 or eps.device != dev or eps.dim():
        eps = eps.to(device=dev, dtype=torch.float32).reshape(())
    layout = StatsLayout(K, M, E)
    edges = layout.edges_on(dev)
    out = _RoutingOutputs(T, W, M, dev)
    G = config.num_expert_group or 1
    rec = ((out.gaps, out.gaps, out.gaps, 0) if recorder is None  # placeholders, never read
           else (recorder.rows, recorder.recorded, recorder.recording.view(torch.uint8), recorder.capacity))
    if T:
        _smooth_topk_kernel[(triton.cdiv(T, block_t),)](
            scores, correction_bias if correction_bias is not None else scores, eps,
            valid if valid is not None else scores, edges, stats if stats is not None else out.weights,
            out.ids, out.weights, out.order, out.capped_u8, out.margin, out.gaps,
            *rec,
            T, scores.stride(0), float(config.routed_scaling_factor),
            E=E, E_PAD=triton.next_power_of_2(E), K=K, M=M, W1_PAD=triton.next_power_of_2(W + 1),
            SCORE=SCORING_FUNCS.index(config.scoring_func), RENORM=config.renormalize,
            HAS_BIAS=correction_bias is not None,
            G=G, GS=E // G, TOPK_GROUP=config.topk_group or 1, G_PAD=triton.next_power_of_2(G),
            HAS_VALID=valid is not None, HAS_STATS=stats is not None, HAS_REC=recorder is not None,
            NB=len(layout.margin_edges),
            HITS_OFF=layout.hits.start, MARGIN_OFF=layout.margin_buckets.start,
            TOPK_OFF=layout.expert_topk.start, EXTRA_OFF=layout.expert_extra.start,
            HEAD_PAD=triton.next_power_of_2(layout.margin_buckets.stop),
            FMAX_C=FMAX, STEP_B_C=STEP_B, BLOCK_T=block_t, num_warps=num_warps,
        )
    result = RoutingResult(ids=out.ids, weights=out.weights, order=out.order, capped=out.capped_u8.view(torch.bool),
                           margin=out.margin)
    return result, BandGaps(gaps=out.gaps[:, :M], cap_gap=out.gaps[:, M:])


class _RoutingOutputs:
    """The kernel's six outputs as views of one int32 allocation (one allocator call, not six).

    Layout, in int32 words: ids [T*W] | weights [T*W] (float32 bits) | order [T]
    | margin [T] (float32) | gaps [T*(M+1)] (float32) | capped [T] bytes,
    rounded up to whole words.
    """

    __slots__ = ("ids", "weights", "order", "margin", "gaps", "capped_u8")

    def __init__(self, T: int, W: int, M: int, device: torch.device):
        n = [T * W, T * W, T, T, T * (M + 1), (T + 3) // 4]
        buf = torch.empty(sum(n), dtype=torch.int32, device=device)
        ids, weights, order, margin, gaps, capped = buf.split(n)
        self.ids = ids.view(T, W)  # [T, W] int32
        self.weights = weights.view(torch.float32).view(T, W)  # [T, W] float32
        self.order = order  # [T] int32
        self.margin = margin.view(torch.float32)  # [T] float32
        self.gaps = gaps.view(torch.float32).view(T, M + 1)  # [T, M+1]: gap_1..gap_M, cap gap
        self.capped_u8 = capped.view(torch.uint8)[:T]  # [T] uint8 (0/1), read as bool
