"""_moe_gate_up_kernel, _moe_down_kernel + moe_experts_triton(): MoE experts over active pairs only.

A grouped GEMM in two launches over the tiles of pairs.tile_schedule: each
program takes BLOCK_M pairs of one expert (rows gathered by token), so an
inactive slot (id -1) is in no tile and costs no GEMM work.
  1. h[p] = silu(x[tok(p)] @ gate_e.T) * (x[tok(p)] @ up_e.T)      [P, I]
  2. yp[slot(p)] = weight(p) * h[p] @ w2[e].T                       [T*W, H]
then y[t] = sum over W of yp[t, :] (inactive slots hold 0): a fixed-order sum,
so the result does not depend on scheduling (no atomics on y). Shapes are
fixed by (T, W, H, I, E), so CUDA graphs can capture the whole call. Each
program with work adds 1 to `tiles_done`: the kernel's own tile bookkeeping.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoothsmoe_kernels.pairs import tile_schedule


@triton.jit
def _tile_rows(expert_ptr, row_ptr, rows_ptr, tile, BLOCK_M: tl.constexpr):
    """The tile's expert, its BLOCK_M sorted-pair rows and which of them are real."""
    e = tl.load(expert_ptr + tile).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    return e, tl.load(row_ptr + tile) + offs_m, offs_m < tl.load(rows_ptr + tile)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: exact float32 products, no TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w13_ptr, h_ptr, token_ptr, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr, tiles_done_ptr,
    H, I, stride_xt, stride_we, stride_wn, stride_hp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """One program: BLOCK_M pairs of one expert x BLOCK_N columns of I."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    e, rows, m_ok = _tile_rows(expert_ptr, row_ptr, rows_ptr, tile, BLOCK_M)
    tok = tl.load(token_ptr + rows, mask=m_ok, other=0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        a = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_base = w13_ptr + e * stride_we + offs_k[:, None]
        wg = tl.load(w_base + offs_n[None, :] * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(w_base + (I + offs_n[None, :]) * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_gate += _dot(a, wg, IEEE)
        acc_up += _dot(a, wu, IEEE)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up
    tl.store(h_ptr + rows[:, None] * stride_hp + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
    if tl.program_id(1) == 0:
        tl.atomic_add(tiles_done_ptr, 1)


@triton.jit
def _moe_down_kernel(
    h_ptr, w2_ptr, yp_ptr, weight_ptr, slot_ptr, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr,
    H, I, stride_hp, stride_we, stride_wh, stride_yp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """One program: BLOCK_M pairs of one expert x BLOCK_N columns of H, scaled by the pairs' weights."""
    tile = tl.program_id(0)
    if tile >= tl.load(num_tiles_ptr):
        return
    e, rows, m_ok = _tile_rows(expert_ptr, row_ptr, rows_ptr, tile, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(h_ptr + rows[:, None] * stride_hp + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w2_ptr + e * stride_we + offs_n[None, :] * stride_wh + offs_k[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(a, w, IEEE)
    slot = tl.load(slot_ptr + rows, mask=m_ok, other=0)
    acc *= tl.load(weight_ptr + slot, mask=m_ok, other=0.0)[:, None]
    tl.store(yp_ptr + slot[:, None] * stride_yp + offs_n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def moe_experts_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    block_m: int = 16,
    block_n: int = 32,
    block_k: int = 32,
    tiles_done: torch.Tensor | None = None,
) -> torch.Tensor:
    """moe_experts (see experts.py) as two Triton launches; same shapes and contract.

    tiles_done: optional int32 [1] counter; each row tile with work adds 1.
    """
    T, H = x.shape
    E, two_I, _ = w13.shape
    I = two_I // 2
    W = ids.shape[1]
    dev = x.device
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    sched = tile_schedule(ids, E, block_m)
    max_tiles = sched.expert.numel()
    h = torch.empty(T * W, I, dtype=x.dtype, device=dev)  # [P, I] by sorted pair
    yp = torch.zeros(T * W, H, dtype=torch.float32, device=dev)  # [T*W, H]; inactive slots stay 0
    counter = tiles_done if tiles_done is not None else torch.zeros(1, dtype=torch.int32, device=dev)
    ieee = x.dtype == torch.float32  # no TF32 for float32 inputs: the reference is exact float32
    if T and max_tiles:
        _moe_gate_up_kernel[(max_tiles, triton.cdiv(I, block_n))](
            x, w13, h, sched.token, sched.expert, sched.row, sched.rows, sched.num_tiles, counter,
            H, I, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee,
        )
        _moe_down_kernel[(max_tiles, triton.cdiv(H, block_n))](
            h, w2, yp, weights.reshape(-1).float().contiguous(), sched.flat_slot, sched.expert, sched.row,
            sched.rows, sched.num_tiles,
            H, I, h.stride(0), w2.stride(0), w2.stride(1), yp.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee,
        )
    return yp.view(T, W, H).sum(1).to(x.dtype)
