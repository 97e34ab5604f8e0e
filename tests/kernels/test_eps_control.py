"""The online eps controller holds the mean extras per token at the budget when traffic shifts."""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels import RoutingConfig, StatsLayout, accumulate, calibrate_eps, route
from smoothsmoe_kernels.eps_control import SETTLE_WINDOWS, EpsControl, EpsController
from tests.graph_safety import record

E, K, M, BUDGET, BATCH = 16, 2, 2, 0.5, 64
CONFIG = RoutingConfig(top_k=K, max_extra=M)


CLUSTER = torch.randn(E, generator=torch.Generator().manual_seed(99))


def mix(kind: str, g: torch.Generator) -> torch.Tensor:
    """Traffics that need different eps for the same budget: N(0, 1) logits (a); logits squeezed
    to a third of that spread (b: scores closer together, more extras at the same eps); logits
    clustered around one vector (c: margins alike, so extras are a steep function of eps)."""
    s = torch.randn(BATCH, E, generator=g)
    return s if kind == "a" else s / 3 if kind == "b" else CLUSTER + 0.1 * s


class Layer:
    """A layer's routing, its stats buffer and its controller, as the router holds them."""

    def __init__(self, eps: float, control: EpsControl | None):
        self.eps = torch.tensor(eps)
        self.layout = StatsLayout(K, M, E)
        self.stats = self.layout.new_buffer()
        self.controller = EpsController(control, self.eps, self.stats) if control else None
        if self.controller:
            self.controller.arm()

    def forward(self, scores: torch.Tensor) -> float:
        r = route(scores, CONFIG, self.eps)
        accumulate(self.stats, self.layout, r)
        if self.controller:
            self.controller.step()
        return float(r.order.float().sum())


def run(layer: Layer, kind: str, tokens: int, g: torch.Generator) -> float:
    """Mean extras per token over `tokens` tokens of one mix."""
    extras = sum(layer.forward(mix(kind, g)) for _ in range(tokens // BATCH))
    return extras / (tokens // BATCH * BATCH)


def test_online_eps_returns_to_the_budget_after_a_shift_and_fixed_eps_does_not():
    g = torch.Generator().manual_seed(0)
    eps0 = calibrate_eps(torch.randn(8192, E, generator=g), CONFIG, BUDGET).eps
    control = EpsControl(budget=BUDGET, window=1024)
    fixed, online = Layer(eps0, None), Layer(eps0, control)
    for layer in (fixed, online):
        assert abs(run(layer, "a", 16384, g) / BUDGET - 1) < 0.05  # calibrated on mix a: on budget
    settle = SETTLE_WINDOWS * control.window  # the stated settling time (eps_control.SETTLE_WINDOWS)
    drift = run(fixed, "b", settle + 32768, g)
    assert drift / BUDGET - 1 > 0.20, drift  # the shift takes a fixed eps off the budget
    run(online, "b", settle, g)
    held = [run(online, "b", 8192, g) for _ in range(4)]  # and it stays there
    assert all(abs(h / BUDGET - 1) < 0.05 for h in held), held
    assert float(online.eps) < eps0 / 2  # mix b needs a narrower band
    assert float(fixed.eps) == pytest.approx(eps0)


def test_it_settles_without_oscillating():
    # Starting 8x too wide, eps comes down in a few windows and then stays near the set point:
    # no swing below it by more than the noise of a window's mean.
    g = torch.Generator().manual_seed(1)
    eps_star = calibrate_eps(torch.randn(8192, E, generator=g), CONFIG, BUDGET).eps
    layer = Layer(8 * eps_star, EpsControl(budget=BUDGET, window=1024, eps_range=64))
    trajectory = []
    for _ in range(16):
        run(layer, "a", 1024, g)
        trajectory.append(float(layer.eps) / eps_star)
    assert trajectory[0] < 4 and all(0.85 < r < 1.15 for r in trajectory[3:]), trajectory


def test_eps_stays_within_its_bounds_when_the_budget_is_out_of_reach():
    g = torch.Generator().manual_seed(2)
    layer = Layer(0.1, EpsControl(budget=1.9, window=512, eps_range=4))  # 1.9 of at most 2 extras: unreachable
    run(layer, "a", 16384, g)
    assert float(layer.eps) == pytest.approx(0.4)  # pinned at eps0 * range


def test_a_reset_of_the_counters_restarts_the_window_and_no_update_before_arming():
    g = torch.Generator().manual_seed(3)
    layer = Layer(0.2, None)
    layer.controller = EpsController(EpsControl(budget=BUDGET, window=256), layer.eps, layer.stats)
    run(layer, "b", 2048, g)
    assert float(layer.eps) == pytest.approx(0.2) and int(layer.controller.updates) == 0  # not armed
    layer.controller.arm()
    run(layer, "b", 1024, g)
    assert int(layer.controller.updates) >= 3
    layer.stats.zero_()  # what the server does after start-up
    before = int(layer.controller.updates)
    layer.forward(mix("b", g))  # restarts: no update from a negative count
    assert int(layer.controller.updates) == before and float(layer.controller.last[0]) == BATCH


def test_the_controller_step_is_capturable():
    layer = Layer(0.2, EpsControl(budget=BUDGET, window=64))
    layer.forward(mix("a", torch.Generator().manual_seed(4)))
    _, _, forbidden = record(layer.controller.step)
    assert forbidden == []


def test_a_steep_layer_settles_too():
    # Clustered traffic: a fixed gain that suits spread margins would overshoot here;
    # the adaptive gain comes down and eps stops swinging.
    g = torch.Generator().manual_seed(5)
    eps0 = calibrate_eps(torch.randn(8192, E, generator=g), CONFIG, BUDGET).eps
    layer = Layer(eps0, EpsControl(budget=BUDGET, window=1024, eps_range=64))
    run(layer, "c", 40 * 1024, g)
    log_eps, held = [], []
    for _ in range(10):
        held.append(run(layer, "c", 2048, g))
        log_eps.append(float(layer.eps.log()))
    assert abs(sum(held) / len(held) / BUDGET - 1) < 0.05, held
    assert torch.tensor(log_eps).std() < 0.05, log_eps  # eps at rest, not swinging
