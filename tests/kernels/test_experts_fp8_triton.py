"""The FP8 block-quantized Triton experts kernel and its quantizer against the torch reference.

Under the interpreter (no GPU) the float8 GEMMs run in numpy, the float8
conversions are the kernel's own rounding (fp8_blocks_triton says why), so the
quantizer is compared bit for bit and the layer to float32 summation order.
"""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels import moe_experts
from smoothsmoe_kernels.experts_triton import moe_experts_triton
from smoothsmoe_kernels.fp8_blocks import quantize_groups
from smoothsmoe_kernels.fp8_blocks_triton import quantize_groups_triton
from smoothsmoe_kernels.tile_config import ExpertsTileConfig
from tests.kernels.fp8_oracle import assert_close_but_rare_flips
from tests.kernels.test_experts_fp8 import fp8_layer, poisoned_fp8_layer, route

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (T, E, K, M, H, I, block_shape, tile config): each config takes another path.
#   m16 n32 k16 on 32 x 16 blocks: halves of 16 = one group, h quantized in the gate-up epilogue
#   m16 n64 k16 swapped: halves of two groups each, both GEMMs transposed
#   m16 n32 k32 on 32 x 32 blocks: halves of 16 < 32, h quantized as the down kernel loads it
#   m32 n32 k32 swapped, load-quantized; 128 x 128 blocks with partial ones (H = 200, I = 96)
CASES = [
    (1, 4, 2, 2, 64, 32, (32, 32), ExpertsTileConfig(16, 32, 32)),
    (33, 6, 2, 2, 72, 40, (32, 16), ExpertsTileConfig(16, 32, 16)),
    (33, 6, 2, 2, 72, 40, (32, 16), ExpertsTileConfig(16, 64, 16, swap_ab=True)),
    (40, 8, 4, 2, 96, 48, (32, 32), ExpertsTileConfig(16, 32, 32)),
    (40, 8, 4, 2, 96, 48, (32, 32), ExpertsTileConfig(32, 32, 32, swap_ab=True)),
    (12, 4, 2, 2, 200, 96, (128, 128), ExpertsTileConfig(16, 64, 128)),
    (12, 4, 2, 2, 200, 96, (128, 128), ExpertsTileConfig(16, 256, 128, swap_ab=True)),
]


def on_device(*tensors):
    return tuple(t.to(DEV) for t in tensors)


