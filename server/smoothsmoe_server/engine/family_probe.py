"""recognise_routing_function(): which of the spec's weight families a model's own routing function is.

Some models hand vLLM a custom routing function (Llama 4 does). The plugin does
not trust its name: it calls the function on fixed random logits, at the
layer's top-k, and compares its ids and weights with each family's stock
routing (smoothing's eps -> 0 limit, smoothsmoe_kernels.route at eps 0). Exactly
one family must match, on every token; anything else (a dependence on the hidden
states, a routing no family gives) keeps the layer stock. A function that raises
when probed keeps it stock too, and says so: RoutingFunctionFailed carries its
exception, for the layer's reason and the log.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from smoothsmoe_kernels import RoutingConfig, route

# (scoring_func, renormalize) of the families a routing function can be, without a bias
CANDIDATES = (("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False),
              ("sqrtsoftplus", True), ("topk_sigmoid", False))
PROBE_TOKENS = 96
WEIGHT_ATOL = 1e-5


class RoutingFunctionFailed(RuntimeError):
    """The routing function raised when called on the probe's logits (the cause is chained)."""


def recognise_routing_function(fn: Callable, top_k: int, renormalize: bool,
                               num_experts: int) -> tuple[str, bool] | None:
    """(scoring_func, renormalize) of the one family `fn` computes, or None if none or several match.

    fn is called as vLLM calls a custom routing function: fn(hidden_states=[T, 8] float32,
    gating_output=[T, num_experts] float32, topk=top_k, renormalize=renormalize) -> (weights [T, top_k],
    ids [T, top_k]), on the CPU. Raises RoutingFunctionFailed (from the function's exception) if it
    raises or returns something that is not a pair of [T, top_k] tensors.
    """
    g = torch.Generator().manual_seed(0)
    # Large logits too: there sigmoid rounds to 1 and ties, so selecting on sigmoid(logit) and
    # on the logit (Llama 4) part.
    scales = torch.tensor([0.5, 2.0, 8.0, 40.0]).repeat_interleave(PROBE_TOKENS // 4)[:, None]
    logits = torch.randn(PROBE_TOKENS, num_experts, generator=g) * scales
    hidden = torch.randn(PROBE_TOKENS, 8, generator=g)  # a function that reads them will not match
    try:
        weights, ids = fn(hidden_states=hidden, gating_output=logits.clone(), topk=top_k, renormalize=renormalize)
        ids, weights = _by_expert(ids.long(), weights.float())
    except Exception as e:  # noqa: BLE001: whatever it raised, the caller reports it with the layer
        name = getattr(fn, "__qualname__", repr(fn))
        raise RoutingFunctionFailed(f"{name} raised {type(e).__name__}: {e} when called on the probe's logits "
                                    f"([{PROBE_TOKENS}, {num_experts}] float32 on the CPU)") from e
    matches = []
    for scoring_func, renorm in CANDIDATES:
        ref = route(logits, RoutingConfig(top_k=top_k, max_extra=0, scoring_func=scoring_func, renormalize=renorm), 0.0)
        ref_ids, ref_w = _by_expert(ref.ids.long(), ref.weights)
        if ids.shape == ref_ids.shape and torch.equal(ids, ref_ids) and torch.allclose(weights, ref_w, atol=WEIGHT_ATOL,
                                                                                        rtol=0):
            matches.append((scoring_func, renorm))
    return matches[0] if len(matches) == 1 else None


def _by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's slots sorted by expert id: routings are compared as sets."""
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)
