"""moe_experts_by_width(): active pairs only, through a kernel that computes every slot it is given.

vLLM's CPU experts op (torch.ops._C.cpu_fused_moe, vllm/model_executor/layers/
fused_moe/experts/cpu_moe.py) takes ids [T, W] and computes all T * W
(token, slot) pairs: it buckets pairs by expert id with no check (an id of -1
indexes its per-expert counts at -1), and a weight-0 slot is multiplied
through both GEMMs before its 0 is applied in the weighted sum. So a smoothed
layer hands it inactive slots as the token's top-1 expert at weight 0, and
pays a GEMM row for each. Here each token gets exactly its active slots
instead: tokens are grouped by active width (k plus their order; the active
extras are a prefix of the extra slots) and the kernel runs once per width
on that group's rows, with that many slots.

What it costs and saves (python -m smoothsmoe_kernels.bench experts on the
CPU): the padded rows' GEMM work is saved; each extra group pays a kernel call,
a pass over the experts' weights, and the gather of its rows. On vLLM's op
that wins only where rows dominate: small experts and thousands of tokens.

The output equals the padded call's bit for bit when the kernel sums a
token's slots in slot order in float32 (vLLM's op does): a weight-0 slot adds
exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# kernel(out [n, H], x [n, H], weights [n, w] float32, ids [n, w] int32, every id valid): writes into out
# the weighted sum over the w slots (vLLM's cpu_fused_moe takes these first four arguments so)
SlotKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def moe_experts_by_width(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, top_k: int, kernel: SlotKernel
) -> torch.Tensor:
    """y[t] = sum over token t's active slots j of weights[t, j] * Expert_{ids[t, j]}(x[t]), via `kernel`.

    x [T, H]; ids [T, W] int32, -1 on inactive slots, active slots first
    (slots 0..top_k-1 always active, then a prefix of the extras: what
    smooth_topk returns); weights [T, W] float32. Returns [T, H] in x's dtype.

    Example, top_k = 2, W = 4: ids [[3, 1, 5, -1], [0, 2, -1, -1], [7, 4, 6, 1]]
    are widths [3, 2, 4]: three kernel calls, on token 1 with 2 slots, token 0
    with 3, token 2 with 4. A batch of one width is one call, without a gather.

    Reads the group sizes on the host (one bincount): not for CUDA graphs; the
    CPU path, in an op opaque to torch.compile. Raises ValueError if shapes disagree.
    """
    T, W = ids.shape
    if weights.shape != ids.shape or x.shape[0] != T or not 1 <= top_k <= W:
        raise ValueError(f"shapes do not agree: x {tuple(x.shape)}, ids {tuple(ids.shape)}, "
                         f"weights {tuple(weights.shape)}, top_k {top_k}")
    width = top_k + (ids[:, top_k:] >= 0).sum(-1)  # [T]
    counts = torch.bincount(width, minlength=W + 1).tolist()  # the one host read
    if max(counts) == T:  # one width (always so for T = 1): the batch as it is
        w = counts.index(T)
        y = torch.empty_like(x)
        kernel(y, x, weights[:, :w].contiguous(), ids[:, :w].contiguous())
        return y
    order = torch.argsort(width, stable=True)  # tokens grouped by width, narrowest first
    xs, ws, ids_s = x[order], weights[order], ids[order]
    ys = torch.empty_like(x)
    start = 0
    for w, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            kernel(ys[rows], xs[rows], ws[rows, :w].contiguous(), ids_s[rows, :w].contiguous())  # rows: a view
            start += n
    return torch.empty_like(x).index_copy_(0, order, ys)
