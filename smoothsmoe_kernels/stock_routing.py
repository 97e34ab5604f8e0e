"""stock_topk_softmax(): the benchmarks' stock baseline, vLLM's softmax routing with renormalization.

In a file of its own so that every benchmark module imports it from here (bench.py and
bench_routing_cpu.py import each other otherwise).
"""

from __future__ import annotations

import torch


def stock_topk_softmax(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [T, E] (any float dtype) -> (weights [T, k] float32 summing to 1, ids [T, k] int32):
    softmax in float32, top-k, renormalized (vLLM's fused_topk with renormalize=True)."""
    probs = torch.softmax(scores.float(), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)
