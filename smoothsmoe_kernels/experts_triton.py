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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoothsmoe_kernels.tile_config import ExpertsTileConfig, tile_config
from smoothsmoe_kernels.tile_schedule_triton import tile_schedule_triton


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
def _moe_gate_up_kernel(
    x_ptr, w13_ptr, h_ptr, weight_ptr, slot_ptr, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr, tiles_done_ptr,
    grid_tiles, H, I, stride_xt, stride_we, stride_wn, stride_hp,
    W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr, COUNT_TILES: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
):
    """One program: BLOCK_M pairs of one expert x BLOCK_N / 2 columns of I (gate and up)."""
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
    acc_gate = tl.zeros((BLOCK_M, HALF_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, HALF_N), tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_ok = offs_k < H - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if WEIGHT_ON_INPUT:
            a = (a.to(tl.float32) * pw[:, None]).to(x_ptr.dtype.element_ty)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_gate = _dot(a, wg, acc_gate, IEEE)
        acc_up = _dot(a, wu, acc_up, IEEE)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up, in float32
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_hp + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    if COUNT_TILES:
        if pid_n == 0:
            tl.atomic_add(tiles_done_ptr, 1)


@triton.jit
def _moe_down_kernel(
    h_ptr, w2_ptr, yp_ptr, weight_ptr, slot_ptr, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr,
    grid_tiles, H, I, stride_hp, stride_we, stride_wh, stride_yp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    IEEE: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
):
    """One program: BLOCK_M pairs of one expert x BLOCK_N columns of H, scaled by the pairs' weights
    (unless the weights went on the input)."""
    tile, pid_n = _tile_and_column(grid_tiles, H, BLOCK_N, GROUP_M)
    if tile >= tl.load(num_tiles_ptr):
        return
    e, rows, m_ok = _tile_rows(expert_ptr, row_ptr, rows_ptr, tile, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hp + offs_k[None, :]
    w_ptrs = w2_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wh + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, tl.cdiv(I, BLOCK_K)):
        k_ok = offs_k < I - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, IEEE)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
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
) -> torch.Tensor:
    """moe_experts (see experts.moe_experts_torch) in Triton; same shapes and contract.

    Launches: the tile schedule (one, or three past one chunk), gate-up, down, slot sum.

    config: the tile sizes; by default tile_config() picks them by token count
    (a tuned table for this GPU and shape if there is one, else vLLM's rules).
    tiles_done: optional int32 [1] counter; each row tile with work adds 1.
    Ids outside [0, E) count as inactive.
    """
    T, H = x.shape
    E, two_I, _ = w13.shape
    I = two_I // 2
    W = ids.shape[1]
    if config is None:
        config = tile_config(T, E, H, I, x.dtype, x.device)[0]
    x, w13, w2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, w13, w2))
    ids = ids if ids.dtype == torch.int32 and ids.is_contiguous() else ids.to(torch.int32).contiguous()
    weights = weights.reshape(-1).float().contiguous()  # no copy for float32 contiguous weights
    y = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    sched = tile_schedule_triton(ids, E, config.block_m)
    grid_tiles = sched.expert.numel()
    # h (by sorted pair) and yp (by slot) in one allocation; unwritten rows are never read.
    work = torch.empty(T * W * (I + H), dtype=x.dtype, device=x.device)
    h, yp = work[: T * W * I].view(T * W, I), work[T * W * I :].view(T * W, H)
    ieee = x.dtype == torch.float32  # no TF32 for float32 inputs: the reference is exact float32
    common = dict(BLOCK_M=config.block_m, BLOCK_K=config.block_k, GROUP_M=config.group_m, IEEE=ieee,
                  WEIGHT_ON_INPUT=weights_on_input, num_warps=config.num_warps,
                  num_stages=_stages(config, x.element_size()))
    _moe_gate_up_kernel[(grid_tiles * triton.cdiv(I, config.block_n // 2),)](
        x, w13, h, weights, sched.flat_slot, sched.expert, sched.row, sched.rows, sched.num_tiles,
        tiles_done if tiles_done is not None else sched.num_tiles,
        grid_tiles, H, I, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        W=W, BLOCK_N=config.block_n, COUNT_TILES=tiles_done is not None, **common,
    )
    _moe_down_kernel[(grid_tiles * triton.cdiv(H, config.block_n),)](
        h, w2, yp, weights, sched.flat_slot, sched.expert, sched.row, sched.rows, sched.num_tiles,
        grid_tiles, H, I, h.stride(0), w2.stride(0), w2.stride(1), yp.stride(0),
        BLOCK_N=config.block_n, **common,
    )
    block_h = min(1024, triton.next_power_of_2(H))
    _slot_sum_kernel[(triton.cdiv(T, 4), triton.cdiv(H, block_h))](
        yp, ids, y, T, H, yp.stride(0), y.stride(0), E=E, W=W, BLOCK_T=4, BLOCK_H=block_h,
    )
    return y
