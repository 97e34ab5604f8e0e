"""_moe_gate_up_kernel, _moe_down_kernel, _slot_sum_kernel + moe_experts_triton(): experts over active pairs.

A grouped GEMM over the row tiles of the tile schedule (tile_schedule_triton):
each program takes BLOCK_M pairs of one expert (rows gathered by token), so an
inactive slot (id -1) is in no tile and costs no GEMM work.
  1. h[p]      = silu(x[tok(p)] @ gate_e.T) * (x[tok(p)] @ up_e.T)     [P, I], x's dtype
  2. yp[s(p)]  = weight(p) * (h[p] @ w2[e].T)                          [T*W, H], x's dtype
     (with weights on the input, step 1 reads weight(p) * x[tok(p)] instead and step 2 does not scale)
  3. y[t]      = sum over the active slots s of token t of yp[s]        [T, H], float32 sum
Step 2 scales in float32 and rounds once to x's dtype, as vLLM's kernel
writes its per-slot outputs; step 3 reads only active slots (the others are
never written) in slot order, so the result does not depend on scheduling.
Programs are numbered with vLLM's GROUP_SIZE_M swizzle: GROUP_M row tiles
take the same column block in turn, so their weight tile is reused from L2.
Shapes depend on (T, W, H, I, E) only: a CUDA graph can capture the call.

FP8 block-quantized experts (FP8): float8 tensor-core GEMMs, BLOCK_K = the
scale block bk, each K step's product scaled by its activation scale (per row)
times its weight block's scale (per column) before it is added, as vLLM's
fused_moe_kernel. x is quantized per token by one launch before step 1 (every
column block of step 1 reads it: quantizing in the GEMM would repeat it per
column block). h is quantized in step 1's epilogue when a program's half of
the N tile holds whole groups of bk columns (BLOCK_N / 2 a multiple of bk: its
rows are then complete groups), else by step 2 as it loads each K tile (one
group per row); both write what fp8_blocks.quantize_groups would, bit for bit.
No launch is added for h either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoothsmoe_kernels.fp8_blocks import FP8_DTYPE, check_fp8_experts
from smoothsmoe_kernels.fp8_blocks_triton import _quantize_groups, quantize_groups_triton
from smoothsmoe_kernels.tile_config import ExpertsTileConfig, tile_config
from smoothsmoe_kernels.tile_schedule_triton import tile_schedule_triton

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _tile_and_column(grid_tiles, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column block) of this program, with vLLM's GROUP_SIZE_M swizzle."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first = (pid // in_group) * GROUP_M
    group_size = tl.minimum(grid_tiles - first, GROUP_M)
    return first + (pid % in_group) % group_size, (pid % in_group) // group_size


@triton.jit
def _tile_rows(expert_ptr, row_ptr, rows_ptr, tile, BLOCK_M: tl.constexpr):
    """The tile's expert, its BLOCK_M sorted-pair rows and which of them are real."""
    e = tl.load(expert_ptr + tile).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    return e, tl.load(row_ptr + tile) + offs_m, offs_m < tl.load(rows_ptr + tile)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: exact float32 products, no TF32
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr, SWAP_AB: tl.constexpr):
    """acc + a [BM, BK] @ b [BK, BN]; acc is [BN, BM] (the transpose) with SWAP_AB."""
    if SWAP_AB:
        return _dot(tl.trans(b), tl.trans(a), acc, IEEE)
    return _dot(a, b, acc, IEEE)


@triton.jit
def _mm_scaled(a, b, acc, a_scale, b_scale, SWAP_AB: tl.constexpr):
    """_mm for one FP8 K step: its float32 product times a_scale [BM] x b_scale [BN], added.

    The two scales are multiplied first, so that both layouts round alike.
    """
    if SWAP_AB:
        return acc + tl.dot(tl.trans(b), tl.trans(a)) * (b_scale[:, None] * a_scale[None, :])
    return acc + tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])


@triton.jit
def _acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    if SWAP_AB:
        return tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    return tl.zeros((BLOCK_M, BLOCK_N), tl.float32)


