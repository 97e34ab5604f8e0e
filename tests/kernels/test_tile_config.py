"""Tile configs of the experts kernel: every candidate computes the same layer; tables load and are chosen."""

from __future__ import annotations

import json

import pytest
import torch

from smoothsmoe_kernels import moe_experts, smooth_topk
from smoothsmoe_kernels.experts_triton import moe_experts_triton
from smoothsmoe_kernels.fp8_blocks import quantize_weight_blocks
from smoothsmoe_kernels.tile_config import (
    CANDIDATES,
    FP8_CANDIDATES,
    ExpertsTileConfig,
    default_fp8_tile_config,
    default_tile_config,
    load_tile_table,
    save_tile_table,
    table_name,
    tile_config,
)
from smoothsmoe_kernels.tune import tune_experts
from tests.kernels.fp8_oracle import assert_close_but_rare_flips

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU the candidates run in bf16, the dtype they are tuned for; in the interpreter, float32.
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
# I = 40 and H = 48: neither a multiple of any block size, so every candidate meets partial tiles.
T, E, H, I = 21, 6, 48, 40


def layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    r = smooth_topk(torch.randn(T, E, generator=g), 2, 0.5, 2, backend="torch")
    return x.to(DEV, DTYPE), w13.to(DEV, DTYPE), w2.to(DEV, DTYPE), r.ids.to(DEV), r.weights.to(DEV)


