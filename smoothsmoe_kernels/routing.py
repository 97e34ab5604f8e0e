"""smooth_topk(): the spec's smoothed top-k routing in vectorized torch.

This is the reference that the Triton kernel is tested against, and the CPU
path of the server. Everything is computed in float32 whatever the input dtype.

How the band is computed (one token, scores sorted descending, tau = z(k)):

    gap_j = tau - z(k+j)            j = 1..M, the distance of candidate extra j
    c     = tau - z(k+M+1)          the gap of the first excluded score
    B     = min(eps, c)             band width: tau - L in the spec's notation
    extra j is active  <=>  gap_j < B
    u_j   = (B - gap_j) / B,  mult_j = s(u_j)

which is the spec's `L = max(tau - eps, z(k+M+1))`, `u = (z - L) / (tau - L)`
written in gaps. Deciding activity on gaps (not on `z > tau - eps`) lets the
calibration count extras with the very same comparison (see `band_gaps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smoothsmoe_kernels.config import RoutingConfig

FMAX = torch.finfo(torch.float32).max
# u and 1-u are clamped to this before the logs: far below any weight that
# matters, far above float32's smallest normal, so log() stays finite.
U_MIN = 1e-30
STEP_A = 1.0  # s(u) = u^a / (u^a + (1-u)^b), the spec's smooth step
STEP_B = 50.0


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
    """What decides the band for any eps: enough for routing and calibration alike."""

    gaps: torch.Tensor  # [T, M] float32, tau - z(k+j); +inf where no candidate
    cap_gap: torch.Tensor  # [T] float32, tau - z(k+M+1); 0 where there is no band
    has_band: torch.Tensor  # [T] bool, tau is finite (else fewer than k finite scores)

    def band(self, eps: torch.Tensor) -> torch.Tensor:
        """Band width B = min(eps, c) per token, [T] float32; 0 is an empty band."""
        return torch.minimum(eps, self.cap_gap)

    def capped(self, eps: torch.Tensor) -> torch.Tensor:
        """[T] bool: z(k+M+1) > tau - eps, the cap moved the band's lower edge."""
        return self.has_band & (self.cap_gap < eps)

    def extras(self, eps: torch.Tensor) -> torch.Tensor:
        """Active extras per token [T, M] bool: gap_j < B. Monotone in eps."""
        return self.gaps < self.band(eps).unsqueeze(-1)


def smooth_topk(
    scores: torch.Tensor,
    top_k: int,
    eps: float | torch.Tensor,
    max_extra: int,
    *,
    scoring_func: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    backend: str = "auto",
) -> RoutingResult:
    """Smoothed top-k routing of router logits `scores` [T, E] (any float dtype).

    `eps` (a float or a 0-d tensor, in score units) is the band width; 0 gives
    the family's stock top-k. Softmax families score by the logit; the sigmoid
    family scores by `sigmoid(logit) + correction_bias` and weighs by
    `sigmoid(logit)`. See RoutingConfig for the families, `route` for the rest.

    Example (k=1, one extra allowed): expert 2 sits 0.05 below expert 0, inside
    a band of 0.1, so it is active as a first-order extra:

        >>> r = smooth_topk(torch.tensor([[2.0, 0.0, 1.95]]), 1, 0.1, 1)
        >>> r.ids.tolist(), r.order.tolist()
        ([[0, 2]], [1])
    """
    config = RoutingConfig(
        top_k=top_k,
        max_extra=max_extra,
        scoring_func=scoring_func,
        renormalize=renormalize,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor,
    )
    if backend not in ("auto", "torch"):
        # The Triton kernel is not part of the package yet; say so instead of guessing.
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    return route(scores, config, eps, correction_bias)