@triton.jit
def _as_rows(acc, SWAP_AB: tl.constexpr):
    """The accumulator as [BM, BN], whichever way it was computed."""
    if SWAP_AB:
        return tl.trans(acc)
    return acc


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w13_ptr, h_ptr, weight_ptr, slot_ptr, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr, tiles_done_ptr,
    xs_ptr, ws_ptr, hs_ptr,
    grid_tiles, H, I, stride_xt, stride_we, stride_wn, stride_hp,
    stride_xs, stride_wse, stride_wsn, stride_hs,
    W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr, COUNT_TILES: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    FP8: tl.constexpr, GROUP_N: tl.constexpr, QUANT_H: tl.constexpr, H_TYPE: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """One program: BLOCK_M pairs of one expert x BLOCK_N / 2 columns of I (gate and up).

    FP8: x_ptr is x quantized (xs_ptr its scales [T, H / BLOCK_K]), ws_ptr w13's block scales;
    QUANT_H: h is written quantized (hs_ptr its scales), in groups of BLOCK_K columns.
    """
    HALF_N: tl.constexpr = BLOCK_N // 2
    tile, pid_n = _tile_and_column(grid_tiles, I, HALF_N, GROUP_M)
    if tile >= tl.load(num_tiles_ptr):
        return
    e, rows, m_ok = _tile_rows(expert_ptr, row_ptr, rows_ptr, tile, BLOCK_M)
    slot = tl.load(slot_ptr + rows, mask=m_ok, other=0)
    tok = slot // W
    if WEIGHT_ON_INPUT:  # each pair's weight scales its input row, rounded to x's dtype (as the reference)
        pw = tl.load(weight_ptr + slot, mask=m_ok, other=0.0)
    offs_n = pid_n * HALF_N + tl.arange(0, HALF_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None].to(tl.int64) * stride_xt + offs_k[None, :]
    g_ptrs = w13_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    if FP8:  # per K step: one scale per row (its token's group), one per column (its weight block)
        xs_ptrs = xs_ptr + tok.to(tl.int64) * stride_xs
        gs_ptrs = ws_ptr + e * stride_wse + (offs_n // GROUP_N) * stride_wsn
        us_ptrs = ws_ptr + e * stride_wse + ((I + offs_n) // GROUP_N) * stride_wsn
    acc_gate = _acc(BLOCK_M, HALF_N, SWAP_AB)
    acc_up = _acc(BLOCK_M, HALF_N, SWAP_AB)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_ok = offs_k < H - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if WEIGHT_ON_INPUT:
            a = (a.to(tl.float32) * pw[:, None]).to(x_ptr.dtype.element_ty)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8:
            a_scale = tl.load(xs_ptrs + k, mask=m_ok, other=0.0)
            acc_gate = _mm_scaled(a, wg, acc_gate, a_scale, tl.load(gs_ptrs + k, mask=n_ok, other=0.0), SWAP_AB)
            acc_up = _mm_scaled(a, wu, acc_up, a_scale, tl.load(us_ptrs + k, mask=n_ok, other=0.0), SWAP_AB)
        else:
            acc_gate = _mm(a, wg, acc_gate, IEEE, SWAP_AB)
            acc_up = _mm(a, wu, acc_up, IEEE, SWAP_AB)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    acc_gate = _as_rows(acc_gate, SWAP_AB)
    acc_up = _as_rows(acc_up, SWAP_AB)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up, in float32
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hp + offs_n[None, :]
    if QUANT_H:  # rounded to x's dtype first, as the reference; columns past I hold 0 (masked weights)
        NG: tl.constexpr = HALF_N // BLOCK_K
        hq, hs = _quantize_groups(h.to(H_TYPE).to(tl.float32), BLOCK_M, NG, BLOCK_K)
        tl.store(h_ptrs, hq, mask=m_ok[:, None] & n_ok[None, :])
        groups = pid_n * NG + tl.arange(0, NG)
        tl.store(hs_ptr + rows[:, None].to(tl.int64) * stride_hs + groups[None, :], hs,
                 mask=m_ok[:, None] & (groups * BLOCK_K < I)[None, :])
    else:
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if COUNT_TILES:
        if pid_n == 0:
            tl.atomic_add(tiles_done_ptr, 1)


@triton.jit
def _moe_down_kernel(
    h_ptr, w2_ptr, yp_ptr, weight_ptr, slot_ptr, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr,
    hs_ptr, ws_ptr,
    grid_tiles, H, I, stride_hp, stride_we, stride_wh, stride_yp, stride_hs, stride_wse, stride_wsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IEEE: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    FP8: tl.constexpr, GROUP_N: tl.constexpr, QUANT_H: tl.constexpr, SWAP_AB: tl.constexpr,
):
    """One program: BLOCK_M pairs of one expert x BLOCK_N columns of H, scaled by the pairs' weights
    (unless the weights went on the input).

    FP8: ws_ptr is w2's block scales; h comes quantized (QUANT_H: hs_ptr its scales) or in x's
    dtype, and then each K tile (one group of BLOCK_K columns a row) is quantized as it is loaded.
    """
    tile, pid_n = _tile_and_column(grid_tiles, H, BLOCK_N, GROUP_M)
    if tile >= tl.load(num_tiles_ptr):
        return
    e, rows, m_ok = _tile_rows(expert_ptr, row_ptr, rows_ptr, tile, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hp + offs_k[None, :]
    w_ptrs = w2_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wh + offs_k[:, None]
    if FP8:
        hs_ptrs = hs_ptr + rows.to(tl.int64) * stride_hs
        ws_ptrs = ws_ptr + e * stride_wse + (offs_n // GROUP_N) * stride_wsn
    acc = _acc(BLOCK_M, BLOCK_N, SWAP_AB)
    for k in range(0, tl.cdiv(I, BLOCK_K)):
        k_ok = offs_k < I - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8:
            if QUANT_H:
                a_scale = tl.load(hs_ptrs + k, mask=m_ok, other=0.0)
            else:
                a, a_scale = _quantize_groups(a.to(tl.float32), BLOCK_M, 1, BLOCK_K)
                a_scale = tl.reshape(a_scale, (BLOCK_M,))
            acc = _mm_scaled(a, w, acc, a_scale, tl.load(ws_ptrs + k, mask=n_ok, other=0.0), SWAP_AB)
        else:
            acc = _mm(a, w, acc, IEEE, SWAP_AB)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = _as_rows(acc, SWAP_AB)
    slot = tl.load(slot_ptr + rows, mask=m_ok, other=0)
    if not WEIGHT_ON_INPUT:
        acc *= tl.load(weight_ptr + slot, mask=m_ok, other=0.0)[:, None]
    tl.store(yp_ptr + slot[:, None].to(tl.int64) * stride_yp + offs_n[None, :], acc.to(yp_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _slot_sum_kernel(
    yp_ptr, ids_ptr, y_ptr, T, H, stride_yp, stride_yt,
    E: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program: y for BLOCK_T tokens x BLOCK_H columns, the sum of their active slots in slot order."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = offs_t < T
    h_ok = offs_h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for j in tl.static_range(W):
        slot = offs_t.to(tl.int64) * W + j
        e = tl.load(ids_ptr + slot, mask=t_ok, other=-1)
        on = (e >= 0) & (e < E)  # the schedule's notion of active: only these slots were written
        acc += tl.load(yp_ptr + slot[:, None] * stride_yp + offs_h[None, :], mask=on[:, None] & h_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t[:, None].to(tl.int64) * stride_yt + offs_h[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & h_ok[None, :])


FP32_STAGE_BYTES = 96 * 1024  # shared memory the pipeline of a float32 call may take


def _stages(config: ExpertsTileConfig, element_size: int) -> int:
    """The config's pipeline depth; fewer stages for float32 inputs, whose tiles take twice the
    shared memory the bf16 configs (vLLM's defaults, the tuned tables) were chosen for."""
    if element_size < 4:
        return config.num_stages
    per_stage = (config.block_m * config.block_k + config.block_k * config.block_n) * element_size
    return max(1, min(config.num_stages, FP32_STAGE_BYTES // per_stage))


def moe_experts_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    config: ExpertsTileConfig | None = None,
    tiles_done: torch.Tensor | None = None,
    weights_on_input: bool = False,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """moe_experts (see experts.moe_experts_torch) in Triton; same shapes and contract.

    Launches: the tile schedule (one, or three past one chunk), (FP8: x's quantization,)
    gate-up, down, slot sum.

    config: the tile sizes; by default tile_config() picks them by token count
    (a tuned table for this GPU and shape if there is one, else vLLM's rules).
    tiles_done: optional int32 [1] counter; each row tile with work adds 1.
    Ids outside [0, E) count as inactive.
    w13_scale, w2_scale, block_shape: FP8 block-quantized experts, as vLLM's
    fused_experts takes them (fp8_blocks.check_fp8_experts gives the shapes);
    the config's block_k must then be the block's bk. ValueError otherwise, on
    an x dtype other than float32, bfloat16, float16, and on weights_on_input with FP8.
    """
    T, H = x.shape
    E, two_I, _ = w13.shape
    I = two_I // 2
    W = ids.shape[1]
    blocks = check_fp8_experts(w13, w2, w13_scale, w2_scale, block_shape)
    if x.dtype not in TL_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if blocks is not None and weights_on_input:
        raise ValueError("weights_on_input is not supported with FP8 block-quantized experts")
    if config is None:
        config = tile_config(T, E, H, I, x.dtype, x.device, block_shape=blocks)[0]
    if blocks is not None and config.block_k != blocks[1]:
        raise ValueError(f"FP8 blocks {blocks} need block_k = {blocks[1]} (one scale a K step), got {config}")
    x, w13, w2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w13, w2))
    ids = ids if ids.dtype == torch.int32 and ids.is_contiguous() else ids.to(torch.int32).contiguous()
    weights = weights.reshape(-1).float().contiguous()  # no copy for float32 contiguous weights
    y = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    sched = tile_schedule_triton(ids, E, config.block_m)
    grid_tiles = sched.expert.numel()
    fp8 = blocks is not None
    quant_h = fp8 and (config.block_n // 2) % config.block_k == 0
    if fp8:
        a, a_scale = quantize_groups_triton(x, blocks[1])
        w13_scale, w2_scale = w13_scale.contiguous(), w2_scale.contiguous()
    else:
        a, a_scale, w13_scale, w2_scale = x, x, x, x  # the scale pointers go unread
    if quant_h:  # h quantized by the gate-up kernel: float8 h, its scales, and yp
        h = torch.empty(T * W, I, dtype=FP8_DTYPE, device=x.device)
        h_scale = torch.empty(T * W, triton.cdiv(I, config.block_k), dtype=torch.float32, device=x.device)
        yp = torch.empty(T * W, H, dtype=x.dtype, device=x.device)
    else:  # h (by sorted pair) and yp (by slot) in one allocation; unwritten rows are never read.
        work = torch.empty(T * W * (I + H), dtype=x.dtype, device=x.device)
        h, yp = work[: T * W * I].view(T * W, I), work[T * W * I :].view(T * W, H)
        h_scale = h
    ieee = x.dtype == torch.float32  # no TF32 for float32 inputs: the reference is exact float32
    common = dict(BLOCK_M=config.block_m, BLOCK_K=config.block_k, GROUP_M=config.group_m, IEEE=ieee,
                  WEIGHT_ON_INPUT=weights_on_input, FP8=fp8, GROUP_N=blocks[0] if fp8 else 1, QUANT_H=quant_h,
                  SWAP_AB=config.swap_ab, num_warps=config.num_warps,
                  num_stages=_stages(config, 1 if fp8 else x.element_size()))
    s13 = (w13_scale.stride(0), w13_scale.stride(1)) if fp8 else (0, 0)
    s2 = (w2_scale.stride(0), w2_scale.stride(1)) if fp8 else (0, 0)
    _moe_gate_up_kernel[(grid_tiles * triton.cdiv(I, config.block_n // 2),)](
        a, w13, h, weights, sched.flat_slot, sched.expert, sched.row, sched.rows, sched.num_tiles,
        tiles_done if tiles_done is not None else sched.num_tiles, a_scale, w13_scale, h_scale,
        grid_tiles, H, I, a.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        a_scale.stride(0) if fp8 else 0, *s13, h_scale.stride(0) if quant_h else 0,
        W=W, BLOCK_N=config.block_n, COUNT_TILES=tiles_done is not None, H_TYPE=TL_DTYPES[x.dtype], **common,
    )
    _moe_down_kernel[(grid_tiles * triton.cdiv(H, config.block_n),)](
        h, w2, yp, weights, sched.flat_slot, sched.expert, sched.row, sched.rows, sched.num_tiles,
        h_scale, w2_scale,
        grid_tiles, H, I, h.stride(0), w2.stride(0), w2.stride(1), yp.stride(0),
        h_scale.stride(0) if quant_h else 0, *s2,
        BLOCK_N=config.block_n, **common,
    )
    block_h = min(1024, triton.next_power_of_2(H))
    _slot_sum_kernel[(triton.cdiv(T, 4), triton.cdiv(H, block_h))](
        yp, ids, y, T, H, yp.stride(0), y.stride(0), E=E, W=W, BLOCK_T=4, BLOCK_H=block_h,
    )
    return y
