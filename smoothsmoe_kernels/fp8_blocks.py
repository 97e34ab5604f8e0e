"""FP8 block quantization in torch: the format of vLLM's block-wise FP8 MoE, the reference of its steps.

The format (DeepSeek-V3's checkpoints, Qwen3's -FP8 ones; vLLM's Fp8MoEMethod
with `weight_block_size: [bn, bk]`, usually [128, 128]):
  weights      float8_e4m3fn [E, N, K], one float32 scale per bn x bk block:
               scale [E, ceil(N / bn), ceil(K / bk)] (the checkpoint's
               `weight_scale_inv`), w[e, n, k] = q[e, n, k] * scale[e, n // bn, k // bk]
  activations  quantized per token in groups of bk along K when a GEMM reads
               them: y [M, K] -> float8_e4m3fn [M, K] and float32 [M, ceil(K / bk)]
  a GEMM       c = sum over K blocks kb of (aq_kb @ bq_kb.T) * (a_scale[:, kb] b_scale[n // bn, kb]),
               in float32: the scales are applied in the K loop, as vLLM's
               fused_moe_kernel applies them (fused_moe.py, the group_k > 0 branch)

The activation quantizer is vLLM's per_token_group_quant_fp8 (quantization/
utils/fp8_utils.py, its Triton kernel _per_token_group_quant_fp8, use_ue8m0
off): per group, scale = max(amax, 1e-10) * float32(1 / 448) and
q = round_to_nearest_even(clamp(y / scale, -448, 448)), all float32. One
extension: vLLM asserts K % bk == 0; here a last, partial group takes the
amax of its real elements (and weight blocks past N or K likewise), so odd
shapes have a defined result.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(float8_e4m3fn).max, vLLM's get_fp8_min_max on CUDA
SCALE_EPS = 1e-10  # per_token_group_quant_fp8's eps: an all-zero group gets a tiny scale, not 0 / 0
# float32(1 / 448): vLLM multiplies the amax by the reciprocal rather than dividing (fp8_utils.py says why)
INV_FP8_MAX = torch.tensor(1.0 / FP8_MAX, dtype=torch.float32)


def check_block_shape(block_shape) -> tuple[int, int]:
    """(bn, bk) as ints; bk is a Triton tile width (a power of 2, >= 16), bn any positive int.

    Raises ValueError otherwise.
    """
    if block_shape is None or len(block_shape) != 2:
        raise ValueError(f"block_shape must be (bn, bk), got {block_shape!r}")
    bn, bk = (int(b) for b in block_shape)
    if bn < 1 or bk < 16 or bk & (bk - 1):
        raise ValueError(f"block_shape needs bn >= 1 and bk a power of 2 >= 16, got {block_shape!r}")
    return bn, bk


def check_fp8_experts(w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
                      w2_scale: torch.Tensor | None, block_shape) -> tuple[int, int] | None:
    """Validate block-quantized expert weights; return (bn, bk), or None for unquantized ones.

    w13 float8_e4m3fn [E, 2I, H] with w13_scale float32 [E, ceil(2I/bn), ceil(H/bk)];
    w2 float8_e4m3fn [E, H, I] with w2_scale float32 [E, ceil(H/bn), ceil(I/bk)].
    Both scales or neither. Raises ValueError on any mismatch.
    """
    if w13_scale is None and w2_scale is None:
        if w13.dtype == FP8_DTYPE or w2.dtype == FP8_DTYPE:
            raise ValueError("float8 expert weights need w13_scale and w2_scale (block-wise FP8)")
        return None
    if w13_scale is None or w2_scale is None:
        raise ValueError("give both w13_scale and w2_scale, or neither")
    bn, bk = check_block_shape(block_shape)
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"block-scaled experts take float8_e4m3fn weights, got {w13.dtype} and {w2.dtype}")
    for name, w, s in (("w13", w13, w13_scale), ("w2", w2, w2_scale)):
        E, N, K = w.shape
        want = (E, -(-N // bn), -(-K // bk))
        if tuple(s.shape) != want or s.dtype != torch.float32:
            raise ValueError(f"{name}_scale must be float32 {want} for {name} {tuple(w.shape)} and blocks "
                             f"{(bn, bk)}, got {s.dtype} {tuple(s.shape)}")
    return bn, bk


def quantize_groups(y: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-token-group FP8 quantization of y [M, K] (any float dtype) in groups of `group` columns.

    Returns q float8_e4m3fn [M, K] and scale float32 [M, ceil(K / group)], q * scale ~ y.
    Steps, in float32: amax of the group's |y|, scale = max(amax, 1e-10) * float32(1/448),
    q = clamp(y / scale, -448, 448) rounded to nearest even (torch's float8 conversion).
    """
    M, K = y.shape
    G = -(-K // group)
    yf = torch.nn.functional.pad(y.float(), (0, G * group - K)).view(M, G, group)  # zeros leave the amax alone
    amax = yf.abs().amax(dim=-1)
    scale = amax.clamp(min=SCALE_EPS) * INV_FP8_MAX.to(y.device)  # [M, G]
    q = (yf / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(M, G * group)[:, :K].contiguous(), scale


def quantize_weight_blocks(w: torch.Tensor, block_shape=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize weights w [E, N, K]: float8_e4m3fn [E, N, K] and float32 scales [E, ceil(N/bn), ceil(K/bk)].

    scale = amax of the block / 448 (zero blocks get scale 1e-10 / 448), q = w / scale rounded
    to nearest even: how FP8 block checkpoints are made. For tests, benchmarks and tiny checkpoints.
    """
    bn, bk = check_block_shape(block_shape)
    E, N, K = w.shape
    Nb, Kb = -(-N // bn), -(-K // bk)
    blocks = torch.nn.functional.pad(w.float(), (0, Kb * bk - K, 0, Nb * bn - N)).view(E, Nb, bn, Kb, bk)
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=SCALE_EPS) / FP8_MAX  # [E, Nb, Kb]
    q = (blocks / scale[:, :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(E, Nb * bn, Kb * bk)[:, :N, :K].contiguous(), scale.contiguous()


def dequantize_weight_blocks(q: torch.Tensor, scale: torch.Tensor, block_shape=(128, 128)) -> torch.Tensor:
    """float32 [E, N, K] = q * its block's scale (the inverse of quantize_weight_blocks, up to rounding)."""
    bn, bk = check_block_shape(block_shape)
    _, N, K = q.shape
    s = scale.repeat_interleave(bn, dim=1)[:, :N].repeat_interleave(bk, dim=2)[:, :, :K]
    return q.float() * s


def block_scaled_matmul(aq: torch.Tensor, a_scale: torch.Tensor, bq: torch.Tensor, b_scale: torch.Tensor,
                        block_shape) -> torch.Tensor:
    """c = aq @ bq.T with the block scales applied per K block, as vLLM's fused_moe_kernel does.

    aq float8 [M, K] with a_scale float32 [M, ceil(K/bk)] (quantize_groups); bq float8 [N, K]
    with b_scale float32 [ceil(N/bn), ceil(K/bk)] (one expert's weights). Returns float32 [M, N]:
    c = sum over kb in order of (aq_kb @ bq_kb.T) * (a_scale[:, kb, None] * b_scale_n[None, :, kb]),
    each product of two fp8 values exact in float32, the sum float32.
    """
    bn, bk = block_shape
    M, K = aq.shape
    N = bq.shape[0]
    b_scale_n = b_scale.repeat_interleave(bn, dim=0)[:N]  # [N, Kb]: each row's block scale
    c = torch.zeros(M, N, dtype=torch.float32, device=aq.device)
    for kb, k0 in enumerate(range(0, K, bk)):  # a loop over K blocks (K / bk of them), not tokens
        dot = aq[:, k0 : k0 + bk].float() @ bq[:, k0 : k0 + bk].float().T
        c += dot * (a_scale[:, kb, None] * b_scale_n[None, :, kb])
    return c
