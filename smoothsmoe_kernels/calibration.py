"""calibrate_eps(): the smallest band width that reaches the extra-expert budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoothsmoe_kernels.config import RoutingConfig
from smoothsmoe_kernels.routing import band_gaps
from smoothsmoe_kernels.routing_result import BandGaps

DEFAULT_BUDGET = 0.5  # the paper's k* = k + 0.5 active experts per token
DEFAULT_RTOL = 1e-4


@dataclass(frozen=True, slots=True)
class Calibration:
    """One layer's calibrated eps and what it gives on the calibration tokens."""

    eps: float
    mean_extras: float  # at eps, on the calibration tokens
    budget: float
    reached: bool  # False if no eps reaches the budget (too few candidates, e.g. ties above the cap)
    iterations: int


def calibrate_eps(
    scores: torch.Tensor,
    config: RoutingConfig,
    budget: float = DEFAULT_BUDGET,
    correction_bias: torch.Tensor | None = None,
    rtol: float = DEFAULT_RTOL,
) -> Calibration:
    """Bisect eps to the smallest value whose mean extras per token reach `budget`.

    scores [N, E]: one layer's router logits on N calibration tokens.

    The mean extra count is a non-decreasing step function of eps (an extra is
    active iff its gap to the k-th score is below min(eps, cap gap)), computed
    here with the very comparison the router uses. Precision: the returned eps
    reaches the budget, and the true smallest such eps lies in
    (eps * (1 - rtol), eps]. Because the count is a step function, the mean at
    eps can overshoot the budget by the tokens whose gaps lie in that interval
    (about 1/N for continuous scores). If the budget cannot be reached, the
    smallest eps reaching the largest attainable mean is returned, reached=False.
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"need calibration scores [N, E] with N >= 1, got {tuple(scores.shape)}")
    return calibrate_gaps(band_gaps(scores, config, correction_bias), config.max_extra, budget, rtol)


def calibrate_gaps(bg: BandGaps, max_extra: int, budget: float = DEFAULT_BUDGET, rtol: float = DEFAULT_RTOL) -> Calibration:
    """calibrate_eps from recorded band gaps (N tokens) instead of scores."""
    if not 0.0 <= budget <= max_extra:
        raise ValueError(f"budget must be in [0, max_extra={max_extra}], got {budget}")
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    N = bg.gaps.shape[0]
    if N == 0:
        raise ValueError("need at least one calibration token")

    def mean_extras(eps: float) -> float:
        eps_t = torch.tensor(eps, dtype=torch.float32, device=bg.gaps.device)
        return bg.extras(eps_t).sum().item() / N

    # Past the largest gap that can ever enter, the mean saturates.
    enterable = bg.gaps < bg.cap_gap
    top = float(bg.gaps[enterable].max()) if enterable.any() else 0.0
    hi = float(torch.nextafter(torch.tensor(top, dtype=torch.float32), torch.tensor(float("inf"))))
    attainable = mean_extras(hi)
    target = min(budget, attainable)
    if target <= 0.0:
        return Calibration(eps=0.0, mean_extras=0.0, budget=budget, reached=budget <= 0.0, iterations=0)
    lo, iterations = 0.0, 0
    while hi - lo > rtol * hi:
        mid = _fp32((lo + hi) / 2)
        if mid in (lo, hi):  # float32 cannot split further
            break
        if mean_extras(mid) >= target:
            hi = mid
        else:
            lo = mid
        iterations += 1
    return Calibration(
        eps=hi, mean_extras=mean_extras(hi), budget=budget, reached=attainable >= budget, iterations=iterations
    )


def _fp32(x: float) -> float:
    """Round to float32, the precision the router compares eps in."""
    return float(torch.tensor(x, dtype=torch.float32))
