"""What routing returns, and the constants every routing implementation shares.

The torch reference (routing.py), the Triton kernel (routing_triton.py), the
stats (stats.py) and calibration all import these from here, so that none of
them imports another implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FMAX = torch.finfo(torch.float32).max
STEP_B = 50.0  # s(u) = u^a / (u^a + (1-u)^b) with a = 1, b = 50: the smooth step of docs/routing.md


@dataclass(frozen=True, slots=True)
class RoutingResult:
    """The routing of T tokens at width W = top_k + max_extra.

    Slots 0..K-1 hold the top-k experts by descending score; slots K.. hold the
    active extras, best first; inactive slots hold id -1 and weight 0.
    """

    ids: torch.Tensor  # [T, W] int32
    weights: torch.Tensor  # [T, W] float32
    order: torch.Tensor  # [T] int32, active extras (0..M); >= 1 is a boundary hit
    capped: torch.Tensor  # [T] bool, the band was cut by the cap (z(k+M+1) > tau - eps)
    margin: torch.Tensor  # [T] float32, z(k) - z(k+1), finite (+inf -> float32 max, -inf - -inf -> 0)


@dataclass(frozen=True, slots=True)
class BandGaps:
    """What decides the band for any eps: enough for routing and calibration alike.

    Where tau is -inf (fewer than k finite scores) every gap is +inf: no band.
    """

    gaps: torch.Tensor  # [T, M] float32, tau - z(k+j); +inf where no candidate
    cap_gap: torch.Tensor  # [T, 1] float32, tau - z(k+M+1); +inf where none

    def band(self, eps: torch.Tensor) -> torch.Tensor:
        """Band width B = min(eps, c) per token, [T, 1] float32."""
        return torch.minimum(eps, self.cap_gap)

    def extras(self, eps: torch.Tensor) -> torch.Tensor:
        """Active extras per token [T, M] bool: gap_j < B. Monotone in eps."""
        return self.gaps < self.band(eps)

    def capped(self, eps: torch.Tensor) -> torch.Tensor:
        """[T] bool: z(k+M+1) > tau - eps, the cap moved the band's lower edge."""
        return (self.cap_gap < eps).squeeze(-1)


def as_eps_tensor(eps: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """eps as a 0-d float32 tensor on `device`; a float is checked, a tensor is not."""
    if isinstance(eps, torch.Tensor):
        if eps.dim() != 0:
            raise ValueError(f"eps must be a float or a 0-d tensor, got shape {tuple(eps.shape)}")
        # A device tensor is not checked on the host (that would sync every
        # step): NaN or negative counts as 0, +inf as the largest float.
        return eps.to(device=device, dtype=torch.float32).nan_to_num(0.0, posinf=FMAX).clamp(0.0, FMAX)
    if not 0.0 <= eps < float("inf"):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return torch.tensor(min(float(eps), FMAX), dtype=torch.float32, device=device)
