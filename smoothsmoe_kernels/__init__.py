"""Smoothed top-k routing for MoE layers: torch references (and, later, Triton kernels).

Imports with torch alone: no vLLM, no triton.
"""

from smoothsmoe_kernels.calibration import Calibration, calibrate_eps, calibrate_gaps
from smoothsmoe_kernels.config import RoutingConfig
from smoothsmoe_kernels.experts import moe_experts
from smoothsmoe_kernels.routing import RoutingResult, route, smooth_topk
from smoothsmoe_kernels.stats import RoutingStats, StatsLayout, accumulate, read_stats, routing_stats

__all__ = [
    "Calibration",
    "RoutingConfig",
    "RoutingResult",
    "RoutingStats",
    "StatsLayout",
    "accumulate",
    "calibrate_eps",
    "calibrate_gaps",
    "moe_experts",
    "read_stats",
    "route",
    "routing_stats",
    "smooth_topk",
]
