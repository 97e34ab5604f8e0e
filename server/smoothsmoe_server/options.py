"""SmoothingOptions: the process-wide --smooth-* values, and how they reach vLLM's processes."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

# cli.py writes the options here; register() reads them in every vLLM process
# (API server, engine core, workers). Unset: the plugin leaves vLLM stock.
ENV_VAR = "SMOOTHSMOE_OPTIONS"
EXPERTS_BACKENDS = ("auto", "smoothsmoe", "vllm")
# vLLM's --worker-extension-cls for every engine this project starts (serve,
# calibrate, eval): its counters, eps and probes live in the workers. Here,
# not in a command module, so that every command can name it without a circle.
WORKER_EXTENSION = "smoothsmoe_server.engine.worker_extension.SmoothWorkerExtension"


def _flag(default, help: str, shown: str | None = None):
    """A field that is a `smoothsmoe serve` flag: its help (the one text `--help=Smoothing` and the
    README's flags table show) and, where the value itself would mislead, how its default reads."""
    return field(default=default, metadata={"help": help, "shown": shown})


@dataclass(frozen=True, slots=True)
class SmoothingOptions:
    """What `smoothsmoe serve` was asked for; one flag per field (--smooth-<field>), but `model`.

    Each flag's meaning and default live here and only here: commands/cli.py builds the flags from
    these fields, and tests/server/test_reference_tables.py holds the README's table to them.
    `{settle_windows}` in a help text is eps_control.SETTLE_WINDOWS, filled in by the cli.
    """

    enabled: bool = _flag(True, "off serves stock top-k routing, bit-identical to vLLM without the plugin, "
                          "still counted in `/metrics`")
    eps: str = _flag("auto", "band width per layer in router-score units: a number (all layers), a JSON file from "
                     "`smoothsmoe calibrate` (or an eps log, below), `auto`: calibrated at start-up on built-in "
                     "prompts to the budget, then fixed, or `online`: calibrated, then each layer's eps follows "
                     "its traffic to hold the budget")
    budget: float = _flag(0.5, "target mean extra experts per token for `auto` and `online` (the paper's k + 0.5)")
    eps_window: int = _flag(1024, "`online`: tokens a layer routes between two updates of its eps; the gain of "
                            "each update adapts, and a traffic shift settles within {settle_windows} windows")
    eps_range: float = _flag(16.0, "`online`: each layer's eps stays within [eps0 / range, eps0 x range] of its "
                             "calibrated eps0 (`smoothsmoe_epsilon_bound` shows the bounds)", shown="`16`")
    eps_log: str = _flag("", "a file: every layer's eps and counts, one JSON line a second; its last line is a "
                         "valid `--smooth-eps` file", shown="none")
    max_extra: int = _flag(2, "cap on extra experts per token; layers run at width `top_k + max_extra`")
    top_k: int = _flag(0, "experts per token of every MoE layer in place of the model's top-k: with smoothing on, "
                       "a smaller k with the band keeping it continuous (S2MoE's cheaper inference); with "
                       "`--no-smoothing`, stock routing at that k (what a checkpoint whose config says that k "
                       "serves)", shown="model's")
    experts: str = _flag("auto", "experts computation of smoothed layers: `smoothsmoe` (this project's, active "
                         "pairs only: the Triton grouped-GEMM kernel on CUDA, the torch reference elsewhere), "
                         "`vllm` (vLLM's own kernel, which also computes each inactive slot, at weight 0), "
                         "`auto` = `smoothsmoe` on CUDA and for block-FP8 checkpoints, `vllm` on the CPU otherwise")
    model: str = ""  # the served model name, for the config info metric (not a flag)

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

    # What the log says of a layer that `auto` gave vLLM's experts on the CPU.
    AUTO_CPU_EXPERTS_WHY = ("auto on the CPU: vLLM's kernel computes the inactive slots at weight 0, measured faster "
                            "than active pairs only, whether through vLLM's op one call per active width or this "
                            "project's torch experts, at 1 to 8192 tokens a step (python -m smoothsmoe_kernels.bench "
                            "experts measures it on this machine)")

    def experts_backend(self, device_type: str) -> str:
        """'smoothsmoe' or 'vllm' for an unquantized layer on this device; auto picks ours on CUDA only.

        On the CPU vLLM's fused C++ kernel computing the padded slots is faster
        than our torch reference's loop over experts (see loadtests.throughput) and than
        active pairs through vLLM's own op, one call per active width (AUTO_CPU_EXPERTS_WHY).
        layer_plan.plan_layer gives block-FP8 layers ours under auto everywhere.
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
