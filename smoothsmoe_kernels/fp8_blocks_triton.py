"""_quantize_groups (jit helper), _quantize_groups_kernel + quantize_groups_triton(): FP8 group quantization.

fp8_blocks.quantize_groups (vLLM's per_token_group_quant_fp8) in Triton, bit
for bit: the experts kernel quantizes x with the launcher here and h inside its
GEMM kernels with the same helper.

Why the rounding is done by hand: Triton's interpreter (3.9, the CPU path the
tests run) converts float32 to float8e4nv wrongly where rounding carries out
of the mantissa into an odd exponent (127.9 gives 64, not 128), rounds ties
away from zero and truncates subnormals; torch and the GPU round to nearest
even. So _round_to_e4m3 first rounds to the e4m3 grid in float32 (integer ops
on the bits for normals, an exact add-and-subtract for subnormals) and the
cast then only re-encodes a representable value, which every implementation
does exactly. On the GPU it costs a few integer ops per element. The division
is tl.div_rn: Triton's `/` on the GPU is an approximate division, and one ulp
off can move a value across a rounding boundary, where torch divides exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoothsmoe_kernels.fp8_blocks import FP8_DTYPE, FP8_MAX, INV_FP8_MAX, SCALE_EPS

# Constants a jit function may read (Triton takes globals only as constexpr).
_FP8_MAX = tl.constexpr(FP8_MAX)
_SCALE_EPS = tl.constexpr(SCALE_EPS)
_INV_FP8_MAX = tl.constexpr(INV_FP8_MAX.item())  # float32(1/448), the reference's multiplier exactly
_E4M3_MIN_NORMAL = tl.constexpr(2.0**-6)


@triton.jit
def _round_to_e4m3(v):
    """float32 v (|v| <= 448) rounded to the nearest float8 e4m3 value, ties to even; float32 out."""
    bits = v.to(tl.int32, bitcast=True)
    # Normals keep 3 of 23 mantissa bits: add just under half of the dropped part (plus the kept
    # lsb: ties to even), clear it. A carry runs into the exponent, as it should.
    keep_lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + keep_lsb) & -0x100000).to(tl.float32, bitcast=True)
    # Subnormals (below 2^-6) are multiples of 2^-9: scaled by 2^9, adding 2^23 rounds to an integer
    # (to even) and subtracting it back is exact; powers of two scale exactly.
    a = tl.abs(v) * 512.0
    sub = ((a + 8388608.0) - 8388608.0) * 0.001953125
    sub = tl.where(bits < 0, -sub, sub)  # the sign bit, so -0.0 stays -0.0
    return tl.where(tl.abs(v) < _E4M3_MIN_NORMAL, sub, normal)


@triton.jit
def _quantize_groups(y, ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr):
    """float32 y [ROWS, GROUPS * GROUP] -> (float8e4nv q, same shape; float32 scale [ROWS, GROUPS]).

    Columns past the data must hold 0 (they do not change a group's amax). Steps as
    fp8_blocks.quantize_groups.
    """
    g = tl.reshape(y, (ROWS, GROUPS, GROUP))
    amax = tl.max(tl.abs(g), axis=2)
    scale = tl.maximum(amax, _SCALE_EPS) * _INV_FP8_MAX
    v = tl.div_rn(g, scale[:, :, None])
    v = tl.minimum(tl.maximum(v, -_FP8_MAX), _FP8_MAX)
    q = _round_to_e4m3(v).to(tl.float8e4nv)
    return tl.reshape(q, (ROWS, GROUPS * GROUP)), scale



@triton.jit
def _quantize_groups_kernel(y_ptr, q_ptr, s_ptr, M, K, stride_y, stride_q, stride_s,
                            BLOCK_R: tl.constexpr, GROUP: tl.constexpr):
    """One program: BLOCK_R rows x one group of GROUP columns."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    y = tl.load(y_ptr + rows64 * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    q, scale = _quantize_groups(y, BLOCK_R, 1, GROUP)
    tl.store(q_ptr + rows64 * stride_q + cols[None, :], q, mask=ok)
    tl.store(s_ptr + rows64 * stride_s + group, scale, mask=(rows < M)[:, None])


def quantize_groups_triton(y: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_blocks.quantize_groups in one launch: y [M, K] (last dim contiguous) ->
    float8_e4m3fn [M, K], float32 [M, ceil(K / group)]. `group` a power of 2 >= 16.

    Shapes depend on (M, K) only: capturable in a CUDA graph.
    """
    M, K = y.shape
    G = triton.cdiv(K, group)
    q = torch.empty(M, K, dtype=FP8_DTYPE, device=y.device)
    s = torch.empty(M, G, dtype=torch.float32, device=y.device)
    if M == 0:
        return q, s
    block_r = max(1, min(16, 2048 // group))
    _quantize_groups_kernel[(triton.cdiv(M, block_r), G)](
        y, q, s, M, K, y.stride(0), q.stride(0), s.stride(0), BLOCK_R=block_r, GROUP=group,
    )
    return q, s
