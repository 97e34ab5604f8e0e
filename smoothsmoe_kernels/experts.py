"""moe_experts_torch(): the MoE layer's expert sum over active pairs only (the reference and CPU path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoothsmoe_kernels.pairs import group_pairs_by_expert


def moe_experts_torch(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    weights_on_input: bool = False,
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
    """
    T, H = x.shape
    E = w13.shape[0]
    pairs = group_pairs_by_expert(ids, E)
    pair_weight = weights.reshape(-1)[pairs.flat_slot].float()  # [P]
    y = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    bounds = pairs.offsets.tolist()
    for e in range(E):  # a loop over experts, not tokens; experts without pairs are skipped
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        tok = pairs.token[lo:hi]
        w = pair_weight[lo:hi, None]
        xe = (x[tok].float() * w).to(x.dtype) if weights_on_input else x[tok]
        gate, up = (xe @ w13[e].T).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ w2[e].T  # [n, H]
        y.index_add_(0, tok, out.float() if weights_on_input else out.float() * w)
    return y.to(x.dtype)