def route(
    scores: torch.Tensor,
    config: RoutingConfig,
    eps: float | torch.Tensor,
    correction_bias: torch.Tensor | None = None,
) -> RoutingResult:
    """smooth_topk with the layer's RoutingConfig; see the module docstring."""
    K, M, W = config.top_k, config.max_extra, config.width
    z, weight_src, idx, zs = _select(scores, config, correction_bias)
    T = z.shape[0]
    eps_t = _eps_tensor(eps, z.device)

    bg = _gaps_from_sorted(zs, K, M)
    B = bg.band(eps_t)  # [T]
    active = bg.gaps < B.unsqueeze(-1)  # [T, M], a prefix of the M slots
    capped = bg.capped(eps_t)

    # mult_j = s(u_j) through the stable log form; u and 1-u from the gaps
    # directly so that neither loses bits to cancellation near 0 or 1.
    B_safe = torch.where(B > 0, B, torch.ones_like(B)).unsqueeze(-1)
    u = ((B.unsqueeze(-1) - bg.gaps) / B_safe).clamp(min=U_MIN)
    one_minus_u = (bg.gaps / B_safe).clamp(min=U_MIN)
    mult_extra = _f64(lambda a, b: torch.exp(-F.softplus(STEP_B * torch.log(b) - STEP_A * torch.log(a))), u, one_minus_u)
    mult = torch.cat([torch.ones(T, K, device=z.device), torch.where(active, mult_extra, 0.0)], dim=-1)  # [T, W]
    slot_active = torch.cat([torch.ones(T, K, dtype=torch.bool, device=z.device), active], dim=-1)

    ids = torch.where(slot_active, idx[:, :W], -1).to(torch.int32)  # [T, W]
    weights = _weights(config, z, weight_src, zs, idx, mult)
    weights = torch.where(slot_active, weights * config.routed_scaling_factor, 0.0)

    margin = torch.nan_to_num(zs[:, K - 1] - zs[:, K], nan=0.0, posinf=FMAX)
    return RoutingResult(
        ids=ids,
        weights=weights,
        order=active.sum(-1, dtype=torch.int32),
        capped=capped,
        margin=margin,
    )


