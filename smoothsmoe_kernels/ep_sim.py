"""What smoothing would cost under expert parallelism: dispatch traffic and expert load, simulated.

    python -m smoothsmoe_kernels.ep_sim [--tokens 16384] [--ranks 2,4,8,16] [--placement contiguous,round-robin]

Expert parallelism (vLLM's --enable-expert-parallel) puts each expert on one
rank and sends every token's activation to each rank that holds one of its
experts (all-to-all dispatch; the outputs come back the same way, combine).
A token whose experts share a rank is sent there once. So what smoothing adds
is traffic to ranks a token did not visit already, and load on the ranks of
its extra experts.

Routing comes from synthetic router logits (N(0, 1), one MoE layer of each
model shape of the kernel benchmark), stock top-k against smoothed at eps
calibrated to the default budget (0.5 extras per token, max_extra 2); real
routers are correlated across experts and tokens, which this does not model.
Per model, placement and rank count it prints, stock against smoothed:
dispatched (token, rank) pairs and bytes per layer (bf16 activations of the
hidden size, one way), the extra traffic against the naive prediction
budget / k (every extra to a new rank), and the per-rank load of (token,
expert) pairs, max / mean.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from smoothsmoe_kernels import RoutingConfig, calibrate_eps, route

# name: (E, K, H), one MoE layer of each (as smoothsmoe_kernels.bench.MODEL_SHAPES)
MODELS = {"Mixtral-8x7B": (8, 2, 4096), "Qwen3-30B-A3B": (128, 8, 2048), "OLMoE-1B-7B": (64, 8, 2048),
          "DeepSeek-V2-Lite": (64, 6, 2048)}
BUDGET, MAX_EXTRA = 0.5, 2


def placement(E: int, ranks: int, kind: str) -> torch.Tensor:
    """[E] rank of each expert: contiguous blocks (vLLM's default) or round-robin."""
    if E % ranks:
        raise ValueError(f"{E} experts do not split evenly over {ranks} ranks")
    e = torch.arange(E)
    return e // (E // ranks) if kind == "contiguous" else e % ranks


@dataclass(frozen=True)
class Traffic:
    """One routing under one placement."""

    dispatched: int  # (token, rank) pairs: activations sent, one way
    pairs: int  # (token, expert) pairs computed
    load: torch.Tensor  # [ranks] (token, expert) pairs computed on each rank

    @property
    def imbalance(self) -> float:
        return float(self.load.max() / self.load.float().mean())


def traffic(ids: torch.Tensor, rank_of: torch.Tensor, ranks: int) -> Traffic:
    """ids [T, W] (-1 inactive) under rank_of [E]: distinct ranks per token, and each rank's load."""
    active = ids >= 0
    rank = torch.where(active, rank_of[ids.clamp(min=0).long()], ranks)  # inactive slots: a dummy rank
    visits = torch.zeros(ids.shape[0], ranks + 1, dtype=torch.bool).scatter_(1, rank, True)[:, :ranks]
    load = torch.bincount(rank[active], minlength=ranks)
    return Traffic(dispatched=int(visits.sum()), pairs=int(active.sum()), load=load)


def simulate(tokens: int, ranks_list: list[int], placements: list[str], seed: int = 0) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(seed)
    for name, (E, K, H) in MODELS.items():
        config = RoutingConfig(top_k=K, max_extra=MAX_EXTRA)
        eps = calibrate_eps(torch.randn(16384, E, generator=g), config, BUDGET).eps
        scores = torch.randn(tokens, E, generator=g)
        stock, smooth = route(scores, config, 0.0).ids, route(scores, config, eps).ids
        for kind in placements:
            for R in ranks_list:
                if R > E or E % R:
                    continue
                rank_of = placement(E, R, kind)
                a, b = traffic(stock, rank_of, R), traffic(smooth, rank_of, R)
                rows.append(dict(model=name, placement=kind, ranks=R, tokens=tokens, k=K,
                                 extras_per_token=(b.pairs - a.pairs) / tokens,
                                 dispatched_stock=a.dispatched, dispatched_smooth=b.dispatched,
                                 mb_stock=a.dispatched * H * 2 / 2**20, mb_smooth=b.dispatched * H * 2 / 2**20,
                                 extra_traffic=b.dispatched / a.dispatched - 1, predicted=BUDGET / K,
                                 imbalance_stock=a.imbalance, imbalance_smooth=b.imbalance))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m smoothsmoe_kernels.ep_sim", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ranks", default="2,4,8,16")
    ap.add_argument("--placement", default="contiguous,round-robin")
    args = ap.parse_args(argv)
    rows = simulate(args.tokens, [int(r) for r in args.ranks.split(",")], args.placement.split(","))
    print(f"# {args.tokens} tokens of N(0, 1) router logits per layer; smoothed at {BUDGET} extras/token "
          f"(max_extra {MAX_EXTRA}); MB = bf16 activations dispatched one way per layer")
    print(f"{'model':17s} {'placement':11s} {'ranks':>5} {'extras/tok':>10} {'MB stock':>9} {'MB smooth':>9}"
          f" {'traffic+':>8} {'budget/k':>8} {'load max/mean':>14}")
    for r in rows:
        print(f"{r['model']:17s} {r['placement']:11s} {r['ranks']:5d} {r['extras_per_token']:10.3f}"
              f" {r['mb_stock']:9.1f} {r['mb_smooth']:9.1f} {100 * r['extra_traffic']:7.2f}%"
              f" {100 * r['predicted']:7.2f}% {r['imbalance_stock']:6.3f} -> {r['imbalance_smooth']:.3f}")


if __name__ == "__main__":
    main()
