"""moe_experts (the reference MoE layer) against a per-token dense oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smoothsmoe_kernels import moe_experts, smooth_topk
from smoothsmoe_kernels.pairs import group_pairs_by_expert

SHAPES = [(0, 8, 2, 2), (1, 8, 2, 2), (33, 6, 1, 2), (64, 60, 4, 2)]  # (T, E, K, M)


def dense_oracle(x, w13, w2, ids, weights, weights_on_input=False):
    """Every slot of every token, one at a time, in float64."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            w = float(weights[t, j])
            xin = x[t].double() * (w if weights_on_input else 1.0)
            gate, up = (w13[e].double() @ xin).chunk(2)
            y[t] += (1.0 if weights_on_input else w) * (w2[e].double() @ (F.silu(gate) * up))
    return y


def make_layer(T, E, H=32, I=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    return x, w13, w2


@pytest.mark.parametrize("T,E,K,M", SHAPES)
def test_weights_on_the_input_match_dense_oracle(T, E, K, M):
    """Llama 4's layer: each weight scales its expert's input; a fading weight fades the output."""
    x, w13, w2 = make_layer(T, E, seed=T + E)
    r = smooth_topk(x @ torch.randn(32, E, generator=torch.Generator().manual_seed(1)) * 0.3, K, 0.5, M)
    y = moe_experts(x, w13, w2, r.ids, r.weights, weights_on_input=True)
    oracle = dense_oracle(x, w13, w2, r.ids, r.weights, weights_on_input=True)
    torch.testing.assert_close(y.double(), oracle, atol=1e-5, rtol=1e-5)
    if T:  # not the output-weighted sum: silu makes the two differ
        assert (oracle - dense_oracle(x, w13, w2, r.ids, r.weights)).abs().max() > 1e-3
        small = torch.where(r.ids >= 0, 1e-7, 0.0)  # Expert(w x) -> 0 as w -> 0
        assert moe_experts(x, w13, w2, r.ids, small, weights_on_input=True).abs().max() < 1e-5


@pytest.mark.parametrize("T,E,K,M", SHAPES)
def test_matches_dense_oracle(T, E, K, M):
    x, w13, w2 = make_layer(T, E, seed=T + E)
    r = smooth_topk(x @ torch.randn(32, E, generator=torch.Generator().manual_seed(1)) * 0.3, K, 0.5, M)
    y = moe_experts(x, w13, w2, r.ids, r.weights)
    assert y.shape == x.shape and y.dtype == x.dtype
    # float32 matmuls of length 32 and 16 against a float64 oracle: ~1e-6 relative.
    torch.testing.assert_close(y.double(), dense_oracle(x, w13, w2, r.ids, r.weights), atol=1e-5, rtol=1e-5)


def test_inactive_slots_and_unused_experts_cost_nothing():
    # Poison every expert that no active slot names with NaN weights: had the
    # layer multiplied them, even by a zero weight, NaN would reach the output.
    T, E = 50, 12
    x, w13, w2 = make_layer(T, E)
    ids = torch.full((T, 4), -1, dtype=torch.int32)
    ids[:, 0] = torch.arange(T) % 3
    ids[::2, 1] = 5
    weights = torch.where(ids >= 0, 0.5, 0.0)
    unused = [e for e in range(E) if e not in (0, 1, 2, 5)]
    w13[unused] = float("nan")
    w2[unused] = float("nan")
    y = moe_experts(x, w13, w2, ids, weights)
    assert torch.isfinite(y).all()
    pairs = group_pairs_by_expert(ids, E)
    assert pairs.num_pairs == int((ids >= 0).sum()) == T + T // 2
    assert pairs.offsets.tolist()[:7] == [0, 17, 34, 50, 50, 50, 75]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    x, w13, w2 = make_layer(40, 8)
    r = smooth_topk(x[:, :8], 2, 0.5, 2)
    y = moe_experts(x.to(dtype), w13.to(dtype), w2.to(dtype), r.ids, r.weights)
    assert y.dtype == dtype
    # bf16 keeps 8 bits of mantissa (fp16 11): two matmuls and a product
    # round several times, hence a few per cent.
    torch.testing.assert_close(y.double(), dense_oracle(x, w13, w2, r.ids, r.weights), atol=5e-2, rtol=5e-2)


def test_pairs_docstring_example():
    p = group_pairs_by_expert(torch.tensor([[3, 0], [0, -1]]), 4)
    assert p.flat_slot.tolist() == [1, 2, 0] and p.token.tolist() == [0, 1, 0]
    assert p.offsets.tolist() == [0, 2, 2, 2, 3]


def test_bad_shapes_and_ids_are_refused():
    x, w13, w2 = make_layer(4, 4)
    with pytest.raises(ValueError):
        moe_experts(x, w13, w2[:, :, :8], torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        moe_experts(x, w13, w2, torch.full((4, 2), 7, dtype=torch.int32), torch.zeros(4, 2))
