"""SmoothingOptions: the process-wide --smooth-* values, and how they reach vLLM's processes."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

# cli.py writes the options here; register() reads them in every vLLM process
# (API server, engine core, workers). Unset: the plugin leaves vLLM stock.
ENV_VAR = "SMOOTHSMOE_OPTIONS"
EXPERTS_BACKENDS = ("auto", "smoothsmoe", "vllm")
# vLLM's --worker-extension-cls for every engine this project starts (serve,
# calibrate, eval): its counters, eps and probes live in the workers. Here,
# not in a command module, so that every command can name it without a circle.
WORKER_EXTENSION = "smoothsmoe_server.engine.worker_extension.SmoothWorkerExtension"


@dataclass(frozen=True, slots=True)
class SmoothingOptions:
    """What `smoothsmoe serve` was asked for; one flag per field (--smooth-<field>)."""

    enabled: bool = True  # --smoothing / --no-smoothing: off routes stock top-k (still counted)
    eps: str = "auto"  # a number (all layers), a JSON file of per-layer values, "auto" or "online"
    budget: float = 0.5  # target mean extra experts per token, for eps=auto and online
    eps_window: int = 1024  # eps=online: tokens a layer routes between two eps updates
    eps_range: float = 16.0  # eps=online: eps stays within [eps0 / range, eps0 * range] of its calibrated eps0
    eps_log: str = ""  # a file: append every layer's eps (and counts) once a second, JSON lines
    max_extra: int = 2  # cap on extra experts per token; layer width is top_k + max_extra
    top_k: int = 0  # experts per token of every MoE layer; 0 keeps the model's
    experts: str = "auto"  # a smoothed layer's experts: "smoothsmoe" (active pairs only), "vllm" (padded), "auto"
    model: str = ""  # the served model name, for the config info metric

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"--smooth-top-k must be >= 0 (0: the model's), got {self.top_k}")
        if self.max_extra < 0:
            raise ValueError(f"--smooth-max-extra must be >= 0, got {self.max_extra}")
        if not 0.0 <= self.budget <= self.max_extra:
            raise ValueError(f"--smooth-budget must be in [0, max_extra={self.max_extra}], got {self.budget}")

        if self.eps_window < 1 or not self.eps_range >= 1:
            raise ValueError(f"need --smooth-eps-window >= 1 and --smooth-eps-range >= 1, got "
                             f"{self.eps_window}, {self.eps_range}")
        if self.online and not self.budget > 0:
            raise ValueError("--smooth-eps online holds the budget: it needs --smooth-budget > 0")
        if self.experts not in EXPERTS_BACKENDS:
            raise ValueError(f"--smooth-experts must be one of {', '.join(EXPERTS_BACKENDS)}, got {self.experts!r}")

    @property
    def online(self) -> bool:
        """eps adapts to traffic (--smooth-eps online), with smoothing on."""
        return self.enabled and self.eps == "online"

    def experts_backend(self, device_type: str) -> str:
        """'smoothsmoe' or 'vllm' for a layer on this device; auto picks ours on CUDA only.

        On the CPU vLLM's fused C++ kernel computing the padded slots is faster
        than our torch reference's loop over experts (see loadtests.throughput).
        """
        if self.experts != "auto":
            return self.experts
        return "smoothsmoe" if device_type == "cuda" else "vllm"

    def to_env(self) -> dict[str, str]:
        return {ENV_VAR: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_env(cls, environ: os._Environ | dict[str, str] = os.environ) -> SmoothingOptions | None:
        raw = environ.get(ENV_VAR)
        return None if raw is None else cls(**json.loads(raw))
