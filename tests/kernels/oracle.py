"""A per-token oracle of the spec, written as plainly as possible (loops, numpy float32).

Test code only: slow on purpose, so that it reads like the spec.
"""

from __future__ import annotations

import math

import numpy as np
import torch

F32 = np.float32
FMAX = float(np.finfo(np.float32).max)


def selection_scores(logits, family, bias=None):
    """(z, weight source) per expert as float32 lists; NaN -> -inf, +inf -> float max.

    sigmoid and sqrtsoftplus select on the transformed score plus the bias;
    softmax and topk_sigmoid on the logit (topk_sigmoid weighs by its sigmoid).
    """
    x = torch.as_tensor(logits, dtype=torch.float32)
    if family in ("sigmoid", "sqrtsoftplus"):
        fn = sigmoid if family == "sigmoid" else sqrt_softplus
        sig = torch.tensor([fn(v) for v in x.tolist()], dtype=torch.float32)
        z = sig + (bias if bias is not None else 0.0)
        z = torch.where(torch.isnan(x), float("-inf"), z)
        src = sig
    else:
        z = src = x
    z = torch.nan_to_num(z, nan=float("-inf"), posinf=FMAX, neginf=float("-inf"))
    if family == "topk_sigmoid":
        src = torch.tensor([sigmoid(v) for v in x.tolist()], dtype=torch.float32)
    elif family not in ("sigmoid", "sqrtsoftplus"):
        src = z
    return [F32(v) for v in z.tolist()], [F32(v) for v in src.tolist()]


def sqrt_softplus(x):
    """sqrt(log(1 + e^x)) in float64 (x itself above 20, as torch's softplus), NaN -> 0, +inf as float max."""
    if math.isnan(x):
        return 0.0
    x = min(x, FMAX)
    return math.sqrt(x if x > 20 else math.log1p(math.exp(x)))


def sigmoid(x):
    """The logistic function in float64, NaN -> 0 (a NaN logit counts as -inf)."""
    if math.isnan(x):
        return 0.0
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def smooth_step(u):
    """s(u) = u / (u + (1-u)^50), the spec's step with a=1, b=50."""
    return u / (u + (1.0 - u) ** 50)


def route_token(logits, k, m, eps, family="softmax", renormalize=True, bias=None, groups=None, scale=1.0):
    """One token's (ids, weights, order, capped, margin) per the spec. groups = (G, topk_group)."""
    E = len(logits)
    z, src = selection_scores(logits, family, bias)
    z_all = list(z)
    if groups is not None:
        G, tg = groups
        n = E // G
        def gscore(g):
            vals = sorted(z[g * n:(g + 1) * n], reverse=True)
            s = float(vals[0]) + float(vals[1]) if bias is not None and n >= 2 else float(vals[0])
            return F32(min(s, FMAX)) if not math.isnan(s) else F32(-math.inf)
        best = sorted(range(G), key=lambda g: (-gscore(g), g))[:tg]
        z = [z[i] if i // n in best else F32(-math.inf) for i in range(E)]
    order_idx = sorted(range(E), key=lambda i: (-z[i], i))  # ties to the lower index
    zs = [z[i] for i in order_idx] + [F32(-math.inf)] * (k + m + 1)
    tau = zs[k - 1]
    has_band = math.isfinite(tau)
    gaps = [F32(tau - zs[k + j]) if has_band and math.isfinite(zs[k + j]) else F32(math.inf) for j in range(m)]
    cap_gap = F32(tau - zs[k + m]) if has_band else F32(0.0)
    eps = F32(eps)
    B = min(eps, cap_gap)
    capped = has_band and cap_gap < eps
    ids, mults = order_idx[:k], [1.0] * k
    for j in range(m):
        if gaps[j] < B:
            u = max((float(B) - float(gaps[j])) / float(B), 1e-30)
            ids.append(order_idx[k + j])
            mults.append(smooth_step(u))
    order = len(ids) - k
    if family == "softmax":
        zmax = float(zs[0])
        num = [mu * math.exp(float(z[i]) - zmax) if math.isfinite(zmax) else 0.0 for mu, i in zip(mults, ids)]
        if renormalize:
            den = sum(num)
        else:
            den = sum(math.exp(float(v) - zmax) for v in z_all) if math.isfinite(zmax) else 0.0
    else:
        num = [mu * float(src[i]) for mu, i in zip(mults, ids)]
        den = sum(num) if renormalize else 1.0
    if den > 0:
        w = [scale * v / den for v in num]
    else:
        w = [scale / k] * k + [0.0] * order
    margin = float(tau) - float(zs[k]) if math.isfinite(float(tau) - float(zs[k])) else None
    ids += [-1] * (m - order)
    w += [0.0] * (m - order)
    return ids, w, order, capped, margin
