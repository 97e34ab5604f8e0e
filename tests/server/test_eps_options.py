"""--smooth-eps online and --smooth-eps-log: which layers get a controller, and how a log replays."""

from __future__ import annotations

import json

import pytest
import torch
from smoothsmoe_server.engine.eps import EpsPlan, eps_log_line, load_eps_file
from smoothsmoe_server.engine.layer_plan import LayerPlan
from smoothsmoe_server.engine.router import SmoothRouter
from smoothsmoe_server.engine.snapshot import LayerSnapshot, Snapshot
from smoothsmoe_server.options import SmoothingOptions

from smoothsmoe_kernels import RoutingConfig, StatsLayout


def router(options: SmoothingOptions) -> SmoothRouter:
    plan = LayerPlan(prefix="model.layers.0.mlp.experts", layer_index=0, num_experts=8,
                     config=RoutingConfig(top_k=2), smoothed=True)
    return SmoothRouter(plan, 0.3, None,
                        torch.device("cpu"), options)


def test_only_online_with_smoothing_on_gets_a_controller():
    assert router(SmoothingOptions(eps="online")).controller is not None
    for options in (SmoothingOptions(), SmoothingOptions(eps="0"), SmoothingOptions(eps="0.3"),
                    SmoothingOptions(enabled=False, eps="online")):
        assert not options.online
        assert router(options).controller is None
    plan = EpsPlan.parse("online")
    assert plan.auto and plan.online and plan.initial(0) == 0.0  # calibrated first, as auto


def test_online_flags_are_checked():
    with pytest.raises(ValueError, match="budget"):
        SmoothingOptions(eps="online", budget=0.0)
    with pytest.raises(ValueError, match="window"):
        SmoothingOptions(eps="online", eps_window=0)
    with pytest.raises(ValueError, match="range"):
        SmoothingOptions(eps="online", eps_range=0.5)


def test_the_last_line_of_an_eps_log_is_an_eps_file(tmp_path):
    layout = StatsLayout(2, 2, 8)

    def snapshot(eps0: float, eps1: float) -> Snapshot:
        stats = layout.new_buffer()
        stats[0], stats[2] = 1000, 480  # tokens, extras

        def layer(index: int, smoothed: bool, eps: float) -> LayerSnapshot:
            return LayerSnapshot(layer=index, smoothed=smoothed, experts="vllm", top_k=2, max_extra=2, num_experts=8,
                                 eps=eps, eps_bounds=None, margin_edges=layout.margin_edges,
                                 stats=tuple(stats.tolist()), reason=None if smoothed else "r")

        # layer 2 is stock: not in the log
        return Snapshot(options=None, layers=(layer(0, True, eps0), layer(1, True, eps1), layer(2, False, 0.0)))

    log = tmp_path / "eps.jsonl"
    log.write_text(eps_log_line(snapshot(0.2, 0.3), 1.0) + eps_log_line(snapshot(0.25, 0.125), 2.0))
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["time"] == 2.0 and last["layers"]["0"] == {"eps": 0.25, "tokens": 1000, "extras": 480}
    assert load_eps_file(log) == {0: 0.25, 1: 0.125}
    assert EpsPlan.parse(str(log)).initial(1) == 0.125
