"""probe_layer(): continuity of one live MoE layer across a routing boundary.

Sweeps synthetic hidden states x(t) = x* + t d through the surface where the
layer's k-th and (k+1)-th router scores tie, with the engine's own gate
weights, our router and the layer's experts kernel, at the layer's eps and at eps 0
(stock top-k), and reports the largest jump between neighbouring outputs for
each step size. Smoothed, the largest jump shrinks with the step; stock, it
stays at the size of the expert swap. Runs in the worker (see
SmoothWorkerExtension.smoothsmoe_probe_layer); nothing is counted.
"""

from __future__ import annotations

import torch

from smoothsmoe_server.engine.router import SmoothRouter


class ProbeRefused(ValueError):
    """The layer cannot be probed, for what it is (not for a failure): a client asked for the wrong layer."""


@torch.inference_mode()
def probe_layer(runner, router: SmoothRouter, rel_steps: list[float], seed: int = 0) -> dict:
    """Largest neighbour jump of the layer's output, smoothed and stock, per step.

    The line is scaled so that t is in router-score units along the boundary
    normal (the k-th minus (k+1)-th score changes by t), and swept over
    [-2 eps, 2 eps] with steps eps * rel_steps. Raises ProbeRefused for a layer
    whose logits the model computes outside the runner, whose experts take a
    transformed input, or whose eps is 0.
    """
    if runner.gate is None:
        raise ProbeRefused(f"layer {router.layer_index}: the model computes its router logits outside the MoE "
                           "runner, so the probe cannot make them")
    if getattr(runner, "routed_input_transform", None) is not None:
        raise ProbeRefused(f"layer {router.layer_index}: its experts take a transformed input (a latent MoE), "
                           "which the probe does not build")
    gate = gate_weight(runner)  # [E, H] float32: router scores are computed in float32 here
    dtype = runner.moe_config.in_dtype  # the experts run in the engine's dtype, as in serving
    H = gate.shape[1]
    K = router.config.top_k
    eps = float(router.eps)
    if eps <= 0:
        raise ProbeRefused(f"layer {router.layer_index} has eps 0: nothing to compare")
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(H, generator=g)  # the MoE input is RMS-normed: entries ~ N(0, 1)
    d = torch.randn(H, generator=g)
    z0 = gate.cpu() @ x0
    order = z0.argsort(descending=True)
    a, b = order[K - 1], order[K]
    normal = gate[a].cpu() - gate[b].cpu()
    x_star = x0 - (z0[a] - z0[b]) / (normal @ normal) * normal  # on the k-th/(k+1)-th tie
    d = d / (normal @ d)  # unit speed across the boundary, in score units
    out = {"layer": router.layer_index, "eps": eps, "rel_steps": rel_steps, "smoothed": [], "stock": []}
    for rel in rel_steps:
        h = eps * rel
        n = round(4 * eps / h)
        t = (-2 * eps + h * torch.arange(n + 1, dtype=torch.float64)).float()
        x = (x_star + t[:, None] * d).to(gate.device)
        logits = x @ gate.T
        for key, band in (("smoothed", eps), ("stock", 0.0)):
            weights, ids = router.route_uncounted(logits, band)
            y = runner.routed_experts.forward_modular(x=x.to(dtype), topk_weights=weights, topk_ids=ids).float()
            out[key].append(float((y[1:] - y[:-1]).norm(dim=-1).max()))
    out["output_norm"] = float(y.norm(dim=-1).mean())
    return out


def gate_weight(runner) -> torch.Tensor:
    """The gate's weight [E, H] in float32, read back through the gate itself.

    vLLM's CPU backend prepacks linear weights and drops `.weight`; the gate
    applied to the identity returns the weight exactly (one product per entry).
    Router scores from it in float32 are smooth in the input, where the served
    bfloat16 logits are quantized (a staircase of about 2^-8 relative steps).
    """
    H = runner.moe_config.hidden_dim
    eye = torch.eye(H, dtype=runner.moe_config.in_dtype, device=router_device(runner))
    out = runner.gate(eye)
    return (out[0] if isinstance(out, tuple) else out).float().T.contiguous()


def router_device(runner) -> torch.device:
    return runner.router.eps.device
