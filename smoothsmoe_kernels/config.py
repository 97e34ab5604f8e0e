"""RoutingConfig: what fixes one MoE layer's routing (width, weight family, grouping)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus", "topk_sigmoid")
BIASED_SCORING_FUNCS = ("sigmoid", "sqrtsoftplus")  # a correction bias steers their selection


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """What fixes one MoE layer's routing: output width, weight family, grouping.

    Built once per layer at load time and only read afterwards; `eps` is not
    here because it is data (calibrated, possibly a device tensor), not shape.

    The weight families of docs/routing.md, by scoring_func and renormalize:
      - softmax + renormalize          (Mixtral, Qwen3-MoE, OLMoE with norm)
      - softmax, not renormalized      (Qwen2-MoE, DeepSeek-V2)
      - sigmoid + renormalize          (DeepSeek-V3, with a score correction bias)
      - sqrtsoftplus + renormalize     (DeepSeek-V4: sqrt(softplus(logit)), with a bias)
      - topk_sigmoid, not renormalized (Llama 4: top-k of the logits, then sigmoid of each)
    """

    top_k: int
    max_extra: int = 2
    scoring_func: Literal["softmax", "sigmoid", "sqrtsoftplus", "topk_sigmoid"] = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = None  # grouped (node-limited) top-k, DeepSeek style
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        # ValueError, not assert: `python -O` strips asserts.
        if self.top_k < 1 or self.max_extra < 0:
            raise ValueError(f"need top_k >= 1 and max_extra >= 0, got {self}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.scoring_func == "topk_sigmoid" and self.renormalize:
            raise ValueError("scoring_func='topk_sigmoid' (Llama 4) is not renormalized: pass renormalize=False")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("num_expert_group and topk_group go together (both or neither)")
        if self.num_expert_group is not None and not 1 <= self.topk_group <= self.num_expert_group:
            raise ValueError(f"need 1 <= topk_group <= num_expert_group, got {self}")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")

    @property
    def width(self) -> int:
        """Output slots per token, fixed per layer so workspaces and CUDA graphs stay valid."""
        return self.top_k + self.max_extra

    def check_num_experts(self, E: int) -> None:
        """Raise if a layer of E experts cannot be routed with this config."""
        if self.num_expert_group is None:
            if E < self.top_k:
                raise ValueError(f"top_k={self.top_k} needs at least that many experts, got E={E}")
            return
        if E % self.num_expert_group:
            raise ValueError(f"E={E} is not divisible by num_expert_group={self.num_expert_group}")
        reachable = self.topk_group * (E // self.num_expert_group)
        if reachable < self.top_k:
            raise ValueError(f"topk_group={self.topk_group} groups hold {reachable} experts < top_k={self.top_k}")

    @property
    def selects_on_logits(self) -> bool:
        """Selection and band on the raw logits (softmax families, Llama 4); else on a transformed score."""
        return self.scoring_func in ("softmax", "topk_sigmoid")