def assert_matches(y, ref):
    """y against the reference: float32 sums in another order, so h's quantization flips rarely
    (fp8_oracle.assert_close_but_rare_flips). On a GPU the float8 tensor cores keep about 14 bits
    while they accumulate a K step (DeepSeek-V3 report, section 3.3.2; Triton's default
    max_num_imprecise_acc on sm90, as vLLM's kernel runs them): h is then ~1e-4 off and flips in
    about 1e-3 of its elements, a few per cent of rows. Every row stays within one step's worth,
    and the whole within 1e-2 (the quantization itself costs ~4e-2; a wrong scale or block, 1e-1 and up)."""
    y, ref = y.float().cpu(), ref.float().cpu()
    if DEV == "cpu":
        assert_close_but_rare_flips(y, ref, tol=1e-5)
        return
    assert_close_but_rare_flips(y, ref, tol=2e-3, max_rows=y.shape[0])
    assert float((y - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("T,E,K,M,H,I,block_shape,cfg", CASES,
                         ids=lambda v: f"m{v.block_m}n{v.block_n}k{v.block_k}{'s' * v.swap_ab}"
                         if isinstance(v, ExpertsTileConfig) else None)
def test_matches_reference(T, E, K, M, H, I, block_shape, cfg):
    x, q13, s13, q2, s2 = on_device(*fp8_layer(T, E, H, I, block_shape, seed=T + E))
    r = route(T, E, K, M, seed=T)
    ids, weights = on_device(r.ids, r.weights)
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=block_shape)
    tiles = torch.zeros(1, dtype=torch.int32, device=DEV)
    y = moe_experts_triton(x, q13, q2, ids, weights, config=cfg, tiles_done=tiles, **kw)
    ref = moe_experts(x, q13, q2, ids, weights, backend="torch", **kw)
    # The same quantized x on both sides (bit for bit, test below); float32 block sums in
    # another order, so h agrees to ~1e-7 and its quantization flips rarely.
    assert_matches(y, ref)
    counts = torch.bincount(r.ids[r.ids >= 0].long(), minlength=E)
    assert int(tiles) == int(((counts + cfg.block_m - 1) // cfg.block_m).sum())


@pytest.mark.parametrize("group", [16, 128])
def test_quantizer_matches_reference_bit_for_bit(group):
    g = torch.Generator().manual_seed(group)
    y = torch.randn(12, 3 * group + 8, generator=g) * torch.logspace(-9, 5, 12)[:, None]  # partial last group
    y[0] = 0.0
    # amax 448 makes the scale exactly 1: quotients are the values themselves. Where rounding carries
    # into an odd power of two (127.9, 7.9, 31.6: the interpreter's own conversion gives 64, 4, 16),
    # ties to even (1.0625 -> 1, 1.1875 -> 1.25, 232 -> 224), subnormals and their ties (2^-10 -> 0).
    traps = [448.0, 127.9, 7.9, 31.6, 1.0625, 1.1875, 232.0, 2**-10, 3 * 2**-10, 5e-3, -0.0, -127.9]
    y[1, : len(traps)] = torch.tensor(traps)
    y[1, len(traps) : group] = 1.0
    y = y.to(DEV)
    q, s = quantize_groups_triton(y, group)
    q_ref, s_ref = quantize_groups(y, group)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)
    assert q[1, :7].float().tolist() == [448.0, 128.0, 8.0, 32.0, 1.0, 1.25, 224.0]


def test_inactive_slots_and_unused_experts_are_never_read():
    block_shape = (32, 32)
    x, q13, s13, q2, s2, ids, weights = on_device(*poisoned_fp8_layer(24, block_shape))
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=block_shape)
    y = moe_experts_triton(x, q13, q2, ids, weights, config=ExpertsTileConfig(16, 32, 32), **kw)
    assert torch.isfinite(y).all()
    assert_matches(y, moe_experts(x, q13, q2, ids, weights, backend="torch", **kw))


def test_fp8_arguments_are_checked():
    x, q13, s13, q2, s2 = on_device(*fp8_layer(4, 4, 64, 32, (32, 32)))
    ids, w = torch.zeros(4, 2, dtype=torch.int32, device=DEV), torch.full((4, 2), 0.5, device=DEV)
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=(32, 32))
    with pytest.raises(ValueError):  # one scale a K step: block_k must be the block's bk
        moe_experts_triton(x, q13, q2, ids, w, config=ExpertsTileConfig(16, 32, 16), **kw)
    with pytest.raises(ValueError):
        moe_experts_triton(x, q13, q2, ids, w, weights_on_input=True, **kw)
    with pytest.raises(ValueError):
        moe_experts_triton(x, q13, q2, ids, w, w13_scale=s13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 activations and float8 tensor cores need a GPU")
@pytest.mark.parametrize("T", [1, 16, 300])
def test_bf16_on_gpu_default_config(T):
    E, K, H, I, block_shape = 16, 4, 256, 256, (128, 128)
    x, q13, s13, q2, s2 = on_device(*fp8_layer(T, E, H, I, block_shape, seed=T, x_dtype=torch.bfloat16))
    r = route(T, E, K, 2, seed=T)
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=block_shape)
    y = moe_experts_triton(x, q13, q2, r.ids.to(DEV), r.weights.to(DEV), **kw)
    ref = moe_experts(x, q13, q2, r.ids.to(DEV), r.weights.to(DEV), backend="torch", **kw)
    # h and each pair's output rounded to bf16 on both sides (2^-9), besides assert_matches' reasons.
    y, ref = y.float().cpu(), ref.float().cpu()
    assert_close_but_rare_flips(y, ref, tol=1e-2, max_rows=T)
    assert float((y - ref).norm() / ref.norm()) < 2e-2
