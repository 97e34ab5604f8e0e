"""moe_experts_by_width: each token's active slots only, through a kernel that computes every slot it is given."""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels import smooth_topk
from smoothsmoe_kernels.experts import moe_experts_torch
from smoothsmoe_kernels.experts_by_width import moe_experts_by_width

E, K, M, H, I = 16, 4, 2, 256, 128  # vLLM's CPU kernel wants H and I multiples of 32
# eps 0: every token at width k (one call); 0.4: widths k..k+2 mixed; 50: every token at k + 2
CASES = [(T, eps) for T in (1, 7, 64) for eps in (0.0, 0.4, 50.0)]


def layer(T: int, eps: float, dtype: torch.dtype):
    g = torch.Generator().manual_seed(T * 7 + int(eps * 10))
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    x = torch.randn(T, H, generator=g).to(dtype)
    r = smooth_topk(torch.randn(T, E, generator=g), K, eps, M)
    return x, w13, w2, r


def torch_kernel(w13, w2):
    """The torch reference as a kernel of the padded contract (every id valid)."""
    def kernel(out, x, weights, ids):
        out.copy_(moe_experts_torch(x, w13, w2, ids, weights))
    return kernel


@pytest.mark.parametrize("T,eps", CASES)
def test_matches_the_reference_on_active_pairs(T, eps):
    x, w13, w2, r = layer(T, eps, torch.float32)
    y = moe_experts_by_width(x, r.ids, r.weights, K, torch_kernel(w13, w2))
    # Same pairs, each token's slots summed in the same order; only the matmuls' row blocking can
    # differ between a batch and its subsets: float32 rounding.
    torch.testing.assert_close(y, moe_experts_torch(x, w13, w2, r.ids, r.weights), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,eps", CASES)
def test_equals_vllms_padded_call_bit_for_bit(T, eps):
    """With vLLM's CPU experts op: the same output as one padded call (inactive slot = top-1 at weight 0)."""
    ops = pytest.importorskip("vllm._custom_ops")
    isa = "amx" if torch.cpu._is_amx_tile_supported() and torch._C._cpu._init_amx() else "vec"
    x, w13, w2, r = layer(T, eps, torch.bfloat16)
    p13, p2 = ops.cpu_prepack_moe_weight(w13, isa), ops.cpu_prepack_moe_weight(w2, isa)
    calls = []

    def kernel(out, x_rows, weights, ids):
        calls.append(ids.shape)
        ops.cpu_fused_moe(out, x_rows, p13, p2, None, None, weights, ids, "silu", isa)

    y = moe_experts_by_width(x, r.ids, r.weights, K, kernel)
    padded = torch.empty_like(x)
    ops.cpu_fused_moe(padded, x, p13, p2, None, None, r.weights, torch.where(r.ids >= 0, r.ids, r.ids[:, :1]),
                      "silu", isa)
    assert torch.equal(y, padded)
    widths = sorted(set((K + r.order).tolist()))
    assert [w for _, w in calls] == widths  # one call per width present, with exactly that many slots
    assert sum(n for n, _ in calls) == T


def test_shapes_that_disagree_are_refused():
    x, w13, w2, r = layer(4, 0.4, torch.float32)
    with pytest.raises(ValueError):
        moe_experts_by_width(x[:3], r.ids, r.weights, K, torch_kernel(w13, w2))
    with pytest.raises(ValueError):
        moe_experts_by_width(x, r.ids, r.weights[:, :K], K, torch_kernel(w13, w2))
