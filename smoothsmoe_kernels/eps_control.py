"""EpsController: hold a layer's mean extras per token at the budget while traffic drifts.

The paper holds the extra-expert budget during training with a boundary loss,
a feedback on eps; this is the same feedback at serve time. Every `window`
tokens a layer routes, its eps moves multiplicatively against the relative
error of that window's mean extras per token:

    err  = (extras - budget) / budget
    eps <- clamp(eps * exp(-clamp(gain * err, -1, 1)), eps0 / range, eps0 * range)

How hard to correct depends on the layer: where router margins are spread,
mean extras grow about in proportion to eps and gain 1 would close the error
in one window; where they cluster (hidden states of a narrow traffic), extras
are a steep function of eps and the same gain overshoots and oscillates. So
each layer adapts its own gain, as Rprop adapts a step: when the error keeps
its sign, the last step was too timid (gain x 1.5, at most 1); when it flips,
the last step overshot (gain x 0.5, at least 1/64). At rest the noise of the
window's mean flips the sign about every other window and the gain decays to
its floor, so eps stays still; after a shift the error keeps its sign and the
gain climbs back: measured in tests/kernels/test_eps_control.py, a shift that
needs a third of the eps is within 5 % after about 5 windows, and the settling
time this project states (and tests, there and on a live server) is 20
windows. The window trades settling time against
noise: the mean of 1024 tokens' extras (each 0, 1 or 2) is within a few
percent of its expectation.

Everything is device ops on tensors the layer already has (its eps, its stats
buffer) plus a few of its own, of fixed shapes, with no host read: it runs
inside the forward, under torch.compile and CUDA graphs, each step. Counters
that were reset (the server zeroes them after start-up) restart the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoothsmoe_kernels.stats import EXTRAS_INDEX, TOKENS_INDEX

SETTLE_WINDOWS = 20  # the settling time this project states for a traffic shift, in windows (see above)


@dataclass(frozen=True, slots=True)
class EpsControl:
    """The controller's settings (one per server; the budget is the calibration's)."""

    budget: float  # target mean extra experts per token
    window: int = 1024  # tokens between updates
    gain: float = 0.5  # the starting gain: the fraction of the relative error corrected in log eps per window
    eps_range: float = 16.0  # eps stays within [eps0 / range, eps0 * range], eps0 the starting eps
    gain_min: float = 1 / 64
    gain_max: float = 1.0

    def __post_init__(self):
        if not self.budget > 0:
            raise ValueError(f"online eps needs a budget > 0, got {self.budget}")
        if self.window < 1 or not 0 < self.gain_min <= self.gain <= self.gain_max <= 1 or not self.eps_range >= 1:
            raise ValueError(f"need window >= 1, 0 < gain_min <= gain <= gain_max <= 1, eps_range >= 1: {self}")


class EpsController:
    """One layer's controller: device state beside the layer's eps and stats buffer.

    Inert until `arm()` (after calibration has set the starting eps), so that
    calibration's own traffic is never controlled.
    """

    def __init__(self, control: EpsControl, eps: torch.Tensor, stats: torch.Tensor):
        self.control = control
        self.eps = eps  # [] float32, the router's: updated in place
        self.stats = stats  # the layer's stats buffer, read only
        dev = eps.device
        self.armed = torch.zeros((), dtype=torch.bool, device=dev)
        self.last = torch.zeros(2, dtype=torch.float64, device=dev)  # tokens, extras at the last update
        self.lo = torch.zeros((), dtype=torch.float32, device=dev)
        self.hi = torch.zeros((), dtype=torch.float32, device=dev)
        self.updates = torch.zeros((), dtype=torch.int64, device=dev)  # windows closed so far
        self.gain = torch.full((), control.gain, dtype=torch.float32, device=dev)
        self.last_sign = torch.zeros((), dtype=torch.float32, device=dev)  # of the last window's error

    def arm(self) -> None:
        """Start from the current eps (outside the forward: at start-up)."""
        self.lo.copy_(self.eps / self.control.eps_range)
        self.hi.copy_(self.eps * self.control.eps_range)
        self.last.copy_(self._counts())
        self.gain.fill_(self.control.gain)
        self.last_sign.zero_()
        self.armed.fill_(True)

    def step(self) -> None:
        """After a forward's counts: close the window if it is full (device ops only)."""
        c = self.control
        now = self._counts()
        delta = now - self.last
        restarted = delta[0] < 0  # the counters were zeroed under us
        due = self.armed & ~restarted & (delta[0] >= c.window)
        err = (delta[1] / delta[0].clamp(min=1.0) - c.budget).float() / c.budget
        sign = torch.sign(err)
        flipped = sign * self.last_sign < 0  # the last step overshot
        gain = torch.where(flipped, self.gain * 0.5, self.gain * 1.5).clamp(c.gain_min, c.gain_max)
        new_eps = torch.minimum(torch.maximum(self.eps * torch.exp(-(gain * err).clamp(-1.0, 1.0)), self.lo), self.hi)
        self.eps.copy_(torch.where(due, new_eps, self.eps))
        self.gain.copy_(torch.where(due, gain, self.gain))
        self.last_sign.copy_(torch.where(due, sign, self.last_sign))
        self.last.copy_(torch.where(due | restarted, now, self.last))
        self.updates.add_(due.long())

    def _counts(self) -> torch.Tensor:
        """[tokens, extras] counted so far, float64: a strided view of the stats, no copy."""
        return self.stats[TOKENS_INDEX : EXTRAS_INDEX + 1 : EXTRAS_INDEX - TOKENS_INDEX]
