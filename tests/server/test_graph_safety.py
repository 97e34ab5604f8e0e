"""A smoothed layer's forward on the CUDA code path, as vLLM calls it, is capturable in a CUDA graph.

The router (routing kernel, in-kernel counts, the calibration recorder, the
online eps controller, the ids handed to vLLM) and the experts op run with their Triton backends, under
Triton's interpreter here; tests/graph_safety.py records their torch ops and
fails on any that would sync with the host, copy from it, or size by data.
"""

from __future__ import annotations

import torch
from smoothsmoe_server.engine.experts_method import _experts_op
from smoothsmoe_server.engine.router import SmoothRouter
from smoothsmoe_server.options import SmoothingOptions

from smoothsmoe_kernels import RoutingConfig, moe_experts
from tests.graph_safety import record

T, E, H, I = 20, 8, 32, 32


def test_smoothed_layer_forward_is_capturable():
    config = RoutingConfig(top_k=2, max_extra=2)
    options = SmoothingOptions(eps="online", eps_window=16)  # the controller runs in the forward too
    router = SmoothRouter(config, E, "model.layers.0.mlp.experts", 0, 0.5, None, torch.device("cpu"), options)
    router.controller.arm()
    router.backend = "triton"  # what "auto" picks on CUDA
    router.experts = "smoothsmoe"  # this project's experts, the CUDA default: the router hands them its ids
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5

    def forward(logits, x):
        weights, ids = router.route_now(logits)
        return _experts_op(x, w13, w2, ids, weights, "triton")

    router.counters.recorder.start()  # the calibration recorder runs in the forward too
    runs = []
    for seed in (1, 2, 3):
        logits, x = torch.randn(T, E, generator=g), torch.randn(T, H, generator=g)
        eps = float(router.eps)  # the controller may move it after this forward's routing
        y, ops, forbidden = record(forward, logits, x)
        assert forbidden == []
        runs.append(ops)
        # and it computes the layer: the torch reference at the same routing
        weights, ids = router.route_uncounted(logits, eps)
        assert (ids == -1).any()  # inactive slots reach the experts as -1: skipped, not computed at weight 0
        torch.testing.assert_close(y, moe_experts(x, w13, w2, ids, weights, backend="torch"), atol=2e-5, rtol=2e-5)
    assert runs[0] == runs[1] == runs[2]
    assert int(router.counters.stats[0]) == 3 * T  # every token counted once, in the kernel
    assert router.counters.recorder.stop().gaps.shape[0] == 3 * T  # and recorded once, in the kernel too
    assert int(router.controller.updates) == 3  # a window of 16 closed in each forward of 20 tokens
