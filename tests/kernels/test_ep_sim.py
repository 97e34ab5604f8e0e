"""The expert-parallel simulation counts what a hand count gives, and its table keeps its invariants."""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels.ep_sim import placement, simulate, traffic

IDS = torch.tensor([[0, 1, -1], [2, 3, 1], [0, 2, -1]])  # 3 tokens, 4 experts, -1 inactive


def test_contiguous_placement_by_hand():
    rank_of = placement(4, 2, "contiguous")
    assert rank_of.tolist() == [0, 0, 1, 1]
    t = traffic(IDS, rank_of, 2)
    # token 0 -> rank 0 once (experts 0, 1 share it); token 1 -> ranks 1, 0; token 2 -> ranks 0, 1
    assert t.dispatched == 1 + 2 + 2 and t.pairs == 7
    assert t.load.tolist() == [4, 3]  # rank 0: (0,0) (0,1) (1,1) (2,0); rank 1: (1,2) (1,3) (2,2)
    assert t.imbalance == pytest.approx(4 / 3.5)


def test_round_robin_placement_by_hand():
    rank_of = placement(4, 2, "round-robin")
    assert rank_of.tolist() == [0, 1, 0, 1]
    t = traffic(IDS, rank_of, 2)
    assert t.dispatched == 2 + 2 + 1 and t.load.tolist() == [4, 3]  # token 2's experts 0, 2 share rank 0


def test_table_invariants():
    rows = simulate(2048, [2, 8, 64], ["contiguous", "round-robin"])
    assert {r["model"] for r in rows} == {"Mixtral-8x7B", "Qwen3-30B-A3B", "OLMoE-1B-7B", "DeepSeek-V2-Lite"}
    for r in rows:
        assert 0 <= r["dispatched_smooth"] - r["dispatched_stock"] <= r["extras_per_token"] * r["tokens"] + 1e-9
        if r["ranks"] == 64 and r["model"] != "Qwen3-30B-A3B":  # one expert a rank: every extra goes to a new rank
            assert r["extra_traffic"] == pytest.approx(r["extras_per_token"] / r["k"])
    assert not any(r["model"] == "Mixtral-8x7B" and r["ranks"] == 64 for r in rows)  # 8 experts: at most 8 ranks