def band_gaps(
    scores: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> BandGaps:
    """The gaps that decide a batch's extras for every eps (used by calibration)."""
    *_, zs = _select(scores, config, correction_bias)
    return _gaps_from_sorted(zs, config.top_k, config.max_extra)


def _f64(fn, *args: torch.Tensor) -> torch.Tensor:
    """fn over float64 copies of float32 args, rounded back to float32.

    Batch invariance: torch's CPU kernels evaluate exp/log/sigmoid with SIMD in
    the body of a tensor and with scalar code in its tail, which can differ by
    one float32 ulp, so a token's weights would depend on where it sits in the
    batch. In float64 both are far more accurate than float32, and rounding to
    float32 gives the same value (unless the exact value lies within ~1e-16 of a
    float32 rounding midpoint, about one weight in 1e9).
    """
    return fn(*(a.double() for a in args)).float()


def _eps_tensor(eps: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(eps, torch.Tensor):
        if eps.dim() != 0:
            raise ValueError(f"eps must be a float or a 0-d tensor, got shape {tuple(eps.shape)}")
        # A device tensor is not checked on the host (that would sync every
        # step): NaN or negative counts as 0, +inf as the largest float.
        return eps.to(device=device, dtype=torch.float32).nan_to_num(0.0, posinf=FMAX).clamp(0.0, FMAX)
    if not 0.0 <= eps < float("inf"):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return torch.tensor(min(float(eps), FMAX), dtype=torch.float32, device=device)


def _select(scores: torch.Tensor, config: RoutingConfig, correction_bias: torch.Tensor | None):
    """Selection scores and the top W+1 of them, ties to the lower index.

    Returns z [T, E] (selection scores after group masking), weight_src [T, E]
    (logits for softmax, sigmoid(logit) for sigmoid), idx [T, W+1] int64
    (expert ids by descending score, -1 past E) and zs [T, W+1] (their scores,
    -inf past E).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
    T, E = scores.shape
    config.check_num_experts(E)
    logits = scores.float()
    nan = torch.isnan(logits)
    if config.scoring_func == "sigmoid":
        weight_src = torch.where(nan, 0.0, _f64(torch.sigmoid, logits))
        z = weight_src if correction_bias is None else weight_src + correction_bias.float()
        z = torch.where(nan, float("-inf"), z)
    else:
        if correction_bias is not None:
            raise ValueError("correction_bias is defined for scoring_func='sigmoid' only")
        z = weight_src = logits
    # NaN counts as -inf, +inf as the largest float (so differences stay
    # finite), and +0.0 replaces -0.0 so that the integer keys below tie them.
    z = torch.nan_to_num(z, nan=float("-inf"), posinf=FMAX, neginf=float("-inf")) + 0.0
    if config.scoring_func == "softmax":
        weight_src = z

    if config.num_expert_group is not None:
        z = _mask_groups(z, config, with_bias=correction_bias is not None)

    n = min(config.width + 1, E)
    idx = _topk_lower_index(z, n)  # [T, n] int64
    zs = z.gather(1, idx)
    pad = config.width + 1 - n
    if pad:  # fewer experts than W+1: the missing candidates score -inf
        idx = F.pad(idx, (0, pad), value=-1)
        zs = F.pad(zs, (0, pad), value=float("-inf"))
    return z, weight_src, idx, zs


def _topk_lower_index(z: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest entries per row, ties broken by the lower index.

    torch.topk breaks ties arbitrarily, so rank on an int64 key instead: the
    float's bits mapped to an order-preserving int32, times E, plus a term that
    prefers the lower index among equal floats. Keys are distinct per row.
    """
    T, E = z.shape
    bits = z.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # [T, E]
    key = ordered * E + (E - 1 - torch.arange(E, device=z.device))
    return key.topk(n, dim=-1, sorted=True).indices


def _mask_groups(z: torch.Tensor, config: RoutingConfig, with_bias: bool) -> torch.Tensor:
    """Grouped (node-limited) top-k: experts outside the best groups score -inf.

    As in DeepSeek: a group scores the sum of its top-2 scores when a correction
    bias is in use (V3), else its best score (V2). Ties go to the lower group.
    """
    T, E = z.shape
    G = config.num_expert_group
    zg = z.view(T, G, E // G)
    if with_bias:
        top2 = zg.topk(min(2, E // G), dim=-1).values
        group_score = torch.nan_to_num(top2.sum(-1), nan=float("-inf"), posinf=FMAX)
    else:
        group_score = zg.amax(-1)
    groups = _topk_lower_index(group_score + 0.0, config.topk_group)  # [T, topk_group]
    keep = torch.zeros(T, G, dtype=torch.bool, device=z.device).scatter_(1, groups, True)
    return torch.where(keep.unsqueeze(-1), zg, float("-inf")).view(T, E)


def _gaps_from_sorted(zs: torch.Tensor, K: int, M: int) -> BandGaps:
    tau = zs[:, K - 1 : K]  # [T, 1]
    band_ok = torch.isfinite(tau)  # tau = -inf: fewer than k finite scores, no band
    gaps = torch.where(band_ok, tau - zs[:, K : K + M], float("inf"))
    gaps = torch.nan_to_num(gaps, nan=float("inf"))  # -inf candidates (and overflow) never enter
    cap_gap = torch.where(band_ok, tau - zs[:, K + M : K + M + 1], 0.0).squeeze(-1)
    return BandGaps(gaps=gaps, cap_gap=cap_gap, has_band=band_ok.squeeze(-1))


def _weights(config, z, weight_src, zs, idx, mult) -> torch.Tensor:
    """Unscaled weights of the W slots per the family; inactive slots are masked by the caller."""
    K, W = config.top_k, config.width
    T = z.shape[0]
    slot_ids = idx[:, :W].clamp(min=0)
    if config.scoring_func == "softmax":
        zmax = zs[:, :1]
        num = mult * _f64(torch.exp, zs[:, :W] - zmax)  # exp(-inf) = 0 for -inf or missing slots
        if config.renormalize:
            den = num.sum(-1, keepdim=True)
        else:
            # Over all experts, before any group masking (as DeepSeek-V2 takes
            # the softmax of all logits first). Not via logsumexp: at |z| ~ 1e30
            # its log(count) term is lost to rounding.
            den = _f64(lambda d: torch.exp(d).sum(-1, keepdim=True), weight_src - zmax)
    else:
        num = mult * weight_src.gather(1, slot_ids)
        den = num.sum(-1, keepdim=True) if config.renormalize else torch.ones_like(num[:, :1])
    w = num / torch.where(den > 0, den, 1.0)
    # A row with nothing to normalize by (all scores -inf; or all sigmoids 0)
    # falls back to equal weights on its top-k slots, as the spec says.
    degenerate = ~(den > 0) | ~torch.isfinite(den)
    equal = torch.cat([torch.full((T, K), 1.0 / K, device=z.device), torch.zeros(T, W - K, device=z.device)], -1)
    return torch.where(degenerate, equal, torch.nan_to_num(w, nan=0.0, posinf=1.0))
