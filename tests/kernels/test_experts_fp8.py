"""FP8 block-quantized experts: the torch reference and its quantizer against a float64 oracle of the same steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoothsmoe_kernels import moe_experts, smooth_topk
from smoothsmoe_kernels.fp8_blocks import (
    FP8_DTYPE,
    dequantize_weight_blocks,
    quantize_groups,
    quantize_weight_blocks,
)
from tests.kernels.fp8_oracle import assert_close_but_rare_flips, fp8_dense_oracle, quantize_group

# (T, E, K, M, H, I, block_shape): empty; single; partial blocks everywhere (H = 72 and I = 40 in
# blocks of 32 x 16, a w13 block straddling the gate/up boundary); partial 128-blocks; whole ones.
SHAPES = [
    (0, 4, 2, 2, 64, 32, (32, 32)),
    (1, 4, 2, 2, 64, 32, (32, 32)),
    (33, 6, 2, 2, 72, 40, (32, 16)),
    (20, 8, 4, 2, 200, 96, (128, 128)),
    (17, 16, 8, 4, 256, 128, (128, 128)),
]


def fp8_layer(T, E, H, I, block_shape, seed=0, x_dtype=torch.float32):
    """Random weights block-quantized, with adversarial inputs: an all-zero token, a huge one, a tiny one
    (its values quantize to subnormals), and blocks of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    if T >= 4:
        x[1] = 0.0
        x[2] *= 1e4
        x[3, : H // 2] *= 1e-6
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w13[:, :, : H // 3] *= 50.0  # some blocks 50x the others
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    (q13, s13), (q2, s2) = quantize_weight_blocks(w13, block_shape), quantize_weight_blocks(w2, block_shape)
    return x.to(x_dtype), q13, s13, q2, s2


def route(T, E, K, M, seed=0):
    return smooth_topk(torch.randn(T, E, generator=torch.Generator().manual_seed(seed + 7)), K, 0.5, M,
                       backend="torch")


@pytest.mark.parametrize("T,E,K,M,H,I,block_shape", SHAPES)
def test_reference_matches_dense_oracle(T, E, K, M, H, I, block_shape):
    x, q13, s13, q2, s2 = fp8_layer(T, E, H, I, block_shape, seed=T + E)
    r = route(T, E, K, M, seed=T)
    y = moe_experts(x, q13, q2, r.ids, r.weights, w13_scale=s13, w2_scale=s2, block_shape=block_shape,
                    backend="torch")
    assert y.shape == x.shape and y.dtype == x.dtype
    oracle = fp8_dense_oracle(x, q13, s13, q2, s2, r.ids, r.weights, block_shape)
    # Same quantized values on both sides; float32 block sums against float64 ones: ~1e-6 relative.
    assert_close_but_rare_flips(y, oracle, tol=2e-5)


def test_bf16_activations_match_dense_oracle():
    T, E, K, M, H, I, block_shape = 40, 8, 2, 2, 256, 128, (128, 128)
    x, q13, s13, q2, s2 = fp8_layer(T, E, H, I, block_shape, seed=5, x_dtype=torch.bfloat16)
    r = route(T, E, K, M, seed=5)
    y = moe_experts(x, q13, q2, r.ids, r.weights, w13_scale=s13, w2_scale=s2, block_shape=block_shape,
                    backend="torch")
    assert y.dtype == torch.bfloat16
    oracle = fp8_dense_oracle(x, q13, s13, q2, s2, r.ids, r.weights, block_shape)
    # Both round h and each pair's output to bf16 (8 mantissa bits); the sums of up to
    # K + M bf16 outputs differ by a few bf16 ulps at most.
    assert_close_but_rare_flips(y, oracle, tol=2e-2)


def test_quantization_costs_what_fp8_costs():
    # The FP8 layer against the same layer in float32 on the dequantized weights: the
    # activations' 3 mantissa bits cost a few per cent, not more (a scale applied twice,
    # or to the wrong block, costs far more).
    T, E, K, M, H, I, block_shape = 64, 8, 2, 2, 256, 128, (128, 128)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
    (q13, s13), (q2, s2) = quantize_weight_blocks(w13, block_shape), quantize_weight_blocks(w2, block_shape)
    r = route(T, E, K, M)
    y = moe_experts(x, q13, q2, r.ids, r.weights, w13_scale=s13, w2_scale=s2, block_shape=block_shape)
    exact = moe_experts(x, dequantize_weight_blocks(q13, s13, block_shape),
                        dequantize_weight_blocks(q2, s2, block_shape), r.ids, r.weights)
    err = float((y - exact).norm() / exact.norm())
    assert 1e-3 < err < 5e-2


def test_quantize_groups_follows_the_steps():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(9, 200, generator=g) * torch.logspace(-8, 4, 9)[:, None]  # 1e-8: all subnormal
    y[0] = 0.0
    y[1, :4] = torch.tensor([127.9, 7.9, 31.6, -0.0])  # scaled by 448 / 127.9: the interpreter's traps
    q, s = quantize_groups(y, 64)  # 200 = 3 groups of 64 and one of 8
    assert q.dtype == FP8_DTYPE and q.shape == (9, 200) and s.shape == (9, 4)
    for t in range(9):
        for g0 in range(0, 200, 64):
            want_q, want_s = quantize_group(y[t, g0 : g0 + 64].numpy())
            assert s[t, g0 // 64].item() == float(want_s)
            np.testing.assert_array_equal(q[t, g0 : g0 + 64].float().numpy(), want_q)
    assert s[0].eq(1e-10 * torch.tensor(1 / 448, dtype=torch.float32)).all()  # zero groups: vLLM's eps scale


@pytest.mark.parametrize("block_shape", [(128, 128), (32, 16)])
def test_weight_blocks_round_trip(block_shape):
    w = torch.randn(3, 80, 72, generator=torch.Generator().manual_seed(2))
    w[1, :40] *= 1e3
    q, s = quantize_weight_blocks(w, block_shape)
    bn, bk = block_shape
    assert q.dtype == FP8_DTYPE and s.shape == (3, -(-80 // bn), -(-72 // bk))
    back = dequantize_weight_blocks(q, s, block_shape)
    # Rounding to 3 mantissa bits: within half a step, 1/16 of the value (normal range) or half
    # the block's smallest step (2^-10 of 448 scales) in the subnormal range.
    step_floor = s.repeat_interleave(bn, 1)[:, :80].repeat_interleave(bk, 2)[:, :, :72] * 2**-10
    assert ((back - w).abs() <= w.abs() / 16 + step_floor).all()


def poisoned_fp8_layer(T: int, block_shape=(32, 32)):
    """An FP8 layer of 10 experts whose tokens use experts 0, 1, 2 and 7 only, every other expert's
    weights and scales NaN: (x, q13, s13, q2, s2, ids, weights). A kernel that reads an inactive
    slot or an unused expert returns NaN."""
    E, H, I = 10, 64, 32
    x, q13, s13, q2, s2 = fp8_layer(T, E, H, I, block_shape)
    ids = torch.full((T, 4), -1, dtype=torch.int32)
    ids[:, 0] = torch.arange(T) % 3
    ids[::3, 1] = 7
    weights = torch.where(ids >= 0, 0.5, 0.0)
    unused = [e for e in range(E) if e not in (0, 1, 2, 7)]
    q13.view(torch.uint8)[unused] = 0x7F  # float8 e4m3 NaN
    s13[unused] = float("nan")
    q2.view(torch.uint8)[unused] = 0x7F
    s2[unused] = float("nan")
    return x, q13, s13, q2, s2, ids, weights


def test_inactive_slots_and_unused_experts_are_never_read():
    block_shape = (32, 32)
    x, q13, s13, q2, s2, ids, weights = poisoned_fp8_layer(30, block_shape)
    y = moe_experts(x, q13, q2, ids, weights, w13_scale=s13, w2_scale=s2, block_shape=block_shape)
    assert torch.isfinite(y).all()


def test_bad_fp8_arguments_are_refused():
    T, E, H, I, block_shape = 4, 4, 64, 32, (32, 32)
    x, q13, s13, q2, s2 = fp8_layer(T, E, H, I, block_shape)
    ids, w = torch.zeros(T, 2, dtype=torch.int32), torch.full((T, 2), 0.5)
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=block_shape)
    for bad in (dict(kw, w2_scale=None), dict(kw, w13_scale=s13[:, :1]), dict(kw, block_shape=(32, 24)),
                dict(kw, w2_scale=s2.double()), {}):
        with pytest.raises(ValueError):
            moe_experts(x, q13, q2, ids, w, **bad)
    with pytest.raises(ValueError):
        moe_experts(x, q13.float(), q2.float(), ids, w, **kw)
    with pytest.raises(ValueError):
        moe_experts(x, q13, q2, ids, w, weights_on_input=True, **kw)
