"""The CUDA code path of the kernels makes no host sync, no host copy, no data-sized allocation.

The routing kernel (with its counts) and the experts kernels run here under
Triton's interpreter; tests/graph_safety.py records their torch ops.
"""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels import RoutingConfig, StatsLayout, accumulate, route
from smoothsmoe_kernels.experts_triton import moe_experts_triton
from smoothsmoe_kernels.fp8_blocks import quantize_weight_blocks
from smoothsmoe_kernels.pairs import group_pairs_by_expert, tile_schedule
from smoothsmoe_kernels.routing import stock_result
from smoothsmoe_kernels.routing_triton import smooth_topk_triton
from smoothsmoe_kernels.tile_config import ExpertsTileConfig
from tests.graph_safety import record
from tests.kernels.cases import FAMILIES, adversarial_scores

DEV = "cuda" if torch.cuda.is_available() else "cpu"
T, E, H, I = 24, 12, 32, 32
CONFIG = RoutingConfig(top_k=2, max_extra=2)
TILES = ExpertsTileConfig(block_m=16, block_n=32, block_k=32)


def smoothed_layer(scores, x, w13, w2, eps, stats, valid, **quant):
    result, _ = smooth_topk_triton(scores, CONFIG, eps, stats=stats, valid=valid)
    return moe_experts_triton(x, w13, w2, result.ids, result.weights, config=TILES, **quant)


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g).to(DEV), torch.randn(T, H, generator=g).to(DEV)


@pytest.mark.parametrize("fp8", [False, True])
def test_smoothed_layer_kernels_are_capturable(fp8):
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g).to(DEV), torch.randn(E, H, I, generator=g).to(DEV)
    quant = {}
    if fp8:  # FP8 blocks of 32 x 32 (TILES.block_k): x quantized by its own launch, h as the down kernel loads it
        (w13, s13), (w2, s2) = quantize_weight_blocks(w13, (32, 32)), quantize_weight_blocks(w2, (32, 32))
        quant = dict(w13_scale=s13, w2_scale=s2, block_shape=(32, 32))
    eps = torch.tensor(0.5, device=DEV)
    stats = StatsLayout(2, 2, E).new_buffer(DEV)
    valid = torch.arange(T, device=DEV) % 5 != 4
    smoothed_layer(*inputs(0), w13, w2, eps, stats, valid, **quant)  # first call: per-device constants made here
    runs = []
    for seed in (1, 2):  # other routings, other pair counts per expert
        scores, x = inputs(seed)
        _, ops, forbidden = record(lambda *a: smoothed_layer(*a, **quant), scores, x, w13, w2, eps, stats, valid)
        assert forbidden == []
        runs.append(ops)
    assert runs[0] == runs[1], "the same ops and shapes whatever the data: nothing sized by data"
    names = {name for name, _ in runs[0]}
    assert "empty" in names  # the recorder sees the launchers' allocations


def stock_config(family: str, grouped: bool, top_k: int = 2) -> RoutingConfig:
    """A family of tests/kernels/cases.py at max_extra 0, on 16 experts (4 groups of 4, 2 kept, when grouped)."""
    return RoutingConfig(top_k=top_k, max_extra=0, scoring_func="softmax" if family == "softmax_norm" else family,
                         renormalize=family not in ("softmax", "topk_sigmoid"),
                         num_expert_group=4 if grouped else None, topk_group=2 if grouped else None)


def count_stock(scores, ids, config, bias, stats, layout):
    """What a stock layer adds to vLLM's forward (the server's CountingRouter.count_now, without vLLM)."""
    accumulate(stats, layout, stock_result(scores, ids, config, bias))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_stock_layer_counting_is_capturable(family, grouped):
    config = stock_config(family, grouped)
    bias = torch.linspace(-0.2, 0.2, 16).to(DEV) if family in ("sigmoid", "sqrtsoftplus") else None
    layout = StatsLayout(2, 0, 16)
    stats = layout.new_buffer(DEV)
    layout.edges_on(DEV)  # made at layer build in the server
    runs = []
    for seed in (1, 2):
        scores = adversarial_scores(T, 16, seed).to(DEV)  # ties: the old margin path re-ranked them with nonzero()
        ids = route(scores, config, 0.0, bias).ids
        _, ops, forbidden = record(count_stock, scores, ids, config, bias, stats, layout)
        assert forbidden == [], forbidden
        runs.append(ops)
    assert runs[0] == runs[1], "the same ops and shapes whatever the data"
    assert stats[0].item() == 2 * T


