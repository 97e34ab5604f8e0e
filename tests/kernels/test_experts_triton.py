"""The Triton experts kernel against the torch reference, and its tile bookkeeping."""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels import moe_experts, smooth_topk
from smoothsmoe_kernels.experts_triton import moe_experts_triton
from smoothsmoe_kernels.pairs import tile_schedule
from smoothsmoe_kernels.tile_config import ExpertsTileConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(0, 8, 2, 2), (1, 8, 2, 2), (33, 6, 1, 2), (70, 12, 4, 2), (17, 16, 8, 4)]  # (T, E, K, M)
CONFIG = ExpertsTileConfig(block_m=16, block_n=32, block_k=32)  # small tiles: quick in the interpreter
BLOCK_M = CONFIG.block_m


def layer(T, E, H=64, I=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    return x.to(DEV, dtype), w13.to(DEV, dtype), w2.to(DEV, dtype)


def expected_tiles(ids, E):
    """Row tiles the active pairs need: sum over experts of ceil(pairs / BLOCK_M); inactive slots need none."""
    counts = torch.bincount(ids[ids >= 0].long().cpu(), minlength=E)
    return int(((counts + BLOCK_M - 1) // BLOCK_M).sum())


@pytest.mark.parametrize("T,E,K,M", SHAPES)
def test_matches_reference_and_spends_no_tile_on_inactive_slots(T, E, K, M):
    x, w13, w2 = layer(T, E, seed=T + E)
    r = smooth_topk(torch.randn(T, E, generator=torch.Generator().manual_seed(T)).to(DEV), K, 0.5, M, backend="torch")
    tiles = torch.zeros(1, dtype=torch.int32, device=DEV)
    y = moe_experts_triton(x, w13, w2, r.ids, r.weights, config=CONFIG, tiles_done=tiles)
    ref = moe_experts(x, w13, w2, r.ids, r.weights, backend="torch")
    # Both float32 (no TF32): sums of 64 and 32 products in another order, ~1e-6 relative.
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
    assert int(tiles) == expected_tiles(r.ids, E)


@pytest.mark.parametrize("T,E,K,M", SHAPES[1:3] + SHAPES[-1:])
def test_weights_on_the_input_match_reference(T, E, K, M):
    x, w13, w2 = layer(T, E, seed=T + E)
    r = smooth_topk(torch.randn(T, E, generator=torch.Generator().manual_seed(T)).to(DEV), K, 0.5, M, backend="torch")
    y = moe_experts_triton(x, w13, w2, r.ids, r.weights, config=CONFIG, weights_on_input=True)
    ref = moe_experts(x, w13, w2, r.ids, r.weights, backend="torch", weights_on_input=True)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("T,E,K,M", SHAPES[2:4])
def test_swapped_operands_match_reference(T, E, K, M):
    # swap_ab: both GEMMs computed as weights x activations (the FP8 decode layout on Hopper).
    x, w13, w2 = layer(T, E, seed=T + E)
    r = smooth_topk(torch.randn(T, E, generator=torch.Generator().manual_seed(T)).to(DEV), K, 0.5, M, backend="torch")
    cfg = ExpertsTileConfig(block_m=16, block_n=64, block_k=32, swap_ab=True)
    y = moe_experts_triton(x, w13, w2, r.ids, r.weights, config=cfg)
    torch.testing.assert_close(y, moe_experts(x, w13, w2, r.ids, r.weights, backend="torch"), atol=2e-5, rtol=2e-5)


def test_inactive_slots_and_unused_experts_are_never_read():
    # Experts that no active slot names hold NaN: any tile on them, even at
    # weight 0, would put NaN in the output.
    T, E = 40, 12
    x, w13, w2 = layer(T, E)
    ids = torch.full((T, 4), -1, dtype=torch.int32, device=DEV)
    ids[:, 0] = torch.arange(T, device=DEV) % 3
    ids[::2, 1] = 5
    weights = torch.where(ids >= 0, 0.5, 0.0)
    unused = [e for e in range(E) if e not in (0, 1, 2, 5)]
    w13[unused] = float("nan")
    w2[unused] = float("nan")
    tiles = torch.zeros(1, dtype=torch.int32, device=DEV)
    y = moe_experts_triton(x, w13, w2, ids, weights, config=CONFIG, tiles_done=tiles)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, moe_experts(x, w13, w2, ids, weights, backend="torch"), atol=2e-5, rtol=2e-5)
    assert int(tiles) == expected_tiles(ids, E) == 3 + 2  # 40 pairs over 3 experts, 20 on expert 5


def test_tile_schedule_docstring_example():
    s = tile_schedule(torch.tensor([[3, 0], [0, -1]]), 4, 2)
    assert s.flat_slot.tolist() == [1, 2, 0, 3] and int(s.num_tiles) == 2
    assert s.expert.tolist()[:2] == [0, 3] and s.row.tolist()[:2] == [0, 2] and s.rows.tolist()[:2] == [2, 1]


def test_smoothing_costs_only_its_extra_pairs():
    # Same tokens: stock top-k, smoothed at a budget-like eps, and the padded
    # form vLLM's own kernels get (inactive slots as the top-1 expert, weight 0).
    T, E, K = 256, 16, 4
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(1)).to(DEV)
    x, w13, w2 = layer(T, E)
    stock = smooth_topk(scores, K, 0.0, 2, backend="torch")
    smooth = smooth_topk(scores, K, 0.25, 2, backend="torch")
    padded_ids = torch.where(smooth.ids >= 0, smooth.ids, smooth.ids[:, :1])
    tiles = {}
    for name, ids, w in (("stock", stock.ids, stock.weights), ("smooth", smooth.ids, smooth.weights),
                         ("padded", padded_ids, smooth.weights)):
        counter = torch.zeros(1, dtype=torch.int32, device=DEV)
        moe_experts_triton(x, w13, w2, ids, w, config=CONFIG, tiles_done=counter)
        tiles[name] = int(counter)
        assert tiles[name] == expected_tiles(ids, E)
    extra_pairs = int((smooth.ids[:, K:] >= 0).sum())
    assert 0 < extra_pairs < T * 2
    assert tiles["stock"] < tiles["smooth"] < tiles["padded"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 tensor-core paths need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_gpu(dtype):
    x, w13, w2 = layer(300, 16, H=256, I=128, dtype=dtype)
    r = smooth_topk(torch.randn(300, 16, device="cuda"), 4, 0.5, 2)
    y = moe_experts_triton(x, w13, w2, r.ids, r.weights)
    ref = moe_experts(x.float(), w13.float(), w2.float(), r.ids, r.weights, backend="torch")
    # Inputs rounded to 8 (bf16) or 11 (fp16) mantissa bits, h rounded once more.
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)