@pytest.mark.parametrize("cfg", CANDIDATES, ids=lambda c: config_id(c))
def test_every_candidate_matches_the_reference(cfg):
    x, w13, w2, ids, weights = layer()
    tiles = torch.zeros(1, dtype=torch.int32, device=DEV)
    y = moe_experts_triton(x, w13, w2, ids, weights, config=cfg, tiles_done=tiles)
    ref = moe_experts(x.float(), w13.float(), w2.float(), ids, weights, backend="torch")
    # float32 without TF32 on both sides: only the summation order differs. bf16 (GPU): inputs
    # rounded to 8 mantissa bits, h and the slot outputs rounded once more.
    tol = 2e-5 if DTYPE == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=tol)
    counts = torch.bincount(ids[ids >= 0].long().cpu(), minlength=E)
    assert int(tiles) == int(((counts + cfg.block_m - 1) // cfg.block_m).sum())


def config_id(c):
    return f"m{c.block_m}n{c.block_n}k{c.block_k}g{c.group_m}{'s' * c.swap_ab}"


@pytest.mark.parametrize("cfg", FP8_CANDIDATES, ids=config_id)
def test_every_fp8_candidate_matches_the_reference(cfg):
    # 128 x 128 blocks on H = 136, I = 72: a partial block in every dimension.
    T_, E_, H_, I_, block = 12, 4, 136, 72, (128, 128)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T_, H_, generator=g).to(DEV, DTYPE)
    (q13, s13), (q2, s2) = (quantize_weight_blocks(torch.randn(E_, n, k, generator=g) / k**0.5, block)
                            for n, k in ((2 * I_, H_), (H_, I_)))
    r = smooth_topk(torch.randn(T_, E_, generator=g), 2, 0.5, 2, backend="torch")
    args = [t.to(DEV) for t in (x, q13, q2, r.ids, r.weights)]
    kw = dict(w13_scale=s13.to(DEV), w2_scale=s2.to(DEV), block_shape=block)
    y = moe_experts_triton(*args, config=cfg, **kw)
    ref = moe_experts(*args, backend="torch", **kw)
    # The quantized x is the same bit for bit; h's quantization may flip one step where the
    # float32 sums differ in order (fp8_oracle.assert_close_but_rare_flips). On a GPU, bf16 and
    # the float8 tensor cores' accumulation (test_experts_fp8_triton.assert_matches): norm-wise.
    if DTYPE == torch.float32:
        assert_close_but_rare_flips(y, ref, tol=1e-5)
    else:
        assert float((y.float() - ref.float()).norm() / ref.float().norm()) < 2e-2


def test_fp8_defaults_follow_vllms_block_rules():
    # vLLM 0.32 get_default_config, block-wise fp8_w8a8 branch (CUDA), by hand:
    # (M, N, K tiles, GROUP_SIZE_M, warps, stages); SWAP_AB as enable_swap_ab on sm90.
    b = (128, 128)
    assert default_fp8_tile_config(1, 256, b) == ExpertsTileConfig(16, 64, 128, 1, 4, 4)
    assert default_fp8_tile_config(1, 256, b, sm90=True) == ExpertsTileConfig(16, 64, 128, 1, 4, 4, swap_ab=True)
    assert default_fp8_tile_config(8, 256, b) == ExpertsTileConfig(16, 64, 128, 1, 4, 3)
    assert default_fp8_tile_config(16, 256, b) == ExpertsTileConfig(16, 128, 128, 1, 4, 3)
    assert default_fp8_tile_config(64, 256, b, sm90=True) == ExpertsTileConfig(16, 128, 128, 32, 4, 3, swap_ab=True)
    assert default_fp8_tile_config(65, 256, b, sm90=True) == ExpertsTileConfig(64, 128, 128, 32, 4, 3)
    assert tile_config(1, 256, 7168, 256, torch.bfloat16, torch.device("cpu"), block_shape=b) == (
        default_fp8_tile_config(1, 256, b), "default")


def test_fp8_tables_are_apart_from_the_unquantized_ones(tmp_path):
    device, block = torch.device(DEV), (128, 128)
    name = "cpu" if DEV == "cpu" else torch.cuda.get_device_name()
    fp8 = ExpertsTileConfig(16, 256, 128, 1, 4, 3, swap_ab=True)
    path = save_tile_table({1: fp8}, name, E, H, I, torch.bfloat16, tmp_path, block_shape=block)
    assert "dtype=fp8_w8a8,block_shape=[128,128]" in path.name
    assert json.loads(path.read_text())["block_shape"] == [128, 128]
    assert tile_config(1, E, H, I, torch.bfloat16, device, tmp_path, block_shape=block) == (fp8, "tuned")
    assert tile_config(1, E, H, I, torch.bfloat16, device, tmp_path)[1] == "default"


def test_defaults_follow_vllms_bf16_rules():
    # vLLM 0.32 get_default_config for bf16, by hand: (M, N, K tiles, GROUP_SIZE_M, warps, stages)
    assert default_tile_config(1, 128) == ExpertsTileConfig(16, 64, 128, 1, 4, 4)
    assert default_tile_config(64, 128) == ExpertsTileConfig(32, 64, 128, 1, 4, 3)
    assert default_tile_config(100, 128) == ExpertsTileConfig(64, 128, 64, 1, 4, 3)
    assert default_tile_config(4096, 128) == ExpertsTileConfig(128, 128, 64, 1, 8, 3)  # 32 tokens an expert
    assert default_tile_config(4096, 8) == ExpertsTileConfig(128, 128, 64, 16, 8, 3)  # 512: grouping pays


def test_bad_configs_are_refused():
    with pytest.raises(ValueError):
        ExpertsTileConfig(24, 64, 64)
    with pytest.raises(ValueError):
        ExpertsTileConfig(16, 16, 64)  # two halves of 8 columns: below tl.dot's 16


def test_a_tuned_table_is_loaded_and_the_nearest_bucket_chosen(tmp_path):
    device = torch.device(DEV)
    small, large = ExpertsTileConfig(16, 32, 32), ExpertsTileConfig(32, 64, 16, 2, 8, 4)
    assert tile_config(T, E, H, I, torch.float32, device, tmp_path) == (default_tile_config(T, E), "default")
    save_tile_table({1: small, 64: large}, "cpu" if DEV == "cpu" else torch.cuda.get_device_name(), E, H, I,
                    torch.float32, tmp_path)
    assert tile_config(20, E, H, I, torch.float32, device, tmp_path) == (small, "tuned")
    assert tile_config(40, E, H, I, torch.float32, device, tmp_path) == (large, "tuned")
    assert tile_config(32, E, H, I, torch.float32, device, tmp_path)[0] == small  # ties to the smaller bucket
    assert tile_config(40, E, H, I, torch.bfloat16, device, tmp_path)[1] == "default"  # another dtype: no table


def test_a_malformed_table_fails_loudly(tmp_path):
    (tmp_path / table_name("cpu", E, H, I, torch.float32)).write_text(json.dumps({"configs": {"1": {"block_m": 3}}}))
    with pytest.raises(ValueError, match="malformed"):
        load_tile_table("cpu", E, H, I, torch.float32, tmp_path)


@pytest.mark.skipif(DEV == "cuda", reason="on a GPU, bench tune is run for real")
def test_tune_writes_a_table_the_kernel_then_uses(tmp_path):
    # Timings in the interpreter mean nothing; the mechanics are what is checked.
    cands = (ExpertsTileConfig(16, 32, 32), ExpertsTileConfig(32, 32, 16))
    path = tune_experts(E, 2, H, I, torch.float32, torch.device("cpu"), [1, 16], out_dir=tmp_path,
                        candidates=cands, min_time=0.0)
    table = load_tile_table("cpu", E, H, I, torch.float32, tmp_path)
    assert path.is_file() and set(table) == {1, 16}
    assert all(cfg in (*cands, default_tile_config(1, E), default_tile_config(16, E)) for cfg in table.values())
    assert tile_config(16, E, H, I, torch.float32, torch.device("cpu"), tmp_path) == (table[16], "tuned")


@pytest.mark.skipif(DEV == "cuda", reason="on a GPU, bench tune is run for real")
def test_fp8_tune_writes_an_fp8_table(tmp_path):
    block = (32, 32)  # candidates' block_k follows the blocks
    cands = (ExpertsTileConfig(16, 32, 128), ExpertsTileConfig(16, 64, 128, swap_ab=True))
    tune_experts(E, 2, 64, 32, torch.float32, torch.device("cpu"), [1], out_dir=tmp_path, candidates=cands,
                 min_time=0.0, block_shape=block)
    table = load_tile_table("cpu", E, 64, 32, torch.float32, tmp_path, block)
    assert set(table) == {1} and table[1].block_k == 32
    assert load_tile_table("cpu", E, 64, 32, torch.float32, tmp_path) is None