def test_the_recorder_names_what_breaks_capture():
    # The reference paths sync on purpose (they serve the CPU): the recorder must say so.
    ids = torch.tensor([[3, 0], [0, -1]])
    _, _, forbidden = record(group_pairs_by_expert, ids, 4)
    assert any(f.startswith("nonzero") for f in forbidden) and any(f.startswith("bincount") for f in forbidden)
    _, _, forbidden = record(lambda: torch.tensor([1.0, 2.0]) + 1)
    assert forbidden and "host data" in forbidden[0]
    _, _, forbidden = record(lambda t: t.tolist(), ids)
    assert forbidden == ["Tensor.tolist (host read)"]


def test_the_torch_tile_schedule_is_capturable_too():
    ids = torch.randint(-1, E, (T, 4), generator=torch.Generator().manual_seed(3))
    _, _, forbidden = record(tile_schedule, ids, E, 16)
    assert forbidden == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n_tokens", [1, 64, 333])
def test_whole_smoothed_layer_replays_in_a_cuda_graph(n_tokens, fp8):
    dev, dtype, (E_, K, H_, I_) = "cuda", torch.bfloat16, (64, 6, 256, 128)
    config = RoutingConfig(top_k=K, max_extra=2)
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E_, 2 * I_, H_, generator=g) / H_**0.5).to(dev, dtype)
    w2 = (torch.randn(E_, H_, I_, generator=g) / I_**0.5).to(dev, dtype)
    quant = {}
    if fp8:  # 128 x 128 blocks, vLLM's block-wise FP8 default tiles (tile_config)
        (w13, s13), (w2, s2) = quantize_weight_blocks(w13), quantize_weight_blocks(w2)
        quant = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128))
    eps = torch.tensor(0.3, device=dev)
    stats = StatsLayout(K, 2, E_).new_buffer(dev)
    scores = torch.randn(n_tokens, E_, device=dev)  # the graph's static inputs
    x = torch.randn(n_tokens, H_, device=dev, dtype=dtype)

    def layer():
        r, _ = smooth_topk_triton(scores, config, eps, stats=stats)
        return moe_experts_triton(x, w13, w2, r.ids, r.weights, **quant)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer()  # compile and make the per-device constants outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = layer()
    stats.zero_()
    for seed in range(3):  # new inputs each replay: other experts, other pair counts
        scores.copy_(torch.randn(n_tokens, E_, generator=torch.Generator().manual_seed(seed + 1)).to(dev))
        x.copy_(torch.randn(n_tokens, H_, generator=torch.Generator().manual_seed(seed + 9)).to(dev, dtype))
        graph.replay()
        replayed = y_graph.clone()
        eager = layer()  # the same kernels and tile config eagerly: bit for bit the same
        assert torch.equal(replayed, eager)
    torch.cuda.synchronize()
    assert stats[0].item() == 2 * 3 * n_tokens  # three replays and three eager calls, each token once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family,grouped", [("softmax_norm", False), ("sigmoid", True), ("topk_sigmoid", False)])
@pytest.mark.parametrize("n_tokens", [1, 333])
def test_stock_layer_counting_replays_in_a_cuda_graph(family, grouped, n_tokens):
    """A stock layer's counts (margins included) captured once, replayed on new scores: the same counts as eagerly."""
    dev, E_ = "cuda", 64
    config = RoutingConfig(top_k=6, max_extra=0, scoring_func="softmax" if family == "softmax_norm" else family,
                           renormalize=family != "topk_sigmoid", num_expert_group=8 if grouped else None,
                           topk_group=4 if grouped else None)
    bias = torch.linspace(-0.1, 0.1, E_, device=dev) if family == "sigmoid" else None
    layout = StatsLayout(6, 0, E_)
    graph_stats, eager_stats = layout.new_buffer(dev), layout.new_buffer(dev)
    layout.edges_on(dev)
    scores = torch.randn(n_tokens, E_, device=dev)  # the graph's static inputs
    ids = torch.zeros(n_tokens, 6, dtype=torch.int32, device=dev)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        count_stock(scores, ids, config, bias, graph_stats, layout)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        count_stock(scores, ids, config, bias, graph_stats, layout)
    graph_stats.zero_()
    for seed in range(3):  # new scores each replay, with ties (adversarial_scores), and the ids of their top-k
        new = adversarial_scores(n_tokens, E_, seed + 1).to(dev)
        scores.copy_(new)
        ids.copy_(route(new, config, 0.0, bias).ids)
        graph.replay()
        count_stock(new, ids, config, bias, eager_stats, layout)
    torch.cuda.synchronize()
    assert graph_stats[0].item() == 3 * n_tokens
    torch.testing.assert_close(graph_stats, eager_stats, rtol=0, atol=0)  # the same ops on the same data
