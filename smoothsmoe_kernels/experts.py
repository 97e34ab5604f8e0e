"""moe_experts_torch(): the MoE layer's expert sum over active pairs only (the reference and CPU path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoothsmoe_kernels.fp8_blocks import block_scaled_matmul, check_fp8_experts, quantize_groups
from smoothsmoe_kernels.pairs import group_pairs_by_expert


def moe_experts_torch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    weights_on_input: bool = False,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """y[t] = sum over active slots j of weights[t, j] * Expert_{ids[t, j]}(x[t]).

    weights_on_input: y[t] = sum over j of Expert_{ids[t, j]}(weights[t, j] * x[t])
    instead (Llama 4's layer); the scaled input is rounded to x's dtype, as
    vLLM's CPU path scales it. A zero weight then gives Expert(0) = 0, so the
    layer stays continuous as a slot's weight fades.

    Expert_e(x) = (silu(x @ gate_e.T) * (x @ up_e.T)) @ w2[e].T, with vLLM's
    weight layout: w13 [E, 2I, H] holds gate rows then up rows, w2 [E, H, I].

    x [T, H]; ids [T, W] int (-1 = inactive); weights [T, W] float32.
    Returns [T, H] in x's dtype. Inactive slots and experts without pairs cost
    nothing: they are never multiplied, not even by a zero weight. Each
    expert's matmuls run in x's dtype; the weighted sum accumulates in float32.

    FP8 block-quantized experts (w13_scale, w2_scale, block_shape = (bn, bk), the
    keywords of vLLM's fused_experts; see fp8_blocks for the format): w13 and w2
    are float8_e4m3fn with float32 block scales. The activations are quantized
    where vLLM's fused_experts quantizes them (per_token_group_quant_fp8, in
    groups of bk): x once per token, before the gate-up GEMM; h before the down
    GEMM. Each GEMM is fp8 x fp8 with the scales applied per K block, float32
    sums (fp8_blocks.block_scaled_matmul). Where the roundings differ from
    vLLM's: h = silu(gate) * up is formed in float32 from the float32 gate and up
    and rounded once to x's dtype before it is quantized (vLLM rounds gate and up
    to x's dtype first, then silu_and_mul rounds h); each pair's weighted output
    is rounded to x's dtype and the slots summed in float32 (as the Triton
    kernel). weights_on_input is not supported with FP8 (ValueError): vLLM's
    quantizer runs per token, not per scaled pair.
    """
    blocks = check_fp8_experts(w13, w2, w13_scale, w2_scale, block_shape)
    if blocks is not None and weights_on_input:
        raise ValueError("weights_on_input is not supported with FP8 block-quantized experts")
    T, H = x.shape
    E = w13.shape[0]
    pairs = group_pairs_by_expert(ids, E)
    pair_weight = weights.reshape(-1)[pairs.flat_slot].float()  # [P]
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    bounds = pairs.offsets.tolist()
    if blocks is not None:
        xq, xs = quantize_groups(x, blocks[1])  # per token: the same for each of its experts
    for e in range(E):  # a loop over experts, not tokens; experts without pairs are skipped
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        tok = pairs.token[lo:hi]
        w = pair_weight[lo:hi, None]
        if blocks is not None:
            gate, up = block_scaled_matmul(xq[tok], xs[tok], w13[e], w13_scale[e], blocks).chunk(2, dim=-1)
            h = (F.silu(gate) * up).to(x.dtype)
            hq, hs = quantize_groups(h, blocks[1])
            out = block_scaled_matmul(hq, hs, w2[e], w2_scale[e], blocks)  # [n, H] float32
            y.index_add_(0, tok, (out * w).to(x.dtype).float())
            continue
        xe = (x[tok].float() * w).to(x.dtype) if weights_on_input else x[tok]
        gate, up = (xe @ w13[e].T).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ w2[e].T  # [n, H]
        y.index_add_(0, tok, out.float() if weights_on_input else out.float() * w)
    return y.to(x.dtype)
